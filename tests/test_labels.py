"""Neuron labels (CLIP-Dissect, describe_neurons.py): every similarity against a slow loop
reference (the NeuronEval metrics, forward selection and linear explanations are in
test_labels_explain.py), a synthetic network whose neuron k fires on the images of concept k, the disk cache
(reused, rebuilt when corrupt), a tiny random CLIP as concept model and as target, bad input,
--visualise / --check on a tiny CNN, and the script on the embedded model."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import write_images
from helpers import read_png
from vital.cli import main
from vital.config import ConfigError
from vital.labels import similarity as S
from vital.labels.vocabulary import concept_model, words20k
from vital.labels.describe import LabelCFG, run_labels, top_probe_files
from vital.refs.images import load_image
from vital.modes.label_visuals import DescribeCFG, run_describe
from vital.models import load_target

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
           "cyan": (0, 1, 1), "magenta": (1, 0, 1)}
PER_COLOUR = 8
COLOUR_NET = "module:tests.test_labels:colour_net"
COLOUR_JUDGE = "module:tests.test_labels:colour_judge"


# ---------------------------------------------------------------- slow references (plain loops)

def slow_cos(P, A):
    P, A = P.double(), A.double()
    out = torch.zeros(A.shape[1], P.shape[1], dtype=torch.float64)
    for k in range(A.shape[1]):
        for m in range(P.shape[1]):
            a, p = A[:, k], P[:, m]
            out[k, m] = sum(a[i] * p[i] for i in range(len(a))) / (a.norm() * p.norm())
    return out


def slow_corr(P, A):
    P, A = P.double(), A.double()
    out = torch.zeros(A.shape[1], P.shape[1], dtype=torch.float64)
    for k in range(A.shape[1]):
        for m in range(P.shape[1]):
            a, p = A[:, k] - A[:, k].mean(), P[:, m] - P[:, m].mean()
            out[k, m] = sum(a[i] * p[i] for i in range(len(a))) / (a.norm() * p.norm())
    return out


def slow_cubed(P, A, min_norm=1e-3):
    P, A = P.double(), A.double()
    out = torch.zeros(A.shape[1], P.shape[1], dtype=torch.float64)
    for k in range(A.shape[1]):
        a = (A[:, k] - A[:, k].mean()) ** 3
        a = a / max(float(a.norm()), min_norm)
        for m in range(P.shape[1]):
            p = (P[:, m] - P[:, m].mean()) ** 3
            p = p / max(float(p.norm()), min_norm)
            out[k, m] = sum(a[i] * p[i] for i in range(len(a)))
    return out


def _slow_pmi(logp, lam):
    K, M = logp.shape
    out = torch.zeros(K, M, dtype=torch.float64)
    for m in range(M):
        log_pm = math.log(sum(math.exp(float(logp[k, m])) for k in range(K)) / K)
        for k in range(K):
            out[k, m] = logp[k, m] - lam * log_pm
    return out


def _softmax_rows(P, a):
    P = P.double()
    out = torch.zeros_like(P)
    for i in range(P.shape[0]):
        e = [math.exp(a * float(x)) for x in P[i]]
        for m in range(P.shape[1]):
            out[i, m] = e[m] / sum(e)
    return out


def _ranked(column, top_k):
    order = sorted(range(len(column)), key=lambda i: -float(column[i]))
    return order[:min(top_k, len(column))]


def slow_wpmi(P, A, top_k=28, a=2.0, lam=0.6, min_prob=1e-7, top_fraction=None):
    Ps = _softmax_rows(P, a)
    logp = torch.zeros(A.shape[1], P.shape[1], dtype=torch.float64)
    for k in range(A.shape[1]):
        for m in range(P.shape[1]):
            logp[k, m] = sum(math.log(Ps[i, m] + min_prob) for i in _ranked(A[:, k], top_k))
    return _slow_pmi(logp, lam)


def slow_soft_wpmi(P, A, top_k=100, a=10.0, lam=1.0, min_prob=1e-7, p_start=0.998, p_end=0.97,
                   top_fraction=None):
    Ps = _softmax_rows(P, a)
    logp = torch.zeros(A.shape[1], P.shape[1], dtype=torch.float64)
    for k in range(A.shape[1]):
        top = _ranked(A[:, k], top_k)
        for m in range(P.shape[1]):
            total = 0.0
            for r, i in enumerate(top):
                p_in = p_start - r * (p_start - p_end) / len(top)
                total += math.log(p_in * Ps[i, m] + (1 - p_in) + min_prob)
            logp[k, m] = total
    return _slow_pmi(logp, lam)


def slow_rank_reorder(P, A, p=3.0, top_fraction=0.05, scale_p=0.5, seed=0):
    P, A = P.double(), A.double()
    n = max(1, int(top_fraction * A.shape[0]))
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(A.shape[1], P.shape[1], dtype=torch.float64)
    for k in range(A.shape[1]):
        top = _ranked(A[:, k], n)
        t = [float(A[i, k]) for i in top]                       # descending
        s = sorted(t)                                           # ascending
        diffs = []
        for _ in range(5):
            perm = torch.randperm(n, generator=gen).tolist()
            diffs += [abs(s[j] - s[perm[j]]) ** p for j in range(n)]
        baseline = max(sum(diffs) / len(diffs), 1e-12)
        for m in range(P.shape[1]):
            scores = [float(P[i, m]) for i in top]
            by_score = sorted(range(n), key=lambda j: (scores[j], j))   # ascending, stable
            rank = {j: r for r, j in enumerate(by_score)}
            err = sum(abs(t[j] - s[rank[j]]) ** p for j in range(n)) / n / baseline
            avg = max(sum(scores) / n, 1e-6)
            out[k, m] = -err / avg ** scale_p
    return out


@pytest.fixture
def random_pa():
    gen = torch.Generator().manual_seed(3)
    P = torch.rand(40, 7, generator=gen) * 0.4                  # like CLIP cosines
    A = torch.randn(40, 5, generator=gen).relu() + torch.rand(40, 5, generator=gen)
    return P, A


@pytest.mark.parametrize("name,slow,options", [
    ("correlation", slow_corr, {}),
    ("cos_similarity", slow_cos, {}),
    ("cos_similarity_cubed", slow_cubed, {}),
    ("wpmi", slow_wpmi, {"top_k": 6}),
    ("wpmi", slow_wpmi, {}),                                    # top_k ceil(28/50000 x 40) = 1
    ("wpmi", slow_wpmi, {"top_fraction": 0.2}),                 # 8
    ("soft_wpmi", slow_soft_wpmi, {"top_k": 9}),
    ("soft_wpmi", slow_soft_wpmi, {"top_k": 100}),              # capped at 40 images
    ("soft_wpmi", slow_soft_wpmi, {}),                          # ceil(100/50000 x 40) = 1
    ("soft_wpmi", slow_soft_wpmi, {"top_fraction": 0.3}),       # 12
    ("rank_reorder", slow_rank_reorder, {"top_fraction": 0.25}),
    ("rank_reorder", slow_rank_reorder, {}),                    # n = 2
])
def test_similarity_equals_the_slow_loop(random_pa, name, slow, options):
    P, A = random_pa
    fast, used = S.similarity(name, P, A, **options)
    assert fast.shape == (5, 7)
    expected = slow(P, A, **{k: used[k] for k in used})
    torch.testing.assert_close(fast.double(), expected, rtol=1e-5, atol=1e-5)


def test_rank_reorder_handles_negative_means_and_equal_activations():
    P = -torch.rand(20, 3)                                      # every mean score negative
    A = torch.ones(20, 2)                                       # every order equally good
    out, _ = S.similarity("rank_reorder", P, A, top_fraction=0.5)
    assert torch.isfinite(out).all()


def test_dead_neuron_gets_zero_cosine_not_nan():
    out, _ = S.similarity("cos_similarity", torch.rand(10, 3), torch.zeros(10, 2))
    assert torch.equal(out, torch.zeros(2, 3))


# ---------------------------------------------------------------- a synthetic network

class ColourNet(nn.Module):
    """Neuron k of layer ``act`` fires (ReLU > 0) only on pixels of colour k of COLOURS."""
    input_size = 16
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    forwards = 0   # probe images seen by all instances: the cache tests count recomputation

    def __init__(self):
        super().__init__()
        cols = torch.tensor(list(COLOURS.values()), dtype=torch.float32)    # (6, 3)
        self.conv = nn.Conv2d(3, len(COLOURS), 1)
        with torch.no_grad():
            self.conv.weight.copy_((2 * cols - 1)[:, :, None, None])        # +1 on, -1 off
            self.conv.bias.copy_(-(cols.sum(1) - 0.5))
        self.act = nn.ReLU()

    def forward(self, x):
        # count real images, not the blank shape probe of TargetModel.layers()
        type(self).forwards += int((x.flatten(1).abs().sum(1) > 0).sum())
        return self.act(self.conv(x)).mean((2, 3))


class ColourJudge(nn.Module):
    """A concept model that knows the colours: logits = -10 x distance to each colour."""
    input_size = 16
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    class_names = list(COLOURS)

    def __init__(self):
        super().__init__()
        self.cols = nn.Parameter(torch.tensor(list(COLOURS.values()), dtype=torch.float32),
                                 requires_grad=False)

    def forward(self, x):
        rgb = x.mean((2, 3))
        rgb = rgb / rgb.amax(1, keepdim=True).clamp_min(1e-6)             # brightness out
        return -10 * torch.cdist(rgb, self.cols) ** 2


def _forwards() -> int:
    """Images ColourNet has seen: the class as ``load_target`` imports it (tests.test_labels)."""
    import importlib
    return importlib.import_module("tests.test_labels").ColourNet.forwards


def colour_net():
    return ColourNet()


def colour_judge():
    return ColourJudge()


def write_colour_images(folder: Path, seed: int = 0) -> dict[str, str]:
    """PER_COLOUR images of each colour at random brightness; file -> colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for name, rgb in COLOURS.items():
        for j in range(PER_COLOUR):
            level = rng.uniform(0.8, 1.0)   # two-colour neurons fire above 0.75
            arr = np.zeros((20, 20, 3), np.float32) + np.array(rgb, np.float32) * level
            path = folder / f"{name}_{j}.png"
            Image.fromarray((arr * 255).round().astype(np.uint8)).save(path)
            truth[path.name] = name
    return truth


def _cfg(tmp_path, probe, **kw):
    base = dict(model=COLOUR_NET, layers=["act"], probe_dir=str(probe),
                concept_model=COLOUR_JUDGE, out_dir=str(tmp_path / "out"), device="cpu",
                progress=False, sheets=2, sheet_images=4)
    base.update(kw)
    return LabelCFG(**base)


def _labels(run_dir) -> dict[int, str]:
    with open(Path(run_dir) / "descriptions.csv") as handle:
        return {int(r["unit"]): r["label"] for r in csv.DictReader(handle)}


@pytest.mark.parametrize("similarity", list(S.SIMILARITIES))
def test_synthetic_neurons_get_their_own_concept(tmp_path, similarity):
    write_colour_images(tmp_path / "probe")
    # top_k = the images of one concept (wpmi's 28 would mix in the next concepts' images)
    run_dir, run = run_labels(_cfg(tmp_path, tmp_path / "probe", similarity=similarity,
                                   top_k=PER_COLOUR))
    assert _labels(run_dir) == dict(enumerate(COLOURS))
    assert run.stopped is None


def test_soft_wpmi_with_top_k_from_the_probe_size_labels_the_synthetic_neurons(tmp_path):
    write_colour_images(tmp_path / "probe")
    run_dir, _ = run_labels(_cfg(tmp_path, tmp_path / "probe", similarity="soft_wpmi"))
    assert _labels(run_dir) == dict(enumerate(COLOURS))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["constants"]["top_k"] == 1 and summary["probe"]["used"] == 48   # 48 x 0.002
    assert summary["concept_scores"] == "logits" and summary["constants"]["a"] == 1.0
    run_dir, _ = run_labels(_cfg(tmp_path, tmp_path / "probe", similarity="soft_wpmi",
                                 concept_scores="probs"))          # CLIP-Dissect's double softmax
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["concept_scores"] == "probs" and summary["constants"]["a"] == 10.0


def test_the_defaults_label_the_synthetic_neurons(tmp_path):
    write_colour_images(tmp_path / "probe")
    run_dir, _ = run_labels(_cfg(tmp_path, tmp_path / "probe"))
    assert _labels(run_dir) == dict(enumerate(COLOURS))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["similarity"] == "correlation" and summary["concept_scores"] == "logits"
    assert len(summary["sheets"]) == 2 and all((run_dir / s).is_file() for s in summary["sheets"])
    assert (run_dir / "config.json").is_file()
    with open(run_dir / "descriptions.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["layer", "unit", "label", "similarity", "label_2", "label_3", "label_4",
                       "label_5"]
    assert len(rows) == 1 + len(COLOURS) and len(set(rows[1][2:3] + rows[1][4:])) == 5


# ---------------------------------------------------------------- the cache

def test_cache_is_reused_across_layers_and_similarities_and_rebuilt_when_corrupt(
        tmp_path, isolated_cache):
    write_colour_images(tmp_path / "probe")
    first_dir, first = run_labels(_cfg(tmp_path, tmp_path / "probe"))
    seen = _forwards()
    assert seen >= 48
    assert not first.layers["act"].acts.cache_hit and not first.summary["concept_matrix"]["cache_hit"]

    _, again = run_labels(_cfg(tmp_path, tmp_path / "probe", similarity="wpmi"))
    assert _forwards() == seen                           # nothing recomputed
    assert again.layers["act"].acts.cache_hit and again.summary["concept_matrix"]["cache_hit"]
    torch.testing.assert_close(again.layers["act"].acts.values, first.layers["act"].acts.values)

    _, other = run_labels(_cfg(tmp_path, tmp_path / "probe", layers=["act", "conv"]))
    assert other.layers["act"].acts.cache_hit and not other.layers["conv"].acts.cache_hit
    assert other.summary["concept_matrix"]["cache_hit"]        # P is the same for any layer

    entries = sorted((isolated_cache / "labels" / "activations").glob("*.safetensors"))
    assert len(entries) == 2
    for entry in entries:
        entry.write_bytes(b"not a safetensors file")
    before = _forwards()
    with pytest.warns(UserWarning, match="corrupt"):
        redo_dir, redo = run_labels(_cfg(tmp_path, tmp_path / "probe"))
    assert _forwards() == before + 48                   # recomputed once
    assert not redo.layers["act"].acts.cache_hit
    assert _labels(redo_dir) == _labels(first_dir)
    _, healed = run_labels(_cfg(tmp_path, tmp_path / "probe"))
    assert healed.layers["act"].acts.cache_hit                 # the rebuilt entry is good


def test_changed_probe_images_miss_the_cache(tmp_path):
    write_colour_images(tmp_path / "probe")
    run_labels(_cfg(tmp_path, tmp_path / "probe"))
    write_colour_images(tmp_path / "probe", seed=1)            # same names, other contents
    _, run = run_labels(_cfg(tmp_path, tmp_path / "probe"))
    assert not run.layers["act"].acts.cache_hit


def test_unreadable_probe_file_is_skipped_with_a_warning(tmp_path):
    write_colour_images(tmp_path / "probe")
    (tmp_path / "probe" / "sub").mkdir()
    (tmp_path / "probe" / "sub" / "broken.png").write_bytes(b"no image")
    with pytest.warns(UserWarning, match="unreadable"):
        run_dir, run = run_labels(_cfg(tmp_path, tmp_path / "probe"))
    assert (run.summary["probe"]["files"], run.summary["probe"]["used"]) == (49, 48)
    assert _labels(run_dir) == dict(enumerate(COLOURS))


# ---------------------------------------------------------------- CLIP

def test_tiny_clip_as_concept_model_end_to_end(tmp_path, tiny_clip_file):
    write_colour_images(tmp_path / "probe")
    words = tmp_path / "words.txt"
    words.write_text("# colours\nred\ngreen\nblue\n\nsky\nred\ngrass\n")
    run_dir, run = run_labels(_cfg(tmp_path, tmp_path / "probe", concept_model=str(tiny_clip_file),
                                   concepts=str(words)))
    assert run.concept.concepts == ["red", "green", "blue", "sky", "grass"]
    labels = _labels(run_dir)
    assert sorted(labels) == list(range(6)) and set(labels.values()) <= set(run.concept.concepts)
    assert run.concept.text.shape[0] == 5
    clip = load_target(str(tiny_clip_file))
    images = torch.rand(3, 3, 32, 32)
    emb = torch.nn.functional.normalize(clip.embed(images).float(), dim=-1)
    from vital.models.classnames import encode_texts
    text = encode_texts(clip.clip, ["red", "green"], "cpu")
    cm = concept_model(clip, str(words), progress=False)
    torch.testing.assert_close(cm.scores(images)[:, :2], emb @ text.t())   # P = cosine, no template


def test_tiny_clip_vit_token_layers_as_target(tmp_path, tiny_clip_file):
    write_colour_images(tmp_path / "probe")
    run_dir, run = run_labels(_cfg(tmp_path, tmp_path / "probe", model=str(tiny_clip_file),
                                   layers=["block.1.mlp", "block.0"], pool="cls", sheets=0))
    assert run.layers["block.1.mlp"].similarity.shape == (256, 6)
    assert run.layers["block.0"].spec.skip == 1
    assert len((run_dir / "descriptions.csv").read_text().splitlines()) == 1 + 256 + 64
    target = run.target
    x = torch.rand(2, 3, 32, 32)
    from vital.labels.probe import layer_spec, summarise
    with torch.no_grad(), target.hooks(["block.0"]) as feats:
        target(x)
        tokens = feats["block.0"]                             # (B, 1+N, D)
        torch.testing.assert_close(summarise(tokens, layer_spec(target, "block.0", "avg")),
                                   tokens[:, 1:].mean(1))     # class token left out
        torch.testing.assert_close(summarise(tokens, layer_spec(target, "block.0", "cls")),
                                   tokens[:, 0])
        torch.testing.assert_close(summarise(tokens, layer_spec(target, "block.0", "max")),
                                   tokens[:, 1:].amax(1))


def test_words20k_is_filtered_and_reproducible():
    words = words20k()
    assert len(words) == 20_000 == len(set(words))
    assert all(w.isascii() and w.isalpha() and w == w.lower() and len(w) >= 2 for w in words)
    assert words[:3] == ["the", "to", "and"] and words == words20k()


# ---------------------------------------------------------------- bad input

def _fails(tmp_path, capsys, *args, probe=None):
    if probe is None:
        probe = tmp_path / "probe"
        write_colour_images(probe)
    argv = ["--model", COLOUR_NET, "--layers", "act", "--concept_model", COLOUR_JUDGE,
            "--probe_dir", str(probe), "--out_dir", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress", *args]
    assert main(DescribeCFG, run_describe, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_gets_one_sentence(tmp_path, capsys, tiny_clip_file):
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _fails(tmp_path, capsys, probe=tmp_path / "empty")
    assert "does not exist" in _fails(tmp_path, capsys, probe=tmp_path / "nowhere")
    assert "unknown concept set or file 'nope.txt'" in _fails(tmp_path, capsys,
                                                               "--concepts", "nope.txt")
    assert "neuron 6 is out of range" in _fails(tmp_path, capsys, "--neurons", "1", "6")
    assert "unknown layer 'ac'" in _fails(tmp_path, capsys, "--layers", "ac")
    assert "can only name its own classes" in _fails(tmp_path, capsys, "--concepts", "words20k")
    assert "--check" in _fails(tmp_path, capsys, "--check")
    attn = _fails(tmp_path, capsys, "--model", str(tiny_clip_file), "--layers", "block.0.attn")
    assert "attention map" in attn and "no neurons" in attn
    assert "--pool cls" in _fails(tmp_path, capsys, "--pool", "cls")
    assert not (tmp_path / "out").exists()                    # nothing written on bad input
    with pytest.raises(SystemExit) as stop:                     # argparse's choices
        main(DescribeCFG, run_describe, ["--similarity", "nope"])
    assert stop.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown similarity 'nope'"):
        run_labels(_cfg(tmp_path, tmp_path / "probe", similarity="nope"))


def test_vis_settings_bad_input_gets_one_sentence(tmp_path, capsys):
    args = ["--model", "module:tests.conftest:TinyCNN", "--layers", "stage2", "--visualise", "1",
            "--vis_settings"]
    assert "did you mean 'neuron_weight'" in _fails(tmp_path, capsys, *args, "nueron_weight=2")
    assert "sets 'layer', which --layers sets" in _fails(tmp_path, capsys, *args, "layer=fc")
    assert "--ref_kind 'crops' is not valid: it must be one of" in _fails(
        tmp_path, capsys, *args, "ref_kind=crops")
    assert "bad value for 'lr'" in _fails(tmp_path, capsys, *args, "lr=fast")
    assert not (tmp_path / "out").exists()                    # refused before the labels
    with pytest.raises(SystemExit) as stop:                     # argparse reads the type
        main(DescribeCFG, run_describe, [*args, "neuron_weight"])
    assert stop.value.code == 2 and "is not key=value" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is not key=value"):  # built in Python
        run_describe(DescribeCFG(visualise=1, vis_settings="neuron_weight"))


def test_visualise_refuses_a_vector_layer(tmp_path, capsys):
    err = _fails(tmp_path, capsys, "--model", "module:tests.conftest:TinyCNN", "--layers", "fc",
                 "--visualise", "1")
    assert "needs spatial positions" in err


# ---------------------------------------------------------------- --visualise / --check

def test_visualise_and_check_on_a_tiny_cnn(tmp_path):
    write_colour_images(tmp_path / "probe")
    cfg = DescribeCFG(model="module:tests.conftest:TinyCNN", layers=["stage2"],
                      probe_dir=str(tmp_path / "probe"), concept_model=COLOUR_JUDGE,
                      out_dir=str(tmp_path / "out"), device="cpu", progress=False, sheets=1,
                      visualise=2, check=True, vis_steps=2, vis_size=32, vis_num_ref=3,
                      vis_images=3)
    run_dir, run = run_describe(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = run.layers["stage2"].by_similarity()[:2]
    assert [v["unit"] for v in summary["visualised"]] == best
    for v in summary["visualised"]:
        assert (run_dir / v["run_dir"] / "final.png").is_file()
    check = summary["check"]
    assert check["neurons"] == 2 and 0 <= check["top1"] <= check["top5"] <= 2
    for row in check["per_neuron"]:
        assert len(row["picture_labels"]) == 5 and row["top1"] == (row["picture_labels"][0] ==
                                                                    row["label"])
        # the references' share, slowly: the top probe files loaded and scored one by one
        files, _ = top_probe_files(run, "stage2", row["unit"], check["references"])
        hits = []
        for f in files:
            scores = run.concept.scores(load_image(f, run.concept.target.input_size)[None])[0]
            hits.append(run.concept.concepts.index(row["label"]) in scores.topk(5).indices)
        assert check["references"] == 8 and len(files) == 8
        assert row["references_top5"] == pytest.approx(sum(hits) / len(hits))
        mean = torch.cat([run.concept.scores(load_image(f, run.concept.target.input_size)[None])
                          for f in files]).mean(0)
        ref_best = [run.concept.concepts[i] for i in mean.topk(5).indices]
        assert row["references_labels"] == ref_best
        assert row["picture_in_references"] == (row["picture_labels"][0] in ref_best)
    assert check["references_top5"] == pytest.approx(
        sum(r["references_top5"] for r in check["per_neuron"]) / 2)
    assert check["picture_in_references"] == sum(r["picture_in_references"]
                                                 for r in check["per_neuron"])
    with Image.open(run_dir / "visualisations.png") as sheet:
        assert sheet.height > 2 * 96


def test_vis_settings_reach_every_picture(tmp_path):
    write_colour_images(tmp_path / "probe")
    cfg = DescribeCFG(model="module:tests.conftest:TinyCNN", layers=["stage2"],
                      probe_dir=str(tmp_path / "probe"), concept_model=COLOUR_JUDGE,
                      out_dir=str(tmp_path / "out"), device="cpu", progress=False, sheets=1,
                      visualise=2, vis_steps=2, vis_size=32, vis_num_ref=3,
                      vis_images=2, vis_settings="neuron_weight=2.5,steps_multires=[1,2]")
    run_dir, _ = run_describe(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["visualise_settings"]["neuron_weight"] == 2.5
    for v in summary["visualised"]:
        used = json.loads((run_dir / v["run_dir"] / "config.json").read_text())
        used = used.get("cfg", used)
        assert used["neuron_weight"] == 2.5
        assert used["steps_multires"] == [1, 2] and used["steps"] == 0   # stages, not --vis_steps
        metrics = json.loads((run_dir / v["run_dir"] / "metrics.json").read_text())
        assert metrics["steps_done"] == 3


@pytest.mark.parametrize("batch", [1, 2])
def test_sigterm_during_visualise_stops_the_loop_and_judges_no_half_picture(
        tmp_path, monkeypatch, batch):
    """SIGTERM in the first picture: no later neuron or layer is rendered, the cut picture is
    not judged by --check, the summary is written and the script exits 143."""
    import os
    import signal
    from vital.cli import main
    from vital.modes import batch as batch_mod, runner
    write_colour_images(tmp_path / "probe")

    def terminate(step, total, loss, image):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    callbacks = runner.Callbacks(on_progress=terminate, progress_every=1)
    monkeypatch.setattr(runner, "NO_CALLBACKS", callbacks)
    monkeypatch.setattr(batch_mod, "NO_CALLBACKS", callbacks)
    status = main(DescribeCFG, run_describe, [
        "--model", "module:tests.conftest:TinyCNN", "--layers", "stage1", "stage2",
        "--probe_dir", str(tmp_path / "probe"), "--concept_model", COLOUR_JUDGE,
        "--out_dir", str(tmp_path / "out"), "--device", "cpu", "--no-progress", "--sheets", "1",
        "--visualise", "3", "--check", "--vis_steps", "20", "--vis_size", "32",
        "--vis_num_ref", "3", "--vis_images", "2",
        "--vis_batch_size", str(batch)])
    assert status == 143
    run_dir = next((tmp_path / "out").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {v["layer"] for v in summary["visualised"]} == {"stage1"}
    assert len(summary["visualised"]) == batch         # the batch that was cut, nothing after
    assert all(v["status"].startswith("terminated") for v in summary["visualised"])
    assert "check" not in summary


@pytest.mark.parametrize("vis_probe", [4, 0])   # each neuron's own probe folder; the whole one
def test_batched_visualisations_equal_one_at_a_time(tmp_path, vis_probe):
    write_colour_images(tmp_path / "probe")
    settings = dict(model="module:tests.conftest:TinyCNN", layers=["stage2"],
                    probe_dir=str(tmp_path / "probe"), concept_model=COLOUR_JUDGE,
                    device="cpu", progress=False, sheets=1, visualise=3, vis_steps=3,
                    vis_size=32, vis_num_ref=3, vis_images=2, vis_probe=vis_probe)
    runs = {size: run_describe(DescribeCFG(out_dir=str(tmp_path / f"b{size}"),
                                           vis_batch_size=size, **settings))[0]
            for size in (1, 2)}
    visuals = [json.loads((runs[size] / "summary.json").read_text())["visualised"]
               for size in (1, 2)]
    assert [v["unit"] for v in visuals[0]] == [v["unit"] for v in visuals[1]]
    assert [json.loads((runs[2] / v["run_dir"] / "config.json").read_text())["batched_with"]
            for v in visuals[1]] == [2, 2, 1]
    for v in visuals[0]:
        one, two = (runs[size] / v["run_dir"] for size in (1, 2))
        assert "batched_with" not in json.loads((one / "config.json").read_text())
        diff = abs(read_png(one / "final.png").astype(int)
                   - read_png(two / "final.png").astype(int))
        assert diff.max() <= 1
        mine = json.loads((two / "neuron.json").read_text())["visualisation"]
        theirs = json.loads((one / "neuron.json").read_text())["visualisation"]
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------- the script

def test_script_runs_on_the_embedded_model(tmp_path):
    write_images(tmp_path / "probe", 5, size=64)
    words = tmp_path / "concepts.txt"
    words.write_text("tench\ngoldfish\nespresso\ndaisy\ntabby\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "describe_neurons.py"), "--model", "efficientnet-lite0",
         "--layers", "blocks.15", "fc", "--neurons", "0", "1", "--probe_dir",
         str(tmp_path / "probe"), "--concepts", str(words), "--concept_model",
         "efficientnet-lite1", "--out_dir", str(tmp_path / "out"), "--run_name", "r",
         "--device", "cpu", "--no-progress", "--sheets", "1", "--batch_size", "8"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "out" / "r" / "descriptions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["layer"], r["unit"]) for r in rows] == [("blocks.15", "0"), ("blocks.15", "1"),
                                                       ("fc", "0"), ("fc", "1")]
    assert {r["label"] for r in rows} <= set(words.read_text().split())
    summary = json.loads((tmp_path / "out" / "r" / "summary.json").read_text())
    assert summary["concepts"]["count"] == 5 and summary["layers"]["fc"]["neurons"] == 1000
    assert len(summary["sheets"]) == 2
