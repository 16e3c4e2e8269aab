"""One sweep engine: resume, batches, local or launched execution, records, progress lines.

A sweep is a list of runs (each with a unique ``key`` and its own ``run_dir``) cut into batches
(runs rendered together in one batched optimisation: the unit of work of ``--shard`` and of a
launcher's task). What differs between kinds of sweep (class pictures, inner neurons, ...) is a
:class:`SweepKind`: the settings a result must match, how a batch is rendered, how a rendered run
is scored, one line about a record and the picklable task of a batch. Everything else is here,
once, so that every kind resumes by the same rule:

- a run is finished when its folder holds ``result.json`` (written last) whose settings equal the
  run's current settings, where a setting added to the mode after the run and still at its
  default does not count as a change (``comparable``);
- a finished run with other settings stops the sweep before anything renders, unless ``--redo``;
- an unfinished run folder (no or a torn ``result.json``) is cleared and rendered from scratch;
- a run interrupted by Ctrl-C or a signal writes no ``result.json``: the same command resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from vital.cache import write_json
from vital.config import ConfigError

__all__ = ["RESULT_FILE", "SweepKind", "settings_hash", "comparable", "flat_diff",
           "load_result", "finished", "check_resumable", "check_rendered", "execute_batch",
           "run_local", "launch_unfinished", "list_runs", "timing"]

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class SweepKind:
    """What one kind of sweep supplies to the engine.

    settings(run) -> dict            what the run's result depends on (nested by section)
    defaults -> {section: dict}      each section's defaults (a field added later, at its
                                     default, does not make an older result stale)
    render(runs) -> iterator of (run, result, wall seconds, runs rendered together)
    score(run, result, wall, batched) -> dict   the record of a rendered run (the engine adds
                                     the settings and their hash and writes result.json)
    line(record) -> str              one line about a freshly rendered run
    short(record) -> str             the run's name inside a batch's line ("espresso", "n5")
    task(runs) -> launchers.Task     the picklable call that executes ``runs`` in a worker
    """
    settings: Callable[[object], dict]
    defaults: dict
    render: Callable[[list], Iterator[tuple]]
    score: Callable[..., dict]
    line: Callable[[dict], str]
    short: Callable[[dict], str]
    task: Callable[[list], object] | None = None


# ---------------------------------------------------------------- settings

def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += flat_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def comparable(current: dict, stored: dict, defaults: dict) -> dict:
    """``current`` without the settings that ``stored`` lacks and that hold their default:
    a field added to a mode after a run, at its default, did not change that run."""
    out = dict(current)
    for section, values in defaults.items():
        known = stored.get(section, {})
        out[section] = {k: v for k, v in current.get(section, {}).items()
                        if k in known or k not in values or v != values[k]}
    return out


def _same(current: dict, done: dict, defaults: dict) -> bool:
    stored = done.get("settings", {})
    return settings_hash(comparable(current, stored, defaults)) == done.get("settings_hash")


def _diff(current: dict, done: dict, defaults: dict) -> list[str]:
    stored = done.get("settings", {})
    return flat_diff(comparable(current, stored, defaults),
                     comparable(stored, current, defaults)) or ["(unknown)"]


# ---------------------------------------------------------------- resume

def load_result(run_dir) -> dict | None:
    """A run's result.json, or None when it is missing or torn (the run is unfinished)."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def finished(run, kind: SweepKind) -> dict | None:
    """The run's record when it finished with its current settings, else None."""
    done = load_result(run.run_dir)
    return done if done is not None and _same(kind.settings(run), done, kind.defaults) else None


def _stale(run, done: dict, kind: SweepKind) -> ConfigError:
    keys = _diff(kind.settings(run), done, kind.defaults)
    return ConfigError(f"{run.key} was run with other settings ({', '.join(keys)}); pass "
                       f"--redo to rerun such runs or choose another --out_dir")


def check_resumable(runs: Iterable, kind: SweepKind, redo: bool) -> None:
    """Without --redo, a finished run made with other settings stops the sweep before it
    starts."""
    if redo:
        return
    for run in runs:
        done = load_result(run.run_dir)
        if done is not None and not _same(kind.settings(run), done, kind.defaults):
            raise _stale(run, done, kind)


def _prepare_dir(run, kind: SweepKind, redo: bool) -> dict | None:
    """The finished record to reuse, or None after clearing the folder for a fresh run."""
    done = load_result(run.run_dir)
    if done is not None and _same(kind.settings(run), done, kind.defaults):
        return done
    if done is not None and not redo:
        raise _stale(run, done, kind)
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)   # unfinished (no result.json) or being redone
    return None


# ---------------------------------------------------------------- execution

def check_rendered(run, run_dir, result) -> None:
    """A rendered run landed in its folder; a stop other than NaN (Ctrl-C, a signal) leaves
    it unfinished, without result.json, and ends the sweep (the same command resumes)."""
    if Path(run_dir) != Path(run.run_dir):
        raise RuntimeError(f"run folder {run_dir} is not the expected {run.run_dir}")
    if result.stopped and not result.stopped.startswith("nan"):
        raise KeyboardInterrupt


def timing(result, wall: float, batched: int = 1) -> dict:
    """A run of a batch of ``batched`` is charged its share of the batch's steps."""
    step = result.step_seconds / batched
    return {"seconds_per_step": step,
            "seconds_per_image": step * result.steps_done / result.image.shape[0],
            "seconds_run": wall}


def execute_batch(batch: list, kind: SweepKind, redo: bool) -> list[tuple[dict, bool]]:
    """Render and score the unfinished runs of ``batch`` (together when the kind can), reuse
    the finished ones; [(record, skipped)] in the batch's order. Each record is written as
    its run's result.json, last."""
    out, todo = {}, []
    for run in batch:
        done = _prepare_dir(run, kind, redo)
        if done is not None:
            out[run.key] = (done, True)
        else:
            todo.append(run)
    for run, result, wall, batched in kind.render(todo):
        settings = kind.settings(run)
        record = {**kind.score(run, result, wall, batched),
                  "settings_hash": settings_hash(settings), "settings": settings}
        write_json(Path(run.run_dir) / RESULT_FILE, record)
        out[run.key] = (record, False)
    return [out[run.key] for run in batch]


def line(kind: SweepKind, record: dict, skipped: bool) -> str:
    return "finished earlier, skipped" if skipped else kind.line(record)


def lines(kind: SweepKind, records: list[dict], skipped: list[bool]) -> str:
    """One line about a launched batch."""
    return "; ".join(f"{kind.short(r)}: {line(kind, r, s)}" for r, s in zip(records, skipped))


def say_empty_shard(shard: str, batches: list[list], total: int, what: str = "") -> None:
    """A shard that got no batch says so (instead of printing nothing)."""
    if shard and not batches:
        print(f"shard {shard}{what}: no runs to do (the sweep has {total} batch(es); shard "
              f"i/n takes every n-th batch from the i-th)", flush=True)


def list_runs(batches: list[list]) -> None:
    for run in sorted((run for batch in batches for run in batch), key=lambda r: r.index):
        print(f"{run.index:4d}  {run.key}")


def run_local(batches: list[list], kind: SweepKind, redo: bool,
              execute: Callable[[list], list] | None = None) -> list[dict]:
    """The batches one after another in this process, a ``[k/n] key: line`` as each run ends;
    records in the order of the batches. ``execute(batch)`` replaces ``execute_batch`` where a
    kind prepares its runs first (device, progress)."""
    total = sum(len(batch) for batch in batches)
    records, k = [], 0
    for batch in batches:
        done = execute(batch) if execute else execute_batch(batch, kind, redo)
        for run, (record, skipped) in zip(batch, done):
            k += 1
            print(f"[{k}/{total}] {run.key}: {line(kind, record, skipped)}", flush=True)
            records.append(record)
    return records


def launch_unfinished(cfg, batches: list[list], kind: SweepKind) -> list[dict]:
    """Runs that finished earlier are reused here; the unfinished runs of each batch go to
    ``cfg.launcher`` as one task (a rerun on SLURM queues only what is missing). Records in the
    order of the batches."""
    from vital.eval.launchers import launch
    done = {run.key: finished(run, kind) for batch in batches for run in batch}
    todo = []
    for batch in batches:
        for run in batch:
            if done[run.key] is not None:
                print(f"{run.key}: {line(kind, done[run.key], True)}", flush=True)
        left = [run for run in batch if done[run.key] is None]
        todo += [left] if left else []
    new = launch(cfg, [kind.task(left) for left in todo],
                 lambda records, skipped: lines(kind, records, skipped))
    for left, records in zip(todo, new):
        done.update({run.key: record for run, record in zip(left, records)})
    return [done[run.key] for batch in batches for run in batch]


def plain(cfg, cls):
    """``cfg`` as a plain ``cls`` (a script's subclass may live in ``__main__``, which a worker
    process cannot import)."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
