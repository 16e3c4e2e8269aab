#!/usr/bin/env python
"""Inner neuron visualisation with VITAL: an image of what one neuron, channel or direction of
a layer responds to, next to the real image patches that excite it most (references.png).

The image's activations below the target are aligned with those of the top-k patches of a data
set (sort matching), weighted by their relevance for the target (LRP, gradient x activation or
guided backprop), plus a small term for the target's own activation.

Examples:
  python inner_neurons_fvis.py --json_cfg presets/inner_efficientnet_blocks10.json
  python inner_neurons_fvis.py --model efficientnet-lite0 --layer blocks.10 --neuron 40 \
      --data_dir references --num_ref 20 --steps 300 --size 128
  python inner_neurons_fvis.py --model ViT-B/32 --layer block.9.mlp --neuron 1234 \
      --data_dir my_images/ --relevance lrp
  python inner_neurons_fvis.py --model efficientnet-lite0 --layer blocks.12 --auto 4
  python inner_neurons_fvis.py --layer blocks.10 --neurons 3 17 40 52 --batch_size 4
  python inner_neurons_fvis.py --model ViT-B/32 --layer block.9.mlp --auto 4 \
      --auto_prompt "a photo of a bird" --data_dir my_images/
  python inner_neurons_fvis.py --layer blocks.10 --direction my_direction.npy
"""
import sys

from vital.commands import vital_inner   # installed as `vital-inner`

if __name__ == "__main__":
    sys.exit(vital_inner())
