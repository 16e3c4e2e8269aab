"""clip_custom's model against open_clip on random weights of the real (narrowed) architectures,
plus the hook points, the written-out attention and positional-embedding interpolation."""
import json
from pathlib import Path

import open_clip
import pytest
import torch
from timm.layers import resample_abs_pos_embed

from clip_custom import build_model
from clip_custom.posembed import resize_grid_embedding
from helpers import EMBED, open_clip_model, random_images, random_tokens, tiny_clip

TOL = dict(atol=1e-5, rtol=1e-5)
# Narrowed and shortened real architectures: ViT width 128 (two 64-wide heads), 2 blocks, patch 8
# at 32 px; ModifiedResNet one block per stage, width 16 at 64 px; text width 128, 2 blocks,
# context 16, vocabulary 100.
VOCAB, CONTEXT = 100, 16
TEXT = dict(text_width=128, text_layers=2, vocab=VOCAB, context=CONTEXT)


def text_ids(n: int, seed: int = 0) -> torch.Tensor:
    return random_tokens(n, VOCAB, CONTEXT, seed)
OPENAI_CONFIGS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
                  "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


@pytest.fixture(scope="module")
def vit_pair():
    peer = tiny_clip("vit", width=128, **TEXT)
    return peer, build_model(peer.state_dict())


@pytest.fixture(scope="module")
def rn_pair():
    peer = tiny_clip("resnet", width=16, image=64, **TEXT)
    return peer, build_model(peer.state_dict())


@pytest.fixture(params=["vit", "rn"])
def pair(request, vit_pair, rn_pair):
    return {"vit": vit_pair, "rn": rn_pair}[request.param]


def _image_size(model) -> int:
    return model.visual.input_resolution


@torch.no_grad()
def test_encode_image_matches_open_clip(pair):
    peer, ours = pair
    x = random_images(3, _image_size(ours))
    expected = peer.encode_image(x)
    assert expected.abs().max() > 1e-2  # a real, non-degenerate output
    torch.testing.assert_close(ours.encode_image(x), expected, **TOL)


@torch.no_grad()
def test_encode_text_matches_open_clip(pair):
    peer, ours = pair
    tokens = text_ids(4)
    torch.testing.assert_close(ours.encode_text(tokens), peer.encode_text(tokens), **TOL)


@torch.no_grad()
def test_forward_logits_match_open_clip(vit_pair):
    peer, ours = vit_pair
    x, tokens = random_images(2, 32), text_ids(3)
    image_f, text_f, scale = peer(x, tokens)[:3]  # normalised features and exp(logit_scale)
    per_image, per_text = ours(x, tokens)
    torch.testing.assert_close(per_image, scale * image_f @ text_f.t(), **TOL)
    torch.testing.assert_close(per_text, per_image.t())


@torch.no_grad()
def test_wider_vit_matches_open_clip():
    peer = tiny_clip("vit", width=64, layers=1, patch=16, image=64, seed=3, **TEXT)
    ours = build_model(peer.state_dict())
    x = random_images(2, 64, seed=3)
    torch.testing.assert_close(ours.encode_image(x), peer.encode_image(x), **TOL)


@pytest.mark.parametrize("name", OPENAI_CONFIGS)
def test_every_openai_variant_is_read_off_shapes(name):
    """Full-size architectures on the meta device: same keys and shapes, sizes read correctly."""
    path = Path(open_clip.__file__).parent / "model_configs" / f"{name}.json"
    cfg = json.loads(path.read_text())
    with torch.device("meta"):
        peer = open_clip_model({**cfg, "quick_gelu": True})
        ours = build_model(peer.state_dict())
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(peer)
    assert ours.input_resolution == cfg["vision_cfg"]["image_size"]
    assert ours.embed_dim == cfg["embed_dim"]
    assert ours.transformer.resblocks[0].attn.heads == cfg["text_cfg"]["heads"]
    if name.startswith("RN"):
        assert ours.visual.attnpool.num_heads == peer.visual.attnpool.num_heads
    else:
        assert ours.visual.transformer.resblocks[0].attn.heads == \
            peer.visual.transformer.resblocks[0].attn.num_heads


def _attention_modules(model):
    return [m for name, m in model.named_modules() if name.endswith(("attn", "attnpool"))]


@torch.no_grad()
def test_written_out_attention_equals_fast_path(pair, monkeypatch):
    _, ours = pair
    x, tokens = random_images(2, _image_size(ours)), text_ids(2)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    fast = ours.encode_image(x), ours.encode_text(tokens)
    assert len(calls) == len(_attention_modules(ours))  # every attention took the fused path
    calls.clear()
    for m in _attention_modules(ours):
        m.need_weights = True
    try:
        slow = ours.encode_image(x), ours.encode_text(tokens)
    finally:
        for m in _attention_modules(ours):
            m.need_weights = False
    assert not calls
    torch.testing.assert_close(slow, fast, **TOL)


def test_probs_hook_sees_softmax_and_grads_flow(vit_pair):
    _, ours = vit_pair
    attn = ours.visual.transformer.resblocks[1].attn
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["probs"] = output

    handle = attn.probs.register_forward_hook(keep)
    try:
        ours.encode_image(random_images(2, 32)).square().sum().backward()
    finally:
        handle.remove()
        ours.zero_grad(set_to_none=True)
    probs = seen["probs"]
    tokens = 1 + (32 // 8) ** 2
    assert probs.shape == (2, attn.heads, tokens, tokens)  # (B, H, L, L)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, attn.heads, tokens))
    assert probs.grad is not None and probs.grad.abs().sum() > 0


@torch.no_grad()
def test_text_attention_is_causal_and_logits_hook_runs(vit_pair):
    _, ours = vit_pair
    attn = ours.transformer.resblocks[0].attn
    seen = {}
    hooks = [attn.probs.register_forward_hook(lambda m, i, o: seen.setdefault("probs", o)),
             attn.logits.register_forward_hook(lambda m, i, o: seen.setdefault("logits", o))]
    try:
        ours.encode_text(text_ids(2))
    finally:
        for h in hooks:
            h.remove()
    upper = torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).triu(1)
    assert torch.all(seen["probs"][..., upper] == 0)
    assert torch.all(torch.isinf(seen["logits"][..., upper]))


@torch.no_grad()
def test_probs_hook_can_edit_attention(vit_pair):
    """A hook's return value replaces the probabilities (ablation): uniform attention changes the output."""
    _, ours = vit_pair
    x = random_images(2, 32)
    before = ours.encode_image(x)
    attn = ours.visual.transformer.resblocks[0].attn
    handle = attn.probs.register_forward_hook(lambda m, i, o: torch.full_like(o, 1.0 / o.shape[-1]))
    try:
        edited = ours.encode_image(x)
    finally:
        handle.remove()
    assert not torch.allclose(edited, before, atol=1e-4)
    torch.testing.assert_close(ours.encode_image(x), before)


@torch.no_grad()
def test_resnet_attnpool_probs_hook(rn_pair):
    _, ours = rn_pair
    pool = ours.visual.attnpool
    seen = []
    handle = pool.probs.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        ours.encode_image(random_images(2, 64))
    finally:
        handle.remove()
    assert seen[0].shape == (2, pool.num_heads, 1, 1 + (64 // 32) ** 2)  # (B, H, 1, 1+HW)


@torch.no_grad()
def test_mlp_gelu_hook_is_quick_gelu_of_c_fc(vit_pair):
    _, ours = vit_pair
    mlp = ours.visual.transformer.resblocks[0].mlp
    seen = {}
    hooks = [mlp.c_fc.register_forward_hook(lambda m, i, o: seen.setdefault("fc", o)),
             mlp.gelu.register_forward_hook(lambda m, i, o: seen.setdefault("gelu", o))]
    try:
        ours.encode_image(random_images(2, 32))
    finally:
        for h in hooks:
            h.remove()
    width = ours.visual.conv1.out_channels
    assert seen["gelu"].shape == (2, 1 + 16, 4 * width)  # (B, 1+N, 4D)
    torch.testing.assert_close(seen["gelu"], seen["fc"] * torch.sigmoid(1.702 * seen["fc"]))


@torch.no_grad()
def test_embed_hook_is_input_of_ln_pre(vit_pair):
    _, ours = vit_pair
    seen = {}
    hooks = [ours.visual.embed.register_forward_hook(lambda m, i, o: seen.setdefault("embed", o)),
             ours.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.setdefault("pre", i[0]))]
    try:
        ours.encode_image(random_images(2, 32))
    finally:
        for h in hooks:
            h.remove()
    assert seen["embed"].shape == (2, 17, ours.visual.conv1.out_channels)  # (B, 1+N, D)
    torch.testing.assert_close(seen["embed"], seen["pre"])


def test_interpolation_is_identity_at_native_size(vit_pair, rn_pair):
    vit = vit_pair[1].visual
    assert resize_grid_embedding(vit.positional_embedding, (4, 4)) is vit.positional_embedding
    pool = rn_pair[1].visual.attnpool
    assert resize_grid_embedding(pool.positional_embedding, (2, 2)) is pool.positional_embedding


@pytest.mark.parametrize("grid", [(6, 6), (3, 5), (2, 2)])
def test_interpolation_matches_timm(vit_pair, grid):
    pos = vit_pair[1].visual.positional_embedding.detach()  # (1 + 4*4, D)
    expected = resample_abs_pos_embed(pos[None], list(grid), old_size=[4, 4], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)[0]
    torch.testing.assert_close(resize_grid_embedding(pos, grid), expected)


def test_larger_inputs_run_and_train_positions(vit_pair, rn_pair):
    for (_, ours), size in ((vit_pair, 48), (rn_pair, 96)):
        out = ours.encode_image(random_images(2, size))
        assert out.shape == (2, EMBED) and torch.isfinite(out).all()
        out.sum().backward()
        pos = getattr(ours.visual, "attnpool", ours.visual).positional_embedding
        assert pos.grad is not None and pos.grad.abs().sum() > 0
        ours.zero_grad(set_to_none=True)


@torch.no_grad()
def test_shorter_token_sequences_give_the_same_embedding(vit_pair):
    """Causal attention: padding after the end token cannot change its embedding."""
    _, ours = vit_pair
    tokens = torch.randint(1, VOCAB - 1, (3, CONTEXT), generator=torch.Generator().manual_seed(1))
    tokens[:, 9] = VOCAB - 1  # the end token has the highest id
    tokens[:, 10:] = 0
    full = ours.encode_text(tokens)
    torch.testing.assert_close(ours.encode_text(tokens[:, :10]), full, **TOL)
    with pytest.raises(ValueError, match="at most"):
        ours.encode_text(torch.zeros(1, CONTEXT + 1, dtype=torch.long))


def test_not_clip_state_dict_names_missing_keys():
    with pytest.raises(ValueError, match="token_embedding.weight"):
        build_model({"conv.weight": torch.zeros(4, 3, 3, 3)})


def test_wrong_shapes_are_reported(vit_pair):
    peer, _ = vit_pair
    sd = dict(peer.state_dict())
    sd["visual.ln_pre.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="ln_pre"):
        build_model(sd)
