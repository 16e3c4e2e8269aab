"""Recipes resolve to their documented settings, with the documented precedence
(defaults < recipe < --json_cfg < command line), and the run records them."""
import dataclasses
import json

import pytest

from vital.config import ConfigError, parse_cfg, recipe_values, with_recipe
from helpers import TINY_CNN
from vital.modes.class_mode import ClassCFG
from vital.modes.inner import InnerCFG

# the official VITAL code's optimisation (class_fvis/utils/opt_utils.py, utils.py): written out
# here once more, on purpose, so that a change of the recipe has to change this test too
OFFICIAL = {"param": "pixel_norm", "lr": 1.0, "adam_betas": [0.5, 0.9], "warmup": 100,
            "lr_final": 0.0, "steps": 2000, "jitter": 30, "scales": [1.0], "flip": False,
            "prior_form": "paper", "layers": ["paper"], "ref_crop": 0.875}


@pytest.mark.parametrize("cls, extra", [
    (ClassCFG, {"tv_weight": 0.0, "l2_weight": 0.0, "class_weight": 0.0, "relevance": "none",
                "num_ref": 50}),
    (InnerCFG, {"tv_weight": 3e-7, "l2_weight": 3e-7, "neuron_weight": 0.0,
                "relevance": "lrp_paper", "relevance_floor": 0.0, "ref_kind": "images",
                "num_ref": 50, "patch_size": 64, "stride": 32,
                "ref_rank": "patch"}),
])
def test_paper_recipe_is_the_official_code(cls, extra):
    cfg = parse_cfg(cls, ["--recipe", "paper"])
    got = dataclasses.asdict(cfg)
    for key, value in {**OFFICIAL, **extra}.items():
        assert got[key] == value, key


@pytest.mark.parametrize("cls", [ClassCFG, InnerCFG])
def test_default_recipe_equals_the_dataclass_defaults(cls):
    """A CFG built in Python (cls()) and a script run without --recipe agree."""
    assert parse_cfg(cls, []) == cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    declared = {name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for name, f in fields.items()}
    for key, value in recipe_values(cls, declared["recipe"]).items():
        assert declared[key] == value, key   # what --help shows is what runs


@pytest.mark.parametrize("cls", [ClassCFG, InnerCFG])
def test_a_recipe_given_in_python_applies_like_the_script_s(cls):
    """``ClassCFG(recipe="paper")`` runs the paper's settings (it used to keep the toolkit's
    and only record "paper"); a value given explicitly wins over the recipe, even when it
    equals the toolkit default; ``dataclasses.replace`` keeps every value."""
    python = cls(recipe="paper", model=TINY_CNN, seed=3)
    script = parse_cfg(cls, ["--recipe", "paper", "--model", TINY_CNN, "--seed", "3"])
    assert python == script == with_recipe(cls, "paper", model=TINY_CNN, seed=3)
    assert python.lr == 1.0 and python.param == "pixel_norm"
    mine = cls(recipe="paper", lr=0.05)
    assert mine.lr == 0.05 and mine.steps == 2000
    again = dataclasses.replace(mine, seed=5)
    assert (again.lr, again.steps, again.seed) == (0.05, 2000, 5)
    with pytest.raises(ConfigError, match="unknown recipe"):
        cls(recipe="papper")


def test_precedence_recipe_then_json_then_command_line(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"recipe": "paper", "lr": 0.5, "jitter": 12}))
    cfg = parse_cfg(ClassCFG, ["--json_cfg", str(path), "--jitter", "4"])
    assert cfg.recipe == "paper" and cfg.param == "pixel_norm"     # from the recipe
    assert cfg.lr == 0.5                                            # the file beats the recipe
    assert cfg.jitter == 4                                          # the command line beats both
    assert with_recipe(ClassCFG, "paper", lr=0.25).lr == 0.25


def test_unknown_recipe_is_one_sentence():
    with pytest.raises(ConfigError, match="unknown recipe 'papr'; valid: toolkit, paper"):
        recipe_values(ClassCFG, "papr")
    with pytest.raises(SystemExit):
        parse_cfg(ClassCFG, ["--recipe", "papr"])


def test_paper_layers_on_the_embedded_model():
    from vital.models import load_target
    from vital.models.paper import paper_layers
    target = load_target("efficientnet-lite0")
    layers, weights = paper_layers(target, "class")
    assert layers == ["stem.conv", "blocks.2", "blocks.4", "blocks.10", "blocks.15"]
    assert weights == [1.0] * 5
    assert paper_layers(target, "inner")[1] == [0.1, 1.0, 1.0, 1.0, 0.0]
    sizes = {info.name: info.shape[-1] for info in target.layers()}
    assert [sizes[n] for n in layers] == [112, 56, 28, 14, 7]      # like ResNet50's five


def test_class_run_records_the_recipe(tmp_path, ref_folder):
    from vital.modes.class_mode import run_class
    cfg = with_recipe(ClassCFG, "paper", model=TINY_CNN, target="class3",
                      ref_dir=str(ref_folder), size=32, steps=3, save_steps=0,
                      out_dir=str(tmp_path), progress=False, device="cpu")
    run_dir, result = run_class(cfg)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["cfg"]["recipe"] == "paper" and meta["recipe"] == "paper"
    assert meta["cfg"]["param"] == "pixel_norm" and result.steps_done == 3
    layers = meta["layers"]          # --layers paper on a tiny CNN: first conv + its stages
    assert layers[0] == "stem.0" and meta["layer_weights"] == [1.0] * len(layers)


@pytest.mark.parametrize("name, expected", [
    ("densenet121", ["features.conv0", "features.denseblock1", "features.denseblock2",
                     "features.denseblock3", "features.denseblock4"]),
    ("convnext_tiny", ["features.0", "features.2.1", "features.4.1", "features.6.1",
                       "features.7.2"]),
])
def test_paper_layers_of_densenet_and_convnext_are_the_official_code_s(name, expected):
    """The official return nodes (class_fvis/utils/opt_utils.py), on random torchvision
    weights (nothing downloads), with the official class weights (DenseNet last x100, ConvNeXt
    first x10)."""
    from vital.models import load_target
    from vital.models.paper import paper_layers
    target = load_target(f"torchvision:{name}?weights=none", input_size=64)
    layers, weights = paper_layers(target, "class")
    assert layers == expected
    assert weights == ([1.0] * 4 + [100.0] if name == "densenet121" else [10.0] + [1.0] * 4)
