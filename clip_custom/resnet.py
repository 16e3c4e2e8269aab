"""CLIP's ModifiedResNet image tower (OpenAI layout).

Differences from torchvision's ResNet, as in OpenAI CLIP: a 3-conv stem with an average pool,
anti-aliased strided blocks (an average pool before the last conv and in the shortcut), and an
attention pool instead of global average pooling. Feature maps are (B, C, H, W).
"""
from collections import OrderedDict

import torch
from torch import nn

from .attention import HookedAttention, merge_heads, split_heads
from .posembed import resize_grid_embedding

EXPANSION = 4  # bottleneck output channels = planes * EXPANSION
TOTAL_STRIDE = 32  # input pixels per cell of the final feature map


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1):
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(cout)


def _shortcut(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    # module names "-1", "0", "1" are the OpenAI state-dict keys
    return nn.Sequential(OrderedDict([
        ("-1", nn.AvgPool2d(stride)),
        ("0", nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=1, bias=False)),
        ("1", nn.BatchNorm2d(planes * EXPANSION)),
    ]))


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(inplanes, planes, 1)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.relu2 = nn.ReLU(inplace=False)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = _conv_bn(planes, planes * EXPANSION, 1)
        self.relu3 = nn.ReLU(inplace=False)
        needs_shortcut = stride > 1 or inplanes != planes * EXPANSION
        self.downsample = _shortcut(inplanes, planes, stride) if needs_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(HookedAttention):
    """One query (the mean of all positions) attends over the mean and every position.

    Hook points `logits` / `probs` are (B, H, 1, 1+HW).
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(
            torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid_hw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+HW, C), mean first
        x = x + resize_grid_embedding(self.positional_embedding, grid_hw).to(x.dtype)
        q = split_heads(self.q_proj(x[:, :1]), self.num_heads)  # (B, H, 1, C/H)
        k = split_heads(self.k_proj(x), self.num_heads)  # (B, H, 1+HW, C/H)
        v = split_heads(self.v_proj(x), self.num_heads)
        out = merge_heads(self.attend(q, k, v))  # (B, 1, C)
        return self.c_proj(out[:, 0])  # (B, E)


class ModifiedResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int,
                 input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        # the 3-conv stem, modules named as in OpenAI's state dicts
        self.conv1, self.bn1 = _conv_bn(3, width // 2, 3, stride=2)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2, self.bn2 = _conv_bn(width // 2, width // 2, 3)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3, self.bn3 = _conv_bn(width // 2, width, 3)
        self.relu3 = nn.ReLU(inplace=False)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 8 * EXPANSION
        self.attnpool = AttentionPool2d(input_resolution // TOTAL_STRIDE, embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * EXPANSION
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)  # (B, width, H/4, W/4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.to(self.conv1.weight.dtype))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32*width, H/32, W/32)
        return self.attnpool(x)
