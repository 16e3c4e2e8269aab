"""Shared test helpers, imported explicitly (``from helpers import ...``; pytest puts tests/ on
sys.path): a tiny random CNN and its model spec, structured reference images, one builder of
tiny random CLIPs of the real architectures, PNG content checks, and running a script of the
project end to end in a fresh interpreter. Fixtures built from these live in conftest.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# The spec ``load_target`` resolves to TinyCNN, in this process and in a script started with
# ``python ROOT/<script>.py`` (its folder, ROOT, is on sys.path, so ``tests.helpers`` imports).
TINY_CNN = "module:tests.helpers:TinyCNN"
TINY_CNN_DIR = "module_tests.helpers_TinyCNN"   # its folder name under a sweep's out_dir


# ---------------------------------------------------------------- a tiny CNN and images

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


def write_images(folder: Path, n: int, size: int = 40, seed: int = 0) -> Path:
    """``n`` random-but-structured RGB PNGs (smooth colour waves) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k in range(n):
        c = rng.uniform(0, 1, (3, 1, 1))
        img = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy))
        arr = (np.clip(img[None] * c, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(arr).save(folder / f"img_{k:02d}.png")
    return folder


# ---------------------------------------------------------------- tiny CLIPs

VOCAB = 49408    # the real BPE vocabulary, so real prompts and words tokenize
CONTEXT = 77
EMBED = 32
HEAD_WIDTH = 64  # OpenAI's attention head width, which clip_custom.build_model assumes


def tiny_clip_cfg(vision: str = "vit", *, width: int = 64, layers: int = 2, patch: int = 8,
                  image: int = 32, embed: int = EMBED, text_width: int = 64, text_layers: int = 1,
                  vocab: int = VOCAB, context: int = CONTEXT) -> dict:
    """An open_clip ``model_cfg`` (the layout of open_clip_config.json) of a narrowed CLIP.

    ``vision``: "vit" (``layers`` blocks of ``width``, ``patch`` px patches at ``image`` px) or
    "resnet" (ModifiedResNet with one block per stage, stem ``width``, at ``image`` px)."""
    if vision == "vit":
        vision_cfg = {"layers": layers, "width": width, "patch_size": patch, "image_size": image}
    elif vision == "resnet":
        vision_cfg = {"layers": [1, 1, 1, 1], "width": width, "image_size": image}
    else:
        raise ValueError(f"vision must be vit or resnet, got {vision!r}")
    text_cfg = {"context_length": context, "vocab_size": vocab, "width": text_width,
                "heads": max(1, text_width // HEAD_WIDTH), "layers": text_layers}
    return {"embed_dim": embed, "quick_gelu": True, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def open_clip_model(model_cfg: dict) -> nn.Module:
    """open_clip's CLIP (our peer implementation) built from a ``model_cfg`` dict."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    vision = dict(model_cfg["vision_cfg"])
    if isinstance(vision.get("layers"), list):
        vision["layers"] = tuple(vision["layers"])
    return CLIP(model_cfg["embed_dim"], CLIPVisionCfg(**vision),
                CLIPTextCfg(**model_cfg["text_cfg"]), quick_gelu=model_cfg.get("quick_gelu", False))


def perturb(model: nn.Module, scale: float, seed: int) -> nn.Module:
    """Move every weight off its init (zero biases, unit norms) and give BatchNorm real statistics:
    freshly initialised, every image of a tiny CLIP embeds within cosine 0.999 of every other."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def tiny_clip(vision: str = "vit", *, scale: float = 0.1, seed: int = 0, **cfg) -> nn.Module:
    """A tiny random open_clip CLIP (OpenAI state-dict layout); ``cfg`` as ``tiny_clip_cfg``,
    ``scale`` the standard deviation of the noise added to every weight (see ``perturb``)."""
    torch.manual_seed(seed)
    return perturb(open_clip_model(tiny_clip_cfg(vision, **cfg)), scale, seed)


def save_safetensors(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def tiny_clip_file(path: Path, vision: str = "vit", **kw) -> Path:
    """``tiny_clip(vision, **kw)`` saved as ``path`` (.safetensors), loadable by load_target."""
    return save_safetensors(tiny_clip(vision, **kw), path)


def random_tokens(n: int, vocab: int, context: int, seed: int = 0) -> torch.Tensor:
    """(n, context) ids like a tokenizer's: body ids < end id (the highest), then zero padding."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab - 1, (n, context), generator=gen)
    ends = torch.randint(1, context, (n,), generator=gen)
    for i, end in enumerate(ends.tolist()):
        tokens[i, end] = vocab - 1
        tokens[i, end + 1:] = 0
    return tokens


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- PNG content

def read_png(path: Path) -> np.ndarray:
    """The PNG as (H, W, 3) uint8; fails if it does not decode."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def assert_png_shows(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The PNG decodes, has ``size`` (W, H) if given, and is not one flat colour."""
    pixels = read_png(path)
    if size is not None:
        assert (pixels.shape[1], pixels.shape[0]) == tuple(size), (path, pixels.shape)
    assert (pixels.max((0, 1)) > pixels.min((0, 1))).any(), f"{path} is one flat colour"
    return pixels


def assert_png_equals(path: Path, image: torch.Tensor) -> None:
    """The PNG holds ``image`` ((3, H, W) or (1, 3, H, W) in [0, 1]) quantised to 8 bits (to
    within one level: the writer may round halves either way) and is not one flat colour."""
    image = image[0] if image.dim() == 4 else image
    expected = (image.detach().float().clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    pixels = assert_png_shows(path, (image.shape[-1], image.shape[-2])).astype(np.float32)
    assert np.abs(pixels - expected).max() <= 1.0, f"{path} is not the returned image"


# ---------------------------------------------------------------- hooks

def hooks_left(module: nn.Module) -> int:
    """Forward hooks and pre-hooks still registered anywhere in ``module``. torch has no public
    listing of hooks, so this reads its registries (torch's own attributes, not ours)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ---------------------------------------------------------------- scripts

def run_script(script: str, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ROOT/<script> args`` in a fresh interpreter, as a user runs it; fails the test
    with the script's stderr unless it exits 0."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def isolated_workdir(tmp_path, monkeypatch, extra_path=None):
    """Body of a test file's autouse fixture (``yield from isolated_workdir(...)``): run in a
    fresh folder (out_<mode>/ go there), optionally with ``extra_path`` first on sys.path, and
    undo --hard_determinism (deterministic algorithms, thread count) afterwards."""
    import sys
    monkeypatch.chdir(tmp_path)
    if extra_path is not None:   # not syspath_prepend, whose undo imports pkg_resources
        monkeypatch.setattr(sys, "path", [str(extra_path), *sys.path])
    threads = torch.get_num_threads()
    yield tmp_path
    if torch.are_deterministic_algorithms_enabled():   # the first call of the setter costs ~9 s
        torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)
