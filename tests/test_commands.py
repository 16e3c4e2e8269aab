"""The installed commands (issue 23): every root script runs its command of ``vital.commands``,
every command is a ``[project.scripts]`` entry, and a wheel built from the project, installed
into a fresh venv, gives commands that work from a folder outside the checkout (the presets and
the prompts file ship inside the package).

The wheel test builds and installs without a network: ``--no-build-isolation`` uses this
environment's setuptools, and the fresh venv sees this environment's dependencies (torch ...)
through a ``.pth`` line, while ``vital`` itself comes only from the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from vital.commands import COMMANDS, by_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"vital-layers": "query_model_layers.py", "vital-gui": "vital_gui.py",
           "vital-references": "scripts/build_references.py",
           **{c.name: c.script for c in COMMANDS.values()}}


def project_scripts() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_script_is_an_installed_command():
    entries = project_scripts()
    for name, script in SCRIPTS.items():
        function = name.replace("-", "_")
        assert entries[name] == f"vital.commands:{function}", name
        text = (ROOT / script).read_text()
        assert f"from vital.commands import {function}" in text, script
        assert f"sys.exit({function}())" in text, script
    assert set(entries) - set(SCRIPTS) == {"vital-evaluate"}
    assert entries["vital-evaluate"] == entries["vital-eval"]


def test_commands_load_and_help(capsys):
    """Each command's CFG and run function import; ``--help`` exits 0 with the command's line."""
    for command in COMMANDS.values():
        cfg_cls, run_fn = command.load()
        assert isinstance(cfg_cls, type) and callable(run_fn)
        with pytest.raises(SystemExit) as stop:
            command(["--help"])
        assert stop.value.code == 0
        assert command.about.split(".")[0] in " ".join(capsys.readouterr().out.split())
    assert by_script("evaluate_fvis.py").name == "vital-eval"
    with pytest.raises(KeyError, match="no command runs"):
        by_script("nothing.py")


def test_presets_resolve_from_another_folder(tmp_path, monkeypatch):
    """``presets/...`` and the default prompts file are found inside the package from a folder
    that has neither."""
    from vital.config import packaged, load_json_cfg
    from vital.models.opinion import read_prompts
    from vital.modes.class_batch import ClassBatchCFG
    monkeypatch.chdir(tmp_path)
    assert packaged("presets/quickstart_efficientnet.json").is_file()
    assert load_json_cfg(ClassBatchCFG, "presets/quickstart_efficientnet.json")["target"]
    assert read_prompts("input_prompts/prompts.txt")
    assert packaged("elsewhere/x.json") == Path("elsewhere/x.json")   # not package data
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "quickstart_efficientnet.json").write_text("{}")
    assert packaged("presets/quickstart_efficientnet.json") == \
        Path("presets/quickstart_efficientnet.json")   # the user's own file comes first


def _copy_project(dest: Path) -> Path:
    """What a wheel is built from, without build leftovers in the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("vital", "clip_custom"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def _run(*cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project's wheel installed (no network): its bin folder."""
    work = tmp_path_factory.mktemp("wheel")
    src = _copy_project(work / "src")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", work / "dist", src, cwd=work)
    wheel = next((work / "dist").glob("vital_toolkit-*.whl"))
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    site = next((venv / "lib").glob("python*/site-packages"))
    # the dependencies (torch ...) from this environment; its own `vital` is not a dependency
    # and is not seen: a path line in a .pth adds the folder, not that folder's .pth files
    (site / "_deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
         "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=work)
    return venv / "bin"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_wheel_commands_from_another_folder(installed, tmp_path):
    """``vital-class --help`` from a folder outside the checkout, with ``vital`` from the wheel;
    a preset resolves from inside the package; every entry point is installed."""
    assert sorted(p.name for p in installed.glob("vital-*")) == sorted(project_scripts())
    where = _run(installed / "python", "-c", "import vital; print(vital.__file__)",
                 cwd=tmp_path, env=_env()).stdout.strip()
    assert str(ROOT) not in where and str(installed.parent) in where
    out = _run(installed / "vital-class", "--help", cwd=tmp_path, env=_env()).stdout
    assert "usage: vital-class" in out and "--recipe" in out
    _run(installed / "vital-class", "--json_cfg", "presets/quickstart_efficientnet.json",
         "--dump_cfg", "cfg.json", cwd=tmp_path, env=_env())
    assert json.loads((tmp_path / "cfg.json").read_text())["target"] == "espresso"


@pytest.mark.slow
def test_wheel_every_command_help(installed, tmp_path):
    """Every installed command answers ``--help`` (the GUI without opening a window); bad input
    is one sentence and status 2."""
    for name in project_scripts():
        out = _run(installed / name, "--help", cwd=tmp_path, env=_env()).stdout
        assert "usage:" in out, name
    bad = subprocess.run([str(installed / "vital-class"), "--steps", "-3"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--steps" in bad.stderr
