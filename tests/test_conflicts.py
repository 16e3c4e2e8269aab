"""Issue 26: options that ask for different things, values out of range, duplicates and
results that mean nothing are one sentence each (exit 2), never silently ignored."""
import json

import pytest

from helpers import TINY_CNN, write_images
from vital.cli import main
from vital.commands import by_script
from vital.config import ConfigError, parse_cfg


def refused(script: str, argv: list[str], capsys) -> str:
    cfg_cls, _ = by_script(script).load()
    with pytest.raises(SystemExit) as stop:
        parse_cfg(cfg_cls, argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script, argv, words", [
    ("class_neurons_fvis.py", ["--target", "tabby", "--targets", "espresso", "goldfish"],
     "--target and --targets both given"),
    ("inner_neurons_fvis.py", ["--auto", "2", "--neurons", "5", "6"],
     "--auto and --neurons both given"),
    ("inner_neurons_fvis.py", ["--neuron", "7", "--neurons", "5", "6"],
     "--neuron and --neurons both given"),
    ("inner_neurons_fvis.py", ["--direction", "d.npy", "--auto", "3"],
     "--direction and --auto both given"),
    ("evaluate_fvis.py", ["--retries", "-1"], "--retries -1 is not valid"),
    ("evaluate_fvis.py", ["--slurm_time", "-5"], "--slurm_time -5 is not valid"),
    ("evaluate_fvis.py", ["--slurm_cpus", "0"], "--slurm_cpus 0 is not valid"),
])
def test_conflicting_or_out_of_range_options(script, argv, words, capsys):
    assert words in refused(script, argv, capsys)


def test_one_of_two_options_alone_is_fine():
    cfg_cls, _ = by_script("inner_neurons_fvis.py").load()
    assert parse_cfg(cfg_cls, ["--neurons", "5", "6"]).neurons == ["5", "6"]
    assert parse_cfg(cfg_cls, ["--auto", "2"]).auto == 2


def test_json_true_is_not_a_count(tmp_path, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps({"auto": True}))
    err = refused("inner_neurons_fvis.py", ["--json_cfg", str(tmp_path / "cfg.json")], capsys)
    assert "true/false, not a number" in err


def test_auto_larger_than_the_layer(tmp_path, capsys):
    cfg_cls, run = by_script("inner_neurons_fvis.py").load()
    write_images(tmp_path / "data", 3)
    status = main(cfg_cls, run, ["--model", TINY_CNN, "--layer", "stage2", "--auto", "100000",
                                 "--data_dir", str(tmp_path / "data"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and "--auto 100000 asks for more neurons than stage2 has" in err


def test_effects_neurons_twice():
    from vital.effects.decompose import check_neurons
    with pytest.raises(ConfigError, match="more than once"):
        check_neurons([5, 5], 64)


def test_layer_filter_that_matches_nothing(capsys):
    from vital.models.layer_table import main as layers_main
    assert layers_main(["--model", TINY_CNN, "--filter", "zzzz"]) == 2
    assert "no layer of" in capsys.readouterr().err


def test_latin1_concept_file_names_the_file(tmp_path):
    from vital.labels.vocabulary import read_concept_file
    path = tmp_path / "concepts.txt"
    path.write_bytes("caf\xe9\nthé\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="concepts.txt is not UTF-8"):
        read_concept_file(path)


def test_one_probe_image_is_refused(tmp_path, capsys):
    from vital.modes.label_visuals import DescribeCFG, run_describe
    write_images(tmp_path / "probe", 1)
    status = main(DescribeCFG, run_describe, [
        "--model", TINY_CNN, "--layers", "stage2", "--probe_dir", str(tmp_path / "probe"),
        "--concept_model", "module:tests.test_labels:colour_judge", "--out_dir",
        str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and "at least 2 readable images" in err


def test_a_shard_without_work_says_so(capsys):
    from vital.eval.engine import say_empty_shard
    say_empty_shard("5/6", [], 3)
    assert "shard 5/6: no runs to do (the sweep has 3 batch(es)" in capsys.readouterr().out
    say_empty_shard("0/6", [["run"]], 3)
    say_empty_shard("", [], 3)
    assert capsys.readouterr().out == ""


def test_warnings_are_one_line_naming_no_library_frame(capsys):
    import warnings
    from vital.cli import warnings_as_lines
    with warnings_as_lines():
        warnings.warn("skipping unreadable image x.png: cannot identify image file",
                      stacklevel=2)
    err = capsys.readouterr().err
    assert err == "warning: skipping unreadable image x.png: cannot identify image file\n"


def test_an_unreachable_ray_address_is_one_sentence_within_seconds():
    import socket
    import time
    from vital.eval.launchers import check_reachable
    with socket.socket() as probe:       # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    check_reachable("auto")   # left to Ray
