#!/usr/bin/env python
"""Build reference folders (one per ImageNet class) from real photos that ship inside installed
packages (scikit-image, scikit-learn, matplotlib). Nothing is downloaded.

  python scripts/build_references.py --out references --views 12
"""
import argparse
import sys

from vital.refs.bundled import PHOTOS, build_reference_folders


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="references", help="parent folder of the class folders")
    parser.add_argument("--views", type=int, default=12, help="views (crops, flips) per photo")
    parser.add_argument("--size", type=int, default=256, help="side of each view in px")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops")
    args = parser.parse_args()
    if args.views < 1 or args.size < 16:
        parser.error("--views must be >= 1 and --size >= 16")
    made = build_reference_folders(args.out, n_views=args.views, size=args.size, seed=args.seed)
    for photo in PHOTOS:
        print(f"{made[photo.folder]}  (ImageNet class {photo.class_index}, "
              f"from {photo.package}/{photo.relpath})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
