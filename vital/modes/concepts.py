"""Concept visualisation runs (``concept_neurons_fvis.py``): extract a CRAFT concept bank
(``vital.concepts``), rank it, save it, then render every shown concept, ``--batch_size`` at a
time: VITAL sort matching to *that concept's* top patches plus a direction objective at the
concept layer. The steps shared with facets (``vital.modes.facets``) live here too, among them
``run_elements``: the images of one run folder rendered in batches, each image (element) with
its own loss on its cut of the batch and its own generator seeded from (seed, concept id / facet
index), so an image does not depend on what shares its batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vital.concepts import extract as C
from vital.modes import setup
from vital.modes.batch import batch_plans, element_context
from vital.modes.outputs import RunWriter
from vital.modes.runner import NO_CALLBACKS, Callbacks, Plan, prepare, write_run
from vital.concepts.bank import FILE_NAME, save_bank
from vital.config import ConfigError, make_run_dir, opt, run_metadata, set_determinism
from vital.cache import write_json
from vital.optvis.losses import Objective, batched_sort_matching
from vital.optvis.render import RenderResult, ends_the_loop, render
from vital.imaging import grid, save_png, to_pil
from vital.optvis.param import magnitude_spectrum
from vital.refs.images import ReferenceError, list_images, load_images, resize_images
from vital.refs.references import sorted_features

_TILE = 112        # px of one tile in the grids
_GRID_PATCHES = 6  # top patches shown next to each visualisation


@dataclass
class ConceptCFG(setup.RenderCFG):
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
    show: int = opt(0, "render the N most important concepts (0 = all)", low=0)
    batch_size: int = opt(4, "concepts optimised together (the rest in further batches; 4 was "
                          "the fastest on 2 CPU cores, bench/README.md)", low=1)
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


def vital_terms(cfg, target, groups, size) -> tuple[list[Objective | int], list[str], dict]:
    """Per patch group: sort matching of one image to that group, plus the priors."""
    layers, weights = setup.resolve_layers(cfg, target)
    prior = setup.priors(cfg)
    if not cfg.feat_weight:
        return [prior] * len(groups), layers, {"layers": layers, "layer_weights": weights}
    sizes = setup.make_schedule(cfg, target).stage_sizes(size)
    refs = patch_quantiles(target, layers, groups, sizes, target.device)   # (G, C, Q) each
    objectives = [cfg.feat_weight * batched_sort_matching(
        {s: {l: q[g:g + 1] for l, q in by_layer.items()} for s, by_layer in refs.items()},
        dict(zip(layers, weights))) + prior for g in range(len(groups))]
    return objectives, layers, {"layers": layers, "layer_weights": weights}


def param_keywords(cfg, groups: list[torch.Tensor], size: int) -> dict:
    """``make_param`` keywords of a concept or facet run: with ``--param maco`` a natural
    amplitude spectrum, that of all the reference patches (the same for every image)."""
    if cfg.param != "maco":
        return {}
    return {"magnitude": magnitude_spectrum(resize_images(torch.cat(groups), size))}


# ---------------------------------------------------------------- images in batches

SEED_STRIDE = 1_000_003   # a prime above any concept id or facet index: no two images share a seed


def element_seed(seed: int, key: int) -> int:
    """The seed of image ``key`` (a concept id or a facet index) of a run seeded ``seed``:
    ``seed * 1000003 + key`` (modulo 2**63, so that any seed fits torch's generator)."""
    return (seed * SEED_STRIDE + key) % 2 ** 63


def element_generator(cfg, device, key: int) -> torch.Generator:
    """Image ``key``'s own random numbers: its start image and its augmentation every step."""
    gen = torch.Generator(device=device)
    gen.manual_seed(element_seed(cfg.seed, key))
    return gen


@dataclass
class Elements:
    """The images of one concept or facet run: one per key, each with its own loss."""
    keys: list[int]                # concept ids / facet indices: they seed the generators
    objectives: list[Objective]    # image k's loss, read on its own cut of the step's context
    layers: list[str]              # every layer the losses read
    size: int                      # px of the images
    param_kw: dict = field(default_factory=dict)   # make_param keywords (param_keywords)


def summed_terms(objectives: list[Objective]) -> Objective:
    """One loss for a batch whose element b has its own loss ``objectives[b]`` on its cut of the
    step's context (``element_context``): term n is the sum over the elements of their term n.
    A sum, not a mean, so element b gets the gradient of its image alone, whatever shares its
    batch; the terms keep their names (``sort:<layer>``, ``direction:<layer>`` ...)."""
    names = list(dict.fromkeys(n for o in objectives for n in o.names))
    last: dict = {}

    def element_terms(ctx) -> list[dict]:
        if last.get("ctx") is not ctx:   # once per step, shared by every term of the step
            last["ctx"] = ctx
            last["terms"] = [o.terms(element_context(ctx, b)) for b, o in enumerate(objectives)]
        return last["terms"]

    def term(name: str) -> Objective:
        return Objective(lambda ctx: sum(t[name] for t in element_terms(ctx) if name in t), name)
    return sum(term(n) for n in names)


def _check(cfg, elements: Elements) -> None:
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if not all(isinstance(o, Objective) and o.names for o in elements.objectives):
        raise ConfigError("every weight is zero: nothing to optimise")


def _element_plan(cfg, mode: str, target, elements: Elements, i: int) -> Plan:
    gen = element_generator(cfg, target.device, elements.keys[i])
    param = setup.make_param(dataclasses.replace(cfg, batch=1), elements.size, target.device,
                              gen, **elements.param_kw)
    return Plan(mode, target, elements.objectives[i], elements.layers, param,
                setup.make_schedule(cfg, target), setup.make_augment(cfg), gen,
                f"{mode}{elements.keys[i]}")


def _render_batch(cfg, plans: list[Plan], callbacks: Callbacks, offset: int, total: int):
    """Render ``plans`` side by side; (result, {save step: the batch's images})."""
    # own parameters, augmentation and generator per element; the terms summed over elements
    batched = batch_plans(plans, summed_terms([p.objective for p in plans]))
    objective = batched.objective
    saved = {}
    on_progress = None
    if callbacks.on_progress is not None:   # steps of the whole run, not of this batch
        on_progress = lambda step, _, loss, image: callbacks.on_progress(offset + step, total,
                                                                          loss, image)
    result = render(batched.target, objective, batched.param, batched.schedule, batched.layers,
                    augment=batched.augment, generator=batched.generator,
                    save_steps=cfg.save_steps,
                    callback=lambda step, image, record: saved.__setitem__(step, image),
                    progress=cfg.progress, on_progress=on_progress,
                    progress_every=callbacks.progress_every, should_stop=callbacks.should_stop,
                    precision=getattr(cfg, "precision", "fp32"))
    return result, saved


def render_elements(cfg, mode: str, target, elements: Elements,
                    callbacks: Callbacks = NO_CALLBACKS) -> list[tuple[RenderResult, dict]]:
    """Every image of ``elements``, ``cfg.batch_size`` at a time (each batch seeded like a single
    run); stops after a batch that was interrupted. [(result, saved step images) per batch]."""
    _check(cfg, elements)
    n = len(elements.keys)
    starts = range(0, n, cfg.batch_size)
    steps = setup.make_schedule(cfg, target).total
    out = []
    for j, start in enumerate(starts):
        set_determinism(cfg.seed, cfg.deterministic, cfg.hard_determinism)
        plans = [_element_plan(cfg, mode, target, elements, i)
                 for i in range(start, min(n, start + cfg.batch_size))]
        out.append(_render_batch(cfg, plans, callbacks, j * steps, len(starts) * steps))
        if ends_the_loop(out[-1][0].stopped):
            break   # a NaN in one batch is recorded and the next batch still runs
    return out


def merge_batches(batches: list[tuple[RenderResult, dict]]) -> RenderResult:
    """One result for the images of every batch (in order): their images and transparency
    maps, one record per save step that every batch reached with each term the mean over the
    images (as one batch of them all would record it), the first stop reason, the fewest steps
    done and the seconds of one step of every image. Records carry their "images"."""
    results = [r for r, _ in batches]
    n = sum(len(r.image) for r in results)
    by_step = [{rec["step"]: rec for rec in r.history} for r in results]
    history = []
    for step in [s for s in by_step[0] if all(s in b for b in by_step)]:
        records = [b[step] for b in by_step]
        terms = {name: sum(rec["terms"].get(name, 0.0) for rec in records) / n
                 for name in records[0]["terms"]}
        images = torch.cat([saved[step] for _, saved in batches])
        history.append({"step": step, "loss": sum(terms.values()), "terms": terms,
                        "images": images})
    return RenderResult(image=torch.cat([r.image for r in results]),
                        alpha=torch.cat([r.alpha for r in results]), history=history,
                        steps_done=min(r.steps_done for r in results),
                        stopped=next((r.stopped for r in results if r.stopped), None),
                        step_seconds=sum(r.step_seconds for r in results))


def run_elements(cfg, mode: str, target, elements: Elements, run_dir: Path, meta: dict,
                 after, argv=None, callbacks: Callbacks | None = None):
    """Render ``elements`` in batches (``render_elements``) and write ONE run folder for them
    all, as one batch would: config.json, the step PNGs and records, final.png, metrics.json,
    then ``after(run_dir, result)`` (the mode's grid and match files). (run_dir, result); after
    a stop ``result.image`` holds only the images rendered."""
    callbacks = callbacks or NO_CALLBACKS
    _check(cfg, elements)
    writer = RunWriter(run_dir, run_metadata(cfg, argv, mode=mode, model_spec=str(target.spec),
                                             weight_hash=target.weight_hash, **meta))
    def produce(opinion):
        result = merge_batches(render_elements(cfg, mode, target, elements, callbacks))
        for record in result.history:   # the step records, with the opinion of all images
            images = record.pop("images")
            if opinion is not None:
                with torch.no_grad():
                    record.update(opinion(images))
            writer.on_step(record["step"], images, record)
            if callbacks.on_record is not None:
                callbacks.on_record(record["step"], record)
        return result
    result = write_run(cfg, target, writer, produce, callbacks)
    after(run_dir, result)
    return run_dir, result


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
    """Bank + (unless extract_only) the shown concepts rendered ``--batch_size`` at a time into
    one run folder; (run_dir, result)."""
    _, target = prepare(cfg)
    size = setup.image_size(cfg, target)
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
    objectives, layers, info, view = _concept_objectives(cfg, target, bank, shown, groups, size)
    elements = Elements(shown, objectives, layers, size, param_keywords(cfg, groups, size))

    def after(run_dir, result):
        k = len(result.image)   # fewer than shown after a stop
        save_png(grid_rows(list(result.image), groups[:k], labels[:k]),
                 run_dir / "concepts_grid.png")
        cos = C.direction_cosines(target, view, result.image, bank.directions[shown[:k]],
                                  bank.meta["nonneg"])
        write_match(run_dir / "concepts_match.json", shown[:k], cos, "concept")
        print(run_dir / "concepts_grid.png")
    return run_elements(cfg, "concept", target, elements, run_dir, {**meta, **info}, after,
                        argv, callbacks)


def _extract_only(cfg, target, run_dir: Path, meta: dict, groups, labels, argv):
    write_json(run_dir / "config.json", run_metadata(cfg, argv, mode="concept",
               model_spec=str(target.spec), weight_hash=target.weight_hash, **meta))
    save_png(grid_rows(None, groups, labels), run_dir / "concepts_patches.png")
    print(run_dir / FILE_NAME)
    return run_dir, ExtractResult()


def _concept_objectives(cfg: ConceptCFG, target, bank, shown: list[int], groups, size: int):
    """Per shown concept: its VITAL terms plus its direction term; (objectives, layers, info,
    view)."""
    objectives, layers, info = vital_terms(cfg, target, groups, size)
    view = C.layer_view(target, bank.meta["layer"])
    objectives = [objective + cfg.direction_weight * C.direction_objective(
        view.name, bank.directions[k], bank.meta["nonneg"], view.skip, cfg.direction_how)
        for objective, k in zip(objectives, shown)]
    return objectives, list(dict.fromkeys(layers + [view.name])), info, view


def write_match(path: Path, ids: list[int], cos: torch.Tensor, kind: str, **extra) -> None:
    """Cosine of every rendered image (rows) with every shown direction (columns): a diagonal
    that stands out means each image shows its own direction."""
    off = cos.masked_fill(torch.eye(len(cos), dtype=torch.bool), float("nan"))
    write_json(path, {f"{kind}s": ids, "cosine": cos.tolist(), "own": cos.diag().tolist(),
                      "best_other": off.nan_to_num(-2).amax(1).tolist(), **extra})
    print(f"{kind} cosines (own / best other): " + ", ".join(
        f"{kind[0]}{k} {float(cos[i, i]):.2f}/{float(off[i].nan_to_num(-2).max()):.2f}"
        for i, k in enumerate(ids)))
