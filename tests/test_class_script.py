"""class_neurons_fvis.py end to end on a tiny model (in this process and as a script), Ctrl-C,
determinism, bad input; the embedded model at 64 px behind the slow marker."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import (TINY_CNN, TinyCNN, assert_png_equals, assert_png_shows, read_png,
                     run_script)
from vital.cli import main
from vital.models import load_target
from vital.modes.class_mode import ClassCFG, run_class

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, ref_folder, **kw):
    base = dict(model=TINY_CNN, target="3", ref_dir=str(ref_folder),
                size=32, steps_multires=[4, 6], save_steps=5, out_dir=str(tmp_path / "out"),
                run_name="t", progress=False, device="cpu")
    base.update(kw)
    return ClassCFG(**base)


def test_run_writes_the_run_folder(tmp_path, ref_folder):
    run_dir, result = run_class(_cfg(tmp_path, ref_folder))
    assert result.steps_done == 10
    assert_png_equals(run_dir / "final.png", result.image)
    with Image.open(run_dir / "final_alpha.png") as alpha:
        assert alpha.mode == "RGBA"
        assert (read_png(run_dir / "final_alpha.png") == read_png(run_dir / "final.png")).all()
        stored = np.asarray(alpha.getchannel("A"), dtype=np.float32)
    expected = (result.alpha[0] * 255).round().numpy()            # normalised |gradient| map
    assert np.abs(stored - expected).max() <= 1 and stored.max() == 255 > stored.min()
    step5 = assert_png_shows(run_dir / "steps" / "step_0005.png", (32, 32))
    assert (step5 != assert_png_shows(run_dir / "steps" / "step_0010.png", (32, 32))).any()
    assert_png_shows(run_dir / "steps_strip.png")
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["weight_hash"] == load_target(TinyCNN()).weight_hash
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and [s["step"] for s in metrics["steps"]] == [5, 10]
    terms = metrics["steps"][0]["terms"]
    assert "class:3" in terms and any(k.startswith("sort:") for k in terms)
    again, _ = run_class(_cfg(tmp_path, ref_folder))
    assert again != run_dir          # a finished run is never overwritten


def test_same_seed_same_png(tmp_path, ref_folder):
    a, _ = run_class(_cfg(tmp_path, ref_folder, hard_determinism=True, run_name="a"))
    b, _ = run_class(_cfg(tmp_path, ref_folder, hard_determinism=True, run_name="b"))
    c, _ = run_class(_cfg(tmp_path, ref_folder, seed=1, run_name="c"))
    assert (a / "final.png").read_bytes() == (b / "final.png").read_bytes()
    assert (a / "final.png").read_bytes() != (c / "final.png").read_bytes()


@pytest.mark.parametrize("override, message", [
    ({"ref_dir": "/nonexistent/folder"}, "does not exist"),
    ({"target": "class99"}, "class99"),
    ({"layers": ["nope"]}, "valid layers"),
    ({"size": 5}, "impossible"),
])
def test_bad_input_is_one_sentence(tmp_path, ref_folder, capsys, override, message):
    cfg = _cfg(tmp_path, ref_folder, **override)
    args = []
    for key, value in {**vars(cfg)}.items():
        if key in override or key in ("model", "target", "ref_dir", "size", "out_dir", "device"):
            values = value if isinstance(value, list) else [value]
            args += [f"--{key}", *map(str, values)]
    status = main(ClassCFG, run_class, args + ["--no-progress", "--steps", "2"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error:") and message in err and "Traceback" not in err


def test_script_dump_json_round_trip_and_run(tmp_path, ref_folder):
    """--dump_cfg writes the resolved config; the script run from it (plus a few overrides) ends
    with exit 0, the run folder, and exactly that config in its config.json."""
    dumped = tmp_path / "cfg.json"
    run_script("class_neurons_fvis.py", "--target", "7", "--steps", "3", "--dump_cfg", dumped,
               cwd=tmp_path)
    data = json.loads(dumped.read_text())
    assert data["target"] == "7" and data["steps"] == 3
    overrides = {"model": TINY_CNN, "ref_dir": str(ref_folder), "size": 32,
                 "out_dir": str(tmp_path / "out"), "run_name": "script", "device": "cpu"}
    args = [a for key, value in overrides.items() for a in (f"--{key}", value)]
    proc = run_script("class_neurons_fvis.py", "--json_cfg", dumped, *args, "--no-progress",
                      cwd=tmp_path)
    final = Path(proc.stdout.strip().splitlines()[-1])
    assert final == tmp_path / "out" / "script" / "final.png"
    assert_png_shows(final, (32, 32))
    meta = json.loads((final.parent / "config.json").read_text())
    assert meta["cfg"] == {**data, **overrides, "progress": False}
    metrics = json.loads((final.parent / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["steps_done"] == 3


@pytest.mark.slow   # the fast suite: the tiny CNN run above, test_models for the embedded model
def test_embedded_model_end_to_end_at_64px(tmp_path, ref_folder):
    cfg = _cfg(tmp_path, ref_folder, model="efficientnet-lite0", target="espresso", size=64,
               steps_multires=[3, 3], save_steps=3)
    run_dir, result = run_class(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result.steps_done == 6 and metrics["status"] == "finished"
    names = [name for name, _, _ in metrics["final_opinion"]["opinion"]]
    assert len(names) == 5 and all(isinstance(n, str) for n in names)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["layers"][0] == "stem" and meta["class_index"] == 967


def test_ctrl_c_saves_what_exists(tmp_path, ref_folder):
    import signal
    import time
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "class_neurons_fvis.py"), "--model",
           TINY_CNN, "--target", "1", "--ref_dir", str(ref_folder),
           "--size", "32", "--steps", "100000", "--save_steps", "5", "--out_dir", str(out),
           "--run_name", "sigint", "--no-progress", "--device", "cpu"]
    # SIG_DFL in the child: Python then installs its Ctrl-C handler even when this test runs
    # as a shell's background job (which starts with SIGINT ignored)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    steps = out / "sigint" / "steps"
    deadline = time.time() + 60
    while time.time() < deadline and not (steps.is_dir() and any(steps.iterdir())):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    metrics = json.loads((out / "sigint" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 5 <= metrics["steps_done"] < 100000
    assert_png_shows(out / "sigint" / "final.png", (32, 32))
    assert b"interrupted after" in err
