"""Second-order effects of CLIP neurons (vital.effects, neuron_effects.py).

The fast computation is checked against a slow, obviously correct reference: plain loops over
heads and tokens that re-run the later blocks with the layer norms' stds and the attention
probabilities frozen at their forward values, the later MLPs bypassed, and only the neuron's
output in the residual stream."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_images
from vital.config import ConfigError
from vital.effects import decompose as dec

ROOT = Path(__file__).resolve().parent.parent


def save_clip(path: Path, width: int = 128, layers: int = 3, patch: int = 8, image: int = 32,
              embed: int = 32, seed: int = 0, scale: float = 0.05) -> Path:
    """A random CLIP ViT with the real vocabulary (tiny text tower), OpenAI layout."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=image)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = CLIP(embed, vision, text, quick_gelu=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            if scale:
                p.add_(scale * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def clip3(tmp_path_factory):
    """3 blocks, 2 heads of 64: the layer-0 neurons pass two later blocks."""
    from vital.models import load_target
    return load_target(str(save_clip(tmp_path_factory.mktemp("clip3") / "clip3.safetensors")))


@pytest.fixture(scope="module")
def clip2(tiny_clip_file):
    from vital.models import load_target
    return load_target(str(tiny_clip_file))


def images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the slow reference

def forward_state(target, x01):
    """Every block's input stream, ln_1 input, full attention probs, MLP outputs, ln_post input."""
    visual = target.module
    state = {"block_in": {}, "probs": {}, "mlp_out": {}, "acts": {}}
    handles = []
    for i, block in enumerate(visual.transformer.resblocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, i=i: state["block_in"].__setitem__(i, a[0].double())))
        handles.append(block.attn.probs.register_forward_hook(
            lambda m, a, o, i=i: state["probs"].__setitem__(i, o.double())))
        handles.append(block.mlp.register_forward_hook(
            lambda m, a, o, i=i: state["mlp_out"].__setitem__(i, o.double())))
        handles.append(block.mlp.gelu.register_forward_hook(
            lambda m, a, o, i=i: state["acts"].__setitem__(i, o.double())))
    handles.append(visual.ln_post.register_forward_pre_hook(
        lambda m, a: state.__setitem__("post_in", a[0].double())))
    with torch.no_grad():
        state["embedding"] = target.output(x01).double()
    for h in handles:
        h.remove()
    return state


def std_of(x, eps):
    return (x.var(-1, unbiased=False) + eps).sqrt()


def frozen_ln(ln, z, std, bias):
    """Layer norm with its std frozen: (z - mean z) / std * g (+ b)."""
    out = (z - z.mean(-1, keepdim=True)) / std[..., None] * ln.weight.double()
    return out + ln.bias.double() if bias else out


def frozen_attention_cls(block, y, probs, bias):
    """Class-token output of the attention with frozen probabilities, head by head, token by
    token. y (T, D) is the ln_1 output, probs (H, T, T)."""
    attn = block.attn
    width, heads = y.shape[1], attn.heads
    dh = width // heads
    wv = attn.in_proj_weight.double()[2 * width:]
    bv = attn.in_proj_bias.double()[2 * width:]
    wo, bo = attn.out_proj.weight.double(), attn.out_proj.bias.double()
    out = bo.clone() if bias else torch.zeros(width, dtype=torch.float64)
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        mixed = torch.zeros(dh, dtype=torch.float64)
        for t in range(y.shape[0]):
            v = wv[rows] @ y[t] + (bv[rows] if bias else 0)
            mixed += probs[h, 0, t] * v
        out += wo[:, rows] @ mixed
    return out


def readout(visual, cls, post_std, bias):
    z = frozen_ln(visual.ln_post, cls, post_std, bias)
    return z @ visual.proj.double()


def reference_effects(target, state, b, layer, n):
    """(first, second) of neuron n of block ``layer`` for image b, by the re-run."""
    visual = target.module
    blocks = visual.transformer.resblocks
    w = blocks[layer].mlp.c_proj.weight.double()[:, n]
    r = state["acts"][layer][b, :, n][:, None] * w[None, :]                    # (T, D)
    post_std = std_of(state["post_in"][b], visual.ln_post.eps)
    first = readout(visual, r[0], post_std, bias=False)
    to_cls = torch.zeros_like(r[0])
    for L in range(layer + 1, len(blocks)):
        std = std_of(state["block_in"][L][b], blocks[L].ln_1.eps)
        y = frozen_ln(blocks[L].ln_1, r, std, bias=False)          # only the neuron's output
        to_cls += frozen_attention_cls(blocks[L], y, state["probs"][L][b], bias=False)
    second = readout(visual, to_cls, post_std, bias=False)
    return first, second


def frozen_rerun(target, state, b, layer, stream, constants):
    """The embedding of ``stream`` (T, D), written after block ``layer``, through the frozen
    later blocks (all tokens, so head -> head paths too); with ``constants`` the biases and
    the later MLP outputs of the forward pass are added."""
    visual = target.module
    blocks = visual.transformer.resblocks
    x = stream.clone()
    for L in range(layer + 1, len(blocks)):
        std = std_of(state["block_in"][L][b], blocks[L].ln_1.eps)
        y = frozen_ln(blocks[L].ln_1, x, std, bias=constants)
        attn = blocks[L].attn
        width = x.shape[1]
        v = y @ attn.in_proj_weight.double()[2 * width:].t()
        if constants:
            v = v + attn.in_proj_bias.double()[2 * width:]
        heads = attn.heads
        vh = v.view(-1, heads, width // heads).transpose(0, 1)               # (H, T, dh)
        mixed = (state["probs"][L][b] @ vh).transpose(0, 1).reshape(-1, width)
        x = x + mixed @ attn.out_proj.weight.double().t()
        if constants:
            x = x + attn.out_proj.bias.double() + state["mlp_out"][L][b]
    post_std = std_of(state["post_in"][b], visual.ln_post.eps)
    return readout(visual, x[0], post_std, bias=constants)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fast_effects(target, x01, layer, neurons=()):
    visual = target.module
    width = visual.transformer.resblocks[layer].mlp.c_fc.out_features
    maps = dec.effect_maps(visual, layer, dec.check_neurons(list(neurons), width), chunk=7)
    rec = dec.record(target, x01, [layer])
    coef = dec.coefficients(rec, maps)
    every = slice(None)
    return (dec.first_order(rec, maps, every), dec.second_order(coef, maps, every), rec, maps)


# ---------------------------------------------------------------- equivalence

@pytest.mark.parametrize("layer", [0, 1])
def test_fast_effects_equal_the_frozen_rerun(clip3, layer):
    x = images(2, clip3.input_size)
    neurons = [0, 5, 77, 300, 511]
    first, second, _, _ = fast_effects(clip3, x, layer, neurons)
    state = forward_state(clip3, x)
    for b in range(2):
        for j, n in enumerate(neurons):
            ref_first, ref_second = reference_effects(clip3, state, b, layer, n)
            assert rel(first[b, j].double(), ref_first) < 1e-5
            assert rel(second[b, j].double(), ref_second) < 1e-5


def test_last_block_has_only_a_direct_effect(clip3):
    x = images(1, clip3.input_size)
    first, second, _, maps = fast_effects(clip3, x, 2, [3])
    assert maps.blocks == [] and second.abs().max() == 0
    ref_first, _ = reference_effects(clip3, forward_state(clip3, x), 0, 2, 3)
    assert rel(first[0, 0].double(), ref_first) < 1e-5


def test_components_sum_to_the_embedding(clip2):
    """Two blocks, layer 0: no head -> head path exists, so the embedding is exactly the sum
    of every neuron's first- and second-order effects, the re-run of the rest of the stream
    after block 0 (earlier blocks, c_proj bias), and the constants (biases, later MLPs)."""
    x = images(3, clip2.input_size, seed=1)
    first, second, rec, maps = fast_effects(clip2, x, 0)
    state = forward_state(clip2, x)
    w = clip2.module.transformer.resblocks[0].mlp.c_proj.weight.double()      # (D, 4D)
    for b in range(3):
        neurons_out = state["acts"][0][b] @ w.t()                             # (T, D)
        after = state["block_in"][1][b]
        rest = frozen_rerun(clip2, state, b, 0, after - neurons_out, constants=True)
        total = first[b].double().sum(0) + second[b].double().sum(0) + rest
        assert rel(total, state["embedding"][b]) < 1e-5
        # and the frozen re-run of the whole stream is the real forward (the freezing is exact)
        assert rel(frozen_rerun(clip2, state, b, 0, after, True), state["embedding"][b]) < 1e-5


def test_higher_order_terms_complete_the_sum_with_more_blocks(clip3):
    """Three blocks, layer 0: the neurons' head -> head paths are the remaining terms."""
    x = images(1, clip3.input_size, seed=2)
    first, second, rec, maps = fast_effects(clip3, x, 0)
    state = forward_state(clip3, x)
    w = clip3.module.transformer.resblocks[0].mlp.c_proj.weight.double()
    neurons_out = state["acts"][0][0] @ w.t()
    all_paths = frozen_rerun(clip3, state, 0, 0, neurons_out, constants=False)
    higher = all_paths - first[0].double().sum(0) - second[0].double().sum(0)
    rest = frozen_rerun(clip3, state, 0, 0, state["block_in"][1][0] - neurons_out, True)
    total = first[0].double().sum(0) + second[0].double().sum(0) + higher + rest
    assert rel(total, state["embedding"][0]) < 1e-5
    assert 0 < higher.norm() < second.double().sum(1).norm()   # small, not zero


def test_token_projection_sums_to_the_projected_effect(clip3):
    x = images(2, clip3.input_size)
    first, second, rec, maps = fast_effects(clip3, x, 1)
    direction = F.normalize(torch.randn(second.shape[-1]), dim=0)
    per_token = dec.token_projection(rec, maps, direction)                    # (B, T)
    assert per_token.shape == (2, 1 + (clip3.input_size // 8) ** 2)
    torch.testing.assert_close(per_token.sum(1), second.sum(1) @ direction, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_fast_effects_equal_the_rerun_on_vit_b32(tmp_path):
    from vital.models import load_target
    target = load_target(str(save_clip(tmp_path / "b32.safetensors", width=768, layers=12,
                                       patch=32, image=224, embed=512, scale=0)))
    x = images(1, 224)
    neurons = [0, 1234, 3071]
    first, second, _, _ = fast_effects(target, x, 9, neurons)
    state = forward_state(target, x)
    for j, n in enumerate(neurons):
        ref_first, ref_second = reference_effects(target, state, 0, 9, n)
        assert rel(first[0, j].double(), ref_first) < 1e-5
        assert rel(second[0, j].double(), ref_second) < 1e-5


# ---------------------------------------------------------------- bad input (library level)

def test_bad_layers_and_neurons():
    with pytest.raises(ConfigError, match="no MLP neurons"):
        dec.parse_layer("block.1.attn", 3)
    with pytest.raises(ConfigError, match="blocks 0..2"):
        dec.parse_layer("block.7.mlp", 3)
    assert dec.parse_layer("block.2.mlp", 3) == dec.parse_layer("2", 3) == 2
    with pytest.raises(ConfigError, match="out of range"):
        dec.check_neurons([4, 512], 512)


def test_a_cnn_is_refused(tiny_cnn_target):
    with pytest.raises(ConfigError, match="need a CLIP ViT"):
        dec.clip_vit(tiny_cnn_target)
