"""Reference sets: real images, their sorted features at the matched layers, and a disk cache.

The sorted reference features of a layer are the per-channel quantiles of the real images'
features, averaged over the images (Algorithm 1 of the VITAL paper). They are computed once
without gradient and cached, keyed by a hash of (model spec, weight hash, layers, the image
files' content, preprocessing, size). A cache entry stores a hash of its own tensors, so a
corrupt or truncated entry is detected, reported and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_PREPROCESS_TAG = "rgb|resize-short-bicubic|center-crop|[0,1]"


class ReferenceError(ValueError):
    """A reference set that cannot be used; the message says why and what is valid."""


def cache_dir() -> Path:
    """``$VITAL_CACHE`` or ``~/.cache/vital``."""
    return Path(os.environ.get("VITAL_CACHE", Path.home() / ".cache" / "vital"))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.exists():
        raise ReferenceError(f"reference folder {folder} does not exist")
    if not folder.is_dir():
        raise ReferenceError(f"reference folder {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ReferenceError(f"reference folder {folder} holds no images "
                             f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One image as (3, size, size) in [0, 1]: short side resized (bicubic), centre crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1).float() / 255.0  # HWC -> CHW


def load_images(paths: list[Path], size: int, num: int | None = None) -> tuple[torch.Tensor, list[Path]]:
    """Load up to ``num`` readable images; unreadable ones are skipped with a warning."""
    images, used = [], []
    for path in paths:
        if num is not None and len(images) >= num:
            break
        try:
            images.append(load_image(path, size))
            used.append(Path(path))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            warnings.warn(f"skipping unreadable reference image {path}: {err}", stacklevel=2)
    if not images:
        raise ReferenceError(f"none of the {len(paths)} reference images could be read")
    if num is not None and len(images) < num:
        warnings.warn(f"asked for {num} reference images, using the {len(images)} that exist",
                      stacklevel=2)
    return torch.stack(images), used


def files_digest(paths: list[Path]) -> str:
    """SHA-256 over the files' contents (names do not matter, order does)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def reference_key(target, layers: list[str], files: list[Path], size: int) -> str:
    """The cache key: what the sorted features depend on."""
    spec = {"model": str(target.spec), "weights": target.weight_hash, "layers": list(layers),
            "files": files_digest(files), "preprocess": _PREPROCESS_TAG, "size": int(size),
            "mean": list(map(float, target.mean)), "std": list(map(float, target.std))}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def sorted_features(target, layers: list[str], images: torch.Tensor, batch_size: int = 8,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer, the (C, P) sorted features averaged over the images."""
    from vital.losses import sort_values
    from vital.models import channels_positions  # late import keeps this module light
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


def _load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(path))
        if _tensors_digest(tensors) != meta["sha256"]:
            raise ValueError("content hash mismatch")
        return tensors
    except (OSError, ValueError, KeyError, SafetensorError, json.JSONDecodeError) as err:
        warnings.warn(f"reference cache {path} is corrupt ({err}); rebuilding it", stacklevel=3)
        path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        return None


def _store_cached(path: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        meta = {"sha256": _tensors_digest(tensors), **info}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    except OSError as err:  # a full disk must not lose the run: warn and go on uncached
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write reference cache {path}: {err}", stacklevel=3)


def reference_quantiles(target, layers: list[str], files: list[Path], size: int,
                        num: int | None = None, use_cache: bool = True,
                        progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Sorted reference features per layer for the images in ``files`` at ``size`` px.

    Returns ``(quantiles, info)``; ``info`` says which files were used, the cache key and whether
    the cache was hit.
    """
    def lookup(used):
        key = reference_key(target, layers, used, size)
        path = cache_dir() / "references" / f"{key}.safetensors"
        info = {"key": key, "files": [str(p) for p in used], "size": size, "layers": list(layers)}
        cached = _load_cached(path) if use_cache else None
        if cached is not None and set(cached) != set(layers):
            cached = None
        return path, info, cached

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
    images, used = load_images(files, size, num)
    path, info, cached = lookup(used)
    if cached is not None:
        return cached, {**info, "cache_hit": True}
    quantiles = sorted_features(target, layers, images, progress=progress)
    if use_cache:
        _store_cached(path, quantiles, info)
    return quantiles, {**info, "cache_hit": False}


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resample a (B, 3, H, W) batch to ``size`` px (for low-resolution stages)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area" if size < images.shape[-1] else "bicubic",
                         align_corners=None).clamp(0, 1)
