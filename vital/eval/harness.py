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
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from vital.modes.batch import run_in_batches
from vital.modes.class_mode import plan_class, run_class
from vital.modes.runner import name_layers, prepare
from vital.eval import engine
from vital.eval.engine import load_result  # noqa: F401  (re-exported)
from vital.eval.sweep import (  # noqa: F401  (re-exported: vital.eval.harness is the entry point)
    BUILTIN_METHODS, FEATURES_FILE, RESULT_FILE, EvalCFG, Run, base_settings, batch_key,
    batch_runs, class_defaults, expand, flat_diff, parse_shard, run_settings, select_shard,
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


def _run_cfg(run: Run, device: str, progress: bool):
    return dataclasses.replace(run.cfg, out_dir=str(run.run_dir.parent),
                               run_name=run.run_dir.name, device=device, progress=progress)


def _render(run: Run, device: str, progress: bool):
    """One run on its own: (result, wall seconds)."""
    started = time.perf_counter()
    run_dir, result = run_class(_run_cfg(run, device, progress),
                                argv=["evaluate_fvis.py", run.key])
    engine.check_rendered(run, run_dir, result)
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
        engine.check_rendered(run, run_dir, result)
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


def _record(run: Run, cfg: EvalCFG, scorer, cls, result, wall: float, batched: int) -> dict:
    """The record of a rendered run (the engine adds its settings and writes result.json)."""
    return {
        "index": run.index, "model": run.model, "target": run.target, "method": run.method,
        "seed": run.seed, "ref_dir": run.ref_dir, "target_label": cls.label,
        "class_index": cls.index, "status": result.stopped or "finished",
        "steps_done": result.steps_done, "base_settings": base_settings(cfg),
        "method_overrides": run.overrides, "batched_with": batched,
        **_score(run, scorer, cls, result, wall, batched),
    }


def _score(run: Run, scorer, cls, result, wall: float, batched: int = 1) -> dict:
    """Metrics of the final images, of the references, of the saved steps; FID features."""
    from vital.imaging import quantise
    images = quantise(result.image)   # what final.png holds, for every image of the batch
    num_ref = run.cfg.num_ref
    features = scorer.fid_features(images, run.ref_dir, num_ref, run.target)
    save_file({k: v.contiguous() for k, v in features.items()}, str(run.run_dir / FEATURES_FILE))
    steps = sorted((run.run_dir / "steps").glob("step_*.png"))
    return {"metrics": {**scorer.score(run.model, cls, images, run.ref_dir, num_ref),
                        **scorer.score_heldout(run.target, images, features.get("fv_judge")),
                        **engine.timing(result, wall, batched)},
            "real": {**scorer.score_real(run.model, cls, run.ref_dir, num_ref),
                     **scorer.score_heldout_real(run.target)},
            "curve": scorer.curve(run.model, cls, steps),
            "features": FEATURES_FILE}


def _line(record: dict) -> str:
    m = record["metrics"]
    return (f"self top-1 {m['self_top1']:.2f}, judge top-1 {m['judge_top1']:.2f}, "
            f"{m['seconds_per_step']:.3f} s/step")


def sweep_kind(cfg: EvalCFG, scorer=None, classes: dict | None = None,
               device: str = "cpu") -> engine.SweepKind:
    """Class pictures as an ``engine.SweepKind`` (``scorer`` and ``classes`` where runs render
    here; without them the kind only checks resume and launches)."""
    def render(runs):
        return _rendered(runs, device, cfg.progress)

    def score(run, result, wall, batched):
        return _record(run, cfg, scorer, classes[(run.model, run.target)], result, wall,
                       batched)

    def task(runs):
        from vital.eval.launchers import Task
        return Task(run_task, (engine.plain(cfg, EvalCFG), [run.index for run in runs]),
                    batch_key(runs))

    return engine.SweepKind(settings=lambda run: run_settings(run, cfg),
                            defaults=class_defaults(), render=render, score=score, line=_line,
                            short=lambda record: record["target"], task=task)


def execute_batch(batch: list[Run], cfg: EvalCFG, scorer, classes: dict,
                  device: str) -> list[tuple[dict, bool]]:
    """Render and score the unfinished runs of ``batch`` (together when possible) and reuse
    the finished ones; [(result, was_skipped)] in the batch's order."""
    return engine.execute_batch(batch, sweep_kind(cfg, scorer, classes, device), cfg.redo)


def run_sweep(cfg: EvalCFG) -> list[dict]:
    """Run this shard's part of the sweep (here, or on ``cfg.launcher``), a batch of runs at a
    time; bad input fails before the first run. Records in sweep order."""
    from vital.config import resolve_device
    from vital.eval.scoring import Scorer
    runs = expand(cfg)
    every = batch_runs(runs, cfg.batch_size)
    batches = select_shard(every, parse_shard(cfg.shard))
    engine.say_empty_shard(cfg.shard, batches, len(every))
    if cfg.list_runs:
        engine.list_runs(batches)
        return []
    here = cfg.launcher == "local"   # else this process only checks; workers pick their device
    device = resolve_device(cfg.device) if here else resolve_device("cpu")
    scorer = Scorer(cfg.judge, cfg.fid_model, cfg.clip_judge, device=device,
                    progress=cfg.progress, heldout_root=cfg.heldout_root)
    classes = validate(runs, scorer)
    kind = sweep_kind(cfg, scorer, classes, str(device))
    engine.check_resumable((run for batch in batches for run in batch), kind, cfg.redo)
    if not here:
        records = engine.launch_unfinished(cfg, batches, kind)
    else:
        records = engine.run_local(batches, kind, cfg.redo)
    return sorted(records, key=lambda record: record["index"])


def portable(cfg: EvalCFG) -> EvalCFG:
    """``cfg`` as a plain EvalCFG (a script's subclass may live in ``__main__``, which a worker
    process cannot import)."""
    return engine.plain(cfg, EvalCFG)


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
    """``--mode inner``: run the inner-neuron sweep (``vital.eval.inner_sweep``), then report."""
    from vital.eval.inner_sweep import run_inner_sweep, write_inner_report
    if not cfg.report:
        run_inner_sweep(cfg)
    if cfg.report or not (cfg.shard or cfg.list_runs):
        print(write_inner_report(cfg.out_dir))
