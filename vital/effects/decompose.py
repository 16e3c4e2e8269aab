"""First- and second-order effects of a CLIP ViT's MLP neurons on the image embedding.

Gandelsman, Efros & Steinhardt, "Interpreting the Second-Order Effects of Neurons in CLIP"
(ICLR 2025). Neuron ``n`` of block ``l`` writes ``r_t = act[t, n] * w_n`` into the residual
stream at every token ``t`` (``w_n = c_proj.weight[:, n]``). With every layer norm's std and
every attention probability frozen at their forward-pass values, the rest of the network is
linear in what the stream holds, except the later MLPs (fixed here: they are not on the paths
below). Two paths of ``r`` reach the embedding:

- first order (direct): the class token's ``r_0`` straight through ``ln_post`` and ``proj``;
- second order: ``r_t`` read by one later head ``(L, h)`` (``ln_1`` of block L, value
  projection, the class-token row of the attention, the out-projection slice), written into
  the class token, then through ``ln_post`` and ``proj``; summed over heads and blocks L > l.

    first[n]  = act[0, n] / s_post * G w_n
    second[n] = sum_{L>l, h} sum_t A_L[h, 0, t] act[t, n] / (s_L[t] s_post)
                * G Wo_h Wv_h (g_L * P w_n)
    G = proj^T diag(g_post) P,   P x = x - mean(x)   (the centring of a layer norm)

Biases and means (a choice, see docs/effects.md). A layer norm's centring ``P`` is linear, so
it is applied to each component itself: the centred components sum to the centred stream
exactly, and no neuron needs a "share of the mean". The biases (``c_proj``, ``ln_1``, value,
out-projection, ``ln_post``) belong to no neuron and are left in the remainder: splitting them
equally over the components (as the official code does) adds the same vector to every neuron's
effect, which the per-neuron mean-centring removes before the PCA anyway, but it would distort
effect norms. With this definition, summing over all neurons the first- and second-order
effects, the neurons' higher-order paths (head -> later head), and the terms of everything
else in the stream (earlier blocks, biases, later MLP outputs) reproduces the embedding; the
tests check it.

Cost: the maps ``G Wo_h Wv_h (g_L * P w_n)`` do not depend on the image; they are built once
per layer, ``(N, K, E)`` with ``K`` = later blocks x heads (ViT-B/32 block 9: 2 x 12 x 512 per
neuron, 151 MB for 3072 neurons; block 0: 830 MB). Per image batch the coefficients
``c[b, K, n]`` are one einsum over tokens, and the effects of a neuron chunk another.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from vital.config import ConfigError

__all__ = ["EffectMaps", "Records", "clip_vit", "parse_layer", "check_neurons", "effect_maps",
           "record", "coefficients", "second_order", "shares", "first_order", "token_projection"]

_LAYER_FORMS = "block.N.mlp, a bare block number N, or transformer.resblocks.N.mlp"


def clip_vit(target) -> nn.Module:
    """The visual tower of a CLIP ViT target; anything else is a one-sentence error."""
    if getattr(target, "kind", None) != "clip-vit" or target.clip is None:
        raise ConfigError(f"neuron effects need a CLIP ViT (they follow neurons through its "
                          f"attention heads into the image-text embedding); {target.spec} is a "
                          f"{getattr(target, 'kind', type(target).__name__)} model")
    return target.module


def parse_layer(name: str, n_blocks: int) -> int:
    """``block.9.mlp`` / ``9`` / ``transformer.resblocks.9.mlp[.gelu]`` -> 9."""
    text = str(name).strip()
    match = (re.fullmatch(r"\d+", text) or re.fullmatch(r"block\.(\d+)\.mlp", text)
             or re.fullmatch(r"transformer\.resblocks\.(\d+)\.mlp(?:\.gelu)?", text))
    if match is None:
        raise ConfigError(f"layer {name!r} has no MLP neurons; give an MLP layer as "
                          f"{_LAYER_FORMS} with N in 0..{n_blocks - 1}")
    block = int(match.group(1) if match.groups() else match.group(0))
    if not 0 <= block < n_blocks:
        raise ConfigError(f"layer {name!r}: this model has blocks 0..{n_blocks - 1}")
    return block


def check_neurons(neurons, width: int) -> torch.Tensor:
    """The neuron indices as a tensor (all ``width`` when empty); out of range is an error."""
    if not neurons:
        return torch.arange(width)
    bad = [n for n in neurons if not 0 <= int(n) < width]
    if bad:
        raise ConfigError(f"neuron(s) {bad} out of range: this MLP layer has {width} neurons "
                          f"(0..{width - 1})")
    twice = sorted({int(n) for n in neurons if list(map(int, neurons)).count(int(n)) > 1})
    if twice:
        raise ConfigError(f"neuron(s) {twice} given more than once; give each neuron once")
    return torch.tensor([int(n) for n in neurons])


# ---------------------------------------------------------------- image-independent maps

@dataclass
class EffectMaps:
    """What one unit of a neuron's activation writes into the embedding, per path."""
    layer: int
    neurons: torch.Tensor   # (N,) indices into the layer's MLP
    first: torch.Tensor     # (N, E): G w_n (divide by s_post, times act[0, n])
    second: torch.Tensor    # (N, K, E): G Wo_h Wv_h (g_L * P w_n), K = (block L > layer, head h)
    blocks: list[int]       # the later blocks, in K order (K = block-major, head-minor)
    heads: int
    centred: bool = True    # False: the official shares (no exact centring; ``shares`` adds
                            # each image's share of the means and biases)


def _readout(visual, centre: bool = True) -> torch.Tensor:
    """G = proj^T diag(g_post) P as (E, D): the linearised ln_post + proj without 1/s_post
    (``centre`` False: without P, the official code's convention)."""
    gm = visual.proj.double().t() * visual.ln_post.weight.double()[None, :]   # (E, D)
    return gm - gm.mean(1, keepdim=True) if centre else gm   # Gm P: each row minus its mean


def _block_map(block, cols: torch.Tensor, g_out: torch.Tensor,
               centre: bool = True) -> torch.Tensor:
    """(H, E, N): G Wo_h Wv_h (g * P w) for the columns ``cols`` (D, N) of c_proj (``centre``
    False: g * w)."""
    attn = block.attn
    width = cols.shape[0]
    heads = attn.heads
    if centre:
        cols = cols - cols.mean(0, keepdim=True)
    centred = cols * block.ln_1.weight.double()[:, None]                # (D, N)
    wv = attn.in_proj_weight.double()[2 * width:]                      # (D, D): value rows
    z = (wv @ centred).view(heads, width // heads, -1)                 # (H, dh, N)
    gwo = (g_out @ attn.out_proj.weight.double()).view(-1, heads, width // heads)  # (E, H, dh)
    return torch.einsum("ehd,hdn->hen", gwo, z)


@torch.no_grad()
def effect_maps(visual, layer: int, neurons: torch.Tensor, chunk: int = 512,
                centre: bool = True) -> EffectMaps:
    """The per-path maps of ``neurons`` of block ``layer`` (built in float64, kept float32).
    ``centre`` False builds them under the official code's convention: no exact centring at the
    layer norms (each neuron keeps its own channel mean); ``shares`` then supplies every image's
    share of the means and biases, the same for every neuron."""
    blocks = list(range(layer + 1, len(visual.transformer.resblocks)))
    g_out = _readout(visual, centre)
    heads = visual.transformer.resblocks[0].attn.heads
    firsts, seconds = [], []
    for part in neurons.split(chunk):
        cols = visual.transformer.resblocks[layer].mlp.c_proj.weight.double()[:, part]  # (D, n)
        firsts.append((g_out @ cols).t().float())                               # (n, E)
        per_block = [_block_map(visual.transformer.resblocks[b], cols, g_out, centre)
                     for b in blocks]
        if per_block:
            # [(H, E, n)] -> (B*H, E, n) -> (n, K, E)
            seconds.append(torch.cat(per_block).permute(2, 0, 1).float().contiguous())
        else:
            seconds.append(torch.zeros(len(part), 0, g_out.shape[0]))
    return EffectMaps(layer, neurons.clone(), torch.cat(firsts), torch.cat(seconds), blocks,
                      heads, centre)


# ---------------------------------------------------------------- one forward pass

@dataclass
class Records:
    """What one forward pass leaves for the effects (B images, T tokens)."""
    acts: dict[int, torch.Tensor]   # layer -> post-GELU MLP activations (B, T, 4D)
    rows: dict[int, torch.Tensor]   # block -> class-token attention row A[:, :, 0, :] (B, H, T)
    stds: dict[int, torch.Tensor]   # block -> ln_1 std per token (B, T)
    post_std: torch.Tensor          # (B,): ln_post std of the class token
    embedding: torch.Tensor         # (B, E): the image embedding (not normalised)
    means: dict[int, torch.Tensor] = None   # block -> ln_1 mean per token (B, T)
    post_mean: torch.Tensor = None          # (B,): ln_post mean of the class token


def _std(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return (x.float().var(-1, unbiased=False) + module.eps).sqrt()


def _keep_stats(store: dict, block: int, module: nn.LayerNorm, x: torch.Tensor) -> None:
    """ln_1's input statistics per token: std (both conventions) and mean (official shares)."""
    store["means"][block] = x.float().mean(-1)
    store["stds"][block] = _std(module, x)


@contextlib.contextmanager
def _recording(visual, layers: list[int], first_block: int):
    """Hooks that fill a dict; removed on exit."""
    store = {"acts": {}, "rows": {}, "stds": {}, "means": {}}
    blocks = visual.transformer.resblocks
    handles = []

    def keep(kind, key, fn):
        def hook(module, args, output=None):
            store[kind][key] = fn(module, args, output)
        return hook

    for layer in layers:
        handles.append(blocks[layer].mlp.gelu.register_forward_hook(
            keep("acts", layer, lambda m, a, out: out.float())))
    for b in range(first_block, len(blocks)):
        handles.append(blocks[b].ln_1.register_forward_pre_hook(
            lambda m, a, b=b: _keep_stats(store, b, m, a[0])))
        handles.append(blocks[b].attn.probs.register_forward_hook(
            keep("rows", b, lambda m, a, out: out[:, :, 0, :].float())))
    handles.append(visual.ln_post.register_forward_pre_hook(
        lambda m, a: store.update(post_std=_std(m, a[0]), post_mean=a[0].float().mean(-1))))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
        store.clear()


@torch.no_grad()
def record(target, images01: torch.Tensor, layers: list[int]) -> Records:
    """Run the CLIP image tower once on ``images01`` (B, 3, H, W) in [0, 1], recording what the
    effects of ``layers`` need (later blocks' ln_1 stds and class-token attention rows)."""
    visual = clip_vit(target)
    with _recording(visual, layers, min(layers) + 1) as store:
        embedding = target.output(images01).float()
        return Records(dict(store["acts"]), dict(store["rows"]), dict(store["stds"]),
                       store["post_std"], embedding, dict(store["means"]),
                       store["post_mean"])


# ---------------------------------------------------------------- effects of a batch

def _weights(rec: Records, maps: EffectMaps) -> torch.Tensor:
    """(B, K, T): A_L[h, 0, t] / (s_L[t] s_post) for every later (block, head)."""
    if not maps.blocks:
        b, t = rec.acts[maps.layer].shape[:2]
        return rec.post_std.new_zeros(b, 0, t)
    per_block = [rec.rows[b] / rec.stds[b][:, None, :] for b in maps.blocks]   # [(B, H, T)]
    return torch.cat(per_block, 1) / rec.post_std[:, None, None]


def coefficients(rec: Records, maps: EffectMaps) -> torch.Tensor:
    """(B, K, N): how much of each later head's map each neuron's activations switch on."""
    acts = rec.acts[maps.layer][:, :, maps.neurons.to(rec.post_std.device)]   # (B, T, N)
    return torch.einsum("bkt,btn->bkn", _weights(rec, maps), acts)


def second_order(coef: torch.Tensor, maps: EffectMaps, part: slice,
                 common: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n, E): second-order effects of the neurons ``maps.neurons[part]``; ``common`` (B, E),
    the official convention's share of each image (``shares``), is added to every neuron's."""
    out = torch.einsum("bkn,nke->bne", coef[:, :, part], maps.second[part])
    return out if common is None else out + common[:, None, :].to(out)


@torch.no_grad()
def shares(visual, rec: Records, maps: EffectMaps) -> torch.Tensor:
    """(B, E): what the official code gives every neuron of ``maps.layer`` on each image besides
    its own activations (vital.effects.official: the neuron's share of c_proj's bias, and at
    each later block L and head the share 1 / ((1 + 2 L) N) of ln_1's mean and bias, of the value
    bias, of the out-projection bias (/ heads) and of ln_post's mean and bias
    (/ ((1 + 2 L)(1 + 2 B) heads N))), in embedding units like ``second_order``."""
    blocks = visual.transformer.resblocks
    mlp = blocks[maps.layer].mlp
    n_all = mlp.c_proj.weight.shape[1]
    width = visual.ln_post.weight.shape[0]
    b_proj = mlp.c_proj.bias.double() / n_all                              # (D,)
    g_post, beta_post = visual.ln_post.weight.double(), visual.ln_post.bias.double()
    m_post, s_post = rec.post_mean.double(), rec.post_std.double()          # (B,)
    total = 0
    for L in maps.blocks:
        block, attn = blocks[L], blocks[L].attn
        heads, dh = attn.heads, width // attn.heads
        share = (1 + 2 * L) * n_all
        post_share = share * (1 + 2 * len(blocks)) * heads
        mean, std = rec.means[L].double(), rec.stds[L].double()              # (B, T)
        y = block.ln_1.weight.double() * (b_proj - mean[..., None] / share) / std[..., None] \
            + block.ln_1.bias.double() / share                              # (B, T, D)
        rows = rec.rows[L].double()                                          # (B, H, T)
        wv = attn.in_proj_weight.double()[2 * width:].view(heads, dh, width)
        bv = attn.in_proj_bias.double()[2 * width:].view(heads, dh)
        v = torch.einsum("btd,hcd->bhtc", y, wv) + bv[None, :, None] / share
        o = torch.einsum("bht,bhtc->bhc", rows, v)
        r = torch.einsum("bhc,dhc->bhd", o, attn.out_proj.weight.double().view(width, heads, dh)) \
            + attn.out_proj.bias.double() / (share * heads)                 # (B, H, D)
        z = g_post * (r - m_post[:, None, None] / post_share) / s_post[:, None, None] \
            + beta_post / post_share
        total = total + (z @ visual.proj.double()).sum(1)                   # (B, E)
    if isinstance(total, int):
        return rec.post_std.new_zeros(rec.post_std.shape[0], visual.proj.shape[1])
    return total.float()


def first_order(rec: Records, maps: EffectMaps, part: slice) -> torch.Tensor:
    """(B, n, E): direct effects (class token -> ln_post -> proj) of ``maps.neurons[part]``."""
    idx = maps.neurons[part].to(rec.post_std.device)
    scale = rec.acts[maps.layer][:, 0, idx] / rec.post_std[:, None]           # (B, n)
    return scale[:, :, None] * maps.first[part][None]


def token_projection(rec: Records, maps: EffectMaps, direction: torch.Tensor) -> torch.Tensor:
    """(B, T): the neurons' summed second-order effect coming from each source token, projected
    on ``direction`` (E,): the paper's zero-shot segmentation map (token 0 = class token)."""
    per_head = maps.second @ direction.to(maps.second)                         # (N, K)
    acts = rec.acts[maps.layer][:, :, maps.neurons.to(rec.post_std.device)]   # (B, T, N)
    return torch.einsum("bkt,btn,nk->bt", _weights(rec, maps), acts, per_head)
