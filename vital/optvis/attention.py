"""Loss terms on a CLIP ViT's class-token attention (attention gradient steering).

The class token of the last block(s) builds the image embedding by reading the patches; its
attention row ``probs[:, :, 0, 1:]`` (hooked at ``block.{i}.attn``, renormalised over the N
patches) says where it reads. Two terms act on that row; their gradients flow through the
attention softmax (queries and keys) back into the image, so they shape the spatial composition
rather than the pixel statistics:

- ``attn_entropy:block.{i}`` = ((H - H*) / log N)^2, H the entropy of the row (mean over heads),
  H* = a target fraction of log N. A target below the current entropy makes the class token
  read from fewer patches (one compact object instead of fragments spread everywhere).
- ``attn_spatial:block.{i}`` = (cross-entropy of the row with a prior map q, minus its lowest
  possible value) / log N. Centre prior (a Gaussian): the attention-weighted squared distance
  of the attended patches from the centre. Mask image: q is the mask averaged onto the patch
  grid, so the term is (nearly) the attention mass outside the mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vital.optvis.losses import Objective
from vital.optvis.neural_field import grid_side

_EPS = 1e-12
PRIOR_FLOOR = 0.01   # share of uniform mass mixed into a prior map so its log stays finite


def class_token_attention(attn: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (B, H, L, L), or as sort-matching features (B, H, L*L), class
    token first -> its attention over the N = L-1 patches, renormalised: (B, H, N)."""
    if attn.dim() == 4:
        row = attn[:, :, 0, :]  # (B, H, L): query = class token
    elif attn.dim() == 3:
        length = math.isqrt(attn.shape[-1])
        if length * length != attn.shape[-1]:
            raise ValueError(f"flattened attention of {attn.shape[-1]} entries is not L*L")
        row = attn[..., :length]  # (B, H, L*L) is row-major: the first L entries are query 0
    else:
        raise ValueError(f"attention must be (B, H, L, L) or (B, H, L*L), got {tuple(attn.shape)}")
    patches = row[..., 1:]
    return patches / patches.sum(-1, keepdim=True).clamp_min(_EPS)


def attention_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension of distributions p (..., N)."""
    return -(p * p.clamp_min(_EPS).log()).sum(-1)


def entropy_loss(attn: torch.Tensor, target_frac: float) -> torch.Tensor:
    """Mean over images of ((H - H*) / log N)^2, H = class-token entropy averaged over heads."""
    p = class_token_attention(attn)
    if p.shape[-1] < 2:
        return p.sum() * 0.0  # one patch: entropy is 0 whatever the image
    h = attention_entropy(p).mean(1) / math.log(p.shape[-1])  # (B,) fraction of log N
    return (h - target_frac).pow(2).mean()


def centre_prior(side: int, sigma: float) -> torch.Tensor:
    """A centred Gaussian over a side x side patch grid, std ``sigma`` x the side: (side*side,)."""
    c = (torch.arange(side, dtype=torch.float32) + 0.5) / side - 0.5  # patch centres, side = 1
    d2 = c[:, None].pow(2) + c[None, :].pow(2)  # (side, side), rows = y
    w = torch.exp(-d2 / (2 * sigma ** 2))
    return (w / w.sum()).flatten()  # (side, side) -> (side*side,), the token order


def mask_prior(mask: torch.Tensor, side: int) -> torch.Tensor:
    """A mask (h, w) in [0, 1] averaged onto a side x side grid and normalised: (side*side,)."""
    m = F.adaptive_avg_pool2d(mask[None, None].float(), side)[0, 0].flatten()  # (side*side,)
    if m.sum() <= 0:
        raise ValueError("the attention mask is black everywhere: nothing to prefer")
    return m / m.sum()


def spatial_loss(attn: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """(CE(class-token attention, q) - min_p(-log q)) / log N, mean over images and heads;
    q = prior (N,) mixed with PRIOR_FLOOR of uniform mass. 0 = all attention where q peaks."""
    p = class_token_attention(attn)
    n = p.shape[-1]
    if n < 2:
        return p.sum() * 0.0
    q = (1 - PRIOR_FLOOR) * prior.to(p) + PRIOR_FLOOR / n
    cost = -q.log()
    return (p * (cost - cost.min())).sum(-1).mean() / math.log(n)


class PriorMaps:
    """Prior over patches for any grid side, built once per side: centre or a mask image."""

    def __init__(self, kind: str, sigma: float = 0.3, mask: torch.Tensor | None = None):
        self.kind, self.sigma, self.mask = kind, sigma, mask
        self._maps: dict[int, torch.Tensor] = {}

    def __call__(self, side: int) -> torch.Tensor:
        if side not in self._maps:
            self._maps[side] = (centre_prior(side, self.sigma) if self.mask is None
                                else mask_prior(self.mask, side))
        return self._maps[side]


def _attention(ctx, layer: str) -> torch.Tensor:
    feats = ctx.get("features", {})
    if layer not in feats:
        raise KeyError(f"attention {layer!r} was not hooked; captured: {sorted(feats)}")
    return feats[layer]


def attn_entropy_objective(layer: str, target_frac: float, weight: float = 1.0) -> Objective:
    """Term ``attn_entropy:<layer>`` on ctx["features"][layer] (a ``block.{i}.attn`` layer)."""
    fn = lambda ctx: entropy_loss(_attention(ctx, layer), target_frac)  # noqa: E731
    return weight * Objective(fn, f"attn_entropy:{layer}")


def patch_side(attn: torch.Tensor) -> int:
    """Side of the square patch grid behind attention (B, H, L, L) or (B, H, L*L)."""
    length = attn.shape[-1] if attn.dim() == 4 else math.isqrt(attn.shape[-1])
    return grid_side(length - 1)


def attn_spatial_objective(layer: str, priors: PriorMaps, weight: float = 1.0) -> Objective:
    """Term ``attn_spatial:<layer>``: the spatial prior on the class token's attention."""
    def fn(ctx):
        attn = _attention(ctx, layer)
        return spatial_loss(attn, priors(patch_side(attn)))
    return weight * Objective(fn, f"attn_spatial:{layer}")
