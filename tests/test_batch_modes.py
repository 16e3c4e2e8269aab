"""Several targets in one batched optimisation (vital.modes.batch): inner --neurons / --auto and
class --targets give the images of the runs one by one with the same seed (up to the float
reduction order of a batched forward), with relevance maps computed once for the batch, one run
folder per target, --batch_size splitting the targets."""
import json

import pytest
import torch

from vital.config import ConfigError
from vital.modes import batch as B
from vital.modes.class_batch import ClassBatchCFG, run_class_batch
from vital.modes.class_mode import ClassCFG, run_class
from vital.modes.inner import InnerCFG, run_inner
from vital.optvis import relevance as rel

from helpers import TINY_CNN, read_png, write_images

INNER = dict(model=TINY_CNN, layer="stage2", num_ref=4, data_size=40, size=32,
             steps_multires=[2, 3], save_steps=5, progress=False, device="cpu", seed=5)


def _count_relevance_passes(monkeypatch) -> list:
    calls = []
    real = rel.layer_relevance

    def counting(target, images, *args, **kw):
        calls.append(images.shape[0])
        return real(target, images, *args, **kw)
    monkeypatch.setattr(rel, "layer_relevance", counting)
    return calls


@pytest.mark.parametrize("rule", ["gradxact", "lrp", "none"])
def test_batched_neurons_equal_the_runs_one_by_one(tmp_path, monkeypatch, rule):
    data = write_images(tmp_path / "data", 6)
    calls = _count_relevance_passes(monkeypatch)
    dirs, last = run_inner(InnerCFG(neurons=[3, 7, 11], batch_size=2, relevance=rule,
                                    data_dir=str(data), out_dir=str(tmp_path / "batched"),
                                    **INNER))
    batched_calls = list(calls)
    assert len(dirs) == 3 and last.steps_done == 5
    for k, (run_dir, neuron) in enumerate(zip(dirs, (3, 7, 11))):
        single_dir, single = run_inner(InnerCFG(neuron=neuron, relevance=rule, data_dir=str(data),
                                                out_dir=str(tmp_path / "single"), **INNER))
        meta = json.loads((run_dir / "config.json").read_text())
        assert meta["neuron"] == neuron and meta["batched_with"] == [2, 2, 1][k]
        for name in ("final.png", "neuron.json", "references.png", "steps/step_0005.png"):
            assert (run_dir / name).is_file(), name
        mine = json.loads((run_dir / "neuron.json").read_text())["visualisation"]
        theirs = json.loads((single_dir / "neuron.json").read_text())["visualisation"]
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6)
        diff = abs(read_png(run_dir / "final.png").astype(int)
                   - read_png(single_dir / "final.png").astype(int))
        assert diff.max() <= 1          # PNG rounding of images equal to ~1e-5
        # each run keeps its own term breakdown, as the run one by one records it
        steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
        single_steps = json.loads((single_dir / "metrics.json").read_text())["steps"]
        assert list(steps[0]["terms"]) == list(single_steps[0]["terms"])
        assert f"neuron:stage2:{neuron}" in steps[0]["terms"]
        assert steps[0]["terms"] == pytest.approx(single_steps[0]["terms"], rel=1e-3, abs=1e-6)
    if rule != "none":
        # one relevance pass per step for each batch (2 images, then 1), not one per element
        assert batched_calls == [2] * 5 + [1] * 5


def test_auto_in_batches_keeps_ranks_and_shares_the_patch_scores(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", 4)
    import vital.modes.inner as inner
    scored = []
    real = inner.layer_patch_scores
    monkeypatch.setattr(inner, "layer_patch_scores",
                        lambda *a, **k: scored.append(1) or real(*a, **k))
    dirs, result = run_inner(InnerCFG(auto=3, batch_size=2, data_dir=str(data), cache=False,
                                      out_dir=str(tmp_path / "out"), **INNER))
    metas = [json.loads((d / "config.json").read_text()) for d in dirs]
    assert [m["auto"]["rank"] for m in metas] == [0, 1, 2] and result.stopped is None
    assert [m["batched_with"] for m in metas] == [2, 2, 1] and len(scored) == 1


def test_class_targets_with_relevance_equal_one_by_one(tmp_path, monkeypatch):
    for k, name in enumerate(("class3", "class5")):
        write_images(tmp_path / "refs" / name, 4, seed=k)
    settings = dict(model=TINY_CNN, size=32, steps_multires=[2, 3], num_ref=4, save_steps=0,
                    device="cpu", progress=False, seed=1, relevance="gradxact")
    calls = _count_relevance_passes(monkeypatch)
    batched = run_class_batch(ClassBatchCFG(targets=["class3", "class5"],
                                            ref_root=str(tmp_path / "refs"),
                                            out_dir=str(tmp_path / "b"), **settings))
    assert calls == [2] * 5
    for (_, result), name in zip(batched, ("class3", "class5")):
        _, single = run_class(ClassCFG(target=name, ref_dir=str(tmp_path / "refs" / name),
                                       out_dir=str(tmp_path / "s"), **settings))
        torch.testing.assert_close(result.image, single.image, rtol=0, atol=1e-4)


def test_maps_group_only_joins_compatible_maps(tiny_cnn_target):
    score = lambda f: f[:, 0].mean(-1)
    a = rel.SyntheticMaps(tiny_cnn_target, ["stem"], "stage2", score, "gradxact")
    b = rel.SyntheticMaps(tiny_cnn_target, ["stem"], "stage2", score, "gradxact")
    other = rel.SyntheticMaps(tiny_cnn_target, ["stem"], "stage2", score, "gradxact", floor=0.5)
    assert rel.MapsGroup.join([a, None]) is None and a.group is None
    assert rel.MapsGroup.join([a, other]) is None and a.group is None
    group = rel.MapsGroup.join([a, b])
    assert a.group is group and b.group is group


def test_bad_batches_are_one_sentence(tmp_path):
    data = write_images(tmp_path / "data", 2)
    with pytest.raises(ConfigError, match="named twice"):
        run_inner(InnerCFG(neurons=[3, 3], data_dir=str(data), **INNER))
    with pytest.raises(ConfigError, match="named twice"):
        run_inner(InnerCFG(neurons=["2-4", "3"], data_dir=str(data), **INNER))
    with pytest.raises(ConfigError, match="valid 0..31"):
        run_inner(InnerCFG(neurons=[3, 99], data_dir=str(data), **INNER))
    with pytest.raises(ConfigError, match="--direction"):
        run_inner(InnerCFG(neurons=[3], direction="x.npy", data_dir=str(data), **INNER))
    with pytest.raises(ConfigError, match="--batch 1"):
        run_inner(InnerCFG(neurons=[3, 4], batch=2, data_dir=str(data), **INNER))
    with pytest.raises(ConfigError, match="batch_size"):
        B.run_in_batches([None], lambda c: c, None, 0)


def test_batched_records_carry_each_runs_loss_and_opinion_like_a_single_run(tmp_path):
    for k, name in enumerate(("class3", "class5")):
        write_images(tmp_path / "refs" / name, 4, seed=k)
    settings = dict(model=TINY_CNN, size=32, steps_multires=[2, 3], num_ref=4, save_steps=5,
                    device="cpu", progress=False, seed=2, layers=["1", "2"])  # block numbers
    batched = run_class_batch(ClassBatchCFG(targets=["class3", "class5"],
                                            ref_root=str(tmp_path / "refs"),
                                            out_dir=str(tmp_path / "b"), **settings))
    for (run_dir, _), name in zip(batched, ("class3", "class5")):
        single_dir, _ = run_class(ClassCFG(target=name, ref_dir=str(tmp_path / "refs" / name),
                                           out_dir=str(tmp_path / "s"), **settings))
        mine = json.loads((run_dir / "metrics.json").read_text())["steps"][0]
        theirs = json.loads((single_dir / "metrics.json").read_text())["steps"][0]
        assert set(theirs) - {"terms"} <= set(mine) and "opinion_text" in mine
        assert mine["opinion_text"] == theirs["opinion_text"]
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        config = json.loads((run_dir / "config.json").read_text())
        assert config["cfg"]["layers"] == json.loads(
            (single_dir / "config.json").read_text())["cfg"]["layers"]


def test_a_batch_too_large_for_memory_is_refused_before_rendering(tmp_path, monkeypatch):
    import vital.models.memory as memory
    from vital.models import load_target
    data = write_images(tmp_path / "data", 4)
    one_image = memory.step_bytes(load_target(TINY_CNN), 32, 1)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 3 * one_image)  # 1 fits, 4 do not
    with pytest.raises(ConfigError, match="--batch_size 4 needs about"):
        run_inner(InnerCFG(neurons=[1, 2, 3, 4], batch_size=4, data_dir=str(data),
                           out_dir=str(tmp_path / "out"), **INNER))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("final.png"))


@pytest.mark.parametrize("rule", ["gradxact", "lrp"])
def test_batched_clip_vit_neurons_equal_one_by_one(tmp_path, tiny_clip_file, rule, monkeypatch):
    from vital.modes import runner
    for module in (B, runner):   # the opinion over the 49k-word vocabulary: test_class_clip
        monkeypatch.setattr(module, "make_opinion", lambda *a, **k: None)
    data = write_images(tmp_path / "data", 4, size=40)
    vit = dict(INNER, model=str(tiny_clip_file), layer="block.1.mlp", data_size=32,
               num_ref=3, steps_multires=[2, 2], prompts_file="", top_k=0,
               relevance=rule)
    dirs, _ = run_inner(InnerCFG(neurons=[5, 9], batch_size=2, data_dir=str(data),
                                 out_dir=str(tmp_path / "b"), **vit))
    for run_dir, neuron in zip(dirs, (5, 9)):
        single_dir, _ = run_inner(InnerCFG(neuron=neuron, data_dir=str(data),
                                           out_dir=str(tmp_path / "s"), **vit))
        diff = abs(read_png(run_dir / "final.png").astype(int)
                   - read_png(single_dir / "final.png").astype(int))
        assert diff.max() <= 1
        mine = json.loads((run_dir / "neuron.json").read_text())["visualisation"]
        theirs = json.loads((single_dir / "neuron.json").read_text())["visualisation"]
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("stopped, runs", [("terminated (SIGTERM: a time limit)", 1),
                                           ("interrupted", 1), ("stopped", 1),
                                           ("nan: loss became non-finite", 3), (None, 3)])
def test_one_stop_rule_for_neurons_one_at_a_time(tmp_path, monkeypatch, stopped, runs):
    """After a run ended by SIGTERM, Ctrl-C or a stop request no further neuron starts; a NaN
    in one run (recorded in its folder) lets the next go on."""
    from vital.modes import inner
    from vital.optvis.render import RenderResult, ends_the_loop
    assert ends_the_loop(stopped) == (runs == 1)
    data = write_images(tmp_path / "data", 2)
    started = []

    def fake_run(cfg, target, neuron, *a, **kw):
        started.append(neuron.index)
        return tmp_path / str(neuron.index), RenderResult(torch.zeros(1, 3, 4, 4),
                                                          torch.zeros(1, 4, 4), stopped=stopped)
    monkeypatch.setattr(inner, "run_neuron", fake_run)
    dirs, _ = run_inner(InnerCFG(neurons=["1-3"], batch_size=1, data_dir=str(data), **INNER))
    assert started == [1, 2, 3][:runs] and len(dirs) == runs
