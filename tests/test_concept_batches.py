"""Concepts and facets in batches (``--batch_size``): every concept / facet is its own element
(its own loss on its cut of the batch, its own generator seeded from (seed, concept id / facet
index) for its start image and its augmentation), so its image does not depend on what shares
its batch: --batch_size 1, 2 and all give the same images up to float reduction order, in one
run folder."""
import json

import pytest
import torch

from helpers import TINY_CNN, read_png, write_images
from vital.cli import main
from vital.concepts.extract import facet_objective
from vital.config import ConfigError
from vital.modes import setup
from vital.modes.concepts import ConceptCFG, element_seed, run_concepts
from vital.modes.facets import FacetCFG, run_facets
from vital.modes.runner import Callbacks

ATOL = 1e-4   # float reduction order of a batched forward


def _concept_cfg(tmp_path, refs, **kw):
    base = dict(model=TINY_CNN, target="3", ref_dir=str(refs), size=32, steps_multires=[2, 3],
                save_steps=5, out_dir=str(tmp_path / "c"), progress=False, device="cpu",
                n_concepts=3, sobol_designs=4, rank_images=2, top_patches=4, seed=3)
    base.update(kw)
    return ConceptCFG(**base)


def _facet_cfg(tmp_path, bank, **kw):
    base = dict(model=TINY_CNN, bank=str(bank), size=32, steps_multires=[2, 3], save_steps=5,
                n_facets=3, facet_patches=6, out_dir=str(tmp_path / "f"), progress=False,
                device="cpu", seed=3)
    base.update(kw)
    return FacetCFG(**base)


@pytest.fixture
def refs(tmp_path):
    return write_images(tmp_path / "refs", 4)


@pytest.fixture
def augment_spy(monkeypatch):
    """Wrap the augmentation: per call, the generator used and what the same draw does to a
    fixed probe image (the transform the element saw, whatever its own image)."""
    calls = []
    real = setup.make_augment
    probe = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(1, 3, 16, 16)

    def make_augment(cfg):
        augment = real(cfg)

        def spy(x, generator):
            twin = torch.Generator(device=generator.device)
            twin.set_state(generator.get_state())
            calls.append((generator, augment(probe, twin)))
            return augment(x, generator)
        return spy
    monkeypatch.setattr(setup, "make_augment", make_augment)
    return calls


def _terms(run_dir):
    return [s["terms"] for s in json.loads((run_dir / "metrics.json").read_text())["steps"]]


def test_concepts_in_batches_equal_one_batch_and_one_by_one(tmp_path, refs):
    runs = {b: run_concepts(_concept_cfg(tmp_path, refs, batch_size=b, run_name=f"b{b}"))
            for b in (1, 2, 3)}
    full_dir, full = runs[3]
    assert full.image.shape[0] == 3 and full.steps_done == 5 and full.stopped is None
    for b, (run_dir, result) in runs.items():
        torch.testing.assert_close(result.image, full.image, rtol=0, atol=ATOL)
        assert result.steps_done == 5
        meta = json.loads((run_dir / "config.json").read_text())
        assert meta["cfg"]["batch_size"] == b
        for name in ("final.png", "concepts_grid.png", "concepts_match.json", "metrics.json",
                     "concept_bank.safetensors", "steps/step_0005.png"):
            assert (run_dir / name).is_file(), (b, name)
        diff = abs(read_png(run_dir / "final.png").astype(int)
                   - read_png(full_dir / "final.png").astype(int))
        assert diff.max() <= 1
        # records: each term the mean over the concepts, as one batch of them all records it
        for mine, theirs in zip(_terms(run_dir), _terms(full_dir)):
            assert mine.keys() == theirs.keys() and "direction:stage2" in mine
            assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["b1", "b2", "b3"]   # one each


def test_a_concept_image_does_not_depend_on_the_others_shown(tmp_path, refs):
    _, full = run_concepts(_concept_cfg(tmp_path, refs, batch_size=3, run_name="all"))
    run_dir, top = run_concepts(_concept_cfg(tmp_path, refs, show=1, run_name="top"))
    assert top.image.shape[0] == 1
    torch.testing.assert_close(top.image, full.image[:1], rtol=0, atol=ATOL)
    assert json.loads((run_dir / "concepts_match.json").read_text())["concepts"] == \
        json.loads((run_dir / "config.json").read_text())["concepts"]["shown"]


def test_every_concept_draws_its_own_augmentation(tmp_path, refs, augment_spy):
    run_concepts(_concept_cfg(tmp_path, refs, batch_size=3, run_name="all"))
    steps, n = 5, 3
    assert len(augment_spy) == steps * n                 # one draw per element and step
    together = [augment_spy[t * n:(t + 1) * n] for t in range(steps)]
    gens = [g for g, _ in together[0]]
    assert len({id(g) for g in gens}) == n                # a generator per element
    for t in range(steps):
        assert [g for g, _ in together[t]] == gens        # the same one every step
    for a in range(n):                                    # different draws from each other
        for b in range(a + 1, n):
            assert any(not torch.equal(together[t][a][1], together[t][b][1])
                       for t in range(steps)), (a, b)
    augment_spy.clear()
    run_concepts(_concept_cfg(tmp_path, refs, batch_size=1, run_name="one"))
    alone = [augment_spy[k * steps:(k + 1) * steps] for k in range(n)]
    for k in range(n):                                    # the same draws, whatever the batch
        for t in range(steps):
            torch.testing.assert_close(alone[k][t][1], together[t][k][1], rtol=0, atol=0)


def test_a_stop_keeps_the_batches_reached_in_one_run_folder(tmp_path, refs):
    asked, progress = [], []
    callbacks = Callbacks(should_stop=lambda: asked.append(1) or len(asked) > 7,
                          on_progress=lambda step, total, loss, image: progress.append(
                              (step, total)), progress_every=1)
    run_dir, result = run_concepts(_concept_cfg(tmp_path, refs, batch_size=1, run_name="s"),
                                   callbacks=callbacks)
    # concept 1: 5 steps; concept 2: stopped before its step 3; concept 3: never started
    assert result.stopped == "stopped" and result.image.shape[0] == 2
    assert [s for s, _ in progress] == list(range(1, 8)) and {t for _, t in progress} == {15}
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "stopped"
    match = json.loads((run_dir / "concepts_match.json").read_text())
    shown = json.loads((run_dir / "config.json").read_text())["concepts"]["shown"]
    assert match["concepts"] == shown[:2] and len(match["cosine"]) == 2
    assert (run_dir / "concepts_grid.png").is_file()


def test_element_seeds_are_distinct_and_documented():
    assert element_seed(0, 2) == 2 and element_seed(1, 0) == 1_000_003
    seeds = {element_seed(s, k) for s in range(5) for k in range(50)}
    assert len(seeds) == 250 and all(0 <= s < 2 ** 63 for s in seeds | {element_seed(-1, 0)})


def test_facets_in_batches_equal_one_batch(tmp_path, refs):
    bank_dir = run_concepts(_concept_cfg(tmp_path, refs, extract_only=True, run_name="bank"))[0]
    runs = {b: run_facets(_facet_cfg(tmp_path, bank_dir, batch_size=b, run_name=f"f{b}"))
            for b in (1, 2, 3)}
    full_dir, full = runs[3]
    assert full.image.shape[0] == 3 and full.stopped is None
    for b, (run_dir, result) in runs.items():
        torch.testing.assert_close(result.image, full.image, rtol=0, atol=ATOL)
        for name in ("final.png", "facets_grid.png", "facets_match.json", "facets.safetensors"):
            assert (run_dir / name).is_file(), (b, name)
        for mine, theirs in zip(_terms(run_dir), _terms(full_dir)):
            assert {"facet:stage1", "concept:stage2"} <= mine.keys()
            assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6)
    assert not torch.allclose(full.image[0], full.image[1], atol=1e-2)   # not one image thrice


def test_the_facet_term_of_one_facet_is_its_share_of_the_batch_term():
    torch.manual_seed(0)
    dirs, feats = torch.rand(3, 6), torch.rand(3, 6, 5)
    for pool in ("mean", "positions"):
        batch = facet_objective("x", dirs, "relu", pool=pool, contrast=0.7)
        each = [facet_objective("x", dirs, "relu", pool=pool, contrast=0.7, facet=f)
                for f in range(3)]
        torch.testing.assert_close(
            sum(o({"features": {"x": feats[f:f + 1]}}) for f, o in enumerate(each)) / 3,
            batch({"features": {"x": feats}}))
    with pytest.raises(ValueError, match="facet 3 is not one of the 3"):
        facet_objective("x", dirs, "relu", facet=3)


def test_a_bad_batch_size_is_one_sentence(tmp_path, refs, capsys):
    with pytest.raises(ConfigError, match="--batch_size 0 is not valid"):
        run_concepts(_concept_cfg(tmp_path, refs, batch_size=0))
    with pytest.raises(ConfigError, match="--batch_size -2 is not valid"):
        run_facets(_facet_cfg(tmp_path, tmp_path, batch_size=-2))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:          # the command line: argparse's usage + error
        main(FacetCFG, run_facets, ["--model", TINY_CNN, "--batch_size", "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert "error: --batch_size 0 is not valid: it must be >= 1" in err[-1]
