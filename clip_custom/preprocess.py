"""OpenAI CLIP preprocessing: bicubic resize of the short side, centre crop, RGB, CLIP mean/std.

`transform(n_px)` is the PIL pipeline (identical to OpenAI's); `preprocess_tensor` is a
differentiable tensor version for optimisation (float math instead of PIL's uint8 rounding, so it
agrees with the PIL pipeline up to about one grey level).
"""
import torch
import torch.nn.functional as F
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    return image.convert("RGB")


def transform(n_px: int) -> Compose:
    """PIL image -> normalised float tensor (3, n_px, n_px)."""
    return Compose([
        Resize(n_px, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(n_px),
        _to_rgb,
        ToTensor(),
        Normalize(CLIP_MEAN, CLIP_STD),
    ])


def _short_side_size(h: int, w: int, n_px: int) -> tuple[int, int]:
    # torchvision's rule for Resize(int): short side -> n_px, long side truncated
    if h <= w:
        return n_px, int(n_px * w / h)
    return int(n_px * h / w), n_px


def _center_crop(x: torch.Tensor, n_px: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - n_px) / 2.0)), int(round((w - n_px) / 2.0))
    return x[..., top:top + n_px, left:left + n_px]


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def preprocess_tensor(x01: torch.Tensor, n_px: int) -> torch.Tensor:
    """Differentiable: (B, 3, H, W) in [0, 1] -> (B, 3, n_px, n_px) normalised.

    Bicubic with antialiasing (PIL-like when shrinking); no clamping, so gradients never vanish.
    """
    h, w = x01.shape[-2:]
    size = _short_side_size(h, w, n_px)
    if size != (h, w):
        x01 = F.interpolate(x01, size=size, mode="bicubic", align_corners=False, antialias=True)
    return normalize(_center_crop(x01, n_px))
