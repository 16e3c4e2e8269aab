"""Neuron labels for whole layers (CLIP-Dissect): probe activations x concept matrix ->
similarity -> a label per neuron, written to ``out_labels/<run>/``:

- ``descriptions.csv``: layer, unit, label, similarity, and the next four labels (for the
  ``correlation`` similarity in the order they enter the non-negative lasso path,
  ``vital.labels.linear.path_labels``; else the next highest similarities); with ``--explain linear`` also the linear explanation
  and the held-out correlations of the label and of the explanation;
- ``explanations.json`` (``--explain linear``): every explanation's terms, weights, intercept
  and held-out scores;
- ``sheets/<layer>_<unit>.png``: the neuron's top probe images with its label, for the ``--sheets``
  reported neurons of each layer with the highest similarity (a sheet for each of 1000+ neurons
  would be more files than anyone looks at; ``--sheets -1`` writes them all);
- ``summary.json`` (settings, cache hits, timings, label statistics) and ``config.json``.

``run_labels`` returns a :class:`LabelRun` that ``vital.modes.label_visuals`` extends with inner-mode
visualisations of the best neurons (``--visualise``, ``--check``).
"""
from __future__ import annotations

import csv
import importlib.metadata
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vital.cache import write_json
from vital.config import ConfigError, make_run_dir, opt, resolve_device, run_metadata
from vital.imaging import grid, save_png, to_pil
from vital.labels import linear
from vital.labels import similarity as sim_mod
from vital.labels.vocabulary import CLASSIFIER_SCORES, ConceptModel, concept_model, \
    concepts_digest, default_concept_model, probe_matrix
from vital.labels.heldout import HeldOut, cross_fit
from vital.labels.probe import POOLS, Activations, LayerSpec, ProbeSet, layer_activations, \
    layer_spec, probe_set
from vital.models import load_target
from vital.refs.images import load_image

__all__ = ["LabelCFG", "LabelRun", "LayerLabels", "run_labels", "titled", "stack_rows",
           "top_image_tiles", "top_probe_files", "top_probe_rows", "write_summary", "NEXT_LABELS",
           "AUTO_SCORES", "EXPLAIN", "resolve_scores"]

NEXT_LABELS = 4        # labels after the best one in descriptions.csv
_TILE = 96             # px of a probe image in a contact sheet
EXPLAIN = ("none", "linear")
# --concept_scores auto: the classifier score path each similarity gets, the one with the best
# held-out AUPRC over blocks.10, blocks.15 and fc in bench/labels.py (docs/labels.md): logits
# (for the WPMI functions with a = 1: the classifier's own probabilities, which beat
# CLIP-Dissect's softmax(10 p) on the probabilities); rank_reorder needs positive scores
AUTO_SCORES = {"correlation": "logits", "soft_wpmi": "logits", "wpmi": "logits",
               "rank_reorder": "probs", "cos_similarity": "logits",
               "cos_similarity_cubed": "logits"}
_WPMI = ("soft_wpmi", "wpmi")


@dataclass
class LabelCFG:
    """Neuron labels (CLIP-Dissect): a word for every neuron of a layer."""
    model: str = opt("efficientnet-lite0", "model whose neurons are labelled (any model spec)")
    layers: list[str] = opt(["blocks.15"], "layers to label: CNN channels (blocks.15), ViT MLP "
                            "neurons (block.N.mlp), residual channels (block.N), outputs (fc)")
    neurons: list[int] = opt([], "neurons to report (empty = all of each layer); the "
                             "similarity is always computed over the whole layer")
    probe_dir: str = opt("references", "folder of probe images (searched recursively)")
    concepts: str = opt("", "imagenet | words20k | a text file (one concept a line); empty = "
                        "the classifier's class names, or words20k for a CLIP concept model")
    concept_model: str = opt("auto", "CLIP spec (free-form concepts) or a classifier spec "
                             "(its class names are the concepts); auto = ViT-B/16 if its "
                             "weights are cached, else efficientnet-lite1")
    similarity: str = opt("correlation", "neuron-concept similarity: correlation (chosen on "
                          "held-out halves, docs/labels.md) or CLIP-Dissect's soft_wpmi, wpmi, "
                          "rank_reorder, cos_similarity, cos_similarity_cubed",
                          choices=list(sim_mod.SIMILARITIES))
    concept_scores: str = opt("auto", "a classifier concept model's scores handed to the "
                              "similarity (logits, logprobs, probs); auto = the path measured "
                              "best for the similarity (logits; probs for rank_reorder); a CLIP "
                              "concept model always gives cosines",
                              choices=["auto", *CLASSIFIER_SCORES])
    pool: str = opt("avg", "one number per image and neuron: avg or max over positions (a "
                    "CLIP ViT's class token left out), cls = the class token (ViT token layers)",
                    choices=list(POOLS))
    top_k: int | None = opt(None, "wpmi / soft_wpmi: top images per neuron (None = "
                            "ceil(top_fraction x probe images))")
    a: float | None = opt(None, "wpmi / soft_wpmi: softmax temperature on P (None = 2 / 10; 1 "
                          "on a classifier's logits or log-probabilities: its own softmax)")
    lam: float | None = opt(None, "wpmi / soft_wpmi: weight of log p(concept) (None = 0.6 / 1)")
    min_prob: float | None = opt(None, "wpmi / soft_wpmi: added inside the log (None = 1e-7)")
    p_start: float | None = opt(None, "soft_wpmi: membership of the top image (None = 0.998)")
    p_end: float | None = opt(None, "soft_wpmi: membership reached at rank top_k (None = 0.97)")
    p: float | None = opt(None, "rank_reorder: error exponent (None = 3)")
    top_fraction: float | None = opt(None, "wpmi / soft_wpmi / rank_reorder: a neuron's top "
                                     "images as a fraction of the probe images (None = 28/50000 "
                                     "and 100/50000, CLIP-Dissect's top_k on its 50k images; "
                                     "0.05)")
    scale_p: float | None = opt(None, "rank_reorder: exponent of the mean-P divisor (None = 0.5)")
    min_norm: float | None = opt(None, "cos_similarity_cubed: norm floor (None = 1e-3)")
    explain: str = opt("none", "linear = also explain each reported neuron as a sparse "
                       "non-negative combination of concepts ('0.62 dog + 0.31 grass'), with "
                       "the held-out correlation of it and of the label (2-fold)",
                       choices=list(EXPLAIN))
    explain_terms: int = opt(linear.MAX_TERMS, "--explain linear: at most this many concepts "
                             "per explanation", low=1)
    batch_size: int = opt(32, "images per forward pass")
    sheets: int = opt(16, "contact sheets per layer, for the reported neurons with the highest "
                      "similarity (-1 = every reported neuron, 0 = none)")
    sheet_images: int = opt(9, "top probe images on a contact sheet")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    seed: int = opt(0, "seed of rank_reorder's random baseline and of the held-out halves")
    out_dir: str = opt("out_labels", "parent folder of the run folder")
    run_name: str = opt("", "run folder name (default from model, layers, similarity)")
    cache: bool = opt(True, "cache activations and concept matrices on disk ($VITAL_CACHE)")
    progress: bool = opt(True, "show progress bars")


@dataclass
class LayerLabels:
    """One layer's result: similarity (K, M) over all its neurons, the reported units and
    their best concept indices (units x 1+NEXT_LABELS), the activations used."""
    spec: LayerSpec
    acts: Activations
    similarity: torch.Tensor
    units: list[int]
    best: torch.Tensor
    seconds: float
    explanations: list[linear.LinearExplanation] | None = None   # per reported unit (in order)
    heldout: HeldOut | None = None

    def label(self, unit: int, concepts: list[str]) -> str:
        return concepts[int(self.similarity[unit].argmax())]

    def by_similarity(self) -> list[int]:
        """Reported units, highest label similarity first."""
        top = self.similarity[self.units].amax(1)
        return [self.units[i] for i in top.argsort(descending=True, stable=True).tolist()]


@dataclass
class LabelRun:
    """What ``run_labels`` computed; ``stopped`` is None (the scripts' result protocol)."""
    run_dir: Path
    target: object
    concept: ConceptModel
    probe: ProbeSet
    used: torch.Tensor                  # probe file indices behind the rows of P and A
    layers: dict[str, LayerLabels]
    summary: dict
    stopped: str | None = None
    extra: dict = field(default_factory=dict)
    P: torch.Tensor | None = None       # the concept model's scores of the probe images (rows: used)


# ---------------------------------------------------------------- checks

def _check_cfg(cfg: LabelCFG) -> None:
    if cfg.similarity not in sim_mod.SIMILARITIES:
        raise ConfigError(f"unknown similarity {cfg.similarity!r}; valid: "
                          f"{', '.join(sim_mod.SIMILARITIES)}")
    if not cfg.layers:
        raise ConfigError("--layers is empty; name at least one layer to label")
    if cfg.batch_size < 1 or cfg.sheet_images < 1 or cfg.sheets < -1:
        raise ConfigError(f"--batch_size and --sheet_images must be >= 1 and --sheets >= -1, "
                          f"got {cfg.batch_size}, {cfg.sheet_images}, {cfg.sheets}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise ConfigError(f"--top_k must be >= 1, got {cfg.top_k}")
    if cfg.top_fraction is not None and not 0 < cfg.top_fraction <= 1:
        raise ConfigError(f"--top_fraction must be in (0, 1], got {cfg.top_fraction}")
    if cfg.explain not in EXPLAIN or cfg.explain_terms < 1:
        raise ConfigError(f"--explain must be one of {', '.join(EXPLAIN)} and --explain_terms "
                          f">= 1, got {cfg.explain!r} and {cfg.explain_terms}")
    if cfg.concept_scores not in ("auto", *CLASSIFIER_SCORES):
        raise ConfigError(f"unknown --concept_scores {cfg.concept_scores!r}; valid: auto, "
                          f"{', '.join(CLASSIFIER_SCORES)}")


def _units(cfg: LabelCFG, target, spec: LayerSpec) -> list[int]:
    bad = [n for n in cfg.neurons if not 0 <= n < spec.channels]
    if bad:
        raise ConfigError(f"neuron {bad[0]} is out of range for {spec.name} of {target.spec}: "
                          f"it has {spec.channels} neurons, valid 0..{spec.channels - 1}")
    return list(dict.fromkeys(cfg.neurons)) or list(range(spec.channels))


def resolve_scores(requested: str, similarity: str) -> str:
    """A classifier's score path: the requested one, or for ``auto`` the measured best."""
    return AUTO_SCORES[similarity] if requested == "auto" else requested


def _options(cfg: LabelCFG, cm: ConceptModel) -> dict:
    names = {k for d in sim_mod.DEFAULTS.values() for k in d}
    options = {k: getattr(cfg, k) for k in names}
    if cfg.similarity in _WPMI and cfg.a is None and cm.score_kind in ("logits", "logprobs"):
        options["a"] = 1.0   # softmax(logits) = the classifier's own probabilities
    return options


def _load_concept_model(cfg: LabelCFG, target, device) -> ConceptModel:
    spec = default_concept_model() if cfg.concept_model == "auto" else cfg.concept_model
    cm_target = target if spec == str(target.spec) else load_target(spec, device=device)
    if getattr(cm_target, "clip", None) is not None and cfg.concept_scores != "auto":
        raise ConfigError(f"--concept_scores {cfg.concept_scores} is for a classifier concept "
                          f"model; {spec} is a CLIP, whose scores are cosines: leave it at auto")
    return concept_model(cm_target, cfg.concepts, progress=cfg.progress, use_cache=cfg.cache,
                         scores=resolve_scores(cfg.concept_scores, cfg.similarity))


# ---------------------------------------------------------------- the run

def _rows(values: torch.Tensor, have: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """The rows of ``values`` (one per probe file index in ``have``) for the files ``used``.
    Both passes skip the same unreadable files, so this is the identity unless a file changed
    between them."""
    if torch.equal(have, used):
        return values
    row = {int(i): r for r, i in enumerate(have)}
    return values[[row[int(i)] for i in used]]


def _aligned(acts: Activations, used: torch.Tensor) -> torch.Tensor:
    return _rows(acts.values, acts.used, used)


def _common(acts: dict[str, Activations], used_p: torch.Tensor) -> torch.Tensor:
    common = set(used_p.tolist())
    for a in acts.values():
        common &= set(a.used.tolist())
    if not common:
        raise ValueError("no probe image could be read by both the model and the concept model")
    return torch.tensor(sorted(common), dtype=torch.long)


def run_labels(cfg: LabelCFG, argv=None, checks=None) -> tuple[Path, LabelRun]:
    """Label the neurons of ``cfg.layers``; returns (run_dir, LabelRun). ``checks(target,
    specs)`` (optional) may refuse the input before any heavy work."""
    start = time.perf_counter()
    _check_cfg(cfg)
    device = resolve_device(cfg.device)
    target = load_target(cfg.model, device=device)
    specs = [layer_spec(target, name, cfg.pool) for name in dict.fromkeys(cfg.layers)]
    units = {s.name: _units(cfg, target, s) for s in specs}
    if checks is not None:
        checks(target, specs)
    probe = probe_set(cfg.probe_dir)
    cm = _load_concept_model(cfg, target, device)
    acts = layer_activations(target, specs, probe, batch=cfg.batch_size, use_cache=cfg.cache,
                             progress=cfg.progress)
    p_start = time.perf_counter()
    pm = probe_matrix(cm, probe, batch=cfg.batch_size, use_cache=cfg.cache, progress=cfg.progress)
    p_seconds = time.perf_counter() - p_start
    used = _common(acts, pm.used)
    if len(used) < 2:
        raise ConfigError(f"labels compare a neuron's activations across probe images, so they "
                          f"need at least 2 readable images; {cfg.probe_dir} has {len(used)}")
    P = _rows(pm.P, pm.used, used)
    layers, constants = {}, {}
    for spec in specs:
        t0 = time.perf_counter()
        A = _aligned(acts[spec.name], used)
        sim, constants = sim_mod.similarity(cfg.similarity, P, A, **_options(cfg, cm))
        layers[spec.name] = LayerLabels(spec, acts[spec.name], sim, units[spec.name],
                                        _best(cfg, P, A, sim, units[spec.name]),
                                        time.perf_counter() - t0)
    stopped = _explain(cfg, cm, P, used, layers) if cfg.explain == "linear" else None
    run_dir = make_run_dir(cfg.out_dir, cfg.run_name or _run_name(cfg, target))
    run = LabelRun(run_dir, target, cm, probe, used, layers, {}, stopped, P=P)
    write_json(run_dir / "config.json", run_metadata(cfg, argv, mode="labels",
                                                     model_spec=str(target.spec),
                                                     weight_hash=target.weight_hash))
    write_descriptions(run, run_dir / "descriptions.csv")
    if cfg.explain == "linear":
        write_explanations(run, run_dir / "explanations.json")
    sheets = write_sheets(run, cfg)
    run.summary = _summary(cfg, run, constants, pm.cache_hit, p_seconds, sheets,
                           time.perf_counter() - start)
    write_summary(run)
    _report(run)
    return run_dir, run


def _best(cfg: LabelCFG, P, A, sim, units: list[int]) -> torch.Tensor:
    """(units, 1 + NEXT_LABELS) concept indices: for ``correlation`` in the order they enter
    the non-negative lasso path (``vital.labels.linear.path_labels``; the first is the argmax
    of the similarity), else the highest similarities."""
    n = min(1 + NEXT_LABELS, sim.shape[1])
    if cfg.similarity == "correlation":
        return linear.path_labels(P, A[:, units], n)
    return sim[units].topk(n, dim=1).indices


def _explain(cfg: LabelCFG, cm: ConceptModel, P, used, layers: dict) -> str | None:
    """Linear explanations of every layer's reported units (fitted on all probe images) and the
    2-fold held-out scores of labels and explanations; on Ctrl-C / SIGTERM the explanations
    done so far are kept and the reason is returned (else None)."""
    options = _options(cfg, cm)

    def label_fn(p, a):
        return sim_mod.similarity(cfg.similarity, p, a, **options)[0].argmax(1)
    for res in layers.values():
        A = _aligned(res.acts, used)
        res.explanations = []
        try:
            for expl in linear.iter_explanations(P, A, res.units, max_terms=cfg.explain_terms,
                                                 progress=cfg.progress):
                res.explanations.append(expl)
            res.heldout = cross_fit(P, A, res.units, label_fn, explain=True,
                                    max_terms=cfg.explain_terms, seed=cfg.seed)
        except KeyboardInterrupt as err:
            reason = getattr(err, "stopped_as", "interrupted")
            print(f"{reason}: keeping the labels and the {len(res.explanations)} explanations "
                  f"of {res.spec.name} done so far")
            return reason
    return None


def _run_name(cfg: LabelCFG, target) -> str:
    return f"{Path(str(target.spec)).name}_{'+'.join(dict.fromkeys(cfg.layers))}_{cfg.similarity}"


# ---------------------------------------------------------------- outputs

def _explained(run: LabelRun) -> bool:
    return any(res.explanations is not None for res in run.layers.values())


def _explanation_cells(res: LayerLabels, row: int, concepts: list[str]) -> list[str]:
    """explanation, explanation_heldout_corr, label_heldout_corr ("" where not computed)."""
    text = res.explanations[row].text(concepts) \
        if res.explanations is not None and row < len(res.explanations) else ""
    if res.heldout is None:
        return [text, "", ""]
    return [text, f"{float(res.heldout.explanation_corr[row]):.4f}",
            f"{float(res.heldout.label_corr[row]):.4f}"]


def write_descriptions(run: LabelRun, path: Path) -> Path:
    concepts = run.concept.concepts
    explained = _explained(run)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["layer", "unit", "label", "similarity"] +
                     [f"label_{i + 2}" for i in range(NEXT_LABELS)] +
                     (["explanation", "explanation_heldout_corr", "label_heldout_corr"]
                      if explained else []))
        for name, res in run.layers.items():
            for row, unit in enumerate(res.units):
                best = res.best[row].tolist()
                out.writerow([name, unit, concepts[best[0]],
                              f"{float(res.similarity[unit, best[0]]):.6g}"] +
                             [concepts[i] for i in best[1:]] +
                             (_explanation_cells(res, row, concepts) if explained else []))
    return path


def write_explanations(run: LabelRun, path: Path) -> Path:
    """Every reported neuron's linear explanation and held-out scores (JSON)."""
    concepts, layers = run.concept.concepts, {}
    for name, res in run.layers.items():
        rows = []
        for row, expl in enumerate(res.explanations or []):
            entry = {"unit": res.units[row], "label": concepts[int(res.best[row, 0])],
                     **expl.as_dict(concepts)}
            if res.heldout is not None:
                entry["heldout"] = {k: float(getattr(res.heldout, k)[row]) for k in
                                    ("label_corr", "label_auprc", "explanation_corr",
                                     "explanation_auprc")}
            rows.append(entry)
        layers[name] = rows
    return write_json(path, {"fit": "vital.labels.linear (LassoLarsIC positive + NNLS)",
                             "heldout": "2-fold: fitted on one half of the probe images, "
                                        "scored on the other, averaged", "layers": layers})


def titled(image: Image.Image, lines: list[str], line_height: int = 14) -> Image.Image:
    """``image`` under a white header holding ``lines`` of text."""
    head = line_height * len(lines) + 4
    out = Image.new("RGB", (image.width, image.height + head), "white")
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * line_height), line[: max(8, image.width // 6)], fill="black")
    out.paste(image, (0, head))
    return out


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """Images one under the other, left-aligned, on white."""
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def top_probe_rows(run: LabelRun, layer: str, unit: int, k: int):
    """The rows (of P and of the aligned activations) of the neuron's ``k`` most activating
    probe images, best first, and their activations (``torch.topk``)."""
    values = _aligned(run.layers[layer].acts, run.used)[:, unit]
    return values.topk(min(k, len(values)))


def top_probe_files(run: LabelRun, layer: str, unit: int, k: int) -> tuple[list[Path], list]:
    """The neuron's ``k`` most activating probe files, best first, and their activations."""
    top = top_probe_rows(run, layer, unit, k)
    return [run.probe.files[int(run.used[i])] for i in top.indices], top.values.tolist()


def top_image_tiles(run: LabelRun, layer: str, unit: int, k: int) -> tuple[list, list[str]]:
    """The neuron's ``k`` most activating probe images as PIL tiles, and their activations."""
    files, values = top_probe_files(run, layer, unit, k)
    return [to_pil(load_image(f, _TILE)) for f in files], [f"{v:.3g}" for v in values]


def _sheet(run: LabelRun, layer: str, unit: int, k: int) -> Image.Image:
    res, concepts = run.layers[layer], run.concept.concepts
    best = res.best[res.units.index(unit)].tolist()
    tiles, acts = top_image_tiles(run, layer, unit, k)
    cols = min(len(tiles), 3 if k <= 9 else 5)
    body = grid(tiles, acts, cols=cols)
    lines = [f"{layer}:{unit}  {concepts[best[0]]}",
             f"sim {float(res.similarity[unit, best[0]]):.3g}",
             "next: " + ", ".join(concepts[i] for i in best[1:])]
    row = res.units.index(unit)
    if res.explanations is not None and row < len(res.explanations):
        held = f" (held-out r {float(res.heldout.explanation_corr[row]):.2f})" \
            if res.heldout is not None else ""
        text = "linear: " + res.explanations[row].text(concepts) + held
        lines += textwrap.wrap(text, max(8, body.width // 6))   # titled() cuts longer lines
    return titled(body, lines)


def write_sheets(run: LabelRun, cfg: LabelCFG) -> list[str]:
    """Contact sheets of the ``cfg.sheets`` best reported neurons of each layer."""
    written = []
    for name, res in run.layers.items():
        order = res.by_similarity()
        for unit in order if cfg.sheets < 0 else order[:cfg.sheets]:
            path = run.run_dir / "sheets" / f"{name}_{unit}.png"
            save_png(_sheet(run, name, unit, cfg.sheet_images), path)
            written.append(str(path.relative_to(run.run_dir)))
    return written


def _layer_summary(res: LayerLabels, concepts: list[str]) -> dict:
    labels = [concepts[int(i)] for i in res.best[:, 0]]
    acts = res.acts.values
    return {"neurons": res.spec.channels, "reported": len(res.units), "layout": res.spec.layout,
            "pool": res.spec.pool, "skip_tokens": res.spec.skip,
            "activations_cache_hit": res.acts.cache_hit,
            "activations_seconds": round(res.acts.seconds, 3),
            "similarity_seconds": round(res.seconds, 3),
            "constant_neurons": int((acts.amax(0) == acts.amin(0)).sum()),
            "distinct_labels": len(set(labels)),
            "most_common_labels": Counter(labels).most_common(10),
            **({"heldout": res.heldout.means()} if res.heldout is not None else {})}


def _summary(cfg, run: LabelRun, constants, p_hit, p_seconds, sheets, seconds) -> dict:
    cm = run.concept
    concepts = {"source": cm.source, "count": len(cm.concepts),
                "digest": concepts_digest(cm.concepts)}
    if cm.source == "words20k":
        concepts["wordfreq"] = importlib.metadata.version("wordfreq")
    return {"model": str(run.target.spec), "weight_hash": run.target.weight_hash,
            "concept_model": str(cm.target.spec), "concept_model_kind": cm.target.kind,
            "concepts": concepts, "concept_scores": cm.score_kind,
            "similarity": cfg.similarity, "constants": constants, "explain": cfg.explain,
            "probe": {"folder": str(run.probe.folder), "files": len(run.probe.files),
                      "used": len(run.used), "digest": run.probe.digest},
            "concept_matrix": {"cache_hit": p_hit, "seconds": round(p_seconds, 3)},
            "layers": {n: _layer_summary(r, cm.concepts) for n, r in run.layers.items()},
            "sheets": sheets, "seconds": round(seconds, 3)}


def write_summary(run: LabelRun) -> Path:
    return write_json(run.run_dir / "summary.json", {**run.summary, **run.extra})


def _report(run: LabelRun) -> None:
    concepts = run.concept.concepts
    for name, res in run.layers.items():
        shown = res.by_similarity()[:5]
        print(f"{name}: {len(res.units)} neurons labelled with {len(concepts)} concepts "
              f"({run.summary['similarity']}); best: " +
              ", ".join(f"{u}={res.label(u, concepts)}" for u in shown))
        if res.heldout is not None:
            m = res.heldout.means()
            print(f"{name}: held-out correlation (2-fold) of the labels {m['label_corr']:.3f}, "
                  f"of the linear explanations {m['explanation_corr']:.3f} "
                  f"({m['explanation_terms']:.1f} terms on average)")
    print(run.run_dir / "descriptions.csv")
