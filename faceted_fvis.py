#!/usr/bin/env python
"""Facet visualisation: the sub-concepts (facets) of one concept of a concept bank.

The concept's top patches are cut again from the bank's reference images (checked by hash: a
bank made with another model, layer or data set is refused), their activations at
--decomp_layer are factorised by NMF into --n_facets directions, and each facet is rendered with
VITAL: its direction at --decomp_layer while the concept stays active at --target_layer
(--batch_size facets per batched optimisation, each with its own random generator seeded from
--seed and the facet index).

Examples:
  python faceted_fvis.py --json_cfg presets/concept_facets_efficientnet_espresso.json
  python faceted_fvis.py --bank out_concept/espresso_efficientnet-lite0_blocks.15_k5_s0 \
      --target_layer blocks.15 --decomp_layer blocks.10 --n_facets 3
"""
import sys

from vital.commands import vital_facets   # installed as `vital-facets`

if __name__ == "__main__":
    sys.exit(vital_facets())
