"""Several class targets in one batched optimisation (``class_neurons_fvis.py --targets A B``).

Each target is planned as its own class run (``plan_class``: its references, its class term,
its seed's generator for the start image and the augmentation); the batch puts the runs side
by side: element b is target b's image, its loss terms read only element b of the step's
context, its augmentation draws from its own generator, and the loss is the *sum* over the
elements. So element b gets exactly the gradient of its single run, Adam (element-wise)
takes the same step, and a batched run gives the images of the runs one by one up to the float
reduction order of the model's batched forward. One run folder per target, as one by one.

    run_class_batch(cfg) -> [(run_dir, result) per target]
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vital.config import ConfigError, make_run_dir, opt, run_metadata
from vital.models.opinion import make_opinion
from vital.modes.class_mode import ClassCFG, plan_class
from vital.modes.outputs import RunWriter
from vital.modes.runner import Plan, prepare
from vital.optvis.losses import Objective
from vital.optvis.render import RenderResult, render


@dataclass
class ClassBatchCFG(ClassCFG):
    """Class visualisation of one target (``--target``) or of several (``--targets``)."""
    targets: list[str] = opt([], "several classes, optimised together in batches: NAME "
                             "(references in --ref_root/NAME) or NAME=REF_DIR")
    ref_root: str = opt("references", "with --targets: parent folder of the per-class "
                        "reference folders")
    batch_size: int = opt(8, "with --targets: targets per batched optimisation (the rest in "
                          "further batches)", low=1)


def target_cfgs(cfg: ClassBatchCFG) -> list[ClassCFG]:
    """One ClassCFG per ``--targets`` entry: its target and reference folder."""
    out = []
    for entry in cfg.targets:
        name, _, ref_dir = str(entry).partition("=")
        if not name.strip():
            raise ConfigError(f"empty target in --targets entry {entry!r}")
        ref_dir = ref_dir.strip() or str(Path(cfg.ref_root) / name.strip())
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ClassCFG)}
        out.append(ClassCFG(**{**values, "target": name.strip(), "ref_dir": ref_dir}))
    names = [c.target for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"a target appears twice in --targets {names}")
    return out


# ---------------------------------------------------------------- the batched plan

def element_context(ctx: dict, b: int) -> dict:
    """The step's context as target b's single run sees it: every batched tensor cut to
    element b (image, input, output, embed, features), scalars as they are."""
    def cut(value):
        return value[b:b + 1] if torch.is_tensor(value) and value.dim() > 0 else value
    return {k: ({n: cut(t) for n, t in v.items()} if k == "features" else cut(v))
            for k, v in ctx.items()}


def _element_objective(plan: Plan, b: int) -> Objective:
    """Target b's whole loss on element b, as one term named after the target."""
    objective = plan.objective
    return Objective(lambda ctx: objective(element_context(ctx, b)),
                     f"{plan.meta['target_label']}[{b}]")


def _batched_augment(plans: list[Plan]):
    """Each element augmented by its own run's transform with its own generator."""
    augments = [p.augment for p in plans]

    def augment(x, generators):
        return torch.cat([x[b:b + 1] if aug is None else aug(x[b:b + 1], gen)
                          for b, (aug, gen) in enumerate(zip(augments, generators))])
    return augment


def _batched_param(plans: list[Plan]) -> tuple:
    """(every run's parameters, image_fn -> (B, 3, H, W) of the runs' images side by side)."""
    fns = [p.param[1] for p in plans]
    return [t for p in plans for t in p.param[0]], lambda: torch.cat([fn() for fn in fns])


def plan_class_batch(cfgs: list[ClassCFG], target) -> tuple[Plan, list[Plan]]:
    """(the batched plan, the single plans it is made of) for ``cfgs`` (one per target; each
    with batch 1 and the same schedule and layers)."""
    if any(c.batch != 1 for c in cfgs):
        raise ConfigError("--targets optimises one image per target: use --batch 1")
    plans = [plan_class(c, target) for c in cfgs]
    first = plans[0]
    for plan in plans[1:]:
        if plan.schedule != first.schedule or plan.layers != first.layers:
            raise ConfigError("targets of one batch need the same schedule and layers")
    if any(p.embed for p in plans):
        raise ConfigError("--targets does not batch runs that read the model's embedding")
    objective = sum(_element_objective(p, b) for b, p in enumerate(plans))
    batched = Plan("class", target, objective, list(first.layers), _batched_param(plans),
                   first.schedule, _batched_augment(plans), [p.generator for p in plans],
                   "+".join(p.run_name for p in plans), {"batched_targets": len(plans)})
    return batched, plans


# ---------------------------------------------------------------- running and writing

def _element_result(result: RenderResult, b: int, name: str) -> RenderResult:
    history = [{**r, "terms": {k: v for k, v in r["terms"].items() if k == name},
                "loss": r["terms"].get(name, r["loss"])} for r in result.history]
    return dataclasses.replace(result, image=result.image[b:b + 1],
                               alpha=result.alpha[b:b + 1], history=history)


def run_batch(cfgs: list[ClassCFG], target, argv=None) -> list[tuple[Path, RenderResult]]:
    """Render one batch of targets; write one run folder per target."""
    batched, plans = plan_class_batch(cfgs, target)
    names = batched.objective.names
    writers = []
    for cfg, plan in zip(cfgs, plans):
        run_dir = make_run_dir(cfg.out_dir or "out_class", cfg.run_name or plan.run_name)
        meta = run_metadata(cfg, argv, mode="class", model_spec=str(target.spec),
                            weight_hash=target.weight_hash, batched_with=len(plans), **plan.meta)
        writers.append(RunWriter(run_dir, meta))

    def callback(step, image, record):
        for b, writer in enumerate(writers):
            terms = {k: v for k, v in record["terms"].items() if k == names[b]}
            writer.on_step(step, image[b:b + 1], {**record, "terms": terms})
    cfg = cfgs[0]
    result = render(target, batched.objective, batched.param, batched.schedule, batched.layers,
                    augment=batched.augment, generator=batched.generator,
                    save_steps=cfg.save_steps, callback=callback, progress=cfg.progress,
                    precision=getattr(cfg, "precision", "fp32"))
    opinion = make_opinion(target, cfg.prompts_file, top_k=cfg.top_k, progress=False)
    out = []
    for b, writer in enumerate(writers):
        mine = _element_result(result, b, names[b])
        final_opinion = opinion(mine.image) if opinion is not None else {}
        print(writer.finish(mine, {"final_opinion": final_opinion}))
        out.append((writer.run_dir, mine))
    if result.stopped:
        print(f"stopped: {result.stopped} after {result.steps_done} steps", file=sys.stderr)
    return out


def run_class_batch(cfg: ClassBatchCFG, argv=None) -> list[tuple[Path, RenderResult]]:
    """Every ``--targets`` entry, ``--batch_size`` at a time; [(run_dir, result)] in order."""
    cfgs = target_cfgs(cfg)
    _, target = prepare(cfgs[0])
    out = []
    for start in range(0, len(cfgs), cfg.batch_size):
        out += run_batch(cfgs[start:start + cfg.batch_size], target, argv)
        if out[-1][1].stopped:
            break
    return out


def run_class_or_batch(cfg: ClassBatchCFG, argv=None, callbacks=None):
    """The script's run function: ``--targets`` batches, else one ``run_class``; returns
    (run_dir, result) of the last run."""
    if not cfg.targets:
        from vital.modes.class_mode import run_class
        return run_class(cfg, argv, callbacks)
    return run_class_batch(cfg, argv)[-1]
