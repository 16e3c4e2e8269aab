"""Several class targets in one batched optimisation (``class_neurons_fvis.py --targets A B``).

Each target is planned as its own class run (``plan_class``); ``vital.modes.batch`` puts the
runs side by side (each element its own references, class term, relevance maps, start image
and augmentation) and writes one run folder per target, as one by one.

    run_class_batch(cfg) -> [(run_dir, result) per target]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from vital.config import ConfigError, opt
from vital.modes.batch import batch_plans, run_in_batches
from vital.modes.class_mode import ClassCFG, plan_class
from vital.modes.runner import name_layers, prepare
from vital.optvis.render import RenderResult


@dataclass
class ClassBatchCFG(ClassCFG):
    """Class visualisation of one target (``--target``) or of several (``--targets``)."""
    CONFLICTS: ClassVar[tuple] = (
        ("target", "targets", "--targets renders each class it lists, --target one class"),)
    targets: list[str] = opt([], "several classes, optimised together in batches: NAME "
                             "(references in --ref_root/NAME) or NAME=REF_DIR")
    ref_root: str = opt("references", "with --targets: parent folder of the per-class "
                        "reference folders")
    batch_size: int = opt(4, "with --targets: targets per batched optimisation (the rest in "
                          "further batches; 4 was the fastest on 2 CPU cores, bench/README.md)",
                          low=1)


def target_cfgs(cfg: ClassBatchCFG) -> list[ClassCFG]:
    """One ClassCFG per ``--targets`` entry: its target and reference folder."""
    out = []
    for entry in cfg.targets:
        name, sep, ref_dir = str(entry).partition("=")
        if sep and not Path(ref_dir.strip()).is_dir() and not any(
                c in ref_dir for c in ("/", "\\")):
            name, ref_dir = str(entry), ""   # a CLIP prompt with "=" in it, not NAME=DIR
        if not name.strip():
            raise ConfigError(f"empty target in --targets entry {entry!r}")
        ref_dir = ref_dir.strip() or str(Path(cfg.ref_root) / name.strip())
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ClassCFG)}
        out.append(ClassCFG(**{**values, "target": name.strip(), "ref_dir": ref_dir}))
    names = [c.target for c in out]
    folded = [" ".join(n.casefold().split()) for n in names]
    twice = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
    if twice:
        raise ConfigError(f"--targets names the same class more than once ({', '.join(twice)}; "
                          f"names are compared without case and extra spaces); give each once")
    return out


def plan_class_batch(cfgs: list[ClassCFG], target):
    """(the batched plan, the single plans it is made of) for ``cfgs`` (one per target)."""
    plans = [plan_class(c, target) for c in cfgs]
    return batch_plans(plans), plans


def run_class_batch(cfg: ClassBatchCFG, argv=None) -> list[tuple[Path, RenderResult]]:
    """Every ``--targets`` entry, ``--batch_size`` at a time; [(run_dir, result)] in order."""
    cfgs = target_cfgs(cfg)
    _, target = prepare(cfgs[0])
    for other in cfgs[1:]:     # layer numbers -> block names in every target's CFG
        name_layers(other, target)
    return run_in_batches(cfgs, lambda c: plan_class(c, target), target, cfg.batch_size, argv)


def run_class_or_batch(cfg: ClassBatchCFG, argv=None, callbacks=None):
    """The script's run function: ``--targets`` batches, else one ``run_class``; returns
    (run_dir, result) of the last run."""
    if not cfg.targets:
        from vital.modes.class_mode import run_class
        return run_class(cfg, argv, callbacks)
    return run_class_batch(cfg, argv)[-1]
