"""ViT extras for CLIP ViT targets: attention gradient steering and the spatial neural field.

Attention steering. The class token of the last block(s) builds the image embedding by reading
the patches; its attention row ``probs[:, :, 0, 1:]`` (hooked at ``block.{i}.attn``, renormalised
over the N patches) says where it reads. Two loss terms act on that row, and their gradients
flow through the attention softmax (queries and keys) back into the image, so they shape the
spatial composition rather than the pixel statistics:

- ``attn_entropy:block.{i}`` = ((H - H*) / log N)^2, H the entropy of the row (mean over heads),
  H* = ``attn_entropy_target`` x log N. A target below the current entropy makes the class token
  read from fewer patches (one compact object instead of fragments spread everywhere); a
  target above it spreads the reading out.
- ``attn_spatial:block.{i}`` = (cross-entropy of the row with a prior map q, minus its lowest
  possible value) / log N. Centre prior (a Gaussian of std ``attn_centre_sigma`` x the image side):
  the attention-weighted squared distance of the attended patches from the centre, so the
  object the class token reads moves to the middle. Mask image: q is the mask (white = wanted)
  averaged onto the patch grid, so the term is (nearly) the attention mass outside the mask.

Both are on by default for CLIP ViTs (``target.kind == "clip-vit"``) and ignored for other
models; a weight of 0 or ``--no-attn_steering`` switches them off.

Neural field (``vital.optvis.neural_field``): with ``--neural_field`` a position-locked artefact G(p) is
fitted per matched token layer on shifted views of the reference images and subtracted from the
patch tokens of the references *and* of the synthetic image before sort matching. Both sides:
the network adds G to every input, so removing it from the references only would make the
optimiser fight a pattern the image cannot change; removed from both, sort matching compares
what the tokens say about the content.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vital.config import ConfigError, opt
from vital.modes.setup import reference_sizes
from vital.optvis.attention import PriorMaps, attn_entropy_objective, attn_spatial_objective
from vital.optvis.losses import Objective
from vital.refs import fields as field_refs

SPATIAL_CHOICES = ("none", "centre", "center")


@dataclass
class ViTExtrasCFG:
    """CLIP ViT extras (mixed into a mode's CFG; see the module docstring)."""
    attn_steering: bool = opt(True, "CLIP ViT: steer the class token's attention (entropy and "
                              "spatial prior); ignored for other models")
    attn_layers: list[int] = opt([-1], "blocks whose class-token attention is steered "
                                 "(negative = from the end; -1 = the last block)")
    attn_entropy_weight: float = opt(1.0, "weight of the attention-entropy term (0 = off)")
    attn_entropy_target: float = opt(0.75, "target entropy of the class token's attention over "
                                     "the patches, as a fraction of log(patches)")
    attn_spatial_prior: str = opt("centre", "none | centre | path of a mask image (white = "
                                  "where the class token should look)")
    attn_spatial_weight: float = opt(1.0, "weight of the spatial attention prior (0 = off)")
    attn_centre_sigma: float = opt(0.3, "std of the centre prior as a fraction of the image side")
    neural_field: bool = opt(False, "CLIP ViT: remove position-locked artefacts (a neural field "
                             "fitted on the references) from the matched tokens")
    field_steps: int = opt(300, "Adam steps of the neural-field fit")
    field_views: int = opt(4, "shifted / flipped views per reference image for the field fit")


# ---------------------------------------------------------------- settings -> terms

def steered_layers(blocks: list[int], n_blocks: int) -> list[str]:
    """Block indices (negative from the end) -> ``block.{i}.attn`` names, checked."""
    names = []
    for b in blocks:
        if not -n_blocks <= b < n_blocks:
            raise ConfigError(f"attn_layers {b} is outside this ViT's {n_blocks} blocks "
                              f"(valid: 0..{n_blocks - 1} or -{n_blocks}..-1)")
        names.append(f"block.{b % n_blocks}.attn")
    return list(dict.fromkeys(names))


def load_mask(path: str) -> torch.Tensor:
    """A mask image as (h, w) in [0, 1] (grey levels; white = where to look)."""
    from PIL import Image
    if not Path(path).is_file():
        raise ConfigError(f"attn_spatial_prior {path!r} is neither {' | '.join(SPATIAL_CHOICES)} "
                          f"nor an image file")
    with Image.open(path) as img:
        gray = img.convert("L")
        data = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8)
        return data.view(gray.height, gray.width).float() / 255.0


def spatial_priors(cfg) -> PriorMaps | None:
    choice = str(cfg.attn_spatial_prior).strip()
    if choice.lower() == "none" or not cfg.attn_spatial_weight:
        return None
    if choice.lower() in ("centre", "center"):
        if not 0 < cfg.attn_centre_sigma:
            raise ConfigError(f"attn_centre_sigma must be > 0, got {cfg.attn_centre_sigma}")
        return PriorMaps("centre", sigma=cfg.attn_centre_sigma)
    mask = load_mask(choice)
    if mask.sum() <= 0:
        raise ConfigError(f"mask {choice} is black everywhere; white marks where to look")
    return PriorMaps("mask", mask=mask)


def attention_steering(cfg, target) -> tuple[Objective | int, list[str], dict]:
    """(objective or 0, attention layers to hook, metadata) for ``cfg``'s steering settings."""
    if target.kind != "clip-vit":
        return 0, [], {"active": False, "reason": f"{target.kind} model (CLIP ViTs only)"}
    if not cfg.attn_steering:
        return 0, [], {"active": False, "reason": "switched off (--no-attn_steering)"}
    if not 0 <= cfg.attn_entropy_target <= 1:
        raise ConfigError(f"attn_entropy_target is a fraction of log(patches), 0..1; "
                          f"got {cfg.attn_entropy_target}")
    layers = steered_layers(list(cfg.attn_layers), len(target.module.transformer.resblocks))
    priors = spatial_priors(cfg)
    obj = 0
    for layer in layers:
        obj = obj + attn_entropy_objective(layer, cfg.attn_entropy_target, cfg.attn_entropy_weight)
        if priors is not None:
            obj = obj + attn_spatial_objective(layer, priors, cfg.attn_spatial_weight)
    if not isinstance(obj, Objective) or not obj.names:
        return 0, [], {"active": False, "reason": "every attention weight is 0"}
    meta = {"active": True, "layers": layers, "terms": obj.weights,
            "entropy_target": cfg.attn_entropy_target,
            "spatial_prior": "none" if priors is None else priors.kind}
    return obj, layers, meta


def field_reference_objective(cfg, target, layers, weights, files, sizes, num) -> tuple:
    """``--neural_field``: sort matching with the field removed from both sides;
    (objective, info per stage, metadata with ``ref_sizes`` and ``neural_field``)."""
    ref_px = reference_sizes(cfg, target, sizes)
    obj, info, field_meta = field_refs.field_objective(cfg, target, layers, weights, files,
                                                       ref_px, num)
    return obj, info, {"ref_sizes": {str(s): px for s, px in ref_px.items()},
                       "neural_field": field_meta}
