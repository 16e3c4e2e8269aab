"""Loss terms: VITAL's sort matching (Algorithm 1), image priors and target terms.

Every objective is a *loss* (lower is better) built from small named callables that add and
scale: ``sort_matching_objective("block.3", q) + 0.1 * tv_objective()``.

The context ``ctx`` that objectives read is a plain dict filled by the render loop:

    ctx["image"]     (B, 3, H, W) in [0, 1]: the parameterisation's output, before augmentation
    ctx["input"]     (B, 3, h, w): what the model saw (augmented, maybe downsampled)
    ctx["features"]  {layer: (B, C, P)}: hooked activations as channels x positions
                     (CNN (C, H*W); ViT tokens (D, N), see vital.models.channels_positions)
    ctx["output"]    (B, K) logits of a classifier or (B, E) image embedding of a CLIP
    (the loop may add "stage", "size", "step"; objectives here do not need them)

``Objective.terms(ctx)`` returns ``{name: weight * value}``; the loss is the sum of those
values and ``objective(ctx)`` returns it. Terms are recorded per step, and a non-finite loss is
traced to the term that caused it.

Batch convention of sort matching: the loss is computed for every image of the batch against
the reference quantiles and averaged. The reference code averages the batch's features before
matching; that is the same for B = 1, but for B > 1 it would let independent images (seeds,
facets, differently jittered copies) share one distribution instead of each matching it.
"""
from __future__ import annotations

import functools
import numbers
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

Ctx = dict
TermFn = Callable[[Ctx], torch.Tensor]


# ---------------------------------------------------------------- sort matching

def resample_quantiles(ref_sorted: torch.Tensor, positions: int) -> torch.Tensor:
    """Resample sorted values (..., Q) to (..., positions) by linear interpolation.

    Output j is the quantile at level j / (positions - 1), as ``torch.quantile`` with linear
    interpolation would give, so the minimum and maximum are kept. ``positions == Q`` returns the
    input unchanged; ``positions == 1`` gives the median.
    """
    q = ref_sorted.shape[-1]
    if positions < 1:
        raise ValueError(f"positions must be >= 1, got {positions}")
    if positions == q:
        return ref_sorted
    if positions == 1:
        where = torch.full((1,), 0.5 * (q - 1), dtype=torch.float64, device=ref_sorted.device)
    else:
        where = torch.linspace(0, q - 1, positions, dtype=torch.float64, device=ref_sorted.device)
    lo = where.floor().long().clamp(max=q - 1)
    hi = (lo + 1).clamp(max=q - 1)
    frac = (where - lo).to(ref_sorted.dtype)
    return ref_sorted[..., lo] * (1 - frac) + ref_sorted[..., hi] * frac


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t.unsqueeze(0)  # CP -> 1CP
    if t.dim() != 3:
        raise ValueError(f"features must be (C, P) or (N, C, P), got {tuple(t.shape)}")
    return t


def sorted_reference(feats) -> torch.Tensor:
    """Per-channel sorted features averaged over reference images: (C, P).

    ``feats`` is (N, C, P), or a list of (C, P_i) / (N_i, C, P_i) tensors with the same C and
    any P_i; every image is resampled to the largest P and counts once in the mean.
    """
    parts = [_as_batch(f) for f in ([feats] if torch.is_tensor(feats) else list(feats))]
    if not parts:
        raise ValueError("sorted_reference needs at least one feature tensor")
    channels = {p.shape[1] for p in parts}
    if len(channels) != 1:
        raise ValueError(f"reference features disagree on channels: {sorted(channels)}")
    positions = max(p.shape[-1] for p in parts)
    sorted_parts = [resample_quantiles(p.detach().sort(dim=-1).values, positions) for p in parts]
    return torch.cat(sorted_parts).mean(0)


def sort_matching(x: torch.Tensor, ref_sorted: torch.Tensor, keys: str = "exact") -> torch.Tensor:
    """VITAL sort matching: mean over B, C, P of (x - ref_sorted[rank of x])^2.

    ``x`` (B, C, P) synthetic features, ``ref_sorted`` (C, Q) reference quantiles (ascending per
    channel); Q != P is resampled with ``resample_quantiles``. Each value is pulled towards the
    reference quantile of its rank: the loss is the mean square of ``rank_residual(x, ref)``
    (the pairs of ``sort(x) - ref``, kept in the positions of ``x``: one sort, no scatter back);
    ``keys`` "q16" ranks on 16-bit quantised values on CPU (``rank_residual``).
    """
    if x.dim() != 3 or ref_sorted.dim() != 2 or x.shape[1] != ref_sorted.shape[0]:
        raise ValueError(f"sort_matching needs x (B, C, P) and ref_sorted (C, Q) with the same C, "
                         f"got {tuple(x.shape)} and {tuple(ref_sorted.shape)}")
    ref = resample_quantiles(ref_sorted.detach().to(device=x.device, dtype=x.dtype), x.shape[-1])
    return _SortMatching.apply(x, ref, keys)   # ref (C, P) broadcasts over B


PARALLEL_MIN_VALUES = 1 << 16   # below this many values per call, threads cost more than they save


def _packed_order(x: np.ndarray) -> np.ndarray:
    """Ascending order along the last axis of float32 rows ``x`` (R, P), ties by position, as a
    strided int32 (R, P) view: each value sorted as one 64-bit key (the float's bits made
    order-preserving in the high word, the position in the low word)."""
    bits = x.view(np.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)          # negative floats: reverse their order
    keys = np.empty(bits.shape, dtype=np.int64)
    words = keys.view(np.int32)                          # little-endian: (low, high) pairs
    words[..., 1::2] = bits
    words[..., 0::2] = np.arange(bits.shape[-1], dtype=np.int32)
    keys.sort(axis=-1)
    return words[..., 0::2]


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    """Threads that sort channel rows in parallel (numpy's sort releases the GIL); one pool per
    worker count, made on first use."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vital-sort")


def _in_chunks(fn, arrays: list[np.ndarray]) -> None:
    """``fn(*chunk)`` over row chunks of ``arrays`` (each (R, P)), in parallel threads when the
    rows hold at least PARALLEL_MIN_VALUES values and torch may use more than one thread."""
    rows = arrays[0].shape[0]
    workers = min(torch.get_num_threads(), rows) if arrays[0].size >= PARALLEL_MIN_VALUES else 1
    bounds = [rows * k // workers for k in range(workers + 1)]
    chunks = [[a[lo:hi] for a in arrays] for lo, hi in zip(bounds, bounds[1:])]
    futures = [_pool(workers).submit(fn, *chunk) for chunk in chunks[1:]]
    fn(*chunks[0])
    for future in futures:
        future.result()


def _packed_ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] < 2 ** 31
            and sys.byteorder == "little")


def sort_order(x: torch.Tensor) -> torch.Tensor:
    """Ascending order along the last axis (int64 indices), ties broken by position.

    On CPU a float32 row is sorted as 64-bit keys (``_packed_order``) with numpy's vectorised
    sort, channel rows in parallel threads: 3-5x faster than ``torch.sort`` or ``np.argsort``
    on feature maps of 112 x 112 positions, and the same order as a stable sort. Other devices
    and dtypes use ``torch.sort(stable=True)``.
    """
    x = x.detach()
    if not _packed_ok(x) or x.numel() == 0:
        return x.sort(dim=-1, stable=True).indices
    rows = x.contiguous().numpy().reshape(-1, x.shape[-1])   # (..., P) -> (R, P)
    order = np.empty(rows.shape, dtype=np.int64)

    def chunk(values, out):
        out[...] = _packed_order(values)
    _in_chunks(chunk, [rows, order])
    return torch.from_numpy(order).view(x.shape)


def sort_values(x: torch.Tensor) -> torch.Tensor:
    """``x.sort(dim=-1).values`` with the same gradient (through ``gather``), using
    ``sort_order``."""
    return x.gather(-1, sort_order(x))


SORT_KEYS = ("exact", "q16")
_Q16_MAX_POSITIONS = 1 << 16     # q16 keys hold the position in 16 bits


def _q16_order(x: np.ndarray) -> np.ndarray:
    """Ascending order along the last axis of float32 rows ``x`` (R, P), P <= 65536, with every
    value quantised to 16 bits of its row's range (ties, and values within 1 / 65535 of the
    range, by position), as an int64 (R, P) array; a row holding NaN or inf is ranked exactly
    (``_packed_order``). One 32-bit key per value (quantised value high, position low): numpy
    sorts 32-bit keys about 3x faster than ``_packed_order``'s 64-bit ones (CPU time,
    48 x 12544 rows: 3 vs 9 ms)."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    span = hi - lo
    finite = np.isfinite(span).ravel()
    with np.errstate(invalid="ignore"):          # rows with NaN / inf are replaced below
        scale = np.float32(65535.0) / np.maximum(span, np.float32(1e-30))
        keys = np.nan_to_num((x - lo) * scale, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    keys = keys.astype(np.uint32)                # 0..65535 (the maximum may round to 65536)
    np.minimum(keys, 65535, out=keys)
    keys <<= 16
    keys |= np.arange(x.shape[-1], dtype=np.uint32)
    keys.sort(axis=-1)
    keys &= 0xFFFF
    order = keys.astype(np.int64)
    if not finite.all():
        order[~finite] = _packed_order(x[~finite])
    return order


def _rank_residual_rows(values: np.ndarray, ref: np.ndarray, out: np.ndarray,
                        keys: str = "exact") -> None:
    """out = values - ref[rank of each value] for rows (R, P); ``ref`` rows ascending. The
    reference values go to their places by flat indexing (3-4x less CPU than
    ``np.put_along_axis`` on a strided index)."""
    rows, width = values.shape
    if keys == "q16" and width <= _Q16_MAX_POSITIONS:
        order = _q16_order(values)
    else:
        order = _packed_order(values).astype(np.int64)
    order += np.arange(rows, dtype=np.int64)[:, None] * width
    out.reshape(-1)[order.reshape(-1)] = ref.reshape(-1)
    np.subtract(values, out, out=out)


def rank_residual(x: torch.Tensor, ref: torch.Tensor, keys: str = "exact") -> torch.Tensor:
    """(B, C, P): every value of ``x`` minus the reference quantile of its rank in its row
    (``ref`` (C, P) ascending, shared by the batch), in the positions of ``x``. Equal to
    ``x - ref.expand_as(x).scatter(-1, sort_order(x), ref)``; on CPU float32 the rows are ranked
    and subtracted in numpy, in parallel threads, without a gather or scatter in torch.
    ``keys="q16"`` ranks 16-bit quantised values there (``_q16_order``: values closer than
    1 / 65535 of their row's range may swap ranks); other devices rank exactly."""
    if keys not in SORT_KEYS:
        raise ValueError(f"sort keys must be one of {SORT_KEYS}, got {keys!r}")
    if not _packed_ok(x) or x.numel() == 0:
        where = torch.empty_like(x).scatter_(-1, sort_order(x), ref.expand_as(x))
        return x.detach() - where
    values = x.detach().contiguous().numpy()
    refs = np.ascontiguousarray(ref.detach().numpy())
    out = np.empty_like(values)
    rows = functools.partial(_rank_residual_rows, keys=keys)
    for b in range(values.shape[0]):                    # the chunks split channels of one image
        _in_chunks(rows, [values[b], refs, out[b]])
    return torch.from_numpy(out)


class _SortMatching(torch.autograd.Function):
    """mean((sort(x) - ref)^2), computed in the positions of x as mean(r^2) with r = x - the
    quantile of each value's rank (``rank_residual``); the hand-written backward is 2 r / n
    (one multiplication instead of autograd's gather / pow / mean chain)."""

    @staticmethod
    def forward(ctx, x, ref, keys="exact"):
        residual = rank_residual(x, ref, keys)
        ctx.save_for_backward(residual)
        flat = residual.view(-1)
        return torch.dot(flat, flat) / flat.numel()

    @staticmethod
    def backward(ctx, grad):
        residual, = ctx.saved_tensors
        return residual * (grad * (2.0 / residual.numel())), None, None


# ---------------------------------------------------------------- image priors

def _neighbour_differences(img: torch.Tensor) -> list[torch.Tensor]:
    """Horizontal, vertical and both diagonal neighbour differences of (B, C, H, W)."""
    return [img[..., :, 1:] - img[..., :, :-1],
            img[..., 1:, :] - img[..., :-1, :],
            img[..., 1:, 1:] - img[..., :-1, :-1],
            img[..., 1:, :-1] - img[..., :-1, 1:]]


def tv(img: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Total variation over the 4 neighbour directions VITAL uses, each a *mean* (not a sum).

    ``p=2``: mean squared difference (VITAL uses the Frobenius norm, which grows with image
    size); ``p=1``: mean absolute difference. Means keep weights independent of resolution.
    """
    if p not in (1, 2):
        raise ValueError(f"tv supports p=1 or p=2, got {p}")
    diffs = _neighbour_differences(img)
    return sum(d.abs().mean() if p == 1 else d.pow(2).mean() for d in diffs)


def l2(img: torch.Tensor, center=0.5) -> torch.Tensor:
    """Mean squared distance of the pixels from ``center``.

    ``center`` is a number or a (3,) per-channel value (e.g. the model's normalisation mean);
    around 0.5 on [0, 1] images this plays the role of VITAL's L2 norm of the normalised input,
    but as a mean so that weights do not depend on the resolution.
    """
    center = torch.as_tensor(center, dtype=img.dtype, device=img.device)
    if center.dim() == 1:
        center = center.view(1, -1, 1, 1)  # C -> 1C11
    return (img - center).pow(2).mean()


# ---------------------------------------------------------------- objectives

class Objective:
    """A weighted sum of named loss terms; combine with ``+``, ``-``, ``*`` and ``/`` by numbers.

    ``terms(ctx)`` -> {name: weight * value}; ``objective(ctx)`` -> their sum. Adding a term to
    itself merges the weights; two different terms with one name are an error (``rename`` one).
    """

    def __init__(self, fn: TermFn, name: str):
        self._terms: tuple[tuple[str, float, TermFn], ...] = ((str(name), 1.0, fn),)

    @classmethod
    def _of(cls, terms) -> "Objective":
        obj = cls.__new__(cls)
        obj._terms = tuple((n, w, f) for n, w, f in terms if w != 0)
        return obj

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self._terms]

    @property
    def weights(self) -> dict[str, float]:
        return {n: w for n, w, _ in self._terms}

    @property
    def name(self) -> str:
        return " + ".join(n if w == 1 else f"{w:g}*{n}" for n, w, _ in self._terms)

    def terms(self, ctx: Ctx) -> dict[str, torch.Tensor]:
        return {n: w * fn(ctx) for n, w, fn in self._terms}

    def __call__(self, ctx: Ctx) -> torch.Tensor:
        values = list(self.terms(ctx).values())
        if not values:
            raise ValueError("the objective has no terms (all weights are zero)")
        return sum(values)

    def rename(self, name: str) -> "Objective":
        if len(self._terms) != 1:
            raise ValueError(f"only a single term can be renamed, this has {self.names}")
        _, w, fn = self._terms[0]
        return Objective._of([(str(name), w, fn)])

    def __add__(self, other) -> "Objective":
        if isinstance(other, numbers.Number) and other == 0:
            return self                     # lets sum([...]) start from 0
        if not isinstance(other, Objective):
            return NotImplemented
        merged = {n: [w, fn] for n, w, fn in self._terms}
        for n, w, fn in other._terms:
            if n in merged and merged[n][1] is not fn:
                raise ValueError(f"two different terms are both named {n!r}; rename one")
            merged.setdefault(n, [0.0, fn])[0] += w
        return Objective._of((n, w, fn) for n, (w, fn) in merged.items())

    __radd__ = __add__

    def __mul__(self, factor) -> "Objective":
        if not isinstance(factor, numbers.Real):
            return NotImplemented
        return Objective._of((n, w * float(factor), fn) for n, w, fn in self._terms)

    __rmul__ = __mul__

    def __truediv__(self, factor) -> "Objective":
        if not isinstance(factor, numbers.Real):
            return NotImplemented
        return self * (1.0 / float(factor))

    def __neg__(self) -> "Objective":
        return self * -1.0

    def __sub__(self, other) -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        return self + (-other)

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def _features(ctx: Ctx, layer: str) -> torch.Tensor:
    feats = ctx.get("features", {})
    if layer not in feats:
        raise KeyError(f"no features for layer {layer!r} in ctx; captured: {sorted(feats)}")
    return feats[layer]


def sort_matching_objective(layer: str, ref_sorted: torch.Tensor, weight: float = 1.0) -> Objective:
    """Term ``sort:<layer>``: sort matching of ctx["features"][layer] against ``ref_sorted``."""
    ref = ref_sorted.detach()
    return weight * Objective(lambda ctx: sort_matching(_features(ctx, layer), ref), f"sort:{layer}")


def sort_matching_objectives(refs: dict[str, torch.Tensor],
                             weights: dict[str, float] | None = None) -> Objective:
    """Sum of ``sort_matching_objective`` over ``refs`` ({layer: (C, Q)}), weights default 1."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(refs))
    if unknown:
        raise ValueError(f"weights given for layers without references: {unknown}; "
                         f"layers: {sorted(refs)}")
    return sum(sort_matching_objective(k, r, weights.get(k, 1.0)) for k, r in refs.items())


def random_positions(x: torch.Tensor, positions: int, generator: torch.Generator | None
                     ) -> torch.Tensor:
    """``x`` (B, C, P) at ``positions`` positions drawn without replacement (the same for every
    channel and image); ``x`` itself when it has no more than that many."""
    if not positions or x.shape[-1] <= positions:
        return x
    index = torch.randperm(x.shape[-1], generator=generator)[:positions].to(x.device)
    return x.index_select(-1, index)


def staged_sort_matching(refs_by_size: dict[int, dict[str, torch.Tensor]],
                         weights: dict[str, float], positions: int = 0,
                         generator: torch.Generator | None = None,
                         keys: str = "exact") -> Objective:
    """Terms ``sort:<layer>``: sort matching against the references of the current stage's size
    (``refs_by_size[ctx["size"]][layer]``, (C, Q) quantiles per stage size). ``positions`` > 0
    matches a layer with more positions on a random subset of that many per step (drawn from
    ``generator``; the quantiles are resampled to the subset): a cheaper, noisier estimate of
    the same loss, off by default because its effect on quality is not measured. ``keys``:
    ``sort_matching``'s."""
    def term(layer):
        def fn(ctx):
            x = random_positions(ctx["features"][layer], positions, generator)
            return sort_matching(x, refs_by_size[ctx["size"]][layer], keys)
        return weights[layer] * Objective(fn, f"sort:{layer}")
    return sum(term(layer) for layer in weights)


def batched_sort_matching(refs_by_size: dict, weights: dict[str, float]) -> Objective:
    """Sort matching where image b of the batch matches its own references:
    ``refs_by_size[size][layer]`` is (B, C, Q) (or (1, C, Q), shared by the batch)."""
    def term(layer):
        def fn(ctx):
            x = ctx["features"][layer]                               # (B, C, P)
            ref = resample_quantiles(refs_by_size[ctx["size"]][layer], x.shape[-1])
            return (x.sort(dim=-1).values - ref).pow(2).mean()
        return weights[layer] * Objective(fn, f"sort:{layer}")
    return sum(term(layer) for layer in weights)


def _normalised(img: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=img.dtype, device=img.device).view(1, -1, 1, 1)
    sd = torch.as_tensor(std, dtype=img.dtype, device=img.device).view(1, -1, 1, 1)
    return (img - m) / sd


def tv_paper(img: torch.Tensor) -> torch.Tensor:
    """The official VITAL code's TV: the sum over the 4 neighbour directions of the Frobenius
    norm (not squared, not a mean) of the differences, over the whole batch."""
    return sum(d.norm() for d in _neighbour_differences(img))


def l2_paper(img: torch.Tensor) -> torch.Tensor:
    """The official VITAL code's L2 prior: the mean over the batch of each image's L2 norm."""
    return img.flatten(1).norm(dim=1).mean()


def paper_prior_objectives(mean, std, tv_weight: float, l2_weight: float):
    """Terms ``tv_paper`` and ``l2_paper`` on the model's input (ctx["input"], after
    augmentation, as the official code computes them on the jittered image) in the model's
    normalised space. Their scale grows with the image size: the official weights (0 for
    class neurons of ResNet50, 3e-7 for inner neurons) are meant for 224 px."""
    tv = Objective(lambda ctx: tv_paper(_normalised(ctx["input"], mean, std)), "tv_paper")
    l2 = Objective(lambda ctx: l2_paper(_normalised(ctx["input"], mean, std)), "l2_paper")
    return tv_weight * tv + l2_weight * l2


def tv_objective(weight: float = 1.0, p: int = 2) -> Objective:
    """Term ``tv_l1`` / ``tv_l2``: total variation of ctx["image"]."""
    if p not in (1, 2):
        raise ValueError(f"tv supports p=1 or p=2, got {p}")
    return weight * Objective(lambda ctx: tv(ctx["image"], p), f"tv_l{p}")


def l2_objective(weight: float = 1.0, center=0.5) -> Objective:
    """Term ``l2``: mean squared distance of ctx["image"] from ``center``."""
    return weight * Objective(lambda ctx: l2(ctx["image"], center), "l2")


def class_logprob_objective(index: int, weight: float = 1.0) -> Objective:
    """Term ``class:<index>``: minus the log-softmax of ctx["output"] logits at ``index``."""
    def fn(ctx: Ctx) -> torch.Tensor:
        logits = ctx["output"]
        if not 0 <= index < logits.shape[-1]:
            raise IndexError(f"class index {index} outside the {logits.shape[-1]} logits")
        return -F.log_softmax(logits, dim=-1)[:, index].mean()
    return weight * Objective(fn, f"class:{index}")


def cosine_objective(vec: torch.Tensor, weight: float = 1.0, name: str = "cosine") -> Objective:
    """Term ``name``: 1 - cosine similarity of ctx["output"] (B, E) with ``vec`` (E,) or (B, E)."""
    target = vec.detach()

    def fn(ctx: Ctx) -> torch.Tensor:
        out = ctx["output"]
        return 1.0 - F.cosine_similarity(out, target.to(out).expand_as(out), dim=-1).mean()
    return weight * Objective(fn, name)
