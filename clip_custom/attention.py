"""Multi-head attention written out (q, k, v, softmax) with named hook points.

Layouts: tokens are batch-first (N, L, D); heads are split as (N, H, L, D/H); attention logits and
probabilities are (N, H, Lq, Lk).

Hook points (see docs/CONTRACTS.md): `logits` and `probs` are nn.Identity modules applied to the
pre-softmax logits and the softmax probabilities. They only run on the written-out path, which is
taken when one of them carries a hook or `need_weights` is True; otherwise the fused
`scaled_dot_product_attention` computes the same result faster.
"""
import torch
import torch.nn.functional as F
from torch import nn


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks_active() -> bool:
    # hooks registered with nn.modules.module.register_module_forward_hook apply to every module
    mod = nn.modules.module
    return bool(getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, length, width = x.shape
    # (N, L, D) -> (N, L, H, D/H) -> (N, H, L, D/H)
    return x.reshape(n, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, heads, length, head_width = x.shape
    # (N, H, L, D/H) -> (N, L, H, D/H) -> (N, L, D)
    return x.transpose(1, 2).reshape(n, length, heads * head_width)


class HookedAttention(nn.Module):
    """Base of every attention here: owns the hook points and the two computation paths."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Identity()  # pre-softmax logits (N, H, Lq, Lk), mask already added
        self.probs = nn.Identity()  # softmax probabilities (N, H, Lq, Lk)
        self.need_weights = False  # True forces the written-out path

    def written_out(self) -> bool:
        return (self.need_weights or _has_hooks(self.logits) or _has_hooks(self.probs)
                or _global_hooks_active())

    def attend(self, q, k, v, mask=None):
        """q (N, H, Lq, d), k and v (N, H, Lk, d), additive mask (Lq, Lk) -> (N, H, Lq, d)."""
        if not self.written_out():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, Lq, Lk)
        if mask is not None:
            logits = logits + mask
        logits = self.logits(logits)
        probs = self.probs(logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype))
        return probs @ v


class Attention(HookedAttention):
    """Self-attention with nn.MultiheadAttention's parameter names (OpenAI state-dict layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"width {width} cannot be split into {heads} attention heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3D)
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))  # each (N, H, L, D/H)
        return self.out_proj(merge_heads(self.attend(q, k, v, mask)))  # (N, L, D)
