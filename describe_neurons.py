#!/usr/bin/env python
"""Neuron labels: a word for every neuron of a layer, from the probe images it fires on and a
concept model that says what each probe image shows (by default the concept whose scores
correlate best with the neuron over the probe images; CLIP-Dissect's similarities one flag
away); optionally a linear explanation per neuron ("0.62 dog + 0.31 grass") with held-out
correlations, inner-mode visualisations of the best neurons beside their top images, and a
check whether the concept model gives the visualisation the neuron's label.

Outputs in out_labels/<run>/: descriptions.csv, sheets/*.png, summary.json, config.json
(+ explanations.json with --explain linear; visuals/ and visualisations.png with --visualise).

Examples:
  python describe_neurons.py --model efficientnet-lite0 --layers blocks.15 --probe_dir references
  python describe_neurons.py --layers fc --concepts imagenet --concept_model efficientnet-lite1 \
      --probe_dir my_images/ --explain linear
  python describe_neurons.py --layers blocks.15 --probe_dir my_images/ --similarity soft_wpmi
  python describe_neurons.py --model ViT-B/32 --layers block.9.mlp --concept_model ViT-B/16 \
      --concepts words20k --probe_dir my_images/ --pool cls
  python describe_neurons.py --layers blocks.15 --concepts my_concepts.txt \
      --concept_model ViT-B/16 --visualise 10 --check
"""
import sys

from vital.commands import vital_describe   # installed as `vital-describe`

if __name__ == "__main__":
    sys.exit(vital_describe())
