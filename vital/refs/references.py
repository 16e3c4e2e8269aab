"""Reference sets: the sorted features of real images at the matched layers, cached on disk.

The sorted reference features of a layer are the per-channel quantiles of the real images'
features, averaged over the images (Algorithm 1 of the VITAL paper). They are computed once
without gradient and cached (``vital.cache``), keyed by a hash of (model spec, weight hash,
layers, the image files' content, preprocessing, size). A cache entry stores a hash of its own
tensors, so a corrupt or truncated entry is detected, reported and rebuilt.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vital import cache
from vital.models.target import channels_positions
from vital.optvis.losses import sort_values
from vital.refs.images import PREPROCESS_TAG, load_images

CACHE_FOLDER = "references"


def reference_key(target, layers: list[str], files: list[Path], size: int,
                  crop: float = 1.0) -> str:
    """The cache key: what the sorted features depend on. Under ``--hard_determinism``
    (``torch.use_deterministic_algorithms``) also the CPU thread count: more threads sum in
    another order and change the last bits, which a long render amplifies, so a hard run only
    reuses features computed as it would compute them."""
    spec = {"format": cache.FORMAT, "model": str(target.spec), "crop": float(crop),
            "weights": target.weight_hash, "layers": list(layers),
            "files": cache.files_digest(files), "preprocess": PREPROCESS_TAG,
            "size": int(size), "mean": list(map(float, target.mean)),
            "std": list(map(float, target.std))}
    if torch.are_deterministic_algorithms_enabled():
        spec["threads"] = torch.get_num_threads()
    return cache.key(spec)


@torch.no_grad()
def sorted_features(target, layers: list[str], images: torch.Tensor, batch_size: int = 8,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer, the (C, P) sorted features averaged over the images."""
    layouts = {info.name: info.layout for info in target.layers()}
    sums: dict[str, torch.Tensor] = {}
    chunks = images.split(batch_size)
    with target.hooks(layers) as feats:
        for chunk in tqdm(chunks, desc="reference features", disable=not progress, leave=False):
            target(chunk.to(target.device))
            for name in layers:
                x = channels_positions(feats[name], layouts[name])  # (B, C, P)
                s = sort_values(x.float()).sum(0)                    # (C, P)
                sums[name] = s if name not in sums else sums[name] + s
    return {name: (s / len(images)).cpu() for name, s in sums.items()}


def reference_quantiles(target, layers: list[str], files: list[Path], size: int,
                        num: int | None = None, use_cache: bool = True,
                        progress: bool = True, crop: float = 1.0
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """Sorted reference features per layer for the images in ``files`` at ``size`` px.

    Returns ``(quantiles, info)``; ``info`` says which files were used, the cache key and whether
    the cache was hit.
    """
    def lookup(used):
        key = reference_key(target, layers, used, size, crop)
        path = cache.cache_dir(CACHE_FOLDER, f"{key}.safetensors")
        info = {"key": key, "files": [str(p) for p in used], "size": size, "layers": list(layers)}
        hit = cache.load_tensors(path, expect=set(layers), what="reference cache") \
            if use_cache else None
        return path, info, (hit[0] if hit else None)

    # Fast path: the first ``num`` files, hashed without decoding. An entry under their key was
    # made from exactly these bytes, so they were all readable then and are now.
    candidates = [Path(f) for f in (files if num is None else files[:num])]
    if use_cache and candidates and all(f.is_file() for f in candidates):
        path, info, cached = lookup(candidates)
        if cached is not None:
            if num is not None and len(candidates) < num:
                warnings.warn(f"asked for {num} reference images, using the {len(candidates)} "
                              f"that exist", stacklevel=2)
            return cached, {**info, "cache_hit": True}
    images, used = load_images(files, size, num, crop)
    path, info, cached = lookup(used)
    if cached is not None:
        return cached, {**info, "cache_hit": True}
    quantiles = sorted_features(target, layers, images, progress=progress)
    if use_cache:
        cache.store_tensors(path, quantiles, info, what="reference cache")
    return quantiles, {**info, "cache_hit": False}
