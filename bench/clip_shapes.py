"""CLIP architectures with random weights for the benchmarks (no pretrained CLIP is reachable
here), shared by bench/speed.py and bench/effects.py."""
from __future__ import annotations

from pathlib import Path

import torch


def random_vit_b32(path: Path) -> Path:
    """A ViT-B/32-shaped CLIP (random weights) as OpenAI-layout safetensors, built by open_clip."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=12, width=768, patch_size=32, image_size=224)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = CLIP(512, vision, text, quick_gelu=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
