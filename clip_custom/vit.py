"""CLIP's Vision Transformer image tower (OpenAI layout, batch-first tokens (B, 1+N, D))."""
import torch
from torch import nn

from .layers import LayerNorm, Transformer
from .posembed import resize_grid_embedding


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, quick_gelu: bool = True):
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.output_dim = output_dim
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.embed = nn.Identity()  # hook point: cls + patches + positions, (B, 1+N, D)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> token sequence with positions (B, 1+gh*gw, D)."""
        x = self.conv1(x)  # (B, D, gh, gw)
        grid_hw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, gh*gw, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (D,) -> (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1+gh*gw, D), class token first
        pos = resize_grid_embedding(self.positional_embedding, grid_hw)  # (1+gh*gw, D)
        return self.embed(x + pos.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.ln_pre(self.tokens(x)))  # (B, 1+N, D)
        x = self.ln_post(x[:, 0, :])  # class token, (B, D)
        return x @ self.proj  # (B, E)
