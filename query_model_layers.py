"""List a model's hook points: name, module type, output shape at its input size, channels.

    python query_model_layers.py --model efficientnet-lite0
    python query_model_layers.py --model ViT-B/32 --filter "block\\.11"
    python query_model_layers.py --model torchvision:resnet50 --json --size 160

Any model spec of ``vital.models.load_target`` works (see ``--model`` help). Shapes are for one
image (batch 1) at the model's native input size unless ``--size`` is given.
"""
import sys

from vital.commands import vital_layers   # installed as `vital-layers`

if __name__ == "__main__":
    sys.exit(vital_layers())
