"""The harness's inner-neuron mode (--mode inner) on a tiny random CNN: runs (neurons in batches
of 2) are scored with AUC / MAD against the neuron's top real images, equal the runs one at a
time, resume without rendering (a partly finished batch renders only its missing runs), shards
merge to the same report, bad input fails before any run."""
import json
import shutil

import pytest
import torch

from vital.eval import inner_sweep as eval_inner
from vital.eval import metrics
from vital.config import ConfigError
from vital.cli import main
from vital.eval.harness import EvalCFG, run_eval

from helpers import TINY_CNN, TINY_CNN_DIR, assert_png_shows, read_png, run_script, \
    write_images



def _cfg(root, out="out", **kw):
    base = dict(mode="inner", out_dir=str(root / out), models=[TINY_CNN], layer="stage2",
                neurons=[3, 7], data_dir=str(root / "data"), num_real=5,
                methods=["vital", "am_fft"], seeds=[0], device="cpu", progress=False,
                batch_size=2,
                settings={"size": 32, "steps_multires": [2, 2], "save_steps": 4, "num_ref": 3,
                          "data_size": 40})
    base.update(kw)
    return EvalCFG(**base)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("inner_sweep")
    write_images(root / "data", 6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITAL_CACHE", str(root / "cache"))
        whole = eval_inner.run_inner_sweep(_cfg(root))
        halves = [eval_inner.run_inner_sweep(_cfg(root, "sharded", shard=f"{i}/2"))
                  for i in range(2)]
    return root, whole, halves


def test_runs_are_scored_against_the_top_real_images(swept):
    root, whole, _ = swept
    assert [(r["neuron"], r["method"]) for r in whole] == \
        [(3, "vital"), (3, "am_fft"), (7, "vital"), (7, "am_fft")]
    from vital.refs.patches import data_files
    from vital.models import load_target
    target = load_target(TINY_CNN)
    real = eval_inner.real_activations(target, "stage2", data_files(root / "data"), 32)
    for r in whole:
        run_dir = root / "out" / TINY_CNN_DIR / "stage2" / r["method"] / "seed0" / \
            f"n{r['neuron']}"
        assert_png_shows(run_dir / "final.png", (32, 32))
        assert (run_dir / "result.json").is_file()
        top = real[:, r["neuron"]].topk(5).values
        fv = torch.tensor(json.loads((run_dir / "neuron.json").read_text())["visualisation"])
        expected = metrics.auc_mad(fv, top)
        assert r["auc"] == pytest.approx(expected["auc"]) and r["mad"] == pytest.approx(expected["mad"])
        assert r["num_real"] == 5 and r["real_mean"] == pytest.approx(float(top.mean()))


def test_rerun_skips_finished_runs(swept, monkeypatch):
    root, whole, _ = swept
    import vital.modes.inner as inner

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must not render again")
    monkeypatch.setattr(inner, "run_neuron", fail)
    monkeypatch.setenv("VITAL_CACHE", str(root / "cache"))
    again = eval_inner.run_inner_sweep(_cfg(root))
    assert [(r["auc"], r["mad"]) for r in again] == [(r["auc"], r["mad"]) for r in whole]


def test_batched_neurons_equal_the_runs_one_at_a_time(swept, tmp_path, monkeypatch):
    root, whole, _ = swept
    monkeypatch.setenv("VITAL_CACHE", str(root / "cache"))
    single = eval_inner.run_inner_sweep(_cfg(root, "single", batch_size=1))
    assert [r["batched_with"] for r in whole] == [2] * 4
    assert [r["batched_with"] for r in single] == [1] * 4
    for a, b in zip(whole, single):
        assert (a["neuron"], a["method"], a["settings_hash"]) == \
            (b["neuron"], b["method"], b["settings_hash"])
        assert a["auc"] == pytest.approx(b["auc"]) and \
            a["mad"] == pytest.approx(b["mad"], rel=1e-4, abs=1e-5)
        key = f"{TINY_CNN_DIR}/stage2/{a['method']}/seed0/n{a['neuron']}/final.png"
        diff = abs(read_png(root / "out" / key).astype(int)
                   - read_png(root / "single" / key).astype(int))
        assert diff.max() <= 1


def test_resume_renders_only_the_unfinished_runs_of_a_batch(swept, tmp_path, monkeypatch):
    root, whole, _ = swept
    shutil.copytree(root / "out", tmp_path / "out", ignore=shutil.ignore_patterns("report"))
    (tmp_path / "out" / TINY_CNN_DIR / "stage2" / "vital" / "seed0" / "n7" / "result.json"
     ).unlink()
    import vital.modes.batch as batch
    import vital.modes.inner as inner
    alone, real = [], inner.run_neuron
    monkeypatch.setattr(inner, "run_neuron", lambda cfg, *a, **k: alone.append(
        (cfg.neuron, cfg.param)) or real(cfg, *a, **k))
    monkeypatch.setattr(batch, "run_in_batches", lambda *a, **k: pytest.fail("batch rendered"))
    monkeypatch.setenv("VITAL_CACHE", str(root / "cache"))
    again = eval_inner.run_inner_sweep(_cfg(root, str(tmp_path / "out")))
    assert alone == [(7, "laplacian")]
    assert [r["batched_with"] for r in again] == [2, 2, 1, 2]
    assert [r["auc"] for r in again] == pytest.approx([r["auc"] for r in whole])


def test_shards_merge_to_the_unsharded_report(swept):
    root, whole, halves = swept
    assert sorted(len(h) for h in halves) == [2, 2]
    table = eval_inner.write_inner_report(root / "out")
    sharded = eval_inner.write_inner_report(root / "sharded")
    assert table.index("| vital |") < table.index("| am_fft |")   # the sweep's method order
    scores = lambda d: sorted((r["neuron"], r["method"], r["auc"], r["mad"])  # noqa: E731
                              for r in eval_inner.collect(d))
    assert scores(root / "out") == scores(root / "sharded") and len(scores(root / "out")) == 4
    no_timing = lambda t: [line.rsplit("|", 3)[0] for line in t.splitlines()]  # noqa: E731
    assert no_timing(table) == no_timing(sharded)
    assert_png_shows(root / "out" / "report" / f"inner_grid_{TINY_CNN_DIR}.png")


def test_changed_settings_refuse_to_reuse_without_redo(swept, monkeypatch):
    root, _, _ = swept
    monkeypatch.setenv("VITAL_CACHE", str(root / "cache"))
    cfg = _cfg(root, neurons=[3], methods=["vital"])
    cfg.settings = {**cfg.settings, "tv_weight": 0.2}
    with pytest.raises(ConfigError, match="other settings .*tv_weight.*--redo"):
        eval_inner.run_inner_sweep(cfg)


@pytest.mark.parametrize("change, message", [
    ({"layer": ""}, "needs --layer"),
    ({"layer": "nope"}, "unknown layer 'nope'"),
    ({"layer": "fc"}, "no positions"),
    ({"neurons": [99]}, r"out of range for stage2: valid 0\.\.31"),
    ({"methods": ["vital", "bogus"]}, "unknown method 'bogus'; valid: vital, vital_pure, am_fft"),
    ({"settings": {"class_weight": 1}}, "unknown setting.*class_weight.*valid InnerCFG keys"),
    ({"settings": {"layer": "stem"}}, "sets 'layer', which the sweep itself"),
    ({"num_real": 1}, "num_real must be >= 2"),
])
def test_bad_inner_sweeps_fail_before_any_run(tmp_path, change, message, monkeypatch):
    write_images(tmp_path / "data", 3)
    import vital.modes.inner as inner
    monkeypatch.setattr(inner, "run_neuron", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(ValueError, match=message):
        eval_inner.run_inner_sweep(_cfg(tmp_path, **change))


def test_script_runs_an_inner_sweep_end_to_end(tmp_path, monkeypatch):
    """evaluate_fvis.py --mode inner in a fresh interpreter: runs, scores, prints the table and
    writes the report; --report alone rebuilds it from the run folders."""
    write_images(tmp_path / "data", 4)
    monkeypatch.setenv("VITAL_CACHE", str(tmp_path / "cache"))
    proc = run_script("evaluate_fvis.py", "--mode", "inner", "--models", TINY_CNN, "--layer",
                      "stage2", "--neurons", "1", "--data_dir", tmp_path / "data", "--num_real",
                      "3", "--methods", "am_fft", "--out_dir", tmp_path / "o", "--device", "cpu",
                      "--no-progress", "--settings",
                      "size=32,steps=2,num_ref=2,data_size=40", cwd=tmp_path)
    assert "| am_fft |" in proc.stdout
    run_dir = tmp_path / "o" / TINY_CNN_DIR / "stage2" / "am_fft" / "seed0" / "n1"
    assert_png_shows(run_dir / "final.png", (32, 32))
    report = tmp_path / "o" / "report" / "inner_report.md"
    written = report.read_text()
    assert "| am_fft |" in written
    report.unlink()
    assert main(EvalCFG, run_eval, ["--mode", "inner", "--out_dir", str(tmp_path / "o"),
                          "--layer", "stage2", "--data_dir", "x", "--report"]) == 0
    assert report.read_text() == written
