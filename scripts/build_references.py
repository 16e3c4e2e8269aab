#!/usr/bin/env python
"""Build reference folders (one per ImageNet class) from real photos that ship inside installed
packages (scikit-image, scikit-learn, matplotlib). Nothing is downloaded.

  python scripts/build_references.py --out references --views 12
"""
import sys

from vital.commands import vital_references   # installed as `vital-references`

if __name__ == "__main__":
    sys.exit(vital_references())
