"""The official VITAL code's layers and layer weights per architecture (``--layers paper``).

The official code (``class_fvis/utils/opt_utils.py`` and ``config.py``) matches five layers:
the first convolution's raw output (ResNet ``conv1``, before its batch norm) and the four stage
outputs (``layer1..4``); for a ViT the patch embedding (``conv_proj``) and four blocks (ViT-B:
0/4/8/11, ViT-L: 2/9/20/23); torchvision DenseNets ``features.conv0`` + the four dense blocks,
ConvNeXts the stem (``features.0``), the downsampling convolutions ``features.2.1``, ``4.1``,
``6.1`` and the last block ``features.7.2``. Class-neuron weights are 1 except DenseNet (last x100), ConvNeXt
(first x10) and ViT-L/32 (last x0.1); inner neurons use [0.1, 1, 1, 1, 0] (only the layers
below the target take part). Architectures the paper does not cover get the same pattern:
the first convolution + the last four stage outputs of ``TargetModel.default_layers`` (for
EfficientNet-Lite0: ``stem.conv``, ``blocks.2``, ``blocks.4``, ``blocks.10``, ``blocks.15``,
the outputs at 112, 56, 28, 14 and 7 px like ResNet50's), weights 1.
"""
from __future__ import annotations

from torch import nn

INNER_WEIGHTS = [0.1, 1.0, 1.0, 1.0, 0.0]
_VIT_BLOCKS = {12: [0, 4, 8, 11], 24: [2, 9, 20, 23]}


def _vit_blocks(n: int) -> list[int]:
    """The paper's four blocks for 12 / 24 blocks; otherwise the same pattern, evenly spread."""
    if n in _VIT_BLOCKS:
        return _VIT_BLOCKS[n]
    return sorted({0, round(n / 3), round(2 * n / 3), n - 1})


def _first_conv(module: nn.Module) -> str:
    return next(path for path, m in module.named_modules() if isinstance(m, nn.Conv2d))


def _arch(target) -> str:
    names = {type(m).__name__ for m in target.module.modules()}
    if "DenseNet" in names:
        return "densenet"
    if "ConvNeXt" in names:
        return "convnext"
    return "cnn"


# torchvision DenseNet and ConvNeXt: the official code's return nodes, as module paths (its
# ConvNeXt "features.7.2.add" is the last block's residual sum, the output of features.7.2;
# "features.2.1" etc. are the downsampling convolutions that open stages 2-4)
_OFFICIAL_LAYERS = {
    "densenet": ["features.conv0", "features.denseblock1", "features.denseblock2",
                 "features.denseblock3", "features.denseblock4"],
    "convnext": ["features.0", "features.2.1", "features.4.1", "features.6.1", "features.7.2"],
}


def _cnn_layers(target, arch: str) -> list[str]:
    """The official layers of DenseNet / ConvNeXt, else the first convolution + the last four
    stage outputs."""
    known = {info.name for info in target.layers()}
    official = _OFFICIAL_LAYERS.get(arch)
    if official and all(name in known for name in official):
        return list(official)
    stages = [name for name in target.default_layers() if name != "stem"][-4:]
    return [_first_conv(target.module)] + stages


def paper_layers(target, mode: str = "class") -> tuple[list[str], list[float]]:
    """(layers, weights) of the official code for ``target``'s architecture; ``mode`` "class"
    or "inner" picks the weights."""
    if target.kind == "clip-vit":
        n = len(target.module.transformer.resblocks)
        layers = ["conv1"] + [f"block.{i}" for i in _vit_blocks(n)]
        weights = [1.0] * 5
        if n == 24 and target.patch_size == 32:
            weights[-1] = 0.1                       # ViT-L/32
    else:
        arch = _arch(target)
        layers = _cnn_layers(target, arch)
        weights = [1.0] * len(layers)
        if arch == "densenet":
            weights[-1] = 100.0
        elif arch == "convnext":
            weights[0] = 10.0
    if mode == "inner":
        weights = (INNER_WEIGHTS + [0.0] * len(layers))[:len(layers)]
    return layers, weights
