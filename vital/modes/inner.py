"""Inner neuron visualisation: what one neuron, channel or direction of a layer responds to.

Target: a neuron / channel of ``--layer`` (a CNN channel, a ViT residual-stream channel or MLP
neuron), or a direction in its channel space (``--direction FILE``). Its score is the mean over
positions (spatial positions, or patch tokens without the class token) of the activation, or of
the projection on the unit direction.

References (VITAL paper, sec. 3): the top-k patches of a data set for the target, from distinct
images (``vital.refs.patches``). The loss is

    neuron_weight * (-score / mean score of the references)          term ``neuron:<layer>:<n>``
  + feat_weight * sum_l w_l * sort matching at the layers below the target    ``sort:<layer>``
  + priors (TV, L2)

where sort matching compares the synthetic image's activations with the reference patches'
(resized to each stage's size); with ``--relevance gradxact|lrp|guided`` both sides are weighted by
their relevance for the target and each channel by its importance (``vital.optvis.relevance``).
``--auto N`` ranks the layer's neurons (by mean activation on the data set, or for CLIP by
attribution to ``--auto_prompt``) and visualises the top N.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from vital.optvis import losses
from vital.modes import setup, recipes
from vital.modes.batch import run_in_batches
from vital.modes.runner import Callbacks, Plan, prepare, run_plan
from vital.optvis import relevance as rel
from vital.optvis.render import ends_the_loop
from vital.config import ConfigError, opt, parse_units, set_determinism
from vital.cache import write_json
from vital.refs.patches import PatchScores, channel_means, contact_sheet, data_files, \
    iter_images, layer_scores, reference_patches
from vital.models import channels_positions
from vital.refs.images import load_images, resize_images

_POSITION_LAYOUTS = ("BCHW", "BND")


@dataclass
class InnerCFG(setup.RenderCFG):
    """Inner neuron visualisation (VITAL)."""
    RECIPES: ClassVar[dict] = recipes.INNER_RECIPES
    CONFLICTS: ClassVar[tuple] = (
        ("neuron", "neurons", "--neurons lists every neuron to visualise"),
        ("auto", "neurons", "--auto N picks the top N neurons itself, --neurons names them"),
        ("direction", "neurons", "--direction visualises one direction, --neurons channels"),
        ("direction", "auto", "--direction visualises one direction, --auto ranks channels"))
    recipe: str = opt("toolkit", "named defaults: paper (the official VITAL code's settings, "
                      "vital/modes/recipes.py) or toolkit; flags and --json_cfg override it",
                      choices=list(recipes.INNER_RECIPES))
    # issue 22: 80 + 160 steps are within noise of 200 + 400 on held-out photos (docs/inner.md)
    steps_multires: list[int] = opt([80, 160], "steps per resolution stage, low to high "
                                    "(each stage doubles the size, the last is full size)",
                                    low=1)
    layer: str = opt("blocks.10", "layer of the neuron (query_model_layers.py lists them)")
    neuron: int = opt(0, "neuron / channel index in --layer")
    direction: str = opt("", "file with one value per channel (.pt, .npy, .safetensors, .txt): "
                         "visualise this direction instead of --neuron")
    data_dir: str = opt("references", "folder of real images (searched recursively) to crop "
                        "the reference patches from")
    num_ref: int = opt(50, "top-k patches (from distinct images) used as references", low=1)
    data_size: int = opt(0, "images are resized and centre-cropped to this many px before "
                         "cropping patches (0 = the model's input size)")
    patch_size: int = opt(64, "side of the square patches in px (at data_size)")
    stride: int = opt(0, "step between patches in px (0 = patch_size // 2)")
    score_size: int = opt(0, "px at which the model scores a patch (0 = as cropped)")
    # issue 22: ranking whole images lowered the held-out KID of the class directions from
    # 0.0078 to 0.0049 (3 seeds) and took 47-50 of the top 50 from the class, not 35-45
    ref_rank: str = opt("image", "how the data set's images are ranked for the references: "
                        "image (each image by the unit's score on the whole image at "
                        "data_size, as the labels rank them; --patch_size, --stride and "
                        "--score_size do not apply) or patch (by its best --patch_size patch, "
                        "the official code's)", choices=["image", "patch"])
    ref_kind: str = opt("images", "references: the top-k whole images (with --ref_rank patch "
                        "the images the top-k patches come from; images: the official code's; "
                        "sharp, natural-scale pictures on held-out photos, docs/inner.md) or "
                        "the top-k patches themselves (the paper's text, with --ref_rank patch; "
                        "patches upscaled to each stage come out blurred)",
                        choices=["patches", "images"])
    ref_res: str = opt("stage", "px of the references in sort matching: stage (resized to each "
                       "stage's size) or native (as cut: patch_size px patches, data_size px "
                       "images; their feature quantiles resampled to the stage's positions)",
                       choices=["stage", "native"])
    # issue 22: 0.2 with whole-image ranking (the references' scores are whole images', ~5x
    # lower than their best patches'): held-out KID and FID both at their best (docs/inner.md)
    neuron_weight: float = opt(0.2, "weight of the neuron term, normalised by the references' "
                               "mean score (0 = pure VITAL)")
    match_own_layer: bool = opt(True, "also sort-match the neuron's own layer (the official "
                                "code matches only layers below it; matching it too makes "
                                "pictures the concept model recognises, docs/inner.md)")
    neuron_cap: float = opt(0.0, "the neuron term stops when the score reaches CAP x the mean "
                            "score of the references as matched (whole images or patches at "
                            "the run's size); 0 = no cap", low=0.0)
    relevance: str = opt("none", "relevance weighting of sort matching: gradxact "
                         "(gradient x activation), lrp (zennit for CNNs, conservative rule for "
                         "ViTs), guided, none; lrp gave saturated high-frequency images on "
                         "EfficientNet-Lite0 (bench/README.md)", choices=list(rel.RULES))
    relevance_floor: float = opt(0.5, "weight of an activation where its relevance is lowest "
                                 "(weights run from this floor to 1); 0 = the paper's "
                                 "plain min-max maps, which leave irrelevant activations "
                                 "unconstrained (noisy images with lrp)")
    relevance_every: int = opt(1, "recompute the synthetic image's relevance maps every N steps "
                               "(1 = every step, as in the paper; > 1 is faster but reuses maps "
                               "across jitter and flips)")
    # issue 22: with one start image per seed, the pictures of a layer shared one composition
    # (sort matching does not place things); lucent's batched images start apart too
    start: str = opt("unit", "start image (and augmentation draws): unit (from the seed and "
                     "the unit's label: units of a layer start apart, a unit's picture is the "
                     "same alone and in a batch) or seed (every unit from the seed's image: "
                     "compare units under one layout)", choices=["unit", "seed"])
    neurons: list[str] = opt([], "several neurons of --layer, optimised together in batches "
                             "(one run folder each; instead of --neuron): numbers, ranges "
                             "(0-63) or all (every channel of the layer)")
    batch_size: int = opt(4, "with --neurons or --auto: neurons per batched optimisation (the "
                          "rest in further batches; 1 = one at a time)", low=1)
    auto: int = opt(0, "> 0: rank the layer's neurons and visualise the top N (not --neuron)")
    auto_prompt: str = opt("", "CLIP + --auto: rank by attribution to this text prompt instead "
                           "of by mean activation on the data set")


# ---------------------------------------------------------------- the target

@dataclass(eq=False)
class NeuronTarget:
    """A neuron / channel ``index`` of ``layer``, or a unit ``direction`` (C,) in its channels."""
    layer: str
    layout: str
    channels: int
    index: int | None = None
    direction: torch.Tensor | None = None
    skip: int = 0      # leading positions left out of the score (1 = a CLIP ViT's class token)

    @property
    def label(self) -> str:
        if self.direction is None:
            return f"{self.layer}:{self.index}"
        return f"{self.layer}:dir-{self.direction_digest()[:8]}"

    def direction_digest(self) -> str | None:
        if self.direction is None:
            return None
        return hashlib.sha256(self.direction.double().numpy().tobytes()).hexdigest()

    def score_means(self, means: torch.Tensor) -> torch.Tensor:
        """(B, C) per-channel means -> (B,) scores."""
        if self.direction is None:
            return means[:, self.index]
        return means @ self.direction.to(means)

    def score(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, P) features (``channels_positions`` layout) -> (B,) scores."""
        return self.score_means(feats[..., self.skip:].mean(-1))


def _with_positions(infos) -> str:
    names = [i.name for i in infos if i.layout in _POSITION_LAYOUTS]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def resolve_target(target, layer: str, neuron: int = 0, direction: str = "") -> NeuronTarget:
    """Check the layer, the neuron index or the direction file against the model."""
    try:
        info = target.layer_info(layer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if info.layout not in _POSITION_LAYOUTS:
        raise ConfigError(f"layer {layer!r} has no positions to crop patches by (output "
                          f"{info.shape}); pick a layer with spatial positions or tokens, e.g. "
                          f"{_with_positions(target.layers())}")
    skip = 1 if target.kind == "clip-vit" and info.layout == "BND" else 0
    # info.name: a layer number ("12") becomes its block's name (blocks.12, block.12)
    base = dict(layer=info.name, layout=info.layout, channels=info.channels, skip=skip)
    if direction:
        return NeuronTarget(direction=load_direction(direction, info.channels), **base)
    if not 0 <= neuron < info.channels:
        raise ConfigError(f"neuron {neuron} is out of range for {layer} of {target.spec}: it "
                          f"has {info.channels} neurons, valid 0..{info.channels - 1}")
    return NeuronTarget(index=int(neuron), **base)


_VECTOR_FILES = ".pt, .pth, .npy, .safetensors, .txt, .csv"


def _read_vector(path: Path) -> torch.Tensor:
    """The one tensor of a direction file. Nothing is unpickled (``weights_only=True``,
    ``allow_pickle=False``); a file that is not what its suffix says is one sentence."""
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth", ".npy", ".txt", ".csv"):
        raise ConfigError(f"direction file {path} has an unknown type; valid: {_VECTOR_FILES}")
    try:
        tensors = _vector_tensors(path, suffix)
    except ConfigError:
        raise
    except Exception as err:   # noqa: BLE001  (any loader's failure on a bad file: one sentence)
        # torch's message on a refused pickle ends with advice to set weights_only=False,
        # which would run the file's code: keep only its first line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "weights only load failed" in first.lower():
            first = "it holds pickled Python objects, or it is not a torch file"
        raise ConfigError(f"direction file {path} is not a readable {suffix} file with one "
                          f"vector of numbers (pickled objects are never loaded): "
                          f"{first[:200]}") from None
    if len(tensors) != 1 or not torch.is_tensor(tensors[0]):
        kinds = ", ".join(sorted({type(t).__name__ for t in tensors})) or "nothing"
        raise ConfigError(f"direction file {path} must hold exactly one tensor of numbers, "
                          f"found {len(tensors)} item(s) ({kinds})")
    return tensors[0]


def _vector_tensors(path: Path, suffix: str) -> list:
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        return list(load_file(str(path)).values())
    if suffix in (".pt", ".pth"):
        with warnings.catch_warnings():   # torch's note on a foreign pickle protocol
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
        return list(data.values()) if isinstance(data, dict) else [data]
    if suffix == ".npy":
        return [torch.from_numpy(np.load(path, allow_pickle=False))]
    try:
        return [torch.from_numpy(np.loadtxt(path, delimiter="," if suffix == ".csv" else None))]
    except ValueError as err:   # letters or ragged rows; numpy's message omits the file
        raise ConfigError(f"direction file {path} must hold numbers only: {err}") from None


def load_direction(path, channels: int) -> torch.Tensor:
    """A direction file as a unit vector (channels,) in float64."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"direction file {path} does not exist")
    vec = _read_vector(path).double().reshape(-1)
    if vec.numel() != channels:
        raise ConfigError(f"direction in {path} has {vec.numel()} values; the layer has "
                          f"{channels} channels")
    if not torch.isfinite(vec).all() or vec.norm() == 0:
        raise ConfigError(f"direction in {path} must be finite and non-zero")
    return vec / vec.norm()


# ---------------------------------------------------------------- objective pieces

def neuron_objective(neuron: NeuronTarget, scale: float = 1.0,
                     weight: float = 1.0, cap: float = 0.0) -> losses.Objective:
    """Term ``neuron:<layer>:<n>``: minus the target's score on ctx["features"], / ``scale``;
    with ``cap`` > 0 the score counts only up to ``cap`` (in units of ``scale``: 1 = the
    references' mean score), so the term stops pushing past it and sort matching decides the
    rest."""
    scale = max(abs(float(scale)), 1e-6)

    def fn(ctx):
        score = neuron.score(ctx["features"][neuron.layer]).mean() / scale
        return -(score.clamp(max=cap) if cap > 0 else score)
    return weight * losses.Objective(fn, f"neuron:{neuron.label}")


def forward_order(target, names: list[str]) -> list[str]:
    """``names`` in the order their outputs are computed (one forward at the input size)."""
    with torch.no_grad(), target.hooks(names) as feats:
        size = target.input_size
        target(torch.zeros(1, 3, size, size, device=target.device))
        return list(feats)


def lower_layers(cfg: InnerCFG, target, neuron: NeuronTarget) -> tuple[list[str], list[float]]:
    """Sort-matching layers computed before the target (``--layers`` or the model's defaults);
    with ``--match_own_layer`` the target's layer too (added with weight 1 if not listed)."""
    layers, weights = setup.resolve_layers(cfg, target, mode="inner")
    if cfg.match_own_layer and neuron.layer not in layers:
        layers, weights = layers + [neuron.layer], weights + [1.0]
    order = forward_order(target, list(dict.fromkeys(layers + [neuron.layer])))
    layouts = {info.name: info.layout for info in target.layers()}
    below = order[:order.index(neuron.layer) + int(cfg.match_own_layer)]
    kept = [(n, w) for n, w in zip(layers, weights)
            if n in below and layouts[n] in _POSITION_LAYOUTS]
    dropped = [n for n in layers if n not in dict(kept)]
    if dropped and cfg.layers:
        warnings.warn(f"layers {dropped} are not below {neuron.layer} (or have no positions); "
                      f"they are left out of sort matching", stacklevel=2)
    if not kept:
        warnings.warn(f"no layer below {neuron.layer} to sort-match; only the neuron term and "
                      f"the priors shape the image", stacklevel=2)
    return [n for n, _ in kept], [w for _, w in kept]


def feature_objective(cfg: InnerCFG, target, neuron: NeuronTarget, layers, weights,
                      patches: torch.Tensor, sizes) -> tuple[losses.Objective, dict, object]:
    """Sort matching against the references at each stage size (relevance-weighted unless
    ``--relevance none``); returns (objective, info with the most important channels, the
    synthetic image's relevance maps or None)."""
    return setup.relevance_objective(cfg, target, layers, weights, patches, sizes,
                                      neuron.layer, neuron.score, cfg.relevance,
                                      cfg.relevance_floor, cfg.relevance_every,
                                      native=cfg.ref_res == "native")


# ---------------------------------------------------------------- one run

def check_ranking(cfg: InnerCFG) -> None:
    """Patch settings (or patch references) with ``--ref_rank image`` would be ignored: one
    sentence instead."""
    recipe = InnerCFG.RECIPES.get(cfg.recipe, {})
    given = [f"--{name} {getattr(cfg, name)}" for name in ("patch_size", "stride", "score_size")
             if getattr(cfg, name) not in (getattr(InnerCFG, name), recipe.get(name))]
    if cfg.ref_rank == "image" and given:
        raise ConfigError(f"{', '.join(given)} set how patches are cut and scored, but "
                          f"--ref_rank image scores each whole image; give --ref_rank patch to "
                          f"rank images by their best patch, or leave {given[0].split()[0]} out")
    if cfg.ref_rank == "image" and cfg.ref_kind == "patches":
        raise ConfigError("--ref_kind patches matches the top patches, but --ref_rank image "
                          "cuts none (it ranks whole images); give --ref_rank patch too, or "
                          "--ref_kind images")


def _crop_settings(cfg: InnerCFG, target) -> dict:
    if cfg.score_size and not 8 <= cfg.score_size <= 4096:
        raise ConfigError(f"--score_size {cfg.score_size} is impossible; use 8..4096 px "
                          f"(0 = score each patch as cropped)")
    check_ranking(cfg)
    size = cfg.data_size or target.input_size
    if cfg.ref_rank == "image":
        # the whole image is the one patch: scored as the photo that is matched, through the
        # same cached layer scores (one value per image and channel)
        return {"size": size, "patch": size, "stride": size, "score_size": 0,
                "crop": cfg.ref_crop}
    return {"size": size, "patch": cfg.patch_size,
            "stride": cfg.stride or max(1, cfg.patch_size // 2), "score_size": cfg.score_size,
            "crop": cfg.ref_crop}


def layer_patch_scores(cfg: InnerCFG, target, neuron: NeuronTarget) -> PatchScores:
    """Every channel of ``neuron.layer`` scored on every patch of the data set, once (cached
    on disk unless ``--no-cache``), to share between the neurons and directions of the layer
    (``run_neuron(..., patch_scores=)``)."""
    return layer_scores(target, neuron.layer, neuron.layout, neuron.skip,
                        data_files(cfg.data_dir), use_cache=cfg.cache, progress=cfg.progress,
                        **_crop_settings(cfg, target))


def _patches(cfg: InnerCFG, target, neuron: NeuronTarget, scores=None):
    return reference_patches(target, neuron, cfg.data_dir, k=cfg.num_ref, use_cache=cfg.cache,
                             progress=cfg.progress, scores=scores, **_crop_settings(cfg, target))


def reference_images(cfg: InnerCFG, target, top) -> torch.Tensor:
    """What sort matching matches: the top-k patches, or with ``--ref_kind images`` the whole
    images they come from (cropped to data_size as for patching), as the official code does."""
    if cfg.ref_kind == "patches":
        return top.images
    crop = _crop_settings(cfg, target)
    images, _ = load_images([Path(src) for src in top.sources], crop["size"], crop=crop["crop"])
    return images


def _objective(cfg, target, neuron, top, refs, size, schedule
               ) -> tuple[losses.Objective, list, dict, object]:
    scale = float(np.mean(top.scores))
    meta, cap = {}, 0.0
    if cfg.neuron_cap > 0:
        # the cap is in units of what sort matching matches (whole images or patches, at the
        # run's size), not of the patch scores that chose them (several times higher)
        matched = float(neuron.score_means(channel_means(
            target, neuron.layer, neuron.layout, refs, neuron.skip, size)).mean())
        cap = cfg.neuron_cap * matched / max(abs(scale), 1e-6)
        meta["reference_matched_score"] = matched
    objective = neuron_objective(neuron, scale, cfg.neuron_weight, cap) + \
        setup.priors(cfg, target)
    layers, weights = lower_layers(cfg, target, neuron)
    meta = {"layers": layers, "layer_weights": weights, "reference_mean_score": scale, **meta}
    maps = None
    if cfg.feat_weight and layers:
        feat, info, maps = feature_objective(cfg, target, neuron, layers, weights, refs,
                                             schedule.stage_sizes(size))
        objective, meta = feat + objective, {**meta, **info}
    if not isinstance(objective, losses.Objective) or not objective.names:
        raise ConfigError("every weight is zero: nothing to optimise")
    return objective, layers, meta, maps


def _param_extras(cfg: InnerCFG, patches: torch.Tensor, size: int) -> dict:
    """MACO keeps a natural amplitude spectrum fixed: that of the reference patches."""
    if cfg.param != "maco":
        return {}
    from vital.optvis.param import magnitude_spectrum
    return {"magnitude": magnitude_spectrum(resize_images(patches, size))}


def _run_name(target, neuron: NeuronTarget, seed: int) -> str:
    return f"{neuron.label.replace(':', '-')}_{Path(str(target.spec)).name}_s{seed}"


def plan_neuron(cfg: InnerCFG, target, neuron: NeuronTarget, extra: dict | None = None,
                patch_scores=None) -> Plan:
    """One target's run as a value. ``patch_scores`` (from ``layer_patch_scores`` with the same
    cfg, or a function returning them, called only when the patch cache misses) saves scoring
    the data set again."""
    size = setup.image_size(cfg, target)
    schedule = setup.make_schedule(cfg, target)
    top = _patches(cfg, target, neuron, patch_scores)
    refs = reference_images(cfg, target, top)
    objective, layers, meta, maps = _objective(cfg, target, neuron, top, refs, size, schedule)
    gen = setup.generator_for(cfg, target.device, neuron.label if cfg.start == "unit" else "")
    param = setup.make_param(cfg, size, target.device, gen, target=target,
                              **_param_extras(cfg, refs, size))
    meta.update(target_label=neuron.label, neuron=neuron.index, direction=cfg.direction or None,
                relevance=cfg.relevance, ref_kind=cfg.ref_kind, references=_reference_meta(top), **(extra or {}))

    def after(run_dir, result):
        contact_sheet(top, run_dir / "references.png")
        write_neuron_report(target, neuron, result.image, top, size, run_dir)
    return Plan("inner", target, objective, list(dict.fromkeys(layers + [neuron.layer])), param,
                schedule, setup.make_augment(cfg), gen, _run_name(target, neuron, cfg.seed),
                meta, after=after, relevance_maps=maps)


def run_neuron(cfg: InnerCFG, target, neuron: NeuronTarget, argv=None, extra: dict | None = None,
               patch_scores=None, callbacks: Callbacks | None = None):
    """Visualise one target; returns (run_dir, result)."""
    return run_plan(cfg, plan_neuron(cfg, target, neuron, extra, patch_scores), argv, callbacks)


def _reference_meta(top) -> dict:
    return {**top.info, "scores": top.scores, "sources": top.sources,
            "corners": [list(c) for c in top.corners]}


def write_neuron_report(target, neuron: NeuronTarget, image, top, size: int, run_dir: Path) -> dict:
    """neuron.json: the target's score on the visualisation and on the reference patches (both
    at the image size), printed as one line."""
    def scores(images):
        means = channel_means(target, neuron.layer, neuron.layout, images, neuron.skip, size)
        return neuron.score_means(means).tolist()
    report = {"target": neuron.label, "visualisation": scores(image),
              "references": scores(top.images), "reference_patches_at": size}
    write_json(run_dir / "neuron.json", report)
    print(f"{neuron.label}: score {np.mean(report['visualisation']):.4g} on the visualisation, "
          f"{np.mean(report['references']):.4g} on the top-{len(top.scores)} references "
          f"(references.png)")
    return report


# ---------------------------------------------------------------- --auto

def _prompt_attribution(target, neuron: NeuronTarget, images, text) -> torch.Tensor:
    """(B, C): each channel's activation x gradient of the image-text cosine, summed over
    positions."""
    with target.hooks([neuron.layer]) as feats:
        x = images.to(target.device).requires_grad_(True)   # so activations carry a graph
        cos = F.cosine_similarity(target.embed(x).float(), text[None], dim=-1)
        act = feats[neuron.layer]
        (grad,) = torch.autograd.grad(cos.sum(), act)
        attr = channels_positions((act * grad).detach(), neuron.layout)[..., neuron.skip:]
        return attr.sum(-1).float().cpu()                   # (B, C, P) -> (B, C)


def rank_neurons(target, neuron: NeuronTarget, files, size: int, prompt: str = "",
                 crop: float = 1.0) -> torch.Tensor:
    """(C,) ranking scores for the channels of ``neuron.layer`` over the images ``files`` (at
    ``size`` px, streamed): mean activation, or with ``prompt`` (CLIP) the mean attribution to
    the image-text cosine."""
    if prompt and getattr(target, "clip", None) is None:
        raise ConfigError(f"--auto_prompt needs a CLIP model; {target.spec} has no text tower "
                          f"(leave it empty to rank by activation on the data set)")
    text = None
    if prompt:
        from vital.models.classnames import encode_texts
        text = encode_texts(target.clip, [prompt], target.device)[0].to(target.device)
    total, count = 0, 0
    for images, _ in iter_images(files, size, crop=crop):
        part = _prompt_attribution(target, neuron, images, text) if prompt else \
            channel_means(target, neuron.layer, neuron.layout, images, neuron.skip)
        total, count = total + part.sum(0), count + len(images)
    return total / max(count, 1)


def run_auto(cfg: InnerCFG, target, argv=None, callbacks: Callbacks | None = None):
    """Rank the layer's neurons, visualise the top ``cfg.auto``; returns (run_dirs, result)."""
    probe = resolve_target(target, cfg.layer, 0)
    if cfg.auto > probe.channels:
        raise ConfigError(f"--auto {cfg.auto} asks for more neurons than {cfg.layer} has "
                          f"({probe.channels}); valid: 1..{probe.channels} (or --neurons all)")
    size = cfg.data_size or target.input_size
    scores = rank_neurons(target, probe, data_files(cfg.data_dir), size, cfg.auto_prompt,
                          cfg.ref_crop)
    top = scores.topk(min(cfg.auto, len(scores)))
    print("ranked neurons of", cfg.layer, ":", ", ".join(
        f"{i} ({s:.3g})" for s, i in zip(top.values.tolist(), top.indices.tolist())))
    extras = {index: {"auto": {"rank": rank, "score": value,
                               "by": cfg.auto_prompt or "activation"}}
              for rank, (value, index) in enumerate(zip(top.values.tolist(),
                                                        top.indices.tolist()))}
    return run_neurons(cfg, target, list(extras), argv, extras, callbacks)


def run_neurons(cfg: InnerCFG, target, indices: list[int], argv=None,
                extras: dict | None = None, callbacks: Callbacks | None = None):
    """Neurons ``indices`` of ``cfg.layer``, ``cfg.batch_size`` per batched optimisation (1 =
    one run at a time); the data set's patches are scored once for all of them. Returns
    (run_dirs, last result)."""
    if len(set(indices)) != len(indices):
        raise ConfigError(f"a neuron appears twice in {indices}")
    neurons = [resolve_target(target, cfg.layer, i) for i in indices]   # all checked up front
    shared = functools.cache(lambda: layer_patch_scores(cfg, target, neurons[0]))  # on a miss
    extras = extras or {}

    def one_cfg(index):
        return dataclasses.replace(cfg, neuron=index, run_name=f"{cfg.run_name}_{index}"
                                   if cfg.run_name else "")
    cfgs = [one_cfg(i) for i in indices]
    if cfg.batch_size == 1:
        dirs, result = [], None
        for one, neuron in zip(cfgs, neurons):
            set_determinism(cfg.seed, cfg.deterministic, cfg.hard_determinism)
            run_dir, result = run_neuron(one, target, neuron, argv, extras.get(neuron.index),
                                         patch_scores=shared, callbacks=callbacks)
            dirs.append(run_dir)
            if ends_the_loop(result.stopped):
                print(f"stopped: {result.stopped}; {len(cfgs) - len(dirs)} runs not "
                      f"started", file=sys.stderr)
                break
        return dirs, result
    by_index = {n.index: n for n in neurons}
    runs = run_in_batches(cfgs, lambda c: plan_neuron(c, target, by_index[c.neuron],
                                                      extras.get(c.neuron), shared),
                          target, cfg.batch_size, argv, callbacks)
    return [run_dir for run_dir, _ in runs], runs[-1][1]


def run_inner(cfg: InnerCFG, argv=None, callbacks: Callbacks | None = None):
    """Inner neuron visualisation (or --neurons, --auto); returns (run_dir or run_dirs, last
    result)."""
    if not 0.0 <= cfg.relevance_floor < 1.0:
        raise ConfigError(f"--relevance_floor must be in [0, 1), got {cfg.relevance_floor}")
    if cfg.auto < 0 or cfg.relevance_every < 1:
        raise ConfigError(f"--auto must be >= 0 and --relevance_every >= 1, got {cfg.auto} and "
                          f"{cfg.relevance_every}")
    if (cfg.auto or cfg.neurons) and cfg.direction:
        raise ConfigError("--direction visualises one direction; leave out --neurons / --auto")
    check_ranking(cfg)
    _, target = prepare(cfg)
    if cfg.auto:
        return run_auto(cfg, target, argv, callbacks)
    if cfg.neurons:
        channels = resolve_target(target, cfg.layer, 0).channels
        return run_neurons(cfg, target, parse_units(cfg.neurons, channels), argv,
                           callbacks=callbacks)
    neuron = resolve_target(target, cfg.layer, cfg.neuron, cfg.direction)
    return run_neuron(cfg, target, neuron, argv, callbacks=callbacks)
