"""An evaluation sweep: its settings (``EvalCFG``, the entries of a sweep file), its expansion
into runs (models x targets x methods x seeds, in a fixed order), shards, and the settings that
decide whether a finished run can be reused or merged. Executed by ``vital.eval.harness``.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from vital import config
from vital.modes.class_mode import ClassCFG
from vital.config import ConfigError, Overrides, opt
from vital.eval import engine
from vital.eval.launchers import LaunchCFG
from vital.eval.engine import RESULT_FILE, flat_diff, settings_hash  # noqa: F401 (re-exported)

FEATURES_FILE = "fid_features.safetensors"
METRICS_VERSION = 1   # bump when a metric changes: old results then no longer match

# Methods compared in the VITAL paper's Table 1, as ClassCFG overrides (same budget and
# augmentations for all; the activation-maximisation baselines drop sort matching and TV).
BUILTIN_METHODS: dict[str, dict] = {
    "vital": {},
    "vital_pure": {"class_weight": 0.0},
    "am_fft": {"param": "fft", "feat_weight": 0.0, "class_weight": 1.0, "tv_weight": 0.0},
    "maco": {"param": "maco", "feat_weight": 0.0, "class_weight": 1.0, "tv_weight": 0.0},
    "paper": {"recipe": "paper"},   # the official VITAL code's settings (vital/modes/recipes.py)
}
AXIS_KEYS = ("model", "target", "ref_dir", "seed")
# set by the harness for every run; a sweep may not override them
RESERVED_KEYS = AXIS_KEYS + ("out_dir", "run_name", "device", "progress")
# do not change what a run computes, so they are left out of its settings hash
NON_RESULT_KEYS = ("device", "progress", "out_dir", "run_name", "cache", "prompts_file", "top_k")
_NAME = re.compile(r"^[A-Za-z0-9_.+=-]+$")


# ---------------------------------------------------------------- entries of the sweep file

def _check_keys(entry: dict, valid: tuple, what: str) -> None:
    unknown = [k for k in entry if k not in valid]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown key(s) {unknown} in {what} {entry!r}; "
                                         f"valid keys: {', '.join(valid)}")


class TargetSpec:
    """A target: ``"espresso"`` (references in ``ref_root/espresso``), ``"espresso=DIR"`` or
    ``{"target": "espresso", "ref_dir": "DIR"}``. Parsing returns a plain dict."""

    def __new__(cls, value) -> dict:
        if isinstance(value, dict):
            _check_keys(value, ("target", "ref_dir"), "target")
            if "target" not in value:
                raise argparse.ArgumentTypeError(f"target entry {value!r} needs a 'target' key")
            return {"target": str(value["target"]), "ref_dir": str(value.get("ref_dir") or "")}
        name, _, ref_dir = str(value).partition("=")
        if not name.strip():
            raise argparse.ArgumentTypeError(f"empty target in {value!r}")
        return {"target": name.strip(), "ref_dir": ref_dir.strip()}


class MethodSpec:
    """A method: a built-in name (``vital``, ``vital_pure``, ``am_fft``, ``maco``) or
    ``{"name": ..., "overrides": {ClassCFG key: value}, "base": built-in name (optional)}``."""

    def __new__(cls, value) -> dict:
        if isinstance(value, dict):
            _check_keys(value, ("name", "overrides", "base"), "method")
            overrides = value.get("overrides", {})
            if "name" not in value or not isinstance(overrides, (dict, type(None))):
                raise argparse.ArgumentTypeError(f"method entry {value!r} needs a 'name' and "
                                                 f"an 'overrides' object")
            return {"name": str(value["name"]),   # overrides None: a built-in by name
                    "overrides": None if overrides is None else dict(overrides),
                    "base": str(value.get("base") or "")}
        return {"name": str(value).strip(), "overrides": None, "base": ""}


def parsed(kind, value):
    """``kind(value)`` with its complaint as a ConfigError (entries built in Python skip the
    command-line parser)."""
    try:
        return kind(value)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(str(err)) from None


@dataclass
class EvalCFG(LaunchCFG):
    """Evaluation sweep: models x targets x methods x seeds of class visualisations, scored
    with the VITAL paper's metrics. Precedence: defaults < --json_cfg SWEEP.json < command line."""
    out_dir: str = opt("out_eval/sweep", "sweep folder: runs, result.json files and report/")
    mode: str = opt("class", "class: class visualisations scored by accuracy, judge, FID; "
                    "inner: inner neurons of --layer scored by AUC / MAD against their top "
                    "real images (paper appendix B.1)", choices=["class", "inner"])
    models: list[str] = opt(["efficientnet-lite0"], "visualised models (model specs)")
    targets: list[TargetSpec] = opt(["espresso"], "classes: NAME (refs in ref_root/NAME), "
                                    "NAME=REF_DIR, or in JSON {target, ref_dir}")
    ref_root: str = opt("references", "parent folder of per-class reference folders")
    methods: list[MethodSpec] = opt(list(BUILTIN_METHODS), "built-in methods "
                                    f"({', '.join(BUILTIN_METHODS)}) or in JSON "
                                    "{name, overrides, base}")
    seeds: list[int] = opt([0], "random seeds")
    settings: Overrides = opt({}, "ClassCFG (inner mode: InnerCFG) settings for every run, "
                              "e.g. steps_multires=[100,200],num_ref=12 (JSON: an object)")
    heldout_root: str = opt("", "folder of held-out photos, one sub-folder per target named "
                            "like its reference folder (never references: a file equal to a "
                            "reference is refused); adds KID / FID against them and "
                            "nearest-centroid top-1 to the report")
    judge: str = opt("efficientnet-lite1", "second classifier ('another model's opinion')")
    fid_model: str = opt("", "model whose penultimate features FID compares (empty = judge)")
    clip_judge: str = opt("", "CLIP model for zero-shot top-1/top-5 (empty = none)")
    fid_shrinkage: float = opt(0.0, "covariance shrinkage toward a scaled identity for FID")
    layer: str = opt("", "inner mode: the layer whose neurons (channels) are visualised")
    neurons: list[int] = opt([], "inner mode: these channels of --layer")
    random_neurons: int = opt(10, "inner mode without --neurons: this many channels drawn "
                              "with seed 0")
    data_dir: str = opt("", "inner mode: images for the top patches (references) and the top "
                        "real images the metrics compare with")
    num_real: int = opt(50, "inner mode: top real images per neuron for AUC / MAD")
    batch_size: int = opt(4, "runs that differ only in their target (class targets; inner "
                          "mode: neurons of --layer) rendered together in one batched "
                          "optimisation, this many at a time (1 = one at a time); a batch is "
                          "the unit of --shard and of a launcher's task", low=1)
    shard: str = opt("", "i/n: run every n-th batch of runs starting at i (0 <= i < n); "
                     "no report")
    report: bool = opt(False, "only merge the result.json files under out_dir into a report")
    redo: bool = opt(False, "rerun runs whose result.json holds other settings")
    list_runs: bool = opt(False, "print the runs (of this shard) and exit")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = opt(True, "show progress bars")


# ---------------------------------------------------------------- expansion

@dataclass
class Run:
    """One cell of the sweep."""
    index: int
    model: str
    target: str
    ref_dir: str
    method: str
    seed: int
    overrides: dict          # the method's ClassCFG overrides
    cfg: ClassCFG            # resolved: defaults < settings < method < axes
    run_dir: Path

    @property
    def key(self) -> str:
        return "/".join(self.run_dir.parts[-4:])


def slug(text: str) -> str:
    """A folder name for a model spec or class name."""
    safe = "".join(c if c.isalnum() or c in "-_.+=" else "_" for c in str(text)).strip("._")
    return safe or "x"


def check_settings(overrides: dict, what: str, cls=ClassCFG, reserved_keys=RESERVED_KEYS,
                   per_run: str = "models, targets, seeds, out_dir, --device") -> dict:
    """``overrides`` checked against ``cls``'s fields (unknown and per-run keys fail, naming
    the valid ones) and coerced to the fields' types (``config.check_overrides``)."""
    who = f"the sweep itself (per run: {per_run})"
    return config.check_overrides(cls, overrides, what, {k: who for k in reserved_keys})


def resolve_methods(entries, builtins: dict[str, dict] | None = None,
                    check=None) -> dict[str, dict]:
    """Method name -> overrides of the run's CFG; unknown names list the valid ones.
    ``builtins`` (default: the class methods) and ``check(overrides, what)`` (default: against
    ClassCFG) let another mode (``vital.eval.inner_sweep``) use the same rules."""
    builtins = BUILTIN_METHODS if builtins is None else builtins
    check = check or check_settings
    entries = [parsed(MethodSpec, e) for e in entries]
    defined = {e["name"] for e in entries if e["overrides"] is not None}
    out = {}
    for e in entries:
        name = e["name"]
        if not _NAME.match(name):
            raise ConfigError(f"method name {name!r} must use letters, digits and _ . + = -")
        if name in out:
            raise ConfigError(f"method {name!r} appears twice in the sweep")
        if e["overrides"] is None:
            if name not in builtins:
                raise ConfigError(f"unknown method {name!r}; valid: "
                                  f"{', '.join(list(builtins) + sorted(defined))} "
                                  f"(or define it as {{\"name\": ..., \"overrides\": {{...}}}})")
            out[name] = dict(builtins[name])
            continue
        if e["base"] and e["base"] not in builtins:
            raise ConfigError(f"method {name!r}: unknown base {e['base']!r}; valid: "
                              f"{', '.join(builtins)}")
        out[name] = {**builtins.get(e["base"], {}), **check(e["overrides"], f"method {name!r}")}
    return out


def resolve_targets(cfg: EvalCFG) -> list[dict]:
    targets = [parsed(TargetSpec, t) for t in cfg.targets]
    names = [t["target"] for t in targets]
    if not targets:
        raise ConfigError("the sweep has no targets")
    if len(set(names)) != len(names):
        raise ConfigError(f"a target appears twice in {names}")
    for t in targets:
        if not t["ref_dir"]:
            if not cfg.ref_root:
                raise ConfigError(f"target {t['target']!r} has no ref_dir and ref_root is empty")
            t["ref_dir"] = str(Path(cfg.ref_root) / slug(t["target"]))
    return targets


def _check_axes(cfg: EvalCFG) -> None:
    if not cfg.models or not cfg.seeds:
        raise ConfigError("the sweep needs at least one model and one seed")
    for what, values in (("model", cfg.models), ("seed", cfg.seeds)):
        if len(set(values)) != len(values):
            raise ConfigError(f"a {what} appears twice in {values}")
    slugs = [slug(m) for m in cfg.models]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"models {cfg.models} map to the same folder names {slugs}")


def expand(cfg: EvalCFG) -> list[Run]:
    """Every run of the sweep in a fixed order (model, target, method, seed); checks every key."""
    _check_axes(cfg)
    methods = resolve_methods(cfg.methods)
    settings = check_settings(parsed(Overrides, cfg.settings), "settings")
    runs = []
    for model in cfg.models:
        for t in resolve_targets(cfg):
            for method, overrides in methods.items():
                for seed in cfg.seeds:
                    values = {**settings, **overrides, "model": model, "target": t["target"],
                              "ref_dir": t["ref_dir"], "seed": int(seed)}
                    run_dir = (Path(cfg.out_dir) / slug(model) / slug(t["target"]) / method
                               / f"seed{int(seed)}")
                    runs.append(Run(len(runs), model, t["target"], t["ref_dir"], method,
                                    int(seed), overrides,
                                    config.with_recipe(ClassCFG, values.get("recipe"), **values),
                                    run_dir))
    return runs


def parse_shard(text: str) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n; empty -> None."""
    if not text:
        return None
    match = re.fullmatch(r"\s*([-+]?\d+)\s*/\s*([-+]?\d+)\s*", text)
    if not match:
        raise ConfigError(f"--shard {text!r} must look like i/n (shard i of n, counted from 0), "
                          f"e.g. 0/4")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1:
        raise ConfigError(f"--shard {text}: the number of shards n must be 1 or more, got {n}")
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: the shard index i must be in 0..{n - 1} for n = {n}, "
                          f"got {i}")
    return i, n


def select_shard(runs: list, shard: tuple[int, int] | None) -> list:
    """Every n-th run (or batch) starting at i; together the n shards hold each exactly once."""
    return runs if shard is None else runs[shard[0]::shard[1]]


def batch_runs(runs: list, size: int) -> list[list]:
    """The sweep's units of work: runs of one (model, method, seed), which differ only in their
    target (a class; inner mode: a neuron), ``size`` at a time in sweep order. Batches are
    ordered by their first run, so with size 1 each run is its own batch, in sweep order."""
    if size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {size}")
    groups: dict[tuple, list] = {}
    for run in runs:
        groups.setdefault((run.model, run.method, run.seed), []).append(run)
    batches = [group[i:i + size] for group in groups.values()
               for i in range(0, len(group), size)]
    return sorted(batches, key=lambda batch: batch[0].index)


def batch_key(batch: list) -> str:
    """The runs' folder keys with the part that differs joined: ``m/class3+class5/vital/seed0``."""
    parts = zip(*(run.key.split("/") for run in batch))
    return "/".join("+".join(dict.fromkeys(part)) for part in parts)


# ---------------------------------------------------------------- settings and hashes

def eval_settings(cfg: EvalCFG) -> dict:
    return {"judge": cfg.judge, "fid_model": cfg.fid_model or cfg.judge,
            "clip_judge": cfg.clip_judge, "fid_shrinkage": float(cfg.fid_shrinkage),
            "metrics_version": METRICS_VERSION}


def _result_cfg(cfg: ClassCFG, drop=()) -> dict:
    values = config.cfg_to_dict(cfg)
    return {k: v for k, v in values.items() if k not in NON_RESULT_KEYS and k not in drop}


def base_settings(cfg: EvalCFG) -> dict:
    """What every run of a sweep shares: ClassCFG defaults + settings, and the scoring setup.
    A report refuses to merge runs whose base settings differ."""
    settings = check_settings(parsed(Overrides, cfg.settings), "settings")
    return {"class": _result_cfg(ClassCFG(**settings), drop=AXIS_KEYS),
            "eval": eval_settings(cfg)}


def run_settings(run: Run, cfg: EvalCFG) -> dict:
    """Everything a run's result depends on; its hash decides whether a result is reusable."""
    return {"class": _result_cfg(run.cfg), "eval": eval_settings(cfg)}


def class_defaults() -> dict:
    """The class section's defaults (``engine.comparable``: a field added later, at its
    default, does not make an older result stale)."""
    return {"class": _result_cfg(ClassCFG())}


def comparable(current: dict, stored: dict) -> dict:
    """``engine.comparable`` with the class defaults."""
    return engine.comparable(current, stored, class_defaults())


def settings_diff(a: dict, b: dict) -> list[str]:
    """Dotted keys whose settings differ (see ``comparable``)."""
    return flat_diff(comparable(a, b), comparable(b, a))
