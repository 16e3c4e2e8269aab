"""Tiny random CLIPs of the real architectures, built by open_clip (our peer), for the clip tests.

Narrowed and shortened: ViT width 128 (two 64-wide heads, the OpenAI head width that build_model
assumes), 2 layers, patch 8 at 32 px; ModifiedResNet layers (1, 1, 1, 1), width 16 at 64 px;
text width 128, 2 layers, context 16, vocabulary 100.
"""
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

VOCAB = 100
CONTEXT = 16
EMBED = 32
HEAD_WIDTH = 64


def text_cfg(width: int = 128, layers: int = 2, context: int = CONTEXT) -> CLIPTextCfg:
    return CLIPTextCfg(context_length=context, vocab_size=VOCAB, width=width,
                       heads=width // HEAD_WIDTH, layers=layers)


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every weight off its init (zero biases, unit norms) and give BatchNorm real statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def open_clip_vit(width: int = 128, layers: int = 2, patch: int = 8, image: int = 32,
                  seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=image)
    return perturb(CLIP(EMBED, vision, text_cfg(), quick_gelu=True), seed)


def open_clip_resnet(width: int = 16, image: int = 64, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=width, image_size=image)
    return perturb(CLIP(EMBED, vision, text_cfg(), quick_gelu=True), seed)


def random_tokens(n: int, context: int = CONTEXT, seed: int = 0) -> torch.Tensor:
    """(n, context) ids like a tokenizer's: body ids < end id (the highest), then zero padding."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB - 1, (n, context), generator=gen)
    ends = torch.randint(1, context, (n,), generator=gen)
    for i, end in enumerate(ends.tolist()):
        tokens[i, end] = VOCAB - 1
        tokens[i, end + 1:] = 0
    return tokens


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
