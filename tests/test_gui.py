"""The desktop GUI: the render hooks it relies on, its form -> CFG logic, the Tk window itself
under a virtual X server (Xvfb), driven through its buttons with the real mainloop, and
vital_gui.py started as a user starts it (with and without a display).

Window tests skip when no X server can be started (install Xvfb: `apt-get install xvfb`;
.ci/run does this). A screenshot of the window after a run is written to test-artifacts/.
"""
import gc
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY_CNN, assert_png_shows, read_png
from vital.app import forms as gm
from vital.modes.runner import Callbacks
from vital.optvis.render import Schedule, render

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


# ---------------------------------------------------------------- render hooks (no X needed)

def _render(target, **hooks):
    from vital.optvis import losses
    from vital.optvis import param
    gen = torch.Generator().manual_seed(0)
    p = param.make_param("laplacian", size=32, batch=1, generator=gen)
    objective = losses.class_logprob_objective(1) + 0.05 * losses.tv_objective()
    return render(target, objective, p, Schedule(steps_multires=(7,), warmup=2), ["stem"],
                  generator=gen, progress=False, **hooks)


def test_on_progress_runs_every_k_steps_and_does_not_change_the_result(tiny_cnn_target):
    calls = []
    watched = _render(tiny_cnn_target, progress_every=3,
                      on_progress=lambda s, n, loss, im: calls.append((s, n, loss, im.shape)))
    plain = _render(tiny_cnn_target)
    assert [c[0] for c in calls] == [1, 3, 6, 7] and {c[1] for c in calls} == {7}
    assert all(isinstance(c[2], float) and c[3] == (1, 3, 32, 32) for c in calls)
    torch.testing.assert_close(watched.image, plain.image, rtol=0, atol=0)


def test_should_stop_ends_the_run_like_ctrl_c(tiny_cnn_target):
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 4          # four steps run, the fifth is refused
    result = _render(tiny_cnn_target, should_stop=stop)
    assert result.stopped == "stopped" and result.steps_done == 4
    assert torch.isfinite(result.image).all() and result.alpha.max() == 1


def test_callbacks_reach_the_render_of_a_mode(tmp_path):
    """A mode's run function passes its callbacks to the runner: watch, record and stop."""
    from vital.modes.arithmetic import ArithmeticCFG, run_arithmetic
    cfg = ArithmeticCFG(model=TINY_CNN, base="KING", add=["WOMAN"], sub=["MAN"], size=32,
                        steps=50, save_steps=2, out_dir=str(tmp_path), progress=False,
                        device="cpu", ref_views=1)
    seen, records = [], []
    callbacks = Callbacks(on_progress=lambda s, *_: seen.append(s), progress_every=2,
                          on_record=lambda s, r: records.append(s),
                          should_stop=lambda: len(seen) >= 3)
    run_dir, result = run_arithmetic(cfg, [], callbacks)
    assert result.stopped == "stopped" and result.steps_done == 4 and seen == [1, 2, 4]
    assert records == [2, 4, 4]        # two save steps, then the final opinion
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "stopped"
    assert_png_shows(run_dir / "final.png", (32, 32))


# ---------------------------------------------------------------- form logic (no X needed)

def _form(**kw):
    base = {"model": TINY_CNN, "steps": "9", "size": "32", "target": "class3", "ref_dir": "",
            "class_weight": "0.2", "tv_weight": "0.01", "layer": "stage1", "neuron": "5",
            "neuron_weight": "0.3", "feat_weight": "1", "base": "KING", "add": "WOMAN, QUEEN",
            "sub": "MAN", "sub_alpha": "0.5", "add_beta": "2", "direction_weight": "1",
            "n_concepts": "3"}
    base.update(kw)
    return base


def test_build_cfg_gives_each_mode_its_script_cfg(ref_folder):
    modes = gm.modes()
    cls = gm.build_cfg(modes["class"], _form(ref_dir=str(ref_folder)), out_dir="o")
    assert type(cls).__name__ == "ClassCFG" and cls.target == "class3"
    assert (cls.steps, cls.steps_multires, cls.size) == (0, [3, 6], 32)
    assert (cls.class_weight, cls.tv_weight, cls.out_dir) == (0.2, 0.01, "o")
    assert cls.num_ref == gm.default_of(type(cls), "num_ref")       # hidden fields: defaults
    inner = gm.build_cfg(modes["inner"], _form(ref_dir=str(ref_folder)))
    assert (inner.layer, inner.neuron, inner.data_dir, inner.neuron_weight) == \
        ("stage1", 5, str(ref_folder), 0.3)
    ari = gm.build_cfg(modes["arithmetic"], _form())
    assert (ari.base, ari.add, ari.sub, ari.sub_alpha, ari.add_beta) == \
        ("KING", ["WOMAN", "QUEEN"], ["MAN"], 0.5, 2.0)
    assert ari.lr == gm.default_of(type(ari), "lr")   # the mode's own defaults stay
    con = gm.build_cfg(modes["concept"], _form(ref_dir=str(ref_folder), layer=""))
    assert (con.n_concepts, con.layer_block, type(con.n_concepts)) == (3, "", int)


@pytest.mark.parametrize("override, message", [
    ({"ref_dir": "/nonexistent/folder"}, "does not exist"),
    ({"steps": "many"}, "Steps must be a whole number"),
    ({"size": "8"}, "16..4096"),
    ({"class_weight": "lots"}, "Class weight must be a number"),
    ({"target": "  "}, "class name"),
])
def test_build_cfg_refuses_bad_fields_in_one_sentence(ref_folder, override, message):
    form = _form(ref_dir=str(ref_folder))
    form.update(override)
    with pytest.raises(gm.FormError, match=message):
        gm.build_cfg(gm.modes()["class"], form)


def test_short_runs_use_one_stage():
    assert gm.schedule_fields(2) == {"steps": 2, "steps_multires": [2]}
    assert gm.schedule_fields(600)["steps_multires"] == [200, 400]   # the scripts' default


def test_completion_prefers_prefixes():
    names = ["espresso", "espresso maker", "tabby", "French loaf", "loafer"]
    assert gm.complete("LOAF", names) == ["loafer", "French loaf"]
    assert gm.complete("espr", names, limit=1) == ["espresso"]


def test_bundled_folders_are_offered_and_built_when_missing(tmp_path, monkeypatch):
    import vital.refs.bundled
    built = []
    monkeypatch.setattr(vital.refs.bundled, "build_reference_folders",
                        lambda root: built.append(root) or (Path(root) / "espresso").mkdir(
                            parents=True))
    root = tmp_path / "refs"
    choices = gm.bundled_choices("class", root)
    assert str(root / "espresso") in choices and str(root) not in choices
    assert str(root) in gm.bundled_choices("inner", root)
    assert gm.is_bundled(root / "tabby" / "view_00.png", root)
    assert not gm.ensure_bundled([str(tmp_path / "elsewhere")], root) and not built
    assert gm.ensure_bundled([str(root / "espresso")], root) and built == [root]
    assert not gm.ensure_bundled([str(root / "espresso")], root) and len(built) == 1


def test_plain_error_is_one_line_without_a_traceback(capsys):
    from vital.refs.images import ReferenceError
    assert gm.plain_error(ReferenceError("folder x\n does not exist")) == \
        "folder x does not exist"
    try:
        {}["boom"]
    except KeyError as err:
        text = gm.plain_error(err)
    assert text.startswith("Unexpected error (KeyError)") and "\n" not in text
    assert "Traceback" in capsys.readouterr().err     # the details go to the terminal


# ---------------------------------------------------------------- the window (needs X)

def _start_xvfb():
    """(process, display) of a fresh Xvfb, or (None, None) when it cannot start."""
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0",
                                 "1280x900x24", "-nolisten", "tcp"], pass_fds=(write,),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        os.close(write)
    text, deadline = b"", time.monotonic() + 20
    while not text.endswith(b"\n") and time.monotonic() < deadline:   # "N\n", maybe in parts
        ready, _, _ = select.select([read], [], [], 1)
        chunk = os.read(read, 64) if ready else b""
        if ready and not chunk:
            break                          # Xvfb exited
        text += chunk
    os.close(read)                         # only after the newline: Xvfb dies of SIGPIPE else
    number = text.decode().strip()
    if not number:
        proc.kill()
        return None, None
    return proc, f":{number}"


@pytest.fixture(scope="module")
def display():
    tk = pytest.importorskip("tkinter", reason="this Python has no Tk (apt-get install python3-tk)")
    proc, name = _start_xvfb() if shutil.which("Xvfb") else (None, None)
    name = name or os.environ.get("DISPLAY")
    if not name:
        pytest.skip("no X server: install Xvfb (apt-get install xvfb) to run the GUI tests")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DISPLAY", name)
            try:
                tk.Tk().destroy()
            except tk.TclError as err:
                pytest.skip(f"no usable X server at {name}: {err}")
            yield name
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def make_app(display, tmp_path):
    import tkinter as tk

    from vital.app.gui import VitalApp
    apps = []

    def make(model=TINY_CNN):
        root = tk.Tk()
        apps.append(VitalApp(root, out_dir=str(tmp_path / "out"), model=model))
        return apps[-1]
    yield make
    for app in apps:
        if app.worker is not None:
            app.worker.stop()
            app.worker.thread.join(60)
        app.close()
    apps.clear()
    gc.collect()       # Tk objects must be freed in this thread, not in a later worker's


def pump_until(app, condition, timeout=120.0) -> None:
    """Run the real Tk mainloop until ``condition()`` holds (checked every 50 ms)."""
    deadline = time.monotonic() + timeout

    def check():
        if condition() or time.monotonic() > deadline:
            app.root.quit()
        else:
            app.root.after(50, check)
    app.root.after(50, check)
    app.root.mainloop()
    assert condition(), f"timed out; status {app.status.get()!r}, message {app.message.get()!r}"


def _idle(app) -> bool:
    return app.worker is not None and not app.worker.alive() and app.queue.empty() \
        and str(app.buttons["run"].cget("state")) == "normal"


def _fill(app, ref_folder, steps, size, target=None):
    app.fields["steps"].set(str(steps))
    app.fields["size"].set(str(size))
    app.refs["class"].set(str(ref_folder))
    if target is not None:
        app.fields["target"].set(target)


def _screenshot(app, path: Path) -> Path | None:
    """The window as a PNG (Pillow grabs X displays through XCB; without it: None)."""
    from PIL import ImageGrab, features
    if not features.check("xcb"):
        return None
    app.root.update()
    x, y = app.root.winfo_rootx(), app.root.winfo_rooty()
    box = (x, y, x + app.root.winfo_width(), y + app.root.winfo_height())
    path.parent.mkdir(parents=True, exist_ok=True)
    ImageGrab.grab(bbox=box, xdisplay=os.environ["DISPLAY"]).save(path)
    return path


def test_embedded_model_run_from_the_window(make_app, ref_folder):
    app = make_app("efficientnet-lite0")
    assert app.root.title().startswith("VITAL") and app.model.get() == "efficientnet-lite0"
    pump_until(app, lambda: isinstance(app.infos.get("efficientnet-lite0"), gm.ModelInfo))
    assert "espresso" in gm.complete("espr", app.infos["efficientnet-lite0"].classes)
    _fill(app, ref_folder, steps=4, size=64, target="espresso")
    app.buttons["run"].invoke()
    pump_until(app, lambda: _idle(app))
    assert app.message.get() == "" and app.status.get() == "finished after 4 steps"
    final = assert_png_shows(Path(app.run_dir) / "final.png", (64, 64))
    assert (read_png(Path(app.run_dir) / "steps" / "step_0001.png") != final).any()
    assert app.opinion.get().startswith("top-5:") and float(app.bar.cget("value")) == 4
    assert str(Path(app.run_dir).resolve()) in app.out_path.get()
    shot = _screenshot(app, ARTIFACTS / "gui_after_run.png")
    assert shot is None or assert_png_shows(shot).shape[1] > 400


def test_window_run_equals_the_script_with_the_saved_config(make_app, ref_folder, tmp_path):
    app = make_app()
    _fill(app, ref_folder, steps=6, size=32, target="class3")
    app.keys["class"]["class_weight"].set("0.5")
    app.buttons["run"].invoke()
    pump_until(app, lambda: _idle(app))
    final = Path(app.run_dir) / "final.png"
    assert app.status.get() == "finished after 6 steps"
    assert_png_shows(final, (32, 32))
    saved = app.save_config(str(tmp_path / "gui_cfg.json"))
    data = json.loads(Path(saved).read_text())
    assert (data["model"], data["target"], data["class_weight"]) == (TINY_CNN, "class3", 0.5)
    assert "class_neurons_fvis.py --json_cfg" in app.status.get()
    proc = subprocess.run([sys.executable, str(ROOT / "class_neurons_fvis.py"), "--json_cfg",
                           saved, "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    script_final = Path(proc.stdout.strip().splitlines()[-1])
    assert script_final != final and script_final.read_bytes() == final.read_bytes()


def test_stop_ends_the_run_and_keeps_what_exists(make_app, ref_folder):
    app = make_app()
    _fill(app, ref_folder, steps=100_000, size=32, target="class3")
    assert app.run()
    pump_until(app, lambda: app.status.get().startswith("step "))
    assert str(app.buttons["stop"].cget("state")) == "normal"
    app.buttons["stop"].invoke()
    pump_until(app, lambda: _idle(app))
    assert app.status.get().startswith("stopped; saved what exists after")
    metrics = json.loads((Path(app.run_dir) / "metrics.json").read_text())
    assert metrics["status"] == "stopped" and 0 < metrics["steps_done"] < 100_000
    assert_png_shows(Path(app.run_dir) / "final.png", (32, 32))


def test_errors_show_as_sentences_and_the_window_stays_usable(make_app, ref_folder, tmp_path):
    app = make_app()
    _fill(app, tmp_path / "no_such_folder", steps=2, size=32, target="class3")
    app.buttons["run"].invoke()
    assert app.worker is None and app.status.get() == ""     # nothing started
    assert "does not exist" in app.message.get() and "Traceback" not in app.message.get()
    empty = tmp_path / "empty"
    empty.mkdir()
    _fill(app, empty, steps=2, size=32)
    app.buttons["run"].invoke()                  # found only by the run: a sentence too
    pump_until(app, lambda: _idle(app))
    assert "holds no images" in app.message.get() and app.status.get() == "not run"
    _fill(app, ref_folder, steps=2, size=32, target="not a class")
    app.buttons["run"].invoke()
    pump_until(app, lambda: _idle(app))
    assert "unknown class 'not a class'" in app.message.get() and app.run_dir is None
    app.model.set("nonsense-model")
    app.request_model_info()
    pump_until(app, lambda: "cannot be loaded" in app.message.get())
    assert "Valid forms" in app.message.get()
    app.model.set(TINY_CNN)
    _fill(app, ref_folder, steps=2, size=32, target="class3")
    app.buttons["run"].invoke()                  # still usable: a good run now finishes
    pump_until(app, lambda: _idle(app))
    assert app.message.get() == ""
    assert_png_shows(Path(app.run_dir) / "final.png", (32, 32))


def test_every_mode_shows_its_fields(make_app):
    app = make_app()
    for key, mode in app.modes.items():
        app.set_mode(key)
        app.root.update()
        assert app.target_frames[key].winfo_ismapped()
        shown = [label.cget("text") for label in app.key_labels if label.cget("text")]
        assert len(shown) == len(mode.keys)
        assert str(app.ref_box.cget("state")) == ("normal" if mode.ref_field else "disabled")


# ---------------------------------------------------------------- the script

def test_script_without_a_display_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    proc = subprocess.run([sys.executable, str(ROOT / "vital_gui.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot open a window") and "display" in proc.stderr


# Run vital_gui.py as __main__; once its window is up and has loaded its model's classes (in a
# background thread), report it and press the window manager's close button (the
# WM_DELETE_WINDOW protocol), as a user closing the window does.
_CLOSE_WHEN_READY = """
import runpy, sys, time, tkinter
from vital.app import forms, gui
CLOSE_NOW = sys.argv[3] == "now"   # close while the model is still loading
apps, made = [], gui.VitalApp.__init__
def remember(self, *args, **kwargs):
    made(self, *args, **kwargs)
    apps.append(self)
gui.VitalApp.__init__ = remember
deadline = time.monotonic() + 120
def close_when_ready(root):
    app = apps[0] if apps else None
    ready = app is not None and root.winfo_ismapped() and (CLOSE_NOW or isinstance(
        app.infos.get(app.model.get()), forms.ModelInfo))
    if not ready and time.monotonic() < deadline:
        root.after(50, close_when_ready, root)
        return
    print("window:", root.title(), "| model:", app.model_note.get() if app else None, flush=True)
    root.tk.call(root.protocol("WM_DELETE_WINDOW"))
init = tkinter.Tk.__init__
def opened(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.after(50, close_when_ready, self)
tkinter.Tk.__init__ = opened
if CLOSE_NOW:
    def slow_info(spec, real=forms.model_info):
        time.sleep(2)
        info = real(spec)
        print("model loaded", flush=True)
        return info
    forms.model_info = slow_info
sys.argv = [sys.argv[1], "--out_dir", sys.argv[2]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_script_opens_the_window_and_exits_when_it_is_closed(display, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CLOSE_WHEN_READY, str(ROOT / "vital_gui.py"),
                           str(tmp_path / "out"), "ready"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("window: VITAL") and "1000 classes" in proc.stdout, proc.stdout


def test_closing_while_the_model_loads_waits_for_it_and_exits_cleanly(display, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CLOSE_WHEN_READY, str(ROOT / "vital_gui.py"),
                           str(tmp_path / "out"), "now"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]          # was 134 (abort) before
    first, second = proc.stdout.splitlines()[:2]
    assert "loading" in first and second == "model loaded", proc.stdout   # closed, then waited


def test_open_atlas_opens_the_site_page_or_says_why_not(make_app, tmp_path, monkeypatch):
    """The window opens a finished atlas (atlas.py's site, or the newest one in out_atlas) in
    the web browser; a folder without one gets a sentence."""
    import webbrowser
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    app = make_app()
    older, newer = tmp_path / "out_atlas" / "a", tmp_path / "out_atlas" / "b"
    for site in (older, newer):
        site.mkdir(parents=True)
        (site / "atlas.json").write_text("{}")
        (site / "index.html").write_text("<html></html>")
        time.sleep(0.05)
    assert app.open_atlas(str(older)) == str(older / "index.html")
    assert app.open_atlas(str(tmp_path / "out_atlas")) == str(newer / "index.html")
    assert opened == [(older / "index.html").as_uri(), (newer / "index.html").as_uri()]
    assert app.open_atlas(str(tmp_path)) is None
    assert "holds no atlas" in app.message.get() and len(opened) == 2
    assert "atlas" in app.buttons
