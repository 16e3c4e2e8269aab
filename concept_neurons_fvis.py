#!/usr/bin/env python
"""Concept visualisation: CRAFT concepts of a layer, ranked by their effect on the output,
each rendered with VITAL.

The reference images are cut into patches; their activations at --layer_block are made
non-negative and factorised by NMF into --n_concepts directions (a concept bank, saved as
safetensors + JSON). Concepts are ranked by Sobol total-order indices (CRAFT) or a gradient
estimate; each one is rendered by sort matching to its top patches plus a direction term,
--batch_size concepts per batched optimisation, each with its own random generator (seeded from
--seed and the concept id), into one run folder. --extract_only writes the bank and stops.

Examples:
  python concept_neurons_fvis.py --json_cfg presets/concept_efficientnet_espresso.json
  python concept_neurons_fvis.py --model efficientnet-lite0 --target espresso \
      --ref_dir references/espresso --layer_block blocks.15 --n_concepts 5 --extract_only
  python concept_neurons_fvis.py --model ViT-B/32 --target "a photo of a tabby cat" \
      --ref_dir my_cats/ --layer_block block.9 --exclude_registers
"""
import sys

from vital.commands import vital_concepts   # installed as `vital-concepts`

if __name__ == "__main__":
    sys.exit(vital_concepts())
