#!/usr/bin/env python
"""Embedding arithmetic steering: "king - man + woman = queen" for images.

Start from a base image and move its embedding: subtract the mean embedding of the --sub images
(times --sub_alpha), add the mean embedding of the --add images (times --add_beta), and optimise
an image, initialised from the base, toward that target (cosine), with sort matching to the base
image's own features so that it stays natural. Every input is an image file or a word, drawn as a
typographic image (CLIP reads words). Writes out_arithmetic/<run>/: final.png,
arithmetic_strip.png (base | result | add | sub), arithmetic.json (cosines, opinions), metrics.json.

Examples:
  python class_neurons_fvis_arithmetic.py --json_cfg presets/arithmetic_king_queen_vit_b32.json
  python class_neurons_fvis_arithmetic.py --model ViT-B/32 --base KING --sub MAN --add WOMAN
  python scripts/build_references.py --out references      # then, offline:
  python class_neurons_fvis_arithmetic.py \
      --json_cfg presets/arithmetic_espresso_tabby_efficientnet.json
  python class_neurons_fvis_arithmetic.py --base photo.jpg --add word:SNOW --add_beta 0.5 \
      --no_determinism
"""
import sys

from vital.commands import vital_arithmetic   # installed as `vital-arithmetic`

if __name__ == "__main__":
    sys.exit(vital_arithmetic())
