"""The evaluation harness on a tiny random CNN at 32 px: a sweep runs (its targets in batches of
2), resumes without recomputing (a partly finished batch renders only its missing runs), shards
into halves whose merged report equals the unsharded one, gives the report of one run at a time;
bad sweeps fail before any run with a message that names what is valid."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from vital.models import classnames as labels
from vital.eval import scoring as eval_scoring
from vital.eval import harness as evaluate
from vital.config import ConfigError, parse_cfg
from vital.eval.report import QUALITY, write_report
from vital.eval.sweep import MethodSpec, Overrides, TargetSpec, batch_key, batch_runs
from vital.eval.harness import (EvalCFG, expand, parse_shard, run_sweep, select_shard,
                            settings_hash)
from vital.eval.metrics import zeroshot_classifier
from vital.models.classnames import encode_texts

from helpers import TINY_CNN, TINY_CNN_DIR, assert_png_shows, read_png, write_images



def _cfg(root, out="out", **kw):
    base = dict(out_dir=str(root / out), models=[TINY_CNN], targets=["class3", "class5"],
                ref_root=str(root / "refs"), methods=["vital", "maco"], seeds=[0],
                settings={"size": 32, "steps": 2, "save_steps": 1, "num_ref": 4},
                judge=TINY_CNN, device="cpu", progress=False, batch_size=2)
    base.update(kw)
    return EvalCFG(**base)


def _refs(root):
    write_images(root / "refs" / "class3", 4, seed=0)
    write_images(root / "refs" / "class5", 4, seed=1)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One unsharded sweep and the same sweep as two shards (2 targets x 2 methods x 1 seed)."""
    root = tmp_path_factory.mktemp("sweep")
    _refs(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITAL_CACHE", str(root / "cache"))
        whole = run_sweep(_cfg(root))
        halves = [run_sweep(_cfg(root, "sharded", shard=f"{i}/2")) for i in range(2)]
    return root, whole, halves


def _quality_part(report_md: str) -> str:
    return report_md.split("## Cost")[0]


def _quality_summary(summary: dict) -> dict:
    keep = {k for k, _ in QUALITY}
    return {model: {m: {k: v for k, v in row.items() if k in keep}
                    for m, row in s["rows"].items()} for model, s in summary.items()}


def test_sweep_writes_runs_results_and_report(swept):
    root, whole, _ = swept
    assert [(r["target"], r["method"]) for r in whole] == [
        ("class3", "vital"), ("class3", "maco"), ("class5", "vital"), ("class5", "maco")]
    run_dir = root / "out" / TINY_CNN_DIR / "class3" / "maco" / "seed0"
    for name in ("config.json", "metrics.json", "result.json", "fid_features.safetensors"):
        assert (run_dir / name).is_file(), name
    final = assert_png_shows(run_dir / "final.png", (32, 32))
    first = assert_png_shows(run_dir / "steps" / "step_0001.png", (32, 32))
    assert (first != final).any()                     # the two steps changed the image
    record = json.loads((run_dir / "result.json").read_text())
    assert record["class_index"] == 3 and record["status"] == "finished"
    assert record["method_overrides"]["param"] == "maco"
    assert [row["step"] for row in record["curve"]] == [1, 2]
    scores = record["metrics"]
    for key in ("self_top1", "judge_top5", "class_auc"):
        assert 0 <= scores[key] <= 1, key
    assert scores["seconds_per_step"] > 0 and scores["class_mad"] == scores["class_mad"]  # no NaN
    report = write_report(root / "out")
    text = report.read_text()
    assert "| vital |" in text and "| maco |" in text and "(reference images)" in text
    for png in ("grid_", "curves_"):
        assert_png_shows(report.parent / f"{png}{TINY_CNN_DIR}.png")


def test_resume_skips_finished_runs(swept, monkeypatch):
    root, whole, _ = swept

    def no_render(*args, **kwargs):
        raise AssertionError("a finished run was rendered again")

    monkeypatch.setattr(evaluate, "run_class", no_render)
    again = run_sweep(_cfg(root))
    assert [r["settings_hash"] for r in again] == [r["settings_hash"] for r in whole]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in whole]


def test_batches_give_the_report_and_images_of_one_run_at_a_time(swept, tmp_path):
    root, whole, _ = swept
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITAL_CACHE", str(root / "cache"))
        single = run_sweep(_cfg(tmp_path, "single", ref_root=str(root / "refs"), batch_size=1))
    assert [r["batched_with"] for r in whole] == [2] * 4
    assert [r["batched_with"] for r in single] == [1] * 4
    assert [r["settings_hash"] for r in single] == [r["settings_hash"] for r in whole]
    for a, b in zip(whole, single):
        assert a["metrics"]["self_top1"] == b["metrics"]["self_top1"]
        assert a["metrics"]["class_mad"] == pytest.approx(b["metrics"]["class_mad"], rel=1e-4)
        key = f"{TINY_CNN_DIR}/{a['target']}/{a['method']}/seed0/final.png"
        diff = abs(read_png(root / "out" / key).astype(int)
                   - read_png(tmp_path / "single" / key).astype(int))
        assert diff.max() <= 1          # PNG rounding of images equal to ~1e-5
    one, two = write_report(root / "out"), write_report(tmp_path / "single")
    assert _quality_part(one.read_text()) == _quality_part(two.read_text())
    summaries = [json.loads((p.parent / "summary.json").read_text()) for p in (one, two)]
    flat = [{(model, method, k): v for model, rows in _quality_summary(x).items()
             for method, row in rows.items() for k, v in row.items()} for x in summaries]
    assert flat[0].keys() == flat[1].keys()
    for key, value in flat[0].items():
        assert value == pytest.approx(flat[1][key], rel=1e-4, abs=1e-6), key


def test_resume_renders_only_the_unfinished_runs_of_a_batch(swept, tmp_path, monkeypatch):
    root, whole, _ = swept
    copy = tmp_path / "partly"
    shutil.copytree(root / "out", copy, ignore=shutil.ignore_patterns("report"))
    run_dir = lambda target, method: copy / TINY_CNN_DIR / target / method / "seed0"  # noqa: E731
    kept = (run_dir("class3", "vital") / "result.json").read_text()
    for target, method in (("class5", "vital"), ("class3", "maco"), ("class5", "maco")):
        (run_dir(target, method) / "result.json").unlink()   # as if killed before scoring
    alone, together = [], []
    real_one, real_batch = evaluate.run_class, evaluate.run_in_batches
    monkeypatch.setattr(evaluate, "run_class", lambda cfg, *a, **k: alone.append(
        (cfg.target, cfg.param)) or real_one(cfg, *a, **k))
    monkeypatch.setattr(evaluate, "run_in_batches", lambda cfgs, *a, **k: together.append(
        [(c.target, c.param) for c in cfgs]) or real_batch(cfgs, *a, **k))
    monkeypatch.setenv("VITAL_CACHE", str(root / "cache"))
    again = run_sweep(_cfg(tmp_path, "partly", ref_root=str(root / "refs")))
    assert alone == [("class5", "laplacian")]                    # the vital batch's missing run
    assert together == [[("class3", "maco"), ("class5", "maco")]]
    assert (run_dir("class3", "vital") / "result.json").read_text() == kept
    assert [r["batched_with"] for r in again] == [2, 2, 1, 2]
    assert [r["metrics"]["self_top1"] for r in again] == [r["metrics"]["self_top1"]
                                                          for r in whole]


def test_a_setting_added_later_at_its_default_keeps_old_runs(swept, tmp_path, monkeypatch):
    root, _, _ = swept
    copy = tmp_path / "older"
    shutil.copytree(root / "out", copy, ignore=shutil.ignore_patterns("report"))
    for path in copy.rglob("result.json"):   # as written before ClassCFG had l2_weight
        record = json.loads(path.read_text())
        for part in (record["settings"], record["base_settings"]):
            del part["class"]["l2_weight"]
        record["settings_hash"] = settings_hash(record["settings"])
        path.write_text(json.dumps(record))
    monkeypatch.setattr(evaluate, "run_class", lambda *a, **k: pytest.fail("rendered again"))
    assert len(run_sweep(_cfg(tmp_path, out="older", ref_root=str(root / "refs")))) == 4
    fresh = json.loads(next((root / "out").rglob("result.json")).read_text())
    older = sorted(copy.rglob("result.json"))[0]
    record = json.loads(older.read_text())
    record["base_settings"] = fresh["base_settings"]   # one run written by the newer code
    older.write_text(json.dumps(record))
    assert write_report(copy).is_file()
    record["base_settings"]["class"]["l2_weight"] = 0.5   # not the default: a real difference
    older.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"class\.l2_weight"):
        write_report(copy)


def test_shards_split_the_runs_and_merge_into_the_same_report(swept):
    root, whole, halves = swept
    assert [len(h) for h in halves] == [2, 2]
    assert sorted(r["index"] for h in halves for r in h) == [r["index"] for r in whole]
    one, two = write_report(root / "out"), write_report(root / "sharded")
    assert _quality_part(one.read_text()) == _quality_part(two.read_text())
    summaries = [json.loads((p.parent / "summary.json").read_text()) for p in (one, two)]
    assert _quality_summary(summaries[0]) == _quality_summary(summaries[1])
    assert "## Cost" in two.read_text()


def test_report_refuses_runs_with_different_settings(swept, tmp_path):
    root, _, _ = swept
    copy = tmp_path / "mixed"
    shutil.copytree(root / "out", copy, ignore=shutil.ignore_patterns("report"))
    path = sorted(copy.rglob("result.json"))[-1]
    record = json.loads(path.read_text())
    record["base_settings"]["class"]["steps"] = 5
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"class\.steps differ"):
        write_report(copy)
    record["base_settings"] = json.loads(sorted(copy.rglob("result.json"))[0].read_text())[
        "base_settings"]
    record["method_overrides"]["lr"] = 0.5
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"method .*overrides: lr"):
        write_report(copy)


def test_changed_settings_need_redo_and_unfinished_runs_restart(tmp_path):
    _refs(tmp_path)
    cfg = _cfg(tmp_path, targets=["class3"], methods=["vital"])
    run_sweep(cfg)
    changed = _cfg(tmp_path, targets=["class3"], methods=["vital"],
                   settings={**cfg.settings, "lr": 0.01})
    with pytest.raises(ConfigError, match=r"other settings \(class\.lr\).*--redo"):
        run_sweep(changed)
    run_dir = expand(changed)[0].run_dir
    (run_dir / "result.json").unlink()             # as if killed before scoring
    (run_dir / "junk.txt").write_text("left over")
    record = run_sweep(changed)[0]
    assert record["settings"]["class"]["lr"] == 0.01 and not (run_dir / "junk.txt").exists()
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["seed0"]   # no seed0_2


# ---------------------------------------------------------------- expansion, shards, input

def test_expand_order_paths_and_user_methods(tmp_path):
    cfg = _cfg(tmp_path, seeds=[0, 1], methods=[
        "am_fft", {"name": "vital_cw1", "overrides": {"class_weight": 1}},
        {"name": "maco_fast", "base": "maco", "overrides": {"lr": "0.1"}}])
    runs = expand(cfg)
    assert len(runs) == 2 * 3 * 2 and [r.index for r in runs] == list(range(12))
    assert [r.key for r in runs[:3]] == [f"{TINY_CNN_DIR}/class3/am_fft/seed0",
                                         f"{TINY_CNN_DIR}/class3/am_fft/seed1",
                                         f"{TINY_CNN_DIR}/class3/vital_cw1/seed0"]
    assert runs[2].cfg.class_weight == 1.0 and isinstance(runs[2].cfg.class_weight, float)
    maco = runs[4].cfg
    assert (maco.param, maco.lr, maco.feat_weight, maco.size) == ("maco", 0.1, 0.0, 32)
    assert runs[0].cfg.ref_dir == str(tmp_path / "refs" / "class3")


def test_shards_partition_the_runs(tmp_path):
    runs = expand(_cfg(tmp_path, seeds=[0, 1, 2], methods=["vital", "am_fft"]))
    parts = [select_shard(runs, (i, 3)) for i in range(3)]
    assert sorted(r.index for p in parts for r in p) == list(range(len(runs)))
    assert [r.index for r in parts[1]] == list(range(1, len(runs), 3))
    assert select_shard(runs, None) == runs


def test_batches_group_the_targets_of_a_method_and_seed_and_shards_partition_them(tmp_path):
    cfg = _cfg(tmp_path, targets=["class3", "class5", "class7"], seeds=[0, 1],
               methods=["vital", "am_fft"], batch_size=2)
    runs = expand(cfg)
    batches = batch_runs(runs, 2)
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1, 1, 1, 1]
    for batch in batches:
        assert len({(r.model, r.method, r.seed) for r in batch}) == 1
        assert len({r.target for r in batch}) == len(batch)
    assert batch_key(batches[0]) == f"{TINY_CNN_DIR}/class3+class5/vital/seed0"
    assert batch_key(batches[-1]) == f"{TINY_CNN_DIR}/class7/am_fft/seed1"
    for n in (1, 2, 3, 5):
        parts = [select_shard(batches, (i, n)) for i in range(n)]
        indices = sorted(r.index for part in parts for batch in part for r in batch)
        assert indices == list(range(len(runs)))               # every run exactly once
    assert batch_runs(runs, 1) == [[r] for r in runs]         # one at a time: sweep order
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        batch_runs(runs, 0)


@pytest.mark.parametrize("text, message", [   # issue 15: -1/2 does look like i/n
    ("3/2", r"index i must be in 0\.\.1"), ("1/0", "n must be 1 or more"), ("a/b", "like i/n"),
    ("-1/2", r"index i must be in 0\.\.1 for n = 2, got -1")])
def test_bad_shard_specs(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_shard(text)
    assert parse_shard("1/4") == (1, 4) and parse_shard("") is None


@pytest.mark.parametrize("kw, message", [
    ({"methods": ["vital", "bogus"]}, "unknown method 'bogus'; valid: vital, vital_pure"),
    ({"methods": [{"name": "x", "overrides": {"stepz": 3}}]}, r"unknown setting.*'stepz'.*steps"),
    ({"methods": [{"name": "x", "base": "lucid", "overrides": {}}]}, "unknown base 'lucid'"),
    ({"settings": {"seed": 3}}, r"sets 'seed', which the sweep itself \(per run: models"),
    ({"settings": {"num_reff": 3}}, r"valid ClassCFG keys: .*num_ref"),
    ({"methods": ["vital", "vital"]}, "twice"),
    ({"targets": ["class3", "class3"]}, "twice"),
    ({"targets": [{"name": "class3"}]}, "valid keys: target, ref_dir"),
    ({"settings": [1, 2]}, "settings must be an object"),
])
def test_bad_sweeps_name_what_is_valid(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        expand(_cfg(tmp_path, **kw))


def test_unknown_target_fails_before_any_run(tmp_path):
    _refs(tmp_path)
    (tmp_path / "refs" / "class77").mkdir()
    cfg = _cfg(tmp_path, targets=["class3", "class77"])
    with pytest.raises(ValueError, match="unknown class 'class77'"):
        run_sweep(cfg)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"judge .* does not know class"):
        run_sweep(_cfg(tmp_path, judge="efficientnet-lite0"))


def test_sweep_file_with_unknown_key_fails(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"targets": ["class3"], "method": ["vital"]}))
    with pytest.raises(SystemExit):
        parse_cfg(EvalCFG, ["--json_cfg", str(path)])
    err = capsys.readouterr().err
    assert "'method' (did you mean 'methods'?)" in err and "Valid keys" in err
    path.write_text(json.dumps({"targets": [{"target": "a", "refdir": "x"}]}))
    with pytest.raises(SystemExit):
        parse_cfg(EvalCFG, ["--json_cfg", str(path)])
    assert "valid keys: target, ref_dir" in capsys.readouterr().err


def test_entry_parsers_and_command_line(tmp_path):
    assert TargetSpec("daisy=/data/daisy") == {"target": "daisy", "ref_dir": "/data/daisy"}
    assert MethodSpec({"name": "a", "overrides": {"lr": 1}}) == {
        "name": "a", "overrides": {"lr": 1}, "base": ""}
    assert Overrides("steps_multires=[50,100],lr=0.1,param=fft") == {
        "steps_multires": [50, 100], "lr": 0.1, "param": "fft"}
    cfg = parse_cfg(EvalCFG, ["--targets", "class3", "class5=/x", "--methods", "vital",
                              "--settings", "size=32,scales=[1.0]", "--shard", "0/2"])
    assert cfg.targets[1] == {"target": "class5", "ref_dir": "/x"}
    assert cfg.settings == {"size": 32, "scales": [1.0]} and cfg.shard == "0/2"


# ---------------------------------------------------------------- CLIP zero-shot wiring

class _BagOfTokens(torch.nn.Module):
    """Stands in for a CLIP text tower: a prompt's embedding is the histogram of its token ids
    folded into 64 bins, so prompts of one class share their class-name tokens."""
    context_length = 77

    def encode_text(self, tokens):
        out = torch.zeros(tokens.shape[0], 64)
        return out.scatter_add_(1, tokens % 64, (tokens > 0).float())   # (N, L) -> (N, 64)


def test_clip_zero_shot_uses_template_averaged_class_embeddings(monkeypatch):
    names, templates = ["goldfish", "volcano", "teapot"], ["a photo of a {}.", "a {} in art."]
    monkeypatch.setattr(labels, "clip_classnames", lambda: names)
    monkeypatch.setattr(labels, "imagenet_templates", lambda: templates)
    clip = _BagOfTokens()
    fake = SimpleNamespace(clip=clip, weight_hash="fake-clip", device=torch.device("cpu"),
                           input_size=16, class_names=None, spec="fake")
    weights = eval_scoring.zeroshot_weights(fake)
    per_class = [encode_texts(clip, [t.format(n) for t in templates], "cpu") for n in names]
    torch.testing.assert_close(weights, zeroshot_classifier(torch.stack(per_class)))
    fake.clip = SimpleNamespace(context_length=77, encode_text=lambda tokens: pytest.fail(
        "the zero-shot weights were encoded again instead of read from the cache"))
    torch.testing.assert_close(eval_scoring.zeroshot_weights(fake), weights)   # the next sweep
    fake.embed = lambda x: weights[2].expand(x.shape[0], -1)  # every image looks like a teapot
    monkeypatch.setattr(eval_scoring, "load_target",
                        lambda spec, device="cpu": fake if spec == "fake" else pytest.fail(spec))
    logits = eval_scoring.Scorer(judge="fake").logits("fake", torch.rand(3, 3, 20, 20))
    assert logits.shape == (3, 3) and logits.argmax(1).tolist() == [2, 2, 2]
