"""VITAL toolkit: feature visualisation by distribution alignment (sort matching) with real
images, weighted by relevance (Görgün, Schiele, Fischer, arXiv 2503.22399).

The public surface, importable as ``vital.<name>`` (loaded on first use, so ``import vital``
stays light):

    load_target, TargetModel                        a model spec -> a hookable model
    Objective, sort_matching_objectives, staged_sort_matching, tv_objective, l2_objective,
    class_logprob_objective, cosine_objective       loss terms that add and scale
    make_param, PARAMETERISATIONS                   image parameterisations -> (params, image_fn)
    standard_augment                                jitter / scale / flip / noise per step
    render, Schedule, RenderResult                  the optimisation loop
    reference_quantiles, list_images, load_images   reference sets
    Plan, run_plan, Callbacks                       one run as a value, and its runner
    ClassCFG, run_class, plan_class                 class mode   (class_neurons_fvis.py)
    ClassBatchCFG, run_class_batch, plan_class_batch  several class targets in one batch
    InnerCFG, run_inner                             inner neurons (inner_neurons_fvis.py)
    ArithmeticCFG, run_arithmetic                   embedding arithmetic
    ConceptCFG, run_concepts, FacetCFG, run_facets  concepts and facets

Example (the embedded EfficientNet-Lite0, offline)::

    import vital
    cfg = vital.ClassCFG(target="espresso", ref_dir="references/espresso", size=128, steps=100)
    run_dir, result = vital.run_class(cfg)
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "load_target": "vital.models.loaders", "TargetModel": "vital.models.target",
    "Objective": "vital.optvis.losses", "sort_matching_objectives": "vital.optvis.losses",
    "staged_sort_matching": "vital.optvis.losses", "tv_objective": "vital.optvis.losses",
    "l2_objective": "vital.optvis.losses", "class_logprob_objective": "vital.optvis.losses",
    "cosine_objective": "vital.optvis.losses",
    "make_param": "vital.optvis.param", "PARAMETERISATIONS": "vital.optvis.param",
    "standard_augment": ("vital.optvis.transforms", "standard"),
    "render": "vital.optvis.render", "Schedule": "vital.optvis.render",
    "RenderResult": "vital.optvis.render",
    "reference_quantiles": "vital.refs.references", "list_images": "vital.refs.images",
    "load_images": "vital.refs.images",
    "Plan": "vital.modes.runner", "run_plan": "vital.modes.runner",
    "Callbacks": "vital.modes.runner",
    "ClassCFG": "vital.modes.class_mode", "run_class": "vital.modes.class_mode",
    "plan_class": "vital.modes.class_mode",
    "ClassBatchCFG": "vital.modes.class_batch", "run_class_batch": "vital.modes.class_batch",
    "plan_class_batch": "vital.modes.class_batch",
    "InnerCFG": "vital.modes.inner", "run_inner": "vital.modes.inner",
    "ArithmeticCFG": "vital.modes.arithmetic", "run_arithmetic": "vital.modes.arithmetic",
    "ConceptCFG": "vital.modes.concepts", "run_concepts": "vital.modes.concepts",
    "FacetCFG": "vital.modes.facets", "run_facets": "vital.modes.facets",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """Import a public name on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vital' has no attribute {name!r}; public names: "
                             f"{', '.join(__all__)}")
    where = _PUBLIC[name]
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
