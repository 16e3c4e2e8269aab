"""Sweeps on a real engine: the same tiny sweep (a random CNN at 32 px, 2 steps; its two targets
one batch) run serially, as a SLURM job array through submitit's local executor, and as Ray
tasks on a local Ray with 2 workers writes the same runs and the same report; resume and --shard
work the same way, whatever the batch size; a missing engine fails with a one-sentence install
hint."""
import json
import os
from pathlib import Path

import pytest

from vital.config import ConfigError
from vital.eval import inner_sweep as eval_inner
from vital.eval import launchers
from vital.eval.harness import EvalCFG, run_sweep
from vital.eval.report import QUALITY, write_report

from helpers import TINY_CNN as TINY, write_images

REPO = Path(__file__).resolve().parent.parent


def _cfg(root, out, **kw):
    base = dict(out_dir=str(root / out), models=[TINY], targets=["class3", "class5"],
                ref_root=str(root / "refs"), methods=["vital"], seeds=[0],
                settings={"size": 32, "steps": 2, "save_steps": 2, "num_ref": 4},
                judge=TINY, device="cpu", progress=False,
                slurm_folder=str(root / "submitit"), slurm_cluster="local")
    base.update(kw)
    return EvalCFG(**base)


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """Reference folders, a shared cache, worker processes that import tests.helpers, and the
    serial sweep every engine is compared with."""
    root = tmp_path_factory.mktemp("launch")
    write_images(root / "refs" / "class3", 4, seed=0)
    write_images(root / "refs" / "class5", 4, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITAL_CACHE", str(root / "cache"))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                 os.environ.get("PYTHONPATH", "")]))
        serial = run_sweep(_cfg(root, "serial"))
        yield root, serial


def _quality(out_dir) -> tuple[str, dict]:
    """The report's quality tables and summary numbers (timings differ between engines)."""
    path = write_report(out_dir)
    summary = json.loads((path.parent / "summary.json").read_text())
    keep = {k for k, _ in QUALITY}
    rows = {m: {s: {k: v for k, v in r.items() if k in keep} for s, r in d["rows"].items()}
            for m, d in summary.items()}
    return path.read_text().split("## Cost")[0], rows


def _same_runs(a: list[dict], b: list[dict]) -> None:
    assert [r["settings_hash"] for r in a] == [r["settings_hash"] for r in b]
    for x, y in zip(a, b):
        assert x["metrics"]["self_top1"] == y["metrics"]["self_top1"]
        assert x["metrics"]["class_mad"] == pytest.approx(y["metrics"]["class_mad"], rel=1e-4)


def test_submitit_array_gives_the_serial_report(sweep_root, capsys):
    root, serial = sweep_root
    records = run_sweep(_cfg(root, "slurm", launcher="slurm"))
    _same_runs(serial, records)
    assert _quality(root / "slurm") == _quality(root / "serial")
    # both targets of the method and seed in one task (--batch_size, default 4)
    assert "[1/1] module_tests.helpers_TinyCNN/class3+class5/vital/seed0:" in \
        capsys.readouterr().out
    assert [r["batched_with"] for r in records] == [2, 2]
    assert list((root / "submitit").iterdir())   # submitit's job files and logs


def test_array_shards_merge_and_a_rerun_queues_nothing(sweep_root, capsys, monkeypatch):
    root, serial = sweep_root
    for i in range(2):   # submitit's debug executor: the same array code, in this process
        part = run_sweep(_cfg(root, "shards", launcher="slurm", slurm_cluster="debug",
                              shard=f"{i}/2", batch_size=1))   # one run per task
        assert [r["batched_with"] for r in part] == [1]
    assert _quality(root / "shards") == _quality(root / "serial")   # batched or not
    capsys.readouterr()
    monkeypatch.setattr(launchers, "slurm_executor", lambda cfg: pytest.fail("queued again"))
    again = run_sweep(_cfg(root, "shards", launcher="slurm"))   # batches of 4: all finished
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    _same_runs(serial, again)


@pytest.mark.slow   # a local Ray takes ~10 s to start on 2 shared cores, its workers ~5 s each
def test_ray_tasks_give_the_serial_report(sweep_root):
    ray = pytest.importorskip("ray")
    root, serial = sweep_root
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        records = run_sweep(_cfg(root, "ray", launcher="ray"))
    finally:
        ray.shutdown()
    _same_runs(serial, records)
    assert _quality(root / "ray") == _quality(root / "serial")


def test_inner_sweep_on_the_array_matches_the_serial_one(tmp_path, monkeypatch):
    write_images(tmp_path / "data", 6)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests")]))
    base = dict(mode="inner", models=[TINY], layer="stage2", neurons=[3, 7], num_real=5,
                data_dir=str(tmp_path / "data"), methods=["vital"], seeds=[0],
                device="cpu", progress=False, slurm_folder=str(tmp_path / "submitit"),
                slurm_cluster="local", settings={"size": 32, "steps_multires": [2, 2],
                                                 "save_steps": 4, "num_ref": 3,
                                                 "data_size": 40})
    serial = eval_inner.run_inner_sweep(EvalCFG(out_dir=str(tmp_path / "a"), **base))
    array = eval_inner.run_inner_sweep(EvalCFG(out_dir=str(tmp_path / "b"), launcher="slurm",
                                               **base))
    assert [r["batched_with"] for r in array] == [2, 2]   # both neurons in one array job
    assert [r["settings_hash"] for r in array] == [r["settings_hash"] for r in serial]
    assert [r["auc"] for r in array] == pytest.approx([r["auc"] for r in serial])
    assert [r["mad"] for r in array] == pytest.approx([r["mad"] for r in serial], rel=1e-4)


def test_missing_engine_names_the_install_command(tmp_path, monkeypatch):
    real_import = launchers.importlib.import_module

    def no_ray(name, *a):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *a)

    monkeypatch.setattr(launchers.importlib, "import_module", no_ray)
    task = launchers.Task(launchers.call, (print, ()), "x")
    with pytest.raises(ConfigError, match=r"needs ray, .*pip install -e \.\[cluster\]"):
        launchers.launch(EvalCFG(launcher="ray"), [task], lambda r, s: "")


def test_failed_runs_are_named_after_the_others_finish(monkeypatch, capsys):
    tasks = [launchers.Task(_ok, (n,), f"run{n}") for n in range(3)]
    failure = RuntimeError("FailedJobError: job 7 failed\nTraceback ...\nOSError: disk full\n"
                           "  - /logs/7_log.err")
    monkeypatch.setattr(launchers, "_slurm", lambda cfg, tasks: iter(
        [(2, _ok(2)), (1, failure), (0, _ok(0))]))
    with pytest.raises(launchers.SweepFailed, match=r"1 of 3 run\(s\) failed.*run1 .*disk full"):
        launchers.launch(EvalCFG(launcher="slurm"), tasks, lambda r, s: f"n={r['n']}")
    assert capsys.readouterr().out.splitlines() == [
        "[1/3] run2: n=2", "[2/3] run1: failed: OSError: disk full", "[3/3] run0: n=0"]


def test_slurm_requeues_the_same_call_at_its_time_limit():
    call = launchers.SlurmCall()
    delayed = call.checkpoint(_ok, (7,))
    assert delayed.function is call and delayed.args == (_ok, (7,))
    assert call(_ok, (7,)) == ({"n": 7}, False)


def _ok(n):
    return {"n": n}, False


def _boom():
    raise OSError("disk full")
