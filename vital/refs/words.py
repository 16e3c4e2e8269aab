"""Typographic images: a word drawn as dark text on a light square, as large as fits.

CLIP reads text in images, so a word image ("MAN") acts like a photo of the thing, only cleaner.
The font ships with the project's dependencies (matplotlib's DejaVu Sans Bold); nothing is
downloaded and no system font is looked up, so the same word gives the same pixels on every
machine with the same Pillow and matplotlib. Multi-word text is wrapped into the line layout
that allows the largest font; an explicit newline keeps the lines as given.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DEFAULT_FONT = "DejaVuSans-Bold.ttf"   # in matplotlib/mpl-data/fonts/ttf/
MARGIN = 0.08          # blank border on each side, as a fraction of the side
LINE_SPACING = 0.15    # gap between lines, as a fraction of the font size
MAX_LINES = 4          # most lines a multi-word text is wrapped into
INK = (0, 0, 0)
PAPER = (255, 255, 255)


def default_font_path() -> Path:
    """DejaVu Sans Bold from matplotlib's package data (never a system font, never a download)."""
    import matplotlib
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / DEFAULT_FONT
    if not path.is_file():
        raise FileNotFoundError(f"font {path} is missing; it ships with matplotlib "
                                f"(`pip install -r requirements.txt`), or pass a .ttf file as font")
    return path


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _layouts(text: str) -> list[str]:
    """Candidate line layouts: the text as given if it has newlines, else 1..MAX_LINES lines
    of consecutive words, each split balanced by characters."""
    if "\n" in text:
        return ["\n".join(line.strip() for line in text.strip().splitlines())]
    words = text.split()
    out = []
    for k in range(1, min(len(words), MAX_LINES) + 1):
        out.append("\n".join(" ".join(group) for group in _balanced(words, k)))
    return out


def _balanced(words: list[str], k: int) -> list[list[str]]:
    """Split ``words`` into ``k`` consecutive groups of about equal character count."""
    total = sum(len(w) + 1 for w in words)
    groups, current, used = [], [], 0
    for i, word in enumerate(words):
        current.append(word)
        used += len(word) + 1
        words_left, groups_left = len(words) - i - 1, k - len(groups) - 1
        if groups_left and (used >= total * (len(groups) + 1) / k or words_left == groups_left):
            groups.append(current)
            current = []
    return groups + [current] if current else groups


def _box(draw: ImageDraw.ImageDraw, text: str, font, spacing: int) -> tuple[int, int, int, int]:
    return draw.multiline_textbbox((0, 0), text, font=font, spacing=spacing, align="center")


def _largest_fit(draw, text: str, font_path: str, room: int) -> int:
    """Largest font size (px) whose text box fits in a ``room`` x ``room`` square (>= 1)."""
    lo, hi = 1, max(1, room)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        left, top, right, bottom = _box(draw, text, _font(font_path, mid),
                                        round(LINE_SPACING * mid))
        if right - left <= room and bottom - top <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def render_word(text: str, size: int = 224, font: str | os.PathLike | None = None) -> Image.Image:
    """``text`` as dark ink on a light ``size`` x ``size`` RGB image, centred, as large as fits.

    Deterministic: the same text, size and font give the same bytes. Empty or blank text is an
    error (it would be a blank page that every word arithmetic silently ignores).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty word {text!r}: a word image needs at least one visible character")
    if size < 8:
        raise ValueError(f"word image size {size} px is too small; use at least 8 px")
    font_path = str(Path(font).expanduser() if font else default_font_path())
    if not Path(font_path).is_file():
        raise FileNotFoundError(f"font file {font_path} does not exist; give a .ttf/.otf file "
                                f"or leave it empty for {DEFAULT_FONT} from matplotlib")
    try:
        _font(font_path, 10)
    except OSError as err:   # Pillow: "unknown file format", "cannot open resource"
        raise ValueError(f"font file {font_path} is not a font Pillow can read ({err}); give a "
                         f".ttf/.otf file or leave it empty for {DEFAULT_FONT}") from None
    image = Image.new("RGB", (size, size), PAPER)
    draw = ImageDraw.Draw(image)
    room = size - 2 * round(MARGIN * size)
    fits = [(_largest_fit(draw, layout, font_path, room), -k, layout)
            for k, layout in enumerate(_layouts(text))]
    font_size, _, layout = max(fits)           # biggest font; ties go to fewer lines
    font_obj, spacing = _font(font_path, font_size), round(LINE_SPACING * font_size)
    left, top, right, bottom = _box(draw, layout, font_obj, spacing)
    origin = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    draw.multiline_text(origin, layout, font=font_obj, fill=INK, spacing=spacing, align="center")
    return image


def word_tensor(text: str, size: int = 224, font: str | os.PathLike | None = None) -> torch.Tensor:
    """``render_word`` as a float tensor (3, size, size) in [0, 1]."""
    array = np.asarray(render_word(text, size, font), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # HWC -> CHW
