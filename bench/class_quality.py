#!/usr/bin/env python
"""Class visualisation quality: the VITAL paper's "accuracy" and "another model's opinion".

Per ImageNet class of ../shared/imagenet-dev (one real photo each), a reference folder of views
(crops, flips) is built in a temporary folder; every method renders the class with the same
budget and augmentations; the final image is classified by the visualised model (self top-1/5)
and by an independently trained judge (judge top-1/5). Methods (``name:key=value,...`` adds
ClassCFG overrides): vital (ClassCFG defaults), vital_pure (class_weight 0), baseline
(activation maximisation: fft, class log-probability only, no sort matching, no TV).

  python bench/class_quality.py --threads 1            # 10 classes, steps_multires 200 400
  python bench/class_quality.py --classes 5 15 --steps_multires 50 100 --methods vital:lr=0.03
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from vital.refs.bundled import views
from vital.modes.class_mode import ClassCFG, run_class
from vital.models import load_target
from vital.imaging import grid, to_pil
from vital.refs.images import load_image

DATA = REPO.parent / "shared" / "imagenet-dev"
METHODS = {
    "vital": {},
    "vital_pure": {"class_weight": 0.0},
    "baseline": {"param": "fft", "feat_weight": 0.0, "class_weight": 1.0, "tv_weight": 0.0},
}
PHOTO = "photo"  # the table's row for the real photo itself (centre crop): an upper bound


def read_index(data: Path) -> list[dict]:
    """Rows of index.tsv: class_index, wnid, label, file."""
    rows = []
    for line in (data / "index.tsv").read_text().splitlines():
        if line.strip():
            index, wnid, label, file = line.split("\t")
            rows.append({"index": int(index), "wnid": wnid, "label": label, "file": data / file})
    return rows


def pick_classes(rows: list[dict], wanted: list[int] | None) -> list[dict]:
    if not wanted:
        return rows[:10]
    by_index = {r["index"]: r for r in rows}
    unknown = [w for w in wanted if w not in by_index]
    if unknown:
        raise SystemExit(f"--classes {unknown} not in index.tsv; valid class indices: "
                         f"{', '.join(str(r['index']) for r in rows)}")
    return [by_index[w] for w in wanted]


def parse_method(text: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,...`` -> (label, ClassCFG overrides)."""
    name, _, extra = text.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    over = dict(METHODS[name])
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        if key not in ClassCFG.__dataclass_fields__:
            raise SystemExit(f"unknown ClassCFG field {key!r} in {text!r}")
        try:
            over[key] = json.loads(value)
        except json.JSONDecodeError:
            over[key] = value
    return text, over


def build_refs(row: dict, root: Path, n_views: int) -> Path:
    """root/<index>/view_XX.png: views (crops, flips) of the class's one photo."""
    folder = root / str(row["index"])
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(row["file"]) as img:
        for j, view in enumerate(views(img, n_views, size=256, seed=row["index"])):
            view.save(folder / f"view_{j:02d}.png")
    return folder


def run_name(label: str, row: dict, seed: int) -> str:
    return f"{label}_{row['index']}_s{seed}".replace(":", "+").replace(",", "+")


def render_one(label: str, over: dict, row: dict, seed: int, ref_dir: Path, args, runs: Path):
    """(final image (1, 3, H, W), optimisation seconds) of one method on one class."""
    cfg = ClassCFG(model=args.model, target=str(row["index"]), ref_dir=str(ref_dir),
                   num_ref=args.n_views, steps_multires=list(args.steps_multires), seed=seed,
                   save_steps=0, progress=False, out_dir=str(runs),
                   run_name=run_name(label, row, seed), **over)
    with contextlib.redirect_stdout(io.StringIO()):  # run_class prints the final path
        _, result = run_class(cfg)
    if result.stopped:
        print(f"warning: {row['label']} seed {seed} {over}: {result.stopped}", file=sys.stderr)
    return result.image[:1], result.step_seconds * result.steps_done


@torch.no_grad()
def top5(target, image: torch.Tensor) -> list[int]:
    """The model's five best classes for an image in [0, 1], resized to its input size."""
    size = target.input_size
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
    return target(image).topk(5, dim=-1).indices[0].tolist()


def score(models: dict, image: torch.Tensor, index: int) -> dict:
    """Top-1 / top-5 hits and the top-1 name of each model ("self", "judge")."""
    out = {}
    for who, target in models.items():
        best = top5(target, image)
        out.update({f"{who}_top1": best[0] == index, f"{who}_top5": index in best,
                    f"{who}_pred": target.class_names[best[0]]})
    return out


def table(records: list[dict], methods: list[str]) -> str:
    cols = ("self_top1", "self_top5", "judge_top1", "judge_top5")
    lines = ["| method | self top-1 | self top-5 | judge top-1 | judge top-5 | s/image |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method in [PHOTO] + methods:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        pct = [f"{100 * sum(r[c] for r in rows) / len(rows):.0f}%" for c in cols]
        secs = f"{sum(r['seconds'] for r in rows) / len(rows):.1f}" if method != PHOTO else "-"
        lines.append(f"| {method} | {' | '.join(pct)} | {secs} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--classes", type=int, nargs="*", help="ImageNet class indices listed in "
                   "index.tsv (first column); default: its first 10 rows")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="name or name:key=value,... (names: " + ", ".join(METHODS) + ")")
    p.add_argument("--steps_multires", type=int, nargs="+", default=[200, 400])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--judge", default="efficientnet-lite1")
    p.add_argument("--n_views", type=int, default=16, help="reference views per class photo")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=REPO / "out_bench" / "class_quality")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default; "
                   "on a busy shared machine 1 is much faster, see README)")
    p.add_argument("--work_dir", type=Path, help="references and runs (default: a temp folder, "
                   "removed at the end)")
    p.add_argument("--resume", action="store_true", help="keep the scores in --out's "
                   "partial.jsonl and the images in --work_dir/runs; render only the rest")
    p.add_argument("--merge", type=Path, nargs="+", help="print the table of these "
                   "class_quality.json files (shards of one run) together, render nothing")
    return p.parse_args(argv)


def merge(paths: list[Path]) -> str:
    """One table over several runs' class_quality.json (e.g. class shards)."""
    records, methods = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        records += data["records"]
        methods += [m for m in data["args"]["methods"] if m not in methods]
    return table(records, methods)


def photo_records(classes, models, tiles) -> list[dict]:
    """The ceiling: both models on each class's real photo (centre crop)."""
    out = []
    for row in classes:
        tiles[PHOTO, row["index"]] = load_image(row["file"], models["self"].input_size)[None]
        out.append({"method": PHOTO, "class": row["index"], "seed": 0, "seconds": 0.0,
                    **score(models, tiles[PHOTO, row["index"]], row["index"])})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        print(merge(args.merge))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = pick_classes(read_index(args.data), args.classes)
    if args.resume and args.work_dir is None:
        raise SystemExit("--resume needs the --work_dir of the interrupted run")
    methods = [parse_method(m) for m in args.methods]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vital_bench_"))
    models = {"self": load_target(args.model), "judge": load_target(args.judge)}
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "class_quality.partial.jsonl"  # progress that survives an interrupt
    tiles, done = {}, {}
    if args.resume and partial.exists():
        lines = partial.read_text().splitlines()
        done = {(r["method"], r["class"], r["seed"]): r for r in map(json.loads, lines)}
    elif partial.exists():
        partial.unlink()
    records = photo_records(classes, models, tiles) + list(done.values())
    jobs = [(m, row, s) for row in classes for m in methods for s in args.seeds]
    try:
        refs = {row["index"]: build_refs(row, work / "refs", args.n_views) for row in classes}
        for (label, over), row, seed in tqdm(jobs, desc="class quality", dynamic_ncols=True):
            if (label, row["index"], seed) in done:  # --resume: scored before, image on disk
                tiles.setdefault((label, row["index"]), load_image(
                    work / "runs" / run_name(label, row, seed) / "final.png",
                    models["self"].input_size)[None])
                continue
            image, secs = render_one(label, over, row, seed, refs[row["index"]], args,
                                     work / "runs")
            records.append({"method": label, "class": row["index"], "seed": seed,
                            "seconds": secs, **score(models, image, row["index"])})
            tiles.setdefault((label, row["index"]), image)
            with open(partial, "a") as log:
                log.write(json.dumps(records[-1]) + "\n")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    write_outputs(args, classes, [m for m, _ in methods], records, tiles)


def _tile_label(record: dict) -> str:
    """``self's top-1 / judge's top-1``, each prefixed + when right and - when wrong."""
    return " / ".join(("+" if record[f"{who}_top1"] else "-") + record[f"{who}_pred"]
                      for who in ("self", "judge"))


def write_outputs(args, classes, methods, records, tiles) -> None:
    text = table(records, methods)
    print(text)
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    note = f"grid rows, top to bottom: {', '.join([PHOTO] + methods)}; tiles: self / judge top-1"
    (args.out / "class_quality.md").write_text(f"{text}\n\n{note}\n")
    (args.out / "class_quality.json").write_text(json.dumps(
        {"args": setup, "records": records}, indent=1, default=str))
    rows = [PHOTO] + methods
    images = [to_pil(tiles[m, c["index"]]) for m in rows for c in classes]
    preds = {(r["method"], r["class"]): r for r in records if r["seed"] == args.seeds[0]}
    labels = [c["label"] if m == PHOTO else _tile_label(preds[m, c["index"]])
              for m in rows for c in classes]
    grid(images, labels, cols=len(classes)).save(args.out / "class_quality_grid.png")
    print(f"wrote {args.out}/class_quality.md, .json, _grid.png")


if __name__ == "__main__":
    main()
