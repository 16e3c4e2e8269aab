"""ViT extras: large visualisations, attention steering, the spatial neural field (tiny ViT)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from helpers import assert_png_equals, tiny_clip_file, write_images
from vital.refs import fields as field_refs
from vital.optvis import attention as att
from vital.optvis import neural_field as nf
from vital.modes import setup, runner
from vital.modes import vit_extras as vx
from vital.modes.class_mode import ClassCFG, run_class
from vital.config import ConfigError
from vital.models import load_target
from vital.refs.images import list_images


@pytest.fixture
def no_opinion(monkeypatch):
    """The live opinion embeds CLIP's 49k-word vocabulary (slow); it is not under test here."""
    monkeypatch.setattr(runner, "make_opinion", lambda *a, **k: None)


def _class_cfg(tmp_path, model, refs, **kw):
    base = dict(model=str(model), target="espresso", ref_dir=str(refs), size=64,
                steps_multires=[2, 2], save_steps=2, out_dir=str(tmp_path / "out"),
                run_name="vx", progress=False, device="cpu", num_ref=4, field_steps=20,
                field_views=2)
    return ClassCFG(**{**base, **kw})


# ---------------------------------------------------------------- large visualisations

def test_class_run_at_twice_native_size_records_every_switch(tmp_path, tiny_clip_file,
                                                              ref_folder, no_opinion):
    run_dir, result = run_class(_class_cfg(tmp_path, tiny_clip_file, ref_folder))
    assert result.stopped is None and result.steps_done == 4
    assert result.image.shape[-2:] == (64, 64)                     # native is 32 px
    assert_png_equals(run_dir / "final.png", result.image)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["ref_sizes"] == {"32": 32, "64": 32}               # auto: native above native
    assert meta["references"]["64"]["size"] == 32
    steer = meta["attn_steering"]
    assert steer["active"] and steer["layers"] == ["block.1.attn"]
    assert set(steer["terms"]) == {"attn_entropy:block.1.attn", "attn_spatial:block.1.attn"}
    assert meta["neural_field"] == {"active": False}
    terms = json.loads((run_dir / "metrics.json").read_text())["steps"][-1]["terms"]
    assert {"attn_entropy:block.1.attn", "attn_spatial:block.1.attn"} <= set(terms)

    run_dir, result = run_class(_class_cfg(tmp_path, tiny_clip_file, ref_folder,
                                           attn_steering=False, neural_field=True,
                                           ref_size="stage"))
    assert result.stopped is None
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["attn_steering"]["active"] is False
    assert meta["ref_sizes"] == {"32": 32, "64": 64}
    field = meta["neural_field"]
    assert field["active"] and field["layers"] == ["embed", "block.0", "block.1"]
    assert all(0 < r < 1 for r in field["artefact_ratio"].values())
    terms = json.loads((run_dir / "metrics.json").read_text())["steps"][-1]["terms"]
    assert not any(k.startswith("attn_") for k in terms)


@pytest.mark.slow
def test_clip_resnet_class_run_at_twice_native_size(tmp_path, ref_folder, no_opinion):
    """The attention pool's positional embedding is interpolated too; steering stays off."""
    path = tiny_clip_file(tmp_path / "tiny_rn.safetensors", "resnet", width=16, image=64)
    run_dir, result = run_class(_class_cfg(tmp_path, path, ref_folder, size=128))
    assert result.stopped is None and result.image.shape[-2:] == (128, 128)
    assert_png_equals(run_dir / "final.png", result.image)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["ref_sizes"] == {"64": 64, "128": 64}
    assert "attn_steering" not in meta                # a CNN run never passes the ViT extras
    terms = json.loads((run_dir / "metrics.json").read_text())["steps"][-1]["terms"]
    assert terms and not any(k.startswith("attn_") for k in terms)


def test_reference_sizes_options():
    target = SimpleNamespace(input_size=32, spec="tiny")
    sizes = [16, 32, 64]

    def pick(choice):
        return setup.reference_sizes(SimpleNamespace(ref_size=choice), target, sizes)
    assert pick("auto") == {16: 16, 32: 32, 64: 32}
    assert pick("stage") == pick("0") == {16: 16, 32: 32, 64: 64}
    assert pick("native") == {16: 32, 32: 32, 64: 32}
    assert pick("48") == {16: 48, 32: 48, 64: 48}
    with pytest.raises(ConfigError, match="auto, stage"):
        pick("huge")


# ---------------------------------------------------------------- attention terms

def _hand_entropy_loss(attn, target_frac):
    """Plain loops: per image, the mean over heads of the class-token entropy over patches."""
    b_count, h_count, length, _ = attn.shape
    total = 0.0
    for b in range(b_count):
        h_sum = 0.0
        for h in range(h_count):
            row = [float(attn[b, h, 0, k]) for k in range(1, length)]
            s = sum(row)
            h_sum += -sum((v / s) * math.log(v / s) for v in row)
        frac = h_sum / h_count / math.log(length - 1)
        total += (frac - target_frac) ** 2
    return total / b_count


def test_entropy_term_equals_hand_computation():
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64).softmax(-1)
    for target in (0.2, 0.9):
        expected = _hand_entropy_loss(attn, target)
        assert att.entropy_loss(attn, target).item() == pytest.approx(expected, rel=1e-9)
        flat = attn.flatten(2)  # what the render loop's features hold: (B, H, L*L)
        assert att.entropy_loss(flat, target).item() == pytest.approx(expected, rel=1e-9)


def _entropy_frac(logits):
    p = att.class_token_attention(logits.softmax(-1))
    return (att.attention_entropy(p).mean() / math.log(p.shape[-1])).item()


@pytest.mark.parametrize("target", [0.3, 0.98])
def test_entropy_gradient_moves_entropy_toward_target(target):
    gen = torch.Generator().manual_seed(1)
    logits = (1.5 * torch.randn(1, 2, 10, 10, generator=gen)).requires_grad_(True)
    start = _entropy_frac(logits)
    assert 0.5 < start < 0.95
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        att.entropy_loss(logits.softmax(-1), target).backward()
        opt.step()
    end = _entropy_frac(logits)
    assert abs(end - target) < 0.5 * abs(start - target)
    assert (end < start) == (target < start)


def _peaked(side, row, col, sharp=6.0):
    """Attention (1, 1, 1+N, 1+N) whose class-token row peaks at patch (row, col)."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    logits = -sharp * ((y - row) ** 2 + (x - col) ** 2).float().flatten() / side
    row0 = torch.cat([torch.zeros(1), logits])  # class token first
    attn = torch.zeros(1, 1, 1 + side * side, 1 + side * side)
    attn[0, 0, :] = row0.softmax(-1)
    return attn


def test_spatial_prior_prefers_a_centred_map():
    side = 7
    prior = att.centre_prior(side, 0.3)
    centre, corner = _peaked(side, 3, 3), _peaked(side, 0, 6)
    uniform = torch.full((1, 1, 50, 50), 1 / 50)
    losses = [att.spatial_loss(a, prior).item() for a in (centre, uniform, corner)]
    assert losses[0] < losses[1] < losses[2]
    mask = torch.zeros(side, side)
    mask[:, :3] = 1.0  # look at the left
    left = att.mask_prior(mask, side)
    assert att.spatial_loss(_peaked(side, 3, 1), left) < att.spatial_loss(_peaked(side, 3, 5), left)


def test_spatial_gradient_pulls_attention_to_the_centre():
    side = 5
    logits = torch.log(_peaked(side, 0, 0)).clamp_min(-30).requires_grad_(True)
    prior = att.centre_prior(side, 0.25)
    c = (torch.arange(side) - (side - 1) / 2).float()
    dist2 = (c[:, None] ** 2 + c[None, :] ** 2).flatten()

    def mean_dist2():
        with torch.no_grad():
            return float((att.class_token_attention(logits.softmax(-1))[0, 0] * dist2).sum())
    start = mean_dist2()
    opt = torch.optim.Adam([logits], lr=0.2)
    for _ in range(30):
        opt.zero_grad()
        att.spatial_loss(logits.softmax(-1), prior).backward()
        opt.step()
    assert mean_dist2() < 0.5 * start


def test_spatial_prior_settings(tmp_path):
    cfg = SimpleNamespace(attn_spatial_prior="none", attn_spatial_weight=1.0, attn_centre_sigma=0.3)
    assert vx.spatial_priors(cfg) is None
    cfg.attn_spatial_prior = "centre"
    assert vx.spatial_priors(cfg).kind == "centre"
    mask = torch.zeros(40, 40, dtype=torch.uint8)
    mask[:, 20:] = 255  # the right half
    Image.fromarray(mask.numpy()).save(tmp_path / "mask.png")
    cfg.attn_spatial_prior = str(tmp_path / "mask.png")
    priors = vx.spatial_priors(cfg)
    q = priors(4).view(4, 4)
    assert priors.kind == "mask" and q[:, :2].sum() == 0 and q[:, 2:].sum() == pytest.approx(1)
    cfg.attn_spatial_prior = str(tmp_path / "missing.png")
    with pytest.raises(ConfigError, match="none | centre"):
        vx.spatial_priors(cfg)


def test_steering_only_for_clip_vits(tiny_cnn_target, tiny_clip_file):
    cfg = ClassCFG()
    obj, layers, meta = vx.attention_steering(cfg, tiny_cnn_target)
    assert obj == 0 and layers == [] and meta["active"] is False
    vit = load_target(str(tiny_clip_file))
    obj, layers, meta = vx.attention_steering(cfg, vit)
    assert layers == ["block.1.attn"] and meta["active"]
    cfg.attn_entropy_weight = cfg.attn_spatial_weight = 0.0
    assert vx.attention_steering(cfg, vit)[0] == 0
    cfg.attn_layers = [5]
    with pytest.raises(ConfigError, match="outside"):
        vx.attention_steering(cfg, vit)


# ---------------------------------------------------------------- neural field

def _planted(n, side, dim, seed):
    """``n`` unit-noise token sets (n, N, D) plus one fixed pattern (smooth + per-patch, RMS 2)."""
    fixed = torch.Generator().manual_seed(9)
    xy = nf.grid_coords(side)
    pattern = (torch.sin(4 * xy[:, :1] + 1) * torch.randn(1, dim, generator=fixed)
               + torch.randn(side * side, dim, generator=fixed))
    pattern = 2 * pattern / pattern.pow(2).mean().sqrt()  # (N, D), RMS 2
    noise = torch.randn(n, side * side, dim, generator=torch.Generator().manual_seed(seed))
    return noise + pattern, pattern


def test_neural_field_recovers_a_planted_position_locked_pattern():
    tokens, pattern = _planted(24, 7, 16, seed=0)
    field = nf.fit_field(tokens, steps=300)
    g = field.grid(7)
    # the slow, obvious least-squares answer: the mean centred map over the images
    mean_map = (tokens - tokens.mean(1, keepdim=True)).mean(0)
    assert (g - mean_map).norm() < 0.05 * mean_map.norm()
    planted = pattern - pattern.mean(0)
    assert (g - planted).norm() < 0.3 * planted.norm()
    # on held-out images: the artefact share falls once the field is removed
    held, _ = _planted(24, 7, 16, seed=1)
    before = nf.artefact_ratio(nf.fit_field(held, steps=300), held)
    cleaned = nf.remove_from_tokens(held, field)
    after = nf.artefact_ratio(nf.fit_field(cleaned, steps=300), cleaned)
    assert before > 0.8 and after < 0.4 * before
    other, _ = _planted(24, 7, 16, seed=2)  # a second independent set for the cross estimate
    scale = nf.feature_rms(held)
    assert nf.locked_rms(held, other) > 0.8 * scale
    assert nf.locked_rms(cleaned, nf.remove_from_tokens(other, field)) < 0.15 * scale
    assert nf.locked_rms(torch.randn(24, 49, 16), torch.randn(24, 49, 16)) < 0.1
    # no artefact at all: the raw mean map is noise of RMS ~0.2; the shrunk fit keeps little
    noise = torch.randn(24, 49, 16, generator=torch.Generator().manual_seed(5))
    assert nf.artefact_ratio(nf.fit_field(noise, steps=100), noise) < 0.08
    # the sort-matching layout: class token untouched, patches cleaned
    x = torch.cat([torch.randn(2, 16, 1), held[:2].transpose(1, 2)], dim=2)  # (B, D, 1+N)
    y = nf.remove_field(x, field)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(y[:, :, 1:], cleaned[:2].transpose(1, 2))


def test_field_on_embed_finds_the_positional_embedding_and_is_cached(tmp_path, tiny_clip_file,
                                                                      isolated_cache):
    target = load_target(str(tiny_clip_file))
    files = list_images(write_images(tmp_path / "refs", 16, size=48, seed=3))
    fields, info = field_refs.fit_fields(target, ["embed"], files, views_per_image=8, steps=100,
                                         progress=False)
    pos = target.module.positional_embedding[1:].detach()  # (N, D), the planted artefact
    pos = pos - pos.mean(0)
    g = fields["embed"].grid(4)
    assert torch.nn.functional.cosine_similarity(g.flatten(), pos.flatten(), dim=0) > 0.85
    assert info["cache_hit"] is False
    again, info2 = field_refs.fit_fields(target, ["embed"], files, views_per_image=8, steps=100,
                                         progress=False)
    assert info2["cache_hit"] is True and info2["artefact_ratio"] == info["artefact_ratio"]
    torch.testing.assert_close(again["embed"].grid(8), fields["embed"].grid(8))
    assert list((isolated_cache / "fields").glob("*.safetensors"))
