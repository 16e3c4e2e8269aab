#!/usr/bin/env python
"""Render speed: milliseconds per step, split into the model's forward + backward and the rest.

Per model, the class-visualisation objective of ``ClassCFG`` (sort matching at the default
layers + class term + TV) is built with the pipeline helpers and rendered for ``--steps`` steps at
full size through ``vital.optvis.render.render`` (``result.step_seconds``). The same model then runs
``--steps`` bare forward + backward passes w.r.t. an input of the same size. The rest of a step
(parameterisation, augmentation, sort matching, priors, optimiser, hooks) is the difference.
Both are measured ``--repeats`` times, alternating, and the medians are reported, in wall time
and in process CPU time (on a shared machine the CPU time is the steadier figure; use
``--threads 1`` there, OpenMP threads that wait for a descheduled sibling cost 10x). Target:
the rest <= 10 % of a step.

Variants, measured in alternation within every repeat (A/B on a shared machine): ``--precision``
(fp32, bf16: the model's forward under bfloat16 autocast, its bare forward + backward too) and
``--sort`` (``new``: ``rank_residual``, rows ranked in parallel threads; ``q16``: the same on
16-bit quantised keys, ``--sort_keys q16``; ``previous``: the
implementation before it, one thread, gather / scatter in torch; ``positions:N``: ``new`` on N
random positions per layer and step, ``--sort_positions N``). ``sort ms`` is sort matching
alone (forward + backward) on the hooked features' shapes.

Models: the embedded ``efficientnet-lite0`` and a ViT-B/32-shaped CLIP with random weights
(vision width 768, 12 layers, patch 32, 224 px; a tiny text tower), written as safetensors and
loaded through ``load_target`` like a user's file. References: views of the bundled espresso
photo; the second reference computation must hit the cache (``VITAL_CACHE`` is a fresh folder).

  python bench/speed.py                  # both models, 30 steps x 3 repeats
  python bench/speed.py --models lite0 --steps 10 --repeats 1
  python bench/speed.py --models lite0 --sort new previous --precision fp32 bf16 --repeats 5
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import torch
from tqdm.auto import tqdm

from vital.modes import setup as pipeline
from vital.refs.bundled import PHOTOS, build_reference_folders
from vital.modes.class_mode import ClassCFG, class_term
from vital.models import load_target
from vital.refs.images import list_images
from vital.optvis import losses
from vital.optvis.render import Schedule, render
from vital.optvis import render as render_mod

from clip_shapes import random_vit_b32  # bench/ is on sys.path when a bench script runs

WARMUP_STEPS = 3


def model_specs(work: Path, names: list[str]) -> dict[str, str]:
    specs = {}
    if "lite0" in names:
        specs["efficientnet-lite0"] = "efficientnet-lite0"
    if "vit-b32" in names:
        specs["ViT-B/32 (random)"] = str(random_vit_b32(work / "vit_b32_random.safetensors"))
    return specs


def timed_references(cfg, target, layers, weights, size) -> tuple:
    """(objective, seconds, cache_hit) of one reference computation at full size."""
    start = time.perf_counter()
    obj, info, _ = pipeline.reference_objective(cfg, target, layers, weights,
                                             list_images(cfg.ref_dir), [size], cfg.num_ref)
    return obj, time.perf_counter() - start, info[size]["cache_hit"]


def build(spec: str, ref_dir: Path, steps: int, **overrides):
    """(cfg, target, objective, layers, size, cache figures) for one model."""
    cfg = ClassCFG(model=spec, target="espresso", ref_dir=str(ref_dir), num_ref=12, steps=steps,
                   save_steps=0, progress=False, device="cpu", **overrides)
    target = load_target(spec)
    size = pipeline.image_size(cfg, target)
    layers, weights = pipeline.resolve_layers(cfg, target)
    first = timed_references(cfg, target, layers, weights, size)
    ref_obj, second_s, second_hit = timed_references(cfg, target, layers, weights, size)
    cache = {"first_s": first[1], "first_hit": first[2], "second_s": second_s,
             "second_hit": second_hit}
    objective = ref_obj + class_term(cfg, target)[0] + pipeline.priors(cfg)
    return cfg, target, objective, layers, size, cache


class PreviousSortMatching(torch.autograd.Function):
    """Sort matching before ``rank_residual``: rows ranked in one thread, the pairs gathered
    in torch and the gradient scattered back (the A/B reference)."""

    @staticmethod
    def forward(ctx, x, ref):
        order = losses.sort_order(x)      # one thread: see sort_variant
        diff = x.gather(-1, order) - ref
        ctx.save_for_backward(order, diff)
        return diff.pow(2).mean()

    @staticmethod
    def backward(ctx, grad):
        order, diff = ctx.saved_tensors
        grad_sorted = diff * (grad * (2.0 / diff.numel()))
        return torch.empty_like(grad_sorted).scatter_(-1, order, grad_sorted), None


def previous_sort_matching(x: torch.Tensor, ref_sorted: torch.Tensor) -> torch.Tensor:
    ref = losses.resample_quantiles(ref_sorted.detach().to(x), x.shape[-1])
    return PreviousSortMatching.apply(x, ref)


def variant_overrides(name: str) -> dict:
    """ClassCFG settings of a ``--sort`` variant."""
    if name.startswith("positions:"):
        return {"sort_positions": int(name.split(":")[1])}
    return {"sort_keys": "q16"} if name == "q16" else {}


@contextlib.contextmanager
def sort_variant(name: str):
    """``new`` as the library has it, ``previous`` swapped in for the duration (the
    objectives look ``sort_matching`` up in vital.optvis.losses at every call), or ``unfolded``:
    the render without its batch norms folded into their convolutions (the render before
    2026-12-04; the bare forward + backward is always the model as loaded, unfolded)."""
    if name in ("new", "q16") or name.startswith("positions:"):
        yield
        return
    if name == "unfolded":
        kept = render_mod.folded_for_render
        render_mod.folded_for_render = lambda target, layers: contextlib.nullcontext()
        try:
            yield
        finally:
            render_mod.folded_for_render = kept
        return
    kept = losses.sort_matching, losses.PARALLEL_MIN_VALUES
    losses.sort_matching, losses.PARALLEL_MIN_VALUES = previous_sort_matching, 2 ** 62
    try:
        yield
    finally:
        losses.sort_matching, losses.PARALLEL_MIN_VALUES = kept


def render_step_seconds(cfg, target, objective, layers, size, steps: int,
                        precision: str = "fp32") -> tuple[float, float]:
    """(wall seconds per step from ``result.step_seconds``, CPU seconds per step)."""
    gen = pipeline.generator_for(cfg, target.device)
    param = pipeline.make_param(cfg, size, target.device, gen)
    cpu = time.process_time()
    result = render(target, objective, param, Schedule(steps_multires=(steps,), lr=cfg.lr,
                    warmup=cfg.warmup), layers, augment=pipeline.make_augment(cfg),
                    generator=gen, save_steps=0, progress=False, precision=precision)
    return result.step_seconds, (time.process_time() - cpu) / steps


def bare_step_seconds(target, size: int, steps: int, precision: str = "fp32"
                      ) -> tuple[float, float]:
    """(wall, CPU) seconds of forward + backward w.r.t. a (1, 3, size, size) input, alone."""
    x = torch.rand(1, 3, size, size, device=target.device, requires_grad=True)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = target(x)
        out.float().sum().backward()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def sort_seconds(target, layers, size: int, steps: int, keys: str = "exact"
                 ) -> tuple[float, float]:
    """(wall, CPU) seconds of sort matching alone (forward + backward) on every hooked layer's
    features at ``size``, against random quantiles."""
    from vital.models import channels_positions
    layouts = {info.name: info.layout for info in target.layers()}
    with torch.no_grad(), target.hooks(layers) as feats:
        target(torch.rand(1, 3, size, size, device=target.device))
        xs = [channels_positions(feats[n], layouts[n]).float().clone() for n in layers]
    refs = [torch.randn(x.shape[1:]).sort(-1).values for x in xs]
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        for x, ref in zip(xs, refs):
            x.requires_grad_(True).grad = None
            losses.sort_matching(x, ref, keys).backward()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def measure(name: str, spec: str, ref_dir: Path, args) -> list[dict]:
    """One row per (precision, sort) variant; the variants alternate within every repeat."""
    cfg, target, objective, layers, size, cache = build(spec, ref_dir, args.steps)
    variants = [(p, v) for p in args.precision for v in args.sort]
    objectives = {v: build(spec, ref_dir, args.steps, **variant_overrides(v))[2]
                  if variant_overrides(v) else objective for v in args.sort}
    for precision, variant in variants:                      # warm-up
        with sort_variant(variant):
            render_step_seconds(cfg, target, objectives[variant], layers, size, WARMUP_STEPS,
                                precision)
        bare_step_seconds(target, size, WARMUP_STEPS, precision)
    timed = {v: ([], [], []) for v in variants}
    for _ in tqdm(range(args.repeats), desc=name, leave=False):
        for precision, variant in variants:
            renders, bares, sorts = timed[(precision, variant)]
            with sort_variant(variant):
                renders.append(render_step_seconds(cfg, target, objectives[variant], layers,
                                                   size, args.steps, precision))
                sorts.append(sort_seconds(target, layers, size, args.steps,
                                          "q16" if variant == "q16" else "exact"))
            bares.append(bare_step_seconds(target, size, args.steps, precision))
    rows = []
    for (precision, variant), (renders, bares, sorts) in timed.items():
        row = {"model": name, "size": size, "layers": layers, "precision": precision,
               "sort": variant, **cache}
        for k, clock in enumerate(("wall", "cpu")):
            step = statistics.median(r[k] for r in renders)
            bare = statistics.median(b[k] for b in bares)
            row.update({f"{clock}_step_ms": 1e3 * step, f"{clock}_model_ms": 1e3 * bare,
                        f"{clock}_rest_frac": (step - bare) / step,
                        f"{clock}_sort_ms": 1e3 * statistics.median(x[k] for x in sorts)})
        rows.append(row)
    return rows


def print_tables(rows: list[dict]) -> None:
    print("| model | px | precision | sort | step ms | fwd+bwd ms | rest ms | rest / step | "
          "sort ms | step CPU ms | fwd+bwd CPU ms | rest CPU ms | rest / step (CPU) | "
          "sort CPU ms |")
    print("| --- " * 14 + "|")
    for r in rows:
        cells = []
        for clock in ("wall", "cpu"):
            step, bare = r[f"{clock}_step_ms"], r[f"{clock}_model_ms"]
            cells += [f"{step:.0f}", f"{bare:.0f}", f"{step - bare:.0f}",
                      f"{100 * r[f'{clock}_rest_frac']:.1f}%", f"{r[f'{clock}_sort_ms']:.1f}"]
        print(f"| {r['model']} | {r['size']} | {r['precision']} | {r['sort']} | "
              f"{' | '.join(cells)} |")
    print("\n| model | references 1st run (s) | cache_hit | 2nd run (s) | cache_hit | saved (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in {r["model"]: r for r in rows}.values():
        print(f"| {r['model']} | {r['first_s']:.2f} | {r['first_hit']} | {r['second_s']:.2f} | "
              f"{r['second_hit']} | {r['first_s'] - r['second_s']:.2f} |")
    for r in {r["model"]: r for r in rows}.values():
        print(f"{r['model']}: layers {', '.join(r['layers'])}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lite0", "vit-b32"], choices=["lite0", "vit-b32"])
    p.add_argument("--steps", type=int, default=30, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs per model")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="the model's forward precision(s), alternated")
    p.add_argument("--sort", nargs="+", default=["new"],
                   help="sort matching variant(s), alternated: new, q16 (--sort_keys q16), "
                        "previous, unfolded (new without the batch norms folded into their "
                        "convolutions), or positions:N (new, matching each layer on N random "
                        "positions per step, --sort_positions N; 'sort ms' is still the full "
                        "sort)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vital_speed_") as tmp:
        work = Path(tmp)
        os.environ["VITAL_CACHE"] = str(work / "cache")  # first reference run must miss
        ref_dir = build_reference_folders(work / "refs", n_views=12, photos=PHOTOS[:1])["espresso"]
        load = os.getloadavg()
        rows = [row for name, spec in model_specs(work, args.models).items()
                for row in measure(name, spec, ref_dir, args)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x {args.repeats} repeats (medians); load average "
          f"{load[0]:.2f} before, {os.getloadavg()[0]:.2f} after on {os.cpu_count()} CPUs\n")
    print_tables(rows)


if __name__ == "__main__":
    main()
