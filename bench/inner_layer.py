#!/usr/bin/env python
"""A layer at a time (issue 22): 32 neurons of EfficientNet-Lite0 ``blocks.15`` at 224 px, the
probe folder's patches scored once for every channel of the layer, then the neurons rendered in
batches, with an empty cache so that the scoring is included.

Prints and writes ``result.json``: seconds for scoring and for rendering, seconds per neuron
amortised, peak resident memory of the process, the size of the cached layer scores (in memory:
N images x K patches x C channels float32; on disk: the safetensors file), and ``grid.png`` with
the pictures (unit index above each).

  OMP_NUM_THREADS=2 python bench/inner_layer.py --probe_dir out_bench/inner_quality/probe \\
      --out out_bench/inner_layer --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from vital.config import parse_units
from vital.imaging import grid, save_png, to_pil
from vital.modes.runner import prepare
from vital.modes.inner import InnerCFG, layer_patch_scores, resolve_target, run_inner
from vital.refs.images import load_image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe_dir", required=True, help="folder of real photos")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--layer", default="blocks.15")
    parser.add_argument("--units", nargs="+", default=["0-31"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps_multires", type=int, nargs="+", default=[],
                        help="default: inner mode's default budget")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--ref_rank", default="image", choices=["image", "patch"],
                        help="image (the default): one forward per probe photo; patch: every "
                             "64 px patch scored")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="out_bench/inner_layer")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = tempfile.mkdtemp(prefix="vital-cache-")   # empty: the scoring is measured
    os.environ["VITAL_CACHE"] = cache_dir
    over = {"steps_multires": args.steps_multires} if args.steps_multires else {}
    cfg = InnerCFG(model=args.model, device="cpu", layer=args.layer, neurons=args.units,
                   data_dir=args.probe_dir, size=args.size, batch_size=args.batch_size,
                   out_dir=str(out / "runs"), save_steps=0, ref_rank=args.ref_rank, **over)
    _, target = prepare(cfg)
    first = resolve_target(target, cfg.layer, 0)
    units = parse_units(cfg.neurons, first.channels)

    t0 = time.perf_counter()
    scores = layer_patch_scores(cfg, target, first)
    t1 = time.perf_counter()
    dirs, _ = run_inner(cfg)          # every neuron finds the layer's scores in the cache
    t2 = time.perf_counter()

    files = list(Path(cache_dir, "layer_patches").rglob("*.safetensors"))
    result = {
        "model": args.model, "layer": args.layer, "units": len(units), "size": args.size,
        "steps": cfg.steps_multires or cfg.steps, "batch_size": args.batch_size,
        "ref_rank": args.ref_rank,
        "threads": torch.get_num_threads(), "probe_images": len(scores.files),
        "scores_shape": list(scores.means.shape),
        "scores_mb_in_memory": round(scores.means.numel() * 4 / 2**20, 1),
        "scores_mb_on_disk": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "seconds_scoring": round(t1 - t0, 1), "seconds_rendering": round(t2 - t1, 1),
        "seconds_per_neuron": round((t2 - t0) / len(units), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "uptime": os.popen("uptime").read().strip(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    pictures = [to_pil(load_image(Path(d) / "final.png", 112)) for d in dirs]
    save_png(grid(pictures, [f"{args.layer}:{u}" for u in units], cols=8), out / "grid.png")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
