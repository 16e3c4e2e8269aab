#!/usr/bin/env python
"""Images per hour of class visualisations, one target at a time vs several in one batched
optimisation (``class_neurons_fvis.py --targets ... --batch_size B``), and the peak memory of a
batched step.

Speed: for each batch size B the first B of 8 targets (the 7 bundled photos' classes, plus
coffee mug on the espresso views) are planned with ``plan_class_batch`` and rendered for
``--steps`` steps at ``--size`` px; seconds per step are the render loop's own
(``result.step_seconds``, without setup), and images per hour assume ``--budget`` steps per
image: 3600 * B / (budget * seconds per step). Batch sizes alternate within every repeat
(A/B on a shared machine); medians are reported with the load average.

Memory (``--memory``): each (size, batch) renders 2 steps in a fresh process; once the model
and the plan (references) are ready the peak is reset (CPU: ``/proc/self/clear_refs``; CUDA:
``torch.cuda.reset_peak_memory_stats``) and the render's peak above what was in use is
reported, next to ``vital.models.memory.step_bytes``'s up-front estimate.

Models: ``efficientnet-lite0`` (or any spec), ``vit-b32`` / ``vit-b16`` = ViT-B-shaped CLIPs
with random weights (bench/clip_shapes.py).

  python bench/batch_speed.py                          # lite0, 224 px, B = 1, 4, 8
  python bench/batch_speed.py --threads 1 --batch_sizes 1 4 8
  python bench/batch_speed.py --model vit-b32 --steps 3 --repeats 2
  python bench/batch_speed.py --memory --sizes 224 448 --batch_sizes 1 4 8
  python bench/batch_speed.py --memory --model vit-b16 --sizes 224 448 --batch_sizes 1 4 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vital.models import load_target
from vital.modes.class_batch import plan_class_batch
from vital.modes.class_mode import ClassCFG
from vital.optvis.render import render
from vital.refs.bundled import PHOTOS, build_reference_folders

from clip_shapes import model_spec   # bench/ is on sys.path when a bench script runs


def target_cfgs(ref_root: Path, spec: str, args, size: int | None = None) -> list[ClassCFG]:
    folders = build_reference_folders(ref_root, n_views=12)
    pairs = [(str(p.class_index), folders[p.folder]) for p in PHOTOS]   # targets by index
    pairs.append(("504", folders["espresso"]))                         # coffee mug
    return [ClassCFG(model=spec, target=name, ref_dir=str(folder), num_ref=12,
                     size=size or args.size, steps=args.steps, save_steps=0, progress=False,
                     device=args.device, precision=args.precision)
            for name, folder in pairs[:8]]


def step_seconds(cfgs, target) -> float:
    plan, _ = plan_class_batch(cfgs, target)
    result = render(target, plan.objective, plan.param, plan.schedule, plan.layers,
                    augment=plan.augment, generator=plan.generator, save_steps=0,
                    progress=False, precision=cfgs[0].precision)
    return result.step_seconds


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024                    # kB
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak(device: str) -> int:
    """Start a new peak measurement; returns the memory in use now."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")   # Linux: VmHWM := VmRSS
    return _status_bytes("VmRSS")


def peak_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def one_memory(args) -> None:
    """(child process) memory in use once the model and the plan are ready, and the peak of a
    2-step batched render above it."""
    spec = model_spec(args.model, Path(args.work))
    target = load_target(spec, device=args.device)
    size, batch = args.sizes[0], args.batch_sizes[0]
    cfgs = target_cfgs(Path(args.work) / "refs", spec, args, size)[:batch]
    plan, _ = plan_class_batch(cfgs, target)            # references (cached by the parent)
    ready = reset_peak(args.device)
    render(target, plan.objective, plan.param, plan.schedule, plan.layers, augment=plan.augment,
           generator=plan.generator, save_steps=0, progress=False, precision=args.precision)
    from vital.models.memory import step_bytes
    print(json.dumps({"ready": ready, "render": peak_bytes(args.device),
                      "estimate": step_bytes(target, size, batch)}))


def memory_table(args) -> None:
    print(f"{args.model}, {args.precision}, device {args.device}, torch {torch.__version__}; "
          f"peak memory of a 2-step batched class render, one fresh process per row "
          f"(CPU: resident set, the peak reset once the model and the plan are ready)\n")
    print("| px | batch | in use before the render (GB) | peak during the render (GB) | "
          "render's own (GB) | per image (GB) | up-front estimate (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    gb = lambda n: n / 2 ** 30
    for size in args.sizes:
        for batch in args.batch_sizes:
            cmd = [sys.executable, __file__, "--one_memory", "--model", args.model, "--work",
                   args.work, "--sizes", str(size), "--batch_sizes", str(batch), "--steps", "2",
                   "--device", args.device, "--precision", args.precision,
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"| {size} | {batch} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            m = json.loads(out.stdout.strip().splitlines()[-1])
            extra = m["render"] - m["ready"]
            print(f"| {size} | {batch} | {gb(m['ready']):.2f} | {gb(m['render']):.2f} | "
                  f"{gb(extra):.2f} | {gb(extra) / batch:.2f} | {gb(m['estimate']):.2f} |",
                  flush=True)


def speed_table(args, work: Path) -> None:
    spec = model_spec(args.model, work)
    cfgs = target_cfgs(work / "refs", spec, args)
    target = load_target(spec, device=args.device)
    for b in args.batch_sizes:                              # warm-up, references cached
        plan_class_batch(cfgs[:b], target)
    load = os.getloadavg()
    times = {b: [] for b in args.batch_sizes}
    for _ in range(args.repeats):
        for b in args.batch_sizes:
            times[b].append(step_seconds(cfgs[:b], target))
    print(f"{args.model}, {args.size} px, {args.precision}, device {args.device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps x "
          f"{args.repeats} repeats (medians); load average {load[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after on {os.cpu_count()} CPUs\n")
    print("| batch | s / step | s / image-step | images / hour (at the budget) | vs one at a time |")
    print("| --- | --- | --- | --- | --- |")
    base = None
    for b in args.batch_sizes:
        sps = statistics.median(times[b])
        per_hour = 3600 * b / (args.budget * sps)
        base = base or per_hour
        print(f"| {b} | {sps:.3f} | {sps / b:.3f} | {per_hour:.1f} | {per_hour / base:.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps per render")
    p.add_argument("--budget", type=int, default=600, help="steps per image for images / hour")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--memory", action="store_true", help="peak memory per size and batch")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="with --memory")
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    p.add_argument("--one_memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_memory:
        return one_memory(args)
    with tempfile.TemporaryDirectory(prefix="vital_batch_") as tmp:
        os.environ["VITAL_CACHE"] = str(Path(tmp) / "cache")
        if args.memory:
            args.work = tmp
            for size in args.sizes:      # references computed once, here, not in the children
                spec = model_spec(args.model, Path(tmp))
                target = load_target(spec, device=args.device)
                plan_class_batch(target_cfgs(Path(tmp) / "refs", spec, args, size), target)
            return memory_table(args)
        speed_table(args, Path(tmp))


if __name__ == "__main__":
    main()
