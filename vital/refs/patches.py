"""Real image patches that excite a neuron most: the references of inner-neuron visualisation
(``vital.modes.inner``).

As in the VITAL paper (and its reference code), every image of a data set is cropped into square
patches (``patch`` px, ``stride`` px apart) at a fixed image size; each patch is scored by the
target (the network sees the patch alone, at ``score_size`` px); each image keeps its best patch
and the ``k`` best of those are the references, so they come from ``k`` distinct images.

The selected patches are cached as PNGs with an index, keyed by a hash of (model, weights, layer,
neuron or direction, image contents, crop settings, preprocessing), like ``vital.refs.references``;
a corrupt entry is detected by the PNGs' hashes and rebuilt.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from vital.cache import write_json
from vital.config import ConfigError
from vital.models import channels_positions
from vital.imaging import grid, save_png, to_pil
from vital.optvis.relevance import forward_until
from vital.refs.images import IMAGE_EXTENSIONS, ReferenceError, load_image
from vital import cache

_PREPROCESS_TAG = "rgb|resize-short-bicubic|center-crop|unfold|[0,1]"
# in the keys of both caches: entries name their photos by index into the data folder's sorted
# files (the key holds their contents in that order), not by path; earlier entries are not found
_ENTRY_LAYOUT = "file-index"
_SHEET_TILE = 96   # px of a tile in the contact sheet (patches are upscaled to at least this)


@dataclass
class TopPatches:
    """The k best patches, best first."""
    images: torch.Tensor                    # (k, 3, p, p) in [0, 1]
    scores: list[float]                     # the target's score of each patch
    sources: list[str]                      # the image each patch was cut from (all distinct)
    corners: list[tuple[int, int]]          # top-left (row, col) in px at the data size
    info: dict = field(default_factory=dict)   # cache key, hit, settings


# ---------------------------------------------------------------- data

def data_files(folder) -> list[Path]:
    """Image files in ``folder`` and its subfolders, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReferenceError(f"data folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ReferenceError(f"data folder {folder} holds no images (looked recursively for "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
    return files


def iter_images(files: list[Path], size: int, batch: int = 8, crop: float = 1.0):
    """Yield (images (b, 3, size, size), their files) in groups (short side resized to
    ``size / crop``, centre crop); unreadable files are skipped with a warning."""
    images, used = [], []
    for path in files:
        try:
            images.append(load_image(path, size, crop))
            used.append(Path(path))
        except (OSError, ValueError) as err:   # PIL's UnidentifiedImageError is an OSError
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
        if len(images) == batch:
            yield torch.stack(images), used
            images, used = [], []
    if images:
        yield torch.stack(images), used


# ---------------------------------------------------------------- cropping and scoring

def crop_patches(images: torch.Tensor, patch: int,
                 stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) -> patches (N, K, 3, p, p) and their top-left corners (K, 2) as (row, col)."""
    n, c, h, w = images.shape
    if not 1 <= patch <= min(h, w) or stride < 1:
        raise ConfigError(f"patch size {patch} px with stride {stride} does not fit images of "
                          f"{h}x{w} px; use 1 <= patch_size <= {min(h, w)} and stride >= 1")
    tiles = images.unfold(2, patch, stride).unfold(3, patch, stride)     # (N, 3, nh, nw, p, p)
    nh, nw = tiles.shape[2:4]
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(n, nh * nw, c, patch, patch)  # (N, K, 3, p, p)
    rows, cols = torch.meshgrid(torch.arange(nh) * stride, torch.arange(nw) * stride,
                                indexing="ij")
    return tiles, torch.stack([rows, cols], -1).reshape(-1, 2)           # (nh, nw, 2) -> (K, 2)


def _fit(images: torch.Tensor, size: int) -> torch.Tensor:
    if not size or images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < images.shape[-1]).clamp(0, 1)


@torch.no_grad()
def channel_means(target, layer: str, layout: str, images: torch.Tensor, skip: int = 0,
                  size: int = 0, batch_size: int = 32) -> torch.Tensor:
    """(N, C): every channel's mean over positions of ``layer`` for each image (``skip`` leading
    positions left out, e.g. 1 for a CLIP ViT's class token); images resized to ``size`` px
    first unless it is 0."""
    out = []
    with target.hooks([layer]) as feats:
        for chunk in images.split(batch_size):
            forward_until(target, _fit(chunk, size).to(target.device), layer)
            x = channels_positions(feats[layer], layout)[..., skip:]   # (B, C, P)
            out.append(x.float().mean(-1).cpu())
    return torch.cat(out)


@dataclass
class PatchScores:
    """Every patch of a data set scored once for a layer: per channel (``means`` (N, K, C)), or
    reduced to one target's score (``means`` (N, K, 1), ``reduced_for`` its label). Scoring all
    channels once serves every neuron of the layer (``--auto``, benchmarks)."""
    means: torch.Tensor                # (N images, K patches, C or 1)
    corners: torch.Tensor              # (K, 2) top-left (row, col) of each patch
    files: list[Path]                  # the N readable images
    size: int                          # px of the images the patches were cut from
    patch: int
    reduced_for: str | None = None
    crop: float = 1.0                  # centre crop of the images before resizing to size


def score_patches(target, layer: str, layout: str, skip: int, files: list[Path], size: int,
                  patch: int, stride: int, score_size: int = 0, neuron=None,
                  batch_size: int = 32, progress: bool = True, crop: float = 1.0
                  ) -> PatchScores:
    """Score every patch of ``files`` (at ``size`` px): all channels of ``layer`` (one forward
    per patch gives them all), or only ``neuron`` (a ``vital.modes.inner.NeuronTarget``) to keep
    memory at one value per patch."""
    parts, used_all, corners = [], [], None
    groups = iter_images(files, size, batch=max(1, batch_size // 8), crop=crop)
    bar = tqdm(total=len(files), desc=f"scoring patches of {layer}", unit="image",
               disable=not progress, leave=False)
    for images, used in groups:
        bar.update(len(used))
        tiles, corners = crop_patches(images, patch, stride)            # (b, K, 3, p, p)
        means = channel_means(target, layer, layout, tiles.flatten(0, 1), skip, score_size,
                              batch_size)                              # (b*K, C)
        if neuron is not None:
            means = neuron.score_means(means)[:, None]                 # (b*K, 1)
        parts.append(means.view(*tiles.shape[:2], -1))                 # (b, K, C or 1)
        used_all += used
    bar.close()
    if not parts:
        raise ReferenceError(f"none of the {len(files)} images could be read")
    return PatchScores(torch.cat(parts), corners, used_all, size, patch,
                       neuron.label if neuron is not None else None, crop)


def select_top(scores: PatchScores, neuron, k: int) -> TopPatches:
    """The ``k`` best patches for ``neuron``, at most one per image, cut again from the files."""
    if scores.reduced_for not in (None, neuron.label):
        raise ValueError(f"these patch scores are for {scores.reduced_for}, not {neuron.label}")
    flat = scores.means.flatten(0, 1)                                  # (N*K, C or 1)
    per_patch = (flat[:, 0] if scores.reduced_for else neuron.score_means(flat))
    best, where = per_patch.view(scores.means.shape[:2]).max(1)        # (N, K) -> (N,)
    n = len(scores.files)
    if n < k:
        warnings.warn(f"asked for the top {k} patches from distinct images, but the data set has "
                      f"only {n} readable images; using all of them", stacklevel=2)
    order = torch.argsort(best, descending=True, stable=True)[:k].tolist()
    corners = [tuple(int(v) for v in scores.corners[where[i]]) for i in order]
    images = [load_image(scores.files[i], scores.size, scores.crop)
              [:, r:r + scores.patch, c:c + scores.patch] for i, (r, c) in zip(order, corners)]
    return TopPatches(images=torch.stack(images), scores=[float(best[i]) for i in order],
                      sources=[str(scores.files[i]) for i in order], corners=corners)


def top_patches(target, neuron, files: list[Path], size: int, patch: int, stride: int, k: int,
                score_size: int = 0, batch_size: int = 32, progress: bool = True,
                crop: float = 1.0) -> TopPatches:
    """The ``k`` best patches of ``files`` (at ``size`` px) for ``neuron``, one per image,
    scored for this neuron only (one value per patch in memory; ``layer_scores`` keeps every
    channel and is cached)."""
    scores = score_patches(target, neuron.layer, neuron.layout, neuron.skip, files, size, patch,
                           stride, score_size, neuron, batch_size, progress, crop)
    return select_top(scores, neuron, k)


# ---------------------------------------------------------------- a layer at a time

LAYER_CACHE = "layer_patches"


def layer_key(target, layer: str, skip: int, files: list[Path], size: int, patch: int,
              stride: int, score_size: int, crop: float = 1.0) -> str:
    """The cache key of a layer's patch scores: what they depend on."""
    spec = {"format": cache.FORMAT, "model": str(target.spec), "weights": target.weight_hash,
            "layer": layer, "skip": skip, "files": cache.files_digest(files),
            "preprocess": _PREPROCESS_TAG, "entry": _ENTRY_LAYOUT, "size": size, "patch": patch,
            "stride": stride, "score_size": score_size, "crop": float(crop),
            "mean": list(target.mean), "std": list(target.std)}
    return cache.key(spec)


def layer_scores(target, layer: str, layout: str, skip: int, files: list[Path], *, size: int,
                 patch: int, stride: int, score_size: int = 0, crop: float = 1.0,
                 use_cache: bool = True, progress: bool = True,
                 batch_size: int = 32) -> PatchScores:
    """Every patch of ``files`` scored for every channel of ``layer`` (``means`` (N, K, C)),
    once: cached on disk (``$VITAL_CACHE/layer_patches/<key>/``, safetensors with a content
    hash; a corrupt entry is rebuilt), so the next neuron, direction (a projection of these
    channel means) or run of the layer reuses it. Memory: N x K x C float32 values (1000
    images, 36 patches, 320 channels: 46 MB)."""
    entry = cache.cache_dir(LAYER_CACHE, layer_key(target, layer, skip, files, size, patch,
                                                   stride, score_size, crop)) / "scores.safetensors"
    found = cache.load_tensors(entry, {"means", "corners"}, "layer patch scores") \
        if use_cache else None
    if found is not None:
        tensors, meta = found
        try:   # indexes, not paths: a folder that moved, or a relative path, still works
            return PatchScores(tensors["means"], tensors["corners"],
                               [files[i] for i in meta["file_index"]], size, patch, None, crop)
        except (KeyError, IndexError, TypeError) as err:
            warnings.warn(f"layer patch scores {entry} are corrupt ({err!r}); scoring again",
                          stacklevel=2)
    scores = score_patches(target, layer, layout, skip, files, size, patch, stride, score_size,
                           batch_size=batch_size, progress=progress, crop=crop)
    if use_cache:
        cache.store_tensors(entry, {"means": scores.means, "corners": scores.corners},
                            {"file_index": _indexes(files, scores.files), "layer": layer,
                             "size": size, "patch": patch}, "layer patch scores")
    return scores


# ---------------------------------------------------------------- cache

def patch_key(target, neuron, files: list[Path], size: int, patch: int, stride: int, k: int,
              score_size: int, crop: float = 1.0) -> str:
    """The cache key: what the selected patches depend on."""
    spec = {"format": cache.FORMAT, "model": str(target.spec), "weights": target.weight_hash,
            "layer": neuron.layer,
            "neuron": neuron.index, "direction": neuron.direction_digest(),
            "skip": neuron.skip, "files": cache.files_digest(files), "preprocess": _PREPROCESS_TAG,
            "entry": _ENTRY_LAYOUT,
            "size": size, "patch": patch, "stride": stride, "k": k, "score_size": score_size,
            "crop": float(crop), "mean": list(target.mean), "std": list(target.std)}
    return cache.key(spec)


def _png_tensor(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        img = img.convert("RGB")
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.view(img.height, img.width, 3).permute(2, 0, 1).float() / 255.0  # HWC->CHW


def _indexes(files: list[Path], used) -> list[int]:
    """Where each of ``used`` is in ``files``: what a cache entry stores instead of paths."""
    where = {str(f): i for i, f in enumerate(files)}
    return [where[str(u)] for u in used]


def _load_entry(folder: Path, files: list[Path]) -> TopPatches | None:
    """The cached top patches, their sources mapped to today's paths of the same files."""
    index = folder / "index.json"
    if not index.is_file():
        return None
    try:
        meta = json.loads(index.read_text())
        paths = [folder / name for name in meta["files"]]
        if [cache.file_sha256(p) for p in paths] != meta["sha256"]:
            raise ValueError("content hash mismatch")
        images = torch.stack([_png_tensor(p) for p in paths])
        return TopPatches(images, meta["scores"], [str(files[i]) for i in meta["source_index"]],
                          [tuple(c) for c in meta["corners"]])
    except (OSError, ValueError, KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
        warnings.warn(f"patch cache {folder} is corrupt ({err}); rebuilding it", stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _store_entry(folder: Path, top: TopPatches, files: list[Path]) -> None:
    """PNGs + index.json (with their hashes); a full disk only loses the cache entry."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"patch_{i:03d}.png" for i in range(len(top.scores))]
        for name, image in zip(names, top.images):
            save_png(to_pil(image), folder / name)
        top.images = torch.stack([_png_tensor(folder / n) for n in names])  # what a hit returns
        write_json(folder / "index.json", {
            "files": names, "sha256": [cache.file_sha256(folder / n) for n in names], "scores": top.scores,
            "source_index": _indexes(files, top.sources),
            "corners": [list(c) for c in top.corners]})
    except OSError as err:
        shutil.rmtree(folder, ignore_errors=True)
        warnings.warn(f"could not write patch cache {folder}: {err}", stacklevel=3)


def reference_patches(target, neuron, folder, *, size: int, patch: int, stride: int, k: int,
                      score_size: int = 0, use_cache: bool = True, progress: bool = True,
                      scores=None, crop: float = 1.0) -> TopPatches:
    """The top-k patches of the images under ``folder`` for ``neuron``, cached on disk. On a
    miss they are selected from the layer's patch scores (``layer_scores``, themselves cached,
    so every neuron and direction of the layer shares one scoring pass); ``scores`` (a
    ``PatchScores`` with the same settings, or a function returning one, called only on a
    miss) replaces them."""
    if k < 1:
        raise ConfigError(f"num_ref must be >= 1, got {k}")
    files = data_files(folder)
    key = patch_key(target, neuron, files, size, patch, stride, k, score_size, crop)
    entry = cache.cache_dir("inner_patches", key)
    info = {"key": key, "data_dir": str(folder), "images": len(files), "size": size,
            "patch": patch, "stride": stride, "score_size": score_size, "crop": crop}
    top = _load_entry(entry, files) if use_cache else None
    if top is not None:
        top.info = {**info, "cache_hit": True}
        return top
    if scores is None:
        scores = layer_scores(target, neuron.layer, neuron.layout, neuron.skip, files,
                              size=size, patch=patch, stride=stride, score_size=score_size,
                              crop=crop, use_cache=use_cache, progress=progress)
    top = select_top(scores() if callable(scores) else scores, neuron, k)
    if use_cache:
        _store_entry(entry, top, files)
    top.info = {**info, "cache_hit": False}
    return top


def contact_sheet(top: TopPatches, path: Path) -> Path:
    """The references as one labelled PNG (score of each patch), best first."""
    side = max(_SHEET_TILE, top.images.shape[-1])
    tiles = [to_pil(im).resize((side, side), Image.NEAREST) for im in top.images]
    labels = [f"{s:.3g}" for s in top.scores]
    save_png(grid(tiles, labels, cols=math.ceil(math.sqrt(len(tiles)))), path)
    return path
