"""A layer atlas (``atlas.py`` / ``vital-atlas``): every unit of a layer on one browsable, offline
site, built from what the toolkit already computes.

1. Labels (``vital.labels.describe.run_labels``, CLIP-Dissect-style, cached activations) for
   every unit of ``--layers``, into ``<site>/labels/run/`` (rebuilt on each run: cheap).
2. One inner-mode picture per unit of ``--units`` (``vital.modes.label_visuals.render_units``,
   the ``--vis_*`` settings, ``--vis_batch_size`` units per batched optimisation) into
   ``<site>/units/<layer>_<unit>/``, each with ``atlas_picture.json`` (the settings' hash):
   a rerun renders only units whose picture is missing or was made with other settings.
   The concept model then names each picture (the closed loop of ``--check``).
3. ``atlas.json`` (schema ``vital-atlas/1``) and the pages (``vital.atlas.site``).

Ctrl-C / SIGTERM: the pictures made so far are kept and the pages are written for them; the
same command resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vital.cache import write_json
from vital.imaging import to_pil
from vital.config import ConfigError, opt, parse_units
from vital.modes.label_visuals import DescribeCFG, check_agreement, check_references, \
    render_units, visualise_settings
from vital.labels.describe import LabelRun, run_labels, top_probe_files
from vital.models.target import channels_positions
from vital.refs.images import load_image
from vital.refs.patches import iter_images
from vital.atlas import site as site_mod
from vital.effects.decompose import clip_vit, parse_layer
from vital.effects.run import EffectsCFG, run_effects
from vital.eval import engine
from vital.eval.launchers import LaunchCFG, Task, launch

__all__ = ["AtlasCFG", "run_atlas", "SCHEMA"]

SCHEMA = "vital-atlas/1"
PICTURE_FILE = "atlas_picture.json"
_THUMB = 160        # px of a card's picture
_PROBE_THUMB = 96   # px of a top probe image
_BINS = 24          # histogram bins of a unit's probe activations
_CANDIDATES = 5


@dataclass
class AtlasCFG(LaunchCFG, DescribeCFG):
    """A layer atlas: labels, pictures and top probe images of every unit, as static pages."""
    units: list[str] = opt([], "units of each layer: numbers, ranges (0-63) or all; empty = "
                           "the first 64 (or every unit of a smaller layer)")
    pictures: bool = opt(True, "an inner-mode picture of every unit (--no-pictures: labels and "
                         "probe images only)")
    preview: bool = opt(False, "a fast first look: pictures at 96 px with 48 steps")
    top_images: int = opt(8, "top probe images per unit", low=1)
    out_dir: str = opt("out_atlas", "parent folder of the atlas site")
    run_name: str = opt("", "site folder name (default from model and layers); the same name "
                        "resumes and updates that site")
    sheets: int = opt(0, "labels' contact sheets per layer (the atlas has its own pages)")
    keep_png: bool = opt(False, "keep each unit's PNGs (final.png, final_alpha.png, "
                         "references.png) beside the pages' JPEGs; off, a layer of 320 units "
                         "takes ~25 MB instead of ~115 MB")
    effects: bool = opt(True, "for a CLIP ViT's block.N.mlp layers: what each unit writes into "
                        "the image embedding (neuron_effects.py, official protocol): the texts "
                        "of its second-order effect and the first PC's explained variance "
                        "(--no-effects: skip)")
    effects_texts: str = opt("words20k", "text set of those words: a file (one text per line), "
                             "words20k or imagenet")


def _site_dir(cfg: AtlasCFG) -> Path:
    name = cfg.run_name or f"{cfg.model}_{'+'.join(cfg.layers)}"
    safe = "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in name).strip("._")
    return Path(cfg.out_dir) / (safe or "atlas")


def _picture_cfg(cfg: AtlasCFG) -> AtlasCFG:
    """The settings pictures are rendered with (``--preview`` lowers size and steps)."""
    if cfg.preview:
        return dataclasses.replace(cfg, vis_size=min(cfg.vis_size, 96),
                                   vis_steps=min(cfg.vis_steps, 48))
    return cfg


def _checks(cfg: AtlasCFG, chosen: dict):
    """Refuse bad units and layers without positions before any heavy work."""
    def checks(target, specs):
        for spec in specs:
            if cfg.pictures and spec.layout not in ("BCHW", "BND"):
                raise ConfigError(f"pictures use inner mode, which needs spatial positions or "
                                  f"tokens; layer {spec.name!r} is a vector (e.g. a "
                                  f"classifier's output); pass --no-pictures or pick a layer "
                                  f"such as blocks.15")
            tokens = cfg.units or [f"0-{min(64, spec.channels) - 1}"]
            chosen[spec.name] = parse_units(tokens, spec.channels, "unit")
    return checks


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str)
                          .encode()).hexdigest()[:16]


def _have_picture(folder: Path, digest: str) -> bool:
    try:
        record = json.loads((folder / PICTURE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return record.get("settings_hash") == digest and (folder / "picture.jpg").is_file()


def _write_jpeg(image: Image.Image, dest: Path, quality: int) -> None:
    """``image`` as a JPEG at ``dest``, written whole (a temporary file, then a rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.jpg")
    image.convert("RGB").save(tmp, format="JPEG", quality=quality)
    tmp.replace(dest)


def _thumb(src: Path, dest: Path, size: int) -> None:
    """A small JPEG (cards stay fast with hundreds of units); written once (a re-rendered
    unit's folder is replaced whole by ``render_units``)."""
    if dest.is_file():
        return
    with Image.open(src) as img:
        img.thumbnail((size, size))
        _write_jpeg(img, dest, 85)


def _probe_thumb(src: Path, dest: Path, size: int) -> None:
    """A top probe image as the model saw it (the probe pass's square centre crop, so that a
    peak's box lands where the model looked), as a small JPEG; written once."""
    if not dest.is_file():
        _write_jpeg(to_pil(load_image(src, size)), dest, 85)


def _grid(n_positions: int, shape) -> tuple[int, int] | None:
    """(rows, columns) of a layer's positions: a CNN's H x W, a ViT's square token grid; None
    when the tokens do not form a square."""
    if len(shape) == 4:
        return int(shape[2]), int(shape[3])
    side = round(n_positions ** 0.5)
    return (side, side) if side * side == n_positions else None


@torch.no_grad()
def peak_boxes(run: LabelRun, layer: str, files: list[Path]) -> dict[Path, torch.Tensor]:
    """file -> (C, 4) box [left, top, width, height] (fractions of the image) of the position
    where each unit of ``layer`` is most active on that image: one cell of the layer's grid.
    One forward per batch of images gives every unit's box (the atlas needs them only for each
    unit's top images). Layers without a grid of positions give no boxes."""
    target, spec = run.target, run.layers[layer].spec
    out: dict[Path, torch.Tensor] = {}
    if spec.layout not in ("BCHW", "BND"):
        return out
    for images, used in iter_images(sorted(set(files)), target.input_size, 16):
        with target.hooks([layer]) as feats:
            target(images.to(target.device))
            raw = feats[layer]   # the hooks' dict is emptied on leaving
        maps = channels_positions(raw, spec.layout)[..., spec.skip:].float().cpu()  # (B, C, P)
        grid = _grid(maps.shape[-1], raw.shape)
        if grid is None:
            return out
        rows, cols = grid
        peak = maps.argmax(-1)                                                      # (B, C)
        ones = torch.ones(peak.shape)
        boxes = torch.stack([(peak % cols) / cols, (peak // cols) / rows, ones / cols,
                             ones / rows], -1)
        out.update(zip(used, boxes))
    return out


def _histogram(values: torch.Tensor) -> dict:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-6
    counts = torch.histc(values.float(), bins=_BINS, min=low, max=high)
    return {"low": low, "high": high, "counts": [int(c) for c in counts.tolist()]}


def _selectivity(values: torch.Tensor, k: int) -> float:
    """(mean of the top-k activations - mean) / std over the probe set."""
    std = float(values.std())
    top = values.topk(min(k, len(values))).values.mean()
    return float((top - values.mean()) / std) if std > 0 else 0.0


def _unit_record(run: LabelRun, site: Path, layer: str, unit: int, k: int,
                 tops: tuple[list, list], boxes: dict[Path, torch.Tensor]) -> dict:
    res = run.layers[layer]
    sims = res.similarity[unit]
    best = sims.topk(min(_CANDIDATES, len(sims)))
    files, acts = tops
    top = []
    for path, act in zip(files, acts):
        index = run.probe.files.index(path)
        thumb = Path("probe") / f"{index:05d}-crop.jpg"
        _probe_thumb(path, site / thumb, _PROBE_THUMB)
        top.append({"file": path.name, "thumb": thumb.as_posix(), "activation": float(act)})
        if Path(path) in boxes:
            top[-1]["peak"] = [round(float(v), 4) for v in boxes[Path(path)][unit]]
    values = res.acts.values[:, unit]
    return {"unit": unit, "label": run.concept.concepts[int(best.indices[0])],
            "similarity": float(best.values[0]),
            "candidates": [{"label": run.concept.concepts[int(i)], "similarity": float(v)}
                           for v, i in zip(best.values, best.indices)],
            "selectivity": _selectivity(values, k), "top_images": top,
            "histogram": _histogram(values), "picture": None}


def _picture_record(site: Path, folder: Path, check: dict | None,
                    keep_png: bool = False) -> dict:
    """The pages' record of a unit's finished run folder: JPEG copies of the picture and its
    references for the pages; the run's PNGs are removed unless ``keep_png`` (the size of a
    whole layer's atlas; docs/atlas.md)."""
    rel = folder.relative_to(site)
    _thumb(folder / "final.png", folder / "thumb.jpg", _THUMB)
    with Image.open(folder / "final.png") as img:   # the pages' copy (size: docs/atlas.md)
        _write_jpeg(img, folder / "picture.jpg", 90)
    neuron = json.loads((folder / "neuron.json").read_text())
    record = {"image": (rel / "picture.jpg").as_posix(), "thumb": (rel / "thumb.jpg").as_posix(),
              "activation": float(sum(neuron["visualisation"]) / len(neuron["visualisation"]))}
    if (folder / "references.png").is_file():
        with Image.open(folder / "references.png") as img:
            _write_jpeg(img, folder / "references.jpg", 85)
        record["references"] = (rel / "references.jpg").as_posix()
    if keep_png:
        record["png"] = (rel / "final.png").as_posix()
    else:
        for name in ("final.png", "final_alpha.png", "references.png"):
            (folder / name).unlink(missing_ok=True)
    if check is not None:
        record.update(check)
    return record


def _closed_loop(run: LabelRun, visuals: list[dict], references: int = 8) -> dict:
    """unit -> {"picture_labels", "agrees_top1", "agrees_top5", "references_top5",
    "references_labels"} for finished pictures (``check_agreement``'s, over the unit's
    ``references`` top probe photos)."""
    finished = [v for v in visuals if v["status"] == "finished"]
    if not finished:
        return {}
    rows = check_agreement(run, finished, references)["per_neuron"]
    return {row["unit"]: {"picture_labels": row["picture_labels"], "agrees_top1": row["top1"],
                          "agrees_top5": row["top5"],
                          "references_top5": row["references_top5"],
                          "references_labels": row["references_labels"]} for row in rows}


def run_atlas(cfg: AtlasCFG, argv=None):
    """Labels, pictures and pages of ``cfg.layers``; returns (site folder, LabelRun)."""
    site = _site_dir(cfg)
    try:
        site.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the atlas folder {site}: {err.strerror or err}") from None
    labels = site / "labels"
    if (labels / "run").exists():
        shutil.rmtree(labels / "run")   # the atlas's own label run: rebuilt from the cache
    chosen: dict[str, list[int]] = {}
    lcfg = dataclasses.replace(cfg, out_dir=str(labels), run_name="run", visualise=0,
                               check=False)
    _, run = run_labels(lcfg, argv, checks=_checks(cfg, chosen))
    pcfg = _picture_cfg(cfg)
    settings = visualise_settings(pcfg, run)
    digest = _settings_hash({**settings, "concept_model": cfg.concept_model})
    data = {"schema": SCHEMA, "model": cfg.model, "concept_model": run.summary.get(
                "concept_model", cfg.concept_model),
            "similarity": cfg.similarity, "probe": run.summary.get("probe", {}),
            "picture_settings": settings if cfg.pictures else None, "layers": {}}
    try:
        for layer, units in chosen.items():
            tops = {u: top_probe_files(run, layer, u, cfg.top_images) for u in units}
            boxes = peak_boxes(run, layer, [f for files, _ in tops.values() for f in files])
            records = {u: _unit_record(run, site, layer, u, cfg.top_images, tops[u], boxes)
                       for u in units}
            data["layers"][layer] = {"units": [records[u] for u in units],
                                     "channels": int(run.layers[layer].similarity.shape[0])}
            for u, found in _effects(cfg, run, site, layer, units, argv).items():
                records[u]["effects"] = found
            if cfg.pictures and not run.stopped:
                _pictures(pcfg, run, site, layer, units, records, digest, argv, data)
            site_mod.write_site(site, data)
            if run.stopped:
                break
    finally:
        write_json(site / "atlas.json", data)
        site_mod.write_site(site, data)
    print(f"atlas: {site / 'index.html'}")
    return site, run


_WORDS = 8   # texts of a unit's second-order effect on its page


def _effects(cfg: AtlasCFG, run: LabelRun, site: Path, layer: str, units: list[int],
             argv) -> dict[int, dict]:
    """unit -> its second-order effect (the first PC's texts and explained variance) for a CLIP
    ViT's MLP layer (``block.N.mlp``, the post-GELU neurons both tools read), from one
    ``neuron_effects.py`` run over the probe folder into ``<site>/effects/<layer>/``; {} for
    other layers, with ``--no-effects``, or when the run was stopped."""
    if not cfg.effects or getattr(run.target, "kind", "") != "clip-vit" \
            or not layer.endswith(".mlp"):
        return {}
    block = parse_layer(layer, len(clip_vit(run.target).transformer.resblocks))
    folder = site / "effects"
    if (folder / layer).exists():
        shutil.rmtree(folder / layer)   # rebuilt with the labels (the same probe pass cost)
    ecfg = EffectsCFG(model=cfg.model, layer=[layer], neurons=list(units),
                      probe_dir=cfg.probe_dir, texts=cfg.effects_texts, sheets=0,
                      top_k=min(100, max(1, len(run.used))), batch_size=cfg.batch_size,
                      device=cfg.device, out_dir=str(folder), run_name=layer,
                      progress=cfg.progress)
    _, result = run_effects(ecfg, argv)
    if result.stopped:
        run.stopped = result.stopped
        return {}
    words = result.words.get(block) or [None] * len(units)
    out = {}
    for summary, decomp in zip(result.summaries[block], words):
        texts = [] if decomp is None else [
            {"text": result.texts[i], "coefficient": float(c)} for i, c in decomp.terms[:_WORDS]]
        out[int(summary.neuron)] = {"explained": float(summary.explained),
                                    "top_norm_mean": float(summary.top_norm_mean),
                                    "words": texts,
                                    "reconstruction_cosine": None if decomp is None
                                    else float(decomp.cosine)}
    return out


def _render_chunk(cfg: AtlasCFG, run: LabelRun, site: Path, layer: str, units: list[int],
                  digest: str, argv=None) -> dict[int, dict]:
    """Render ``units`` (one batched optimisation), name the pictures with the concept model and
    write each unit's picture record next to its picture; unit -> record of the finished."""
    visuals = render_units(cfg, run, layer, units, str(site / "units"), argv)
    verdicts = _closed_loop(run, visuals, check_references(cfg))
    out = {}
    for v in visuals:
        if v["status"] != "finished":
            continue
        folder = site / "units" / f"{layer}_{v['unit']}"
        record = _picture_record(site, folder, verdicts.get(v["unit"]), cfg.keep_png)
        write_json(folder / PICTURE_FILE, {"settings_hash": digest, "record": record})
        out[v["unit"]] = record
    return out


def picture_task(cfg: AtlasCFG, site: str, layer: str, units: list[int], digest: str):
    """A launcher's task (``--launcher ray|slurm``): the labels again in the worker (their
    activations come from the shared vital.cache), then ``_render_chunk``; returns the engine's
    ``(records, skipped)``."""
    site = Path(site)
    folder = site / "labels" / "tasks"
    lcfg = dataclasses.replace(cfg, layers=[layer], out_dir=str(folder),
                               run_name=f"{layer}_{units[0]}", visualise=0, check=False,
                               progress=False)
    _, run = run_labels(lcfg)
    shutil.rmtree(folder / lcfg.run_name, ignore_errors=True)
    done = _render_chunk(cfg, run, site, layer, units, digest)
    return [{"unit": u, "finished": u in done} for u in units], [False] * len(units)


def _launch_pictures(cfg: AtlasCFG, site: Path, layer: str, chunks: list[list[int]],
                     digest: str) -> None:
    tasks = [Task(picture_task, (engine.plain(cfg, AtlasCFG), str(site), layer, chunk, digest),
                  f"{layer} units {chunk[0]}-{chunk[-1]}") for chunk in chunks]
    launch(cfg, tasks, lambda records, skipped: ", ".join(
        f"unit {r['unit']} {'done' if r['finished'] else 'not finished'}" for r in records))


def _pictures(cfg: AtlasCFG, run: LabelRun, site: Path, layer: str, units: list[int],
              records: dict, digest: str, argv, data: dict) -> None:
    """Render the missing pictures of ``units``, name them with the concept model, and fill
    ``records``; the pages are rewritten after every batch (each unit appears when ready).
    With ``--launcher ray|slurm`` the batches run there, and the records are read back from
    the units' folders."""
    folders = {u: site / "units" / f"{layer}_{u}" for u in units}
    todo = [u for u in units if not _have_picture(folders[u], digest)]
    step = max(1, cfg.vis_batch_size)
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    if chunks and cfg.launcher != "local":
        _launch_pictures(cfg, site, layer, chunks, digest)
        chunks = []
    for u in units:
        if _have_picture(folders[u], digest):
            records[u]["picture"] = json.loads((folders[u] / PICTURE_FILE).read_text())["record"]
    for chunk in chunks:
        for u, record in _render_chunk(cfg, run, site, layer, chunk, digest, argv).items():
            records[u]["picture"] = record
        site_mod.write_site(site, data)   # the records are data's: each unit shows when ready
        if run.stopped:
            return
