"""A spatial neural field for position-locked ViT artefacts, after "Denoising Vision Transformers"
(Yang et al. 2024, arXiv 2401.02957).

DVT splits a ViT's patch features into a semantic part that moves with the image content, an
input-independent part G(p) that stays with the patch position p (traced to the positional
embeddings) and a small residual. Here only G is modelled: a coordinate MLP on Fourier features
of the normalised patch centre (x, y) in (-1, 1), shared across images and fitted by least
squares to the patch tokens of many shifted and flipped views of the reference images, so that
content moves between views while G does not:

    tokens(view v, position p) - mean_p tokens(v)  ~  G(p) + residual(v, p)

The least-squares fit of a shared G is the fit to the mean over views, so the MLP is trained on
that (N, D) map, each channel shrunk by its estimated signal share so that a field fitted on few
images does not carry their noise (``shrunk_mean_map``). G has zero mean over the model's
native patch grid (a per-channel constant is not position-locked, and sort matching is blind to
it when removed from both sides). Being a function of continuous coordinates, G can be
evaluated on the larger patch grids of images above the native size (CLIP interpolates its
positional embeddings the same way).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 128         # MLP width
N_FREQS = 64         # random Fourier frequencies
FREQ_SCALE = 0.125   # std of the frequencies in cycles per unit, times the grid side
LR = 1e-2            # peak Adam learning rate of the fit (cosine decay to 0)
SEED = 0             # fits do not depend on the run's seed, so cached fields are shared


def grid_side(positions: int) -> int:
    """Side of a square patch grid of ``positions`` patches."""
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"{positions} patch tokens do not form a square grid")
    return side


def grid_coords(side: int, device=None) -> torch.Tensor:
    """Patch centres of a side x side grid as (side*side, 2) (x, y) in (-1, 1), row-major
    (the token order of a ViT: rows of the image top to bottom, each left to right)."""
    c = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")  # (side, side) each
    return torch.stack([x.flatten(), y.flatten()], dim=1)  # (side, side) -> (side*side, 2)


class FourierField(nn.Module):
    """G(x, y) = scale * MLP([x, y, sin 2pi f.xy, cos 2pi f.xy]) - offset, (N, 2) -> (N, D).

    ``freqs`` (M, 2) are fixed; sizes are read off the tensors in ``from_state_dict``.
    """

    def __init__(self, freqs: torch.Tensor, hidden: int, out_dim: int):
        super().__init__()
        self.register_buffer("freqs", freqs.float())
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("offset", torch.zeros(out_dim))
        width = 2 + 2 * freqs.shape[0]
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, out_dim))
        self._grids: dict = {}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FourierField":
        field = cls(state["freqs"], state["mlp.0.weight"].shape[0], state["offset"].shape[0])
        field.load_state_dict(state)
        return field.eval().requires_grad_(False)

    def encode(self, xy: torch.Tensor) -> torch.Tensor:
        z = 2 * math.pi * xy @ self.freqs.t()  # (N, 2) @ (2, M) -> (N, M)
        return torch.cat([xy, z.sin(), z.cos()], dim=1)  # (N, 2 + 2M)

    def raw(self, xy: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encode(xy))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.scale * self.raw(xy) - self.offset

    @torch.no_grad()
    def grid(self, side: int, device=None, dtype=None) -> torch.Tensor:
        """G on a side x side patch grid, (side*side, D); cached per (side, device, dtype)."""
        device = torch.device(device) if device is not None else self.freqs.device
        key = (side, str(device), dtype)
        if key not in self._grids:
            values = self(grid_coords(side, self.freqs.device))
            self._grids[key] = values.to(device=device, dtype=dtype or values.dtype)
        return self._grids[key]


def centred(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens (n, N, D) minus each image's mean over positions."""
    return tokens - tokens.mean(dim=1, keepdim=True)


def _init_field(side: int, out_dim: int, n_freqs: int, hidden: int) -> FourierField:
    with torch.random.fork_rng(devices=[]):  # seeded init, the caller's RNG state untouched
        torch.manual_seed(SEED)
        freqs = torch.randn(n_freqs, 2) * (FREQ_SCALE * side)
        return FourierField(freqs, hidden, out_dim)


def shrunk_mean_map(tokens: torch.Tensor, views: int = 1) -> torch.Tensor:
    """The mean centred map (N, D) of tokens (n, N, D), image-major with ``views`` views per
    image, each channel shrunk toward 0 by its estimated signal share (a Wiener factor
    1 - noise / power; the noise of the mean is the variance over images / images). Without it
    a field fitted on few images would mostly be their noise, and removing it would add noise."""
    n = tokens.shape[0]
    if views < 1 or n % views:
        raise ValueError(f"{n} token sets are not a whole number of images x {views} views")
    per_image = centred(tokens.float().cpu()).view(n // views, views, *tokens.shape[1:]).mean(1)
    mean = per_image.mean(0)  # (images, N, D) -> (N, D)
    if per_image.shape[0] < 2:
        return mean
    noise = per_image.var(0).mean(0) / per_image.shape[0]  # (D,)
    shrink = (1 - noise / mean.pow(2).mean(0).clamp_min(1e-12)).clamp(0, 1)  # (D,)
    return mean * shrink


def fit_field(tokens: torch.Tensor, steps: int = 300, views: int = 1, n_freqs: int = N_FREQS,
              hidden: int = HIDDEN) -> FourierField:
    """Fit G to patch tokens (n, N, D) on a square grid (image-major, ``views`` per image);
    returns the frozen field.

    Full-batch Adam on the shrunk mean centred map (the least-squares optimum of a shared G,
    see ``shrunk_mean_map``), scaled to unit RMS; ``scale`` and ``offset`` then give G in
    feature units with zero mean over this grid.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (images, patches, channels), got {tuple(tokens.shape)}")
    if steps < 1:
        raise ValueError(f"the field needs at least one fitting step, got {steps}")
    side = grid_side(tokens.shape[1])
    target = shrunk_mean_map(tokens, views)  # (N, D)
    scale = target.pow(2).mean().sqrt().clamp_min(1e-12)
    field = _init_field(side, target.shape[1], n_freqs, hidden)
    _train(field, grid_coords(side), target / scale, steps)
    with torch.no_grad():
        field.scale.fill_(float(scale))
        field.offset.copy_(scale * field.raw(grid_coords(side)).mean(0))
    return field.eval().requires_grad_(False)


@contextlib.contextmanager
def _one_thread():
    """The fit's matrices are tiny: intra-op threads only cost synchronisation (much of it on
    a busy machine), so it runs on one thread and restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(field: FourierField, xy: torch.Tensor, target: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.Adam(field.mlp.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with torch.enable_grad(), _one_thread():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(field.raw(xy), target).backward()
            optimizer.step()
            schedule.step()


def artefact_ratio(field: FourierField, tokens: torch.Tensor) -> float:
    """RMS of G on the tokens' grid over the RMS of the centred patch tokens (n, N, D): the
    share of the features' spatial variation that is locked to the patch position."""
    side = grid_side(tokens.shape[1])
    g = field.grid(side, device="cpu", dtype=torch.float32)
    spread = centred(tokens.float().cpu()).pow(2).mean().sqrt().clamp_min(1e-12)
    return float(g.pow(2).mean().sqrt() / spread)


def feature_rms(tokens: torch.Tensor) -> float:
    """RMS of the centred patch tokens (n, N, D): the scale artefact norms are relative to."""
    return float(centred(tokens.float().cpu()).pow(2).mean().sqrt())


def locked_rms(tokens_a: torch.Tensor, tokens_b: torch.Tensor) -> float:
    """RMS of the position-locked part of two independent sets of patch tokens (n, N, D),
    without a fit: sqrt(<mean_a, mean_b> / (N*D)), mean_x the mean centred map of a set. Noise
    that differs between the sets cancels in the cross product (in expectation), so unlike the
    norm of a fitted field this does not grow when there are few images."""
    a, b = centred(tokens_a.float().cpu()).mean(0), centred(tokens_b.float().cpu()).mean(0)
    return float((a * b).mean().clamp_min(0).sqrt())  # (N, D) . (N, D) / (N*D)


def remove_field(x: torch.Tensor, field: FourierField) -> torch.Tensor:
    """Sort-matching features (B, D, 1+N), class token first, minus G on the patch positions."""
    side = grid_side(x.shape[-1] - 1)
    g = field.grid(side, device=x.device, dtype=x.dtype)  # (N, D)
    return torch.cat([x[..., :1], x[..., 1:] - g.t()], dim=-1)  # (D, N) broadcasts over B


def remove_from_tokens(tokens: torch.Tensor, field: FourierField) -> torch.Tensor:
    """Patch tokens (n, N, D) minus G."""
    return tokens - field.grid(grid_side(tokens.shape[1]), tokens.device, tokens.dtype)
