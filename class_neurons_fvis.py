#!/usr/bin/env python
"""Class neuron visualisation with VITAL: an image of what a network perceives as a class.

The image's features are aligned with the features of real images of the class (sort matching,
Algorithm 1 of the VITAL paper), optionally with a class term.

Examples:
  python class_neurons_fvis.py --json_cfg presets/quickstart_efficientnet.json
  python class_neurons_fvis.py --model efficientnet-lite0 --target espresso \
      --ref_dir references/espresso --steps 300 --size 128
  python class_neurons_fvis.py --model ViT-B/32 --target "a photo of a goldfish" --ref_dir my_goldfish/
  python class_neurons_fvis.py --targets espresso daisy tabby --ref_root references \
      --batch_size 4 --size 128 --steps 300       # one batched optimisation, one folder each
"""
import sys

from vital.commands import vital_class   # installed as `vital-class`

if __name__ == "__main__":
    sys.exit(vital_class())
