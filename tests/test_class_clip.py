"""Class visualisation on a tiny random CLIP: the class term, the live opinion, its cache."""
import json

import torch

from vital.models.classnames import clip_text_target
from vital.modes.class_mode import ClassCFG, run_class
from vital.models import load_target


def _cfg(tmp_path, model, ref_folder, **kw):
    base = dict(model=str(model), target="espresso", ref_dir=str(ref_folder), size=32,
                steps_multires=[3, 3], save_steps=3, out_dir=str(tmp_path / "out"), run_name="clip",
                progress=False, device="cpu")
    base.update(kw)
    return ClassCFG(**base)


def test_imagenet_class_uses_templates_and_free_prompt_is_verbatim(tiny_clip_file):
    target = load_target(str(tiny_clip_file))
    emb_class, label = clip_text_target(target, "Espresso")
    assert label == "espresso" and torch.isclose(emb_class.norm(), torch.tensor(1.0))
    emb_index, _ = clip_text_target(target, "967")
    torch.testing.assert_close(emb_class, emb_index)
    emb_free, label_free = clip_text_target(target, "a red bicycle on the moon")
    assert label_free == "a red bicycle on the moon"
    assert not torch.allclose(emb_free, emb_class)


def test_clip_run_records_opinion_and_caches_vocabulary(tmp_path, tiny_clip_file, ref_folder,
                                                         isolated_cache):
    run_dir, result = run_class(_cfg(tmp_path, tiny_clip_file, ref_folder))
    assert result.steps_done == 6
    metrics = json.loads((run_dir / "metrics.json").read_text())
    first = metrics["steps"][0]
    assert len(first["opinion"]) == 5 and all(isinstance(w, str) for w, _ in first["opinion"])
    assert "a photo of a cat" in first["prompts"]
    assert any(k.startswith("clip:") for k in first["terms"])
    assert metrics["final_opinion"]["opinion_text"].startswith("CLIP:")
    cached = list((isolated_cache / "opinion").glob("*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run_class(_cfg(tmp_path, tiny_clip_file, ref_folder))
    assert cached[0].stat().st_mtime_ns == stamp      # second run reuses the vocabulary
