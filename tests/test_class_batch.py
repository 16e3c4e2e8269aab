"""Several class targets in one batched optimisation: the images equal the targets run one by
one with the same seed (up to the float reduction order of a batched forward), one run folder
per target, --batch_size splits the targets into batches."""
import json

import pytest
import torch

from vital.config import ConfigError
from vital.modes.class_batch import ClassBatchCFG, run_class_batch, target_cfgs
from vital.modes.class_mode import ClassCFG, run_class

from helpers import TINY_CNN as TINY, write_images

SETTINGS = dict(model=TINY, size=32, steps_multires=[2, 3], num_ref=4, save_steps=5,
                device="cpu", progress=False, seed=3)


def _refs(root):
    for k, name in enumerate(("class3", "class5", "class7")):
        write_images(root / "refs" / name, 4, seed=k)


def test_batched_targets_equal_the_runs_one_by_one(tmp_path):
    _refs(tmp_path)
    cfg = ClassBatchCFG(targets=["class3", "class5", "class7"], ref_root=str(tmp_path / "refs"),
                        batch_size=2, out_dir=str(tmp_path / "batched"), **SETTINGS)
    batched = run_class_batch(cfg)
    assert [r.steps_done for _, r in batched] == [5, 5, 5]
    for k, ((run_dir, result), name) in enumerate(zip(batched, ("class3", "class5", "class7"))):
        single_dir, single = run_class(ClassCFG(target=name, ref_dir=str(tmp_path / "refs" / name),
                                                out_dir=str(tmp_path / "single"), **SETTINGS))
        torch.testing.assert_close(result.image, single.image, rtol=0, atol=1e-4)
        torch.testing.assert_close(result.alpha, single.alpha, rtol=0, atol=1e-3)
        for path in ("final.png", "steps/step_0005.png", "metrics.json", "config.json"):
            assert (run_dir / path).is_file(), path
        config = json.loads((run_dir / "config.json").read_text())
        assert config["cfg"]["target"] == name and config["batched_with"] == [2, 2, 1][k]
        steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
        single_steps = json.loads((single_dir / "metrics.json").read_text())["steps"]
        assert [list(s["terms"]) for s in steps] == [list(s["terms"]) for s in single_steps]
        assert len(steps) == 1 and any(t.startswith("class") for t in steps[0]["terms"])


def test_targets_name_their_reference_folders_and_refuse_duplicates(tmp_path):
    cfg = ClassBatchCFG(targets=["a", "b=elsewhere/b"], ref_root="root")
    assert [(c.target, c.ref_dir) for c in target_cfgs(cfg)] == [("a", "root/a"),
                                                                 ("b", "elsewhere/b")]
    for twice in (["a", "a"], ["espresso", "Espresso=elsewhere/e"], ["tabby cat", "Tabby  cat"]):
        with pytest.raises(ConfigError, match="more than once"):
            target_cfgs(ClassBatchCFG(targets=twice))
    # a CLIP prompt with "=" in it (no folder after it) is one target, not NAME=DIR
    (tmp_path / "refs").mkdir()
    cfgs = target_cfgs(ClassBatchCFG(targets=["a photo of x=y", f"c={tmp_path / 'refs'}"],
                                     ref_root="root"))
    assert [(c.target, c.ref_dir) for c in cfgs] == [("a photo of x=y", "root/a photo of x=y"),
                                                     ("c", str(tmp_path / "refs"))]
