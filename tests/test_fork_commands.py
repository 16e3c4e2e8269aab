"""The VITAL-for-CLIP fork's README commands, run as written (issue 15) with small overrides
appended (size, steps, tiny reference folders), on the embedded EfficientNet-Lite0.

Each command goes through its script's own CFG and ``vital.cli.main``, in this process (a fresh
interpreter per command would cost more than the runs). ``faceted_fvis.py --target_layer 22
--decomp_layer 16`` names blocks the embedded model does not have (it has blocks 0..15): there it
must end in one sentence with the valid range; on a model with 24 blocks (a tiny random CLIP ViT
file) the same command renders, with the bank it finds by itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import isolated_workdir
from vital.cli import main
from vital.commands import by_script

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--size", "64", "--steps", "2", "--save_steps", "0", "--no-progress"]
CONCEPT_FAST = ["--num_ref", "3", "--n_concepts", "2", "--nmf_iter", "20",
                "--sobol_designs", "2", "--rank_images", "1"]


def write_images(folder: Path, n: int, size: int = 48, seed: int = 0) -> Path:
    """``n`` smooth coloured PNGs (sine gratings) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k in range(n):
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy))
        rgb = np.clip(wave[None] * rng.uniform(0.2, 1, (3, 1, 1)), 0, 1)
        Image.fromarray((rgb * 255).astype(np.uint8).transpose(1, 2, 0)).save(
            folder / f"img_{k:02d}.png")
    return folder


def script(name: str):
    """(CFG, run function) of a root script: the command it runs (``vital.commands``)."""
    return by_script(name).load()


def run(name: str, command: str, *extra: str) -> int:
    """Run ``python <name> <command>`` with ``extra`` appended; the exit status."""
    cfg_cls, run_fn = script(name)
    return main(cfg_cls, run_fn, command.split() + list(extra))


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder (out_<mode>/ go there); undo --hard_determinism afterwards."""
    yield from isolated_workdir(tmp_path, monkeypatch)


@pytest.fixture
def refs(tmp_path):
    return write_images(tmp_path / "refs", 4)


def only_run(folder: str) -> Path:
    runs = [p for p in Path(folder).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_class_command(refs):
    assert run("class_neurons_fvis.py", "--deterministic --hard_determinism",
               *FAST, "--ref_dir", str(refs), "--num_ref", "2") == 0
    run_dir = only_run("out_class")
    assert (run_dir / "final.png").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("command, formula", [
    ("--hard_determinism --sub_alpha 0.0 --add_beta 0.0", "KING - 0*MAN + 0*WOMAN"),
    ("--hard_determinism --sub_alpha 0.9 --add_beta 1.0", "KING - 0.9*MAN + 1*WOMAN"),
])
def test_arithmetic_commands_default_to_king_man_woman(command, formula):
    assert run("class_neurons_fvis_arithmetic.py", command, *FAST) == 0
    report = json.loads((only_run("out_arithmetic") / "arithmetic.json").read_text())
    assert report["formula"] == formula


def test_inner_command(refs):
    assert run("inner_neurons_fvis.py", "--deterministic --hard_determinism", *FAST,
               "--data_dir", str(refs), "--num_ref", "2") == 0
    assert (only_run("out_inner") / "final.png").is_file()


def test_concept_command_renders(refs):
    assert run("concept_neurons_fvis.py", "--deterministic --hard_determinism", *FAST,
               *CONCEPT_FAST, "--ref_dir", str(refs)) == 0
    assert (only_run("out_concept") / "concepts_grid.png").is_file()


def test_concept_extract_commands_and_facets_find_the_bank(refs, capsys):
    assert run("concept_neurons_fvis.py", "--deterministic --hard_determinism --extract_only",
               *FAST, *CONCEPT_FAST, "--ref_dir", str(refs)) == 0
    assert run("concept_neurons_fvis.py", "--layer_block 12 --extract_only", *FAST,
               *CONCEPT_FAST, "--ref_dir", str(refs)) == 0
    banks = {json.loads(p.read_text())["layer"]: p.parent
             for p in Path("out_concept").glob("*/concept_bank.json")}
    assert set(banks) == {"blocks.15", "blocks.12"}   # 12 = block 12 = blocks.12
    # the fork's facet command names blocks 22 and 16: the embedded model has 0..15
    capsys.readouterr()
    assert run("faceted_fvis.py", "--target_layer 22 --decomp_layer 16 --deterministic "
               "--hard_determinism", *FAST) == 2
    err = capsys.readouterr().err
    assert "no block 22" in err and "0..15" in err and len(err.splitlines()) == 1
    # the same command at blocks it has, without --bank: the bank of blocks.12 is found
    assert run("faceted_fvis.py", "--target_layer 12 --decomp_layer 6 --deterministic "
               "--hard_determinism", *FAST, "--n_facets", "2", "--facet_patches", "4",
               "--nmf_iter", "20") == 0
    meta = json.loads((only_run("out_facet") / "config.json").read_text())
    assert Path(meta["facets"]["bank"]) == banks["blocks.12"]
    assert meta["facets"]["decomp_layer"] == "blocks.6"


def test_facets_without_a_bank_name_the_command_that_makes_it(refs, capsys):
    assert run("faceted_fvis.py", "--target_layer 12 --decomp_layer 6", *FAST,
               "--ref_dir", str(refs)) == 2
    err = capsys.readouterr().err
    assert "no concept bank" in err and "concept_neurons_fvis.py" in err
    assert "--layer_block blocks.12" in err and "--extract_only" in err


@pytest.fixture(scope="module")
def clip24(tmp_path_factory):
    """A tiny random CLIP ViT with 24 blocks (width 64, patch 8 at 32 px), OpenAI layout."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=24, width=64, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = CLIP(32, vision, text, quick_gelu=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("clip24") / "vit24.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.slow   # ~30 s: a 24-block ViT through extraction, ranking and facets
def test_fork_facet_command_verbatim_on_a_24_block_vit(refs, clip24):
    small = ["--model", clip24, "--size", "32", "--steps", "2", "--save_steps", "0",
             "--no-progress"]
    assert run("concept_neurons_fvis.py", "--layer_block 22 --extract_only", *small,
               *CONCEPT_FAST, "--ref_dir", str(refs), "--target", "") == 0
    assert run("faceted_fvis.py", "--target_layer 22 --decomp_layer 16 --deterministic "
               "--hard_determinism", *small, "--n_facets", "2", "--facet_patches", "4",
               "--nmf_iter", "20") == 0
    run_dir = only_run("out_facet")
    facets = json.loads((run_dir / "facets.json").read_text())
    assert facets["decomp_layer"] == "block.16"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"


def test_find_bank_matches_weights_layer_and_images(tmp_path):
    """The bank lookup reads only the banks' JSON: weight hash, layer, data set hash."""
    import os
    from types import SimpleNamespace
    from vital.cache import files_digest
    from vital.config import ConfigError
    from vital.modes.facets import FacetCFG, find_bank
    a, b = write_images(tmp_path / "a", 2, seed=1), write_images(tmp_path / "b", 2, seed=2)
    digest = {d: files_digest(sorted(d.iterdir())) for d in (a, b)}

    def bank(name, weights, layer, images, age):
        folder = tmp_path / "out_concept" / name
        folder.mkdir(parents=True)
        meta = {"weight_hash": weights, "layer": layer, "dataset_hash": digest[images],
                "files": [str(f) for f in sorted(images.iterdir())]}
        (folder / "concept_bank.json").write_text(json.dumps(meta))
        os.utime(folder / "concept_bank.json", (age, age))
        return folder
    on_a = bank("a12", "w", "blocks.12", a, 100)
    on_b = bank("b12", "w", "blocks.12", b, 50)
    bank("other_model", "v", "blocks.12", a, 300)
    newest_15 = bank("a15", "w", "blocks.15", a, 200)
    target = SimpleNamespace(weight_hash="w", spec="efficientnet-lite0")
    cfg = dict(concept_dir=str(tmp_path / "out_concept"), num_ref=12)
    assert find_bank(FacetCFG(target_layer="blocks.12", **cfg), target) == on_a   # newest fit
    assert find_bank(FacetCFG(target_layer="blocks.12", ref_dir=str(b), **cfg), target) == on_b
    assert find_bank(FacetCFG(**cfg), target) == newest_15                         # any layer
    with pytest.raises(ConfigError, match="--layer_block blocks.3 --ref_dir .* --extract_only"):
        find_bank(FacetCFG(target_layer="blocks.3", ref_dir=str(a), **cfg), target)


def test_block_numbers_per_architecture(tmp_path):
    """Block N: blocks.N (EfficientNet), the flattened residual blocks (ResNet), block.N (ViT)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    from vital.models import load_target
    lite0 = load_target("efficientnet-lite0")
    assert lite0.canonical_layer("12") == lite0.canonical_layer(12) == "blocks.12"
    assert lite0.canonical_layer("blocks.3") == "blocks.3"
    resnet = load_target("torchvision:resnet18?weights=none")
    assert resnet.blocks() == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert resnet.canonical_layer("5") == "layer3.1"
    with pytest.raises(ValueError, match=r"no block 8: .* 0\.\.7 \(layer1\.0 \.\. layer4\.1\)"):
        resnet.canonical_layer("8")
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=3, width=64, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    path = tmp_path / "vit3.safetensors"
    save_file({k: v.contiguous() for k, v in CLIP(32, vision, text).state_dict().items()},
              str(path))
    vit = load_target(str(path))
    assert vit.blocks() == ["block.0", "block.1", "block.2"]
    assert vit.layer_info("2").name == "block.2"
    with pytest.raises(ValueError, match=r"no block -1"):
        vit.canonical_layer("-1")
