"""The layer atlas (atlas.py / vital.atlas): its data, its pages, resume and bad input, on a tiny
CNN labelled by a colour judge (tests/test_labels.py). The pages in a real browser:
tests/test_atlas_browser.py."""
import json
from pathlib import Path

import pytest

from vital.atlas import build
from vital.atlas.build import SCHEMA, AtlasCFG, run_atlas
from vital.cli import main
from test_labels import COLOUR_JUDGE, write_colour_images

TINY = "module:tests.conftest:TinyCNN"


def atlas_cfg(tmp_path: Path, **kw) -> AtlasCFG:
    if not (tmp_path / "probe").exists():
        write_colour_images(tmp_path / "probe")
    base = dict(model=TINY, layers=["stage2"], probe_dir=str(tmp_path / "probe"),
                concept_model=COLOUR_JUDGE, out_dir=str(tmp_path / "out"), run_name="site",
                units=["0-3"], vis_steps=3, vis_size=32, vis_num_ref=3,
                top_images=4, device="cpu", progress=False, vis_batch_size=2)
    return AtlasCFG(**{**base, **kw})


def test_atlas_data_pages_and_pictures(tmp_path):
    site, run = run_atlas(atlas_cfg(tmp_path))
    data = json.loads((site / "atlas.json").read_text())
    assert data["schema"] == SCHEMA and data["model"] == TINY
    units = data["layers"]["stage2"]["units"]
    assert [u["unit"] for u in units] == [0, 1, 2, 3]
    assert data["layers"]["stage2"]["channels"] == run.layers["stage2"].similarity.shape[0]
    for u in units:
        sims = run.layers["stage2"].similarity[u["unit"]]
        assert u["label"] == run.concept.concepts[int(sims.argmax())]
        assert u["similarity"] == pytest.approx(float(sims.max()))
        assert [c["similarity"] for c in u["candidates"]] == sorted(
            (c["similarity"] for c in u["candidates"]), reverse=True)
        acts = [t["activation"] for t in u["top_images"]]
        assert len(acts) == 4 and acts == sorted(acts, reverse=True)
        assert sum(u["histogram"]["counts"]) == run.layers["stage2"].acts.values.shape[0]
        picture = u["picture"]
        for key in ("image", "thumb", "references"):
            assert (site / picture[key]).is_file()
        assert picture["image"].endswith(".jpg") and picture["references"].endswith(".jpg")
        assert "png" not in picture   # the run's PNGs are dropped (size); --keep_png keeps them
        assert not list((site / picture["image"]).parent.glob("*.png"))
        assert isinstance(picture["agrees_top5"], bool) and len(picture["picture_labels"]) == 5
        assert 0 <= picture["references_top5"] <= 1 and len(picture["references_labels"]) == 5
        page = (site / "stage2" / f"{u['unit']}.html").read_text()
        assert u["label"] in page and picture["image"] in page
        assert f"({picture['references_top5']:.0%} of them hold the label)" in page
        for t in u["top_images"]:
            assert (site / t["thumb"]).is_file()
    layer_page = (site / "stage2" / "index.html").read_text()
    assert layer_page.count('class="card"') == 4
    assert "http://" not in layer_page and "https://" not in layer_page   # nothing from outside
    assert (site / "static" / "atlas.js").is_file() and (site / "index.html").is_file()


def test_rerun_renders_only_what_is_missing_or_changed(tmp_path, monkeypatch):
    run_atlas(atlas_cfg(tmp_path))
    rendered = []
    real = build.render_units
    monkeypatch.setattr(build, "render_units", lambda cfg, run, layer, units, *a, **k: (
        rendered.append(list(units)), real(cfg, run, layer, units, *a, **k))[1])
    site, _ = run_atlas(atlas_cfg(tmp_path))
    assert rendered == []                                   # same settings: nothing again
    site, _ = run_atlas(atlas_cfg(tmp_path, units=["0-5"]))
    assert rendered == [[4, 5]]                             # only the new units
    site, _ = run_atlas(atlas_cfg(tmp_path, units=["0-1"], vis_steps=4))
    assert rendered[1:] == [[0, 1]]                         # other settings: rendered again
    data = json.loads((site / "atlas.json").read_text())
    assert [u["unit"] for u in data["layers"]["stage2"]["units"]] == [0, 1]


def test_no_pictures_and_preview(tmp_path):
    site, _ = run_atlas(atlas_cfg(tmp_path, pictures=False))
    data = json.loads((site / "atlas.json").read_text())
    assert all(u["picture"] is None for u in data["layers"]["stage2"]["units"])
    assert "no picture" in (site / "stage2" / "0.html").read_text()
    site, _ = run_atlas(atlas_cfg(tmp_path, run_name="preview", preview=True, vis_size=64,
                                  vis_steps=60))
    settings = json.loads((site / "atlas.json").read_text())["picture_settings"]
    assert settings["size"] == 64 and settings["steps"] == 48


@pytest.mark.parametrize("argv, words", [
    (["--units", "999"], "out of range"),
    (["--units", "3-1"], "runs backwards"),
    (["--units", "x"], "is not a number"),
    (["--layers", "fc"], "--no-pictures"),
])
def test_bad_input_is_one_sentence(tmp_path, capsys, argv, words):
    write_colour_images(tmp_path / "probe")
    status = main(AtlasCFG, run_atlas, ["--model", TINY, "--layers", "stage2", "--probe_dir",
                                        str(tmp_path / "probe"), "--concept_model",
                                        COLOUR_JUDGE, "--out_dir", str(tmp_path / "out"),
                                        "--device", "cpu", "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and words in err[-1] and err[-1].startswith("error:")


def test_peak_boxes_equal_a_loop_over_images_and_units(tmp_path):
    """Each top image's outline is the cell of the unit's largest activation, computed the slow
    way: one image, one unit at a time from the layer's (C, H, W) map."""
    import torch
    from vital.refs.images import load_image
    site, run = run_atlas(atlas_cfg(tmp_path, pictures=False))
    data = json.loads((site / "atlas.json").read_text())
    target, files = run.target, {f.name: f for f in run.probe.files}
    seen = 0
    for u in data["layers"]["stage2"]["units"]:
        for t in u["top_images"]:
            with torch.no_grad(), target.hooks(["stage2"]) as feats:
                target(load_image(files[t["file"]], target.input_size)[None])
                fmap = feats["stage2"][0, u["unit"]]
            rows, cols = fmap.shape
            i, j = divmod(int(fmap.flatten().argmax()), cols)
            assert t["peak"] == pytest.approx([j / cols, i / rows, 1 / cols, 1 / rows], abs=1e-4)
            seen += 1
    assert seen == 16
    # the thumbnails are the square crop the model saw, so the outline lands where it looked
    from PIL import Image
    with Image.open(site / data["layers"]["stage2"]["units"][0]["top_images"][0]["thumb"]) as im:
        assert im.width == im.height


def test_clip_mlp_units_show_their_second_order_words(tmp_path, tiny_clip_file):
    """A CLIP ViT's block.N.mlp units carry what neuron_effects.py finds for the same neurons
    on the same probe folder: the first PC's explained variance and its texts, on the unit page
    and in the search data of the layer page."""
    from vital.effects.run import EffectsCFG, run_effects
    texts = tmp_path / "texts.txt"
    texts.write_text("a dog\na cat\na car\nthe sea\na red apple\nmusic\nred\ngreen\n")
    site, run = run_atlas(atlas_cfg(tmp_path, model=str(tiny_clip_file), layers=["block.0.mlp"],
                                    pictures=False, effects_texts=str(texts)))
    units = json.loads((site / "atlas.json").read_text())["layers"]["block.0.mlp"]["units"]
    _, ref = run_effects(EffectsCFG(model=str(tiny_clip_file), layer=["block.0.mlp"],
                                    neurons=[0, 1, 2, 3], probe_dir=str(tmp_path / "probe"),
                                    texts=str(texts), sheets=0, top_k=len(run.used),
                                    out_dir=str(tmp_path / "ref"), progress=False,
                                    device="cpu"))
    lines = texts.read_text().split("\n")
    for u, summary, decomp in zip(units, ref.summaries[0], ref.words[0]):
        assert u["unit"] == summary.neuron
        assert u["effects"]["explained"] == pytest.approx(summary.explained, rel=1e-5)
        assert [w["text"] for w in u["effects"]["words"]] == [lines[i] for i, _ in decomp.terms]
        page = (site / "block.0.mlp" / f"{u['unit']}.html").read_text()
        assert "second-order effect" in page and u["effects"]["words"][0]["text"] in page
    layer_page = (site / "block.0.mlp" / "index.html").read_text()
    assert units[0]["effects"]["words"][0]["text"] in layer_page   # searchable


def test_no_effects_for_cnn_layers_or_when_switched_off(tmp_path, tiny_clip_file):
    site, _ = run_atlas(atlas_cfg(tmp_path, pictures=False))
    assert all("effects" not in u
               for u in json.loads((site / "atlas.json").read_text())["layers"]["stage2"]["units"])
    site, _ = run_atlas(atlas_cfg(tmp_path, model=str(tiny_clip_file), layers=["block.0.mlp"],
                                  pictures=False, effects=False, run_name="clip"))
    units = json.loads((site / "atlas.json").read_text())["layers"]["block.0.mlp"]["units"]
    assert all("effects" not in u for u in units) and not (site / "effects").exists()


def test_launcher_renders_the_same_pictures_as_this_process(tmp_path, monkeypatch):
    """--launcher slurm (submitit's local executor: other processes) renders each batch of units
    as a task, and the atlas holds the same pictures and verdicts as a local build; a rerun
    launches nothing."""
    import os
    import numpy as np
    from PIL import Image
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("VITAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo), str(repo / "tests"),
                                                      os.environ.get("PYTHONPATH", "")]))
    local, _ = run_atlas(atlas_cfg(tmp_path, run_name="local", keep_png=True))
    cfg = atlas_cfg(tmp_path, run_name="slurm", launcher="slurm", slurm_cluster="local",
                    slurm_gpus=0, slurm_folder=str(tmp_path / "submitit"), keep_png=True)
    launched, _ = run_atlas(cfg)
    jobs = sorted(p.name for p in (tmp_path / "submitit").iterdir() if p.name.isdigit())
    assert len(jobs) == 2   # units 0-3 in batches of 2: one array element each
    a = json.loads((local / "atlas.json").read_text())["layers"]["stage2"]["units"]
    b = json.loads((launched / "atlas.json").read_text())["layers"]["stage2"]["units"]
    for x, y in zip(a, b):
        assert x["picture"]["picture_labels"] == y["picture"]["picture_labels"]
        pics = [np.asarray(Image.open(site / u["picture"]["png"]), dtype=float)
                for site, u in ((local, x), (launched, y))]
        assert np.abs(pics[0] - pics[1]).max() <= 2   # 8-bit PNGs of the same optimisation
    run_atlas(cfg)
    assert sorted(p.name for p in (tmp_path / "submitit").iterdir() if p.name.isdigit()) == jobs
