"""Embedding arithmetic steering: the arithmetic, inputs, the embedding hook, end to end runs on
a tiny random CLIP, a tiny CNN and (slow) the embedded EfficientNet-Lite0, alpha = beta = 0, bad
input, and class_neurons_fvis_arithmetic.py run as a script."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import (TINY_CNN, assert_png_equals, assert_png_shows, hooks_left, read_png,
                     run_script, tiny_clip_file, write_images)
from vital.cli import main
from vital.config import ConfigError, parse_cfg
from vital.modes.arithmetic import (ArithmeticCFG, Operand, parse_operand, run_arithmetic,
                                    target_embedding)
from vital.refs.bundled import PHOTOS, photo_path

ROOT = Path(__file__).resolve().parent.parent
SQRT3 = 3 ** 0.5


def _photo(folder: str) -> str:
    return str(photo_path(next(p for p in PHOTOS if p.folder == folder)))


# ----- the arithmetic on hand-made vectors --------------------------------------------------
def test_king_minus_man_plus_woman_by_hand():
    king, man, woman = torch.eye(3)
    got = target_embedding(king, add=woman[None], sub=man[None])
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0, 1.0]) / SQRT3)


def test_inputs_are_unit_normalised_and_weighted():
    base = torch.tensor([3.0, 0.0, 0.0])                 # length does not matter
    add = torch.tensor([[0.0, 0.0, 2.0], [0.0, 5.0, 0.0]])  # mean of unit vectors: (0, .5, .5)
    sub = torch.tensor([[0.0, 7.0, 0.0]])
    got = target_embedding(base, add=add, sub=sub, add_beta=2.0, sub_alpha=0.5)
    raw = torch.tensor([1.0, 0.0, 0.0]) - 0.5 * torch.tensor([0.0, 1.0, 0.0]) \
        + 2.0 * torch.tensor([0.0, 0.5, 0.5])
    torch.testing.assert_close(got, raw / raw.norm())
    assert abs(float(got.norm()) - 1.0) < 1e-6


def test_zero_weights_give_the_base_direction():
    gen = torch.Generator().manual_seed(0)
    base, add, sub = (torch.randn(s, generator=gen) for s in ((16,), (3, 16), (2, 16)))
    got = target_embedding(base, add=add, sub=sub, add_beta=0.0, sub_alpha=0.0)
    torch.testing.assert_close(got, F.normalize(base, dim=0))
    torch.testing.assert_close(target_embedding(base), F.normalize(base, dim=0))


def test_cancelling_terms_and_bad_weights_are_errors():
    v = torch.tensor([1.0, 2.0])
    with pytest.raises(ConfigError, match="zero"):
        target_embedding(v, sub=2 * v[None])
    with pytest.raises(ConfigError, match="add_beta"):
        target_embedding(v, add=v[None], add_beta=float("nan"))


# ----- inputs -----------------------------------------------------------------------------------
def test_parse_operand(tmp_path):
    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(image)
    assert parse_operand(str(image), "base") == Operand("file", str(image), f"{tmp_path.name}/cat")
    assert parse_operand("MAN", "sub[0]") == Operand("word", "MAN", "MAN")
    assert parse_operand("word:AC/DC", "add[0]").kind == "word"
    assert parse_operand(f"file:{image}", "base").kind == "file"


@pytest.mark.parametrize("spec, error, message", [
    ("missing.png", FileNotFoundError, "does not exist"),
    ("some/folder/photo", FileNotFoundError, "word:some/folder/photo"),
    ("file:nothing_here", FileNotFoundError, "does not exist"),
    ("", ValueError, "empty"),
    ("word:  ", ValueError, "empty word"),
])
def test_bad_operands(spec, error, message):
    with pytest.raises(error, match=message):
        parse_operand(spec, "base")


# ----- the embedding hook (vital.models addition) -----------------------------------------------
def test_embed_hook_gives_embed_without_a_second_forward(tiny_cnn_target):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    calls = []
    handle = tiny_cnn_target.module.register_forward_pre_hook(lambda m, a: calls.append(1))
    with tiny_cnn_target.embed_hook() as grabbed:
        tiny_cnn_target(x)
        emb = grabbed["embed"]
        emb.sum().backward()                          # the graph is kept
    handle.remove()
    assert len(calls) == 1 and x.grad is not None and grabbed == {}
    torch.testing.assert_close(emb, tiny_cnn_target.embed(x))
    tiny_cnn_target(x)
    assert grabbed == {} and hooks_left(tiny_cnn_target.module) == 0   # unhooked on exit


# ----- end to end -------------------------------------------------------------------------------
def _tiny_clip(folder: Path) -> str:
    """A tiny random CLIP ViT (width 128, 2 blocks, patch 8 at 32 px; real vocabulary, so words
    tokenize). Its weights are moved off their init: fresh, every image embeds within cosine
    0.999 of every other; perturbed, word images are ~0.98 apart, enough to steer between.
    Whether 16 steps follow the target depends on the random draw: (1 - cosine) to the target
    falls to 0.67x its start with seed 4 (0.75, 0.73, 0.72 with seeds 5-7; seeds 0-3 give
    1.73, 0.86, 0.92, 0.98), so seed 4 is the model of the test below."""
    return str(tiny_clip_file(folder / "tiny_clip.safetensors", "vit", width=128, context=16,
                              seed=4))


@pytest.fixture
def short_vocabulary(monkeypatch):
    """The opinion's vocabulary cut to 200 words: the whole 34k-word vocabulary takes ~10 s."""
    from clip_custom.tokenizer import SimpleTokenizer
    words = SimpleTokenizer().vocab_words()[:200]
    monkeypatch.setattr(SimpleTokenizer, "vocab_words", lambda self, alpha_only=False: words)


def _cfg(tmp_path, **kw) -> ArithmeticCFG:
    base = dict(size=32, steps_multires=[6, 10], save_steps=8, out_dir=str(tmp_path / "out"),
                run_name="t", progress=False, device="cpu")
    return ArithmeticCFG(**{**base, **kw})


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "arithmetic.json").read_text())


def test_king_man_woman_on_a_tiny_clip(tmp_path, short_vocabulary, capsys):
    cfg = _cfg(tmp_path, model=_tiny_clip(tmp_path), base="KING", sub=["MAN"], add=["WOMAN"],
               lr=0.1, warmup=2)    # the tiny CLIP's word embeddings are ~0.98 apart
    run_dir, result = run_arithmetic(cfg)
    assert result.steps_done == 16 and result.stopped is None
    final = read_png(run_dir / "final.png")
    assert_png_equals(run_dir / "final.png", result.image)
    strip = assert_png_shows(run_dir / "arithmetic_strip.png")
    assert strip.shape[1] > 4 * 32                    # base | result | add | sub
    assert (strip[4:36, 40:72] == final).all()        # the second tile is the result
    summary = _summary(run_dir)
    assert summary["formula"] == "KING - 1*MAN + 1*WOMAN"
    assert summary["embedding"] == "CLIP image embedding"
    cos = summary["cosine"]
    assert 1 - cos["result_to_target"] < 0.9 * (1 - cos["base_to_target"])   # it followed
    assert summary["opinion"]["result"]["opinion_text"].startswith("CLIP:")
    out = capsys.readouterr().out
    assert "base opinion: CLIP:" in out and "result opinion: CLIP:" in out


def _lite_cfg(tmp_path, **kw) -> ArithmeticCFG:
    """64 px on the embedded model, 20 steps, no augmentation: at 64 px the penultimate
    features move slowly and augmentation noise would hide the steering in a short run."""
    return _cfg(tmp_path, model="efficientnet-lite0", size=64, base=_photo("espresso"),
                steps_multires=[20], warmup=5, jitter=0, scales=[1.0], save_steps=0, **kw)


def _steer_and_keep(cfg) -> tuple[Path, dict, dict]:
    """Steered (+ add, - sub) and alpha = beta = 0 runs of ``cfg``: (steered run, summaries)."""
    steered, _ = run_arithmetic(cfg(run_name="steered"))
    still, _ = run_arithmetic(cfg(add_beta=0.0, sub_alpha=0.0, run_name="still"))
    return steered, _summary(steered), _summary(still)


def _assert_steered_and_kept(moved: dict, kept: dict) -> None:
    assert moved["embedding"].startswith("penultimate")
    assert moved["cosine"]["result_to_target"] > moved["cosine"]["base_to_target"] + 0.01
    assert kept["cosine"]["base_to_target"] > 0.9999      # the target is the base direction
    assert kept["cosine"]["result_to_base"] > 0.99
    assert kept["cosine"]["result_to_base"] > moved["cosine"]["result_to_base"] + 0.01
    assert kept["mean_abs_pixel_change"] < 8 / 255


def test_tiny_cnn_steers_and_zero_weights_keep_the_base(tmp_path):
    """The fast version of the embedded model's test below, with its tolerances: one reference
    image - the word COFFEE + another image, on TinyCNN's penultimate features (measured:
    cosine to the target 0.939 -> 0.970; alpha = beta = 0 keeps cosine 1.000 to the base and
    moves pixels by 1.2/255 on average)."""
    files = sorted(write_images(tmp_path / "refs", 2).iterdir())
    moved_dir, moved, kept = _steer_and_keep(lambda **kw: _cfg(
        tmp_path, model=TINY_CNN, base=str(files[0]), add=[str(files[1])],
        sub=["word:COFFEE"], steps_multires=[20], warmup=5, jitter=0, scales=[1.0],
        save_steps=0, **kw))
    _assert_steered_and_kept(moved, kept)
    assert_png_shows(moved_dir / "final.png", (32, 32))


@pytest.mark.slow   # the fast suite: the same tolerances on TinyCNN above
def test_embedded_model_steers_and_zero_weights_keep_the_base(tmp_path):
    """Steered: espresso photo - the word COFFEE + a cat photo, on penultimate features.
    alpha = beta = 0: the target is the base's own direction and the references are its own
    features, so every term starts at its minimum. Tolerances: the embedding stays within
    cosine 0.99 of the base (measured 0.998) and clearly closer to it than the steered run's
    (measured 0.975). Pixels: Adam scales even the tiny gradients at an optimum to steps of
    about lr, so the pyramid drifts by a few grey levels of grain (measured mean 3.9/255 after
    20 steps, the same in the steered run); the bound 8/255 says "the base, up to grain"."""
    cat = _photo("tabby")
    steered, moved, kept = _steer_and_keep(lambda **kw: _lite_cfg(
        tmp_path, add=[cat], sub=["word:COFFEE"], **kw))
    _assert_steered_and_kept(moved, kept)
    assert moved["opinion"]["base"]["opinion_text"].startswith("top-5:")
    meta = json.loads((steered / "config.json").read_text())
    assert meta["add"] == [{"kind": "file", "value": cat}]
    assert meta["sub"] == [{"kind": "word", "value": "COFFEE"}]
    assert meta["layers"] == ["stem", "blocks.0", "blocks.2", "blocks.4"]   # shallow defaults


def test_same_seed_same_png(tmp_path):
    model = TINY_CNN
    runs = [run_arithmetic(_cfg(tmp_path, model=model, base="KING", add=["QUEEN"],
                                run_name=f"r{k}", seed=seed))[0]
            for k, seed in enumerate((0, 0, 1))]
    a, b, c = ((r / "final.png").read_bytes() for r in runs)
    assert a == b and a != c


# ----- configuration and bad input ----------------------------------------------------------
def test_determinism_flags():
    assert parse_cfg(ArithmeticCFG, []).deterministic is True
    assert parse_cfg(ArithmeticCFG, ["--no_determinism"]).deterministic is False
    assert parse_cfg(ArithmeticCFG, ["--no-deterministic"]).deterministic is False
    assert parse_cfg(ArithmeticCFG, ["--hard_determinism"]).hard_determinism is True


@pytest.mark.parametrize("args, message", [
    (["--base", "/nonexistent/base.png"], "does not exist"),
    (["--base", "KING", "--add", ""], "add[0] is empty"),
    (["--base", "KING", "--sub", "word: "], "empty word"),
    (["--base", ""], "base is empty"),
])
def test_bad_input_is_one_sentence(tmp_path, capsys, args, message):
    argv = args + ["--model", TINY_CNN, "--steps", "2", "--size", "32",
                   "--no-progress", "--out_dir", str(tmp_path)]
    status = main(ArithmeticCFG, run_arithmetic, argv)
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error:") and message in err and "Traceback" not in err


def test_presets_resolve():
    for preset in sorted((ROOT / "vital" / "presets").glob("arithmetic_*.json")):
        parse_cfg(ArithmeticCFG, ["--json_cfg", str(preset)])   # unknown keys would fail


def test_script_runs_end_to_end(tmp_path):
    """class_neurons_fvis_arithmetic.py in a fresh interpreter: words in, the run folder out,
    and the command line (including --no_determinism) in the run's config.json."""
    run_script("class_neurons_fvis_arithmetic.py", "--base", "KING", "--sub", "MAN", "--add",
               "WOMAN", "--no_determinism", "--model", TINY_CNN, "--size", "32", "--steps", "4",
               "--save_steps", "2", "--out_dir", tmp_path / "out", "--run_name", "script",
               "--no-progress", "--device", "cpu", cwd=tmp_path)
    run_dir = tmp_path / "out" / "script"
    data = json.loads((run_dir / "config.json").read_text())["cfg"]
    assert (data["base"], data["sub"], data["add"], data["deterministic"]) == (
        "KING", ["MAN"], ["WOMAN"], False)
    assert _summary(run_dir)["formula"] == "KING - 1*MAN + 1*WOMAN"
    assert json.loads((run_dir / "metrics.json").read_text())["steps_done"] == 4
    assert_png_shows(run_dir / "final.png", (32, 32))
