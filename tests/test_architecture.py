"""The house plan, checked: import-linter's contracts in pyproject.toml (floors, no circles, no
library module importing a mode; clip_custom never imports the toolkit), and no module using
another module's private names; ruff ([tool.ruff]) finds no error."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("vital/**/*.py"), *ROOT.glob("clip_custom/*.py"),
                  *ROOT.glob("*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("bench/*.py")])


def test_import_contracts_hold():
    linter = Path(sys.executable).with_name("lint-imports")
    if not linter.exists():
        pytest.skip("import-linter is not installed (pip install -e .[dev])")
    out = subprocess.run([str(linter), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def _ruff(*paths) -> subprocess.CompletedProcess:
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    return subprocess.run([str(ruff), "check", "--no-cache", "--config",
                           str(ROOT / "pyproject.toml"), *map(str, paths)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    out = _ruff(".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_sees_an_unused_import_and_an_undefined_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    out = _ruff(bad)
    assert out.returncode == 1
    assert "F401" in out.stdout and "F821" in out.stdout


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _private_uses(path: Path) -> list[str]:
    """``from our.module import _name`` and ``alias._name`` where alias is one of our modules."""
    tree = ast.parse(path.read_text(), str(path))
    ours, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in ("vital", "clip_custom"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                ours[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("vital", "clip_custom"):
                    ours[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in ours and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_checker_sees_a_private_import(tmp_path):
    bad = ROOT / "vital" / "_probe_private_use.py"
    try:
        bad.write_text("from vital.cache import _sidecar\nimport vital.cache as c\nc._sidecar\n")
        assert len(_private_uses(bad)) == 2
    finally:
        bad.unlink()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module_name(p))
def test_no_module_uses_another_modules_private_names(path):
    assert _private_uses(path) == []


def test_public_api_resolves_every_name():
    import vital
    for name in vital.__all__:
        assert getattr(vital, name) is not None, name
    with pytest.raises(AttributeError, match="public names"):
        _ = vital.no_such_name


def test_import_vital_from_another_folder_is_light(tmp_path):
    """``import vital`` loads no torch (the public names load on first use), from any folder."""
    code = ("import sys, vital, clip_custom; assert 'vital.modes' not in sys.modules; "
            "print(vital.run_class.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vital.modes.class_mode"


def test_a_run_of_a_non_clip_model_imports_neither_torchvision_nor_dynamo(tmp_path):
    """torchvision's import and torch.optim's first optimizer pull in torch._dynamo (~2 s each
    of every run's start-up): a whole class-mode run of the embedded model does without both
    (its metadata still names torchvision's version); CLIP's preprocessing still loads
    torchvision on first use."""
    from conftest import write_images
    write_images(tmp_path / "refs", 3, size=48)
    code = ("import sys; from vital.modes import class_mode; "
            "cfg = class_mode.ClassCFG(model='efficientnet-lite0', target='espresso', "
            "ref_dir='refs', num_ref=3, size=48, steps=2, save_steps=0, progress=False, "
            "out_dir='out', device='cpu'); run_dir, _ = class_mode.run_class(cfg); "
            "assert (run_dir / 'final.png').is_file(); "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'; "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'; "
            "import json; meta = json.loads((run_dir / 'config.json').read_text()); "
            "assert meta['versions']['torchvision']; "
            "import clip_custom; clip_custom.transform; assert 'torchvision' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr


def _cycles(package: str) -> list[str]:
    """Every import (even inside a function) from module A to module B of ``package`` where B
    leads back to A: a circle, on any floor (the layers contract sees only circles between
    floors)."""
    import grimp
    graph = grimp.build_graph(package, cache_dir=None)
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if graph.chain_exists(importer=imported, imported=importer):
                found.append(f"{importer} -> {imported}")
    return found


def test_no_module_imports_lead_back_to_it():
    assert _cycles("vital") == [] and _cycles("clip_custom") == []


def test_cycle_check_sees_a_circle_inside_one_folder(tmp_path, monkeypatch):
    pkg = tmp_path / "circle_pkg"
    (pkg / "floor").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "floor" / "__init__.py").write_text("")
    (pkg / "floor" / "a.py").write_text("def f():\n    from circle_pkg.floor import b\n")
    (pkg / "floor" / "b.py").write_text("from circle_pkg.floor.a import f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles("circle_pkg") == ["circle_pkg.floor.a -> circle_pkg.floor.b",
                                     "circle_pkg.floor.b -> circle_pkg.floor.a"]
