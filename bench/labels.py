#!/usr/bin/env python
"""The neuron-label benchmark (issue 25; not a test, CPU-heavy): which similarity and which
concept-model path give labels that are right and that generalise.

Target: the embedded EfficientNet-Lite0 (``blocks.10``, ``blocks.15``, ``fc``); concept model:
``efficientnet-lite1`` (concepts = its 1000 ImageNet class names; CLIP weights cannot be
downloaded here). Probe photos: ../shared/imagenette-dev refs/ + heldout/ (10 classes x 100) and
../shared/imagenet-dev (100 classes x 1) = 1100 photos, and subsets of them.

1. The probe pass: images/s of ``layer_activations`` (load + forward + pooling, batches of 32)
   against a bare batched forward of the same model on random tensors.
2. (a) Output layer: a ``fc`` neuron is right when its label is its own class (top-1) or its
   class is among its 5 labels (top-5); on even probe sets (imagenette 10 x 100, imagenet-dev
   100 x 1), the mixed 1100, and uneven draws (1 to 6 photos of each imagenette class, drawn
   at random, + the 100 single photos; ``--draws`` seeds).
3. (b) Generalisation: the 1100 photos split in random halves (``--splits`` seeds, both
   directions); label on one half, score on the other how well the label's concept score
   predicts the neuron's activation: Pearson correlation (judged on the concept model's logits
   and on its probabilities) and NeuronEval's AUPRC (top 1 % of images = firing; ranked by the
   label's probability); linear explanations fitted on the same half. Per layer, with the
   seconds each similarity takes on all 1100 photos.
4. (c) Planted neurons on the 1100 photos and on the uneven draws: a unit equal to one class's
   logit or probability of the concept model (its label must be that class), and units that are
   the sum of two classes' logits (of the concept model, or of two ``fc`` neurons of the
   target) or probabilities (both classes must be among its 5 labels).
5. (d) The closed loop: ``describe_neurons.py --layers blocks.15 --visualise N --check`` in a
   child process (inner-mode pictures of today's code; the concept model labels them).

Every method is a (similarity, concept-model path) pair; ``baseline`` is the one-line rule:
the concept model's top-1 class of the neuron's single most activating photo (its top-5: that
photo's 5 best classes).

    OMP_NUM_THREADS=1 python bench/labels.py [--shared ../shared] [--out out_labels/bench]
        [--splits 3] [--draws 5] [--visualise 4] [--skip_loop]

Writes ``result.json`` and ``report.md`` under ``--out`` and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vital.labels import linear
from vital.labels import similarity as S
from vital.labels.vocabulary import classifier_scores, concept_model, probe_matrix
from vital.labels.heldout import halves, score_labels
from vital.labels.metrics import auprc, pearson
from vital.labels.probe import ProbeSet, layer_activations, layer_spec, probe_set
from vital.models import load_target

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("blocks.10", "blocks.15", "fc")
TOP = 5                       # labels per neuron that count for top-5
PLANTED_PAIRS = 100           # two-concept units per probe set


# ---------------------------------------------------------------- the probe set

def build_probe(shared: Path, folder: Path) -> dict[str, int]:
    """Symlinks to every probe photo in ``folder`` (one flat folder); file name -> class."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    nette = shared / "imagenette-dev"
    for split in ("refs", "heldout"):
        for cls_dir in sorted((nette / split).iterdir()):
            cls = int(cls_dir.name.split("_")[0])          # "000_tench" -> 0 (ImageNet index)
            for f in sorted(cls_dir.iterdir()):
                name = f"nette_{split}_{cls_dir.name}_{f.name}"
                _link(f, folder / name)
                truth[name] = cls
    dev = shared / "imagenet-dev"
    for line in (dev / "index.tsv").read_text().splitlines():
        parts = line.split("\t")
        if not parts[0].isdigit():                          # header
            continue
        name = f"dev_{parts[3]}"
        _link(dev / parts[3], folder / name)
        truth[name] = int(parts[0])
    return truth


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.symlink_to(src.resolve())


@dataclass
class Data:
    """Everything the benchmark needs, on the rows of the 1100 photos."""
    acts: dict[str, torch.Tensor]     # layer -> (N, K) activation summaries
    logits: torch.Tensor              # (N, 1000) the concept model's logits
    classes: torch.Tensor             # (N,) ImageNet class of each photo
    nette: torch.Tensor               # (N,) bool: an imagenette photo
    concepts: list[str]


def uneven_draw(data: Data, seed: int, low: int = 1, high: int = 6) -> torch.Tensor:
    """Rows: low..high photos (uniform) of each imagenette class + every single dev photo."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.nonzero(~data.nette)[:, 0].tolist()
    for cls in data.classes[data.nette].unique().tolist():
        pool = torch.nonzero(data.nette & (data.classes == cls))[:, 0]
        n = int(torch.randint(low, high + 1, (1,), generator=gen))
        rows += pool[torch.randperm(len(pool), generator=gen)[:n]].tolist()
    return torch.tensor(sorted(rows))


def probe_sets(data: Data, draws: int) -> dict[str, torch.Tensor]:
    every = torch.arange(len(data.classes))
    sets = {"imagenette 10 x 100 (even)": every[data.nette],
            "imagenet-dev 100 x 1 (even)": every[~data.nette],
            "all 1100 (100 or 1 per class)": every}
    for seed in range(draws):
        sets[f"uneven draw {seed} (1-6 per class)"] = uneven_draw(data, seed)
    return sets


# ---------------------------------------------------------------- the methods

@dataclass(frozen=True)
class Method:
    """A similarity on one concept-model path; ``options`` are its constants."""
    name: str
    similarity: str            # a name of vital.labels.similarity, or "baseline"
    path: str                  # logits | logprobs | probs
    options: tuple = ()
    order: str = "row"         # labels 2..5: "row" = the next highest similarities,
    #                            "path" = lasso-path order (the correlation default),
    #                            "forward" = forward selection
    tool: bool = True          # what describe_neurons.py --similarity S --concept_scores PATH
    #                            runs (a candidate for the defaults), not a variant for the table

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return classifier_scores(logits, self.path)

    def sim(self, logits: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """(K, M) similarity (the baseline: the top photo's scores)."""
        P = self.scores(logits)
        if self.similarity == "baseline":
            return P[A.argmax(0)]
        return S.similarity(self.similarity, P, A, **dict(self.options))[0]

    def labels(self, logits: torch.Tensor, A: torch.Tensor, n: int = TOP) -> torch.Tensor:
        """(K, n) labels, best first (the first is the argmax of the similarity row for
        every order)."""
        if n == 1 and self.similarity != "baseline":
            return self.sim(logits, A).argmax(1, keepdim=True)
        if self.order == "path":
            return linear.path_labels(self.scores(logits), A, n)
        if self.order == "forward":
            return S.forward_labels(self.scores(logits), A, n)
        return self.sim(logits, A).topk(n, dim=1).indices


def methods() -> list[Method]:
    paper_soft = (("top_k", 100),)
    out = [Method("baseline: top photo's top-1 class", "baseline", "probs"),
           Method("correlation, logits (default)", "correlation", "logits", order="path"),
           Method("correlation, logits, next labels by forward selection", "correlation",
                  "logits", order="forward", tool=False),
           Method("correlation, logits, next labels by correlation", "correlation", "logits",
                  tool=False),
           Method("correlation, log-probabilities", "correlation", "logprobs", order="path"),
           Method("correlation, probabilities", "correlation", "probs", order="path"),
           Method("soft_wpmi, top_k 100 (paper), double softmax", "soft_wpmi", "probs",
                  paper_soft, tool=False),
           Method("soft_wpmi, double softmax softmax(10 p)", "soft_wpmi", "probs"),
           Method("soft_wpmi, plain probabilities (logits, a 1)", "soft_wpmi", "logits",
                  (("a", 1.0),)),
           Method("soft_wpmi, softmax(10 logits)", "soft_wpmi", "logits", (("a", 10.0),),
                  tool=False),
           Method("wpmi, top_k 28 (paper), softmax(2 p)", "wpmi", "probs", (("top_k", 28),),
                  tool=False),
           Method("wpmi, softmax(2 p)", "wpmi", "probs"),
           Method("wpmi, plain probabilities (logits, a 1)", "wpmi", "logits", (("a", 1.0),)),
           Method("rank_reorder, probabilities", "rank_reorder", "probs"),
           Method("cos_similarity, probabilities", "cos_similarity", "probs"),
           Method("cos_similarity, logits", "cos_similarity", "logits"),
           Method("cos_similarity_cubed, probabilities", "cos_similarity_cubed", "probs"),
           Method("cos_similarity_cubed, log-probabilities", "cos_similarity_cubed", "logprobs"),
           Method("cos_similarity_cubed, logits", "cos_similarity_cubed", "logits")]
    return out


def fraction_sweep() -> list[Method]:
    """soft_wpmi's top_fraction on held-out halves (CLIP-Dissect: 100 of 50,000 = 0.002)."""
    return [Method(f"soft_wpmi double softmax, top_fraction {f:g}", "soft_wpmi", "probs",
                   (("top_fraction", f),), tool=False)
            for f in (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)]


# ---------------------------------------------------------------- 1. the probe pass

def probe_pass(target, probe: ProbeSet, rounds: int = 5, n: int = 64, batch: int = 32) -> dict:
    """images/s of the probe pass (``layer_activations`` without the cache: load, resize,
    forward with hooks on the three layers, pooling) vs. a bare batched forward of the same
    model on random tensors; the two alternate for ``rounds`` rounds of ``n`` images and the
    fastest round of each counts (the machine is shared: the other rounds waited for others)."""
    specs = [layer_spec(target, name, "avg") for name in LAYERS]
    x = torch.rand(batch, 3, target.input_size, target.input_size)
    with torch.no_grad():
        target.module(target.normalize(x))                  # warm-up
    passes, bare = [], []
    for r in range(rounds):
        sub = ProbeSet(probe.folder, probe.files[r * n:(r + 1) * n], "throughput")
        t0 = time.perf_counter()
        layer_activations(target, specs, sub, batch=batch, use_cache=False, progress=False)
        passes.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n // batch):
                target.module(target.normalize(x))
        bare.append(n // batch * batch / (time.perf_counter() - t0))
    return {"images_per_round": n, "rounds": rounds, "batch": batch,
            "probe_pass_images_per_s": round(max(passes), 2),
            "bare_forward_images_per_s": round(max(bare), 2),
            "ratio": round(max(passes) / max(bare), 3),
            "all_rounds": {"probe_pass": [round(v, 2) for v in passes],
                           "bare": [round(v, 2) for v in bare]},
            "uptime": os.popen("uptime").read().strip()}


def load_data(shared: Path, out_dir: Path) -> tuple[Data, dict]:
    truth = build_probe(shared, out_dir / "probe")
    probe = probe_set(out_dir / "probe")
    target = load_target("efficientnet-lite0", device="cpu")
    cm = concept_model(load_target("efficientnet-lite1", device="cpu"), "", scores="logits")
    info = {"throughput": probe_pass(target, probe)}
    specs = [layer_spec(target, name, "avg") for name in LAYERS]
    acts = layer_activations(target, specs, probe, progress=False)
    t0 = time.perf_counter()
    pm = probe_matrix(cm, probe, progress=False)
    info["activations"] = {n: {"cache_hit": a.cache_hit, "seconds": round(a.seconds, 1)}
                           for n, a in acts.items()}
    info["concept_matrix"] = {"cache_hit": pm.cache_hit,
                              "seconds": round(time.perf_counter() - t0, 1)}
    for a in acts.values():
        assert torch.equal(a.used, pm.used), "the two passes read different photos"
    names = [probe.files[int(i)].name for i in pm.used]
    data = Data({n: a.values for n, a in acts.items()}, pm.features.float(),
                torch.tensor([truth[n] for n in names]),
                torch.tensor([n.startswith("nette_") for n in names]), cm.concepts)
    return data, info


# ---------------------------------------------------------------- 2. (a) the output layer

def own_class(labels: torch.Tensor, classes: list[int]) -> tuple[float, float]:
    """Share of the neurons ``classes`` whose label is their class (top-1) / among the labels."""
    picked = labels[classes]
    own = torch.tensor(classes)[:, None]
    return float((picked[:, :1] == own).float().mean()), float((picked == own).any(1)
                                                               .float().mean())


def output_layer(data: Data, sets: dict, ms: list[Method]) -> dict:
    out = {}
    for name, rows in sets.items():
        classes = sorted(set(data.classes[rows].tolist()))
        out[name] = {"images": len(rows), "classes": len(classes), "rows": {}}
        for m in ms:
            t0 = time.perf_counter()
            labels = m.labels(data.logits[rows], data.acts["fc"][rows])
            top1, top5 = own_class(labels, classes)
            out[name]["rows"][m.name] = {"top1": top1, "top5": top5,
                                         "seconds": round(time.perf_counter() - t0, 2)}
        print(f"(a) {name}: done", flush=True)
    return out


# ---------------------------------------------------------------- 3. (b) generalisation

def _judged(logits, A, labels) -> dict:
    """Held-out scores of labels (K,) on these rows: correlation on logits and on
    probabilities, AUPRC by the label's probability."""
    corr_logits, _ = score_labels(logits, A, labels)
    corr_probs, ap = score_labels(torch.softmax(logits, 1), A, labels)
    return {"corr_logits": corr_logits, "corr_probs": corr_probs, "auprc": ap}


def _explained(logits, A, fit, held, path: str) -> dict:
    """A linear explanation per neuron fitted on rows ``fit`` in ``path``, scored on ``held``."""
    P = classifier_scores(logits, path)
    expls = linear.explain_units(P[fit], A[fit], list(range(A.shape[1])))
    pred = torch.stack([linear.predict(e, P[held]) for e in expls], dim=1)
    return {f"corr_{path}": pearson(A[held], pred), "auprc": auprc(A[held], pred),
            "terms": torch.tensor([float(len(e.concepts)) for e in expls])}


def generalisation(data: Data, ms: list[Method], splits: int, sweep: list[Method]) -> dict:
    out = {}
    for layer in LAYERS:
        A, rows = data.acts[layer], {}
        for m in ms + sweep:
            t0 = time.perf_counter()
            m.labels(data.logits, A, 1)                   # the time on all 1100 photos
            seconds = time.perf_counter() - t0
            acc = {}
            for seed in range(splits):
                first, second = halves(len(A), seed)
                for fit, held in ((first, second), (second, first)):
                    labels = m.labels(data.logits[fit], A[fit], 1)[:, 0]
                    for k, v in _judged(data.logits[held], A[held], labels).items():
                        acc.setdefault(k, []).append(float(v.mean()))
            rows[m.name] = {k: sum(v) / len(v) for k, v in acc.items()}
            rows[m.name]["seconds_all_photos"] = round(seconds, 2)
        for path in ("logits", "probs"):
            acc, t0 = {}, time.perf_counter()
            for seed in range(splits):
                first, second = halves(len(A), seed)
                for fit, held in ((first, second), (second, first)):
                    for k, v in _explained(data.logits, A, fit, held, path).items():
                        acc.setdefault(k, []).append(float(v.mean()))
            name = f"linear explanation ({path})"
            rows[name] = {k: sum(v) / len(v) for k, v in acc.items()}
            rows[name]["seconds_per_fit"] = round((time.perf_counter() - t0) / (2 * splits), 2)
        out[layer] = rows
        print(f"(b) {layer}: done", flush=True)
    return out


# ---------------------------------------------------------------- 4. (c) planted neurons

def planted_units(data: Data, rows: torch.Tensor, seed: int) -> dict:
    """name -> (activations (N, U), expected classes (U, 1 or 2)) on ``rows``."""
    z = data.logits[rows]
    p = torch.softmax(z, 1)
    fc = data.acts["fc"][rows]
    present = torch.tensor(sorted(set(data.classes[rows].tolist())))
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.stack([present[torch.randperm(len(present), generator=gen)[:2]]
                         for _ in range(PLANTED_PAIRS)])         # (U, 2)
    one = present[:, None]                                       # (U, 1)
    return {"one class: concept model's logit": (z[:, present], one),
            "one class: concept model's probability": (p[:, present], one),
            "two classes: sum of the concept model's logits":
                (z[:, pairs[:, 0]] + z[:, pairs[:, 1]], pairs),
            "two classes: sum of the concept model's probabilities":
                (p[:, pairs[:, 0]] + p[:, pairs[:, 1]], pairs),
            "two classes: sum of two fc neurons of the target (logits)":
                (fc[:, pairs[:, 0]] + fc[:, pairs[:, 1]], pairs)}


def _recovered(labels: torch.Tensor, expected: torch.Tensor) -> float:
    """One class: it is the label; two: both are among ``labels``' columns."""
    if expected.shape[1] == 1:
        return float((labels[:, 0] == expected[:, 0]).float().mean())
    hit = [(labels == expected[:, j:j + 1]).any(1) for j in range(expected.shape[1])]
    return float(torch.stack(hit).all(0).float().mean())


def planted(data: Data, sets: dict, ms: list[Method]) -> dict:
    out = {}
    chosen = {k: v for k, v in sets.items() if k.startswith(("all", "uneven"))}
    for number, (set_name, rows) in enumerate(chosen.items()):
        z = data.logits[rows]
        for kind, (A, expected) in planted_units(data, rows, seed=number).items():
            cell = out.setdefault(kind, {}).setdefault(set_name, {})
            for m in ms:
                cell[m.name] = _recovered(m.labels(z, A), expected)
            for path in ("logits", "probs"):
                expls = linear.explain_units(classifier_scores(z, path), A,
                                             list(range(A.shape[1])))
                width = max(1, max(len(e.concepts) for e in expls))
                terms = torch.tensor([e.concepts + [-1] * (width - len(e.concepts))
                                      for e in expls])
                cell[f"linear explanation ({path}): its terms"] = _recovered(terms, expected)
        print(f"(c) {set_name}: done", flush=True)
    return out


# ---------------------------------------------------------------- 5. (d) the closed loop

def closed_loop(probe_dir: Path, out_dir: Path, n: int) -> dict:
    """describe_neurons.py --visualise n --check on blocks.15 (today's inner-mode pictures)."""
    args = [sys.executable, str(ROOT / "describe_neurons.py"), "--model", "efficientnet-lite0",
            "--layers", "blocks.15", "--probe_dir", str(probe_dir), "--concept_model",
            "efficientnet-lite1", "--device", "cpu", "--out_dir", str(out_dir),
            "--no-progress", "--sheets", str(n), "--run_name", "blocks15_loop",
            "--explain", "linear", "--visualise", str(n), "--check"]
    shutil.rmtree(out_dir / "blocks15_loop", ignore_errors=True)   # the run folder is new
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"failed": proc.stderr[-2000:]}
    summary = json.loads((out_dir / "blocks15_loop" / "summary.json").read_text())
    return {"seconds": round(time.perf_counter() - t0, 1), "check": summary.get("check"),
            "heldout": summary["layers"]["blocks.15"].get("heldout"),
            "peak_rss_mb_children": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


# ---------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_sd(values: list[float]) -> str:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def choose(result: dict) -> dict:
    """The rule behind the defaults, on held-out halves only: for each similarity, the
    concept-model path with the highest held-out AUPRC averaged over the three layers (AUPRC
    ranks the held-out images by the label's probability: the same judge for every path); the
    default similarity: the best such pair by the same mean, among those whose output-layer
    top-1 on the uneven draws is >= 0.85 and above the baseline's."""
    b, a = result["generalisation"], result["output_layer"]
    uneven = [k for k in a if k.startswith("uneven")]
    by_name = {m.name: m for m in methods()}

    def mean_auprc(name):
        return sum(b[layer][name]["auprc"] for layer in b) / len(b)

    def top1(name):
        return sum(a[k]["rows"][name]["top1"] for k in uneven) / len(uneven)
    candidates = [m for m in by_name.values() if m.similarity != "baseline" and m.tool]
    paths, best = {}, None
    for m in candidates:
        score = mean_auprc(m.name)
        if score > paths.get(m.similarity, (None, -1))[1]:
            paths[m.similarity] = (m.path, score)
        base = top1(next(iter(by_name)))
        if top1(m.name) >= 0.85 and top1(m.name) > base and (best is None or score > best[1]):
            best = (m.name, score)
    return {"auto_paths": {k: {"path": v[0], "mean_heldout_auprc": round(v[1], 4)}
                           for k, v in paths.items()},
            "default": {"method": best[0], "mean_heldout_auprc": round(best[1], 4)}
            if best else None}


def report(result: dict) -> str:
    lines = []
    a = result["output_layer"]
    even = [k for k in a if not k.startswith("uneven")]
    uneven = [k for k in a if k.startswith("uneven")]
    names = list(next(iter(a.values()))["rows"])
    lines += ["## (a) Output layer: own class top-1 / top-5 (%)", "",
              "| method | " + " | ".join(even) + f" | uneven, {len(uneven)} draws: top-1 | "
              "top-5 | seconds (1100 photos) |",
              "|---" * (len(even) + 4) + "|"]
    for m in names:
        cells = [f"{_pct(a[k]['rows'][m]['top1'])} / {_pct(a[k]['rows'][m]['top5'])}"
                 for k in even]
        t1 = _mean_sd([a[k]["rows"][m]["top1"] for k in uneven])
        t5 = _mean_sd([a[k]["rows"][m]["top5"] for k in uneven])
        secs = a[even[-1]]["rows"][m]["seconds"]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {t1} | {t5} | {secs} |")
    b = result["generalisation"]
    lines += ["", "## (b) Held-out halves: correlation (logits judge / probability judge), "
              "AUPRC (top 1 %)", "",
              "| method | " + " | ".join(f"{layer}: r logits / r probs / AUPRC" for layer in b)
              + " | seconds per layer (1100 photos: " + ", ".join(b) + ") |",
              "|---" * (len(b) + 2) + "|"]
    for m in b[LAYERS[0]]:
        cells = []
        for layer in b:
            r = b[layer][m]
            cells.append(" / ".join(f"{r[k]:.3f}" if k in r else "–"
                                    for k in ("corr_logits", "corr_probs", "auprc")))
        secs = ", ".join(str(b[layer][m].get("seconds_all_photos",
                                              b[layer][m].get("seconds_per_fit", "")))
                         for layer in b)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {secs} |")
    c = result["planted"]
    kinds = list(c)
    lines += ["", "## (c) Planted neurons: recovered (%), all 1100 photos / uneven draws (mean)",
              "", "One class: it is the label; two classes: both among the 5 labels (a linear "
              "explanation: among its terms).", "",
              "| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for m in c[kinds[0]][next(iter(c[kinds[0]]))]:
        cells = []
        for kind in kinds:
            sets = list(c[kind])
            draws = [k for k in sets if k.startswith("uneven")]
            mean = sum(c[kind][k][m] for k in draws) / len(draws)
            cells.append(f"{_pct(c[kind][sets[0]][m])} / {_pct(mean)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--out", default=str(ROOT / "out_labels" / "bench"))
    parser.add_argument("--splits", type=int, default=3, help="random halvings (x2 folds)")
    parser.add_argument("--draws", type=int, default=5, help="uneven probe sets")
    parser.add_argument("--visualise", type=int, default=4, help="closed loop neurons")
    parser.add_argument("--skip_loop", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite report.md from --out's result.json")
    parser.add_argument("--loop_only", action="store_true",
                        help="run only (d), the closed loop, into --out's result.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    if args.report_only:
        result = json.loads((out_dir / "result.json").read_text())
        result["choice"] = choose(result)
        text = report(result) + "\n\n## The rule's choice\n\n" + json.dumps(result["choice"],
                                                                            indent=1)
        (out_dir / "report.md").write_text(text + "\n")
        print(text)
        return
    if args.loop_only:
        result = json.loads((out_dir / "result.json").read_text())
        result["uptime_before_loop"] = os.popen("uptime").read().strip()
        result["closed_loop"] = closed_loop(out_dir / "probe", out_dir, args.visualise)
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result["closed_loop"], indent=1))
        return
    result = {"uptime_start": os.popen("uptime").read().strip(),
              "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    data, info = load_data(Path(args.shared), out_dir)
    result.update(info)
    print(json.dumps(info, indent=1), flush=True)
    sets = probe_sets(data, args.draws)
    ms = methods()
    result["output_layer"] = output_layer(data, sets, ms)
    result["generalisation"] = generalisation(data, ms, args.splits, fraction_sweep())
    result["planted"] = planted(data, sets, ms)
    result["uptime_before_loop"] = os.popen("uptime").read().strip()
    if not args.skip_loop:
        result["closed_loop"] = closed_loop(out_dir / "probe", out_dir, args.visualise)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["uptime_end"] = os.popen("uptime").read().strip()
    result["choice"] = choose(result)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    text = report(result) + "\n\n## The rule's choice\n\n" + json.dumps(result["choice"],
                                                                        indent=1)
    (out_dir / "report.md").write_text(text + "\n")
    print(text)
    print(json.dumps({k: result[k] for k in ("closed_loop", "seconds", "peak_rss_mb",
                                              "uptime_start", "uptime_end") if k in result},
                     indent=1))


if __name__ == "__main__":
    main()
