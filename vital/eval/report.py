"""The evaluation report: merge every result.json under a sweep folder (from one process or many
shards), refuse runs made with different settings, and write ``report/``: ``report.md`` (metric
tables, mean and spread over seeds), ``summary.json``, ``grid_<model>.png`` (rows = methods,
columns = targets) and ``curves_<model>.png`` (accuracy of the saved steps vs. step).
"""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from vital.eval import metrics
from vital.config import ConfigError
from vital.cache import write_json
from vital.eval.sweep import FEATURES_FILE, RESULT_FILE, flat_diff, settings_diff, slug
from vital.imaging import grid, save_png

QUALITY = [("self_top1", "self top-1"), ("self_top5", "self top-5"),
           ("judge_top1", "judge top-1"), ("judge_top5", "judge top-5"),
           ("clip_top1", "CLIP top-1"), ("clip_top5", "CLIP top-5"),
           ("centroid_top1", "centroid top-1"), ("kid_heldout", "KID held-out ↓"),
           ("fid_heldout", "FID held-out ↓"), ("class_auc", "logit AUC"),
           ("class_mad", "logit MAD"), ("fid", "reference fidelity (FID vs refs) ↓"),
           ("heldout_judge_top1", "held-out judge top-1"),
           ("heldout_judge_top5", "held-out judge top-5")]
COST = [("seconds_per_step", "s / step"), ("seconds_per_image", "s / image"),
        ("seconds_run", "s / run (with setup)")]
CURVES = [("self_top1", "self top-1"), ("self_prob", "self p(class)"),
          ("judge_top1", "judge top-1"), ("judge_prob", "judge p(class)")]
REAL_ROW = "(reference images)"
_TILE = 160   # px per grid tile


# ---------------------------------------------------------------- collection

def collect(out_dir: str | Path) -> list[dict]:
    """Every finished run under ``out_dir`` in sweep order; each gets ``_dir`` (its folder)."""
    found = []
    for path in sorted(Path(out_dir).rglob(RESULT_FILE)):
        if "report" in path.relative_to(out_dir).parts[:1]:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"warning: skipping unreadable {path}: {err}", file=sys.stderr)
            continue
        record["_dir"] = path.parent
        found.append(record)
    return sorted(found, key=lambda r: (r["index"], str(r["_dir"])))


def _where(record: dict) -> str:
    return f"{record['model']}/{record['target']}/{record['method']}/seed{record['seed']}"


def check_mergeable(records: list[dict]) -> None:
    """All runs share their base settings, and runs of one method share its overrides."""
    first = records[0]
    for other in records[1:]:
        keys = settings_diff(first["base_settings"], other["base_settings"])
        if keys:
            raise ConfigError(f"cannot merge runs made with different settings: {', '.join(keys)} "
                              f"differ between {_where(first)} and {_where(other)}")
    by_method: dict[str, dict] = {}
    for record in records:
        seen = by_method.setdefault(record["method"], record)
        keys = flat_diff(seen["method_overrides"], record["method_overrides"])
        if keys:
            raise ConfigError(f"cannot merge runs of method {record['method']!r} made with "
                              f"different overrides: {', '.join(keys)} differ between "
                              f"{_where(seen)} and {_where(record)}")
        dup = [r for r in records if r is not record and _where(r) == _where(record)]
        if dup:
            raise ConfigError(f"run {_where(record)} appears twice: in {record['_dir']} and "
                              f"{dup[0]['_dir']}")


# ---------------------------------------------------------------- aggregation

def _ordered(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _fid_of(runs: list[dict], shrinkage: float) -> tuple[float, dict]:
    """FID of all FVs of these runs against the references of their targets (once each)."""
    fv, real, seen = [], [], set()
    for record in runs:
        feats = load_file(str(record["_dir"] / record.get("features", FEATURES_FILE)))
        fv.append(feats["fv"])
        if record["target"] not in seen:
            seen.add(record["target"])
            real.append(feats["real"])
    fv, real = torch.cat(fv), torch.cat(real)
    info = metrics.fid_rank(fv.shape[0], real.shape[0], fv.shape[1])
    if fv.shape[0] < 2 or real.shape[0] < 2:
        return math.nan, {**info, "note": "fewer than 2 FVs or references"}
    return metrics.fid(fv, real, shrinkage=shrinkage), info


def _heldout_of(runs: list[dict]) -> dict:
    """KID and FID of all FVs of these runs against the held-out photos of their targets, in
    the judge's features (runs scored with --heldout_root only)."""
    fv, real, seen = [], [], set()
    for record in runs:
        feats = load_file(str(record["_dir"] / record.get("features", FEATURES_FILE)))
        if "heldout" not in feats:
            return {}
        fv.append(feats["fv_judge"])
        if record["target"] not in seen:
            seen.add(record["target"])
            real.append(feats["heldout"])
    fv, real = torch.cat(fv), torch.cat(real)
    if fv.shape[0] < 2:
        return {}
    return {"kid_heldout": metrics.kid(fv, real), "fid_heldout": metrics.fid(fv, real)}


def _per_seed(runs: list[dict], shrinkage: float) -> dict[int, dict]:
    """Seed -> metric -> mean over the targets (FID: one value over all targets)."""
    out = {}
    for seed in _ordered(r["seed"] for r in runs):
        group = [r for r in runs if r["seed"] == seed]
        values = {}
        for key, _ in QUALITY + COST:
            got = [r["metrics"][key] for r in group if key in r["metrics"]]
            if got:
                values[key] = metrics.mean_spread(got)[0]
        values["fid"], values["_fid_info"] = _fid_of(group, shrinkage)
        values.update(_heldout_of(group))
        out[seed] = values
    return out


def _over_seeds(per_seed: dict[int, dict]) -> dict[str, list]:
    keys = {k for v in per_seed.values() for k in v if not k.startswith("_")}
    return {k: [*metrics.mean_spread(v[k] for v in per_seed.values() if k in v),
                len(per_seed)] for k in sorted(keys)}


def _real_row(runs: list[dict]) -> dict[str, list]:
    per_target = {}
    for record in runs:
        per_target.setdefault(record["target"], record.get("real", {}))
    keys = {k for v in per_target.values() for k in v}
    return {k: [metrics.mean_spread(v[k] for v in per_target.values() if k in v)[0], 0.0, 1]
            for k in sorted(keys)}


def _curves(runs: list[dict]) -> dict[str, dict[int, float]]:
    """Metric -> step -> mean over the runs' saved steps."""
    sums: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for record in runs:
        for row in record.get("curve", []):
            for key, _ in CURVES:
                if key in row:
                    sums[key][row["step"]].append(row[key])
    return {k: {s: sum(v) / len(v) for s, v in sorted(steps.items())} for k, steps in sums.items()}


def summarise(records: list[dict]) -> dict:
    """Per model: methods, targets, seeds, per-method metrics (mean, spread, n seeds), the
    reference images' row, curves and FID rank information."""
    shrinkage = records[0]["base_settings"]["eval"].get("fid_shrinkage", 0.0)
    out = {}
    for model in _ordered(r["model"] for r in records):
        runs = [r for r in records if r["model"] == model]
        methods = _ordered(r["method"] for r in runs)
        rows, fid_info, curves = {}, {}, {}
        for method in methods:
            group = [r for r in runs if r["method"] == method]
            per_seed = _per_seed(group, shrinkage)
            rows[method] = _over_seeds(per_seed)
            fid_info[method] = next(iter(per_seed.values()))["_fid_info"]
            curves[method] = _curves(group)
        out[model] = {"methods": methods, "targets": _ordered(r["target"] for r in runs),
                      "seeds": _ordered(r["seed"] for r in runs), "rows": rows,
                      "real": _real_row(runs), "fid_info": fid_info, "curves": curves,
                      "runs": len(runs)}
    return out


# ---------------------------------------------------------------- markdown

def _cell(value) -> str:
    if value is None:
        return "–"
    mean, spread, n = value
    if mean is None or not math.isfinite(mean):
        return "–"
    digits = 1 if abs(mean) >= 10 else 2
    text = f"{mean:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if n > 1 else "")


def _table(columns, rows: dict[str, dict]) -> list[str]:
    lines = ["| method | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |")
    return lines


def _columns(summary: dict, candidates) -> list:
    present = {k for model in summary.values() for row in model["rows"].values() for k in row}
    return [(k, t) for k, t in candidates if k in present]


def _header(records: list[dict]) -> list[str]:
    base = records[0]["base_settings"]
    ev, cls = base["eval"], base["class"]
    steps = cls["steps"] if cls.get("steps") else cls.get("steps_multires")
    lines = ["# Evaluation report", "",
             f"{len(records)} runs. Judge: `{ev['judge']}`; FID features: penultimate layer "
             f"of `{ev['fid_model']}`" + (f"; CLIP zero-shot: `{ev['clip_judge']}`"
                                          if ev.get("clip_judge") else "") + ".",
             f"Budget for every method: steps {steps}, size {cls.get('size') or 'model input'}, "
             f"batch {cls.get('batch')}, augmentation jitter {cls.get('jitter')} / scales "
             f"{cls.get('scales')} / flip {cls.get('flip')}."]
    overrides = {r["method"]: r["method_overrides"] for r in records}
    lines += ["", "Methods (ClassCFG overrides): " + "; ".join(
        f"`{name}` {json.dumps(o, sort_keys=True)}" for name, o in overrides.items()) + "."]
    return lines


def _notes(model: dict) -> list[str]:
    info = next(iter(model["fid_info"].values()))
    rank = (f"covariances have rank <= {min(info['rank_a'], info['rank_b'])} of {info['dim']} "
            f"dimensions (rank-deficient: compare FID only within this table)"
            if info["rank_deficient"] else f"{info['dim']}-dimensional features")
    return ["", f"Mean ± spread (std) over {len(model['seeds'])} seed(s) of the per-seed mean "
            f"over {len(model['targets'])} targets. FID: per seed, all FVs of a method against "
            f"all reference images of the targets; {rank}. Logit AUC / MAD: the class logit "
            f"of the visualised model on the FV against its values on the class's reference "
            f"images (AUC 0.5 and MAD 0 = like a real image; see vital/metrics.py)."]


def markdown(records: list[dict], summary: dict, missing: list[str]) -> str:
    quality, cost = _columns(summary, QUALITY), _columns(summary, COST)
    lines = _header(records)
    if missing:
        lines += ["", f"**Incomplete:** {len(missing)} run(s) of the sweep have no result yet."]
    for name, model in summary.items():
        rows = {**model["rows"], REAL_ROW: model["real"]}
        lines += ["", f"## {name}", "", f"Targets: {', '.join(model['targets'])}.", ""]
        lines += _table(quality, rows) + _notes(model)
    lines += ["", "## Cost", ""]
    for name, model in summary.items():
        lines += [f"{name}:", ""] + _table(cost, model["rows"]) + [""]
    lines += ["## Figures", ""]
    for name in summary:
        lines += [f"![grid {name}](grid_{_file(name)}.png)",
                  f"![curves {name}](curves_{_file(name)}.png)", ""]
    return "\n".join(lines) + "\n"


def _file(name: str) -> str:
    return slug(name)


# ---------------------------------------------------------------- figures

def _grid_png(records: list[dict], model: dict, name: str, path: Path) -> None:
    """Rows = methods, columns = targets, first seed; a missing run is a grey tile."""
    seed = model["seeds"][0]
    found = {(r["method"], r["target"]): r["_dir"] for r in records
             if r["model"] == name and r["seed"] == seed}
    tiles, labels = [], []
    for method in model["methods"]:
        for target in model["targets"]:
            folder = found.get((method, target))
            final = folder / "final.png" if folder else None
            tile = Image.open(final).convert("RGB") if final and final.is_file() else \
                Image.new("RGB", (_TILE, _TILE), "grey")
            tiles.append(tile.resize((_TILE, _TILE), Image.BICUBIC))
            labels.append(f"{method} | {target}")
    save_png(grid(tiles, labels, cols=len(model["targets"])), path)


def _curves_png(model: dict, name: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, CURVES):
        for method, curves in model["curves"].items():
            points = curves.get(key, {})
            if points:
                ax.plot(list(points), list(points.values()), marker="o", label=method)
        ax.set_title(title)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{name}: saved steps, mean over targets and seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- entry point

def _missing(records: list[dict], expected) -> list[str]:
    if not expected:
        return []
    have = {_where(r) for r in records}
    keys = [f"{r.model}/{r.target}/{r.method}/seed{r.seed}" for r in expected]
    if not have & set(keys):
        return []   # the results are of another sweep: nothing to compare with
    return [k for k in keys if k not in have]


def write_report(out_dir: str | Path, expected=None) -> Path:
    """Merge the results under ``out_dir`` into ``out_dir/report/``; returns report.md's path.
    ``expected`` (the sweep's runs) only serves to name runs that have no result yet."""
    records = collect(out_dir)
    if not records:
        raise ConfigError(f"no {RESULT_FILE} under {out_dir}: run the sweep first")
    check_mergeable(records)
    missing = _missing(records, expected)
    if missing:
        print(f"warning: {len(missing)} run(s) have no result yet, e.g. {missing[0]}",
              file=sys.stderr)
    summary = summarise(records)
    folder = Path(out_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in summary.items():
        _grid_png(records, model, name, folder / f"grid_{_file(name)}.png")
        _curves_png(model, name, folder / f"curves_{_file(name)}.png")
    write_json(folder / "summary.json", summary)
    path = folder / "report.md"
    path.write_text(markdown(records, summary, missing))
    return path
