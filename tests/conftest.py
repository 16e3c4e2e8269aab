"""Shared fixtures: tiny random models, tiny reference folders, an isolated cache. The helpers
they are built from are in helpers.py."""
import os

import pytest

from helpers import ROOT

# Scripts, `python -c` children and installed commands started by the tests import this
# checkout's `vital` first, not another copy installed in the same environment.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

from helpers import TinyCNN, tiny_clip_file as build_tiny_clip_file, write_images


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own $VITAL_CACHE; nothing touches the user's cache."""
    cache = tmp_path / "vital-cache"
    monkeypatch.setenv("VITAL_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_cnn_target():
    from vital.models import load_target
    return load_target(TinyCNN())


@pytest.fixture
def ref_folder(tmp_path):
    return write_images(tmp_path / "refs", 4)


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory):
    """A tiny random CLIP ViT (patch 8 at 32 px, 2 blocks of width 64) with the real 49,408-token
    vocabulary and 77-token context, saved in OpenAI layout as .safetensors."""
    return build_tiny_clip_file(tmp_path_factory.mktemp("clip") / "tiny_vit.safetensors",
                                scale=0.05)
