"""Concepts as in CRAFT (Fel et al. 2023, "CRAFT: Concept Recursive Activation FacTorization"):
directions in a layer's feature space shared by many neurons, found by non-negative matrix
factorisation of the activations of image patches.

Steps: cut the reference images into patches (each patch is a full-size model input) ->
activations at one layer ((C, P): CNN positions, ViT patch tokens without the class token) ->
made non-negative -> averaged over positions -> NMF ``A ~ U W`` with ``K`` concepts
(``W`` (K, C'): directions, ``U`` (M, K): coefficient of each concept in each patch) -> a
:class:`vital.concepts.bank.ConceptBank`. Concepts are ranked by their contribution to the output, and
``direction_objective`` steers a synthetic image along a direction.

Non-negativity (``nonneg``): ``relu`` keeps the positive part (exact for post-ReLU layers);
``split`` stacks ``[relu(x), relu(-x)]`` (C' = 2C), a lossless map for signed layers such as a
ViT's residual stream, inverted by ``positive - negative``; ``auto`` picks ``relu`` when every
activation seen is >= 0, else ``split``.

Register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"): ViTs park global
information in a few tokens of very high norm. A token whose L2 norm in the residual stream
exceeds ``threshold`` (times the image's median token norm when ``relative``) is flagged; with
``exclude`` it takes no part in the concept vectors or the ranking.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vital.concepts import sobol
from vital.concepts.bank import ConceptBank
from vital.optvis.losses import Objective
from vital.models import channels_positions
from vital.refs.patches import crop_patches
from vital.cache import files_digest
from vital.refs.images import load_images

NONNEG = ("auto", "relu", "split")
RANKINGS = ("sobol", "gradient")
_CONCEPT_LAYOUTS = ("BCHW", "BND", "BC")


# ---------------------------------------------------------------- layers

@dataclass(frozen=True)
class LayerView:
    """How a layer's output is read as (B, C, P) image positions."""
    name: str
    layout: str
    shape: tuple          # output shape for batch 1 at the model's input size
    skip: int             # leading positions that are not image patches (ViT class token)
    stream: str | None    # residual-stream layer for register detection (ViT only)


def layer_view(target, name: str) -> LayerView:
    """Check that ``name`` can hold concepts (conv map, token sequence or vector)."""
    info = target.layer_info(name)
    if info.layout not in _CONCEPT_LAYOUTS:
        raise ValueError(f"layer {name!r} has layout {info.layout}; concepts need a conv map "
                         f"(BCHW), tokens (BND) or a vector (BC)")
    vit = target.kind == "clip-vit" and info.layout == "BND"
    return LayerView(name, info.layout, tuple(info.shape), 1 if vit else 0,
                     _stream_layer(name) if vit else None)


def _stream_layer(name: str) -> str | None:
    """The residual stream a ViT layer belongs to: ``block.3.mlp`` -> ``block.3``."""
    if name == "embed":
        return "embed"
    match = re.match(r"block\.(\d+)", name)
    return f"block.{match.group(1)}" if match else None


def default_concept_layer(target) -> str:
    """The deepest of the model's default layers (late layers carry object parts); for a CLIP
    ViT the one before it: after the last block only the class token reaches the output, so
    patch-token concepts there cannot change it."""
    layers = target.default_layers()
    return layers[-2] if target.kind == "clip-vit" and len(layers) > 1 else layers[-1]


# ---------------------------------------------------------------- non-negativity

def resolve_nonneg(mode: str, min_value: float) -> str:
    if mode not in NONNEG:
        raise ValueError(f"unknown nonneg mode {mode!r}; valid: {', '.join(NONNEG)}")
    if mode == "auto":
        return "relu" if min_value >= 0 else "split"
    return mode


def to_nonneg(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, P) -> (B, C', P) with C' = C (relu) or 2C (split)."""
    if mode == "relu":
        return x.clamp_min(0)
    if mode == "split":
        return torch.cat([x.clamp_min(0), (-x).clamp_min(0)], dim=1)
    raise ValueError(f"nonneg mode must be relu or split here, got {mode!r}")


def from_nonneg(a: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C', P) -> (B, C, P): the inverse of ``to_nonneg`` on its image."""
    if mode == "relu":
        return a
    half = a.shape[1] // 2
    return a[:, :half] - a[:, half:]


# ---------------------------------------------------------------- registers

@dataclass(frozen=True)
class RegisterRule:
    threshold: float = 3.0   # L2-norm limit (times the median token norm when relative)
    relative: bool = True
    exclude: bool = False    # drop flagged tokens from concept vectors and ranking


def high_norm_tokens(stream: torch.Tensor, rule: RegisterRule) -> torch.Tensor:
    """(B, N) bool: tokens of ``stream`` (B, N, D) whose L2 norm exceeds the rule's limit."""
    norms = stream.float().norm(dim=-1)
    limit = rule.threshold * (norms.median(dim=1, keepdim=True).values if rule.relative else 1.0)
    return norms > limit


# ---------------------------------------------------------------- activations

@dataclass
class Activations:
    acts: torch.Tensor      # (N, C, P) float32 on CPU, image positions only
    keep: torch.Tensor      # (N, P) bool: positions used (False = excluded register token)
    flagged: int = 0        # high-norm tokens found (excluded or not)


def _positions(view: LayerView, feats: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, P) image positions of the layer, and the stream tokens (B, P, D) for registers."""
    x = channels_positions(feats[view.name], view.layout)[..., view.skip:]
    stream = feats[view.stream][:, view.skip:] if view.stream else None
    return x, stream


@torch.no_grad()
def layer_activations(target, view: LayerView, images: torch.Tensor, rule: RegisterRule,
                      batch: int = 16, progress: bool = False) -> Activations:
    """Activations of ``images`` (N, 3, S, S) at the layer, with register tokens flagged."""
    names = [view.name] + ([view.stream] if view.stream and view.stream != view.name else [])
    acts, flags = [], []
    with target.hooks(names) as feats:
        for chunk in tqdm(images.split(batch), desc=f"activations {view.name}",
                          disable=not progress, leave=False):
            target(chunk.to(target.device))
            x, stream = _positions(view, feats)
            acts.append(x.float().cpu())
            flags.append(high_norm_tokens(stream, rule).cpu() if stream is not None
                         else torch.zeros(x.shape[0], x.shape[-1], dtype=torch.bool))
    flagged = torch.cat(flags)
    keep = ~flagged if rule.exclude else torch.ones_like(flagged)
    if not keep.any(dim=1).all():
        raise ValueError(f"the register rule {rule} excludes every token of some image; "
                         f"raise --register_threshold")
    return Activations(torch.cat(acts), keep, int(flagged.sum()))


def pooled(a: Activations, mode: str) -> torch.Tensor:
    """(N, C') non-negative activations averaged over the kept positions."""
    x = to_nonneg(a.acts, mode)
    w = a.keep[:, None, :].float()                         # (N, P) -> (N, 1, P)
    return (x * w).sum(-1) / w.sum(-1)


# ---------------------------------------------------------------- factorisation

def factorise(x: torch.Tensor, k: int, seed: int = 0,
              max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """NMF ``x (M, C') ~ U (M, K) @ W (K, C')`` (scikit-learn, nndsvda start, deterministic).

    Returns U, W and info: relative reconstruction error ||x - UW|| / ||x||, iterations, and
    whether the solver converged."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning
    m, c = x.shape
    if not 1 <= k <= min(m, c):
        raise ValueError(f"cannot find {k} concepts in {m} patches x {c} channels; use "
                         f"1..{min(m, c)} (more reference images give more patches)")
    data = x.double().numpy()
    model = NMF(n_components=k, init="nndsvda", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        u = model.fit_transform(data)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    rel = float(model.reconstruction_err_ / max(np.linalg.norm(data), 1e-12))
    info = {"relative_error": rel, "iterations": int(model.n_iter_), "converged": converged}
    return torch.from_numpy(u).float(), torch.from_numpy(model.components_).float(), info


def coefficients(x: torch.Tensor, w: torch.Tensor, max_iter: int = 500) -> torch.Tensor:
    """Non-negative U (M, K) minimising ||x (M, C') - U W||, with the directions W fixed."""
    from sklearn.decomposition import non_negative_factorization
    h = w.double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a few unconverged rows do not matter for ranking
        u, _, _ = non_negative_factorization(x.double().numpy(), H=h, n_components=h.shape[0],
                                             init="custom", update_H=False, max_iter=max_iter)
    return torch.from_numpy(u).float()


# ---------------------------------------------------------------- the bank

@dataclass
class ExtractSettings:
    layer: str
    size: int                       # px of every model input (a patch, or a full image)
    n_concepts: int = 8
    patch_frac: float = 0.5         # patch side / reference image side
    patch_stride: float = 0.5       # grid step / patch side
    nonneg: str = "auto"
    top_patches: int = 8
    seed: int = 0
    max_iter: int = 500
    rule: RegisterRule = field(default_factory=RegisterRule)
    batch: int = 16


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Cut boxes (M, 4) ``(image, top, left, side)`` (one side) out of images (N, 3, H, W)."""
    return torch.stack([images[i, :, t:t + s, l:l + s] for i, t, l, s in boxes.tolist()])


def _patch_grid(files: list[Path], s: ExtractSettings):
    """Patches (M, 3, size, size) on a grid over the references loaded at canvas size (patch
    side = s.size, so patches are cut at full resolution, not upsampled), their boxes (M, 4),
    the files used and the canvas size."""
    if not 0.05 <= s.patch_frac <= 1 or not 0.05 <= s.patch_stride <= 1:
        raise ValueError(f"patch_frac ({s.patch_frac}) and patch_stride ({s.patch_stride}) "
                         "must be in 0.05..1")
    canvas = max(s.size, round(s.size / s.patch_frac))
    images, used = load_images(files, canvas)
    tiles, corners = crop_patches(images, s.size, max(1, round(s.size * s.patch_stride)))
    n, k = tiles.shape[:2]                                     # tiles (N, K, 3, p, p)
    boxes = torch.cat([torch.arange(n).repeat_interleave(k)[:, None], corners.repeat(n, 1),
                       torch.full((n * k, 1), s.size)], dim=1)  # (N*K, 4)
    return tiles.flatten(0, 1), boxes, used, canvas           # (N, K, ...) -> (N*K, ...)


def extract_bank(target, files: list[Path], s: ExtractSettings,
                 progress: bool = False) -> tuple[ConceptBank, torch.Tensor]:
    """Patches -> activations -> NMF; returns the bank (importance still zero) and the patches
    (M, 3, size, size)."""
    view = layer_view(target, s.layer)
    patches, boxes, used, canvas = _patch_grid(files, s)
    acts = layer_activations(target, view, patches, s.rule, s.batch, progress)
    mode = resolve_nonneg(s.nonneg, float(acts.acts.min()))
    u, w, info = factorise(pooled(acts, mode), s.n_concepts, s.seed, s.max_iter)
    top = u.topk(min(s.top_patches, len(u)), dim=0).indices.T.contiguous()   # (T, K) -> (K, T)
    tensors = {"directions": w, "coefficients": u, "boxes": boxes, "top_patches": top,
               "importance": torch.zeros(s.n_concepts)}
    meta = {"model": str(target.spec), "weight_hash": target.weight_hash, "layer": s.layer,
            "layout": view.layout, "dataset_hash": files_digest(used),
            "files": [str(p) for p in used], "size": s.size, "canvas": canvas,
            "patch_stride": s.patch_stride, "nonneg": mode, "n_concepts": s.n_concepts,
            "channels": int(acts.acts.shape[1]), "patches": len(boxes), "nmf": info,
            "registers": register_report(view, acts, s.rule)}
    return ConceptBank(tensors, meta), patches


def register_report(view: LayerView, acts: Activations, rule: RegisterRule) -> dict:
    tokens = int(acts.keep.numel())
    return {"applies": view.stream is not None, "threshold": rule.threshold,
            "relative": rule.relative, "exclude": rule.exclude, "tokens": tokens,
            "high_norm": acts.flagged, "excluded": int((~acts.keep).sum())}


# ---------------------------------------------------------------- ranking

def make_scorer(target, text: str):
    """``score(outputs (B, K), reference (K,)) -> (B,)`` and a label.

    ``text`` names a class (classifier: its logit; CLIP: cosine to the class's text embedding,
    or to a free prompt). Empty: classifier -> the logit of the image's own top class;
    otherwise -> cosine to the image's own unedited output."""
    if text and getattr(target, "clip", None) is not None:
        from vital.models.classnames import clip_text_target
        emb, label = clip_text_target(target, text)
        return (lambda out, ref: F.cosine_similarity(out, emb.to(out)[None], dim=-1)), label
    if text:
        index = target.class_index(text)
        label = target.class_names[index] if target.class_names else str(index)
        return (lambda out, ref: out[:, index]), label
    if target.kind == "classifier":
        return (lambda out, ref: out[:, int(ref.argmax())]), "each image's top class"
    return (lambda out, ref: F.cosine_similarity(out, ref[None].to(out), dim=-1)), "own output"


def _edit_fn(view: LayerView, edited: torch.Tensor, keep: torch.Tensor):
    """A ``TargetModel.replaced`` function: put ``edited`` (B, C, P) at the kept positions."""
    def fn(out: torch.Tensor) -> torch.Tensor:
        x = channels_positions(out, view.layout)               # (B, C, skip + P)
        body = torch.where(keep[None, None].to(x.device), edited.to(x), x[..., view.skip:])
        x = torch.cat([x[..., :view.skip].expand(len(body), -1, -1), body], dim=-1)
        if view.layout == "BCHW":
            return x.reshape(len(x), *out.shape[1:])           # (B, C, H*W) -> (B, C, H, W)
        if view.layout == "BND":
            return x.transpose(1, 2)                           # (B, D, N) -> (B, N, D)
        return x[..., 0]                                       # (B, C, 1) -> (B, C)
    return fn


def _reconstruct(u: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, mode: str) -> torch.Tensor:
    """Activations (B, C, P) from coefficients u (P, K) scaled per row by scale (B, K)."""
    a = (u[None] * scale[:, None, :]) @ w                      # (B, P, K) @ (K, C') -> (B, P, C')
    return from_nonneg(a.transpose(1, 2), mode)                # (B, P, C') -> (B, C, P)


def _forward_edited(target, view, image, edited, keep, batch: int) -> torch.Tensor:
    outs = []
    for part in edited.split(batch):
        with target.replaced(view.name, _edit_fn(view, part, keep)):
            outs.append(target(image[None].expand(len(part), -1, -1, -1)))
    return torch.cat(outs)


@dataclass
class RankSettings:
    method: str = "sobol"
    designs: int = 16      # Sobol: QMC points per matrix (power of two)
    batch: int = 16
    seed: int = 0          # Sobol: scrambling of the QMC sequence


def _image_importance(target, view, image, act, keep, w, mode, score, s: RankSettings):
    """Importance (K,) of each concept for one image at the layer."""
    u = coefficients(to_nonneg(act[None], mode)[0].T, w)      # (C', P) -> (P, C') -> U (P, K)
    u, w = u.to(target.device), w.to(target.device)
    with torch.no_grad():
        ref = target(image[None])[0]
    if s.method == "sobol":
        masks = sobol.design(w.shape[0], s.designs, s.seed).to(target.device)
        with torch.no_grad():
            out = _forward_edited(target, view, image, _reconstruct(u, w, masks, mode), keep,
                                  s.batch)
        return sobol.jansen_total(score(out, ref).cpu(), s.designs, w.shape[0])
    scale = torch.ones(1, w.shape[0], device=target.device, requires_grad=True)
    out = _forward_edited(target, view, image, _reconstruct(u, w, scale, mode), keep, 1)
    score(out, ref).sum().backward()
    return scale.grad[0].abs().cpu()                           # |dy/ds| at s = 1 (gradient x input)


def rank_concepts(target, bank: ConceptBank, images: torch.Tensor, score, s: RankSettings,
                  rule: RegisterRule, progress: bool = False) -> dict:
    """Fill ``bank``'s importance: the mean over ``images`` (N, 3, S, S) of each concept's
    Sobol total index (CRAFT) or |gradient x input| in concept space; returns the record."""
    if s.method not in RANKINGS:
        raise ValueError(f"unknown ranking {s.method!r}; valid: {', '.join(RANKINGS)}")
    view = layer_view(target, bank.meta["layer"])
    acts = layer_activations(target, view, images, rule)
    w, mode = bank.directions, bank.meta["nonneg"]
    per_image = [_image_importance(target, view, img.to(target.device), acts.acts[i],
                                   acts.keep[i], w, mode, score, s)
                 for i, img in enumerate(tqdm(images, desc="rank concepts", disable=not progress,
                                              leave=False))]
    bank.tensors["importance"] = torch.stack(per_image).mean(0)
    if not bank.tensors["importance"].abs().max() > 1e-8:
        warnings.warn(f"every concept has zero importance at {view.name}: editing this layer "
                      "does not change the scored output (a ViT's last block reaches the "
                      "output only through the class token); pick an earlier layer",
                      stacklevel=2)
    method = (f"sobol total order (Jansen estimator, {s.designs} scrambled Sobol QMC designs)"
              if s.method == "sobol" else "gradient x input in concept space (|dy/ds| at s=1)")
    return {"method": s.method, "description": method, "images": len(images),
            "designs": s.designs if s.method == "sobol" else None,
            "order": bank.order(), "importance": bank.tensors["importance"].tolist()}


# ---------------------------------------------------------------- objective

POOLINGS = ("mean", "positions")


def _cosines(a: torch.Tensor, unit: torch.Tensor, pool: str) -> torch.Tensor:
    """Cosines (B, K) of non-negative activations a (B, C', P) with unit directions (K, C').

    ``mean``: of the position-averaged activation (concept banks are fit on those);
    ``positions``: the mean over positions of each position's cosine (facets are fit on
    positions, so every position should look like the facet)."""
    if pool == "mean":
        return F.normalize(a.mean(-1), dim=-1) @ unit.T                    # (B, C') @ (C', K)
    if pool == "positions":
        per_position = F.normalize(a, dim=1).transpose(1, 2) @ unit.T      # (B, P, K)
        return per_position.mean(1)
    raise ValueError(f"unknown pooling {pool!r}; valid: {', '.join(POOLINGS)}")


@torch.no_grad()
def direction_cosines(target, view: LayerView, images: torch.Tensor, directions: torch.Tensor,
                      nonneg: str, pool: str = "mean") -> torch.Tensor:
    """(B, K): cosine of each image's non-negative activation at the layer with each
    direction (K, C'), pooled as ``direction_objective`` pools it."""
    with target.hooks([view.name]) as feats:
        target(images.to(target.device))
        x = channels_positions(feats[view.name], view.layout)[..., view.skip:]   # (B, C, P)
        a = to_nonneg(x.float(), nonneg)
    return _cosines(a, F.normalize(directions.float().to(a.device), dim=-1), pool).cpu()


def direction_objective(layer: str, directions: torch.Tensor, nonneg: str, skip: int = 0,
                        how: str = "cosine", name: str | None = None,
                        pool: str = "mean") -> Objective:
    """Term ``direction:<layer>``: steer the layer's non-negative activations along
    ``directions`` (B, C') or (C',) (one per image of the batch).

    ``cosine``: 1 - cosine similarity (pooled by ``pool``, see ``_cosines``); ``dot``: minus
    the projection of the position-averaged activation on the unit direction."""
    if how not in ("cosine", "dot"):
        raise ValueError(f"direction objective must be cosine or dot, got {how!r}")
    if pool not in POOLINGS:
        raise ValueError(f"unknown pooling {pool!r}; valid: {', '.join(POOLINGS)}")
    unit = F.normalize(directions.detach().float().reshape(-1, directions.shape[-1]), dim=-1)

    def fn(ctx) -> torch.Tensor:
        a = to_nonneg(ctx["features"][layer][..., skip:], nonneg)   # (B, C', P) image positions
        d = unit.to(a)
        d = d.expand(len(a), -1) if len(d) == 1 else d              # (B, C')
        if how == "dot":
            return -(a.mean(-1) * d).sum(-1).mean()
        if pool == "mean":
            return 1.0 - F.cosine_similarity(a.mean(-1), d, dim=-1).mean()
        return 1.0 - (F.normalize(a, dim=1) * d[:, :, None]).sum(1).mean()   # (B, C', P)
    return Objective(fn, name or f"direction:{layer}")


def facet_objective(layer: str, directions: torch.Tensor, nonneg: str, skip: int = 0,
                    pool: str = "positions", contrast: float = 1.0,
                    name: str | None = None, facet: int | None = None) -> Objective:
    """Term ``facet:<layer>``: image b of the batch shows facet b (directions (F, C'), B = F)
    and not its sibling facets: ``1 - cos_b + contrast * mean_{g != b} cos_g``. With
    ``facet``, every image of the batch shows that one facet (a batch of one per facet).

    Facets of one concept overlap (they share the concept), so every facet's cosine starts
    alike; the sibling penalty makes the image show what sets its facet apart."""
    unit = F.normalize(directions.detach().float(), dim=-1)
    if len(unit) < 2 and contrast:
        raise ValueError("the facet contrast needs at least 2 facets")
    if facet is not None and not 0 <= facet < len(unit):
        raise ValueError(f"facet {facet} is not one of the {len(unit)} facets")

    def fn(ctx) -> torch.Tensor:
        a = to_nonneg(ctx["features"][layer][..., skip:], nonneg)   # (B, C', P) image positions
        cos = _cosines(a, unit.to(a), pool)                         # (B, F)
        if facet is None and len(cos) != len(unit):
            raise ValueError(f"facet objective: batch {len(cos)} != {len(unit)} facets")
        own = cos.diag() if facet is None else cos[:, facet]
        others = (cos.sum(1) - own) / max(1, len(unit) - 1)
        return (1.0 - own + contrast * others).mean()
    return Objective(fn, name or f"facet:{layer}")
