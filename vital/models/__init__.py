"""Target models: loading any model spec as a TargetModel, the embedded EfficientNet-Lite,
class names, templates and CLIP text targets, and the live opinion."""
from vital.models.loaders import load_target
from vital.models.target import LAYOUTS, VIT_LAYER_DOC, LayerInfo, TargetModel, channels_positions, \
    imagenet_classes

__all__ = ["load_target", "TargetModel", "LayerInfo", "channels_positions", "imagenet_classes",
           "LAYOUTS", "VIT_LAYER_DOC"]
