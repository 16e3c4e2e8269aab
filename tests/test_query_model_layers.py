"""query_model_layers.py: table, JSON, filter, size override, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "query_model_layers.py"
from vital.models import layer_table as Q


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_json_with_filter_subprocess():
    proc = _run("--model", "efficientnet-lite0", "--json", "--filter", r"^blocks\.1[0-5]$")
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    names = [layer["name"] for layer in desc["layers"]]
    assert names == [f"blocks.{i}" for i in range(10, 16)]
    last = desc["layers"][-1]
    assert (last["shape"], last["channels"], last["layout"]) == ([1, 320, 7, 7], 320, "BCHW")
    assert desc["input_size"] == 224 and desc["kind"] == "classifier"
    assert "blocks.15" in desc["default_layers"]


def test_unknown_model_is_one_line_exit_2():
    proc = _run("--model", "no-such-net")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model spec 'no-such-net'")
    assert "torchvision:" in lines[0]


def test_table_with_size_override(capsys):
    assert Q.main(["--model", "efficientnet-lite0", "--size", "64", "--filter", "stem"]) == 0
    out = capsys.readouterr().out
    assert "input 64 px" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("stem")]
    assert [r[0] for r in rows] == ["stem", "stem.conv", "stem.bn", "stem.act"]
    assert all(r[2] == "1x32x32x32" and r[3] == "32" for r in rows)


def test_name_matcher_regex_and_substring():
    assert Q.name_matcher(r"blocks\.1$")("blocks.1")
    assert not Q.name_matcher(r"blocks\.1$")("blocks.10")
    assert Q.name_matcher("blocks.[")("blocks.[x")  # invalid regex: plain substring
    assert Q.name_matcher("")("anything")


def test_bad_device_is_an_error(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device exists")
    assert Q.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
