"""CFG dataclass -> argparse: precedence, unknown keys, dump/load round trip, run folders."""
import json
from dataclasses import dataclass

import pytest

from vital.config import make_run_dir, opt, parse_cfg, resolve_device


@dataclass
class _CFG:
    """A small CFG for tests."""
    steps: int = opt(10, "steps")
    lr: float = opt(0.1, "learning rate")
    name: str = opt("a", "a name")
    flip: bool = opt(True, "flip")
    layers: list[str] = opt([], "layers")
    sizes: list[int] = opt([1, 2], "sizes")


def test_defaults_file_then_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 20, "lr": 1, "layers": ["x", "y"]}))
    cfg = parse_cfg(_CFG, ["--json_cfg", str(path), "--steps", "30"])
    assert cfg.steps == 30          # command line beats the file
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.layers == ["x", "y"]
    assert cfg.name == "a" and cfg.flip is True and cfg.sizes == [1, 2]


def test_bool_and_list_flags():
    cfg = parse_cfg(_CFG, ["--no-flip", "--sizes", "3", "4", "5", "--layers"])
    assert cfg.flip is False and cfg.sizes == [3, 4, 5] and cfg.layers == []


def test_unknown_json_key_names_valid_ones(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stpes": 3}))
    with pytest.raises(SystemExit) as info:
        parse_cfg(_CFG, ["--json_cfg", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "stpes" in err and "did you mean 'steps'" in err and "Valid keys" in err


def test_bad_json_value_and_missing_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": "many"}))
    with pytest.raises(SystemExit):
        parse_cfg(_CFG, ["--json_cfg", str(path)])
    assert "bad value for 'steps'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_cfg(_CFG, ["--json_cfg", str(tmp_path / "missing.json")])
    assert "does not exist" in capsys.readouterr().err


def test_unknown_flag_fails():
    with pytest.raises(SystemExit):
        parse_cfg(_CFG, ["--stepz", "3"])


def test_dump_then_load_round_trips(tmp_path):
    out = tmp_path / "dumped.json"
    with pytest.raises(SystemExit) as info:
        parse_cfg(_CFG, ["--steps", "7", "--no-flip", "--layers", "a", "--dump_cfg", str(out)])
    assert info.value.code == 0
    cfg = parse_cfg(_CFG, ["--json_cfg", str(out)])
    assert (cfg.steps, cfg.flip, cfg.layers) == (7, False, ["a"])
    assert parse_cfg(_CFG, ["--steps", "7", "--no-flip", "--layers", "a"]) == cfg


def test_run_dirs_are_never_reused(tmp_path):
    first = make_run_dir(tmp_path, "cat run/1")
    second = make_run_dir(tmp_path, "cat run/1")
    assert first != second and first.is_dir() and second.is_dir()
    assert "/" not in first.name and second.name.endswith("_2")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="valid: auto, cpu"):
        resolve_device("tpu")


def test_parse_units_numbers_ranges_and_all():
    from vital.config import ConfigError, parse_units
    assert parse_units(["3", 17, "40"], 64) == [3, 17, 40]
    assert parse_units(["0-3", "9"], 10) == [0, 1, 2, 3, 9]
    assert parse_units(["all"], 4) == [0, 1, 2, 3]
    assert parse_units([" ALL "], 2) == [0, 1]
    for tokens, message in [(["x"], "not a number"), (["5-2"], "backwards"),
                            (["0-10"], r"valid 0\.\.9"), (["all", "3"], "named twice"),
                            (["-1"], "out of range")]:
        with pytest.raises(ConfigError, match=message):
            parse_units(tokens, 10)
