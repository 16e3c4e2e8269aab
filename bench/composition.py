#!/usr/bin/env python
"""Do the pictures of one layer share a composition? (issue 22)

Each ``NAME=FOLDER`` is a ``describe_neurons.py --visualise`` output (``FOLDER/visuals/<layer>_<unit>/
final.png``) or any folder whose sub-folders hold a ``final.png``. Per layer and folder: the mean
Pearson correlation, over all pairs of units, of the pictures' 16 x 16 grey thumbnails (the
layout: where it is light and dark; 1 = one composition, 0 = unrelated). Writes a strip per folder,
the units in the same order, to look at.

  python bench/composition.py seed=out_bench/loop/loop_own_nw1 unit=out_bench/loop23/start_unit \\
      --out docs/inner_start_blocks15.jpg --layer blocks.15
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from vital.imaging import grid

THUMB = 16


def pictures(folder: Path, layer: str) -> dict[str, Path]:
    """unit -> final.png for one layer (sub-folders named ``<layer>_<unit>``)."""
    root = folder / "visuals" if (folder / "visuals").is_dir() else folder
    found = {}
    for png in sorted(root.glob("*/final.png")):
        name = png.parent.name
        if name.startswith(layer + "_"):
            found[name[len(layer) + 1:]] = png
    return found


def layout(png: Path) -> np.ndarray:
    with Image.open(png) as img:
        grey = np.asarray(img.convert("L").resize((THUMB, THUMB), Image.BILINEAR), np.float64)
    return grey.ravel()


def mean_pairwise_correlation(vectors: list[np.ndarray]) -> float:
    pairs = [np.corrcoef(a, b)[0, 1] for a, b in itertools.combinations(vectors, 2)]
    return float(np.mean(pairs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+", help="NAME=FOLDER")
    p.add_argument("--layer", required=True)
    p.add_argument("--out", default="", help="the strips as one image (jpg / png)")
    args = p.parse_args(argv)
    found = {}
    for entry in args.folders:
        name, sep, folder = entry.partition("=")
        if not sep:
            raise SystemExit(f"{entry!r} is not NAME=FOLDER")
        found[name] = pictures(Path(folder), args.layer)
        if len(found[name]) < 2:
            raise SystemExit(f"{folder} has {len(found[name])} pictures of layer {args.layer}; "
                             "need at least 2 (<layer>_<unit>/final.png)")
    units = sorted(set.intersection(*(set(f) for f in found.values())), key=lambda u: (len(u), u))
    print(f"| {args.layer}: {len(units)} units | layout correlation (grey 16 x 16) |\n|---|---|")
    for name, pngs in found.items():
        chosen = [layout(pngs[u]) for u in units]
        print(f"| {name} | {mean_pairwise_correlation(chosen):.2f} |")
    if args.out:   # one row per folder, the units in the same order
        tiles = [Image.open(f[u]).convert("RGB").resize((112, 112)) for f in found.values()
                 for u in units]
        labels = [f"{name} {u}" for name in found for u in units]
        grid(tiles, labels, cols=len(units)).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
