#!/usr/bin/env python
"""Desktop GUI for a quick start: pick a mode (class, inner neuron, arithmetic, concept), a
model and a target, press Run and watch the image form. Runs the same library code as the
scripts; "Save config" writes the JSON they read with --json_cfg.

Examples:
  python vital_gui.py
  python vital_gui.py --out_dir my_runs
"""
import sys

from vital.commands import vital_gui   # installed as `vital-gui`

if __name__ == "__main__":
    sys.exit(vital_gui())
