"""Inner-neuron evaluation (``evaluate_fvis.py --mode inner``): the VITAL paper's appendix B.1.

A sweep of models x neurons (channels of ``--layer``) x methods x seeds of inner-neuron
visualisations. Each run is a normal ``inner`` run folder
``OUT/<model>/<layer>/<method>/seed<k>/n<neuron>/`` plus ``result.json``; its score compares the
neuron's activation on the visualisation with its activations on its top ``--num_real`` real
images of ``--data_dir`` (whole images at the visualisation size), with
``vital.eval.metrics.auc_mad``:

  AUC  P(activation on the FV > activation on a top real image); 0.5 = like them, 1 = above all
  MAD  (FV activation - mean over the top real images) / their std

Runs of one (model, method, seed) differ only in the neuron; ``--batch_size`` of them are rendered
together in one batched optimisation (``vital.modes.batch``, one run folder each), the unit of
work of ``--shard`` and of a launcher's task. Finished runs with the same settings are skipped
(resume; a batch renders only its unfinished runs); ``--shard i/n`` splits the batches; the
report merges every result.json under ``out_dir`` into ``report/inner_report.md`` (mean +- sd
over neurons and seeds) and ``report/inner_grid_<model>.png`` (rows: neurons; columns: the top
patches, then each method).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vital import config
from vital.eval import sweep as eval_sweep
from vital.eval import metrics
from vital.config import ConfigError
from vital.eval import engine
from vital.eval.engine import RESULT_FILE, flat_diff  # noqa: F401  (RESULT_FILE re-exported)
from vital.config import Overrides
from vital.eval.sweep import batch_runs, parsed, parse_shard, select_shard, slug
METRICS_VERSION = 1
INNER_METHODS: dict[str, dict] = {
    "vital": {},
    "vital_pure": {"neuron_weight": 0.0},
    "am_fft": {"param": "fft", "feat_weight": 0.0, "neuron_weight": 1.0, "tv_weight": 0.0,
               "relevance": "none"},
    "maco": {"param": "maco", "feat_weight": 0.0, "neuron_weight": 1.0, "tv_weight": 0.0,
             "relevance": "none"},
    # the official VITAL code's settings (vital/modes/recipes.py): references = the whole
    # images of the top patches, and the paper text's variant with the patches themselves
    "paper": {"recipe": "paper"},
    "paper_patches": {"recipe": "paper", "ref_kind": "patches"},
}
RESERVED = ("model", "layer", "neuron", "direction", "auto", "data_dir", "seed", "out_dir",
            "run_name", "device", "progress", "batch_size")
NON_RESULT = ("device", "progress", "out_dir", "run_name", "cache", "prompts_file", "top_k")


@dataclass
class InnerRun:
    index: int
    model: str
    neuron: int
    method: str
    seed: int
    cfg: object            # InnerCFG, resolved
    run_dir: Path
    method_order: int = 0  # the method's place in the sweep (orders the report)

    @property
    def key(self) -> str:
        return "/".join(self.run_dir.parts[-5:])


def _inner_cfg_cls():
    from vital.modes.inner import InnerCFG   # late: keeps the class harness light
    return InnerCFG


def _check_overrides(values: dict, what: str) -> dict:
    return eval_sweep.check_settings(values, what, _inner_cfg_cls(), RESERVED,
                                     "models, layer, neurons, data_dir, seeds, out_dir, --device, "
                                     "--batch_size")


def resolve_methods(entries) -> dict[str, dict]:
    """Method name -> InnerCFG overrides: built-ins (vital, vital_pure, am_fft, maco) or
    {"name", "overrides", "base"} entries (the class harness's rules)."""
    return eval_sweep.resolve_methods(entries, INNER_METHODS, _check_overrides)


def _check(cfg) -> None:
    if not cfg.layer:
        raise ConfigError("--mode inner needs --layer (e.g. blocks.10; query_model_layers.py "
                          "lists a model's layers)")
    if not cfg.data_dir:
        raise ConfigError("--mode inner needs --data_dir: the images that give the top patches "
                          "and the top real images")
    if not cfg.neurons and cfg.random_neurons < 1:
        raise ConfigError("--mode inner needs --neurons N ... or --random_neurons N >= 1")
    if cfg.num_real < 2:
        raise ConfigError(f"--num_real must be >= 2 (AUC and MAD compare with a spread), got "
                          f"{cfg.num_real}")
    if not cfg.models or not cfg.seeds:
        raise ConfigError("the sweep needs at least one model and one seed")


def pick_neurons(cfg, channels: int) -> list[int]:
    """``--neurons`` (checked against the layer) or ``--random_neurons`` drawn with seed 0."""
    if cfg.neurons:
        bad = [n for n in cfg.neurons if not 0 <= int(n) < channels]
        if bad:
            raise ConfigError(f"neurons {bad} out of range for {cfg.layer}: valid 0..{channels - 1}")
        return sorted(dict.fromkeys(int(n) for n in cfg.neurons))
    gen = torch.Generator().manual_seed(0)
    return sorted(torch.randperm(channels, generator=gen)[:cfg.random_neurons].tolist())


def expand(cfg, model: str, neurons: list[int]) -> list[InnerRun]:
    """The runs of one model, in a fixed order (neuron, method, seed)."""
    cls = _inner_cfg_cls()
    methods = resolve_methods(cfg.methods)
    settings = _check_overrides(parsed(Overrides, cfg.settings), "settings")
    runs = []
    for neuron in neurons:
        for order, (method, over) in enumerate(methods.items()):
            for seed in cfg.seeds:
                folder = Path(cfg.out_dir) / slug(model) / slug(cfg.layer) / method / f"seed{seed}"
                values = {**settings, **over, "model": model, "layer": cfg.layer,
                          "neuron": neuron, "data_dir": cfg.data_dir, "seed": int(seed),
                          "out_dir": str(folder), "run_name": f"n{neuron}"}
                cfg_run = config.with_recipe(cls, values.get("recipe"), **values)
                runs.append(InnerRun(len(runs), model, neuron, method, int(seed), cfg_run,
                                     folder / f"n{neuron}", order))
    return runs


def run_settings(run: InnerRun, cfg) -> dict:
    values = {k: v for k, v in config.cfg_to_dict(run.cfg).items() if k not in NON_RESULT}
    return {"inner": values, "eval": {"num_real": int(cfg.num_real),
                                      "metrics_version": METRICS_VERSION}}


def real_activations(target, layer: str, files, size: int) -> torch.Tensor:
    """(N, C): every channel's score (mean over positions) on every real image at ``size``."""
    from vital.modes.inner import resolve_target
    from vital.refs.patches import channel_means, iter_images
    probe = resolve_target(target, layer, 0)
    return torch.cat([channel_means(target, layer, probe.layout, images, probe.skip)
                      for images, _ in iter_images(files, size)])


def _rendered(runs: list[InnerRun], cfg, target, scores):
    """Yield (run, result, wall seconds, runs rendered together): the neurons of ``runs`` in
    one batched optimisation (``plan_neuron`` as ``run_neurons`` does) when they can be
    batched, else one at a time."""
    from vital.modes.batch import run_in_batches
    from vital.modes.inner import plan_neuron, resolve_target, run_neuron
    neurons = {run.neuron: resolve_target(target, cfg.layer, run.neuron) for run in runs}
    argv = ["evaluate_fvis.py", "--mode", "inner", eval_sweep.batch_key(runs)] if runs else []
    started = time.perf_counter()
    if len(runs) > 1 and runs[0].cfg.batch == 1:   # one image per run: vital.modes.batch
        out = run_in_batches([run.cfg for run in runs], lambda c: plan_neuron(
            c, target, neurons[c.neuron], None, scores), target, len(runs), argv)
        wall = (time.perf_counter() - started) / len(runs)
        for run, (run_dir, result) in zip(runs, out):
            engine.check_rendered(run, run_dir, result)
            yield run, result, wall, len(runs)
        return
    for run in runs:
        started = time.perf_counter()
        run_dir, result = run_neuron(run.cfg, target, neurons[run.neuron], patch_scores=scores,
                                     argv=["evaluate_fvis.py", "--mode", "inner", run.key])
        engine.check_rendered(run, run_dir, result)
        yield run, result, time.perf_counter() - started, 1


def _record(run: InnerRun, cfg, real: torch.Tensor, result, wall: float, batched: int) -> dict:
    """The record of a rendered run (the engine adds its settings and writes result.json). A
    run of a batch of ``batched`` is charged its share of the batch's steps."""
    report = json.loads((run.run_dir / "neuron.json").read_text())
    fv = torch.tensor(report["visualisation"])
    top = real[:, run.neuron].topk(min(cfg.num_real, len(real))).values
    return {"index": run.index, "model": run.model, "layer": cfg.layer, "neuron": run.neuron,
            "method": run.method, "method_order": run.method_order, "seed": run.seed,
            "status": result.stopped or "finished",
            **metrics.auc_mad(fv, top), "fv_activation": fv.tolist(),
            "real_mean": float(top.mean()), "real_std": float(top.std()),
            "num_real": int(len(top)), "seconds_per_step": result.step_seconds / batched,
            "seconds_run": wall, "batched_with": batched}


def _line(record: dict) -> str:
    return (f"AUC {record['auc']:.3f}, MAD {record['mad']:.2f}, "
            f"{record['seconds_per_step']:.3f} s/step")


def _defaults() -> dict:
    values = config.cfg_to_dict(_inner_cfg_cls()())
    return {"inner": {k: v for k, v in values.items() if k not in NON_RESULT}}


def sweep_kind(cfg, model: str = "", target=None, real=None, scores=None,
               device="cpu") -> engine.SweepKind:
    """Inner neurons as an ``engine.SweepKind`` (``target``, ``real`` and ``scores`` where
    runs render here; without them the kind only checks resume and launches)."""
    def render(runs):
        for run in runs:
            run.cfg = dataclasses.replace(run.cfg, device=str(device), progress=cfg.progress)
        return _rendered(runs, cfg, target, scores)

    def task(runs):
        from vital.eval.launchers import Task
        return Task(run_task, (engine.plain(cfg, eval_sweep.EvalCFG), runs[0].model,
                               [run.index for run in runs]), eval_sweep.batch_key(runs))

    return engine.SweepKind(
        settings=lambda run: run_settings(run, cfg), defaults=_defaults(), render=render,
        score=lambda run, result, wall, batched: _record(run, cfg, real, result, wall, batched),
        line=_line, short=lambda record: f"n{record['neuron']}", task=task)


def _model_runs(cfg, model: str, device):
    """(target, probe, runs, image size) of one model; the runs must share one size."""
    from vital.models import load_target
    from vital.modes.setup import image_size
    from vital.modes.inner import resolve_target
    target = load_target(model, device=device)
    probe = resolve_target(target, cfg.layer, 0)
    runs = expand(cfg, model, pick_neurons(cfg, probe.channels))
    sizes = {image_size(r.cfg, target) for r in runs}
    if len(sizes) != 1:
        raise ConfigError(f"methods of an inner sweep must share one image size, got {sizes}")
    return target, probe, runs, sizes.pop()


def _scoring(cfg, target, probe, runs, size):
    """(real activations (N, C), patch scores computed once on a patch-cache miss)."""
    from vital.modes.inner import layer_patch_scores
    from vital.refs.patches import data_files
    real = real_activations(target, cfg.layer, data_files(cfg.data_dir), size)
    base = runs[0].cfg
    scores = functools.cache(lambda: layer_patch_scores(
        dataclasses.replace(base, progress=cfg.progress), target, probe))
    return real, scores


def run_inner_sweep(cfg) -> list[dict]:
    """Run this shard's part of the inner sweep (here, or on ``cfg.launcher``), a batch of
    neurons at a time; bad input fails before the first run."""
    from vital.config import resolve_device
    from vital.refs.patches import data_files
    _check(cfg)
    shard = parse_shard(cfg.shard)
    data_files(cfg.data_dir)
    here = cfg.launcher == "local"   # else this process only checks; workers pick their device
    device = resolve_device(cfg.device if here else "cpu")
    records, launched = [], []
    for model in cfg.models:
        target, probe, runs, size = _model_runs(cfg, model, device)
        every = batch_runs(runs, cfg.batch_size)
        batches = select_shard(every, shard)
        engine.say_empty_shard(cfg.shard, batches, len(every), f" of {model}")
        if cfg.list_runs:
            engine.list_runs(batches)
            continue
        if not batches:
            continue
        if not here:
            kind = sweep_kind(cfg, model)
            engine.check_resumable((run for batch in batches for run in batch), kind, cfg.redo)
            launched += batches
            continue
        real, scores = _scoring(cfg, target, probe, runs, size)
        kind = sweep_kind(cfg, model, target, real, scores, device)
        records += sorted(engine.run_local(batches, kind, cfg.redo), key=_sweep_order)
    if launched:
        order = {model: k for k, model in enumerate(cfg.models)}
        records += sorted(engine.launch_unfinished(cfg, launched, sweep_kind(cfg)),
                          key=lambda r: (order[r["model"]], *_sweep_order(r)))
    return records


def _sweep_order(record: dict) -> tuple:
    """A model's runs in the order ``expand`` makes them (neuron, method, seed); records
    written before they held their index sort by those."""
    return record.get("index", -1), record["neuron"], record["method_order"], record["seed"]


_WORKER: dict[tuple, tuple] = {}   # (sweep settings, model, device) -> model, runs, scoring


def run_task(cfg, model: str, indices: list[int]) -> tuple[list[dict], list[bool]]:
    """Runs ``indices`` (one batch) of ``model``'s inner runs in a worker process (a Ray task,
    a SLURM array job): (records, skipped). The model and the real activations stay loaded for
    the worker's next task of the same sweep and model."""
    from vital.config import resolve_device
    device = resolve_device(cfg.device)
    key = (json.dumps(config.cfg_to_dict(cfg), sort_keys=True, default=str), model, str(device))
    if key not in _WORKER:
        _WORKER.clear()   # one model in memory per worker
        target, probe, runs, size = _model_runs(cfg, model, device)
        _WORKER[key] = (target, runs, *_scoring(cfg, target, probe, runs, size))
    target, runs, real, scores = _WORKER[key]
    kind = sweep_kind(cfg, model, target, real, scores, device)
    done = engine.execute_batch([runs[index] for index in indices], kind, cfg.redo)
    return [record for record, _ in done], [skipped for _, skipped in done]


# ---------------------------------------------------------------- report

def collect(out_dir) -> list[dict]:
    """Every finished inner run under ``out_dir``, in sweep order of method, then neuron."""
    records = [r for r in (json.loads(p.read_text()) for p in
                           sorted(Path(out_dir).rglob(RESULT_FILE))) if "auc" in r and "neuron" in r]
    return sorted(records, key=lambda r: (r["model"], r.get("method_order", 0), r["neuron"],
                                          r["seed"]))


def report_table(records: list[dict]) -> str:
    lines = ["| model | layer | method | AUC (mean ± sd) | MAD (mean ± sd) | s / step | runs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = list(dict.fromkeys((r["model"], r["layer"], r["method"]) for r in records))
    for model, layer, method in keys:
        mine = [r for r in records if (r["model"], r["layer"], r["method"]) == (model, layer, method)]
        auc, auc_sd = metrics.mean_spread(r["auc"] for r in mine)
        mad, mad_sd = metrics.mean_spread(r["mad"] for r in mine)
        sec, _ = metrics.mean_spread(r["seconds_per_step"] for r in mine)
        lines.append(f"| {model} | {layer} | {method} | {auc:.3f} ± {auc_sd:.3f} | "
                     f"{mad:.2f} ± {mad_sd:.2f} | {sec:.3f} | {len(mine)} |")
    return "\n".join(lines)


def _grid(out_dir: Path, records: list[dict], model: str, tile: int = 128):
    from PIL import Image
    from vital.imaging import grid
    mine = [r for r in records if r["model"] == model]
    seed = min(r["seed"] for r in mine)
    methods = list(dict.fromkeys(r["method"] for r in mine))
    tiles, labels = [], []
    for neuron in sorted({r["neuron"] for r in mine}):
        folders = [Path(out_dir) / slug(model) / slug(r["layer"]) / r["method"] / f"seed{seed}"
                   / f"n{neuron}" for r in mine if r["neuron"] == neuron and r["seed"] == seed]
        by_method = {f.parts[-3]: f for f in folders}
        sheet = next((f / "references.png" for f in folders if (f / "references.png").is_file()),
                     None)
        cells = [(sheet, f"n{neuron} top patches")] + \
            [(by_method[m] / "final.png" if m in by_method else None, m) for m in methods]
        for path, label in cells:
            ok = path is not None and path.is_file()
            img = Image.open(path).convert("RGB") if ok else Image.new("RGB", (tile, tile), "white")
            tiles.append(img.resize((tile, tile)))
            labels.append(label)
    return grid(tiles, labels, cols=1 + len(methods))


def write_inner_report(out_dir) -> str:
    """Merge every result.json under ``out_dir``; refuse runs of one method whose settings
    differ (other than the neuron and seed)."""
    records = collect(out_dir)
    if not records:
        raise ConfigError(f"no finished inner runs (result.json) under {out_dir}")
    groups = {}
    for r in records:
        s = {k: v for k, v in r["settings"]["inner"].items() if k not in ("neuron", "seed")}
        groups.setdefault((r["model"], r["method"]), []).append((s, r["settings"]["eval"]))
    for (model, method), items in groups.items():
        diff = flat_diff({"inner": items[0][0], "eval": items[0][1]},
                         {"inner": items[-1][0], "eval": items[-1][1]})
        if any(i != items[0] for i in items) and diff:
            raise ConfigError(f"runs of {method} on {model} under {out_dir} differ in "
                              f"{', '.join(diff)}; rerun them or report them separately")
    report = Path(out_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    text = "# Inner-neuron evaluation\n\n" + report_table(records) + (
        "\n\nAUC = P(activation on the visualisation > activation on one of the neuron's top "
        "real images); MAD = (visualisation activation - their mean) / their std. AUC 0.5 and "
        "MAD 0 mean 'like the top real images'.\n")
    (report / "inner_report.md").write_text(text)
    for model in dict.fromkeys(r["model"] for r in records):
        _grid(Path(out_dir), records, model).save(report / f"inner_grid_{slug(model)}.png")
    return text
