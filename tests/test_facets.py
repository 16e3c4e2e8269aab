"""faceted_fvis.py: facets of one concept of a bank, and refusal of banks that do not fit (the
script itself runs in test_concepts, on the bank concept_neurons_fvis.py writes)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_CNN, assert_png_equals, assert_png_shows, write_images
from vital.cli import main
from vital.concepts.bank import BankError, BankMismatch, load_bank
from vital.modes import runner
from vital.modes.concepts import ConceptCFG, run_concepts
from vital.modes.facets import FacetCFG, facet_rows, run_facets



def _bank(tmp_path, refs, **kw):
    base = dict(model=TINY_CNN, target="3", ref_dir=str(refs), size=32, out_dir=str(tmp_path / "c"),
                run_name="bank", progress=False, device="cpu", n_concepts=3, sobol_designs=4,
                rank_images=2, top_patches=4, extract_only=True)
    base.update(kw)
    return run_concepts(ConceptCFG(**base))[0]


def _facet_cfg(tmp_path, bank, **kw):
    base = dict(model=TINY_CNN, bank=str(bank), size=32, steps=4, save_steps=2, n_facets=2,
                facet_patches=6, out_dir=str(tmp_path / "f"), run_name="f", progress=False,
                device="cpu")
    base.update(kw)
    return FacetCFG(**base)


@pytest.fixture
def refs(tmp_path):
    return write_images(tmp_path / "refs", 4)


def test_facets_of_the_top_concept_end_to_end(tmp_path, refs):
    bank_dir = _bank(tmp_path, refs)
    bank = load_bank(bank_dir)
    run_dir, result = run_facets(_facet_cfg(tmp_path, bank_dir, steps=8, save_steps=1))
    assert result.image.shape[0] == 2 and result.steps_done == 8
    for name in ("facets.json", "facets.safetensors", "config.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert_png_equals(run_dir / "final.png", result.image[0])
    assert_png_shows(run_dir / "facets_grid.png")
    info = json.loads((run_dir / "facets.json").read_text())
    assert info["concept"] == bank.order()[0] and info["decomp_layer"] == "stage1"
    steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    terms = steps[0]["terms"]
    assert {"facet:stage1", "concept:stage2"} <= set(terms)
    assert any(t.startswith("sort:") for t in terms)
    assert steps[-1]["terms"]["facet:stage1"] < steps[0]["terms"]["facet:stage1"]
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["facets"]["target_layer"] == "stage2"
    match = json.loads((run_dir / "facets_match.json").read_text())
    assert len(match["cosine"]) == 2 and len(match["concept_cosine"]) == 2
    stored = load_file(str(run_dir / "facets.safetensors"))
    assert stored["maps"].shape == (6, 2, 8 * 8)       # 6 patches, 2 facets, stage1 is 8 x 8


def test_facet_rows_light_the_patch_where_the_facet_is():
    patches = torch.rand(3, 3, 16, 16)
    maps = torch.zeros(3, 2, 4)                          # 2 x 2 positions
    maps[1, 0] = 1.0                                     # facet 0 everywhere in patch 1
    maps[2, 1, 0] = 2.0                                  # facet 1 only top-left in patch 2
    rows = facet_rows(patches, maps)
    torch.testing.assert_close(rows[0][0], patches[1])  # best first, fully lit
    torch.testing.assert_close(rows[0][1], 0.25 * patches[0])
    lit = rows[1][0] / patches[2]
    assert lit[:, 0, 0].min() > 0.9 and lit[:, -1, -1].max() < 0.3


def test_a_bank_that_does_not_fit_is_refused(tmp_path, refs, capsys):
    bank_dir = _bank(tmp_path, refs)
    with pytest.raises(BankMismatch, match="layer: the bank is at 'stage2'"):
        run_facets(_facet_cfg(tmp_path, bank_dir, target_layer="stage1"))
    with pytest.raises(BankMismatch, match="model: the bank was made with"):
        run_facets(_facet_cfg(tmp_path, bank_dir, model="efficientnet-lite0"))
    other = write_images(tmp_path / "other", 4, seed=7)
    with pytest.raises(BankMismatch, match="data set"):
        run_facets(_facet_cfg(tmp_path, bank_dir, ref_dir=str(other)))
    moved = tmp_path / "moved"                       # same images elsewhere: accepted by content
    shutil.copytree(refs, moved)
    run_dir, _ = run_facets(_facet_cfg(tmp_path, bank_dir, ref_dir=str(moved), steps=1))
    assert_png_shows(run_dir / "facets_grid.png")
    (refs / "img_00.png").write_bytes((other / "img_00.png").read_bytes())   # data changed
    status = main(FacetCFG, run_facets, ["--model", TINY_CNN, "--bank", str(bank_dir), "--steps",
                                         "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and "does not fit" in err and "Traceback" not in err


def test_a_corrupt_bank_is_refused(tmp_path, refs):
    bank_dir = _bank(tmp_path, refs)
    tensors = bank_dir / "concept_bank.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 0x01
    tensors.write_bytes(bytes(raw))
    with pytest.raises(BankError, match="corrupt"):
        run_facets(_facet_cfg(tmp_path, bank_dir))
    with pytest.raises(ValueError, match="give --bank"):
        run_facets(_facet_cfg(tmp_path, ""))


def test_tiny_vit_facets(tmp_path, refs, tiny_clip_file, monkeypatch):
    monkeypatch.setattr(runner, "make_opinion", lambda *a, **k: None)   # test_class_clip
    bank_dir = _bank(tmp_path, refs, model=str(tiny_clip_file), target="a photo of a cat")
    run_dir, result = run_facets(_facet_cfg(tmp_path, bank_dir, model=str(tiny_clip_file),
                                            concept=1))
    assert load_bank(bank_dir).order()[0] != 1        # so concept 1 is not the default choice
    info = json.loads((run_dir / "facets.json").read_text())
    assert info["concept"] == 1 and info["decomp_layer"] == "embed" and info["nonneg"] == "split"
    assert result.image.shape[0] == 2
    with pytest.raises(ValueError, match="concept 5 is not in the bank"):
        run_facets(_facet_cfg(tmp_path, bank_dir, model=str(tiny_clip_file), concept=5))


@pytest.mark.slow   # the fast suite: the tiny CNN and tiny ViT facets above
def test_embedded_model_facets_at_64px(tmp_path, refs):
    bank_dir = _bank(tmp_path, refs, model="efficientnet-lite0", target="espresso", size=64,
                     layer_block="blocks.15", n_concepts=2, rank_images=1, patch_frac=0.75)
    run_dir, result = run_facets(_facet_cfg(tmp_path, bank_dir, model="efficientnet-lite0",
                                            size=64, steps=2))
    info = json.loads((run_dir / "facets.json").read_text())
    assert info["decomp_layer"] == "blocks.10" and result.steps_done == 2
    stored = load_file(str(run_dir / "facets.safetensors"))
    assert stored["directions"].shape == (2, 224) and (stored["directions"] >= 0).all()


def test_facet_objective_rewards_the_own_facet_over_its_siblings():
    from vital.concepts.extract import facet_objective
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 1.0]])
    feats = dirs[:, :, None].expand(3, 3, 4).clone()     # image b = facet b at every position
    obj = facet_objective("x", dirs, "relu", contrast=1.0)
    cos = torch.nn.functional.normalize(dirs, dim=-1) @ torch.nn.functional.normalize(
        dirs, dim=-1).T                                   # (image, facet) cosines
    expected = sum(1 - cos[b, b] + (cos[b].sum() - cos[b, b]) / 2 for b in range(3)) / 3
    torch.testing.assert_close(obj({"features": {"x": feats}}), expected)
    swapped = obj({"features": {"x": feats[[1, 0, 2]]}})
    assert swapped > expected + 0.5
    with pytest.raises(ValueError, match="batch"):
        obj({"features": {"x": feats[:2]}})
