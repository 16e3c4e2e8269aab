#!/usr/bin/env python
"""Inner neurons whose meaning is known: class directions at the last conv layer, scored
against held-out photos (issue 22).

For each class k of ``../shared/imagenette-dev`` the target is the direction of row k of the
visualised model's ``fc`` weights, read at the 1280-channel ``head`` layer (the mean over
positions of the projection on it is class k's logit up to its bias and a scale), with a probe
folder of the 500 reference photos of imagenette-dev + the 100 photos of imagenet-dev (the
top-50 patches for the direction are chosen from these). Every method renders the 10
directions with the same step budget; every final image is scored by

- an independently trained judge (``efficientnet-lite1``): top-1 / top-5 for class k,
  nearest-class-centroid top-1 and KID / FID against the class's 50 held-out photos
  (``heldout/``, never probe photos);
- the visualised model: top-1 of class k;
- sharpness (mean grey-level gradient per px) and colourfulness (Hasler & Süsstrunk) of the
  picture divided by the mean of its 50 reference patches' at their native resolution (as cut
  from the 224 px photos, not upscaled): 1 = as sharp / colourful as the references;
- AUC / MAD in the paper's reading (app. B.1): the direction's score on the picture against its
  score on the 50 probe photos that score highest (whole photos at 224 px).

Methods: ``inner:<name>`` rows are inner mode with overrides; ``class`` is class mode on the
same classes with their 50 reference photos (the ceiling), ``am`` activation maximisation of
the direction (the floor). Runs resume; ``--shard i/n`` splits them over processes; ``--report``
scores the finished runs into ``report.md``, ``report.json`` and ``grid.png``.

  OMP_NUM_THREADS=1 python bench/inner_quality.py --budget 240 --seeds 0 --threads 1 \\
      --methods toolkit images --shard 0/2 --out out_bench/inner_quality
  python bench/inner_quality.py --budget 240 --seeds 0 --methods toolkit images --report \\
      --out out_bench/inner_quality
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from class_quality import DATA, read_classes, read_png
from vital.config import with_recipe
from vital.eval import metrics
from vital.eval.heldout import HeldoutJudge, check_disjoint
from vital.imaging import grid, save_png, to_pil
from vital.models import load_target
from vital.modes.class_mode import ClassCFG, run_class
from vital.modes.inner import InnerCFG, resolve_target, run_inner
from vital.refs.images import list_images, load_image, load_images
from vital.refs.patches import channel_means

LAYER = "head"


def methods(budget: int) -> dict[str, tuple[str, str, dict]]:
    """name -> (mode, recipe, overrides), all with ``budget`` optimisation steps."""
    multires = {"steps_multires": [budget // 3, budget - budget // 3]}
    return {
        "toolkit": ("inner", "toolkit", multires),
        "images": ("inner", "toolkit", {**multires, "ref_kind": "images"}),
        # the top patches matched themselves (before issue 22) / at their own size
        "patches": ("inner", "toolkit", {**multires, "ref_kind": "patches", "ref_rank": "patch"}),
        "native": ("inner", "toolkit", {**multires, "ref_res": "native", "ref_rank": "patch"}),
        # the default before whole-image ranking (2026-12-04)
        "patchrank": ("inner", "toolkit", {**multires, "ref_rank": "patch",
                                           "neuron_weight": 1.0}),
        "floor0": ("inner", "toolkit", {**multires, "relevance_floor": 0.0}),
        "none": ("inner", "toolkit", {**multires, "relevance": "none"}),
        "nw1": ("inner", "toolkit", {**multires, "neuron_weight": 1.0}),
        "nw0": ("inner", "toolkit", {**multires, "neuron_weight": 0.0}),
        "gain15": ("inner", "toolkit", {**multires, "pyramid_gain": 1.5}),
        "paper": ("inner", "paper", {"steps": budget}),
        "am": ("inner", "toolkit", {**multires, "param": "fft", "feat_weight": 0.0,
                                    "neuron_weight": 1.0, "tv_weight": 0.0,
                                    "relevance": "none"}),
        "class": ("class", "toolkit", multires),
    }


def parse_method(text: str, budget: int) -> tuple[str, tuple[str, str, dict]]:
    """``toolkit`` or ``toolkit:ref_kind=images,neuron_weight=1`` (a built-in method with
    overrides, named as written)."""
    base, _, rest = text.partition(":")
    table = methods(budget)
    if base not in table:
        raise SystemExit(f"unknown method {base!r}; built-in: {', '.join(table)}")
    mode, recipe, over = table[base]
    over = dict(over)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        over[key] = json.loads(value) if value[:1] in "-0123456789[{tf" else value
    return text.replace(":", "_").replace(",", "_").replace("=", ""), (mode, recipe, over)


def probe_folder(data: Path, out: Path) -> Path:
    """The probe folder: links to imagenette-dev's reference photos and imagenet-dev's photos
    (links, not copies; never the held-out photos)."""
    folder = out / "probe"
    if folder.is_dir():
        return folder
    # one temporary folder per process: shards started together each build one, the first
    # rename wins and the others' copies are dropped
    tmp = out / f"probe.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    folders = sorted(p for p in (data / "refs").iterdir() if p.is_dir())
    sources = [f for folder in folders for f in list_images(folder)] + \
        list_images(data.parent / "imagenet-dev")
    for src in sources:
        (tmp / f"{src.parent.name}__{src.name}").symlink_to(src.resolve())
    try:
        tmp.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def direction_file(model, index: int, out: Path) -> Path:
    path = out / "directions" / f"fc_row_{index}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fc = dict(model.module.named_modules())["fc"]
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.npy")   # shards: no half-written file
        np.save(tmp, fc.weight[index].detach().double().cpu().numpy())
        os.replace(tmp, path)
    return path


def run_dir_of(out: Path, name: str, seed: int, row: dict) -> Path:
    return out / "runs" / name / f"seed{seed}" / row["name"]


def run_one(args, model, row, name, spec, seed, probe: Path) -> Path:
    run_dir = run_dir_of(Path(args.out), name, seed, row)
    done = run_dir / "metrics.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "finished":
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)   # an interrupted run: render it again
    mode, recipe, over = spec
    over = dict(over)
    # probe=class: the class's own reference photos are the probe folder (the top-50 are then
    # exactly class mode's references: the neuron term and the matching, not the references,
    # differ from class mode)
    data_dir = row["refs"] if over.pop("probe", "") == "class" else probe
    common = {"model": args.model, "size": args.size, "seed": seed, "save_steps": 0,
              "progress": False, "device": "cpu", "out_dir": str(run_dir.parent),
              "run_name": run_dir.name}
    if mode == "class":
        cfg = with_recipe(ClassCFG, recipe, **{"num_ref": 50, **over, **common,
                                               "target": str(row["index"]),
                                               "ref_dir": str(row["refs"])})
        run_class(cfg, ["bench/inner_quality.py"])
    else:
        cfg = with_recipe(InnerCFG, recipe, **{
            "num_ref": 50, **over, **common, "layer": LAYER, "data_dir": str(data_dir),
            "direction": str(direction_file(model, row["index"], Path(args.out)))})
        run_inner(cfg, ["bench/inner_quality.py"])
    return run_dir


# ---------------------------------------------------------------- scoring

def reference_stats(run_dir: Path, size: int) -> dict:
    """Sharpness and colourfulness of the run's top patches at their native resolution (cut
    again from the photos at the size they were cut at; class mode: its reference photos)."""
    meta = json.loads((run_dir / "config.json").read_text())
    refs = meta.get("references")
    if refs and "patch" in refs:   # inner mode (class mode records its reference photos)
        patch, crop = refs["patch"], refs.get("crop", 1.0)
        # runs made before the patch cache stored indexes may name a path relative to another
        # working directory: the photo is the probe folder's file of the same name
        probe = Path(meta["cfg"]["data_dir"])
        sources = [src if Path(src).is_file() else probe / Path(src).name
                   for src in refs["sources"]]
        tiles = [load_image(src, refs["size"], crop)[:, r:r + patch, c:c + patch]
                 for src, (r, c) in zip(sources, refs["corners"])]
        images = torch.stack(tiles)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images, _ = load_images(list_images(meta["cfg"]["ref_dir"]), size, 50)
    return {"sharpness": float(metrics.sharpness(images).mean()),
            "colourfulness": float(metrics.colourfulness(images).mean())}


def probe_means(model, probe: Path, size: int) -> torch.Tensor:
    """(N, C) every channel's mean at ``LAYER`` on every probe photo (whole photos at ``size``
    px); a direction's score is their projection."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, _ = load_images(list_images(probe), size)
    return channel_means(model, LAYER, "BCHW", images)


def score(args, classes, names, seeds, probe: Path) -> tuple[dict, dict]:
    out = Path(args.out)
    model, judge_model = load_target(args.model), load_target(args.judge)
    judge = HeldoutJudge(judge_model, {r["name"]: (r["index"], r["heldout"]) for r in classes})
    neurons = {r["name"]: resolve_target(model, LAYER, direction=str(
        direction_file(model, r["index"], out))) for r in classes}
    means = probe_means(model, probe, args.size)
    top_real = {n: neuron.score_means(means).topk(50).values for n, neuron in neurons.items()}
    table, tiles = {}, {}
    for name in names:
        per_seed = []
        for seed in seeds:
            dirs = {r["name"]: run_dir_of(out, name, seed, r) for r in classes}
            images = {n: read_png(d / "final.png") for n, d in dirs.items()}
            row = judge.score(images)
            self_top1, auc, mad, sharp, colour = [], [], [], [], []
            with torch.no_grad():
                for r in classes:
                    n, image = r["name"], images[r["name"]]
                    self_top1.append(float(metrics.topk_hits(model(image).float(),
                                                             r["index"])[1][0]))
                    means = channel_means(model, LAYER, neurons[n].layout, image)
                    am = metrics.auc_mad(neurons[n].score_means(means), top_real[n])
                    auc.append(am["auc"])
                    mad.append(am["mad"])
                    ref = reference_stats(dirs[n], args.size)
                    sharp.append(float(metrics.sharpness(image)[0]) / ref["sharpness"])
                    colour.append(float(metrics.colourfulness(image)[0]) / ref["colourfulness"])
            row.update(self_top1=sum(self_top1) / len(self_top1), auc=float(np.mean(auc)),
                       mad=float(np.mean(mad)), sharpness_ratio=float(np.mean(sharp)),
                       colour_ratio=float(np.mean(colour)))
            per_seed.append(row)
            if seed == seeds[0]:
                tiles[name] = [images[r["name"]][0] for r in classes]
        table[name] = {k: metrics.mean_spread([p[k] for p in per_seed]) for k in per_seed[0]}
    ceiling = judge.ceiling()
    table["(held-out photos)"] = {k: (v, 0.0) for k, v in ceiling.items()}
    return table, tiles


COLUMNS = [("judge_top1", "judge top-1"), ("judge_top5", "judge top-5"),
           ("centroid_top1", "centroid top-1"), ("kid_heldout", "KID held-out ↓"),
           ("fid_heldout", "FID held-out ↓"), ("self_top1", "self top-1"),
           ("sharpness_ratio", "sharpness / refs"), ("colour_ratio", "colourfulness / refs"),
           ("auc", "AUC"), ("mad", "MAD")]


def markdown(table: dict, n_seeds: int) -> str:
    lines = ["| method | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in table.items():
        cells = []
        for key, _ in COLUMNS:
            if key not in row:
                cells.append("–")
                continue
            mean, std = row[key]
            digits = 4 if key == "kid_heldout" else (1 if key == "fid_heldout" else 2)
            cells.append("–" if mean != mean else f"{mean:.{digits}f}" + (
                f" ± {std:.{digits}f}" if n_seeds > 1 and std == std and std > 0 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--judge", default="efficientnet-lite1")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--budget", type=int, default=240, help="optimisation steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["toolkit", "class", "am"])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shard", default="", help="i/n: render every n-th run from i")
    parser.add_argument("--report", action="store_true", help="only score finished runs")
    parser.add_argument("--report_name", default="report",
                        help="file stem of the report (.md, .json, _grid.png)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="out_bench/inner_quality")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = Path(args.data)
    classes = read_classes(data)[:args.classes]
    for r in classes:
        check_disjoint(list_images(r["refs"]), list_images(r["heldout"]))
    probe = probe_folder(data, out)
    specs = dict(parse_method(m, args.budget) for m in args.methods)
    if not args.report:
        model = load_target(args.model)
        runs = [(r, n, s) for s in args.seeds for n in specs for r in classes]
        i, n = map(int, args.shard.split("/")) if args.shard else (0, 1)
        for k, (row, name, seed) in enumerate(runs):
            if k % n == i:
                run_one(args, model, row, name, specs[name], seed, probe)
                print(f"done {name} seed {seed} {row['name']}", flush=True)
        if args.shard:
            return 0
    table, tiles = score(args, classes, list(specs), args.seeds, probe)
    text = markdown(table, len(args.seeds))
    (out / f"{args.report_name}.md").write_text(
        f"{args.model} at {args.size} px, {args.budget} steps per run, seeds {args.seeds}, "
        f"fc-row directions at {LAYER} for {len(classes)} classes of {args.data}; judge "
        f"{args.judge}.\n\n{text}\n")
    (out / f"{args.report_name}.json").write_text(json.dumps(
        {k: {m: list(v) for m, v in row.items()} for k, row in table.items()}, indent=2))
    sheet = grid([to_pil(t).resize((112, 112)) for n in specs for t in tiles[n]],
                 [f"{n[:12]} {r['label'][:9]}" for n in specs for r in classes],
                 cols=len(classes))
    save_png(sheet, out / f"{args.report_name}_grid.png")
    print(text)
    print(out / f"{args.report_name}_grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
