"""Class neuron visualisation: sort matching to real images of the class, plus an optional class
term (classifier: log-probability; CLIP: cosine to the class text embedding averaged over the 80
ImageNet prompt templates, or to a free prompt). ``class_weight = 0`` is pure VITAL.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from vital.optvis import losses
from vital.modes import runner as pipeline
from vital.modes import vit_extras
from vital.config import ConfigError, opt
from vital.models.labels import clip_text_target
from vital.refs.images import list_images

@dataclass
class ClassCFG(vit_extras.ViTExtrasCFG, pipeline.RenderCFG):
    """Class neuron visualisation (VITAL)."""
    target: str = opt("espresso", "class name or index; for CLIP also a free prompt")
    ref_dir: str = opt("references/espresso", "folder of real images of the class")
    num_ref: int = opt(50, "reference images to use (fewer if fewer exist)")
    class_weight: float = opt(0.1, "weight of the class term (0 = pure VITAL)")


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


def run_class(cfg: ClassCFG, argv=None):
    """One class visualisation; returns (run_dir, result)."""
    device, target = pipeline.prepare(cfg)
    size = pipeline.image_size(cfg, target)
    layers, weights = pipeline.resolve_layers(cfg, target)
    schedule = pipeline.make_schedule(cfg)
    cls_obj, label, meta = class_term(cfg, target)
    meta.update(layers=layers, layer_weights=weights)
    steer_obj, steer_layers, meta["attn_steering"] = vit_extras.attention_steering(cfg, target)
    objective = cls_obj + pipeline.priors(cfg) + steer_obj
    if cfg.feat_weight:
        files = list_images(cfg.ref_dir)
        ref_obj, info, extras = vit_extras.reference_objective(
            cfg, target, layers, weights, files, schedule.stage_sizes(size), cfg.num_ref)
        objective = ref_obj + objective
        meta["references"] = {str(k): v for k, v in info.items()}
        meta.update(extras)  # ref_sizes, neural_field
    if not isinstance(objective, losses.Objective) or not objective.names:
        raise ConfigError("every weight is zero: nothing to optimise")
    gen = pipeline.generator_for(cfg, device)
    param = pipeline.make_param(cfg, size, device, gen, **_param_extras(cfg, size))
    name = f"{label}_{Path(str(target.spec)).name}_s{cfg.seed}".replace(" ", "-")
    hooked = layers + [layer for layer in steer_layers if layer not in layers]
    return pipeline.run(cfg, "class", target, objective, hooked, param, gen, name,
                        {"target_label": label, **meta}, argv=argv)


def _param_extras(cfg: ClassCFG, size: int) -> dict:
    """MACO keeps a natural-image amplitude spectrum fixed: that of the class's references."""
    if cfg.param != "maco":
        return {}
    return {"magnitude": pipeline.maco_magnitude(list_images(cfg.ref_dir), size, cfg.num_ref)}
