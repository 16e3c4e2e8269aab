"""CLIP architectures with random weights for the benchmarks (no pretrained CLIP is reachable
here), shared by bench/speed.py, bench/effects.py and bench/batch_speed.py."""
from __future__ import annotations

from pathlib import Path

import torch


def random_vit(path: Path, patch: int = 32) -> Path:
    """A ViT-B/<patch>-shaped CLIP (random weights; vision width 768, 12 layers, 224 px; a tiny
    text tower) as OpenAI-layout safetensors, built by open_clip."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=12, width=768, patch_size=patch, image_size=224)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = CLIP(512, vision, text, quick_gelu=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def random_vit_b32(path: Path) -> Path:
    """A ViT-B/32-shaped CLIP with random weights (see ``random_vit``)."""
    return random_vit(path, 32)


def model_spec(name: str, work: Path) -> str:
    """``vit-b32`` / ``vit-b16`` -> a random-weight file in ``work``; anything else as given."""
    if name in ("vit-b32", "vit-b16"):
        path = Path(work) / f"{name}_random.safetensors"
        return str(path if path.is_file() else random_vit(path, int(name[-2:])))
    return name
