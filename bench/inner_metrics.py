#!/usr/bin/env python
"""Inner-neuron visualisation quality: AUC and MAD (VITAL paper, appendix B.1, after CoSy).

For each of ``--neurons`` random channels of ``--layer`` (seeded), every method visualises the
channel with the same step budget. The channel's activation (mean over positions) on each
visualisation is compared with its activation on its top-``--num_real`` real images of the data
set (all images at the visualisation size), with ``vital.eval.metrics.auc_mad``:

  AUC  P(activation on the FV > activation on a top real image); 0.5 = like the top real
       images, 1 = above all of them
  MAD  (mean FV activation - mean over the top real images) / their std

Methods (``--methods``; ``name:key=value,...`` adds InnerCFG overrides):
  vital     InnerCFG defaults: top-k patch references, LRP-weighted sort matching + neuron term
  am        activation maximisation: fft, the neuron term only (no sort matching, no TV)

  nice python bench/inner_metrics.py                           # 10 neurons of blocks.10, lite0
  python bench/inner_metrics.py --neurons 3 --steps_multires 20 40 --out_dir /tmp/inner_bench
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import torch

from vital.eval import metrics
from vital.config import set_determinism
from vital.eval.inner_sweep import real_activations, report_table
from vital.modes.inner import InnerCFG, layer_patch_scores, resolve_target, run_neuron
from vital.refs.patches import data_files
from vital.models import load_target

DATA = REPO.parent / "shared" / "imagenet-dev"
METHODS = {
    "vital": {},
    "am": {"param": "fft", "feat_weight": 0.0, "neuron_weight": 1.0, "tv_weight": 0.0,
           "relevance": "none"},
}


def parse_method(text: str) -> tuple[str, dict]:
    """``vital`` or ``vital:lr=0.03,relevance=gradxact`` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    if name not in METHODS and not rest:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; built-in: {', '.join(METHODS)}")
    over = dict(METHODS.get(name, {}))
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        over[key] = json.loads(value) if value[:1] in "-0123456789[{tf" else value
    return name, over


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--layer", default="blocks.10")
    p.add_argument("--neurons", type=int, default=10, help="random channels of the layer")
    p.add_argument("--channels", type=int, nargs="*", default=[], help="these channels instead")
    p.add_argument("--data_dir", default=str(DATA if DATA.is_dir() else REPO / "references"))
    p.add_argument("--num_real", type=int, default=50, help="top real images per neuron")
    p.add_argument("--num_ref", type=int, default=20, help="top patches per neuron (VITAL)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps_multires", type=int, nargs="+", default=[60, 120])
    p.add_argument("--methods", type=parse_method, nargs="+",
                   default=[parse_method(m) for m in METHODS])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default="out_bench/inner_metrics")
    return p.parse_args(argv)


def pick_channels(args, channels: int) -> list[int]:
    if args.channels:
        return list(args.channels)
    gen = torch.Generator().manual_seed(args.seed)
    return sorted(torch.randperm(channels, generator=gen)[:args.neurons].tolist())


def make_cfg(args, neuron: int, name: str = "", over: dict | None = None) -> InnerCFG:
    return InnerCFG(model=args.model, layer=args.layer, neuron=neuron, data_dir=args.data_dir,
                    num_ref=args.num_ref, size=args.size,
                    steps_multires=list(args.steps_multires), save_steps=0, seed=args.seed,
                    out_dir=str(Path(args.out_dir) / name), run_name=f"n{neuron}",
                    progress=False, device="cpu", **(over or {}))


def run_method(args, target, neuron, name: str, over: dict, scores) -> tuple[torch.Tensor, float]:
    """One visualisation; (the channel's activation on it, seconds per step)."""
    cfg = make_cfg(args, neuron.index, name, over)
    set_determinism(cfg.seed, cfg.deterministic)
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir, result = run_neuron(cfg, target, neuron, patch_scores=scores)
    report = json.loads((run_dir / "neuron.json").read_text())
    return torch.tensor(report["visualisation"]), result.step_seconds


def comparison_grid(out: Path, channels: list[int], methods: list[str], tile: int = 128):
    """One row per neuron: its top reference patches (contact sheet), then each method's image."""
    from PIL import Image
    from vital.imaging import grid
    tiles, labels = [], []
    for channel in channels:
        sheet = next((out / m / f"n{channel}" / "references.png" for m in methods
                      if (out / m / f"n{channel}" / "references.png").is_file()), None)
        cells = [(sheet, f"n{channel} top patches")] + \
            [(out / m / f"n{channel}" / "final.png", m) for m in methods]
        for path, label in cells:
            img = Image.open(path).convert("RGB") if path is not None and path.is_file() \
                else Image.new("RGB", (tile, tile), "white")
            tiles.append(img.resize((tile, tile)))
            labels.append(label)
    return grid(tiles, labels, cols=1 + len(methods)) if tiles else None


def _settings(args) -> dict:
    return {**vars(args), "methods": [list(m) for m in args.methods]}


def finished_rows(out: Path, args) -> list[dict]:
    """Rows of an earlier run with the same settings (resume after a crash or a kill)."""
    path = out / "results.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data["rows"] if data.get("args") == json.loads(json.dumps(_settings(args))) else []


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = finished_rows(out, args)
    done = {(r["neuron"], r["method"]) for r in rows}
    target = load_target(args.model)
    real = real_activations(target, args.layer, data_files(args.data_dir), args.size)
    scores = functools.cache(lambda: layer_patch_scores(      # scored once, on a patch-cache miss
        make_cfg(args, 0), target, resolve_target(target, args.layer, 0)))
    for channel in pick_channels(args, real.shape[1]):
        neuron = resolve_target(target, args.layer, channel)
        top_real = real[:, channel].topk(min(args.num_real, len(real))).values
        for name, over in args.methods:
            if (channel, name) in done:
                continue
            started = time.time()
            fv, sec = run_method(args, target, neuron, name, over, scores)
            row = {"neuron": channel, "method": name, **metrics.auc_mad(fv, top_real),
                   "fv_activation": fv.tolist(), "real_mean": float(top_real.mean()),
                   "real_std": float(top_real.std()), "seconds_per_step": sec,
                   "seconds": time.time() - started}
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps({"args": _settings(args), "rows": rows},
                                                         indent=2))
    table = report_table([{"model": args.model, "layer": args.layer, **r} for r in rows])
    (out / "summary.md").write_text(table + "\n")
    sheet = comparison_grid(out, sorted({r["neuron"] for r in rows}), [m for m, _ in args.methods])
    if sheet is not None:
        sheet.save(out / "grid.png")
        print(f"grid: {out / 'grid.png'}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
