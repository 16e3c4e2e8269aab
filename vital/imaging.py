"""Images in and out: tensors to PIL, PNGs written atomically (and read back exactly), 8-bit
rounding as a PNG stores it, resizing for a judge, RGBA with a transparency map, and labelled
grids (contact sheets, strips). Shared by every floor that writes or scores pictures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vital.cache import atomic_write

__all__ = ["to_pil", "save_png", "rgba", "grid", "read_png", "quantise", "fit_images"]


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> RGB PIL image."""
    if image.dim() == 4:
        image = image[0]
    array = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255 + 0.5)
    return Image.fromarray(array.astype(np.uint8))  # CHW -> HWC


def save_png(image: Image.Image, path: Path) -> None:
    """Save through a temp file so a crash or full disk never leaves a broken PNG behind."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def rgba(image: torch.Tensor, alpha: torch.Tensor) -> Image.Image:
    """The image with the transparency map as its alpha channel."""
    rgb = np.asarray(to_pil(image))
    a = (alpha.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, a]), mode="RGBA")


def grid(images: list[Image.Image], labels: list[str] | None = None, cols: int | None = None,
         pad: int = 4, label_height: int = 14) -> Image.Image:
    """Tile images (same size) into a grid with optional labels under each tile."""
    if not images:
        raise ValueError("grid needs at least one image")
    w, h = images[0].size
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    lh = label_height if labels else 0
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + lh + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, img in enumerate(images):
        x, y = pad + (k % cols) * (w + pad), pad + (k // cols) * (h + lh + pad)
        sheet.paste(img.convert("RGB").resize((w, h)), (x, y))
        if labels:
            draw.text((x + 2, y + h + 1), labels[k][: max(4, w // 6)], fill="black")
    return sheet


def read_png(path: str | Path) -> torch.Tensor:
    """A saved PNG as (1, 3, H, W) in [0, 1], exactly as written (no resampling)."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]   # HWC -> 1CHW


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to 8-bit levels, as a PNG stores them."""
    return (images.detach().float().clamp(0, 1).cpu() * 255).round() / 255


def fit_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """A batch resized to size x size (bilinear, antialiased), for a judge's input."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)
