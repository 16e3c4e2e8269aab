"""Augmentations applied to the image before the model sees it.

Deterministic building blocks (``roll``, ``hflip``, ``rescale``) and random transforms
``(img, generator) -> img`` that draw every random number from ``generator`` (a
``torch.Generator``; ``None`` uses torch's global RNG). Same generator state in, same image out.
Images are (B, 3, H, W); one draw is shared by the whole batch (as in VITAL), and the output
keeps the input's size, so a ViT still sees its native resolution.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


# ---------------------------------------------------------------- deterministic

def roll(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Cyclic shift by ``dy`` rows (down) and ``dx`` columns (right)."""
    return torch.roll(img, shifts=(int(dy), int(dx)), dims=(-2, -1))


def hflip(img: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return img.flip(-1)


def _fit(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Centre-crop or pad (reflect, or replicate where reflect is too short) each axis to hw."""
    for axis, target in ((-2, hw[0]), (-1, hw[1])):
        size = t.shape[axis]
        if size > target:
            t = t.narrow(axis, (size - target) // 2, target)
        elif size < target:
            before = (target - size) // 2
            after = target - size - before
            pad = (0, 0, before, after) if axis == -2 else (before, after, 0, 0)
            mode = "reflect" if max(before, after) < size else "replicate"
            t = F.pad(t, pad, mode=mode)
    return t


def rescale(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Resize by ``factor`` (bilinear; antialiased when shrinking), then centre-crop (zoom in)
    or pad by reflection (zoom out) back to the original size."""
    if factor <= 0:
        raise ValueError(f"scale factor must be positive, got {factor}")
    hw = tuple(img.shape[-2:])
    new = (max(1, round(hw[0] * factor)), max(1, round(hw[1] * factor)))
    if new == hw:
        return img
    resized = F.interpolate(img, size=new, mode="bilinear", align_corners=False,
                            antialias=factor < 1)
    return _fit(resized, hw)


# ---------------------------------------------------------------- random draws

def _gen_device(generator) -> torch.device | str:
    return generator.device if generator is not None else "cpu"


def _randint(low: int, high: int, generator) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator,
                             device=_gen_device(generator)).item())


def _uniform(generator) -> float:
    return float(torch.rand((1,), generator=generator, device=_gen_device(generator)).item())


# ---------------------------------------------------------------- random transforms

def random_roll(max_shift: int) -> Transform:
    """Roll by independent integer shifts in [-max_shift, max_shift] along y and x."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")

    def apply(img, generator=None):
        dy = _randint(-max_shift, max_shift, generator)
        dx = _randint(-max_shift, max_shift, generator)
        return roll(img, dy, dx)
    return apply


def random_scale(scales: Sequence[float]) -> Transform:
    """``rescale`` by a factor drawn uniformly from ``scales``."""
    scales = [float(s) for s in scales]
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive factors, got {scales}")

    def apply(img, generator=None):
        return rescale(img, scales[_randint(0, len(scales) - 1, generator)])
    return apply


def random_flip(p: float = 0.5) -> Transform:
    """``hflip`` with probability ``p``."""
    if not 0 <= p <= 1:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")

    def apply(img, generator=None):
        return hflip(img) if _uniform(generator) < p else img
    return apply


def random_noise(std: float) -> Transform:
    """Add N(0, std^2) noise per pixel (not clamped: the model normalises its input anyway)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")

    def apply(img, generator=None):
        noise = torch.randn(img.shape, generator=generator, device=_gen_device(generator),
                            dtype=img.dtype)
        return img + std * noise.to(img.device)
    return apply


def compose(transforms: Sequence[Transform]) -> Transform:
    """Apply ``transforms`` in order, all drawing from the same generator."""
    transforms = list(transforms)

    def apply(img, generator=None):
        for t in transforms:
            img = t(img, generator)
        return img
    return apply


def standard(jitter: int = 8, scales: Sequence[float] | None = (0.95, 1.0, 1.05),
             flip: bool = True, noise: float = 0.0) -> Transform:
    """Roll jitter -> random scale -> horizontal flip -> Gaussian noise; zero/None/False skips."""
    steps = []
    if jitter:
        steps.append(random_roll(jitter))
    if scales and any(s != 1.0 for s in scales):
        steps.append(random_scale(scales))
    if flip:
        steps.append(random_flip(0.5))
    if noise:
        steps.append(random_noise(noise))
    return compose(steps)
