"""neuron_effects.py with ``--visualise N``: a VITAL image of each of the N strongest neurons'
second-order direction, beside its top images and words.

The effects run (``vital.effects.run``) gives each neuron a unit component in the joint
image-text space and its top images. The visualisation is embedding steering as in the
arithmetic mode (``vital.modes.arithmetic``): the goal is

    t = unit( unit(mean_i e(top_i)) + beta * component )

(``target_embedding`` with the component as the one added term), the image starts from the
neuron's top image and is optimised toward ``t`` (1 - cosine, ``steering_objective``), while
sort matching against the top images' features at the shallow layers keeps it natural. This
module is a run of a mode, so it lives with the modes; the effects themselves stay on the floor
below.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vital.config import opt
from vital.effects.run import EffectsCFG, run_effects
from vital.imaging import grid, save_png, to_pil
from vital.modes import setup
from vital.modes.arithmetic import (ArithmeticCFG, embed_images, shallow_layers,
                                    steering_objective, target_embedding)
from vital.modes.runner import Plan, run_plan
from vital.optvis.losses import staged_sort_matching
from vital.refs.images import load_image, resize_images
from vital.refs.references import sorted_features

__all__ = ["NeuronEffectsCFG", "run_neuron_effects", "plan_neuron_visual"]

_TILE = 128


@dataclass
class NeuronEffectsCFG(EffectsCFG):
    """Second-order effects of CLIP neurons, optionally with VITAL visualisations."""
    visualise: int = opt(0, "render the N strongest neurons' second-order direction with VITAL "
                         "(steered embedding + sort matching to their top images)", low=0)
    vis_beta: float = opt(1.0, "weight of the neuron's component added to the top images' "
                          "mean embedding")
    vis_refs: int = opt(8, "top images of the neuron used as sort-matching references", low=1)
    vis_steps: list[int] = opt([100, 200], "steps per resolution stage of each visualisation",
                               low=1)
    vis_size: int = opt(0, "px of the visualisation (0 = the model's input size)", low=0)
    seed: int = opt(0, "random seed of the visualisations")


def _render_cfg(cfg: NeuronEffectsCFG, out_dir: Path, name: str) -> ArithmeticCFG:
    return ArithmeticCFG(model=cfg.model, device=cfg.device, size=cfg.vis_size,
                         steps_multires=list(cfg.vis_steps), seed=cfg.seed,
                         out_dir=str(out_dir), run_name=name, progress=cfg.progress,
                         save_steps=0, prompts_file="")


def plan_neuron_visual(rcfg: ArithmeticCFG, target, tops: torch.Tensor, component: torch.Tensor,
                       beta: float, name: str) -> Plan:
    """The plan of one neuron: ``tops`` (k, 3, S, S) its top images, best first."""
    size = setup.image_size(rcfg, target)
    layers = shallow_layers(target)
    schedule = setup.make_schedule(rcfg, target)
    base = embed_images(target, list(tops)).mean(0)
    goal = target_embedding(base, component[None].cpu(), add_beta=beta).to(target.device)
    refs = {s: sorted_features(target, layers, resize_images(tops, s), progress=False)
            for s in sorted(set(schedule.stage_sizes(size)))}
    objective = (rcfg.target_weight * steering_objective(goal)
                 + rcfg.feat_weight * staged_sort_matching(refs, {layer: 1.0 for layer in layers})
                 + setup.priors(rcfg))
    gen = setup.generator_for(rcfg, target.device)
    param = setup.make_param(rcfg, size, target.device, gen,
                              init=resize_images(tops[:1], size))
    meta = {"goal": "unit(unit(mean e(top images)) + beta * component)", "beta": beta,
            "layers": layers}
    return Plan("effects", target, objective, layers, param, schedule,
                setup.make_augment(rcfg), gen, name, meta, embed=True)


def _strip(render: torch.Tensor, tops: torch.Tensor, words: str, path: Path) -> None:
    tiles = [to_pil(render).resize((_TILE, _TILE), Image.BICUBIC)]
    tiles += [to_pil(t).resize((_TILE, _TILE), Image.BICUBIC) for t in tops[:4]]
    labels = ["VITAL"] + [f"top {i + 1}" for i in range(len(tiles) - 1)]
    save_png(grid(tiles, labels), path)
    path.with_suffix(".txt").write_text(words + "\n")


def visualise(cfg: NeuronEffectsCFG, run_dir: Path, result, argv=None) -> list[Path]:
    """VITAL images of the ``cfg.visualise`` strongest neurons (by mean top-k effect norm)."""
    target = result.target
    written = []
    for layer, summaries in result.summaries.items():
        strongest = sorted(summaries, key=lambda s: -s.top_norm_mean)[:cfg.visualise]
        decomps = result.words.get(layer)
        index = {s.neuron: j for j, s in enumerate(summaries)}
        for s in strongest:
            if float(s.component.norm()) == 0:
                continue   # the last block: no second-order direction
            name = f"block{layer}_neuron{s.neuron}"
            files = [result.files[i] for i in s.top_images[:cfg.vis_refs]]
            tops = torch.stack([load_image(f, target.input_size) for f in files])
            rcfg = _render_cfg(cfg, run_dir / "visuals", name)
            plan = plan_neuron_visual(rcfg, target, tops, s.component, cfg.vis_beta, name)
            vis_dir, render = run_plan(rcfg, plan, argv)
            words = ""
            if decomps:
                d = decomps[index[s.neuron]]
                words = f"cosine {d.cosine:.3f}: " + "; ".join(
                    f"{result.texts[i]} ({c:+.3f})" for i, c in d.terms)
            path = run_dir / "visuals" / f"{name}.png"
            _strip(render.image[:1].detach().cpu(), tops, words, path)
            written.append(path)
    return written


def run_neuron_effects(cfg: NeuronEffectsCFG, argv=None):
    """neuron_effects.py: the effects run, then ``--visualise`` renders; (run_dir, result)."""
    run_dir, result = run_effects(cfg, argv)
    if cfg.visualise and not result.stopped:
        result.visuals = visualise(cfg, run_dir, result, argv)
        print(f"wrote {len(result.visuals)} visualisations to {run_dir / 'visuals'}")
    return run_dir, result
