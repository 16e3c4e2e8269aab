#!/usr/bin/env python
"""A layer atlas: every unit of a layer on one browsable page, offline. For each unit: an
inner-mode picture, its label and candidate labels (describe_neurons.py's), the top probe
images, the activation histogram and whether the concept model names the picture with the
unit's label. A static site that works from file:// and `python -m http.server`.

Outputs in out_atlas/<run>/: index.html, <layer>/index.html, <layer>/<unit>.html, atlas.json,
units/ (pictures), probe/ (thumbnails), labels/ (the label run). The same command resumes and
renders only what is missing or whose settings changed.

Examples:
  python atlas.py --model efficientnet-lite0 --layers blocks.15 --probe_dir references --units 0-31
  python atlas.py --layers blocks.10 blocks.15 --probe_dir my_images/ --units all --preview
  python atlas.py --layers fc --probe_dir my_images/ --units all --no-pictures
"""
import sys

from vital.commands import vital_atlas   # installed as `vital-atlas`

if __name__ == "__main__":
    sys.exit(vital_atlas())
