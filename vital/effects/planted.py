"""A neuron whose second-order effect is known, for checking the pipeline without pretrained
weights (issue 28): in an OpenAI-layout CLIP ViT state dict, the attention of block ``layer +
1`` is rewritten so that MLP neuron ``neuron`` of block ``layer`` writes a chosen direction of
the embedding space through every head.

Its second-order effect (``vital.effects.decompose``) through block ``layer + 1`` is
``sum_h sum_t A[h, 0, t] act[t, n] / (s[t] s_post) * G Wo_h Wv_h (g * P w_n)`` with ``w_n`` the
neuron's ``c_proj`` column, ``g`` the block's ``ln_1`` weight, ``P`` the centring and ``G`` the
read-out (``ln_post`` weight, centring, ``proj``). Here ``x = g * P w_n`` becomes one value
dimension of every head (every other value row is made orthogonal to ``x``, so no other value
dimension sees the neuron) and that dimension's out-projection column is ``y`` with
``G y = direction``: every head carries ``direction`` only, so the effect is a multiple of it on
every image. Plant in the second-to-last block: later blocks would add their own paths.
"""
from __future__ import annotations

import torch

__all__ = ["plant_direction"]

_PRE = "visual.transformer.resblocks."


def plant_direction(state_dict: dict, layer: int, neuron: int, direction: torch.Tensor,
                    heads: int, gain: float = 4.0) -> dict:
    """A copy of ``state_dict`` (float64 while computing, float32 out) in which block
    ``layer``'s MLP neuron ``neuron`` writes ``direction`` (E,) into the embedding through
    block ``layer + 1``'s ``heads`` heads; ``gain`` is the norm of the planted out-projection
    columns."""
    sd = {k: v.clone().double() for k, v in state_dict.items()}
    nxt = f"{_PRE}{layer + 1}."
    if nxt + "attn.in_proj_weight" not in sd:
        raise ValueError(f"block {layer} has no later block to plant through")
    width = sd[nxt + "ln_1.weight"].shape[0]
    if width % heads:
        raise ValueError(f"{heads} heads do not divide the width {width}")
    centre = torch.eye(width, dtype=torch.float64) - 1.0 / width
    x = sd[nxt + "ln_1.weight"] * (centre @ sd[f"{_PRE}{layer}.mlp.c_proj.weight"][:, neuron])
    unit = x / x.norm()
    readout = sd["visual.proj"].t() @ torch.diag(sd["visual.ln_post.weight"]) @ centre
    y = torch.linalg.lstsq(readout, direction.double()[:, None]).solution[:, 0]
    value = sd[nxt + "attn.in_proj_weight"][2 * width:]            # a view: edited in place
    value -= (value @ unit)[:, None] * unit[None]
    out = sd[nxt + "attn.out_proj.weight"]
    for h in range(heads):
        row = h * (width // heads)
        value[row] = unit
        out[:, row] = gain * y / y.norm()
    return {k: v.float().contiguous() for k, v in sd.items()}
