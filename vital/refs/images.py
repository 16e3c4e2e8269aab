"""Real images as tensors: listing a folder, loading (short side resized, centre crop),
resizing, and the error a reference set that cannot be used raises."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
PREPROCESS_TAG = "rgb|resize-short-bicubic|center-crop|[0,1]"


class ReferenceError(ValueError):
    """A reference set that cannot be used; the message says why and what is valid."""


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


def load_image(path: str | os.PathLike, size: int, crop: float = 1.0) -> torch.Tensor:
    """One image as (3, size, size) in [0, 1]: short side resized (bicubic) to ``size / crop``,
    centre crop of ``size`` (``crop`` 0.875 = Resize(256) + CenterCrop(224), the official VITAL
    code's reference preprocessing; 1 = the whole short side)."""
    if not 0 < crop <= 1:
        raise ValueError(f"crop must be in (0, 1], got {crop}")
    try:
        opened = Image.open(path)
    except Image.DecompressionBombError as err:   # not an OSError: would abort the run
        raise ValueError(f"{path} is larger than Pillow's pixel limit ({err})") from None
    with opened as img:
        img = _to_rgb(img)
        w, h = img.size
        scale = size / crop / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1).float() / 255.0  # HWC -> CHW


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. 16-bit and 32-bit grayscale (PNG modes I;16 / I) are
    scaled from their real range (0..65535), float images (F) from 0..1: Pillow's own
    conversion clips them at 255, which turns almost every 16-bit image white."""
    if img.mode.startswith("I") or img.mode == "F":
        full = 1.0 if img.mode == "F" else 65535.0
        values = np.asarray(img, dtype=np.float64) / full * 255.0
        img = Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def load_images(paths: list[Path], size: int, num: int | None = None,
                crop: float = 1.0) -> tuple[torch.Tensor, list[Path]]:
    """Load up to ``num`` readable images; unreadable ones (also those over Pillow's pixel
    limit) are skipped with a warning."""
    if num is not None and num < 1:
        raise ReferenceError(f"asked for {num} reference images: the number of reference "
                             f"images (--num_ref) must be 1 or more")
    images, used = [], []
    for path in paths:
        if num is not None and len(images) >= num:
            break
        try:
            images.append(load_image(path, size, crop))
            used.append(Path(path))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            warnings.warn(f"skipping unreadable reference image {path}: {err}", stacklevel=2)
    if not images:
        raise ReferenceError(f"none of the {len(paths)} reference images could be read")
    if num is not None and len(images) < num:
        warnings.warn(f"asked for {num} reference images, using the {len(images)} that exist",
                      stacklevel=2)
    return torch.stack(images), used



def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resample a (B, 3, H, W) batch to ``size`` px (for low-resolution stages)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area" if size < images.shape[-1] else "bicubic",
                         align_corners=None).clamp(0, 1)
