"""The faults of issue 15, each checked: over-limit and 16-bit images, hard determinism against
the reference cache, SIGTERM, output problems, and values that were accepted or misreported."""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import isolated_workdir
from vital.cli import main
from vital.commands import by_script
from vital.config import ConfigError, check_cfg, parse_cfg

ROOT = Path(__file__).resolve().parent.parent
TINY = "module:tests.helpers:TinyCNN"   # a 3-stage random CNN: script runs in about a second
FAST = ["--model", TINY, "--target", "class3", "--size", "32", "--steps", "2", "--save_steps",
        "1", "--no-progress", "--num_ref", "2"]


def write_images(folder: Path, n: int, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{k:02d}.png")
    return folder


def script(name: str):
    """(CFG, run function) of a root script: the command it runs (``vital.commands``)."""
    return by_script(name).load()


def run_script(name: str, *argv: str) -> int:
    cfg_cls, run_fn = script(name)
    return main(cfg_cls, run_fn, list(argv))


def refused(name: str, argv: list[str], capsys) -> str:
    """Parse ``argv`` for the script; it must exit 2 with a one-line error; returns the line."""
    cfg_cls, _ = script(name)
    with pytest.raises(SystemExit) as stop:
        parse_cfg(cfg_cls, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    return err


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    # ROOT on sys.path for the TINY spec (tests.helpers)
    yield from isolated_workdir(tmp_path, monkeypatch, extra_path=ROOT)


@pytest.fixture
def refs(tmp_path):
    return write_images(tmp_path / "refs", 3)


# ---------------------------------------------------------------- 1, 2: images

def test_image_over_the_pixel_limit_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from vital.refs.images import load_images
    folder = write_images(tmp_path / "mixed", 1, size=16)
    Image.new("RGB", (64, 64), "red").save(folder / "huge.png")
    # stands for a 20000 x 20000 image: Pillow refuses images over twice its limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(UserWarning, match="huge.png.*pixel limit"):
        images, used = load_images(sorted(folder.iterdir()), 16)
    assert [p.name for p in used] == ["img_00.png"] and images.shape == (1, 3, 16, 16)


def test_16_bit_grayscale_png_keeps_its_range(tmp_path):
    from vital.refs.images import load_image
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))   # dark -> bright
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path, 32)
    assert image.shape == (3, 32, 32)
    assert abs(float(image.mean()) - 0.5) < 0.05       # not all white
    assert float(image[:, :, 0].mean()) < 0.05 and float(image[:, :, -1].mean()) > 0.95


# ---------------------------------------------------------------- 3: hard determinism

def _class_cfg(refs, out, **kw):
    from vital.modes.class_mode import ClassCFG
    return ClassCFG(ref_dir=str(refs), out_dir=str(out), size=32, steps=3, num_ref=2,
                    save_steps=0, progress=False, **kw)


def _poison_reference_cache(cache_root: Path) -> int:
    from vital import cache
    entries = list((cache_root / "references").glob("*.safetensors"))
    for path in entries:
        tensors, meta = cache.load_tensors(path)
        meta.pop("sha256")   # a valid entry with other values, as another thread count makes
        cache.store_tensors(path, {k: v * 1.01 for k, v in tensors.items()}, meta)
    return len(entries)


@pytest.mark.slow   # three class runs (~30 s on a shared machine); the next test is the fast check
def test_hard_determinism_does_not_depend_on_the_cache(refs, tmp_path, isolated_cache):
    from vital.modes.class_mode import run_class
    hard = dict(hard_determinism=True, run_name="hard")
    first, _ = run_class(_class_cfg(refs, tmp_path / "a", cache=False, **hard))
    png = (first / "final.png").read_bytes()
    # a multi-threaded, non-hard run fills the cache, and its entries drift in the last bits
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(2)
    run_class(_class_cfg(refs, tmp_path / "b", run_name="soft"))
    assert _poison_reference_cache(isolated_cache) > 0
    again, _ = run_class(_class_cfg(refs, tmp_path / "c", **hard))
    assert (again / "final.png").read_bytes() == png


def test_hard_run_ignores_features_cached_by_a_multi_threaded_run(refs, isolated_cache):
    from vital.models import load_target
    from vital.refs.references import reference_quantiles
    target, files = load_target(TINY), sorted(refs.iterdir())
    torch.set_num_threads(2)
    reference_quantiles(target, ["stem"], files, 32, progress=False)
    assert _poison_reference_cache(isolated_cache) == 1
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    cached, info = reference_quantiles(target, ["stem"], files, 32, progress=False)
    fresh, _ = reference_quantiles(target, ["stem"], files, 32, use_cache=False, progress=False)
    assert not info["cache_hit"]
    torch.testing.assert_close(cached["stem"], fresh["stem"], rtol=0, atol=0)


def test_reference_cache_key_holds_the_thread_count_only_under_hard_determinism(refs):
    from vital.models import load_target
    from vital.refs.references import reference_key
    target = load_target(TINY)
    files = sorted(refs.iterdir())
    keys = {}
    for hard, threads in ((False, 1), (False, 2), (True, 1), (True, 2)):
        torch.use_deterministic_algorithms(hard)
        torch.set_num_threads(threads)
        keys[hard, threads] = reference_key(target, ["stem"], files, 32)
    assert keys[False, 1] == keys[False, 2]
    assert len({keys[False, 1], keys[True, 1], keys[True, 2]}) == 3


# ---------------------------------------------------------------- 4: SIGTERM

def test_sigterm_saves_the_last_image_and_exits_143(refs, monkeypatch):
    from vital.modes import runner

    def terminate(step, total, loss, image):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(runner, "NO_CALLBACKS", runner.Callbacks(on_progress=terminate,
                                                                 progress_every=1))
    before = signal.getsignal(signal.SIGTERM)
    status = run_script("class_neurons_fvis.py", *FAST, "--steps", "50", "--ref_dir", str(refs))
    assert status == 143
    assert signal.getsignal(signal.SIGTERM) == before          # handler restored
    run_dir = next(Path("out_class").iterdir())
    assert (run_dir / "final.png").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"].startswith("terminated (SIGTERM") and metrics["steps_done"] == 2


# ---------------------------------------------------------------- 5: outputs

def test_out_dir_under_a_file_is_one_sentence(refs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    status = run_script("class_neurons_fvis.py", *FAST, "--ref_dir", str(refs),
                        "--out_dir", str(blocker / "runs"))
    assert status == 2
    assert "cannot create the run folder" in one_error_line(capsys)


def test_read_only_disk_is_one_sentence(refs, monkeypatch, capsys):
    def read_only(self, *a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(Path, "mkdir", read_only)
    status = run_script("class_neurons_fvis.py", *FAST, "--ref_dir", str(refs),
                        "--out_dir", "ro/runs")
    assert status == 2
    assert "Read-only file system" in one_error_line(capsys)


def test_dump_cfg_under_a_file_is_one_sentence(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = refused("class_neurons_fvis.py", ["--dump_cfg", str(blocker / "cfg.json")], capsys)
    assert "cannot write the configuration" in err


def test_full_disk_mid_run_exits_1_and_says_so_in_metrics(refs, monkeypatch, capsys):
    from vital.modes import outputs

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", "final.png")
    monkeypatch.setattr(outputs, "save_png", full)
    status = run_script("class_neurons_fvis.py", *FAST, "--ref_dir", str(refs))
    assert status == 1
    assert "disk is full" in one_error_line(capsys)
    run_dir = next(Path("out_class").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"].startswith("failed: the disk is full")
    assert all("save_error" in record for record in metrics["steps"])


def test_a_crash_mid_run_leaves_no_running_status(refs, monkeypatch):
    from vital.modes import runner

    def boom(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(runner, "render", boom)
    with pytest.raises(RuntimeError):
        run_script("class_neurons_fvis.py", *FAST, "--ref_dir", str(refs))
    run_dir = next(Path("out_class").iterdir())
    status = json.loads((run_dir / "metrics.json").read_text())["status"]
    assert status == "failed: RuntimeError: a bug"


# ---------------------------------------------------------------- 6: values

@pytest.mark.parametrize("argv, said", [
    (["--steps", "-1"], "--steps -1 is not valid: it must be >= 0"),
    (["--warmup", "-5"], "--warmup -5 is not valid"),
    (["--layer_weights", "-1"], "--layer_weights -1.0 is not valid"),
    (["--save_steps", "-1"], "--save_steps -1 is not valid"),
    (["--batch", "0"], "--batch 0 is not valid: it must be >= 1"),
    (["--batch", "-2"], "--batch -2 is not valid"),
    (["--num_ref", "0"], "--num_ref 0 is not valid: it must be >= 1"),
    (["--lr", "nan"], "--lr nan is not valid: it must be a number > 0"),
])
def test_bad_values_are_refused_before_running(argv, said, capsys, refs):
    if said is None:
        status = run_script("class_neurons_fvis.py", *FAST, "--ref_dir", str(refs), *argv)
        assert status == 2
        assert "must be 1 or more" in one_error_line(capsys)
        return
    assert said in refused("class_neurons_fvis.py", argv, capsys)


def test_json_null_size_and_json_problems(tmp_path, capsys):
    cfg = tmp_path / "null.json"
    cfg.write_text('{"size": null}')
    assert "--size must be int, got null" in refused("class_neurons_fvis.py",
                                                     ["--json_cfg", str(cfg)], capsys)
    cfg.write_text('{"layers": null}')
    assert "--layers must be a list, got null" in refused("class_neurons_fvis.py",
                                                          ["--json_cfg", str(cfg)], capsys)
    assert "is a folder" in refused("class_neurons_fvis.py", ["--json_cfg", str(tmp_path)],
                                    capsys)
    cfg.write_text('{"param": "wavelets"}')   # argparse's choices do not see a JSON file
    assert "--param 'wavelets' is not valid: it must be one of" in refused(
        "class_neurons_fvis.py", ["--json_cfg", str(cfg)], capsys)
    latin = tmp_path / "latin1.json"
    latin.write_bytes('{"target": "caf\u00e9"}'.encode("latin-1"))
    assert "not UTF-8" in refused("class_neurons_fvis.py", ["--json_cfg", str(latin)], capsys)


def test_cfgs_built_in_python_are_checked_too():
    from vital.modes.class_mode import ClassCFG
    with pytest.raises(ConfigError, match="--steps -1 is not valid"):
        check_cfg(ClassCFG(steps=-1))
    check_cfg(ClassCFG())   # the defaults are valid


def test_query_model_layers_size_is_checked(capsys):
    from vital.models.layer_table import main as query
    with pytest.raises(SystemExit) as stop:
        query(["--size", "-5"])
    assert stop.value.code == 2 and "--size -5 is not valid" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny():
    from vital.models import load_target
    from helpers import TinyCNN
    return load_target(TinyCNN())


def test_size_that_cannot_fit_in_memory_is_refused_up_front(tiny):
    from vital.models import memory
    need_48 = memory.step_bytes(tiny, 48)        # at the input size
    need_4096 = memory.step_bytes(tiny, 4096)
    assert need_4096 == pytest.approx(need_48 * (4096 / 48) ** 2, rel=1e-6)
    free = need_4096 // 2
    with pytest.raises(ConfigError, match="--size 4096 .* needs about .* GB .* are free"):
        memory.check_memory(tiny, 4096, 1, free=free)
    assert memory.check_memory(tiny, 48, 1, free=free) == need_48
    with pytest.warns(UserWarning, match="may run out of memory"):
        memory.check_memory(tiny, 4096, 1, free=int(need_4096 * 1.5))


def test_negative_class_index_names_the_range(tiny):
    with pytest.raises(ValueError, match=r"class index -1 .* valid 0\.\.9"):
        tiny.class_index("-1")


@pytest.mark.parametrize("text, said", [
    ("0/0", "the number of shards n must be 1 or more"),
    ("-1/2", "the shard index i must be in 0..1"),
    ("x", "must look like i/n"),
])
def test_shard_errors_say_what_is_wrong(text, said):
    from vital.eval.sweep import parse_shard
    with pytest.raises(ConfigError, match=said):
        parse_shard(text)


def test_corrupt_init_image_is_one_sentence(refs, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    status = run_script("class_neurons_fvis.py", *FAST, "--ref_dir", str(refs),
                        "--init_image", str(bad))
    assert status == 2
    assert "--init_image" in one_error_line(capsys)


def test_font_that_is_not_a_font_is_one_sentence(tmp_path, capsys):
    bad = tmp_path / "font.ttf"
    bad.write_text("not a font")
    status = run_script("class_neurons_fvis_arithmetic.py", "--model", TINY, "--size", "32",
                        "--steps", "2",
                        "--no-progress", "--font", str(bad))
    assert status == 2
    assert "is not a font" in one_error_line(capsys)


def test_direction_with_letters_names_the_file(tmp_path, capsys):
    direction = tmp_path / "direction.txt"
    direction.write_text("1 2 abc\n")
    status = run_script("inner_neurons_fvis.py", "--model", TINY, "--layer", "stage2", "--size",
                        "32", "--steps", "2", "--no-progress", "--direction", str(direction))
    assert status == 2
    line = one_error_line(capsys)
    assert str(direction) in line and "numbers only" in line


def test_offline_torchvision_weights_are_one_sentence(monkeypatch, tmp_path, capsys):
    from vital.models import loaders
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    monkeypatch.setattr(loaders, "_download", offline)
    status = run_script("class_neurons_fvis.py", "--model", "torchvision:resnet18",
                        "--size", "32", "--steps", "2", "--no-progress")
    assert status == 2
    line = one_error_line(capsys)
    assert "not cached and we are offline" in line and "checkpoints" in line


def test_bad_pickle_message_omits_the_weights_only_false_advice(tmp_path):
    from vital.models import load_target

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))
    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ValueError) as err:
        load_target(str(path))
    assert "weights_only" not in str(err.value) and "can run code" in str(err.value)


def test_clip_with_another_vocabulary_is_one_sentence(tmp_path):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    from vital.models import load_target
    from vital.models.opinion import make_opinion
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=100, width=64, heads=1, layers=1)
    model = CLIP(32, vision, text, quick_gelu=True).eval()
    path = tmp_path / "vocab100.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    target = load_target(str(path))
    with pytest.raises(ValueError, match="text vocabulary of 100 tokens"):
        target.class_scores(torch.rand(1, 3, 32, 32), prompts=["a photo of a cat"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert make_opinion(target) is None
    assert any("vocabulary" in str(w.message) for w in caught)


def test_a_layer_number_the_model_lacks_gives_the_range(capsys, refs):
    status = run_script("inner_neurons_fvis.py", "--layer", "40", "--size", "32", "--steps",
                        "2", "--no-progress", "--data_dir", str(refs))
    assert status == 2
    line = one_error_line(capsys)   # the embedded EfficientNet-Lite0 has blocks 0..15
    assert "no block 40" in line and "0..15" in line and len(line) < 200


@pytest.mark.slow   # a fresh interpreter (~15 s): the real signal from outside, as SLURM sends it
def test_sigterm_from_outside_the_process(refs, tmp_path):
    import subprocess
    import time
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(ROOT / "class_neurons_fvis.py"), *FAST,
                             "--steps", "2000", "--ref_dir", str(refs), "--out_dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("*/steps/step_0002.png")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    run_dir = next(out.iterdir())
    assert (run_dir / "final.png").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["status"].startswith("terminated")
