"""The one runner of every visualisation mode: a mode builds a :class:`Plan` (objective, hooked
layers, parameterisation, schedule, run name, metadata) and :func:`run_plan` prepares the run
folder, renders and writes the outputs.

    script -> mode (``plan_class(cfg, target)``) -> ``run_plan(cfg, plan)`` -> render -> outputs

Observers (progress, stop, records; the GUI passes its own) are a :class:`Callbacks` value
passed as an argument; nothing is read from global state.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vital.config import (check_cfg, make_run_dir, resolve_device, run_metadata,
                          set_determinism)
from vital.models import load_target
from vital.models.opinion import make_opinion
from vital.modes.outputs import RunWriter
from vital.optvis.losses import Objective
from vital.optvis.render import RenderResult, Schedule, ends_the_loop, render


@dataclass(frozen=True)
class Callbacks:
    """Optional observers of a run (the desktop GUI uses them); none changes the result."""
    on_progress: Callable | None = None   # (step, total, loss, image) every progress_every steps
    should_stop: Callable | None = None   # () -> bool, asked before each step; True ends the run
    on_record: Callable | None = None     # (step, record) per save step, and the final opinion
    progress_every: int = 5


NO_CALLBACKS = Callbacks()


@dataclass
class Plan:
    """One visualisation run as a value: everything the runner needs, built by a mode."""
    mode: str                      # "class", "inner", ...: the default parent out_<mode>/
    target: object                 # the TargetModel
    objective: Objective           # the loss (named, weighted terms)
    layers: list[str]              # layers hooked during the render (features for the terms)
    param: tuple                   # (params, image_fn) from vital.optvis.param
    schedule: Schedule             # stages, learning rate, warm-up
    augment: Callable | None       # (image, generator) -> image, every step
    generator: torch.Generator     # the run's random numbers (start, augmentation)
    run_name: str                  # the run folder's default name
    meta: dict = field(default_factory=dict)   # extra config.json entries
    embed: bool = False            # put the model's embedding into ctx["embed"] each step
    run_dir: Path | None = None    # a folder the mode already made (else make_run_dir)
    after: Callable | None = None  # (run_dir, result) -> None: the mode's own extra outputs
    relevance_maps: object = None  # the run's SyntheticMaps (batched runs compute them at once)


# CFG fields that name layers; a bare number in them means block N of the model
LAYER_FIELDS = ("layer", "layer_block", "target_layer", "decomp_layer", "layers")


def prepare(cfg):
    """Check the CFG, seed, pick the device and load the model: (device, target). Layer numbers
    in the CFG's layer fields become the model's block names (in place, so config.json, run
    names and every later step see one name)."""
    check_cfg(cfg)
    set_determinism(cfg.seed, cfg.deterministic, cfg.hard_determinism)
    device = resolve_device(cfg.device)
    target = load_target(cfg.model, device=device)
    name_layers(cfg, target)
    return device, target


def name_layers(cfg, target) -> None:
    """Rewrite bare layer numbers (``"12"``) in ``cfg``'s layer fields to block names
    (``blocks.12``, ``block.12``; ``TargetModel.blocks``); a number the model lacks raises
    ValueError with the valid range."""
    for name in LAYER_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value:
            setattr(cfg, name, target.canonical_layer(value))
        elif isinstance(value, (list, tuple)):
            setattr(cfg, name, [target.canonical_layer(v) for v in value])


def _record_callback(writer: RunWriter, on_record):
    if on_record is None:
        return writer.on_step

    def callback(step, image, record):
        writer.on_step(step, image, record)
        on_record(step, record)
    return callback


def run_plan(cfg, plan: Plan, argv=None, callbacks: Callbacks | None = None
             ) -> tuple[Path, RenderResult]:
    """Render ``plan`` and write ``out_<mode>/<run_name>/`` (or ``plan.run_dir``); returns
    (run_dir, result). ``cfg`` is the mode's CFG (recorded in config.json; its out_dir,
    run_name, save_steps, prompts_file, top_k and progress apply)."""
    callbacks = callbacks or NO_CALLBACKS
    target = plan.target
    run_dir = Path(plan.run_dir) if plan.run_dir else make_run_dir(
        cfg.out_dir or f"out_{plan.mode}", cfg.run_name or plan.run_name)
    meta = run_metadata(cfg, argv, mode=plan.mode, model_spec=str(target.spec),
                        weight_hash=target.weight_hash, **plan.meta)
    writer = RunWriter(run_dir, meta)

    def produce(opinion):
        return render(target, plan.objective, plan.param, plan.schedule, plan.layers,
                      augment=plan.augment, generator=plan.generator, save_steps=cfg.save_steps,
                      callback=_record_callback(writer, callbacks.on_record),
                      progress=cfg.progress, record_fn=opinion,
                      on_progress=callbacks.on_progress, progress_every=callbacks.progress_every,
                      should_stop=callbacks.should_stop, embed=plan.embed,
                      precision=getattr(cfg, "precision", "fp32"))
    result = write_run(cfg, target, writer, produce, callbacks)
    if plan.after is not None:
        plan.after(run_dir, result)
    return run_dir, result


def write_run(cfg, target, writer: RunWriter, produce: Callable, callbacks: Callbacks
              ) -> RenderResult:
    """The part every run folder shares: ``produce(opinion)`` renders (``opinion`` = the
    model's opinion callable or None), then final.png, metrics.json with the final opinion, the
    observers' final record and the printed report; whatever ends the run, metrics.json says
    how (never "running" for ever)."""
    try:
        opinion = make_opinion(target, cfg.prompts_file, top_k=cfg.top_k, progress=cfg.progress)
        result = produce(opinion)
        final_opinion = opinion(result.image) if opinion is not None else {}
        final = writer.finish(result, {"final_opinion": final_opinion})
    except BaseException as err:
        writer.fail(err)
        raise
    if callbacks.on_record is not None:
        callbacks.on_record(result.steps_done, {"final": True, **final_opinion})
    report(result, final, final_opinion)
    return result


def report(result, final: Path, final_opinion: dict) -> None:
    if final_opinion.get("opinion_text"):
        print(f"final opinion: {final_opinion['opinion_text']}")
    if ends_the_loop(result.stopped):
        print(f"{result.stopped} after {result.steps_done} steps; saved what exists: {final}",
              file=sys.stderr)
    elif result.stopped:
        print(f"stopped: {result.stopped}; saved the last good image: {final}", file=sys.stderr)
    print(final)
