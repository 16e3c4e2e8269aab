"""Positional embeddings of a square grid plus one leading token, resized to another grid.

No cache: the resized tensor is recomputed on every forward (it is cheap), so it always follows the
current parameter values and passes gradients back to them.
"""
import math

import torch
import torch.nn.functional as F


def grid_side(pos: torch.Tensor) -> int:
    """Side G of the square grid stored in pos (1 + G*G, D)."""
    side = math.isqrt(pos.shape[0] - 1)
    if side * side != pos.shape[0] - 1:
        raise ValueError(f"positional embedding of {pos.shape[0]} rows is not 1 + a square grid")
    return side


def resize_grid_embedding(pos: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """pos (1 + G*G, D), leading token first -> (1 + gh*gw, D); the stored tensor at native size.

    Bicubic, align_corners=False, no antialiasing; the leading (class / mean) token is kept as is.
    """
    side = grid_side(pos)
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if (gh, gw) == (side, side):
        return pos
    lead, grid = pos[:1], pos[1:]
    # (G*G, D) -> (1, G, G, D) -> (1, D, G, G)
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
    # (1, D, gh, gw) -> (1, gh, gw, D) -> (gh*gw, D)
    grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
    return torch.cat([lead, grid], dim=0)
