"""Image parameterisations: tensors to optimise and a function that turns them into RGB.

Every parameterisation returns ``(params, image_fn)``: ``params`` is a list of leaf tensors
(``requires_grad=True``) for the optimiser and ``image_fn()`` renders them as a
``(B, 3, H, W)`` image in ``[0, 1]``. The render loop never knows which one it got.

- ``laplacian``: the toolkit's default (from the public VITAL-for-CLIP fork). A Laplacian pyramid: ``levels`` tensors at sizes
  ``ceil(H / 2^k) x ceil(W / 2^k)``, upsampled (bilinear) to full size, scaled by
  ``level_gain ** k`` and summed; the sum ``z`` is mapped to ``0.5 * (tanh(z) + 1)``.
- ``pixel``: one tensor per pixel, mapped by the same tanh (or clamped to [0, 1]).
- ``pixel_norm``: the official VITAL code's: pixels in the model's normalised space, N(0, 1)
  start, clipped to the valid range after every optimiser step (``image_fn.after_step``).
- ``fft``: Lucid-style spectrum with 1/f scaling and decorrelated colour, sigmoid at the end.
- ``maco``: phase-only (Fel et al., "MACO"): a fixed natural-image magnitude spectrum, an
  optimised phase, clamped to [0, 1].

Common keywords: ``size`` (int or (H, W)), ``batch``, ``init`` (an image (B|1, 3, H, W) or
(3, H, W) in [0, 1]; the rendered image at step 0 then equals it), ``init_scale`` (std of the
random start), ``generator`` (a ``torch.Generator`` for the random start; its device decides
where the noise is drawn), ``device``, ``dtype``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

ImageFn = Callable[[], torch.Tensor]
Param = tuple[list[torch.Tensor], ImageFn]

_ATANH_EPS = 1e-6   # images are clamped to [eps, 1 - eps] before inverting tanh / sigmoid
_FFT_GAIN = 4.0     # Lucid divides the inverse FFT by this so the 1/f start is not saturated

# Square root of the colour correlation matrix of ImageNet (RGB), as measured for Lucid.
# Multiplying decorrelated channels by it restores natural colour correlations.
_COLOR_CORRELATION_SQRT = ((0.26, 0.09, 0.02),
                           (0.27, 0.00, -0.05),
                           (0.27, -0.09, 0.03))


# ---------------------------------------------------------------- shared helpers

def _hw(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return int(h), int(w)


def _leaf(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)  # own storage


def _noise(shape, scale: float, generator, device, dtype) -> torch.Tensor:
    gen_device = generator.device if generator is not None else "cpu"
    z = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float64)
    return _leaf(z * scale, device, dtype)


def _check_init(init: torch.Tensor, batch: int, hw: tuple[int, int]) -> torch.Tensor:
    """Validate an init image; return it as (batch, 3, H, W) float64 in [0, 1]."""
    if init.dim() == 3:
        init = init.unsqueeze(0)  # CHW -> 1CHW
    if init.dim() != 4 or init.shape[1] != 3 or tuple(init.shape[-2:]) != hw:
        raise ValueError(f"init must be (B, 3, {hw[0]}, {hw[1]}) or (3, {hw[0]}, {hw[1]}), "
                         f"got {tuple(init.shape)}")
    if init.shape[0] not in (1, batch):
        raise ValueError(f"init has batch {init.shape[0]}; expected 1 or {batch}")
    return init.detach().to(torch.float64).expand(batch, -1, -1, -1).clamp(0, 1)


def _to_unit(z: torch.Tensor) -> torch.Tensor:
    """R -> (0, 1): 0.5 * (tanh(z) + 1), i.e. sigmoid(2 z)."""
    return 0.5 * (torch.tanh(z) + 1.0)


def _from_unit(img: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_to_unit`` (with clamping so 0 and 1 stay finite)."""
    return torch.atanh((2.0 * img - 1.0).clamp(-1 + _ATANH_EPS, 1 - _ATANH_EPS))


def _resize(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(t.shape[-2:]) == hw:
        return t
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- Laplacian pyramid

def _level_sizes(hw: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    return [(-(-hw[0] // 2 ** k), -(-hw[1] // 2 ** k)) for k in range(levels)]


def _collapse(tensors: list[torch.Tensor], gains: list[float], hw) -> torch.Tensor:
    """Collapse the pyramid coarse to fine: upsample the running sum to the next level's size
    and add that level (scaled by its gain); finally resize to ``hw``. Each level is thus
    upsampled in 2x steps (a smoother kernel than one direct bilinear jump, and half the cost)."""
    if not tensors:
        return 0.0
    acc = None
    for g, t in reversed(list(zip(gains, tensors))):
        acc = g * t if acc is None else _resize(acc, tuple(t.shape[-2:])) + g * t
    return _resize(acc, tuple(hw))


def _decompose(z: torch.Tensor, sizes, gains) -> list[torch.Tensor]:
    """Split ``z`` (B, 3, H, W) into levels whose ``_collapse`` is exactly ``z``.

    Level k > 0 holds the band between the area-downsampled ``z`` at its size and at the next
    coarser size; the finest level takes the remainder, so the sum is exact.
    """
    coarse = [F.adaptive_avg_pool2d(z, s) for s in sizes[1:]]
    bands = [c - _resize(nxt, s) for c, nxt, s in zip(coarse, coarse[1:], sizes[1:])]
    bands = bands + coarse[-1:]                                  # coarsest keeps its content
    bands = [b / g for b, g in zip(bands, gains[1:])]
    finest = z - _collapse(bands, gains[1:], tuple(z.shape[-2:]))
    return [finest] + bands


def laplacian(size, batch: int = 1, levels: int = 4, init: torch.Tensor | None = None,
              init_scale: float = 0.1, level_gain: float = 1.0, init_mode: str = "distribute",
              generator: torch.Generator | None = None, device="cpu",
              dtype: torch.dtype = torch.float32) -> Param:
    """Laplacian pyramid + tanh (the fork's parameterisation; the paper's is ``pixel_norm``).

    ``levels`` tensors (B, 3, ceil(H/2^k), ceil(W/2^k)), k = 0 (finest) .. levels-1. The image is
    ``0.5 * (tanh(z_0) + 1)`` with ``z_k = up(z_{k+1}) + level_gain**k * level_k`` (coarse to fine,
    2x bilinear steps). With Adam every parameter moves
    by about ``lr`` per step, so a coarse value already moves a 2^k x 2^k block; ``level_gain``
    > 1 favours coarse structure further, < 1 damps it.

    Random start: every level ~ N(0, init_scale^2). With ``init``, ``atanh(2 init - 1)`` is
    either split into pyramid bands (``init_mode="distribute"``, so coarse levels start with the
    image's coarse content) or put entirely into the finest level (``"finest"``); either way the
    rendered image equals ``init`` (up to the atanh clamp, ~1e-6).
    """
    hw = _hw(size)
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if init_mode not in ("distribute", "finest"):
        raise ValueError(f"init_mode must be 'distribute' or 'finest', got {init_mode!r}")
    sizes = _level_sizes(hw, levels)
    gains = [float(level_gain) ** k for k in range(levels)]
    if init is None:
        tensors = [_noise((batch, 3) + s, init_scale, generator, device, dtype) for s in sizes]
    else:
        z = _from_unit(_check_init(init, batch, hw))
        parts = _decompose(z, sizes, gains) if init_mode == "distribute" else \
            [z] + [torch.zeros((batch, 3) + s, dtype=z.dtype) for s in sizes[1:]]
        tensors = [_leaf(p, device, dtype) for p in parts]

    def image_fn() -> torch.Tensor:
        return _to_unit(_collapse(tensors, gains, hw))

    return tensors, image_fn


# ---------------------------------------------------------------- plain pixels

def pixel(size, batch: int = 1, init: torch.Tensor | None = None, init_scale: float = 0.1,
          squash: str = "tanh", generator: torch.Generator | None = None, device="cpu",
          dtype: torch.dtype = torch.float32) -> Param:
    """One parameter per pixel and channel.

    ``squash="tanh"``: image = 0.5 * (tanh(p) + 1), p starts ~ N(0, init_scale^2).
    ``squash="clamp"``: image = clamp(p, 0, 1), p starts at 0.5 + N(0, init_scale^2); pixels
    outside [0, 1] get no gradient until the optimiser brings them back (VITAL clips likewise).
    """
    hw = _hw(size)
    if squash not in ("tanh", "clamp"):
        raise ValueError(f"squash must be 'tanh' or 'clamp', got {squash!r}")
    shape = (batch, 3) + hw
    if init is not None:
        img = _check_init(init, batch, hw)
        p = _leaf(_from_unit(img) if squash == "tanh" else img, device, dtype)
    else:
        p = _noise(shape, init_scale, generator, device, dtype)
        if squash == "clamp":
            p = _leaf(p.detach() + 0.5, device, dtype)

    def image_fn() -> torch.Tensor:
        return _to_unit(p) if squash == "tanh" else p.clamp(0.0, 1.0)

    return [p], image_fn


# ---------------------------------------------------------------- pixels in normalised space

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_norm(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch: int = 1, init: torch.Tensor | None = None,
               init_scale: float = 1.0, generator: torch.Generator | None = None, device="cpu",
               dtype: torch.dtype = torch.float32) -> Param:
    """The official VITAL code's parameterisation: one parameter per pixel in the model's
    normalised space, ``p = (image - mean) / std``, starting at N(0, init_scale^2) (the code's
    ``torch.randn``), and after every optimiser step clipped per channel to
    ``[-mean / std, (1 - mean) / std]``, the box that maps back into [0, 1].

    ``image_fn()`` returns ``p * std + mean``; ``image_fn.after_step()`` does the clipping (the
    render loop calls it after each optimiser step). The random start is clipped too (the
    official code clips only after the first step), so every image is in [0, 1].
    """
    hw = _hw(size)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    if init is not None:
        p = _leaf((_check_init(init, batch, hw) - m) / sd, device, dtype)
    else:
        p = _noise((batch, 3) + hw, init_scale, generator, device, dtype)
    m, sd = m.to(device=device, dtype=dtype), sd.to(device=device, dtype=dtype)
    low, high = -m / sd, (1.0 - m) / sd

    def image_fn() -> torch.Tensor:
        # inside the box that after_step keeps p in this is p * sd + m; the clamp only catches
        # rounding at the box's edges, and its gradient is passed straight through, so a pixel
        # on the boundary can move back (a plain clamp would zero its gradient there)
        x = p * sd + m
        return x + (x.clamp(0.0, 1.0) - x).detach()

    @torch.no_grad()
    def after_step() -> None:
        p.copy_(torch.maximum(torch.minimum(p, high), low))

    after_step()
    image_fn.after_step = after_step
    return [p], image_fn


# ---------------------------------------------------------------- Lucid FFT

def _color_matrix(device=None, dtype=torch.float64) -> torch.Tensor:
    """(3, 3) colour correlation square root, columns scaled so the largest has norm 1."""
    m = torch.tensor(_COLOR_CORRELATION_SQRT, dtype=torch.float64)
    m = m / m.norm(dim=0).max()
    return m.to(device=device, dtype=dtype)


def _apply_color(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", m, x)   # per pixel: rgb_i = sum_j m_ij c_j


def _spectrum_scale(hw: tuple[int, int], decay_power: float) -> torch.Tensor:
    """(H, W//2+1) factor 1 / max(|f|, 1/max(H, W))^decay_power, |f| in cycles per pixel."""
    fy = torch.fft.fftfreq(hw[0], dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(hw[1], dtype=torch.float64)[None, :]
    freq = (fy ** 2 + fx ** 2).sqrt()
    return 1.0 / freq.clamp_min(1.0 / max(hw)) ** decay_power


def fft(size, batch: int = 1, init: torch.Tensor | None = None, init_scale: float = 0.01,
        decay_power: float = 1.0, decorrelate: bool = True,
        generator: torch.Generator | None = None, device="cpu",
        dtype: torch.dtype = torch.float32) -> Param:
    """Lucid's Fourier parameterisation.

    The parameter is a real view (B, 3, H, W//2+1, 2) of a complex spectrum. Image:
    ``sigmoid(C @ irfft2(scale * spectrum, norm="ortho") / 4)`` with ``scale`` the 1/f^decay
    weights and ``C`` the normalised colour correlation square root (identity if not
    ``decorrelate``). An ``init`` image is inverted exactly through every step.
    """
    hw = _hw(size)
    scale = _spectrum_scale(hw, decay_power)
    color = _color_matrix() if decorrelate else torch.eye(3, dtype=torch.float64)
    if init is not None:
        logits = torch.logit(_check_init(init, batch, hw), eps=_ATANH_EPS)
        raw = _apply_color(torch.linalg.inv(color), logits) * _FFT_GAIN
        spec = _leaf(torch.view_as_real(torch.fft.rfft2(raw, norm="ortho") / scale), device, dtype)
    else:
        spec = _noise((batch, 3, hw[0], hw[1] // 2 + 1, 2), init_scale, generator, device, dtype)
    scale = scale.to(device=device, dtype=dtype)[..., None]   # (H, W//2+1, 1) over re/im
    color = color.to(device=device, dtype=dtype)

    def image_fn() -> torch.Tensor:
        complex_spec = torch.view_as_complex((scale * spec).contiguous())
        raw = torch.fft.irfft2(complex_spec, s=hw, norm="ortho") / _FFT_GAIN
        return torch.sigmoid(_apply_color(color, raw))

    return [spec], image_fn


# ---------------------------------------------------------------- MACO (phase only)

def magnitude_spectrum(images: torch.Tensor, size=None) -> torch.Tensor:
    """Mean amplitude spectrum (3, H, W//2+1) of real images (N, 3, H, W) in [0, 1].

    ``size`` resizes first (bilinear, antialiased). Uses ``rfft2(norm="ortho")``, the
    convention ``maco`` inverts with, and keeps the DC term (mean brightness).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    images = images.to(torch.float64)
    if size is not None and tuple(images.shape[-2:]) != _hw(size):
        images = F.interpolate(images, size=_hw(size), mode="bilinear", align_corners=False,
                               antialias=True)
    return torch.fft.rfft2(images, norm="ortho").abs().mean(0)


def _maco_raw(magnitude: torch.Tensor, phase: torch.Tensor, hw) -> torch.Tensor:
    """irfft2(magnitude * exp(i phase)) with the DC phase pinned to 0 (positive brightness)."""
    phase = phase.clone()
    phase[..., 0, 0] = 0.0
    return torch.fft.irfft2(torch.polar(magnitude.expand_as(phase), phase), s=hw, norm="ortho")


def maco(size, magnitude: torch.Tensor, batch: int = 1, init: torch.Tensor | None = None,
         generator: torch.Generator | None = None, device="cpu",
         dtype: torch.dtype = torch.float32) -> Param:
    """MACO: optimise only the phase; the amplitude spectrum stays ``magnitude``.

    ``magnitude`` is (3, H, W//2+1), e.g. ``magnitude_spectrum(real_images, size)``. Image:
    ``clamp(irfft2(magnitude * exp(i phase), norm="ortho"), 0, 1)``; the DC phase is pinned to
    0. Away from the clamp, the image's amplitude spectrum equals ``magnitude`` exactly on the
    interior columns 1..W//2-1 (irfft2 keeps only the Hermitian part of columns 0 and W/2).
    Start: the phase of white noise (or of ``init``), which is Hermitian-consistent.
    """
    hw = _hw(size)
    expected = (3, hw[0], hw[1] // 2 + 1)
    if tuple(magnitude.shape) != expected:
        raise ValueError(f"magnitude must be {expected} for size {hw}, got "
                         f"{tuple(magnitude.shape)}; build it with magnitude_spectrum(images, size)")
    if init is not None:
        source = _check_init(init, batch, hw)
    else:
        gen_device = generator.device if generator is not None else "cpu"
        source = torch.randn((batch, 3) + hw, generator=generator, device=gen_device,
                             dtype=torch.float64)
    phase = _leaf(torch.fft.rfft2(source, norm="ortho").angle(), device, dtype)
    magnitude = magnitude.detach().to(device=device, dtype=dtype)

    def image_fn() -> torch.Tensor:
        return _maco_raw(magnitude, phase, hw).clamp(0.0, 1.0)

    return [phase], image_fn


# ---------------------------------------------------------------- registry

PARAMETERISATIONS: dict[str, Callable[..., Param]] = {
    "laplacian": laplacian,
    "pixel": pixel,
    "pixel_norm": pixel_norm,
    "fft": fft,
    "maco": maco,
}


def make_param(name: str, size, **kwargs) -> Param:
    """``PARAMETERISATIONS[name](size, **kwargs)``; an unknown name lists the valid ones."""
    if name not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {name!r}; valid: "
                         f"{', '.join(sorted(PARAMETERISATIONS))}")
    return PARAMETERISATIONS[name](size, **kwargs)
