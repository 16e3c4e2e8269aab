"""What every visualisation mode's plan is built from: the common CFG fields (``RenderCFG``) and
the setup steps (image size, layers, schedule, augmentation, parameterisation, reference
sort matching, priors, random generator). The runner (``vital.modes.runner``) does the rest.
"""
from __future__ import annotations

import hashlib

from dataclasses import dataclass

import torch

from vital.config import ConfigError, RecipeDefaults, opt
from vital.models.memory import check_memory
from vital.optvis import losses
from vital.optvis import param as params_mod
from vital.optvis import transforms
from vital.optvis.losses import Objective, staged_sort_matching
from vital.optvis.render import Schedule
from vital.refs.images import load_image, load_images, resize_images
from vital.refs.references import reference_quantiles, sorted_features


@dataclass
class RenderCFG(RecipeDefaults):
    """Settings shared by every visualisation mode."""
    model: str = opt("efficientnet-lite0", "model spec: efficientnet-lite0, ViT-B/32, RN50, "
                     "hf-hub:ORG/REPO, torchvision:NAME, or a weights file")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    size: int = opt(0, "image size in px (0 = the model's input size)", low=0, high=4096)
    ref_size: str = opt("auto", "px of the reference images: auto (the stage size up to the "
                        "model's input size, the input size above it), stage, native, or a number")
    steps: int = opt(0, "total steps at full size; > 0 overrides steps_multires", low=0)
    steps_multires: list[int] = opt([200, 400], "steps per resolution stage, low to high "
                                    "(each stage doubles the size, the last is full size)",
                                    low=1)
    lr: float = opt(0.05, "peak Adam learning rate", positive=True)
    warmup: int = opt(20, "linear learning-rate warm-up steps per stage", low=0)
    adam_eps: float = opt(1e-8, "Adam epsilon: larger values (e.g. 0.1) damp the fine grain Adam "
                          "adds where the gradient is almost zero (arithmetic with alpha = beta "
                          "= 0) but also weaken real steering (docs/arithmetic.md)",
                          positive=True)
    adam_betas: list[float] = opt([0.5, 0.99], "Adam betas (the official VITAL code: 0.5 0.9)")
    lr_final: float = opt(0.05, "the cosine decay ends at lr * lr_final (the official code: 0)",
                          low=0)
    early_stop: float = opt(0.0, "stop the last stage early when its mean loss over the last "
                            "--early_window steps improved by less than this fraction of the "
                            "window before (e.g. 0.01; 0 = run every step); metrics.json records "
                            "the step", low=0.0)
    early_window: int = opt(40, "steps per window of --early_stop", low=2)
    prior_form: str = opt("mean", "tv and l2 priors: mean (means over pixels, on the image in "
                          "[0, 1]) or paper (the official code's sums of norms on the model's "
                          "normalised input)", choices=["mean", "paper"])
    ref_crop: float = opt(1.0, "centre crop of the reference images as a fraction of the short "
                          "side (0.875 = Resize 256 + CenterCrop 224, the official code's)",
                          positive=True, high=1.0)
    batch: int = opt(1, "images optimised together", low=1)
    precision: str = opt("fp32", "the model's forward: fp32, or bf16 under autocast (CPU and "
                         "CUDA; features, sort matching and the loss stay fp32)",
                         choices=["fp32", "bf16"])
    param: str = opt("laplacian", "image parameterisation",
                     choices=sorted(params_mod.PARAMETERISATIONS))
    pyramid_levels: int = opt(4, "levels of the Laplacian pyramid", low=1)
    pyramid_gain: float = opt(1.0, "Laplacian pyramid: level k (k = 0 finest) is scaled by "
                              "gain^k; < 1 makes coarse levels move slower than fine ones",
                              positive=True)
    init_image: str = opt("", "start from this image instead of noise")
    layers: list[str] = opt([], "layers for sort matching (empty = the model's defaults; "
                            "see query_model_layers.py)")
    layer_weights: list[float] = opt([], "one weight per layer (empty = all 1)", low=0)
    feat_weight: float = opt(1.0, "weight of the sort-matching terms (0 = none)")
    sort_positions: int = opt(0, "match each layer with more positions on a random subset of "
                              "this many per step (0 = all; plain sort matching, not with "
                              "--relevance): faster, noisier; its effect on "
                              "quality is not measured yet", low=0)
    sort_keys: str = opt("exact", "how sort matching ranks the synthetic features on CPU: "
                         "exact (float32) or q16 (each channel's values quantised to 16 bits "
                         "of its range: a ~3x faster sort; values closer than 1/65535 of the "
                         "range may swap ranks; GPUs rank exactly); docs/budget.md",
                         choices=list(losses.SORT_KEYS))
    tv_weight: float = opt(0.05, "total-variation prior weight", low=0)
    l2_weight: float = opt(0.0, "L2 prior weight (pulls pixels toward grey)", low=0)
    jitter: int = opt(8, "max roll jitter in px per step", low=0)
    scales: list[float] = opt([0.95, 1.0, 1.05], "random scale factors per step", positive=True)
    flip: bool = opt(True, "random horizontal flips")
    noise: float = opt(0.0, "std of additive Gaussian noise per step", low=0)
    seed: int = opt(0, "random seed")
    deterministic: bool = opt(True, "seed everything and fix cuDNN algorithms")
    hard_determinism: bool = opt(False, "also torch.use_deterministic_algorithms + CUBLAS config")
    save_steps: int = opt(200, "save a PNG and the opinion every N steps (0 = only the end)",
                          low=0)
    out_dir: str = opt("", "parent folder of the run folder (default out_<mode>)")
    run_name: str = opt("", "run folder name (default from the target); never overwritten")
    prompts_file: str = opt("input_prompts/prompts.txt", "CLIP: prompts scored at each save")
    top_k: int = opt(5, "how many words / classes the opinion shows", low=0)
    cache: bool = opt(True, "cache reference features on disk ($VITAL_CACHE)")
    progress: bool = opt(True, "show progress bars")


def image_size(cfg: RenderCFG, target) -> int:
    size = cfg.size or target.input_size
    if not 16 <= size <= 4096:
        raise ConfigError(f"--size {size} is impossible; use 16..4096 px (0 = the model's "
                          f"input size, {target.input_size})")
    patch = getattr(target, "patch_size", 1)
    if patch > 1 and size % patch:
        low, high = max(patch, size // patch * patch), (size // patch + 1) * patch
        raise ConfigError(f"--size {size} is not a multiple of {target.spec}'s patch size "
                          f"{patch}: the last {size % patch} px would never reach a token; "
                          f"use {low} or {high}")
    check_memory(target, size, cfg.batch)   # refuse before loading anything else
    return size


def resolve_layers(cfg: RenderCFG, target, mode: str = "class") -> tuple[list[str], list[float]]:
    """The layers to match and their weights, checked against the model. ``--layers paper``
    takes the official VITAL code's layers for this architecture and, without
    ``--layer_weights``, its weights for ``mode`` ("class" or "inner")."""
    if list(cfg.layers) == ["paper"]:
        from vital.models.paper import paper_layers
        layers, weights = paper_layers(target, mode)
        if cfg.layer_weights:
            weights = list(cfg.layer_weights)
            if len(weights) != len(layers):
                raise ConfigError(f"{len(weights)} layer_weights for the {len(layers)} paper "
                                  f"layers {layers}")
        return layers, weights
    layers = list(cfg.layers) or target.default_layers()
    valid = [info.name for info in target.layers()]
    unknown = [name for name in layers if name not in valid]
    if unknown:   # close matches and where to find the rest, not the whole list
        raise ConfigError(str(target.unknown_layer(unknown[0], valid)))
    weights = list(cfg.layer_weights) or [1.0] * len(layers)
    if len(weights) != len(layers):
        raise ConfigError(f"{len(weights)} layer_weights for {len(layers)} layers {layers}")
    return layers, weights


def make_schedule(cfg: RenderCFG, target=None) -> Schedule:
    """The optimisation schedule; with ``target``, every stage size of a ViT is a multiple of
    its patch size (a 112 px stage of a ViT-B/32 would see a 3 x 3 token grid, 128 px sees 4 x
    4)."""
    stages = (cfg.steps,) if cfg.steps > 0 else tuple(cfg.steps_multires)
    if not stages or any(s <= 0 for s in stages):
        raise ConfigError(f"steps must be positive, got steps={cfg.steps} "
                          f"steps_multires={cfg.steps_multires}")
    if not cfg.lr > 0 or not cfg.adam_eps > 0:
        raise ConfigError(f"lr and adam_eps must be positive numbers, got lr={cfg.lr} "
                          f"adam_eps={cfg.adam_eps}")
    betas = tuple(float(b) for b in cfg.adam_betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {list(cfg.adam_betas)}")
    if not 0 <= cfg.lr_final <= 1:
        raise ConfigError(f"lr_final is a fraction of lr in [0, 1], got {cfg.lr_final}")
    multiple = getattr(target, "patch_size", 1) if target is not None else 1
    return Schedule(steps_multires=stages, lr=cfg.lr, warmup=cfg.warmup, eps=cfg.adam_eps,
                    betas=betas, min_lr_frac=cfg.lr_final, size_multiple=multiple,
                    early_stop=cfg.early_stop, early_window=cfg.early_window)


def make_augment(cfg: RenderCFG):
    return transforms.standard(jitter=cfg.jitter, scales=cfg.scales, flip=cfg.flip, noise=cfg.noise)


def make_param(cfg: RenderCFG, size: int, device, generator, init: torch.Tensor | None = None,
               target=None, **kw):
    """The image parameterisation; ``init`` (or ``cfg.init_image``) replaces the noise start.
    ``pixel_norm`` works in ``target``'s normalised space."""
    if init is None and cfg.init_image:
        try:
            init = load_image(cfg.init_image, size)[None]
        except (OSError, ValueError) as err:   # missing, corrupt, not an image (PIL: OSError)
            raise ConfigError(f"--init_image {cfg.init_image} cannot be read as an image: "
                              f"{err}") from None
    if init is not None:
        init = init.to(device)
    if cfg.param == "laplacian":
        kw.setdefault("levels", cfg.pyramid_levels)
        kw.setdefault("level_gain", getattr(cfg, "pyramid_gain", 1.0))
    if cfg.param == "pixel_norm" and target is not None:
        kw.setdefault("mean", target.mean)
        kw.setdefault("std", target.std)
    return params_mod.make_param(cfg.param, size=size, batch=cfg.batch, init=init,
                                 generator=generator, device=device, **kw)


def maco_magnitude(files, size: int, num: int | None = None) -> torch.Tensor:
    """The fixed amplitude spectrum of ``--param maco``: the mean spectrum (3, size, size//2+1)
    of real images (e.g. the run's references) at the image size."""
    images, _ = load_images(list(files), size, num)
    return params_mod.magnitude_spectrum(images)


def reference_sizes(cfg, target, sizes) -> dict[int, int]:
    """Stage size -> px of the reference images matched at that stage (``cfg.ref_size``).

    Above the model's input size the default takes the references at the input size (the
    size the model was trained at); sort matching resamples their quantiles to the stage's
    larger number of positions (``losses.resample_quantiles``).
    """
    choice, native = str(getattr(cfg, "ref_size", "auto")).strip().lower(), target.input_size
    if choice == "auto":
        return {s: min(s, native) for s in sizes}
    if choice in ("stage", "0"):
        return {s: s for s in sizes}
    if choice == "native":
        return {s: native for s in sizes}
    if choice.isdigit() and 16 <= int(choice) <= 4096:
        return {s: int(choice) for s in sizes}
    raise ConfigError(f"--ref_size {cfg.ref_size!r} is not valid; use auto, stage (or 0), "
                      f"native ({native} px for {target.spec}) or a size of 16..4096 px")


def reference_objective(cfg: RenderCFG, target, layers, weights, files, sizes, num) -> tuple:
    """Sort-matching objective against real images for every stage size; returns (obj, info,
    meta): ``info`` per stage size (its "size" is the references' px, see
    ``reference_sizes``), ``meta`` = {"ref_sizes": {stage px: reference px}}."""
    ref_px = reference_sizes(cfg, target, sizes)
    by_px, px_info = {}, {}
    for px in sorted(set(ref_px.values())):
        quantiles, px_info[px] = reference_quantiles(target, layers, files, px, num=num,
                                                     use_cache=cfg.cache, progress=cfg.progress,
                                                     crop=getattr(cfg, "ref_crop", 1.0))
        by_px[px] = {k: v.to(target.device) for k, v in quantiles.items()}  # once, not per step
    refs = {s: by_px[px] for s, px in ref_px.items()}
    obj = staged_sort_matching(refs, dict(zip(layers, weights)),
                               positions=getattr(cfg, "sort_positions", 0),
                               generator=torch.Generator().manual_seed(cfg.seed),
                               keys=getattr(cfg, "sort_keys", "exact"))
    meta = {"ref_sizes": {str(s): px for s, px in ref_px.items()}}
    return cfg.feat_weight * obj, {s: px_info[px] for s, px in ref_px.items()}, meta


def relevance_objective(cfg, target, layers, weights, images: torch.Tensor, sizes,
                        target_layer: str, score_fn, rule: str, floor: float = 0.0,
                        every: int = 1, native: bool = False) -> tuple[Objective, dict, object]:
    """Sort matching against ``images`` (N, 3, S, S), resized to each stage size (or with
    ``native`` at their own S px for every stage: their feature quantiles are resampled to the
    stage's positions), weighted by relevance for ``score_fn`` on ``target_layer`` (VITAL's
    relevant information flow; ``rule`` "none" = plain sort matching); returns (feat_weight x
    objective, info with the most important channels per stage, the synthetic image's
    ``SyntheticMaps`` or None)."""
    from vital.optvis import relevance as rel
    refs, importance, info = {}, {}, {}
    for size in sorted(set(sizes)):
        if native and refs:                  # the same references at every stage
            first = next(iter(refs))
            refs[size], info[str(size)] = refs[first], info.get(str(first))
            if rule != "none":
                importance[size] = importance[first]
            continue
        resized = images if native else resize_images(images, size)
        if rule == "none":
            refs[size] = sorted_features(target, layers, resized, progress=cfg.progress)
        else:
            refs[size], importance[size] = rel.weighted_references(
                target, resized, layers, target_layer, score_fn, rule, floor=floor)
            info[str(size)] = {k: v.topk(min(5, len(v))).indices.tolist()
                               for k, v in importance[size].items()}
        refs[size] = {k: v.to(target.device) for k, v in refs[size].items()}
    maps = None
    if rule == "none":
        obj = staged_sort_matching(refs, dict(zip(layers, weights)),
                                   keys=getattr(cfg, "sort_keys", "exact"))
    else:
        maps = rel.SyntheticMaps(target, layers, target_layer, score_fn, rule, every,
                                 floor=floor)
        obj = rel.relevance_sort_matching(refs, importance, dict(zip(layers, weights)), maps)
    return cfg.feat_weight * obj, {"top_channels_by_relevance": info}, maps


def priors(cfg: RenderCFG, target=None) -> Objective | int:
    """TV and L2 priors: means on the image (``prior_form mean``) or the official code's sums
    of norms on the model's normalised input (``paper``, needs ``target``)."""
    if getattr(cfg, "prior_form", "mean") == "paper":
        if target is None:
            raise ConfigError("prior_form paper needs the model's normalisation")
        return losses.paper_prior_objectives(target.mean, target.std, cfg.tv_weight,
                                             cfg.l2_weight)
    return cfg.tv_weight * losses.tv_objective() + cfg.l2_weight * losses.l2_objective()


def generator_for(cfg: RenderCFG, device, salt: str = "") -> torch.Generator:
    """The run's generator (start image, augmentation): seeded with ``cfg.seed``, or with a
    number derived from the seed and ``salt`` (e.g. a unit's label, so that units of one layer
    start from different images and each unit's picture is the same alone and in a batch)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(salted_seed(cfg.seed, salt))
    return gen


def salted_seed(seed: int, salt: str = "") -> int:
    """``seed`` itself without a salt; otherwise 63 bits of sha256("seed:salt") (stable across
    processes and machines, unlike Python's ``hash``)."""
    if not salt:
        return seed
    digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
