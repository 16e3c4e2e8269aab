#!/usr/bin/env python
"""Second-order effects of CLIP neurons (Gandelsman, Efros, Steinhardt, ICLR 2025): what each
MLP neuron of a CLIP ViT writes into the image embedding through the later attention heads,
its principal direction, the texts that describe it, and optionally an ablation study and
zero-shot segmentation heatmaps. See docs/effects.md.

Examples:
  python neuron_effects.py --model ViT-B/32 --layer block.9.mlp --probe_dir my_images/
  python neuron_effects.py --model ViT-B/32 --layer 8 9 --neurons 12 345 --texts imagenet
  python neuron_effects.py --model ViT-B/32 --layer 9 --probe_dir imagenet_val/ --ablate \
      --ablate_keep 0 100
  python neuron_effects.py --model ViT-B/32 --layer 9 --probe_dir my_images/ --visualise 4
  python neuron_effects.py --model ViT-B/32 --layer 9 --probe_dir my_images/ --heatmap "a dog"
"""
import sys

from vital.commands import vital_effects   # installed as `vital-effects`

if __name__ == "__main__":
    sys.exit(vital_effects())
