"""Reference folders built from real photos that ship inside installed packages.

No download is involved: scikit-image, scikit-learn and matplotlib carry a handful of real
photographs. Each photo that shows an ImageNet class becomes a reference folder of several views
(the full photo plus seeded random crops and flips), so that sort matching sees a spread of
framings. One photo per class is far fewer than the paper's 50 real images: these folders are for
the quick start, demos and tests; for research, point ``--ref_dir`` at real class images.

The class of each photo is among the embedded EfficientNet-Lite0's top-3 on the full photo (top-1
for all but the cat, which it calls an Egyptian cat before a tabby); ``tests/test_bundled.py``
checks this.
"""
from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps


@dataclass(frozen=True)
class Photo:
    package: str       # importable package that ships the file
    relpath: str       # path inside the package
    class_index: int   # ImageNet-1k class index shown by the photo
    folder: str        # reference folder name (the class)


PHOTOS = (
    Photo("skimage", "data/coffee.png", 967, "espresso"),
    Photo("skimage", "data/chelsea.png", 281, "tabby"),
    Photo("skimage", "data/rocket.jpg", 657, "missile"),
    Photo("skimage", "data/motorcycle_left.png", 665, "moped"),
    Photo("sklearn", "datasets/images/china.jpg", 698, "palace"),
    Photo("sklearn", "datasets/images/flower.jpg", 985, "daisy"),
    Photo("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", 652, "military_uniform"),
)


def photo_path(photo: Photo) -> Path:
    """Where the installed package keeps the photo."""
    spec = importlib.util.find_spec(photo.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {photo.package!r} is not installed; "
                                f"`pip install -r requirements.txt` brings it")
    path = Path(list(spec.submodule_search_locations)[0]) / photo.relpath
    if not path.is_file():
        raise FileNotFoundError(f"{photo.package} does not ship {photo.relpath} (looked at {path})")
    return path


def views(image: Image.Image, n: int, size: int, seed: int) -> list[Image.Image]:
    """The centre crop plus ``n - 1`` seeded random crops (35-100 % of the area) and flips."""
    rng = random.Random(seed)
    image = image.convert("RGB")
    w, h = image.size
    out = [ImageOps.fit(image, (size, size), Image.BICUBIC)]
    while len(out) < n:
        frac = rng.uniform(0.35, 1.0)
        side = int(min(w, h) * frac ** 0.5)
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(ImageOps.mirror(crop) if rng.random() < 0.5 else crop)
    return out


def build_reference_folders(root: str | Path, n_views: int = 12, size: int = 256, seed: int = 0,
                            photos=PHOTOS) -> dict[str, Path]:
    """Write ``root/<class>/view_XX.png`` for each bundled photo; existing folders are kept."""
    root = Path(root)
    made = {}
    for k, photo in enumerate(photos):
        folder = root / photo.folder
        made[photo.folder] = folder
        if folder.is_dir() and len(list(folder.glob("view_*.png"))) >= n_views:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(photo_path(photo)) as img:
            for j, view in enumerate(views(img, n_views, size, seed + 1000 * k)):
                view.save(folder / f"view_{j:02d}.png")
    return made
