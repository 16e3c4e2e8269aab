"""Labels that check the visualisations (``describe_neurons.py --visualise N --check``).

After ``vital.labels.describe.run_labels`` has labelled a layer, the ``N`` reported neurons with
the highest label similarity are visualised with inner mode (``vital.modes.inner``: the top
patches of the neuron's ``--vis_probe`` most activating probe images are the references, a small
budget by default; ``--vis_batch_size`` neurons of a layer in one batched optimisation) into
``visuals/<layer>_<unit>/``,
and ``visualisations.png`` shows each visualisation beside the neuron's top probe images and its
label. With ``--check`` the concept model scores each visualisation exactly as it scores a probe
image (one row of P); the picture's label is its best concept, and the report counts the neurons
whose label is the picture's best concept (top-1) or among its five best (top-5).

This is a run of a mode (inner mode over labelled neurons), so it lives with the modes; the
labels themselves are on the floor below.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vital.config import ConfigError, Overrides, check_cfg, check_overrides, opt, \
    set_determinism
from vital.imaging import grid, save_png, to_pil
from vital.labels.describe import LabelCFG, LabelRun, run_labels, stack_rows, titled, \
    top_image_tiles, top_probe_files, top_probe_rows, write_summary
from vital.modes.batch import run_in_batches
from vital.optvis.render import ends_the_loop
from vital.modes.inner import InnerCFG, check_ranking, layer_patch_scores, plan_neuron, \
    resolve_target, run_neuron

__all__ = ["DescribeCFG", "run_describe", "visualise_neurons", "render_units",
           "visualise_settings", "check_agreement", "check_references"]

_CHECK_TOP = 5          # the neuron's label must be among the picture's best 5 for top-5
_TILE = 96


@dataclass
class DescribeCFG(LabelCFG):
    """Neuron labels (CLIP-Dissect), with inner-mode visualisations of the best neurons."""
    visualise: int = opt(0, "visualise the N reported neurons with the highest similarity "
                         "(inner mode; layers with positions only)")
    check: bool = opt(False, "with --visualise: the concept model labels each visualisation; "
                      "report top-1 / top-5 agreement with the neuron's label")
    # 224 px / 240 steps / --vis_probe 8: the closed loop 9 of 20 (128 px, 96 steps: 6 of 20;
    # references from the whole probe folder: 1 of 20), docs/inner.md
    vis_steps: int = opt(240, "inner mode: optimisation steps per visualisation")
    vis_size: int = opt(224, "inner mode: image size in px")
    vis_num_ref: int = opt(8, "inner mode: top probe images used as references")
    vis_patch: int = opt(64, "inner mode: side of the reference patches in px, with "
                         "--vis_settings ref_rank=patch (the default ranks whole images)")
    vis_images: int = opt(6, "top probe images beside each visualisation")
    vis_neuron_cap: float = opt(0.0, "inner mode: --neuron_cap of the visualisations (the "
                                "neuron term stops at CAP x the references' score; 0 = off)",
                                low=0.0)
    vis_batch_size: int = opt(4, "inner mode: neurons of a layer optimised together in one "
                              "batched optimisation (vital.modes.batch; the same images as one "
                              "at a time up to float rounding); 1 = one at a time", low=1)
    vis_probe: int = opt(8, "0 = inner mode takes its references from the whole probe folder, "
                         "with the layer's patch scores computed once for every channel and "
                         "cached (vital.refs.patches.layer_scores: the same scores as inner "
                         "mode and the harness); N > 0 = only from the neuron's N most "
                         "activating probe images (linked in visuals/probe_<layer>_<unit>/): "
                         "the same photos its label comes from (the closed loop 9 of 20 "
                         "pictures instead of 1, docs/inner.md)")
    vis_settings: Overrides = opt({}, "further inner-mode settings of every visualisation, "
                                  "applied over the --vis_* ones: key=value,key=value or a "
                                  "JSON object of InnerCFG keys (e.g. "
                                  "'neuron_weight=2,ref_kind=patches,ref_rank=patch'; "
                                  "steps_multires replaces --vis_steps; "
                                  "inner_neurons_fvis.py --help lists them)")


def _vis_checks(cfg: DescribeCFG):
    """Refuse --visualise / --check input before any heavy work."""
    if cfg.visualise < 0 or cfg.vis_probe < 0 or min(cfg.vis_steps, cfg.vis_num_ref,
                                                     cfg.vis_images, cfg.vis_batch_size) < 1:
        raise ConfigError("--visualise and --vis_probe must be >= 0 and --vis_steps, "
                          "--vis_num_ref, --vis_images, --vis_batch_size >= 1")
    if cfg.check and not cfg.visualise:
        raise ConfigError("--check labels the visualisations; give --visualise N (N >= 1) too")
    values = _vis_overrides(cfg)   # a bad --vis_settings fails here, before the labels
    inner = dataclasses.replace(InnerCFG(), **values)
    try:
        check_cfg(inner)
    except ConfigError as err:
        raise ConfigError(f"--vis_settings: {err}") from None
    try:   # inner mode's own rule, with --vis_patch as its --patch_size
        check_ranking(dataclasses.replace(inner, patch_size=cfg.vis_patch))
    except ConfigError as err:
        raise ConfigError(f"--vis_patch {cfg.vis_patch} / --vis_settings (inner mode's "
                          f"--patch_size / settings): {err}; here --ref_rank patch is "
                          f"--vis_settings ref_rank=patch") from None

    def checks(target, specs):
        if not cfg.visualise:
            return
        flat = [s.name for s in specs if s.layout not in ("BCHW", "BND")]
        if flat:
            raise ConfigError(f"--visualise uses inner mode, which needs spatial positions or "
                              f"tokens; layer {flat[0]!r} is a vector (e.g. a classifier's "
                              f"output: class mode visualises those); drop --visualise or "
                              f"pick a layer such as blocks.15")
    return checks


# InnerCFG keys that describe sets for each picture, and who sets them instead
_PER_PICTURE = {"model": "--model", "device": "--device", "layer": "--layers",
                "neuron": "the labelled unit", "neurons": "the labelled units",
                "auto": "the labelled units", "direction": "the labelled unit",
                "data_dir": "--probe_dir / --vis_probe", "out_dir": "the run folder",
                "run_name": "the run folder", "num_ref": "--vis_num_ref",
                "patch_size": "--vis_patch", "size": "--vis_size", "steps": "--vis_steps",
                "seed": "--seed", "cache": "--cache",
                "progress": "--progress", "batch_size": "--vis_batch_size",
                "neuron_cap": "--vis_neuron_cap", "json_cfg": "--json_cfg",
                "dump_cfg": "--dump_cfg"}


def _vis_overrides(cfg: DescribeCFG) -> dict:
    """--vis_settings checked against InnerCFG and coerced to its types."""
    try:
        values = Overrides(cfg.vis_settings)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"--vis_settings: {err}") from None
    return check_overrides(InnerCFG, values, "--vis_settings", _PER_PICTURE)


def _inner_cfg(cfg: DescribeCFG, run: LabelRun, layer: str, unit: int,
               data_dir: str = "", out_dir: str = "") -> InnerCFG:
    values = _vis_overrides(cfg)
    if "steps_multires" in values:   # stages instead of --vis_steps at full size
        values["steps"] = 0
    return dataclasses.replace(_base_inner_cfg(cfg, run, layer, unit, data_dir, out_dir),
                               **values)


def _base_inner_cfg(cfg: DescribeCFG, run: LabelRun, layer: str, unit: int,
                    data_dir: str = "", out_dir: str = "") -> InnerCFG:
    return InnerCFG(model=cfg.model, device=cfg.device, layer=layer, neuron=unit,
                    data_dir=data_dir or cfg.probe_dir, num_ref=cfg.vis_num_ref,
                    patch_size=cfg.vis_patch, size=cfg.vis_size, steps=cfg.vis_steps,
                    save_steps=0, seed=cfg.seed,
                    out_dir=out_dir or str(run.run_dir / "visuals"),
                    run_name=f"{layer}_{unit}", cache=cfg.cache, progress=cfg.progress,
                    batch_size=cfg.vis_batch_size, neuron_cap=cfg.vis_neuron_cap)


def _neuron_probe(cfg: DescribeCFG, run: LabelRun, layer: str, unit: int) -> str:
    """A folder with links to (or copies of) the neuron's ``cfg.vis_probe`` top probe images (rank first in
    the name), or "" for the whole probe folder."""
    if not cfg.vis_probe:
        return ""
    folder = run.run_dir / "visuals" / f"probe_{layer}_{unit}"
    folder.mkdir(parents=True, exist_ok=True)
    files, _ = top_probe_files(run, layer, unit, cfg.vis_probe)
    for rank, path in enumerate(files):
        dest = folder / f"{rank:03d}_{path.name}"
        dest.unlink(missing_ok=True)
        try:   # a link, not a copy: a layer of units would copy its probe photos many times
            dest.symlink_to(Path(path).resolve())
        except OSError:   # no symbolic links (e.g. Windows without the privilege)
            shutil.copyfile(path, dest)
    return str(folder)


def _render_layer(cfg: DescribeCFG, run: LabelRun, layer: str, units: list[int], extras: dict,
                  argv=None, out_dir: str = ""):
    """[(unit, run_dir, result)] of ``units`` of ``layer``: ``cfg.vis_batch_size`` neurons per
    batched optimisation (``plan_neuron`` in ``vital.modes.batch``, as ``run_neurons`` does, but
    each neuron with its own probe folder), or one at a time; stops after an interrupted run."""
    target = run.target
    cfgs = [_inner_cfg(cfg, run, layer, unit, _neuron_probe(cfg, run, layer, unit), out_dir)
            for unit in units]
    neurons = {unit: resolve_target(target, layer, unit) for unit in units}
    base = _inner_cfg(cfg, run, layer, 0)   # whole-folder patch scores: shared, once
    shared = None if cfg.vis_probe else functools.cache(
        lambda: layer_patch_scores(base, target, neurons[units[0]]))
    if cfg.vis_batch_size > 1 and len(units) > 1:
        runs = run_in_batches(cfgs, lambda c: plan_neuron(
            c, target, neurons[c.neuron], extras[c.neuron], shared), target,
            cfg.vis_batch_size, argv)
        return [(c.neuron, run_dir, result) for c, (run_dir, result) in zip(cfgs, runs)]
    out = []
    for icfg in cfgs:
        set_determinism(cfg.seed, True)
        run_dir, result = run_neuron(icfg, target, neurons[icfg.neuron], argv,
                                     extras[icfg.neuron], patch_scores=shared)
        out.append((icfg.neuron, run_dir, result))
        if ends_the_loop(result.stopped):
            break
    return out


def render_units(cfg: DescribeCFG, run: LabelRun, layer: str, units: list[int],
                 out_dir: str, argv=None) -> list[dict]:
    """Inner-mode pictures of ``units`` of ``layer`` (``cfg``'s --vis_* settings) into
    ``out_dir/<layer>_<unit>/`` (an existing folder of that name is replaced): [{"layer",
    "unit", "label", "label_index", "similarity", "run_dir", "status", "image"}]; a stop
    that ends the loop sets ``run.stopped`` and renders nothing after the cut batch."""
    res = run.layers[layer]
    for unit in units:
        stale = Path(out_dir) / f"{layer}_{unit}"
        if stale.exists():
            shutil.rmtree(stale)
    extras = {unit: {"label": res.label(unit, run.concept.concepts)} for unit in units}
    done = []
    for unit, run_dir, result in _render_layer(cfg, run, layer, units, extras, argv, out_dir):
        best = int(res.similarity[unit].argmax())
        done.append({"layer": layer, "unit": unit, "label": run.concept.concepts[best],
                     "label_index": best, "similarity": float(res.similarity[unit, best]),
                     "run_dir": str(run_dir), "status": result.stopped or "finished",
                     "image": result.image.detach().cpu()})
        if ends_the_loop(result.stopped):
            run.stopped = result.stopped
    return done


def visualise_settings(cfg: DescribeCFG, run: LabelRun) -> dict:
    """The inner-mode settings every picture of ``cfg`` is rendered with (unit-independent)."""
    values = dataclasses.asdict(_inner_cfg(cfg, run, "<layer>", 0))
    return {k: v for k, v in values.items()
            if k not in ("out_dir", "run_name", "neuron", "layer", "progress", "device")}


def visualise_neurons(cfg: DescribeCFG, run: LabelRun, argv=None) -> list[dict]:
    """Inner-mode visualisations of the ``cfg.visualise`` best neurons of each layer:
    [{"layer", "unit", "label", "similarity", "run_dir", "image"}]."""
    done = []
    for name, res in run.layers.items():
        units = res.by_similarity()[:cfg.visualise]
        extras = {unit: {"label": res.label(unit, run.concept.concepts)} for unit in units}
        for unit, run_dir, result in _render_layer(cfg, run, name, units, extras, argv):
            best = int(res.similarity[unit].argmax())
            done.append({"layer": name, "unit": unit, "label": run.concept.concepts[best],
                         "label_index": best, "similarity": float(res.similarity[unit, best]),
                         "run_dir": str(run_dir.relative_to(run.run_dir)),
                         "status": result.stopped or "finished",
                         "image": result.image.detach().cpu()})
            if ends_the_loop(result.stopped):
                run.stopped = result.stopped   # the script exits 130 / 143 / 1 as a run does
        if run.stopped:
            return done   # every picture of the cut batch is kept (and marked), nothing after
    return done


def check_references(cfg: DescribeCFG) -> int:
    """How many top probe photos ``check_agreement`` scores beside each picture: the picture's
    references (``--vis_probe``, or ``--vis_num_ref`` with the whole probe folder)."""
    return cfg.vis_probe or cfg.vis_num_ref


@torch.no_grad()
def check_agreement(run: LabelRun, visuals: list[dict], references: int = 8) -> dict:
    """The concept model's best concepts for each visualisation vs. the neuron's label; beside
    it the same test on the neuron's ``references`` most activating probe photos (the share
    whose five best concepts hold the label: what a picture faithful to them can reach), and
    whether the picture's best concept is among the references' five best (their mean scores):
    the picture against its photos, whatever the label."""
    cm = run.concept
    size = cm.target.input_size
    rows = []
    k = min(_CHECK_TOP, len(cm.concepts))
    for v in visuals:
        ref_share, ref_best = None, []
        if run.P is not None:
            ref_scores = run.P[top_probe_rows(run, v["layer"], v["unit"], references).indices]
            best = ref_scores.topk(k, dim=1).indices
            ref_share = float((best == v["label_index"]).any(dim=1).float().mean())
            ref_best = ref_scores.mean(0).topk(k).indices.tolist()
        image = v["image"][:1]
        if image.shape[-1] != size:   # probe images are loaded at the concept model's size too
            image = F.interpolate(image, size=(size, size), mode="bilinear",
                                  align_corners=False, antialias=True)
        scores = cm.scores(image)[0]
        top = scores.topk(k).indices.tolist()
        v["picture_label"] = cm.concepts[top[0]]
        rows.append({"layer": v["layer"], "unit": v["unit"], "label": v["label"],
                     "picture_labels": [cm.concepts[i] for i in top],
                     "top1": top[0] == v["label_index"], "top5": v["label_index"] in top,
                     "references_top5": ref_share,
                     "references_labels": [cm.concepts[i] for i in ref_best],
                     "picture_in_references": bool(ref_best) and top[0] in ref_best})
    n = len(rows)
    shares = [r["references_top5"] for r in rows if r["references_top5"] is not None]
    return {"neurons": n, "top1": sum(r["top1"] for r in rows),
            "top5": sum(r["top5"] for r in rows), "references": references,
            "references_top5": sum(shares) / len(shares) if shares else None,
            "picture_in_references": sum(r["picture_in_references"] for r in rows),
            "per_neuron": rows}


def _visual_row(run: LabelRun, v: dict, k: int) -> object:
    tiles, acts = top_image_tiles(run, v["layer"], v["unit"], k)
    picture = to_pil(v["image"][:1]).resize(tiles[0].size)
    head = [f"{v['layer']}:{v['unit']}  label: {v['label']}  (sim {v['similarity']:.3g})"]
    if "picture_label" in v:
        head.append(f"concept model on the visualisation: {v['picture_label']}")
    return titled(grid([picture] + tiles, ["visualisation"] + acts), head)


def run_describe(cfg: DescribeCFG, argv=None):
    """Labels, then (``--visualise``) visualisations and (``--check``) their agreement;
    returns (run_dir, LabelRun)."""
    run_dir, run = run_labels(cfg, argv, checks=_vis_checks(cfg))
    if not cfg.visualise:
        return run_dir, run
    visuals = visualise_neurons(cfg, run, argv)
    extra = {"visualised": [{k: v for k, v in x.items() if k != "image"} for x in visuals],
             "visualise_settings": dataclasses.asdict(_inner_cfg(cfg, run, "<layer>", 0))}
    finished = [v for v in visuals if v["status"] == "finished"]
    if cfg.check and finished:   # a picture cut short by Ctrl-C / SIGTERM is not judged
        extra["check"] = check_agreement(run, finished, check_references(cfg))
        c = extra["check"]
        print(f"check: the concept model gives {c['top1']}/{c['neurons']} visualisations the "
              f"neuron's label (top-1), {c['top5']}/{c['neurons']} within its top-5; "
              f"{c['references_top5']:.0%} of their {c['references']} top probe photos "
              f"hold the label within their top-5; the picture's best concept is among its "
              f"photos' five best for {c['picture_in_references']}/{c['neurons']}")
    if visuals:
        save_png(stack_rows([_visual_row(run, v, cfg.vis_images) for v in visuals]),
                 run_dir / "visualisations.png")
    run.extra.update(extra)
    write_summary(run)
    for v in visuals:
        v.pop("image", None)
    return run_dir, run
