"""Shared fixtures: tiny random models, tiny reference folders, an isolated cache."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image


class TinyCNN(nn.Module):
    """A 3-stage random CNN classifier with 10 classes (fast on CPU at 32-64 px)."""

    input_size = 48   # read by load_target for user modules

    def __init__(self, classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.class_names = [f"class{i}" for i in range(classes)]
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


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


def write_images(folder, n, size=40, seed=0):
    """``n`` random-but-structured RGB PNGs (smooth blobs) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k in range(n):
        c = rng.uniform(0, 1, (3, 1, 1))
        img = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy))
        arr = (np.clip(img[None] * c, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(arr).save(folder / f"img_{k:02d}.png")
    return folder


@pytest.fixture
def ref_folder(tmp_path):
    return write_images(tmp_path / "refs", 4)


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory):
    """A tiny random CLIP ViT (patch 8 at 32 px, 2 blocks) with the real 49,408-token vocabulary
    and 77-token context, saved in OpenAI layout as .safetensors."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = CLIP(32, vision, text, quick_gelu=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("clip") / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
