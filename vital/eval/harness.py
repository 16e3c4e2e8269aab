"""The evaluation harness: runs a sweep of class visualisations (see ``vital.eval.sweep``) with
equal budgets, scores each run with ``vital.eval.metrics`` (via ``vital.eval.scoring``), resumes
finished runs and splits a sweep into shards; ``vital.eval.report`` merges the results.

Layout under ``out_dir``: ``<model>/<target>/<method>/seed<k>/`` is the normal run folder
(final.png, steps/, config.json, metrics.json) plus ``fid_features.safetensors`` and, written
last, ``result.json``. A run whose result.json holds the same settings hash is skipped; a run
folder without result.json is unfinished and is run again from scratch.

Runs of one (model, method, seed) differ only in their target; ``--batch_size`` of them are
rendered together in one batched optimisation (``vital.modes.batch``: each its own references,
class term, start image and augmentation, the same images as one by one up to float reduction
order) and still get one run folder each. Such a batch is the unit of work of ``--shard`` and
of a launcher's task; a batch renders only its unfinished runs, so the folders, the resume and
the report do not depend on the batch size.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from vital.modes.batch import run_in_batches
from vital.modes.class_mode import plan_class, run_class
from vital.modes.runner import name_layers, prepare
from vital.config import ConfigError
from vital.cache import write_json
from vital.eval.sweep import (  # noqa: F401  (re-exported: vital.eval.harness is the entry point)
    BUILTIN_METHODS, FEATURES_FILE, RESULT_FILE, EvalCFG, Run, base_settings, batch_key,
    batch_runs, expand, flat_diff, parse_shard, run_settings, same_settings, select_shard,
    settings_diff, settings_hash)


# ---------------------------------------------------------------- execution

def validate(runs: list[Run], scorer) -> dict[tuple[str, str], object]:
    """Resolve every (model, target) on every model and list every reference folder, so that
    bad input fails before any run starts. Returns (model, target) -> ClassRef."""
    from vital.eval.heldout import check_disjoint, heldout_folder
    from vital.refs.images import list_images
    classes = {}
    for run in runs:
        key = (run.model, run.target)
        if key not in classes:
            classes[key] = scorer.resolve(run.model, run.target)
            refs = list_images(run.ref_dir)
            if scorer.heldout_root:
                folder = heldout_folder(run.ref_dir, scorer.heldout_root)
                check_disjoint(refs, list_images(folder))
                scorer.heldout[run.target] = (classes[key].judge_index, folder)
    return classes


def check_resumable(runs: list[Run], cfg: EvalCFG) -> None:
    """Without --redo, a finished run made with other settings stops the sweep before it starts."""
    if cfg.redo:
        return
    for run in runs:
        done = load_result(run.run_dir)
        settings = run_settings(run, cfg)
        if done is not None and not _reusable(done, settings):
            keys = settings_diff(done.get("settings", {}), settings) or ["(unknown)"]
            raise ConfigError(f"{run.key} was run with other settings ({', '.join(keys)}); "
                              f"pass --redo to rerun such runs or choose another --out_dir")


def load_result(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None   # a torn file: the run counts as unfinished


def _reusable(done: dict, settings: dict) -> bool:
    return same_settings(settings, done.get("settings", {}), done.get("settings_hash", ""))


def _prepare_dir(run: Run, settings: dict, redo: bool) -> dict | None:
    """The finished result to reuse, or None after clearing the folder for a fresh run."""
    done = load_result(run.run_dir)
    if done is not None and _reusable(done, settings):
        return done
    if done is not None and not redo:
        raise ConfigError(f"{run.key} was run with other settings; pass --redo")
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)   # unfinished (no result.json) or being redone
    return None


def _run_cfg(run: Run, device: str, progress: bool):
    return dataclasses.replace(run.cfg, out_dir=str(run.run_dir.parent),
                               run_name=run.run_dir.name, device=device, progress=progress)


def _check_rendered(run: Run, run_dir, result) -> None:
    if Path(run_dir) != run.run_dir:
        raise RuntimeError(f"run folder {run_dir} is not the expected {run.run_dir}")
    if result.stopped and not result.stopped.startswith("nan"):
        raise KeyboardInterrupt   # Ctrl-C or a signal: unfinished, no result.json (rerun resumes)


def _render(run: Run, device: str, progress: bool):
    """One run on its own: (result, wall seconds)."""
    started = time.perf_counter()
    run_dir, result = run_class(_run_cfg(run, device, progress),
                                argv=["evaluate_fvis.py", run.key])
    _check_rendered(run, run_dir, result)
    return result, time.perf_counter() - started


def batchable(cfg) -> bool:
    """Runs of one (model, method, seed) share every setting but the target, so they share the
    schedule; ``vital.modes.batch`` also needs one image per run."""
    return cfg.batch == 1


def _render_together(runs: list[Run], device: str, progress: bool) -> list[tuple]:
    """``runs`` in one batched optimisation (``vital.modes.batch``, one run folder each):
    [(result, wall seconds / number of runs)]."""
    cfgs = [_run_cfg(run, device, progress) for run in runs]
    started = time.perf_counter()
    _, target = prepare(cfgs[0])
    for cfg in cfgs[1:]:
        name_layers(cfg, target)   # prepare did it for the first
    out = run_in_batches(cfgs, lambda cfg: plan_class(cfg, target), target, len(cfgs),
                         argv=["evaluate_fvis.py", batch_key(runs)])
    wall = (time.perf_counter() - started) / len(runs)
    for run, (run_dir, result) in zip(runs, out):
        _check_rendered(run, run_dir, result)
    return [(result, wall) for _, result in out]


def _rendered(runs: list[Run], device: str, progress: bool):
    """Yield (run, result, wall seconds, runs rendered together) for ``runs``: together when
    they can be batched, else one at a time (each yielded as soon as it is rendered)."""
    if len(runs) > 1 and batchable(runs[0].cfg):
        for run, (result, wall) in zip(runs, _render_together(runs, device, progress)):
            yield run, result, wall, len(runs)
        return
    for run in runs:
        yield run, *_render(run, device, progress), 1


def _timing(result, wall: float, batched: int = 1) -> dict:
    """A run of a batch of ``batched`` is charged its share of the batch's steps."""
    step = result.step_seconds / batched
    return {"seconds_per_step": step,
            "seconds_per_image": step * result.steps_done / result.image.shape[0],
            "seconds_run": wall}


def execute_batch(batch: list[Run], cfg: EvalCFG, scorer, classes: dict,
                  device: str) -> list[tuple[dict, bool]]:
    """Render and score the unfinished runs of ``batch`` (together when possible) and reuse
    the finished ones; [(result, was_skipped)] in the batch's order."""
    out, todo = {}, []
    for run in batch:
        done = _prepare_dir(run, run_settings(run, cfg), cfg.redo)
        if done is not None:
            out[run.index] = (done, True)
        else:
            todo.append(run)
    for run, result, wall, batched in _rendered(todo, device, cfg.progress):
        record = _record(run, cfg, scorer, classes[(run.model, run.target)], result, wall,
                         batched)
        out[run.index] = (record, False)
    return [out[run.index] for run in batch]


def _record(run: Run, cfg: EvalCFG, scorer, cls, result, wall: float, batched: int) -> dict:
    """Score a rendered run and write its result.json (last: marks the run finished)."""
    settings = run_settings(run, cfg)
    record = {
        "index": run.index, "model": run.model, "target": run.target, "method": run.method,
        "seed": run.seed, "ref_dir": run.ref_dir, "target_label": cls.label,
        "class_index": cls.index, "status": result.stopped or "finished",
        "steps_done": result.steps_done, "settings_hash": settings_hash(settings),
        "settings": settings, "base_settings": base_settings(cfg),
        "method_overrides": run.overrides, "batched_with": batched,
        **_score(run, scorer, cls, result, wall, batched),
    }
    write_json(run.run_dir / RESULT_FILE, record)
    return record


def _score(run: Run, scorer, cls, result, wall: float, batched: int = 1) -> dict:
    """Metrics of the final images, of the references, of the saved steps; FID features."""
    from vital.eval.scoring import quantise
    images = quantise(result.image)   # what final.png holds, for every image of the batch
    num_ref = run.cfg.num_ref
    features = scorer.fid_features(images, run.ref_dir, num_ref, run.target)
    save_file({k: v.contiguous() for k, v in features.items()}, str(run.run_dir / FEATURES_FILE))
    steps = sorted((run.run_dir / "steps").glob("step_*.png"))
    return {"metrics": {**scorer.score(run.model, cls, images, run.ref_dir, num_ref),
                        **scorer.score_heldout(run.target, images, features.get("fv_judge")),
                        **_timing(result, wall, batched)},
            "real": {**scorer.score_real(run.model, cls, run.ref_dir, num_ref),
                     **scorer.score_heldout_real(run.target)},
            "curve": scorer.curve(run.model, cls, steps),
            "features": FEATURES_FILE}


def _line(record: dict, skipped: bool) -> str:
    if skipped:
        return "finished earlier, skipped"
    m = record["metrics"]
    return (f"self top-1 {m['self_top1']:.2f}, judge top-1 {m['judge_top1']:.2f}, "
            f"{m['seconds_per_step']:.3f} s/step")


def run_sweep(cfg: EvalCFG) -> list[dict]:
    """Run this shard's part of the sweep (here, or on ``cfg.launcher``), a batch of runs at a
    time; bad input fails before the first run. Records in sweep order."""
    from vital.config import resolve_device
    from vital.eval.scoring import Scorer
    runs = expand(cfg)
    batches = select_shard(batch_runs(runs, cfg.batch_size), parse_shard(cfg.shard))
    mine = sorted((run for batch in batches for run in batch), key=lambda run: run.index)
    if cfg.list_runs:
        for run in mine:
            print(f"{run.index:4d}  {run.key}")
        return []
    here = cfg.launcher == "local"   # else this process only checks; workers pick their device
    device = resolve_device(cfg.device) if here else resolve_device("cpu")
    scorer = Scorer(cfg.judge, cfg.fid_model, cfg.clip_judge, device=device,
                    progress=cfg.progress, heldout_root=cfg.heldout_root)
    classes = validate(runs, scorer)
    check_resumable(mine, cfg)
    if not here:
        return _launch(cfg, batches)
    records, k = [], 0
    for batch in batches:
        for run, (record, skipped) in zip(batch, execute_batch(batch, cfg, scorer, classes,
                                                               str(device))):
            k += 1
            print(f"[{k}/{len(mine)}] {run.key}: {_line(record, skipped)}", flush=True)
            records.append(record)
    return sorted(records, key=lambda record: record["index"])


def _finished(run: Run, cfg: EvalCFG) -> dict | None:
    done = load_result(run.run_dir)
    return done if done is not None and _reusable(done, run_settings(run, cfg)) else None


def _lines(records: list[dict], skipped: list[bool]) -> str:
    return "; ".join(f"{r['target']}: {_line(r, s)}" for r, s in zip(records, skipped))


def _launch(cfg: EvalCFG, batches: list[list[Run]]) -> list[dict]:
    """Runs that finished earlier are reused here; the unfinished runs of each batch go to
    ``cfg.launcher`` as one task (a rerun on SLURM queues only what is missing). Records in
    sweep order."""
    from vital.eval.launchers import Task, launch
    done = {run.index: _finished(run, cfg) for batch in batches for run in batch}
    todo = []
    for batch in batches:
        for run in batch:
            if done[run.index] is not None:
                print(f"{run.key}: {_line(done[run.index], True)}", flush=True)
        left = [run for run in batch if done[run.index] is None]
        todo += [left] if left else []
    plain = portable(cfg)
    tasks = [Task(run_task, (plain, [run.index for run in left]), batch_key(left))
             for left in todo]
    for left, records in zip(todo, launch(cfg, tasks, _lines)):
        done.update({run.index: record for run, record in zip(left, records)})
    return [done[index] for index in sorted(done)]


def portable(cfg: EvalCFG) -> EvalCFG:
    """``cfg`` as a plain EvalCFG (a script's subclass may live in ``__main__``, which a worker
    process cannot import)."""
    return EvalCFG(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalCFG)})


@functools.lru_cache(maxsize=2)
def _worker_scorer(judge: str, fid_model: str, clip_judge: str, device: str, progress: bool):
    """One Scorer per worker process and scoring setup: a Ray worker runs many tasks."""
    from vital.eval.scoring import Scorer
    return Scorer(judge, fid_model, clip_judge, device=device, progress=progress)


def run_task(cfg: EvalCFG, indices: list[int]) -> tuple[list[dict], list[bool]]:
    """Runs ``indices`` of the sweep (one batch) in a worker process (a Ray task, a SLURM array
    job): (records, skipped), as ``execute_batch``."""
    from vital.config import resolve_device
    runs = expand(cfg)
    batch = [runs[index] for index in indices]
    device = str(resolve_device(cfg.device))
    scorer = _worker_scorer(cfg.judge, cfg.fid_model, cfg.clip_judge, device, cfg.progress)
    classes = {(run.model, run.target): scorer.resolve(run.model, run.target) for run in batch}
    done = execute_batch(batch, cfg, scorer, classes, device)
    return [record for record, _ in done], [skipped for _, skipped in done]


@dataclasses.dataclass
class SweepOutcome:
    """What ``run_eval`` hands to ``vital.cli.main``: ``stopped`` is "" when the sweep (or
    report) finished, else why it did not ("interrupted", "terminated ...", "failed: ...")."""
    stopped: str = ""


def run_eval(cfg: EvalCFG, argv: list[str] | None = None) -> tuple[Path, SweepOutcome]:
    """``evaluate_fvis.py`` / ``vital-eval`` under ``vital.cli.main``: run the sweep (and
    report unless sharded) or only report; (out_dir, SweepOutcome). Bad input raises (one
    sentence, status 2, from ``cli.main``); Ctrl-C, SIGTERM and failed tasks are outcomes."""
    from vital.eval.launchers import SweepFailed
    from vital.eval.report import write_report
    try:
        if cfg.mode == "inner":
            _main_inner(cfg)
        else:
            if not cfg.report:
                run_sweep(cfg)
            if cfg.report or not (cfg.shard or cfg.list_runs):
                print(write_report(cfg.out_dir, expected=expand(cfg)))
    except KeyboardInterrupt as err:   # Ctrl-C, or SIGTERM (vital.cli.Terminated)
        print("interrupted: finished runs keep their result.json; run the same command again "
              "to resume", file=sys.stderr)
        return Path(cfg.out_dir), SweepOutcome(getattr(err, "stopped_as", "interrupted"))
    except SweepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return Path(cfg.out_dir), SweepOutcome(f"failed: {err}")
    return Path(cfg.out_dir), SweepOutcome()


def _main_inner(cfg: EvalCFG) -> None:
    """``--mode inner``: run the inner-neuron sweep (``vital.eval.inner``), then report."""
    from vital.eval.inner import run_inner_sweep, write_inner_report
    if not cfg.report:
        run_inner_sweep(cfg)
    if cfg.report or not (cfg.shard or cfg.list_runs):
        print(write_inner_report(cfg.out_dir))
