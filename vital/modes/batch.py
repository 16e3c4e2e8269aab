"""Several runs in one batched optimisation, whatever their mode (class targets, inner neurons).

Each run is planned as usual (its ``Plan``: its references, its target term, its seed's
generator for the start image and the augmentation); ``batch_plans`` puts them side by side:
element b is run b's image, run b's loss terms read only element b of the step's context, its
augmentation draws from its own generator, and the loss is the *sum* over the elements. So
element b gets exactly the gradient of its single run, Adam (element-wise) takes the same step,
and a batched run gives the images of the runs one by one up to the float reduction order of
the model's batched forward (tests/test_batch_modes.py). Relevance maps of the synthetic images
(``--relevance``) are computed for the whole batch in one forward + backward, each element's
from its own target's score (``vital.optvis.relevance.MapsGroup``).

    run_batched(cfgs, plans, target) -> [(run_dir, result) per run]   # one run folder each
    run_in_batches(cfgs, plan_fn, target, batch_size) -> the same, ``batch_size`` at a time
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from vital.config import ConfigError, make_run_dir, run_metadata, set_determinism
from vital.models.memory import check_memory
from vital.models.opinion import make_opinion
from vital.modes.outputs import RunWriter
from vital.modes.runner import NO_CALLBACKS, Callbacks, Plan, report
from vital.optvis.losses import Objective
from vital.optvis.relevance import MapsGroup
from vital.optvis.render import RenderResult, ends_the_loop, render


def element_context(ctx: dict, b: int) -> dict:
    """The step's context as run b sees it alone: every batched tensor cut to element b (image,
    input, output, embed, features), scalars as they are; "batch" is the whole context (for
    terms computed once for the batch, e.g. relevance maps) and "element" is b."""
    def cut(value):
        return value[b:b + 1] if torch.is_tensor(value) and value.dim() > 0 else value
    out = {k: ({n: cut(t) for n, t in v.items()} if k == "features" else cut(v))
           for k, v in ctx.items()}
    out["batch"], out["element"] = ctx, b
    return out


def element_suffix(b: int) -> str:
    """Element b's terms in a batched objective are its run's term names + this suffix."""
    return f"[{b}]"


def element_terms(record_terms: dict, b: int) -> dict:
    """Element b's own terms of a batched record, under its run's term names."""
    suffix = element_suffix(b)
    return {k[:-len(suffix)]: v for k, v in record_terms.items() if k.endswith(suffix)}


def _element_objectives(plans: list[Plan]) -> Objective:
    """Every run's terms on its own element, named ``<term>[b]``: run b's loss terms are
    computed once per step on element b's cut of the context and read by its named terms, so
    each run keeps its own term breakdown (sort:<layer>, the class or neuron term, priors)."""
    last: dict = {}

    def terms_of(ctx, b) -> dict:
        if last.get("ctx") is not ctx:   # once per step, shared by every term of the step
            last["ctx"], last["terms"] = ctx, {}
        if b not in last["terms"]:
            last["terms"][b] = plans[b].objective.terms(element_context(ctx, b))
        return last["terms"][b]

    def term(b: int, name: str) -> Objective:
        return Objective(lambda ctx: terms_of(ctx, b)[name], name + element_suffix(b))
    return sum(term(b, name) for b, plan in enumerate(plans) for name in plan.objective.names)


def _batched_augment(plans: list[Plan]):
    """Each element augmented by its own run's transform with its own generator."""
    augments = [p.augment for p in plans]

    def augment(x, generators):
        return torch.cat([x[b:b + 1] if aug is None else aug(x[b:b + 1], gen)
                          for b, (aug, gen) in enumerate(zip(augments, generators))])
    return augment


def _batched_param(plans: list[Plan]) -> tuple:
    """(every run's parameters, image_fn -> (B, 3, H, W) of the runs' images side by side);
    each run's after-step hook (pixel_norm's clipping) runs after every step."""
    fns = [p.param[1] for p in plans]

    def image_fn():
        return torch.cat([fn() for fn in fns])
    hooks = [h for h in (getattr(fn, "after_step", None) for fn in fns) if h is not None]
    if hooks:
        image_fn.after_step = lambda: [h() for h in hooks]
    return [t for p in plans for t in p.param[0]], image_fn


def batch_plans(plans: list[Plan], objective: Objective | None = None) -> Plan:
    """One plan optimising ``plans`` (single-image runs with the same schedule) together. Its
    objective: every run's terms on its own element (``<term>[b]``), unless ``objective``
    (a loss over the whole batch built by the caller, e.g. concepts' summed terms)."""
    first = plans[0]
    for plan in plans:
        with torch.no_grad():
            shape = plan.param[1]().shape
        if shape[0] != 1:
            raise ConfigError("a batched run optimises one image per target: use --batch 1")
        if plan.schedule != first.schedule:
            raise ConfigError("targets of one batch need the same schedule (steps, sizes, lr)")
    check_memory(first.target, shape[-1], len(plans), what="--batch_size")
    MapsGroup.join([p.relevance_maps for p in plans])
    objective = objective if objective is not None else _element_objectives(plans)
    layers = list(dict.fromkeys(name for p in plans for name in p.layers))
    return Plan(first.mode, first.target, objective, layers, _batched_param(plans),
                first.schedule, _batched_augment(plans), [p.generator for p in plans],
                "+".join(p.run_name for p in plans), {"batched_targets": len(plans)},
                embed=any(p.embed for p in plans))


def _element_record(record: dict, b: int) -> dict:
    terms = element_terms(record["terms"], b)
    return {**record, "terms": terms, "loss": float(sum(terms.values()))}


def _element_result(result: RenderResult, b: int) -> RenderResult:
    history = [_element_record(r, b) for r in result.history]
    return dataclasses.replace(result, image=result.image[b:b + 1],
                               alpha=result.alpha[b:b + 1], history=history)


def run_batched(cfgs: list, plans: list[Plan], target, argv=None,
                callbacks: Callbacks | None = None) -> list[tuple[Path, RenderResult]]:
    """Render ``plans`` (one per cfg) as one batch; write one run folder per plan, with its
    config.json, metrics.json, PNGs and the mode's own outputs (``plan.after``). ``callbacks``
    see the whole batch (progress with the (B, 3, H, W) images, stop, the batch's records)."""
    callbacks = callbacks or NO_CALLBACKS
    batched = batch_plans(plans)
    writers = []
    for cfg, plan in zip(cfgs, plans):
        run_dir = Path(plan.run_dir) if plan.run_dir else make_run_dir(
            cfg.out_dir or f"out_{plan.mode}", cfg.run_name or plan.run_name)
        meta = run_metadata(cfg, argv, mode=plan.mode, model_spec=str(target.spec),
                            weight_hash=target.weight_hash, batched_with=len(plans), **plan.meta)
        writers.append(RunWriter(run_dir, meta))

    cfg = cfgs[0]
    opinion = make_opinion(target, cfg.prompts_file, top_k=cfg.top_k, progress=False)

    def callback(step, image, record):
        for b, writer in enumerate(writers):   # each run's own terms and the model's opinion
            mine = _element_record(record, b)
            if opinion is not None:
                with torch.no_grad():
                    mine.update(opinion(image[b:b + 1]))
            writer.on_step(step, image[b:b + 1], mine)
        if callbacks.on_record is not None:
            callbacks.on_record(step, record)
    try:   # whatever ends the batch, every run's metrics.json says how
        result = render(target, batched.objective, batched.param, batched.schedule,
                        batched.layers, augment=batched.augment, generator=batched.generator,
                        save_steps=cfg.save_steps, callback=callback, progress=cfg.progress,
                        on_progress=callbacks.on_progress,
                        progress_every=callbacks.progress_every,
                        should_stop=callbacks.should_stop, embed=batched.embed,
                        precision=getattr(cfg, "precision", "fp32"))
        out = []
        for b, (writer, plan) in enumerate(zip(writers, plans)):
            mine = _element_result(result, b)
            final_opinion = opinion(mine.image) if opinion is not None else {}
            final = writer.finish(mine, {"final_opinion": final_opinion})
            out.append((writer.run_dir, mine, final, final_opinion, plan))
    except BaseException as err:
        for writer in writers:
            writer.fail(err)
        raise
    runs = []
    for run_dir, mine, final, final_opinion, plan in out:
        report(mine, final, final_opinion)
        if plan.after is not None:
            plan.after(run_dir, mine)
        runs.append((run_dir, mine))
    return runs


def run_in_batches(cfgs: list, plan_fn: Callable, target, batch_size: int, argv=None,
                   callbacks: Callbacks | None = None) -> list[tuple[Path, RenderResult]]:
    """``cfgs`` (one per run) planned with ``plan_fn(cfg) -> Plan`` and rendered
    ``batch_size`` at a time; stops after a batch that was interrupted. Each batch is seeded
    like a single run (``set_determinism``), so every run starts from its own seed's state."""
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    out = []
    bar = tqdm(total=len(cfgs), desc="runs", unit="run", leave=False,
               disable=not cfgs or len(cfgs) <= batch_size or not cfgs[0].progress)
    with bar:
        for start in range(0, len(cfgs), batch_size):
            chunk = cfgs[start:start + batch_size]
            set_determinism(chunk[0].seed, chunk[0].deterministic, chunk[0].hard_determinism)
            plans = [plan_fn(cfg) for cfg in chunk]
            out += run_batched(chunk, plans, target, argv, callbacks)
            bar.update(len(chunk))
            if ends_the_loop(out[-1][1].stopped):   # a NaN in one batch: the next still runs
                print(f"stopped: {out[-1][1].stopped}; {len(cfgs) - len(out)} runs not "
                      f"started", file=sys.stderr)
                break
    return out
