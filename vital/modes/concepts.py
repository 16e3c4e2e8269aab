"""Concept visualisation runs (``concept_neurons_fvis.py``): extract a CRAFT concept bank
(``vital.concepts``), rank it, save it, then render every shown concept in one batch: VITAL sort
matching to *that concept's* top patches plus a direction objective at the concept layer. The
steps shared with facets (``vital.modes.facets``) live here too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from vital.concepts import extract as C
from vital.modes import common
from vital.modes.runner import Callbacks, Plan, prepare, run_plan
from vital.concepts.bank import FILE_NAME, save_bank
from vital.config import ConfigError, make_run_dir, opt, run_metadata
from vital.cache import write_json
from vital.optvis.losses import Objective, batched_sort_matching
from vital.imaging import grid, save_png, to_pil
from vital.optvis.param import magnitude_spectrum
from vital.refs.images import ReferenceError, list_images, load_images, resize_images
from vital.refs.references import sorted_features

_TILE = 112        # px of one tile in the grids
_GRID_PATCHES = 6  # top patches shown next to each visualisation


@dataclass
class ConceptCFG(common.RenderCFG):
    """Concept visualisation: CRAFT concepts of a layer, ranked, each rendered with VITAL."""
    ref_dir: str = opt("references/espresso", "folder of real images, or a folder of class "
                       "folders (all are used)")
    num_ref: int = opt(12, "images used per folder", low=1)
    target: str = opt("espresso", "class (CLIP: class or prompt) whose output ranks the "
                      "concepts; empty = each image's own top class / own output")
    layer_block: str = opt("", "layer to factorise (empty = the deepest default layer; a bare "
                           "number N = block N of the model)")
    n_concepts: int = opt(6, "NMF components (concepts)", low=1)
    patch_frac: float = opt(0.5, "patch side as a fraction of the reference image side",
                            positive=True, high=1)
    patch_stride: float = opt(0.5, "patch grid step as a fraction of the patch side",
                              positive=True)
    nonneg: str = opt("auto", "make activations non-negative: relu, split [relu(x), relu(-x)], "
                      "auto (relu if all >= 0)", choices=list(C.NONNEG))
    nmf_iter: int = opt(500, "NMF iterations", low=1)
    top_patches: int = opt(8, "top patches kept per concept (its VITAL references)", low=1)
    rank: str = opt("sobol", "concept ranking: sobol (CRAFT, total-order indices) or gradient "
                    "(cheaper gradient x input)", choices=list(C.RANKINGS))
    sobol_designs: int = opt(16, "Sobol: QMC points per design matrix (power of two)", low=1)
    rank_images: int = opt(4, "reference images used for the ranking (evenly spread)", low=1)
    register_threshold: float = opt(3.0, "ViT register tokens: L2-norm limit in the residual "
                                    "stream (times the median token norm if register_relative)")
    register_relative: bool = opt(True, "register_threshold is relative to the median norm")
    exclude_registers: bool = opt(False, "drop high-norm (register) tokens from the concepts")
    extract_only: bool = opt(False, "write the concept bank and stop (no rendering)")
    show: int = opt(0, "render the N most important concepts (0 = all); they form the batch",
                    low=0)
    direction_weight: float = opt(1.0, "weight of the concept-direction term", low=0)
    direction_how: str = opt("cosine", "direction term: cosine or dot (projection)",
                             choices=["cosine", "dot"])


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


def patch_quantiles(target, layers, groups: list[torch.Tensor], sizes, device) -> dict:
    """{size: {layer: (G, C, P)}}: sorted features of each patch group (T, 3, S, S)."""
    refs = {}
    for size in sorted(set(sizes)):
        per_group = [sorted_features(target, layers, resize_images(g, size), progress=False)
                     for g in groups]
        refs[size] = {l: torch.stack([q[l] for q in per_group]).to(device) for l in layers}
    return refs


def vital_terms(cfg, target, groups, size) -> tuple[Objective | int, list[str], dict]:
    """Sort matching of each batch image to its patch group, plus the priors."""
    layers, weights = common.resolve_layers(cfg, target)
    objective = common.priors(cfg)
    if cfg.feat_weight:
        sizes = common.make_schedule(cfg, target).stage_sizes(size)
        refs = patch_quantiles(target, layers, groups, sizes, target.device)
        objective = cfg.feat_weight * batched_sort_matching(refs, dict(zip(layers, weights))) \
            + objective
    return objective, layers, {"layers": layers, "layer_weights": weights}


def plan_batch(cfg, mode, target, objective, layers, size, groups, run_dir, name, meta,
          batch: int, after=None) -> Plan:
    """The batch render of concepts or facets as a plan (one image per concept / facet)."""
    if not isinstance(objective, Objective) or not objective.names:
        raise ConfigError("every weight is zero: nothing to optimise")
    gen = common.generator_for(cfg, target.device)
    extras = {}
    if cfg.param == "maco":   # a natural amplitude spectrum: that of the reference patches
        extras["magnitude"] = magnitude_spectrum(resize_images(torch.cat(groups), size))
    param = common.make_param(dataclasses.replace(cfg, batch=batch), size, target.device, gen,
                              **extras)
    return Plan(mode, target, objective, layers, param, common.make_schedule(cfg, target),
                common.make_augment(cfg), gen, name, meta, run_dir=run_dir, after=after)


def grid_rows(visuals: list[torch.Tensor] | None, patch_rows: list[torch.Tensor],
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


def run_concepts(cfg: ConceptCFG, argv=None, callbacks: Callbacks | None = None):
    """Bank + (unless extract_only) one batch render of the shown concepts; (run_dir, result)."""
    _, target = prepare(cfg)
    size = common.image_size(cfg, target)
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

    def after(run_dir, result):
        save_png(grid_rows(list(result.image), groups, labels), run_dir / "concepts_grid.png")
        cos = C.direction_cosines(target, view, result.image, bank.directions[shown],
                                  bank.meta["nonneg"])
        write_match(run_dir / "concepts_match.json", shown, cos, "concept")
        print(run_dir / "concepts_grid.png")
    plan = plan_batch(cfg, "concept", target, objective, layers, size, groups, run_dir, name,
                 {**meta, **info}, batch=len(shown), after=after)
    return run_plan(cfg, plan, argv, callbacks)


def _extract_only(cfg, target, run_dir: Path, meta: dict, groups, labels, argv):
    write_json(run_dir / "config.json", run_metadata(cfg, argv, mode="concept",
               model_spec=str(target.spec), weight_hash=target.weight_hash, **meta))
    save_png(grid_rows(None, groups, labels), run_dir / "concepts_patches.png")
    print(run_dir / FILE_NAME)
    return run_dir, ExtractResult()


def _concept_objective(cfg: ConceptCFG, target, bank, shown: list[int], groups, size: int):
    """VITAL terms per concept plus the direction term; (objective, layers, info, view)."""
    objective, layers, info = vital_terms(cfg, target, groups, size)
    view = C.layer_view(target, bank.meta["layer"])
    objective = objective + cfg.direction_weight * C.direction_objective(
        view.name, bank.directions[shown], bank.meta["nonneg"], view.skip, cfg.direction_how)
    return objective, list(dict.fromkeys(layers + [view.name])), info, view


def write_match(path: Path, ids: list[int], cos: torch.Tensor, kind: str, **extra) -> None:
    """Cosine of every rendered image (rows) with every shown direction (columns): a diagonal
    that stands out means each image shows its own direction."""
    off = cos.masked_fill(torch.eye(len(cos), dtype=torch.bool), float("nan"))
    write_json(path, {f"{kind}s": ids, "cosine": cos.tolist(), "own": cos.diag().tolist(),
                      "best_other": off.nan_to_num(-2).amax(1).tolist(), **extra})
    print(f"{kind} cosines (own / best other): " + ", ".join(
        f"{kind[0]}{k} {float(cos[i, i]):.2f}/{float(off[i].nan_to_num(-2).max()):.2f}"
        for i, k in enumerate(ids)))
