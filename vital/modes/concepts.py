"""Concept and facet visualisation runs (``concept_neurons_fvis.py``, ``faceted_fvis.py``).

Concepts: extract a CRAFT concept bank (``vital.concepts.extract``), rank it, save it, then render every
shown concept in one batch: VITAL sort matching to *that concept's* top patches plus a direction
objective at the concept layer. Facets: take one concept of a bank, factorise its top patches'
activations at an earlier layer, and render each facet direction while the concept stays active.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vital.concepts import extract as C
from vital.optvis import losses
from vital.modes import runner as pipeline
from vital.concepts.bank import FILE_NAME, check_compatible, load_bank, save_bank
from vital.config import ConfigError, make_run_dir, opt, run_metadata
from vital.cache import write_json
from vital.optvis.losses import Objective
from vital.imaging import grid, save_png, to_pil
from vital.optvis.param import magnitude_spectrum
from vital.refs.images import ReferenceError, list_images, load_images, resize_images
from vital.cache import files_digest
from vital.refs.references import sorted_features

_TILE = 112        # px of one tile in the grids
_GRID_PATCHES = 6  # top patches shown next to each visualisation


@dataclass
class ConceptCFG(pipeline.RenderCFG):
    """Concept visualisation: CRAFT concepts of a layer, ranked, each rendered with VITAL."""
    ref_dir: str = opt("references/espresso", "folder of real images, or a folder of class "
                       "folders (all are used)")
    num_ref: int = opt(12, "images used per folder")
    target: str = opt("espresso", "class (CLIP: class or prompt) whose output ranks the "
                      "concepts; empty = each image's own top class / own output")
    layer_block: str = opt("", "layer to factorise (empty = the deepest default layer)")
    n_concepts: int = opt(6, "NMF components (concepts)")
    patch_frac: float = opt(0.5, "patch side as a fraction of the reference image side")
    patch_stride: float = opt(0.5, "patch grid step as a fraction of the patch side")
    nonneg: str = opt("auto", "make activations non-negative: relu, split [relu(x), relu(-x)], "
                      "auto (relu if all >= 0)", choices=list(C.NONNEG))
    nmf_iter: int = opt(500, "NMF iterations")
    top_patches: int = opt(8, "top patches kept per concept (its VITAL references)")
    rank: str = opt("sobol", "concept ranking: sobol (CRAFT, total-order indices) or gradient "
                    "(cheaper gradient x input)", choices=list(C.RANKINGS))
    sobol_designs: int = opt(16, "Sobol: QMC points per design matrix (power of two)")
    rank_images: int = opt(4, "reference images used for the ranking (evenly spread)")
    register_threshold: float = opt(3.0, "ViT register tokens: L2-norm limit in the residual "
                                    "stream (times the median token norm if register_relative)")
    register_relative: bool = opt(True, "register_threshold is relative to the median norm")
    exclude_registers: bool = opt(False, "drop high-norm (register) tokens from the concepts")
    extract_only: bool = opt(False, "write the concept bank and stop (no rendering)")
    show: int = opt(0, "render the N most important concepts (0 = all); they form the batch")
    direction_weight: float = opt(1.0, "weight of the concept-direction term")
    direction_how: str = opt("cosine", "direction term: cosine or dot (projection)",
                             choices=["cosine", "dot"])


@dataclass
class FacetCFG(pipeline.RenderCFG):
    """Facet visualisation: sub-concepts of one concept of a bank, each rendered with VITAL."""
    bank: str = opt("", "concept bank: a concept run folder, or its .safetensors / .json")
    target_layer: str = opt("", "the bank's layer (must match; empty = the bank's own)")
    ref_dir: str = opt("", "the bank's reference images (empty = the files the bank lists); "
                       "checked against the bank's data set hash")
    num_ref: int = opt(12, "images used per folder (with ref_dir)")
    concept: int = opt(-1, "concept index in the bank (-1 = the most important)")
    decomp_layer: str = opt("", "layer of the facets (empty = the default layer before "
                            "target_layer)")
    n_facets: int = opt(3, "NMF components (facets)")
    facet_patches: int = opt(16, "top patches of the concept whose activations are factorised")
    nonneg: str = opt("auto", "non-negativity at decomp_layer", choices=list(C.NONNEG))
    nmf_iter: int = opt(500, "NMF iterations")
    direction_weight: float = opt(10.0, "weight of the facet term")
    concept_weight: float = opt(1.0, "weight of the term that keeps the concept active")
    direction_how: str = opt("cosine", "concept term: cosine or dot (projection)",
                             choices=["cosine", "dot"])
    facet_contrast: float = opt(1.0, "penalty on the sibling facets' cosines (0 = plain "
                                "cosine to the own facet)")
    facet_pool: str = opt("positions", "facet cosine: of the position average (mean) or the "
                          "mean of every position's cosine (positions; facets are fit on "
                          "positions)", choices=list(C.POOLINGS))


@dataclass
class ExtractResult:
    """What ``--extract_only`` returns in place of a render result."""
    stopped: str | None = None
    steps_done: int = 0


# ---------------------------------------------------------------- shared steps

def reference_files(ref_dir: str, num: int) -> list[Path]:
    """Up to ``num`` images of ``ref_dir``, or of each class folder inside it."""
    root = Path(ref_dir)
    if root.is_dir() and not any(p.is_file() for p in root.iterdir()):
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise ReferenceError(f"reference folder {root} is empty")
        return [f for folder in folders for f in list_images(folder)[:num]]
    return list_images(root)[:num]


def batched_sort_matching(refs_by_size: dict, weights: dict[str, float]) -> Objective:
    """Sort matching where image b of the batch matches its own references:
    ``refs_by_size[size][layer]`` is (B, C, Q) (or (1, C, Q), shared by the batch)."""
    def term(layer):
        def fn(ctx):
            x = ctx["features"][layer]                               # (B, C, P)
            ref = losses.resample_quantiles(refs_by_size[ctx["size"]][layer], x.shape[-1])
            return (x.sort(dim=-1).values - ref).pow(2).mean()
        return weights[layer] * Objective(fn, f"sort:{layer}")
    return sum(term(layer) for layer in weights)


def patch_quantiles(target, layers, groups: list[torch.Tensor], sizes, device) -> dict:
    """{size: {layer: (G, C, P)}}: sorted features of each patch group (T, 3, S, S)."""
    refs = {}
    for size in sorted(set(sizes)):
        per_group = [sorted_features(target, layers, resize_images(g, size), progress=False)
                     for g in groups]
        refs[size] = {l: torch.stack([q[l] for q in per_group]).to(device) for l in layers}
    return refs


def _vital_terms(cfg, target, groups, size) -> tuple[Objective | int, list[str], dict]:
    """Sort matching of each batch image to its patch group, plus the priors."""
    layers, weights = pipeline.resolve_layers(cfg, target)
    objective = pipeline.priors(cfg)
    if cfg.feat_weight:
        sizes = pipeline.make_schedule(cfg).stage_sizes(size)
        refs = patch_quantiles(target, layers, groups, sizes, target.device)
        objective = cfg.feat_weight * batched_sort_matching(refs, dict(zip(layers, weights))) \
            + objective
    return objective, layers, {"layers": layers, "layer_weights": weights}


def _render(cfg, mode, target, objective, layers, size, groups, run_dir, name, meta, argv,
            batch: int):
    if not isinstance(objective, Objective) or not objective.names:
        raise ConfigError("every weight is zero: nothing to optimise")
    gen = pipeline.generator_for(cfg, target.device)
    extras = {}
    if cfg.param == "maco":   # a natural amplitude spectrum: that of the reference patches
        extras["magnitude"] = magnitude_spectrum(resize_images(torch.cat(groups), size))
    param = pipeline.make_param(dataclasses.replace(cfg, batch=batch), size, target.device, gen,
                                **extras)
    return pipeline.run(cfg, mode, target, objective, layers, param, gen, name, meta,
                        argv=argv, run_dir=run_dir)


def _grid_rows(visuals: list[torch.Tensor] | None, patch_rows: list[torch.Tensor],
               labels: list[str]):
    """One row per item: its visualisation (if any) and its top patches."""
    tiles, names = [], []
    for k, patches in enumerate(patch_rows):
        if visuals is not None:
            tiles.append(to_pil(visuals[k]).resize((_TILE, _TILE)))
            names.append(labels[k])
        for j, p in enumerate(patches[:_GRID_PATCHES]):
            tiles.append(to_pil(p).resize((_TILE, _TILE)))
            names.append(labels[k] if visuals is None and j == 0 else f"patch {j + 1}")
    cols = (1 if visuals is not None else 0) + min(_GRID_PATCHES, len(patch_rows[0]))
    return grid(tiles, names, cols=cols)


# ---------------------------------------------------------------- concepts

def _extract_settings(cfg: ConceptCFG, layer: str, size: int) -> C.ExtractSettings:
    rule = C.RegisterRule(cfg.register_threshold, cfg.register_relative, cfg.exclude_registers)
    return C.ExtractSettings(layer=layer, size=size, n_concepts=cfg.n_concepts,
                             patch_frac=cfg.patch_frac, patch_stride=cfg.patch_stride,
                             nonneg=cfg.nonneg, top_patches=cfg.top_patches, seed=cfg.seed,
                             max_iter=cfg.nmf_iter, rule=rule)


def build_bank(cfg: ConceptCFG, target, size: int):
    """Extract, rank and describe the bank; returns (bank, patches, label)."""
    layer = cfg.layer_block or C.default_concept_layer(target)
    settings = _extract_settings(cfg, layer, size)
    bank, patches = C.extract_bank(target, reference_files(cfg.ref_dir, cfg.num_ref), settings,
                                   cfg.progress)
    score, label = C.make_scorer(target, cfg.target)
    images, _ = load_images(_spread(bank.meta["files"], cfg.rank_images), size)
    ranking = C.rank_concepts(target, bank, images, score,
                              C.RankSettings(cfg.rank, cfg.sobol_designs, seed=cfg.seed),
                              settings.rule, cfg.progress)
    bank.meta.update(ref_dir=cfg.ref_dir, target=label, ranking=ranking)
    return bank, patches, label


def _spread(files: list[str], n: int) -> list[Path]:
    """``n`` files evenly spaced over the list (so every class folder takes part)."""
    n = max(1, min(n, len(files)))
    return [Path(files[round(i * (len(files) - 1) / max(1, n - 1))]) for i in range(n)]


def _report(bank) -> None:
    reg, nmf = bank.meta["registers"], bank.meta["nmf"]
    print(f"concept bank: {bank.n_concepts} concepts at {bank.meta['layer']} from "
          f"{bank.meta['patches']} patches (nonneg {bank.meta['nonneg']}, NMF relative error "
          f"{nmf['relative_error']:.3f})")
    if reg["applies"]:
        print(f"register tokens: {reg['high_norm']} of {reg['tokens']} above the norm limit, "
              f"{reg['excluded']} excluded")
    imp = bank.tensors["importance"]
    ranks = ", ".join(f"c{k} {float(imp[k]):.3g}" for k in bank.order())
    print(f"ranking ({bank.meta['ranking']['method']}, target: {bank.meta['target']}): {ranks}")


def run_concepts(cfg: ConceptCFG, argv=None):
    """Bank + (unless extract_only) one batch render of the shown concepts; (run_dir, result)."""
    _, target = pipeline.prepare(cfg)
    size = pipeline.image_size(cfg, target)
    bank, patches, label = build_bank(cfg, target, size)
    name = (f"{label}_{Path(str(target.spec)).name}_{bank.meta['layer']}_k{bank.n_concepts}"
            f"_s{cfg.seed}").replace(" ", "-")
    run_dir = make_run_dir(cfg.out_dir or "out_concept", cfg.run_name or name)
    save_bank(bank, run_dir / FILE_NAME)
    _report(bank)
    shown = bank.order()[:cfg.show or bank.n_concepts]
    groups = [patches[bank.tensors["top_patches"][k]] for k in shown]
    labels = [f"#{r + 1} c{k} {float(bank.tensors['importance'][k]):.2g}"
              for r, k in enumerate(shown)]
    meta = {"concepts": {"bank": str(run_dir / FILE_NAME), "shown": shown,
                         "registers": bank.meta["registers"], "ranking": bank.meta["ranking"]}}
    if cfg.extract_only:
        return _extract_only(cfg, target, run_dir, meta, groups, labels, argv)
    objective, layers, info, view = _concept_objective(cfg, target, bank, shown, groups, size)
    run_dir, result = _render(cfg, "concept", target, objective, layers, size, groups,
                              run_dir, name, {**meta, **info}, argv, batch=len(shown))
    save_png(_grid_rows(list(result.image), groups, labels), run_dir / "concepts_grid.png")
    cos = C.direction_cosines(target, view, result.image, bank.directions[shown],
                              bank.meta["nonneg"])
    _write_match(run_dir / "concepts_match.json", shown, cos, "concept")
    print(run_dir / "concepts_grid.png")
    return run_dir, result


def _extract_only(cfg, target, run_dir: Path, meta: dict, groups, labels, argv):
    write_json(run_dir / "config.json", run_metadata(cfg, argv, mode="concept",
               model_spec=str(target.spec), weight_hash=target.weight_hash, **meta))
    save_png(_grid_rows(None, groups, labels), run_dir / "concepts_patches.png")
    print(run_dir / FILE_NAME)
    return run_dir, ExtractResult()


def _concept_objective(cfg: ConceptCFG, target, bank, shown: list[int], groups, size: int):
    """VITAL terms per concept plus the direction term; (objective, layers, info, view)."""
    objective, layers, info = _vital_terms(cfg, target, groups, size)
    view = C.layer_view(target, bank.meta["layer"])
    objective = objective + cfg.direction_weight * C.direction_objective(
        view.name, bank.directions[shown], bank.meta["nonneg"], view.skip, cfg.direction_how)
    return objective, list(dict.fromkeys(layers + [view.name])), info, view


# ---------------------------------------------------------------- facets

def _layer_before(target, layer: str) -> str:
    names = [info.name for info in target.layers()]
    earlier = [d for d in target.default_layers() if names.index(d) < names.index(layer)]
    if not earlier:
        raise ConfigError(f"no default layer comes before {layer!r}; give --decomp_layer "
                          f"(valid layers: {', '.join(names)})")
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


def load_checked_bank(cfg: FacetCFG, target):
    """The bank, its layer and its reference files, refused unless they fit this run."""
    if not cfg.bank:
        raise ConfigError("give --bank: a concept run folder or its concept_bank.safetensors "
                          "(made by concept_neurons_fvis.py)")
    bank = load_bank(cfg.bank)
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


def run_facets(cfg: FacetCFG, argv=None):
    """Facets of one concept, rendered as one batch; returns (run_dir, result)."""
    _, target = pipeline.prepare(cfg)
    size = pipeline.image_size(cfg, target)
    bank, layer, files = load_checked_bank(cfg, target)
    concept = bank.order()[0] if cfg.concept < 0 else cfg.concept
    patches = concept_patches(bank, files, concept, cfg.facet_patches)
    decomp = cfg.decomp_layer or _layer_before(target, layer)
    reg = bank.meta["registers"]
    rule = C.RegisterRule(reg["threshold"], reg["relative"], reg["exclude"])
    w, maps, mode, info = facet_directions(target, decomp, patches, cfg, rule)
    objective, layers, meta = _facet_objective(cfg, target, bank, concept, (layer, decomp),
                                               patches, w, mode, size)
    name = f"c{concept}_{Path(str(target.spec)).name}_{decomp}_f{cfg.n_facets}_s{cfg.seed}"
    run_dir = make_run_dir(cfg.out_dir or "out_facet", cfg.run_name or name)
    _save_facets(run_dir, w, maps, concept, decomp, info)
    meta.update(facets={"bank": str(cfg.bank), "concept": concept, "target_layer": layer,
                        "decomp_layer": decomp, **info})
    run_dir, result = _render(cfg, "facet", target, objective, layers, size, [patches],
                              run_dir, name, meta, argv, batch=cfg.n_facets)
    labels = [f"c{concept} facet {f}" for f in range(cfg.n_facets)]
    save_png(_grid_rows(list(result.image), facet_rows(patches, maps), labels),
             run_dir / "facets_grid.png")
    _facet_match(cfg, target, bank, concept, (layer, decomp), result.image, w, mode, run_dir)
    print(run_dir / "facets_grid.png")
    return run_dir, result


def _facet_objective(cfg: FacetCFG, target, bank, concept: int, layers_: tuple[str, str],
                     patches, w, mode: str, size: int):
    """Sort matching below the facet layer + facet term + concept term; (obj, layers, meta)."""
    layer, decomp = layers_
    objective, layers, meta = _vital_terms(_below(cfg, target, decomp), target, [patches], size)
    dview, tview = C.layer_view(target, decomp), C.layer_view(target, layer)
    objective = objective + cfg.direction_weight * C.facet_objective(
        decomp, w, mode, dview.skip, cfg.facet_pool, cfg.facet_contrast)
    objective = objective + cfg.concept_weight * C.direction_objective(
        layer, bank.directions[concept], bank.meta["nonneg"], tview.skip, cfg.direction_how,
        name=f"concept:{layer}")
    return objective, list(dict.fromkeys(layers + [decomp, layer])), meta


def _facet_match(cfg, target, bank, concept, layers_, images, w, mode, run_dir: Path) -> None:
    layer, decomp = layers_
    cos = C.direction_cosines(target, C.layer_view(target, decomp), images, w, mode,
                              cfg.facet_pool)
    concept_cos = C.direction_cosines(target, C.layer_view(target, layer), images,
                                      bank.directions[concept:concept + 1], bank.meta["nonneg"])
    _write_match(run_dir / "facets_match.json", list(range(cfg.n_facets)), cos, "facet",
                 concept_cosine=concept_cos[:, 0].tolist())


def _write_match(path: Path, ids: list[int], cos: torch.Tensor, kind: str, **extra) -> None:
    """Cosine of every rendered image (rows) with every shown direction (columns): a diagonal
    that stands out means each image shows its own direction."""
    off = cos.masked_fill(torch.eye(len(cos), dtype=torch.bool), float("nan"))
    write_json(path, {f"{kind}s": ids, "cosine": cos.tolist(), "own": cos.diag().tolist(),
                      "best_other": off.nan_to_num(-2).amax(1).tolist(), **extra})
    print(f"{kind} cosines (own / best other): " + ", ".join(
        f"{kind[0]}{k} {float(cos[i, i]):.2f}/{float(off[i].nan_to_num(-2).max()):.2f}"
        for i, k in enumerate(ids)))


def _save_facets(run_dir: Path, w, maps, concept: int, layer: str, info: dict) -> None:
    """facets.safetensors: directions (F, C') and maps (T, F, P); facets.json: the settings."""
    save_file({"directions": w.contiguous(), "maps": maps.contiguous()},
              str(run_dir / "facets.safetensors"))
    write_json(run_dir / "facets.json", {"concept": concept, "decomp_layer": layer, **info})
