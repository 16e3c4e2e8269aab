"""Embedding arithmetic steering: "king - man + woman = queen" for images.

One base image is moved through embedding space: its embedding minus the mean embedding of the
``sub`` images, plus the mean embedding of the ``add`` images, gives a target,

    t = unit( unit(e(base)) - alpha * mean_i unit(e(sub_i)) + beta * mean_j unit(e(add_j)) ),

and an image that starts as the base (Laplacian pyramid initialised from it) is optimised toward
``t`` (1 - cosine), while sort matching to the base image's own features (the base is the
reference set) keeps its feature statistics, and so its look, natural. Every input is an image
file or a word, rendered as a typographic image (CLIP reads words; see ``vital.refs.words``).

``e`` is ``TargetModel.embed``: CLIP's image embedding, or for a classifier its penultimate
features (the pooled input of its last Linear). Both are normalised to unit length before and
after the arithmetic, as CLIP embeddings are compared by cosine. A classifier's features are
non-negative (after a ReLU), so a target entry can be negative where no image can follow; the
cosine then pushes those features toward zero. ``alpha = beta = 0`` makes ``t`` the base's own
direction, and the image stays (nearly) the base image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from vital.modes import setup
from vital.modes.runner import Callbacks, Plan, prepare, run_plan
from vital.config import ConfigError, opt
from vital.cache import write_json
from vital.optvis.losses import Objective, staged_sort_matching
from vital.models.opinion import make_opinion
from vital.imaging import grid, save_png, to_pil
from vital.refs.images import IMAGE_EXTENSIONS, load_image, resize_images
from vital.refs.references import sorted_features
from vital.refs.words import word_tensor

_ZERO_NORM = 1e-6   # a target shorter than this has no direction


@dataclass
class ArithmeticCFG(setup.RenderCFG):
    """Embedding arithmetic steering: base - alpha * mean(sub) + beta * mean(add)."""
    # the README's example, KING - MAN + WOMAN, as word images: the script runs without inputs
    base: str = opt("KING", "base image: an image file or a word drawn as a typographic image "
                    "(prefix file: or word: to force one reading)")
    add: list[str] = opt(["WOMAN"], "images (files or words) whose mean embedding is added")
    sub: list[str] = opt(["MAN"], "images (files or words) whose mean embedding is subtracted")
    add_beta: float = opt(1.0, "beta: weight of the mean embedding of --add")
    sub_alpha: float = opt(1.0, "alpha: weight of the mean embedding of --sub")
    target_weight: float = opt(10.0, "weight of the cosine term toward the target embedding",
                               low=0)
    font: str = opt("", "font file for word images (empty = DejaVu Sans Bold from matplotlib)")
    ref_views: int = opt(8, "augmented copies of the base added to its reference set", low=0)
    # RenderCFG fields with other defaults, help or spellings for this mode
    layers: list[str] = opt([], "layers for sort matching to the base (empty = the model's "
                            "default layers without the two deepest; see query_model_layers.py)")
    deterministic: bool = opt(True, "seed everything and fix cuDNN algorithms",
                              negative_flags=("--no_determinism",))
    flip: bool = opt(False, "random horizontal flips (off: mirrored words are hard to read)")
    tv_weight: float = opt(0.01, "total-variation prior weight (small: the base is natural)",
                           low=0)
    lr: float = opt(0.02, "peak Adam learning rate (low: the start is already an image)",
                    positive=True)
    steps_multires: list[int] = opt([100, 200], "steps per resolution stage, low to high "
                                    "(each stage doubles the size, the last is full size)", low=1)


# ----------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Operand:
    """One input: an image file or a word, with a short label for names and the strip."""
    kind: str    # "file" | "word"
    value: str   # the path or the text
    label: str


def parse_operand(spec: str, role: str) -> Operand:
    """``file:PATH`` / ``word:TEXT`` say what a spec is; otherwise an existing file is a file,
    something that looks like a path (a ``/`` or an image suffix) must exist, the rest is a word."""
    spec = str(spec)
    if spec.startswith("word:"):
        return _word(spec[len("word:"):], role)
    if spec.startswith("file:"):
        return _file(spec[len("file:"):], role)
    if not spec.strip():
        raise ValueError(f"{role} is empty: give an image file or a word such as 'MAN'")
    if Path(spec).expanduser().is_file():
        return _file(spec, role)
    if "/" in spec or "\\" in spec or spec.lower().endswith(IMAGE_EXTENSIONS):
        raise FileNotFoundError(f"{role} image {spec!r} does not exist; give an existing image "
                                f"file, or word:{spec} to draw this text as a word image")
    return _word(spec, role)


def _word(text: str, role: str) -> Operand:
    if not text.strip():
        raise ValueError(f"{role} is an empty word: a word image needs a visible character")
    return Operand("word", text, " ".join(text.split()))


def _file(path: str, role: str) -> Operand:
    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{role} image {path!r} does not exist")
    path = Path(path).expanduser()
    label = f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    return Operand("file", str(path), label)


def load_operand(op: Operand, size: int, font: str = "") -> torch.Tensor:
    """The operand as (3, size, size) in [0, 1] (files: short side resized, centre crop)."""
    if op.kind == "word":
        return word_tensor(op.value, size, font or None)
    try:
        return load_image(op.value, size)
    except OSError as err:   # includes PIL's UnidentifiedImageError
        raise ValueError(f"cannot read image {op.value!r}: {err}") from None


@dataclass
class Inputs:
    base: tuple[Operand, torch.Tensor]
    add: list[tuple[Operand, torch.Tensor]]
    sub: list[tuple[Operand, torch.Tensor]]


def load_inputs(cfg: ArithmeticCFG, size: int) -> Inputs:
    def load(specs, role):
        ops = [parse_operand(s, f"{role}[{k}]" if role != "base" else role)
               for k, s in enumerate(specs)]
        return [(op, load_operand(op, size, cfg.font)) for op in ops]
    return Inputs(load([cfg.base], "base")[0], load(cfg.add, "add"), load(cfg.sub, "sub"))


# ----------------------------------------------------------------- the arithmetic

def target_embedding(base: torch.Tensor, add: torch.Tensor | None = None,
                     sub: torch.Tensor | None = None, add_beta: float = 1.0,
                     sub_alpha: float = 1.0) -> torch.Tensor:
    """``unit(unit(base) - sub_alpha * mean(unit(sub)) + add_beta * mean(unit(add)))``.

    ``base`` (E,); ``add`` and ``sub`` (N, E) or None / empty. Returns a unit vector (E,).
    """
    for name, value in (("add_beta", add_beta), ("sub_alpha", sub_alpha)):
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    t = F.normalize(base.double(), dim=-1)
    if sub is not None and len(sub):
        t = t - sub_alpha * F.normalize(sub.double(), dim=-1).mean(0)
    if add is not None and len(add):
        t = t + add_beta * F.normalize(add.double(), dim=-1).mean(0)
    if t.norm() < _ZERO_NORM:
        raise ConfigError("the target embedding is zero (the terms cancel out); change "
                          "--sub_alpha / --add_beta or the images")
    return F.normalize(t, dim=-1).to(base.dtype)


@torch.no_grad()
def embed_images(target, images: list[torch.Tensor]) -> torch.Tensor | None:
    """(N, E) embeddings of (3, H, W) images, or None for an empty list."""
    if not images:
        return None
    return target.embed(torch.stack(images).to(target.device)).float().cpu()


def steering_objective(goal: torch.Tensor, weight: float = 1.0) -> Objective:
    """Term ``arithmetic``: 1 - cosine of the image's embedding with ``goal`` (E,).

    The embedding is ``ctx["embed"]``, which the render loop reads during its own forward when
    the plan asks for it (``Plan.embed``); without it, ``ctx["output"]``.
    """
    goal = goal.detach()

    def fn(ctx) -> torch.Tensor:
        emb = ctx.get("embed", ctx["output"])
        return 1.0 - F.cosine_similarity(emb, goal.to(emb).expand_as(emb), dim=-1).mean()
    return weight * Objective(fn, "arithmetic")


def base_references(target, layers: list[str], base: torch.Tensor, sizes, augment=None,
                    views: int = 0, seed: int = 0) -> dict:
    """{stage size: {layer: (C, P) sorted features of the base image at that size}}.

    With ``augment`` and ``views`` > 0 the reference set is the base plus ``views`` augmented
    copies (drawn from their own generator, so the render's random stream is unchanged): the
    synthetic image is augmented at every step, and matching it to the plain base alone would
    pull even an unchanged base away from itself.
    """
    refs = {}
    for size in sorted(set(sizes)):
        plain = resize_images(base[None], size)
        gen = torch.Generator().manual_seed(seed)
        copies = [augment(plain, gen) for _ in range(views)] if augment is not None else []
        refs[size] = sorted_features(target, layers, torch.cat([plain] + copies), progress=False)
    return refs


def formula(inputs: Inputs, cfg: ArithmeticCFG) -> str:
    """``KING - 1*MAN + 1*WOMAN`` (several images of one sign are averaged: ``(A, B)``)."""
    def group(items):
        labels = [op.label for op, _ in items]
        return labels[0] if len(labels) == 1 else f"({', '.join(labels)})"
    text = inputs.base[0].label
    if inputs.sub:
        text += f" - {cfg.sub_alpha:g}*{group(inputs.sub)}"
    if inputs.add:
        text += f" + {cfg.add_beta:g}*{group(inputs.add)}"
    return text


# ----------------------------------------------------------------- one run

def plan_arithmetic(cfg: ArithmeticCFG, target) -> tuple[Plan, Inputs, torch.Tensor]:
    """The arithmetic run as a value, with its inputs and unit target embedding."""
    size = setup.image_size(cfg, target)
    layers, weights = setup.resolve_layers(
        replace(cfg, layers=list(cfg.layers) or shallow_layers(target)), target)
    schedule = setup.make_schedule(cfg, target)
    inputs = load_inputs(cfg, size)
    goal = goal_of(target, inputs, cfg)
    text = formula(inputs, cfg)
    name = f"{text}_{Path(str(target.spec)).name}_s{cfg.seed}".replace(" ", "")
    objective = _objective(cfg, target, layers, weights, inputs.base[1],
                           schedule.stage_sizes(size), goal)
    gen = setup.generator_for(cfg, target.device)
    init = None if cfg.init_image else inputs.base[1][None]   # --init_image overrides
    param = setup.make_param(cfg, size, target.device, gen, init=init)
    plan = Plan("arithmetic", target, objective, layers, param, schedule,
                setup.make_augment(cfg), gen, name, _meta(cfg, inputs, layers, weights),
                embed=True,
                after=lambda run_dir, result: write_report(cfg, target, run_dir, result,
                                                           inputs, goal, text))
    return plan, inputs, goal


def run_arithmetic(cfg: ArithmeticCFG, argv=None, callbacks: Callbacks | None = None):
    """One arithmetic steering run; returns (run_dir, result)."""
    _, target = prepare(cfg)
    plan, _, _ = plan_arithmetic(cfg, target)
    return run_plan(cfg, plan, argv, callbacks)


def shallow_layers(target) -> list[str]:
    """The default sort-matching layers: the model's VITAL layers without the two deepest. Those
    carry the meaning that the arithmetic is meant to change; matching them to the base would
    hold it in place. The shallow ones keep colours, textures and parts natural."""
    layers = target.default_layers()
    return layers[:max(1, len(layers) - 2)]


def goal_of(target, inputs: Inputs, cfg: ArithmeticCFG) -> torch.Tensor:
    """The unit target embedding (E,) of the run's inputs."""
    def embs(items):
        return embed_images(target, [im for _, im in items])
    return target_embedding(embs([inputs.base])[0], embs(inputs.add), embs(inputs.sub),
                            cfg.add_beta, cfg.sub_alpha)


def _objective(cfg, target, layers, weights, base, sizes, goal) -> Objective:
    objective = cfg.target_weight * steering_objective(goal.to(target.device))
    objective = objective + setup.priors(cfg)
    if cfg.feat_weight:
        refs = base_references(target, layers, base, sizes, setup.make_augment(cfg),
                               cfg.ref_views, cfg.seed)
        objective = cfg.feat_weight * staged_sort_matching(
            refs, dict(zip(layers, weights))) + objective
    if not isinstance(objective, Objective) or not objective.names:
        raise ConfigError("every weight is zero: nothing to optimise")
    return objective


def _meta(cfg, inputs: Inputs, layers, weights) -> dict:
    def describe(items):
        return [{"kind": op.kind, "value": op.value} for op, _ in items]
    return {"formula": formula(inputs, cfg), "base": describe([inputs.base])[0],
            "add": describe(inputs.add), "sub": describe(inputs.sub),
            "layers": layers, "layer_weights": weights}


# ----------------------------------------------------------------- what the run leaves

def write_report(cfg, target, run_dir: Path, result, inputs: Inputs, goal: torch.Tensor,
                 text: str) -> dict:
    """``arithmetic_strip.png`` and ``arithmetic.json`` in the run folder; prints a summary."""
    image = result.image[:1].detach().float().cpu()
    base = inputs.base[1][None]
    summary = {"formula": text, "embedding": embedding_kind(target),
               "sub_alpha": cfg.sub_alpha, "add_beta": cfg.add_beta,
               "cosine": _cosines(target, image, inputs, goal),
               "mean_abs_pixel_change": round(float((image - base).abs().mean()), 5),
               "opinion": _opinions(cfg, target, base, image)}
    write_json(run_dir / "arithmetic.json", summary)
    strip = run_dir / "arithmetic_strip.png"
    save_png(_strip(inputs, image), strip)
    _print(summary, strip)
    return summary


def embedding_kind(target) -> str:
    if getattr(target, "clip", None) is not None:
        return "CLIP image embedding"
    if target.kind == "classifier":
        return "penultimate features (input of the last Linear)"
    return "model output"


def _cosines(target, image, inputs: Inputs, goal) -> dict:
    result, base = embed_images(target, [image[0], inputs.base[1]])

    def cos(a, b) -> float:
        return round(float(F.cosine_similarity(a, b, dim=-1)), 5)

    def to_each(items):
        embs = embed_images(target, [im for _, im in items])
        return {} if embs is None else {op.label: cos(result, e) for (op, _), e in zip(items, embs)}
    return {"base_to_target": cos(base, goal), "result_to_target": cos(result, goal),
            "result_to_base": cos(result, base), "result_to_add": to_each(inputs.add),
            "result_to_sub": to_each(inputs.sub)}


def _opinions(cfg, target, base, image) -> dict:
    opinion = make_opinion(target, cfg.prompts_file, top_k=cfg.top_k, progress=cfg.progress)
    if opinion is None:
        return {}
    return {"base": opinion(base.to(target.device)), "result": opinion(image.to(target.device))}


def _strip(inputs: Inputs, image: torch.Tensor):
    """base | result | the add images | the sub images, labelled."""
    tiles = [(inputs.base[1], f"base: {inputs.base[0].label}"), (image[0], "result")]
    tiles += [(im, f"+ {op.label}") for op, im in inputs.add]
    tiles += [(im, f"- {op.label}") for op, im in inputs.sub]
    return grid([to_pil(t) for t, _ in tiles], [label for _, label in tiles])


def _print(summary: dict, strip: Path) -> None:
    cos = summary["cosine"]
    print(f"arithmetic: {summary['formula']}  ({summary['embedding']})")
    for key in ("base", "result"):
        if key in summary["opinion"]:
            print(f"  {key} opinion: {summary['opinion'][key]['opinion_text']}")
    print(f"  cosine to target: base {cos['base_to_target']:.3f} -> result "
          f"{cos['result_to_target']:.3f}; result to base {cos['result_to_base']:.3f}")
    print(strip)
