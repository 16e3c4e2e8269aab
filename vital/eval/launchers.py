"""Where the runs of a sweep execute: ``ray`` (one Ray task per batch of runs) or ``slurm`` (one
SLURM job array through submitit, one array element per batch). ``local`` (one batch after
another in this process) stays in the harness's own loop.

A batch (runs that differ only in their target, rendered together) is a :class:`Task`: a
module-level function and its arguments that renders, scores and writes one run folder per run
(result.json last) and returns ``(records, skipped)``. Every launcher executes the same tasks
into the same folders, and the report reads only the result.json files, so the report does not
depend on the launcher. Resume is the harness's: a run whose folder holds a result.json with its
settings hash is reused without rendering, so a rerun of the same command, or a SLURM job
requeued at its time limit, only does what is missing.

Ray and submitit are imported inside the functions that use them (extra ``cluster``).
"""
from __future__ import annotations

import importlib
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vital.config import ConfigError, opt

LAUNCHERS = ("local", "ray", "slurm")
# errors a Ray task is retried on (besides a lost worker or node, which Ray always retries):
# CUDA out of memory and other runtime failures, I/O on a shared file system
RETRIED_ERRORS = (RuntimeError, OSError)
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*:")
POLL_SECONDS = 1.0   # how often the driver asks submitit whether array jobs have ended


@dataclass(frozen=True)
class Task:
    """One batch of runs as a picklable call: ``fn(*args) -> (records, skipped)``."""
    fn: Callable      # a module-level function (pickled by reference)
    args: tuple
    key: str          # the batch's folder key (``batch_key``), for messages


@dataclass
class LaunchCFG:
    """Where a sweep's batches execute (the evaluation harness, the atlas's pictures)."""
    launcher: str = opt("local", "where runs execute: local (here, one batch after another), ray "
                        "(one Ray task per batch), slurm (a SLURM job array through submitit, "
                        "one element per batch); "
                        "ray and slurm need pip install -e .[cluster]",
                        choices=["local", "ray", "slurm"])
    ray_address: str = opt("", "ray: address of an existing cluster (empty = a local Ray)")
    retries: int = opt(2, "ray: times a failed task is retried (lost worker, runtime error)",
                       low=0)
    slurm_partition: str = opt("", "slurm: partition (empty = the cluster's default)")
    slurm_time: int = opt(240, "slurm: time limit per batch of runs in minutes; at the limit "
                          "the job is requeued and skips the runs that finished", low=1)
    slurm_gpus: int = opt(1, "slurm: GPUs per run (0 on CPU nodes)", low=0)
    slurm_cpus: int = opt(4, "slurm: CPUs per run", low=1)
    slurm_parallel: int = opt(16, "slurm: array jobs running at once", low=1)
    slurm_folder: str = opt("", "slurm: submitit's folder of job files and logs "
                            "(empty = OUT/submitit)")
    slurm_cluster: str = opt("", "slurm: submitit's cluster: empty = SLURM; local = local "
                             "processes (a test without SLURM); debug = in this "
                             "process (an error opens pdb)",
                             choices=["", "slurm", "local", "debug"])


class SweepFailed(RuntimeError):
    """Some runs failed on the engine; the others finished and keep their result.json."""


def launch(cfg, tasks: list[Task], describe: Callable[[dict, bool], str]) -> list[dict]:
    """Execute ``tasks`` with ``cfg.launcher`` (ray or slurm), print ``[k/n] key: describe(...)``
    as each ends, and return the records in task order; failed runs raise SweepFailed at the
    end, after every other run has finished."""
    if cfg.launcher not in ("ray", "slurm"):
        raise ConfigError(f"unknown launcher {cfg.launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if not tasks:
        return []
    outcomes = _ray(cfg, tasks) if cfg.launcher == "ray" else _slurm(cfg, tasks)
    records, failed = [None] * len(tasks), []
    for k, (i, outcome) in enumerate(outcomes, 1):
        if isinstance(outcome, BaseException):
            failed.append(f"{tasks[i].key} ({_error_line(outcome)})")
            line = f"failed: {_error_line(outcome)}"
        else:
            records[i] = outcome[0]
            line = describe(*outcome)
        print(f"[{k}/{len(tasks)}] {tasks[i].key}: {line}", flush=True)
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(tasks)} run(s) failed on {cfg.launcher}: "
                          f"{'; '.join(failed)}. Finished runs keep their result.json: run the "
                          f"same command again to retry only the failed ones")
    return records


def _error_line(err: BaseException) -> str:
    """The error's own line: a worker's traceback travels as text, so its last
    ``SomeError: message`` line."""
    lines = [line.strip() for line in str(err).strip().splitlines()]
    raised = [line for line in lines if _RAISED.match(line)]
    return raised[-1] if raised else (lines[0] if lines else repr(err))


def _require(module: str, launcher: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--launcher {launcher} needs {module}, which is not installed: "
                          f"pip install -e .[cluster]") from None


def call(fn: Callable, args: tuple):
    """What a worker runs: ``fn(*args)`` (the function travels pickled by reference)."""
    return fn(*args)


# ---------------------------------------------------------------- Ray

def check_reachable(address: str, timeout: float = 5.0) -> None:
    """``host:port`` or ``ray://host:port`` answers within ``timeout`` s, else one sentence
    (Ray itself retries an unreachable address for minutes, printing its own logs)."""
    import socket
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"cannot reach the Ray cluster at --ray_address {address} "
                          f"({err.strerror or err}); check the address, or leave it empty "
                          f"to start a local Ray") from None


def _ray(cfg, tasks: list[Task]):
    """Yield (task index, outcome) as Ray tasks end; one task per run, one GPU per task when
    the cluster has GPUs. Uses a Ray already initialised in this process, else connects to
    ``cfg.ray_address`` or starts a local Ray (shut down afterwards)."""
    ray = _require("ray", "ray")
    started = not ray.is_initialized()
    if started and cfg.ray_address:
        check_reachable(cfg.ray_address)
    if started:
        ray.init(address=cfg.ray_address or None, include_dashboard=False,
                 log_to_driver=bool(cfg.progress))
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=int(cfg.retries),
                            retry_exceptions=list(RETRIED_ERRORS))(call)
        pending = {remote.remote(t.fn, t.args): i for i, t in enumerate(tasks)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                yield i, ray.get(done[0])
            except Exception as err:   # ray.exceptions.RayTaskError wraps the task's error
                yield i, err
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- SLURM through submitit

class SlurmCall:
    """A SLURM array element's callable. At the time limit submitit signals the job and calls
    ``checkpoint``: the same call is requeued, and the harness then skips the runs that
    finished (the interrupted run has no result.json and starts again)."""

    def __call__(self, fn: Callable, args: tuple):
        return fn(*args)

    def checkpoint(self, fn: Callable, args: tuple):
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self, fn, args)


def slurm_executor(cfg):
    """A submitit AutoExecutor with the sweep's SLURM options (``--slurm_cluster local`` runs the
    array as local processes, ``debug`` in this process)."""
    submitit = _require("submitit", "slurm")
    folder = Path(cfg.slurm_folder or Path(cfg.out_dir) / "submitit") / "%j"
    if not cfg.slurm_cluster and shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm found no sbatch on this machine; run it on a SLURM "
                          "login node, or pass --slurm_cluster local to test the array here")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cfg.slurm_cluster or None)
    params = {"name": "vital-eval", "timeout_min": int(cfg.slurm_time),
              "gpus_per_node": int(cfg.slurm_gpus), "cpus_per_task": int(cfg.slurm_cpus),
              "slurm_array_parallelism": int(cfg.slurm_parallel)}
    if cfg.slurm_partition:
        params["slurm_partition"] = cfg.slurm_partition
    executor.update_parameters(**params)
    return executor


def _slurm(cfg, tasks: list[Task]):
    """Yield (task index, outcome) as array jobs end."""
    executor = slurm_executor(cfg)
    jobs = executor.map_array(SlurmCall(), [t.fn for t in tasks], [t.args for t in tasks])
    print(f"submitted {len(jobs)} job(s) (array {jobs[0].job_id.split('_')[0]}) to "
          f"{executor.cluster}; logs in {executor.folder}", file=sys.stderr, flush=True)
    index = {id(job): i for i, job in enumerate(jobs)}
    from submitit.helpers import as_completed
    for job in as_completed(jobs, poll_frequency=POLL_SECONDS):
        try:
            yield index[id(job)], job.result()
        except Exception as err:   # submitit.core.utils.FailedJobError: the job's traceback
            yield index[id(job)], err
