"""Class neuron visualisation: sort matching to real images of the class, plus an optional class
term (classifier: log-probability; CLIP: cosine to the class text embedding averaged over the 80
ImageNet prompt templates, or to a free prompt). ``class_weight = 0`` is pure VITAL.

    run_class(cfg) = run_plan(cfg, plan_class(cfg, target))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch.nn.functional as F

from vital.config import ConfigError, opt
from vital.models.classnames import clip_text_target
from vital.modes import setup, recipes, vit_extras
from vital.modes.runner import Callbacks, Plan, prepare, run_plan
from vital.optvis import losses
from vital.optvis.relevance import RULES
from vital.refs.images import list_images, load_images


@dataclass
class ClassCFG(vit_extras.ViTExtrasCFG, setup.RenderCFG):
    """Class neuron visualisation (VITAL)."""
    RECIPES: ClassVar[dict] = recipes.CLASS_RECIPES
    recipe: str = opt("toolkit", "named defaults: paper (the official VITAL code's settings, "
                      "vital/modes/recipes.py) or toolkit; flags and --json_cfg override it",
                      choices=list(recipes.CLASS_RECIPES))
    # issue 27: 240 steps scored best of 60-600 on held-out photos (docs/budget.md)
    steps_multires: list[int] = opt([80, 160], "steps per resolution stage, low to high "
                                    "(each stage doubles the size, the last is full size)",
                                    low=1)
    pyramid_gain: float = opt(1.5, "Laplacian pyramid: level k (k = 0 finest) is scaled by "
                              "gain^k; 1.5 halved the held-out KID of class images against "
                              "1.0 (docs/recipes.md); < 1 makes coarse levels move slower",
                              positive=True)
    target: str = opt("espresso", "class name or index; for CLIP also a free prompt")
    ref_dir: str = opt("references/espresso", "folder of real images of the class")
    num_ref: int = opt(50, "reference images to use (fewer if fewer exist)", low=1)
    class_weight: float = opt(0.1, "weight of the class term (0 = pure VITAL)")
    relevance: str = opt("none", "relevance weighting of sort matching for the class (paper "
                         "B.2): lrp_paper, lrp, gradxact, guided, none", choices=list(RULES))
    relevance_floor: float = opt(0.0, "weight of an activation where its relevance is lowest "
                                 "(0 = the paper's plain min-max maps)", low=0, high=0.99)
    relevance_every: int = opt(1, "recompute the synthetic image's relevance every N steps",
                               low=1)


def class_term(cfg: ClassCFG, target) -> tuple[losses.Objective | int, str, dict]:
    """The class objective, a label for the run name and metadata."""
    if getattr(target, "clip", None) is not None:
        emb, label = clip_text_target(target, cfg.target)
        obj = losses.cosine_objective(emb.to(target.device), name=f"clip:{label}")
        return cfg.class_weight * obj, label, {"target_text": label}
    if not target.class_names:
        raise ConfigError(f"{target.spec} has no classes; use inner_neurons_fvis.py for "
                          f"neurons of a model without a classifier")
    index = target.class_index(cfg.target)
    label = target.class_names[index]
    return cfg.class_weight * losses.class_logprob_objective(index), label, {"class_index": index}


def class_score(cfg: ClassCFG, target) -> tuple[str, object]:
    """(layer, score function) of the class for relevance: a classifier's logit of the class
    at its head, or for CLIP the cosine of the image embedding with the class's text embedding
    (``ln_post`` features times ``proj``)."""
    if getattr(target, "clip", None) is not None:
        emb, _ = clip_text_target(target, cfg.target)
        proj = target.module.proj
        text = emb.to(target.device)

        def clip_score(feats):                      # (B, D, 1) ln_post features -> (B,)
            image = feats[..., 0] @ proj.to(feats)
            return F.cosine_similarity(image, text.to(image)[None], dim=-1)
        return "ln_post", clip_score
    head = target.head_name()
    if head is None:
        raise ConfigError(f"--relevance needs the class logit; {target.spec} has no classifier "
                          f"head")
    index = target.class_index(cfg.target)
    return head, lambda feats: feats[:, index, 0]   # (B, K, 1) logits -> (B,)


def _relevance_references(cfg: ClassCFG, target, layers, weights, files, sizes) -> tuple:
    """Relevance-weighted sort matching against the class's images (paper B.2)."""
    layer, score = class_score(cfg, target)
    native = target.input_size
    images, used = load_images(files, native, cfg.num_ref, getattr(cfg, "ref_crop", 1.0))
    obj, info, maps = setup.relevance_objective(cfg, target, layers, weights, images, sizes,
                                                 layer, score, cfg.relevance,
                                                 cfg.relevance_floor, cfg.relevance_every)
    return obj, {"references": {"files": [str(p) for p in used], "size": native,
                                "relevance": cfg.relevance, "layer": layer, **info}}, maps


def _references(cfg: ClassCFG, target, layers, weights, files, sizes) -> tuple:
    """(sort-matching objective, metadata, relevance maps or None) against the class's real
    images; a CLIP ViT with ``--neural_field`` removes the field from both sides."""
    if cfg.relevance != "none":
        return _relevance_references(cfg, target, layers, weights, files, sizes)
    vit = target.kind == "clip-vit"
    if vit and cfg.neural_field:
        obj, info, meta = vit_extras.field_reference_objective(cfg, target, layers, weights,
                                                               files, sizes, cfg.num_ref)
    else:
        obj, info, meta = setup.reference_objective(cfg, target, layers, weights, files, sizes,
                                                     cfg.num_ref)
        if vit:
            meta["neural_field"] = {"active": False}
    return obj, {"references": {str(k): v for k, v in info.items()}, **meta}, None


def plan_class(cfg: ClassCFG, target) -> Plan:
    """The class run as a value (see ``vital.modes.runner``)."""
    size = setup.image_size(cfg, target)
    layers, weights = setup.resolve_layers(cfg, target, mode="class")
    schedule = setup.make_schedule(cfg, target)
    cls_obj, label, meta = class_term(cfg, target)
    meta.update(layers=layers, layer_weights=weights)
    objective, hooked = cls_obj + setup.priors(cfg, target), list(layers)
    if target.kind == "clip-vit":
        steer, steer_layers, meta["attn_steering"] = vit_extras.attention_steering(cfg, target)
        objective = objective + steer
        hooked += [layer for layer in steer_layers if layer not in hooked]
    files = list_images(cfg.ref_dir) if cfg.feat_weight or cfg.param == "maco" else []
    maps = None
    if cfg.feat_weight:
        ref_obj, ref_meta, maps = _references(cfg, target, layers, weights, files,
                                              schedule.stage_sizes(size))
        objective = ref_obj + objective
        meta.update(ref_meta)
    if not isinstance(objective, losses.Objective) or not objective.names:
        raise ConfigError("every weight is zero: nothing to optimise")
    gen = setup.generator_for(cfg, target.device)
    extras = {"magnitude": setup.maco_magnitude(files, size, cfg.num_ref)} \
        if cfg.param == "maco" else {}   # MACO: the references' natural amplitude spectrum
    param = setup.make_param(cfg, size, target.device, gen, target=target, **extras)
    name = f"{label}_{Path(str(target.spec)).name}_s{cfg.seed}".replace(" ", "-")
    return Plan("class", target, objective, hooked, param, schedule, setup.make_augment(cfg),
                gen, name, {"target_label": label, "recipe": cfg.recipe, **meta},
                relevance_maps=maps)


def run_class(cfg: ClassCFG, argv=None, callbacks: Callbacks | None = None):
    """One class visualisation; returns (run_dir, result)."""
    _, target = prepare(cfg)
    return run_plan(cfg, plan_class(cfg, target), argv, callbacks)
