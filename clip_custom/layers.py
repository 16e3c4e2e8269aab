"""Transformer pieces shared by the image and text towers (OpenAI CLIP layout, batch-first)."""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention

QUICK_GELU_SCALE = 1.702  # OpenAI's sigmoid approximation of GELU: x * sigmoid(1.702 x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as OpenAI does for fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def make_activation(quick_gelu: bool) -> nn.Module:
    """OpenAI models use QuickGELU; some later CLIPs (e.g. LAION's) use exact GELU."""
    return QuickGELU() if quick_gelu else nn.GELU()


def make_mlp(width: int, quick_gelu: bool = True) -> nn.Sequential:
    # named children c_fc, gelu, c_proj: `mlp.gelu` is the post-activation neuron hook point
    return nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(width, 4 * width)),
        ("gelu", make_activation(quick_gelu)),
        ("c_proj", nn.Linear(4 * width, width)),
    ]))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); x is (N, L, D)."""

    def __init__(self, width: int, heads: int, quick_gelu: bool = True):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = make_mlp(width, quick_gelu)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True):
        super().__init__()
        self.width = width
        self.layers = layers
        blocks = [ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)]
        self.resblocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:  # x stays (N, L, D)
            x = block(x, mask)
        return x


def causal_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive (L, L) mask: position i sees positions <= i."""
    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)
