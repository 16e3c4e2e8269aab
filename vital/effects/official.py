"""The official code's convention for layer-norm means and biases, for measuring ours against it.

``neuron_effects.py`` centres each neuron's contribution exactly at every layer norm and leaves
all biases in the remainder (``vital.effects.decompose``). The official code
(yossigandelsman/second_order_lens, ``prs_second_order_neurons_hook.py``) instead gives every
component an equal share: at block ``L``'s ``ln_1`` the stream counts ``(1 + 2 L) x N`` parts
(the embedding and two outputs per earlier block, each split into the ``N`` MLP neurons), and
each part is centred by ``mean / ((1 + 2 L) N)`` and receives ``bias / ((1 + 2 L) N)``; the same
for ``c_proj``'s bias (``/ N``), the value bias, the out-projection bias (also ``/ heads``) and
``ln_post`` (``/ ((1 + 2 L)(1 + 2 B) heads N)``, ``B`` blocks). This module computes a neuron's
second-order effect that way, written from the official formulas, so that ``bench/effects.py
--conventions`` can state how far the two conventions are apart; it is not used by a run.

Both conventions give the same effect up to (1) a vector that is the same for every neuron of
the layer on a given image (the shares of the biases and of the stream's mean) and (2) a term
along ``g * 1`` (the layer norm's weight) proportional to the neuron's own mean over channels,
which our exact centring removes and the official centring keeps.
"""
from __future__ import annotations

import contextlib

import torch

from vital.effects.decompose import clip_vit

__all__ = ["OfficialRecords", "record_official", "official_second_order"]


class OfficialRecords:
    """What the official formulas need from one forward pass (B images, T tokens)."""

    def __init__(self):
        self.acts: torch.Tensor | None = None      # (B, T, N) post-GELU activations of the layer
        self.ln1: dict[int, tuple] = {}           # block -> (mean (B, T), std (B, T))
        self.rows: dict[int, torch.Tensor] = {}   # block -> class-token attention row (B, H, T)
        self.post: tuple | None = None            # ln_post (mean (B,), std (B,)), class token
        self.embedding: torch.Tensor | None = None


def _stats(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.mean(-1), (x.var(-1, unbiased=False) + module.eps).sqrt()


@torch.no_grad()
def record_official(target, images01: torch.Tensor, layer: int) -> OfficialRecords:
    """Run the image tower once, recording the official formulas' inputs for ``layer``."""
    visual = clip_vit(target)
    blocks = visual.transformer.resblocks
    rec, handles = OfficialRecords(), []
    handles.append(blocks[layer].mlp.gelu.register_forward_hook(
        lambda m, a, out: setattr(rec, "acts", out.double())))
    for b in range(layer + 1, len(blocks)):
        handles.append(blocks[b].ln_1.register_forward_pre_hook(
            lambda m, a, b=b: rec.ln1.__setitem__(b, _stats(m, a[0]))))
        handles.append(blocks[b].attn.probs.register_forward_hook(
            lambda m, a, out, b=b: rec.rows.__setitem__(b, out[:, :, 0, :].double())))
    handles.append(visual.ln_post.register_forward_pre_hook(
        lambda m, a: setattr(rec, "post", _stats(m, a[0]))))
    with contextlib.ExitStack() as stack:
        for h in handles:
            stack.callback(h.remove)
        rec.embedding = target.output(images01).double()
    return rec


@torch.no_grad()
def official_second_order(target, rec: OfficialRecords, layer: int,
                          neurons: torch.Tensor) -> torch.Tensor:
    """(B, n, E): the second-order effects of ``neurons`` of block ``layer`` as the official
    code computes them (summed over every later block and head), in the official units
    (x 100 / |embedding|)."""
    visual = clip_vit(target)
    blocks = visual.transformer.resblocks
    n_blocks, width = len(blocks), visual.ln_post.weight.shape[0]
    mlp = blocks[layer].mlp
    n_all = mlp.c_proj.weight.shape[1]                                    # N: MLP width
    w = mlp.c_proj.weight.double()[:, neurons]                            # (D, n)
    b_proj = mlp.c_proj.bias.double() / n_all                             # (D,)
    acts = rec.acts[:, :, neurons]                                        # (B, T, n)
    x = torch.einsum("btn,dn->btnd", acts, w) + b_proj                    # each neuron's part
    g_post, beta_post = visual.ln_post.weight.double(), visual.ln_post.bias.double()
    m_post, s_post = (v if v.ndim == 1 else v[:, 0] for v in rec.post)   # class token
    proj = visual.proj.double()
    out = 0
    for L in range(layer + 1, n_blocks):
        block, attn = blocks[L], blocks[L].attn
        heads, dh = attn.heads, width // attn.heads
        share = (1 + 2 * L) * n_all
        mean, std = rec.ln1[L]                                             # (B, T)
        y = block.ln_1.weight.double() * (x - mean[:, :, None, None] / share) \
            / std[:, :, None, None] + block.ln_1.bias.double() / share     # (B, T, n, D)
        wv = attn.in_proj_weight.double()[2 * width:].view(heads, dh, width)
        bv = attn.in_proj_bias.double()[2 * width:].view(heads, dh)
        wo = attn.out_proj.weight.double().view(width, heads, dh)
        v = torch.einsum("btnd,hcd->bhtnc", y, wv) + bv[None, :, None, None] / share
        o = torch.einsum("bht,bhtnc->bhnc", rec.rows[L], v)                # class token
        r = torch.einsum("bhnc,dhc->bhnd", o, wo) \
            + attn.out_proj.bias.double() / (share * heads)               # (B, H, n, D)
        post_share = (1 + 2 * L) * (1 + 2 * n_blocks) * heads * n_all
        z = g_post * (r - m_post[:, None, None, None] / post_share) \
            / s_post[:, None, None, None] + beta_post / post_share
        out = out + (z @ proj).sum(1)                                      # (B, n, E)
    if isinstance(out, int):
        return rec.acts.new_zeros(rec.acts.shape[0], len(neurons), proj.shape[1])
    return 100 * out / rec.embedding.norm(dim=-1)[:, None, None]
