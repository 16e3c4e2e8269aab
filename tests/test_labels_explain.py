"""Labels measured the way NeuronEval measures them, and linear explanations: every metric of
vital/labels/metrics.py against a slow reference (plain loops, scikit-learn), forward selection
against a least-squares loop, the linear explanation recovering a planted sparse combination,
the held-out cross-fit against doing it by hand, planted neurons of a tiny model recovered end
to end, and describe_neurons.py's --explain linear outputs."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.metrics import average_precision_score, f1_score, jaccard_score

from test_labels import COLOUR_JUDGE, COLOURS, write_colour_images
from vital.cli import main
from vital.config import ConfigError
from vital.labels import linear, metrics
from vital.labels import similarity as S
from vital.labels.vocabulary import classifier_scores, concept_model
from vital.labels.describe import LabelCFG, run_labels
from vital.labels.heldout import cross_fit, halves, score_labels
from vital.modes.label_visuals import DescribeCFG, run_describe
from vital.models import load_target

PLANTED_NET = "module:tests.test_labels_explain:PlantedNet"
PLANTED_JUDGE = "module:tests.test_labels_explain:planted_judge"


# ---------------------------------------------------------------- slow references

def slow_pearson(a, c):
    a, c = np.asarray(a, float), np.asarray(c, float)
    if a.std() == 0 or c.std() == 0:
        return 0.0
    return float(np.corrcoef(a, c)[0, 1])


def slow_top(a, alpha):
    n = math.ceil(alpha * len(a))
    cutoff = sorted(a, reverse=True)[n - 1]
    return [1 if x >= cutoff else 0 for x in a]


@pytest.fixture
def columns():
    gen = torch.Generator().manual_seed(5)
    acts = torch.randn(60, 4, generator=gen).relu() + 0.1 * torch.rand(60, 4, generator=gen)
    scores = torch.rand(60, 4, generator=gen)
    scores[:, 1] = (scores[:, 1] * 4).round() / 4               # many ties in one column
    scores[:, 2] = acts[:, 2] + 0.3 * torch.randn(60, generator=gen)
    acts[:, 3] = 1.0                                            # a constant neuron
    return acts, scores


def test_pearson_and_cosine_equal_the_slow_loops(columns):
    acts, scores = columns
    fast = metrics.pearson(acts, scores)
    for k in range(4):
        assert float(fast[k]) == pytest.approx(slow_pearson(acts[:, k], scores[:, k]), abs=1e-9)
        a, c = acts[:, k].double(), scores[:, k].double()
        cos = float(sum(a * c) / math.sqrt(float(sum(a * a)) * float(sum(c * c))))
        assert float(metrics.cosine(acts, scores)[k]) == pytest.approx(cos, abs=1e-9)
    full = metrics.pearson_matrix(acts, scores)                 # every neuron x every concept
    for k in range(4):
        for m in range(4):
            assert float(full[k, m]) == pytest.approx(
                slow_pearson(acts[:, k], scores[:, m]), abs=1e-9)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.25, 1.0])
def test_auprc_f1_iou_equal_sklearn_on_the_top_alpha(columns, alpha):
    acts, scores = columns
    on = metrics.top_alpha(acts, alpha)
    fast_ap = metrics.auprc(acts, scores, alpha)
    fast_f1 = metrics.f1(acts, scores, alpha, threshold=0.5)
    fast_iou = metrics.iou(acts, scores, alpha, threshold=0.5)
    for k in range(4):
        y = slow_top(acts[:, k].tolist(), alpha)
        assert on[:, k].tolist() == y
        if 0 < sum(y) < len(y):      # sklearn's AP needs both classes
            assert float(fast_ap[k]) == pytest.approx(
                average_precision_score(y, scores[:, k].numpy()), abs=1e-9)
        present = (scores[:, k] >= 0.5).int().tolist()
        assert float(fast_f1[k]) == pytest.approx(f1_score(y, present, zero_division=0),
                                                  abs=1e-9)
        assert float(fast_iou[k]) == pytest.approx(jaccard_score(y, present, zero_division=0),
                                                   abs=1e-9)


def test_average_precision_of_a_perfect_and_a_reversed_ranking():
    y = torch.tensor([[1.0], [1.0], [0.0], [0.0], [0.0]])
    assert float(metrics.average_precision(y, torch.tensor([[5.0], [4], [3], [2], [1]]))) == 1.0
    reverse = metrics.average_precision(y, torch.tensor([[1.0], [2], [3], [4], [5]]))
    assert float(reverse) == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert float(metrics.average_precision(torch.zeros(5, 1), torch.rand(5, 1))) == 0.0
    with pytest.raises(ValueError, match="alpha"):
        metrics.top_alpha(torch.rand(5, 1), 0)


def test_correlation_similarity_and_top_k_from_the_probe_size(columns):
    acts, scores = columns
    sim, used = S.similarity("correlation", scores, acts)
    torch.testing.assert_close(sim.double(), metrics.pearson_matrix(acts, scores).float()
                               .double())
    _, used = S.similarity("soft_wpmi", scores, acts)
    assert used["top_k"] == math.ceil(100 / 50_000 * 60) == 1
    _, used = S.similarity("soft_wpmi", scores, acts, top_fraction=0.1)
    assert used["top_k"] == 6
    _, used = S.similarity("wpmi", scores, acts, top_k=9)
    assert used["top_k"] == 9
    assert S.top_k_for(50_000, 100 / 50_000) == 100 and S.top_k_for(10, 0.5) == 5


def slow_forward_labels(P, A, n):
    """Forward selection with numpy least squares: the residual of the centred activation
    after regressing it on the centred columns picked so far."""
    P = np.asarray(P, float)
    X = P - P.mean(0)
    X = X / np.maximum(np.linalg.norm(X, axis=0), 1e-12)
    out = []
    for k in range(A.shape[1]):
        a = np.asarray(A[:, k], float)
        r = a - a.mean()
        r = r / max(np.linalg.norm(r), 1e-12)
        target, picked = r.copy(), []
        for _ in range(n):
            score = X.T @ r
            score[picked] = -np.inf
            picked.append(int(np.argmax(score)))
            coef, *_ = np.linalg.lstsq(X[:, picked], target, rcond=None)
            r = target - X[:, picked] @ coef
        out.append(picked)
    return out


def test_forward_labels_equal_least_squares_forward_selection():
    gen = torch.Generator().manual_seed(2)
    P = torch.rand(50, 12, generator=gen)
    A = torch.rand(50, 7, generator=gen)
    A[:, 0] = P[:, 3] + 0.8 * P[:, 9] + 0.3 * A[:, 0]             # two concepts + noise
    fast = S.forward_labels(P, A, 4)
    assert fast.tolist() == slow_forward_labels(P, A, 4)
    assert set(fast[0, :2].tolist()) == {3, 9}
    # the first forward label is the correlation label
    assert fast[:, 0].tolist() == S.similarity("correlation", P, A)[0].argmax(1).tolist()


def test_path_labels_start_with_the_correlation_label_and_find_two_concepts():
    gen = torch.Generator().manual_seed(6)
    P = torch.rand(200, 30, generator=gen)
    noise = 0.05 * torch.randn(200, 3, generator=gen)
    A = torch.stack([P[:, 3], P[:, 11] + P[:, 20], P[:, 5] + 0.6 * P[:, 9]], 1) + noise
    labels = linear.path_labels(P, A, 4)
    first = S.similarity("correlation", P, A)[0].argmax(1)
    assert labels[:, 0].tolist() == first.tolist()
    assert labels[0, 0] == 3 and labels[2, 0] == 5
    assert set(labels[1, :2].tolist()) == {11, 20}              # two concepts: both first
    assert labels[2, 1] == 9
    assert all(len(set(row)) == 4 for row in labels.tolist())
    dead = linear.path_labels(P, torch.zeros(200, 1), 3)        # a dead neuron: no path
    assert dead.shape == (1, 3) and len(set(dead[0].tolist())) == 3


# ---------------------------------------------------------------- linear explanations

def test_linear_explanation_recovers_a_planted_sparse_combination():
    gen = torch.Generator().manual_seed(0)
    P = torch.rand(400, 40, generator=gen) ** 3                 # sparse-ish concept scores
    a = 0.7 * P[:, 3] + 0.3 * P[:, 8] + 0.01 * torch.randn(400, generator=gen) + 2.0
    first, second = halves(400, seed=1)
    expl = linear.explain_units(P[first], a[first, None], [0], max_terms=5)[0]
    assert set(expl.concepts) == {3, 8}
    coef = dict(zip(expl.concepts, expl.coef))
    assert coef[3] == pytest.approx(0.7, abs=0.02) and coef[8] == pytest.approx(0.3, abs=0.02)
    assert expl.intercept == pytest.approx(2.0, abs=0.02)
    # standardised weights: coef x std(concept score) / std(activation)
    sd = P[first].double().std(0, unbiased=False)
    beta = [coef[c] * float(sd[c]) / float(a[first].double().std(unbiased=False))
            for c in expl.concepts]
    assert expl.weights == pytest.approx(beta, rel=1e-9)
    assert expl.weights[0] >= expl.weights[1] > 0
    held = metrics.pearson(a[second, None], linear.predict(expl, P[second])[:, None])
    assert float(held[0]) > 0.99
    names = [f"c{i}" for i in range(40)]
    assert expl.text(names) == f"{expl.weights[0]:.2f} c3 + {expl.weights[1]:.2f} c8"


def test_linear_explanation_is_non_negative_and_sparse_on_noise():
    gen = torch.Generator().manual_seed(1)
    P = torch.rand(300, 30, generator=gen)
    A = torch.stack([-P[:, 4],                                  # only a negative relation
                     torch.zeros(300),                          # a dead neuron
                     torch.randn(300, generator=gen)], 1)       # noise
    expls = linear.explain_units(P, A, [0, 1, 2], max_terms=5)
    assert all(w > 0 for e in expls for w in e.weights)
    assert 4 not in expls[0].concepts
    assert expls[1].concepts == [] and expls[1].text(["x"] * 30) == "(none)"
    assert len(expls[2].concepts) <= 2                          # BIC keeps noise short


def test_cross_fit_equals_doing_both_folds_by_hand():
    gen = torch.Generator().manual_seed(4)
    P = torch.rand(80, 10, generator=gen)
    A = torch.rand(80, 6, generator=gen) + P[:, :6]

    def label_fn(p, a):
        return S.similarity("correlation", p, a)[0].argmax(1)
    units = [1, 4]
    held = cross_fit(P, A, units, label_fn, explain=True, max_terms=3, seed=7)
    first, second = halves(80, 7)
    corr, ap, expl_corr = [], [], []
    for fit, out in ((first, second), (second, first)):
        labels = label_fn(P[fit], A[fit])[units]
        c, a = score_labels(P[out], A[out][:, units], labels)
        corr.append(c)
        ap.append(a)
        expls = linear.explain_units(P[fit], A[fit], units, max_terms=3)
        pred = torch.stack([linear.predict(e, P[out]) for e in expls], 1)
        expl_corr.append(metrics.pearson(A[out][:, units], pred))
        for j, u in enumerate(units):
            assert float(c[j]) == pytest.approx(
                slow_pearson(A[out][:, u], P[out][:, int(labels[j])]), abs=1e-9)
    torch.testing.assert_close(held.label_corr, (corr[0] + corr[1]) / 2)
    torch.testing.assert_close(held.label_auprc, (ap[0] + ap[1]) / 2)
    torch.testing.assert_close(held.explanation_corr, (expl_corr[0] + expl_corr[1]) / 2)
    assert set(held.means()) == {"label_corr", "label_auprc", "explanation_corr",
                                 "explanation_auprc", "explanation_terms"}


# ---------------------------------------------------------------- planted neurons, end to end

WORDS = ["apple", "bird", "cloud", "dog", "egg", "fern", "gate", "hill", "ink", "jar", "kite",
         "lamp"]


class PlantedJudge(nn.Module):
    """A classifier concept model whose 12 concepts are independent random linear read-outs of
    a 4 x 4 grid of mean colours (48 features): every concept's score varies on its own over
    noise images, so a sum of two of them is no other concept's score."""
    input_size = 16
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    class_names = WORDS

    def __init__(self):
        super().__init__()
        weight = torch.randn(len(WORDS), 48, generator=torch.Generator().manual_seed(3))
        self.weight = nn.Parameter(weight / 48 ** 0.5, requires_grad=False)

    def forward(self, x):
        grid = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)      # (B, 3 x 4 x 4)
        return 8 * (grid - 0.5) @ self.weight.t()


def planted_judge():
    return PlantedJudge()


class PlantedNet(nn.Module):
    """A tiny model whose ``units`` are fixed combinations of PlantedJudge's class scores:
    unit 0 = the logit of "dog"; unit 1 = logit("bird") + logit("hill"); unit 2 =
    softmax("egg") + softmax("jar")."""
    input_size = 16
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self):
        super().__init__()
        self.judge = PlantedJudge()
        self.units = nn.Identity()

    def forward(self, x):
        z = self.judge(x)
        p = torch.softmax(z, 1)
        at = WORDS.index
        return self.units(torch.stack([z[:, at("dog")], z[:, at("bird")] + z[:, at("hill")],
                                       p[:, at("egg")] + p[:, at("jar")]], 1))


def write_noise_images(folder: Path, n: int = 64, seed: int = 0) -> None:
    """``n`` 16 x 16 images of uniform noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"noise_{i:03d}.png")


def _planted_cfg(tmp_path, **kw):
    base = dict(model=PLANTED_NET, layers=["units"], probe_dir=str(tmp_path / "probe"),
                concept_model=PLANTED_JUDGE, out_dir=str(tmp_path / "out"), device="cpu",
                progress=False, sheets=3, sheet_images=4)
    base.update(kw)
    return LabelCFG(**base)


def _rows(run_dir) -> list[dict]:
    with open(Path(run_dir) / "descriptions.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("scores", ["auto", "logits", "probs"])
def test_planted_neurons_of_a_tiny_model_are_recovered(tmp_path, scores):
    write_noise_images(tmp_path / "probe")
    run_dir, run = run_labels(_planted_cfg(tmp_path, concept_scores=scores, explain="linear"))
    rows = _rows(run_dir)
    assert rows[0]["label"] == "dog"
    two = {rows[1]["label"], rows[1]["label_2"]}                 # forward selection: both first
    assert two == {"bird", "hill"} or scores == "probs"          # a sum of logits: logit paths
    both = {rows[2]["label"], rows[2]["label_2"]}
    assert both == {"egg", "jar"} or scores != "probs"           # a sum of probabilities
    expl = json.loads((run_dir / "explanations.json").read_text())["layers"]["units"]
    kind = run.concept.score_kind
    planted_terms = {"logits": {"bird", "hill"}, "probs": {"egg", "jar"}}
    unit = 1 if kind == "logits" else 2
    assert {t["concept"] for t in expl[unit]["terms"]} == planted_terms[kind]
    assert expl[unit]["heldout"]["explanation_corr"] > 0.99
    assert expl[0]["terms"][0]["concept"] == "dog"
    assert run.summary["concept_scores"] == kind == ("logits" if scores == "auto" else scores)


def test_explain_linear_outputs(tmp_path):
    write_colour_images(tmp_path / "probe")
    cfg = LabelCFG(model="module:tests.test_labels:colour_net", layers=["act"],
                   probe_dir=str(tmp_path / "probe"), concept_model=COLOUR_JUDGE,
                   out_dir=str(tmp_path / "out"), device="cpu", progress=False, sheets=2,
                   sheet_images=4, explain="linear", explain_terms=2)
    run_dir, run = run_labels(cfg)
    rows = _rows(run_dir)
    assert [r["label"] for r in rows] == list(COLOURS)
    assert list(rows[0])[-3:] == ["explanation", "explanation_heldout_corr",
                                  "label_heldout_corr"]
    for r in rows:
        assert r["explanation"].split(" + ")[0].endswith(r["label"])
        assert len(r["explanation"].split(" + ")) <= 2
        assert -1 <= float(r["explanation_heldout_corr"]) <= 1
    held = run.summary["layers"]["act"]["heldout"]
    assert held["label_corr"] > 0.5 and held["explanation_terms"] <= 2
    data = json.loads((run_dir / "explanations.json").read_text())
    assert [e["unit"] for e in data["layers"]["act"]] == list(range(len(COLOURS)))
    assert all(t["weight"] > 0 for e in data["layers"]["act"] for t in e["terms"])
    assert len(run.summary["sheets"]) == 2


def test_interrupted_explanations_keep_the_labels(tmp_path, monkeypatch):
    write_colour_images(tmp_path / "probe")
    calls = []
    real = linear.fit_linear

    def stop_on_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(linear, "fit_linear", stop_on_third)
    cfg = LabelCFG(model="module:tests.test_labels:colour_net", layers=["act"],
                   probe_dir=str(tmp_path / "probe"), concept_model=COLOUR_JUDGE,
                   out_dir=str(tmp_path / "out"), device="cpu", progress=False, sheets=1,
                   explain="linear")
    run_dir, run = run_labels(cfg)
    assert run.stopped == "interrupted"
    rows = _rows(run_dir)
    assert [r["label"] for r in rows] == list(COLOURS)
    assert [bool(r["explanation"]) for r in rows] == [True, True] + [False] * 4
    assert rows[0]["explanation_heldout_corr"] == ""


def test_concept_scores_paths_and_bad_input(tmp_path, capsys, tiny_clip_file):
    judge = load_target(COLOUR_JUDGE)
    x = torch.rand(3, 3, 16, 16)
    logits = judge.output(x)
    for kind in ("logits", "logprobs", "probs"):
        cm = concept_model(judge, "", scores=kind)
        torch.testing.assert_close(cm.scores(x), classifier_scores(logits, kind))
    torch.testing.assert_close(classifier_scores(logits, "logprobs"),
                               torch.log(torch.softmax(logits, 1)))
    with pytest.raises(ValueError, match="unknown classifier score path"):
        concept_model(judge, "", scores="nope")
    write_colour_images(tmp_path / "probe")
    argv = ["--model", "module:tests.test_labels:colour_net", "--layers", "act",
            "--probe_dir", str(tmp_path / "probe"), "--out_dir", str(tmp_path / "out"),
            "--device", "cpu", "--no-progress"]
    assert main(DescribeCFG, run_describe, argv + ["--concept_model", str(tiny_clip_file),
                                                  "--concept_scores", "logits"]) == 2
    assert "is a CLIP, whose scores are cosines" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:                    # argparse's lower bound
        main(DescribeCFG, run_describe, argv + ["--explain_terms", "0"])
    assert stop.value.code == 2 and "--explain_terms 0 is not valid" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--explain must be one of"):
        run_labels(LabelCFG(model="module:tests.test_labels:colour_net", layers=["act"],
                            probe_dir=str(tmp_path / "probe"), concept_model=COLOUR_JUDGE,
                            progress=False, explain="quadratic"))
