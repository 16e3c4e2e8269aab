"""Facet visualisation runs (``faceted_fvis.py``): take one concept of a bank, factorise its top
patches' activations at an earlier layer, and render each facet direction (one image each,
``--batch_size`` images per batched optimisation, each with its own generator seeded from (seed,
facet index)) while the concept stays active.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vital.cache import files_digest, write_json
from vital.concepts import extract as C
from vital.concepts.bank import FILE_NAME, check_compatible, load_bank
from vital.config import ConfigError, make_run_dir, opt
from vital.imaging import save_png
from vital.modes import setup
from vital.modes.concepts import (Elements, grid_rows, param_keywords, reference_files,
                                  run_elements, vital_terms, write_match)
from vital.modes.runner import Callbacks, prepare
from vital.refs.images import ReferenceError, load_images


@dataclass
class FacetCFG(setup.RenderCFG):
    """Facet visualisation: sub-concepts of one concept of a bank, each rendered with VITAL."""
    bank: str = opt("", "concept bank: a concept run folder, or its .safetensors / .json "
                    "(empty = the newest bank in --concept_dir made with this model, "
                    "--target_layer and images)")
    concept_dir: str = opt("out_concept", "where concept_neurons_fvis.py wrote its runs: "
                           "searched for a bank when --bank is empty")
    target_layer: str = opt("", "the bank's layer (must match; empty = the bank's own)")
    ref_dir: str = opt("", "the bank's reference images (empty = the files the bank lists); "
                       "checked against the bank's data set hash")
    num_ref: int = opt(12, "images used per folder (with ref_dir)", low=1)
    concept: int = opt(-1, "concept index in the bank (-1 = the most important)", low=-1)
    decomp_layer: str = opt("", "layer of the facets (empty = the default layer before "
                            "target_layer)")
    n_facets: int = opt(3, "NMF components (facets)", low=1)
    facet_patches: int = opt(16, "top patches of the concept whose activations are factorised",
                             low=1)
    nonneg: str = opt("auto", "non-negativity at decomp_layer", choices=list(C.NONNEG))
    nmf_iter: int = opt(500, "NMF iterations", low=1)
    direction_weight: float = opt(10.0, "weight of the facet term", low=0)
    concept_weight: float = opt(1.0, "weight of the term that keeps the concept active", low=0)
    direction_how: str = opt("cosine", "concept term: cosine or dot (projection)",
                             choices=["cosine", "dot"])
    facet_contrast: float = opt(1.0, "penalty on the sibling facets' cosines (0 = plain "
                                "cosine to the own facet)")
    facet_pool: str = opt("positions", "facet cosine: of the position average (mean) or the "
                          "mean of every position's cosine (positions; facets are fit on "
                          "positions)", choices=list(C.POOLINGS))
    batch_size: int = opt(4, "facets optimised together (the rest in further batches; 4 was "
                          "the fastest on 2 CPU cores for class batches, bench/README.md)",
                          low=1)


def _layer_before(target, layer: str) -> str:
    names = [info.name for info in target.layers()]
    earlier = [d for d in target.default_layers() if names.index(d) < names.index(layer)]
    if not earlier:
        raise ConfigError(f"no default layer comes before {layer!r}; give --decomp_layer (a "
                          f"layer before it; query_model_layers.py --model {target.spec} "
                          f"lists them)")
    return earlier[-1]


def _below(cfg: FacetCFG, target, decomp: str) -> FacetCFG:
    """Unless --layers is given, sort-match only the default layers below the facet layer (as
    VITAL does for inner neurons): matching the whole concept's distribution at the facet
    layer itself would pull every facet back to the same mixture."""
    if cfg.layers:
        return cfg
    names = [info.name for info in target.layers()]
    lower = [d for d in target.default_layers() if names.index(d) < names.index(decomp)]
    return dataclasses.replace(cfg, layers=lower or [decomp], layer_weights=[])


def _bank_files(cfg: FacetCFG, bank) -> list[Path]:
    if cfg.ref_dir:
        return reference_files(cfg.ref_dir, cfg.num_ref)
    files = [Path(f) for f in bank.meta["files"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ReferenceError(f"{len(missing)} reference images of the bank are gone (e.g. "
                             f"{missing[0]}); give --ref_dir with the bank's images")
    return files


def find_bank(cfg: FacetCFG, target) -> Path:
    """The newest bank under ``cfg.concept_dir`` (``*/concept_bank.json``) whose metadata fits
    this run: the model's weight hash, ``--target_layer`` (any layer when empty) and the images
    (with ``--ref_dir`` their hash; without, the bank's own images must still exist; their hash
    is checked by ``check_compatible``); none -> ConfigError naming the command that makes one."""
    want = files_digest(reference_files(cfg.ref_dir, cfg.num_ref)) if cfg.ref_dir else None
    found = []
    for meta_path in Path(cfg.concept_dir).glob(f"*/{Path(FILE_NAME).stem}.json"):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue   # not readable: not a bank this run can use
        images_there = want is not None or all(Path(f).is_file() for f in meta.get("files", []))
        if (meta.get("weight_hash") == target.weight_hash
                and (not cfg.target_layer or meta.get("layer") == cfg.target_layer)
                and (want is None or meta.get("dataset_hash") == want) and images_there):
            found.append((meta_path.stat().st_mtime, meta_path.parent))
    if not found:
        layer = cfg.target_layer or "its default layer"
        images = cfg.ref_dir or "your images"
        raise ConfigError(
            f"no concept bank for {target.spec} at {layer} in {cfg.concept_dir}/; make one "
            f"with: python concept_neurons_fvis.py --model {target.spec} --layer_block "
            f"{cfg.target_layer or 'LAYER'} --ref_dir {images} --extract_only (or give --bank)")
    return max(found)[1]


def load_checked_bank(cfg: FacetCFG, target):
    """The bank (``--bank``, else :func:`find_bank`), its layer and its reference files,
    refused unless they fit this run."""
    path = cfg.bank or find_bank(cfg, target)
    if not cfg.bank:
        print(f"concept bank: {path} (the newest in {cfg.concept_dir} that fits)")
    bank = load_bank(path)
    bank.meta["source"] = str(path)   # recorded in config.json
    layer = cfg.target_layer or bank.meta["layer"]
    files = _bank_files(cfg, bank)
    check_compatible(bank.meta, weight_hash=target.weight_hash, model=str(target.spec),
                     layer=layer, dataset_hash=files_digest(files))
    return bank, layer, files


def concept_patches(bank, files: list[Path], concept: int, n: int) -> torch.Tensor:
    """The ``n`` patches (n, 3, S, S) where ``concept`` is strongest, cut again from files."""
    if not 0 <= concept < bank.n_concepts:
        raise ConfigError(f"concept {concept} is not in the bank; valid: 0..{bank.n_concepts - 1} "
                          f"or -1 (the most important)")
    coeff = bank.tensors["coefficients"][:, concept]
    top = coeff.topk(min(n, len(coeff))).indices
    images, _ = load_images(files, bank.meta["canvas"])
    return C.crop_boxes(images, bank.tensors["boxes"][top])


def facet_directions(target, layer: str, patches: torch.Tensor, cfg: FacetCFG, rule):
    """NMF of the patches' per-position activations at ``layer``:
    (W (F, C'), maps (T, F, P) facet coefficient per patch position, nonneg mode, info)."""
    view = C.layer_view(target, layer)
    acts = C.layer_activations(target, view, patches, rule)
    mode = C.resolve_nonneg(cfg.nonneg, float(acts.acts.min()))
    x = C.to_nonneg(acts.acts, mode).transpose(1, 2)                  # (T, C', P) -> (T, P, C')
    u, w, info = C.factorise(x[acts.keep], cfg.n_facets, cfg.seed, cfg.nmf_iter)
    maps = torch.zeros(*acts.keep.shape, cfg.n_facets)                # (T, P, F)
    maps[acts.keep] = u
    return w, maps.transpose(1, 2), mode, {**info, "nonneg": mode}   # (T, P, F) -> (T, F, P)


def _overlay(patch: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """Dim ``patch`` (3, S, S) where the facet is weak: ``heat`` (P,) in [0, 1] on a square
    grid of positions (no overlay when P is not a square)."""
    side = math.isqrt(heat.numel())
    if side * side != heat.numel() or side < 2:
        return patch
    grid_ = heat.reshape(1, 1, side, side)                               # (P,) -> (1, 1, g, g)
    up = F.interpolate(grid_, size=patch.shape[-2:], mode="bilinear", align_corners=False)[0]
    return patch * (0.25 + 0.75 * up)


def facet_rows(patches: torch.Tensor, maps: torch.Tensor) -> list[torch.Tensor]:
    """Per facet, the patches where it peaks highest (best first), lit where it is present."""
    peak = maps.amax(-1)                                                 # (T, F)
    rows = []
    for f in range(maps.shape[1]):
        order = peak[:, f].sort(descending=True, stable=True).indices
        scale = peak[:, f].max().clamp_min(1e-12)
        rows.append(torch.stack([_overlay(patches[t], maps[t, f] / scale) for t in order]))
    return rows


def run_facets(cfg: FacetCFG, argv=None, callbacks: Callbacks | None = None):
    """Facets of one concept, rendered ``--batch_size`` at a time into one run folder;
    returns (run_dir, result)."""
    _, target = prepare(cfg)
    size = setup.image_size(cfg, target)
    bank, layer, files = load_checked_bank(cfg, target)
    concept = bank.order()[0] if cfg.concept < 0 else cfg.concept
    patches = concept_patches(bank, files, concept, cfg.facet_patches)
    decomp = cfg.decomp_layer or _layer_before(target, layer)
    reg = bank.meta["registers"]
    rule = C.RegisterRule(reg["threshold"], reg["relative"], reg["exclude"])
    w, maps, mode, info = facet_directions(target, decomp, patches, cfg, rule)
    objectives, layers, meta = _facet_objectives(cfg, target, bank, concept, (layer, decomp),
                                                 patches, w, mode, size)
    name = f"c{concept}_{Path(str(target.spec)).name}_{decomp}_f{cfg.n_facets}_s{cfg.seed}"
    run_dir = make_run_dir(cfg.out_dir or "out_facet", cfg.run_name or name)
    _save_facets(run_dir, w, maps, concept, decomp, info)
    meta.update(facets={"bank": bank.meta["source"], "concept": concept, "target_layer": layer,
                        "decomp_layer": decomp, **info})
    labels = [f"c{concept} facet {f}" for f in range(cfg.n_facets)]

    def after(run_dir, result):
        k = len(result.image)   # fewer than n_facets after a stop
        save_png(grid_rows(list(result.image), facet_rows(patches, maps)[:k], labels[:k]),
                 run_dir / "facets_grid.png")
        _facet_match(cfg, target, bank, concept, (layer, decomp), result.image, w[:k], mode,
                     run_dir)
        print(run_dir / "facets_grid.png")
    elements = Elements(list(range(cfg.n_facets)), objectives, layers, size,
                        param_keywords(cfg, [patches], size))
    return run_elements(cfg, "facet", target, elements, run_dir, meta, after, argv, callbacks)


def _facet_objectives(cfg: FacetCFG, target, bank, concept: int, layers_: tuple[str, str],
                      patches, w, mode: str, size: int):
    """Per facet: sort matching below the facet layer + its facet term (against its siblings)
    + the concept term; (objectives, layers, meta)."""
    layer, decomp = layers_
    (base,), layers, meta = vital_terms(_below(cfg, target, decomp), target, [patches], size)
    dview, tview = C.layer_view(target, decomp), C.layer_view(target, layer)
    keep = cfg.concept_weight * C.direction_objective(
        layer, bank.directions[concept], bank.meta["nonneg"], tview.skip, cfg.direction_how,
        name=f"concept:{layer}")
    objectives = [base + cfg.direction_weight * C.facet_objective(
        decomp, w, mode, dview.skip, cfg.facet_pool, cfg.facet_contrast, facet=f) + keep
        for f in range(len(w))]
    return objectives, list(dict.fromkeys(layers + [decomp, layer])), meta


def _facet_match(cfg, target, bank, concept, layers_, images, w, mode, run_dir: Path) -> None:
    layer, decomp = layers_
    cos = C.direction_cosines(target, C.layer_view(target, decomp), images, w, mode,
                              cfg.facet_pool)
    concept_cos = C.direction_cosines(target, C.layer_view(target, layer), images,
                                      bank.directions[concept:concept + 1], bank.meta["nonneg"])
    write_match(run_dir / "facets_match.json", list(range(len(w))), cos, "facet",
                 concept_cosine=concept_cos[:, 0].tolist())


def _save_facets(run_dir: Path, w, maps, concept: int, layer: str, info: dict) -> None:
    """facets.safetensors: directions (F, C') and maps (T, F, P); facets.json: the settings."""
    save_file({"directions": w.contiguous(), "maps": maps.contiguous()},
              str(run_dir / "facets.safetensors"))
    write_json(run_dir / "facets.json", {"concept": concept, "decomp_layer": layer, **info})
