#!/usr/bin/env python
"""Images per hour of class visualisations, one target at a time vs several in one batched
optimisation (``class_neurons_fvis.py --targets ... --batch_size B``).

For each batch size B the first B of 8 targets (the 7 bundled photos' classes, plus
coffee mug on the espresso views) are planned with ``plan_class_batch`` and rendered for
``--steps`` steps at ``--size`` px; seconds per step are the render loop's own
(``result.step_seconds``, without setup), and images per hour assume ``--budget`` steps per
image: 3600 * B / (budget * seconds per step). Batch sizes alternate within every repeat
(A/B on a shared machine); medians are reported with the load average.

  python bench/batch_speed.py                          # lite0, 224 px, B = 1, 4, 8
  python bench/batch_speed.py --steps 3 --repeats 1 --batch_sizes 1 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from vital.models import load_target
from vital.modes.class_batch import plan_class_batch
from vital.modes.class_mode import ClassCFG
from vital.optvis.render import render
from vital.refs.bundled import PHOTOS, build_reference_folders


def target_cfgs(ref_root: Path, args) -> list[ClassCFG]:
    folders = build_reference_folders(ref_root, n_views=12)
    pairs = [(str(p.class_index), folders[p.folder]) for p in PHOTOS]   # targets by index
    pairs.append(("504", folders["espresso"]))                         # coffee mug
    return [ClassCFG(model=args.model, target=name, ref_dir=str(folder), num_ref=12,
                     size=args.size, steps=args.steps, save_steps=0, progress=False,
                     device="cpu", precision=args.precision) for name, folder in pairs[:8]]


def step_seconds(cfgs, target) -> float:
    plan, _ = plan_class_batch(cfgs, target)
    result = render(target, plan.objective, plan.param, plan.schedule, plan.layers,
                    augment=plan.augment, generator=plan.generator, save_steps=0,
                    progress=False, precision=cfgs[0].precision)
    return result.step_seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps per render")
    p.add_argument("--budget", type=int, default=600, help="steps per image for images / hour")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vital_batch_") as tmp:
        os.environ["VITAL_CACHE"] = str(Path(tmp) / "cache")
        cfgs = target_cfgs(Path(tmp) / "refs", args)
        target = load_target(args.model)
        for b in args.batch_sizes:                              # warm-up, references cached
            plan_class_batch(cfgs[:b], target)
        load = os.getloadavg()
        times = {b: [] for b in args.batch_sizes}
        for _ in range(args.repeats):
            for b in args.batch_sizes:
                times[b].append(step_seconds(cfgs[:b], target))
    print(f"{args.model}, {args.size} px, {args.precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.steps} steps x {args.repeats} repeats "
          f"(medians); load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after on "
          f"{os.cpu_count()} CPUs\n")
    print("| batch | s / step | s / image-step | images / hour (at the budget) | vs one at a time |")
    print("| --- | --- | --- | --- | --- |")
    base = None
    for b in args.batch_sizes:
        sps = statistics.median(times[b])
        per_hour = 3600 * b / (args.budget * sps)
        base = base or per_hour
        print(f"| {b} | {sps:.3f} | {sps / b:.3f} | {per_hour:.1f} | {per_hour / base:.2f}x |")


if __name__ == "__main__":
    main()
