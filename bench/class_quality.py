#!/usr/bin/env python
"""Class visualisation quality on real class distributions, scored against held-out photos.

Per class of ``../shared/imagenette-dev`` (50 reference photos in ``refs/``, 50 held-out photos
in ``heldout/`` that are never references), every method renders the class with the same step
budget; every final image is scored by

- the visualised model: self top-1 / top-5, and logit AUC / MAD of the class logit on the
  visualisation against the held-out photos (paper app. B.1: AUC 0.5 / MAD 0 = like a real
  photo, higher = the class logit responds more than to real photos);
- an independently trained judge (``efficientnet-lite1``): top-1 / top-5, nearest-class-centroid
  top-1 (centroids of the held-out photos in the judge's penultimate features), and KID (unbiased)
  and FID of all visualisations of a method against the held-out photos of the same classes;
- "reference fidelity": FID against the very references that were matched (circular; kept only
  to show how closely a method copies its references).

Rows: mean ± std over seeds. The held-out photos themselves are the ceiling row. Runs resume
(a run folder with final.png is reused); ``--shard i/n`` splits the runs over processes.

  python bench/class_quality.py --size 224 --budget 300 --seeds 0 --out out_bench/class_quality
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from PIL import Image

from vital.config import with_recipe
from vital.eval import metrics
from vital.eval.heldout import HeldoutJudge, check_disjoint
from vital.imaging import grid, save_png
from vital.models import load_target
from vital.modes.class_mode import ClassCFG, run_class
from vital.refs.images import list_images, load_images

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "imagenette-dev"


def methods(budget: int) -> dict[str, tuple[str, dict]]:
    """name -> (recipe, overrides), all with ``budget`` optimisation steps."""
    multires = [budget // 3, budget - budget // 3]
    am = {"feat_weight": 0.0, "class_weight": 1.0, "tv_weight": 0.0, "steps_multires": multires}
    return {
        "paper": ("paper", {"steps": budget}),
        "toolkit": ("toolkit", {"steps_multires": multires}),
        # issue 27: the last stage ends when a 40-step window improves the loss by < 1 %
        "toolkit_early": ("toolkit", {"steps_multires": multires, "early_stop": 0.01}),
        "toolkit_pure": ("toolkit", {"steps_multires": multires, "class_weight": 0.0}),
        # issue 18: sort matching on a random quarter of the 112 x 112 layers' positions
        "toolkit_sub3136": ("toolkit", {"steps_multires": multires, "sort_positions": 3136}),
        "toolkit_bf16": ("toolkit", {"steps_multires": multires, "precision": "bf16"}),
        # issue 27: sort matching on 16-bit quantised keys (--sort_keys q16)
        "toolkit_q16": ("toolkit", {"steps_multires": multires, "sort_keys": "q16"}),
        # the flat "cubist" patches: coarse pyramid levels moving slower
        "toolkit_gain05": ("toolkit", {"steps_multires": multires, "pyramid_gain": 0.5}),
        "toolkit_gain07": ("toolkit", {"steps_multires": multires, "pyramid_gain": 0.7}),
        "toolkit_gain15": ("toolkit", {"steps_multires": multires, "pyramid_gain": 1.5}),
        "toolkit_gain20": ("toolkit", {"steps_multires": multires, "pyramid_gain": 2.0}),
        "am_fft": ("toolkit", {"param": "fft", **am}),
        "maco": ("toolkit", {"param": "maco", **am}),
    }


def read_classes(data: Path) -> list[dict]:
    rows = []
    for line in (data / "index.tsv").read_text().splitlines()[1:]:
        if line.strip():
            index, wnid, label, folder = line.split("\t")[:4]
            name = Path(folder).name
            rows.append({"index": int(index), "label": label, "name": name,
                         "refs": data / "refs" / name, "heldout": data / "heldout" / name})
    return rows


def run_one(args, row, method, recipe, over, seed) -> Path:
    run_dir = Path(args.out) / "runs" / method / f"seed{seed}" / row["name"]
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and json.loads(metrics_file.read_text()).get("status") == "finished":
        return run_dir
    if run_dir.exists():   # an interrupted run (it saved what existed): render it again
        import shutil
        shutil.rmtree(run_dir)
    cfg = with_recipe(ClassCFG, recipe, **{
        **over, "model": args.model, "target": str(row["index"]), "ref_dir": str(row["refs"]),
        "num_ref": 50, "size": args.size, "seed": seed, "save_steps": 0, "progress": False,
        "device": "cpu", "out_dir": str(run_dir.parent), "run_name": run_dir.name})
    run_class(cfg, ["bench/class_quality.py"])
    return run_dir


def read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
        return data.view(img.height, img.width, 3).permute(2, 0, 1).float()[None] / 255.0


def score(args, classes, names, seeds) -> tuple[dict, dict]:
    model, judge_model = load_target(args.model), load_target(args.judge)
    judge = HeldoutJudge(judge_model, {r["name"]: (r["index"], r["heldout"]) for r in classes})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = {r["name"]: load_images(list_images(r["refs"]), judge_model.input_size, 50)[0]
                for r in classes}
        held_own = {r["name"]: load_images(list_images(r["heldout"]), model.input_size, 50)[0]
                    for r in classes}
    with torch.no_grad():
        held_logits = {n: torch.cat([model(x) for x in imgs.split(16)]).float()
                       for n, imgs in held_own.items()}
    ref_feats = torch.cat([judge.run(refs[r["name"]])[0] for r in classes])
    table, tiles = {}, {}
    for name in names:
        per_seed = []
        for seed in seeds:
            images = {r["name"]: read_png(Path(args.out) / "runs" / name / f"seed{seed}"
                                          / r["name"] / "final.png") for r in classes}
            row = judge.score(images)
            own, auc, mad = [], [], []
            with torch.no_grad():
                for r in classes:
                    logits = model(images[r["name"]]).float()
                    own.append(metrics.topk_hits(logits, r["index"]))
                    am = metrics.auc_mad(logits[:, r["index"]], held_logits[r["name"]][:, r["index"]])
                    auc.append(am["auc"])
                    mad.append(am["mad"])
            fv_feats = torch.cat([judge.run(images[r["name"]])[0] for r in classes])
            row.update(self_top1=float(torch.cat([o[1] for o in own]).mean()),
                       self_top5=float(torch.cat([o[5] for o in own]).mean()),
                       logit_auc=sum(auc) / len(auc), logit_mad=sum(mad) / len(mad),
                       reference_fidelity=metrics.fid(fv_feats, ref_feats))
            per_seed.append(row)
            if seed == seeds[0]:
                tiles[name] = [images[r["name"]][0] for r in classes]
        table[name] = {k: metrics.mean_spread([p[k] for p in per_seed]) for k in per_seed[0]}
    ceiling = judge.ceiling()
    with torch.no_grad():
        own = [metrics.topk_hits(held_logits[r["name"]], r["index"]) for r in classes]
    ceiling.update(self_top1=float(torch.cat([o[1] for o in own]).mean()),
                   self_top5=float(torch.cat([o[5] for o in own]).mean()))
    table["(held-out photos)"] = {k: (v, 0.0) for k, v in ceiling.items()}
    return table, tiles


COLUMNS = [("self_top1", "self top-1"), ("self_top5", "self top-5"),
           ("judge_top1", "judge top-1"), ("judge_top5", "judge top-5"),
           ("centroid_top1", "centroid top-1"), ("kid_heldout", "KID held-out ↓"),
           ("fid_heldout", "FID held-out ↓"), ("logit_auc", "logit AUC"),
           ("logit_mad", "logit MAD"), ("reference_fidelity", "reference fidelity (FID vs refs)")]


def markdown(table: dict, n_seeds: int) -> str:
    head = "| method | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in table.items():
        cells = []
        for key, _ in COLUMNS:
            if key not in row:
                cells.append("–")
                continue
            mean, std = row[key]
            digits = 4 if key == "kid_heldout" else (1 if "fid" in key or "fidelity" in key
                                                       else 2)
            cells.append(f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n_seeds > 1
                                                  and std == std and std > 0 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--judge", default="efficientnet-lite1")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--budget", type=int, default=300, help="optimisation steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shard", default="", help="i/n: render every n-th run from i")
    parser.add_argument("--report", action="store_true", help="only score finished runs")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="out_bench/class_quality")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = read_classes(Path(args.data))[:args.classes]
    for r in classes:
        check_disjoint(list_images(r["refs"]), list_images(r["heldout"]))
    table_methods = methods(args.budget)
    names = args.methods or list(table_methods)
    runs = [(r, n, s) for s in args.seeds for n in names for r in classes]
    if not args.report:
        i, n = map(int, args.shard.split("/")) if args.shard else (0, 1)
        for k, (row, name, seed) in enumerate(runs):
            if k % n == i:
                recipe, over = table_methods[name]
                run_one(args, row, name, recipe, over, seed)
                print(f"done {name} seed {seed} {row['name']}", flush=True)
        if args.shard:
            return
    table, tiles = score(args, classes, names, args.seeds)
    out = Path(args.out)
    text = markdown(table, len(args.seeds))
    (out / "report.md").write_text(
        f"{args.model} at {args.size} px, {args.budget} steps per run, seeds {args.seeds}, "
        f"{len(classes)} classes of {args.data}; judge {args.judge}.\n\n{text}\n")
    (out / "report.json").write_text(json.dumps(
        {k: {m: list(v) for m, v in row.items()} for k, row in table.items()}, indent=2))
    from vital.imaging import to_pil
    sheet = grid([to_pil(t).resize((112, 112)) for n in names for t in tiles[n]],
                 [f"{n} {r['label'][:10]}" for n in names for r in classes], cols=len(classes))
    save_png(sheet, out / "grid.png")
    print(text)
    print(out / "grid.png")


if __name__ == "__main__":
    main()
