"""Inner neuron visualisation: targets, top-k patch references, cache, --auto, end to end on a
tiny CNN, a tiny CLIP ViT and (slow) the embedded EfficientNet-Lite0 at 64 px, bad input, and
inner_neurons_fvis.py run as a script."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from helpers import (TINY_CNN, assert_png_equals, assert_png_shows, read_png, run_script,
                     write_images)
from vital.cli import main
from vital.config import ConfigError, with_recipe
from vital.models import load_target
from vital.modes.inner import InnerCFG, neuron_objective, resolve_target, run_inner
from vital.refs import patches as P

ROOT = Path(__file__).resolve().parent.parent


class RedDetector(nn.Module):
    """Channel 0 = relu(r - g - b): fires on saturated red only."""

    input_size = 16

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [0.0, 1.0, 0.0]])[..., None, None])
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def _red_data(folder, n=6, squares=((3, 24, 8, 255), (1, 0, 32, 120))):
    """Grey noise images (48 px) with red squares (image, top, left, red level) planted."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        arr = rng.integers(90, 130, (48, 48, 3)).astype(np.uint8)
        for image, top, left, red in squares:
            if image == k:
                arr[top:top + 12, left:left + 12] = (red, 0, 0)
        Image.fromarray(arr).save(folder / f"im_{k}.png")
    return sorted(folder.iterdir())


@pytest.fixture
def red():
    return load_target(RedDetector(), mean=(0.0,) * 3, std=(1.0,) * 3)


def _slow_best(target, neuron, files, patch, stride):
    """Reference: every crop scored one at a time with plain loops; (score, corner, file) of
    each image's best crop, best image first."""
    out = []
    for path in files:
        img = P.load_image(path, 48)
        crops = [(r, c) for r in range(0, 48 - patch + 1, stride)
                 for c in range(0, 48 - patch + 1, stride)]
        scored = [(float(_feats(target, neuron, img[None, :, r:r + patch, c:c + patch])), (r, c))
                  for r, c in crops]
        score, corner = max(scored, key=lambda t: t[0])
        out.append((score, corner, str(path)))
    return sorted(out, key=lambda t: -t[0])


def _feats(target, neuron, x):
    with torch.no_grad(), target.hooks([neuron.layer]) as feats:
        target(x)
        return neuron.score(feats[neuron.layer].flatten(2))


def test_top_k_picks_the_planted_patch(tmp_path, red):
    files = _red_data(tmp_path / "data")
    neuron = resolve_target(red, "conv", 0)
    top = P.top_patches(red, neuron, files, 48, 16, 8, 3, progress=False)
    assert top.sources[0].endswith("im_3.png") and top.corners[0] == (24, 8)
    assert top.sources[1].endswith("im_1.png")          # the weaker square comes second
    assert len(set(top.sources)) == 3                   # distinct images
    slow = _slow_best(red, neuron, files, 16, 8)[:3]
    np.testing.assert_allclose(top.scores, [s for s, _, _ in slow], rtol=1e-5)
    assert top.corners == [c for _, c, _ in slow] and top.sources == [p for _, _, p in slow]
    torch.testing.assert_close(top.images[0], P.load_image(files[3], 48)[:, 24:40, 8:24])


def test_small_data_set_and_unreadable_files_warn(tmp_path, red):
    _red_data(tmp_path / "data", n=4)
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    neuron = resolve_target(red, "conv", 0)
    with pytest.warns(UserWarning) as record:
        top = P.reference_patches(red, neuron, tmp_path / "data", size=48, patch=16, stride=8,
                                  k=10, progress=False)
    messages = " ".join(str(w.message) for w in record)
    assert "unreadable" in messages and "only 4 readable images" in messages
    assert len(top.scores) == 4


def test_patch_cache_hits_and_rebuilds_when_corrupt(tmp_path, red, isolated_cache):
    _red_data(tmp_path / "data")
    neuron = resolve_target(red, "conv", 0)
    kw = dict(size=48, patch=16, stride=8, k=3, progress=False)
    first = P.reference_patches(red, neuron, tmp_path / "data", **kw)
    again = P.reference_patches(red, neuron, tmp_path / "data", **kw)
    assert not first.info["cache_hit"] and again.info["cache_hit"]
    torch.testing.assert_close(again.images, first.images)
    assert again.sources == first.sources
    other = P.reference_patches(red, resolve_target(red, "conv", 1), tmp_path / "data", **kw)
    assert not other.info["cache_hit"]                   # keyed by the neuron
    png = next((isolated_cache / "inner_patches" / first.info["key"]).glob("patch_000.png"))
    png.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = P.reference_patches(red, neuron, tmp_path / "data", **kw)
    assert not rebuilt.info["cache_hit"] and rebuilt.sources == first.sources


def test_cached_patches_name_the_files_where_they_are_now(tmp_path, red, isolated_cache,
                                                         monkeypatch):
    """A cache hit from a folder that has moved (or was given relative to another working
    directory) names today's paths, so whole-image references still load; the layer's patch
    scores too."""
    import shutil
    _red_data(tmp_path / "data")
    neuron = resolve_target(red, "conv", 0)
    kw = dict(size=48, patch=16, stride=8, k=3, progress=False)
    first = P.reference_patches(red, neuron, tmp_path / "data", **kw)
    shutil.move(tmp_path / "data", tmp_path / "moved")
    again = P.reference_patches(red, neuron, tmp_path / "moved", **kw)
    assert again.info["cache_hit"]
    assert again.sources == [s.replace(str(tmp_path / "data"), str(tmp_path / "moved"))
                             for s in first.sources]
    assert all(Path(s).is_file() for s in again.sources)
    files = P.data_files(tmp_path / "moved")
    monkeypatch.setattr(P, "score_patches", lambda *a, **k: pytest.fail("scored again"))
    scores = P.layer_scores(red, "conv", neuron.layout, neuron.skip, files, size=48, patch=16,
                            stride=8, progress=False)
    assert scores.files == files


def _mixer():
    """Two 1x1 conv channels that mix the colours: a direction in their space scores patches
    differently from either channel alone."""
    model = RedDetector()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.3, 1.0, 0.2]])[..., None,
                                                                                      None])
    return load_target(model, mean=(0.0,) * 3, std=(1.0,) * 3)


def test_layer_scores_for_every_channel_equal_the_one_neuron_path(tmp_path, isolated_cache):
    target = _mixer()
    files = _red_data(tmp_path / "data")
    direction = tmp_path / "d.npy"
    np.save(direction, np.array([0.6, -0.8]))
    kw = dict(size=48, patch=16, stride=8, score_size=0, crop=0.75)
    layer = P.layer_scores(target, "conv", "BCHW", 0, files, progress=False, **kw)
    assert layer.means.shape == (6, 25, 2)                              # 6 images, 5x5 patches
    for neuron in (resolve_target(target, "conv", 0), resolve_target(target, "conv", 1),
                   resolve_target(target, "conv", direction=str(direction))):
        one = P.top_patches(target, neuron, files, 48, 16, 8, 4, progress=False, crop=0.75)
        shared = P.select_top(layer, neuron, 4)
        assert shared.sources == one.sources and shared.corners == one.corners
        np.testing.assert_allclose(shared.scores, one.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shared.images, one.images)
    # the crop reaches the patches: the best patch is cut from the centre-cropped photo
    best = layer.means[..., 0].flatten().argmax()
    assert P.load_image(files[best // 25], 48, 0.75).shape == (3, 48, 48)


def test_layer_scores_are_cached_and_rebuilt_when_corrupt(tmp_path, isolated_cache, monkeypatch):
    target = _mixer()
    files = _red_data(tmp_path / "data")
    kw = dict(size=48, patch=16, stride=8, progress=False)
    calls = []
    real = P.score_patches
    monkeypatch.setattr(P, "score_patches", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = P.layer_scores(target, "conv", "BCHW", 0, files, **kw)
    again = P.layer_scores(target, "conv", "BCHW", 0, files, **kw)
    assert len(calls) == 1                                    # the second call read the cache
    torch.testing.assert_close(again.means, first.means)
    assert again.files == first.files
    # every neuron and direction of the layer is served by it: no further scoring pass
    for index in (0, 1):
        P.reference_patches(target, resolve_target(target, "conv", index), tmp_path / "data",
                            k=3, **kw)
    assert len(calls) == 1
    entry = next((isolated_cache / P.LAYER_CACHE).rglob("scores.safetensors"))
    entry.write_bytes(entry.read_bytes()[:-16])               # truncated
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = P.layer_scores(target, "conv", "BCHW", 0, files, **kw)
    assert len(calls) == 2
    torch.testing.assert_close(rebuilt.means, first.means)


def test_contact_sheet(tmp_path, red):
    files = _red_data(tmp_path / "data")
    top = P.top_patches(red, resolve_target(red, "conv", 0), files, 48, 16, 8, 4, progress=False)
    sheet = assert_png_shows(P.contact_sheet(top, tmp_path / "sheet.png"))
    assert sheet.shape[1] >= 2 * 96 and sheet.shape[0] >= 2 * 96          # 2 x 2 tiles of 96 px
    first = sheet[4:4 + 96:6, 4:4 + 96:6].astype(np.float32)               # best tile, 6x NEAREST
    expected = (top.images[0] * 255).round().permute(1, 2, 0).numpy()    # the planted red patch
    assert np.abs(first - expected).max() <= 1


def test_bad_targets_say_what_is_valid(tmp_path, tiny_cnn_target):
    with pytest.raises(ValueError, match=r"out of range .* valid 0\.\.31"):
        resolve_target(tiny_cnn_target, "stage2", 32)
    with pytest.raises(ValueError, match="no positions to crop"):
        resolve_target(tiny_cnn_target, "fc", 0)
    with pytest.raises(ValueError, match="(?i)valid layers"):
        resolve_target(tiny_cnn_target, "nope", 0)
    np.save(tmp_path / "short.npy", np.ones(5))
    with pytest.raises(ValueError, match="5 values; the layer has 32"):
        resolve_target(tiny_cnn_target, "stage2", direction=str(tmp_path / "short.npy"))


def test_direction_scores_the_projection(tmp_path, tiny_cnn_target):
    vec = np.zeros(32)
    vec[[3, 5]] = (3.0, 4.0)
    np.save(tmp_path / "d.npy", vec)
    d = resolve_target(tiny_cnn_target, "stage2", direction=str(tmp_path / "d.npy"))
    feats = torch.rand(2, 32, 9)
    torch.testing.assert_close(d.score(feats),
                               0.6 * feats[:, 3].mean(-1) + 0.8 * feats[:, 5].mean(-1))


def test_vit_score_leaves_out_the_class_token(tiny_clip_file):
    target = load_target(str(tiny_clip_file))
    neuron = resolve_target(target, "block.1.mlp", 5)
    assert neuron.skip == 1 and neuron.layout == "BND"
    feats = torch.rand(2, 256, 17)
    feats[:, 5, 0] = 1000.0                           # the class token must not count
    torch.testing.assert_close(neuron.score(feats), feats[:, 5, 1:].mean(-1))
    with pytest.raises(ValueError, match="no positions"):
        resolve_target(target, "ln_post", 0)


def test_neuron_objective_lowers_its_loss(tiny_cnn_target):
    neuron = resolve_target(tiny_cnn_target, "stage2", 7)
    obj = neuron_objective(neuron, scale=0.5)
    img = torch.full((1, 3, 32, 32), 0.5).requires_grad_()
    opt = torch.optim.Adam([img], lr=0.05)
    values = []
    with tiny_cnn_target.hooks(["stage2"]) as feats:
        for _ in range(10):
            tiny_cnn_target(img)
            loss = obj({"features": {"stage2": feats["stage2"].flatten(2)}})
            values.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert obj.names == ["neuron:stage2:7"] and values[-1] < values[0] - 0.05


def test_capped_neuron_term_stops_at_the_cap(tiny_cnn_target):
    """Below the cap the capped term is the plain term; above it, it is flat (no gradient)."""
    neuron = resolve_target(tiny_cnn_target, "stage2", 7)
    feats = torch.rand(1, 16, 64, requires_grad=True)
    score = float(neuron.score(feats.detach()).mean())
    plain = neuron_objective(neuron, scale=2.0)
    below = neuron_objective(neuron, scale=2.0, cap=score / 2.0 + 1.0)
    above = neuron_objective(neuron, scale=2.0, cap=score / 2.0 - 0.1)
    ctx = {"features": {"stage2": feats}}
    torch.testing.assert_close(below(ctx), plain(ctx))
    torch.testing.assert_close(above(ctx), torch.tensor(-(score / 2.0 - 0.1)))
    grad_plain, = torch.autograd.grad(plain(ctx), feats)
    grad_below, = torch.autograd.grad(below(ctx), feats)
    grad_above, = torch.autograd.grad(above(ctx), feats)
    torch.testing.assert_close(grad_below, grad_plain)
    assert grad_plain.abs().sum() > 0 and grad_above.abs().sum() == 0


def _cfg(tmp_path, data, **kw):
    base = dict(model=TINY_CNN, layer="stage2", neuron=3,
                data_dir=str(data), num_ref=4, data_size=40, patch_size=20, ref_rank="patch", size=32,
                steps_multires=[3, 4], save_steps=4, out_dir=str(tmp_path / "out"),
                run_name="t", progress=False, device="cpu")
    base.update(kw)
    return InnerCFG(**base)


def test_no_match_own_layer_matches_only_below(tmp_path):
    """--no-match_own_layer (the official code's layers) leaves the unit's own layer out; a layer
    listed in --layers above the unit is dropped with a warning either way."""
    data = write_images(tmp_path / "data", 6)
    run_dir, _ = run_inner(_cfg(tmp_path, data, match_own_layer=False, steps_multires=[1, 1],
                                save_steps=0))
    assert json.loads((run_dir / "config.json").read_text())["layers"] == ["stem", "stage1"]
    with pytest.warns(UserWarning, match="not below"):
        run_dir, _ = run_inner(_cfg(tmp_path, data, layer="stage1", layers=["stem", "stage2"],
                                    steps_multires=[1, 1], save_steps=0, run_name="t2"))
    assert json.loads((run_dir / "config.json").read_text())["layers"] == ["stem", "stage1"]


@pytest.mark.parametrize("rule", ["lrp", "none"])
def test_run_writes_the_run_folder(tmp_path, rule):
    data = write_images(tmp_path / "data", 6)
    run_dir, result = run_inner(_cfg(tmp_path, data, relevance=rule))
    assert result.steps_done == 7 and run_dir.parent.name == "out"
    for name in ("neuron.json", "config.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert_png_equals(run_dir / "final.png", result.image)
    with Image.open(run_dir / "final_alpha.png") as alpha:
        assert alpha.mode == "RGBA" and alpha.getchannel("A").getextrema()[1] == 255
    assert (read_png(run_dir / "final_alpha.png") == read_png(run_dir / "final.png")).all()
    assert (assert_png_shows(run_dir / "steps" / "step_0004.png", (32, 32))
            != read_png(run_dir / "final.png")).any()                # 3 more steps after it
    assert_png_shows(run_dir / "references.png")
    terms = json.loads((run_dir / "metrics.json").read_text())["steps"][0]["terms"]
    assert "neuron:stage2:3" in terms and {"sort:stem", "sort:stage1", "sort:stage2"} <= set(terms)
    meta = json.loads((run_dir / "config.json").read_text())
    # the layers below the unit and (--match_own_layer, the default) the unit's own layer
    assert meta["mode"] == "inner" and meta["layers"] == ["stem", "stage1", "stage2"]
    assert len(meta["references"]["sources"]) == 4 and meta["relevance"] == rule
    report = json.loads((run_dir / "neuron.json").read_text())
    assert len(report["visualisation"]) == 1 and len(report["references"]) == 4


def test_same_seed_same_png(tmp_path):
    data = write_images(tmp_path / "data", 4)
    a, _ = run_inner(_cfg(tmp_path, data, hard_determinism=True, run_name="a"))
    b, _ = run_inner(_cfg(tmp_path, data, hard_determinism=True, run_name="b"))
    assert (a / "final.png").read_bytes() == (b / "final.png").read_bytes()


def test_auto_visualises_the_most_active_neurons(tmp_path, tiny_cnn_target):
    data = write_images(tmp_path / "data", 4)
    dirs, result = run_inner(_cfg(tmp_path, data, auto=2, steps_multires=[2], save_steps=0,
                                  relevance="gradxact"))
    images = torch.stack([P.load_image(p, 40) for p in sorted(data.iterdir())])
    with torch.no_grad(), tiny_cnn_target.hooks(["stage2"]) as feats:
        tiny_cnn_target(images)
        expected = feats["stage2"].mean((0, 2, 3)).topk(2).indices.tolist()
    metas = [json.loads((d / "config.json").read_text()) for d in dirs]
    assert [m["neuron"] for m in metas] == expected and [m["auto"]["rank"] for m in metas] == [0, 1]
    assert result.stopped is None


@pytest.mark.parametrize("args, message", [
    (["--neuron", "99"], "valid 0..31"),
    (["--layer", "fc"], "no positions"),
    (["--data_dir", "/nonexistent/folder"], "does not exist"),
    (["--ref_rank", "patch", "--patch_size", "500"], "does not fit"),
    (["--patch_size", "20"], "--ref_rank patch"),
])
def test_bad_input_is_one_sentence(tmp_path, capsys, args, message):
    data = write_images(tmp_path / "data", 2)
    base = ["--model", TINY_CNN, "--layer", "stage2", "--data_dir",
            str(data), "--size", "32", "--steps", "2", "--no-progress", "--device", "cpu",
            "--out_dir", str(tmp_path / "out")]
    status = main(InnerCFG, run_inner, base + args)
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error:") and message in err and "Traceback" not in err


def test_tiny_vit_end_to_end(tmp_path, tiny_clip_file, monkeypatch):
    from vital.models import opinion
    from vital.modes import runner as pipeline
    # the opinion over the full 49k-word vocabulary is tested in test_class_clip; a few words here
    monkeypatch.setattr(pipeline, "make_opinion", lambda target, *a, **k: opinion.ClipOpinion(
        target, [], words=["bird", "wing", "neck"], progress=False))
    data = write_images(tmp_path / "data", 4, size=40)
    cfg = _cfg(tmp_path, data, model=str(tiny_clip_file), layer="block.1.mlp", neuron=5,
               data_size=32, patch_size=16, num_ref=3, steps_multires=[2, 2], save_steps=2,
               prompts_file="")
    run_dir, result = run_inner(cfg)
    meta = json.loads((run_dir / "config.json").read_text())
    assert result.steps_done == 4 and meta["layers"] == ["embed", "block.0", "block.1.mlp"]
    terms = json.loads((run_dir / "metrics.json").read_text())["steps"][-1]["terms"]
    assert "neuron:block.1.mlp:5" in terms and "sort:block.0" in terms
    assert_png_shows(run_dir / "references.png")
    opinion_words = json.loads((run_dir / "metrics.json").read_text())["final_opinion"]["opinion"]
    assert {w for w, _ in opinion_words} == {"bird", "wing", "neck"}


@pytest.mark.slow   # the fast suite: the tiny CNN and tiny ViT runs above
def test_embedded_model_end_to_end_at_64px(tmp_path):
    data = write_images(tmp_path / "data", 4, size=64)
    cfg = _cfg(tmp_path, data, model="efficientnet-lite0", layer="blocks.2", neuron=10,
               data_size=64, patch_size=32, num_ref=2, size=64, steps_multires=[1, 2],
               save_steps=3)
    run_dir, result = run_inner(cfg)
    meta = json.loads((run_dir / "config.json").read_text())
    assert result.steps_done == 3 and meta["layers"] == ["stem", "blocks.0", "blocks.2"]   # + own layer
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"


def test_script_runs_end_to_end(tmp_path):
    """inner_neurons_fvis.py in a fresh interpreter, as a user runs it: the run folder with the
    visualisation and its reference patches."""
    data = write_images(tmp_path / "data", 4)
    proc = run_script("inner_neurons_fvis.py", "--model", TINY_CNN, "--layer", "stage2",
                      "--neuron", "3", "--data_dir", data, "--num_ref", "2", "--data_size", "40",
                      "--size", "32", "--steps", "3", "--out_dir",
                      tmp_path / "out", "--run_name", "script", "--no-progress", "--device",
                      "cpu", cwd=tmp_path)
    run_dir = tmp_path / "out" / "script"
    assert str(run_dir) in proc.stdout
    report = json.loads((run_dir / "neuron.json").read_text())
    assert len(report["references"]) == 2
    assert json.loads((run_dir / "metrics.json").read_text())["steps_done"] == 3
    assert_png_shows(run_dir / "final.png", (32, 32))
    assert_png_shows(run_dir / "references.png")


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "vital" / "presets").glob("inner_*.json")))
def test_presets_parse(preset):
    from vital.config import parse_cfg
    from vital.optvis.relevance import RULES
    cfg = parse_cfg(InnerCFG, ["--json_cfg", str(ROOT / "vital" / "presets" / preset)])
    assert cfg.layer and cfg.data_dir == "references"
    assert cfg.relevance in RULES
    if cfg.recipe == "paper":   # the official code: layers below the unit, its LRP rule
        assert cfg.relevance == "lrp_paper" and not cfg.match_own_layer
    else:   # the measured inner defaults (docs/inner.md): own layer, no relevance weighting
        assert cfg.relevance == "none" and cfg.match_own_layer


def test_auto_prompt_ranks_by_attribution(tmp_path, tiny_clip_file, tiny_cnn_target):
    import torch.nn.functional as F
    from vital.modes.inner import rank_neurons
    from vital.models.classnames import encode_texts
    data = write_images(tmp_path / "data", 1, size=32)
    files = sorted(data.iterdir())
    with pytest.raises(ValueError, match="needs a CLIP"):
        rank_neurons(tiny_cnn_target, resolve_target(tiny_cnn_target, "stage2", 0), files, 32,
                     prompt="a bird")
    target = load_target(str(tiny_clip_file))
    neuron = resolve_target(target, "block.0.mlp", 0)
    attr = rank_neurons(target, neuron, files, 32, prompt="a bird")       # (256,)
    channel = int(attr.abs().argmax())
    text = encode_texts(target.clip, ["a bird"], "cpu")[0]
    image = P.load_image(files[0], 32)[None]

    def cosine(eps):   # scale the channel's patch-token activations by 1 + eps
        def edit(out):
            out = out.clone()
            out[:, 1:, channel] *= 1 + eps
            return out
        with torch.no_grad(), target.replaced("block.0.mlp", edit):
            return F.cosine_similarity(target.embed(image).float(), text[None]).item()
    slope = (cosine(1e-3) - cosine(-1e-3)) / 2e-3                        # finite difference
    assert slope == pytest.approx(float(attr[channel]), rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("rule", ["none", "gradxact"])
def test_native_references_are_matched_at_their_own_size(tiny_cnn_target, rule):
    """--ref_res native: every stage matches the references' features at the px they were cut
    at (resampled to the stage's positions), not the references resized to the stage."""
    from vital.modes import setup
    from vital.refs.references import sorted_features
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    cfg = InnerCFG(model=TINY_CNN, progress=False)
    neuron = resolve_target(tiny_cnn_target, "stage2", 1)
    obj, info, _ = setup.relevance_objective(cfg, tiny_cnn_target, ["stem"], [1.0], images,
                                              [16, 32], "stage2", neuron.score, rule,
                                              native=True)
    stage, _, _ = setup.relevance_objective(cfg, tiny_cnn_target, ["stem"], [1.0], images,
                                             [16, 32], "stage2", neuron.score, rule)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with tiny_cnn_target.hooks(["stem"]) as feats:     # with gradients: relevance maps
        tiny_cnn_target(x)
        ctx = {"features": {"stem": feats["stem"].flatten(2)}, "size": 32, "input": x,
               "step": 0}
        native_loss, stage_loss = float(obj(ctx)), float(stage(ctx))
    if rule == "none":   # by value: plain sort matching against the 24 px features
        ref = sorted_features(tiny_cnn_target, ["stem"], images, progress=False)["stem"]
        from vital.optvis.losses import sort_matching
        assert abs(native_loss - float(sort_matching(ctx["features"]["stem"], ref))) < 1e-6
    assert abs(native_loss - stage_loss) > 1e-6       # not the references resized to 32 px


class _Planted:
    """Unpickling this would print: a crafted .pt must never run it."""
    def __reduce__(self):
        return (print, ("PLANTED CODE RAN",))


@pytest.mark.parametrize("name, write", [
    ("crafted.pt", lambda p: p.write_bytes(__import__("pickle").dumps(_Planted()))),
    ("list.pt", lambda p: torch.save({"x": [1, 2]}, p)),
    ("bytes.pt", lambda p: p.write_bytes(bytes(range(256)) * 3)),
    ("bytes.safetensors", lambda p: p.write_bytes(bytes(range(256)) * 3)),
    ("empty.npy", lambda p: p.write_bytes(b"")),
    ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)),
    ("zero.npy", lambda p: np.save(p, np.zeros(0))),
])
def test_bad_direction_files_are_one_sentence(tmp_path, capfd, name, write):
    """Every direction file that is not one vector of numbers: exit 2, one line naming the
    file, no code from it run, no advice to load it unsafely."""
    path = tmp_path / name
    write(path)
    status = main(InnerCFG, run_inner, ["--model", TINY_CNN, "--layer", "stage2",
                                        "--direction", str(path), "--data_dir", str(tmp_path),
                                        "--no-progress"])
    out, err = capfd.readouterr()
    assert status == 2 and "PLANTED" not in out + err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and name in lines[0] and "weights_only" not in err
    assert "Traceback" not in err and "Warning" not in err


def test_units_of_a_layer_start_apart_unless_start_seed(tmp_path):
    """--start unit (default): each unit's start image comes from the seed and its label, so
    the units of one layer start from different images and the same unit from the same one;
    --start seed: every unit from the seed's image."""
    from vital.modes.inner import plan_neuron
    from vital.modes.setup import salted_seed
    data = write_images(tmp_path / "data", 6)
    target = load_target(TINY_CNN)

    def start(neuron, **kw):
        cfg = _cfg(tmp_path, data, neuron=neuron, seed=3, **kw)
        plan = plan_neuron(cfg, target, resolve_target(target, cfg.layer, neuron))
        with torch.no_grad():
            return plan.param[1]().clone()
    a, a_again, b = start(3), start(3), start(7)
    torch.testing.assert_close(a, a_again)
    assert (a - b).abs().mean() > 0.01
    torch.testing.assert_close(start(3, start="seed"), start(7, start="seed"))
    assert salted_seed(3) == 3 and salted_seed(3, "stage2:3") != salted_seed(3, "stage2:7")
    assert 0 <= salted_seed(3, "stage2:3") < 2 ** 63
    from vital.config import ConfigError, check_cfg
    with pytest.raises(ConfigError, match="start.*unit, seed"):
        check_cfg(_cfg(tmp_path, data, start="layer"))


def test_ref_rank_image_takes_the_images_whose_whole_score_is_highest(tmp_path):
    """--ref_rank image (the default): the references are the num_ref images on which the
    unit's score over the whole image (at data_size) is highest, checked against a loop that
    scores one image at a time; --ref_rank patch ranks by the best patch and can differ."""
    data = write_images(tmp_path / "data", 8)
    target = load_target(TINY_CNN)
    neuron = resolve_target(target, "stage2", 3)
    slow = sorted(((float(_feats(target, neuron, P.load_image(f, 40)[None])), str(f))
                   for f in sorted(data.iterdir())), reverse=True)[:4]
    run_dir, _ = run_inner(_cfg(tmp_path, data, ref_rank="image", patch_size=InnerCFG.patch_size,
                                steps_multires=[1, 1], save_steps=0))
    refs = json.loads((run_dir / "config.json").read_text())["references"]
    assert refs["sources"] == [f for _, f in slow] and refs["patch"] == refs["size"] == 40
    np.testing.assert_allclose(refs["scores"], [s for s, _ in slow], rtol=1e-4, atol=1e-5)
    run_dir, _ = run_inner(_cfg(tmp_path, data, steps_multires=[1, 1], save_steps=0,
                                run_name="p"))
    by_patch = json.loads((run_dir / "config.json").read_text())["references"]
    assert by_patch["patch"] == 20 and by_patch["sources"] != refs["sources"]


def test_patch_settings_with_image_ranking_are_one_sentence(tmp_path):
    """Patch settings that whole-image ranking would ignore are refused, the paper recipe's own
    patch settings are not (it ranks by patch)."""
    from vital.modes.inner import check_ranking
    with pytest.raises(ConfigError, match="--stride 8 .* --ref_rank patch"):
        check_ranking(InnerCFG(stride=8))
    check_ranking(InnerCFG(stride=8, ref_rank="patch"))
    with pytest.raises(ConfigError, match="--ref_kind patches .* --ref_rank patch"):
        check_ranking(InnerCFG(ref_kind="patches"))
    check_ranking(InnerCFG(ref_kind="patches", ref_rank="patch"))
    check_ranking(with_recipe(InnerCFG, "paper"))
    with pytest.raises(ConfigError, match="--vis_patch 16 .* ref_rank=patch"):
        from vital.modes.label_visuals import DescribeCFG, _vis_checks
        _vis_checks(DescribeCFG(visualise=2, vis_patch=16))
    _vis_checks(DescribeCFG(visualise=2, vis_patch=16, vis_settings={"ref_rank": "patch"}))
