"""References with the neural field removed (``--neural_field``, see ``vital.optvis.neural_field``).

Per matched token layer of a CLIP ViT: the field is fitted on shifted and flipped views of the
reference images at the model's input size; the reference quantiles at each reference size are
the sorted patch tokens minus the field (the class token is kept as it is); the sort-matching
terms remove the same field from the synthetic image's tokens. Fields and quantiles are cached
on disk as safetensors in ``$VITAL_CACHE/fields`` and ``$VITAL_CACHE/references``, keyed like
``vital.refs.references`` (model, weights, layers, image contents, preprocessing, size) plus the
field's settings; a corrupt entry is detected by its hash and rebuilt.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vital.optvis import losses
from vital.optvis import neural_field as nf
from vital.config import ConfigError
from vital.optvis.losses import Objective
from vital import cache
from vital.refs.images import load_images
from vital.refs.references import reference_key

VERSION = 2          # bump when the fit changes: old cache entries are then not used
VIEW_ZOOM = 1.5      # views are crops of the image resized to this times the input size
_SEP = "::"          # cache key = f"{layer}{_SEP}{tensor name}"


def token_layers(target, layers: list[str]) -> list[str]:
    """The layers among ``layers`` whose outputs are tokens (B, 1+N, D)."""
    layouts = {info.name: info.layout for info in target.layers()}
    return [name for name in layers if layouts.get(name) == "BND"]


def views(images: torch.Tensor, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` crops of ``size`` px per image (n, 3, S, S): the centre crop, then random
    crops; odd views are mirrored. Returns (n*count, 3, size, size), image-major."""
    n, _, big, _ = images.shape
    out = []
    for v in range(count):
        if v == 0:
            top = left = (big - size) // 2
        else:
            top, left = torch.randint(0, big - size + 1, (2,), generator=generator).tolist()
        crop = images[:, :, top:top + size, left:left + size]
        out.append(crop.flip(-1) if v % 2 else crop)
    return torch.stack(out, dim=1).flatten(0, 1)  # (n, V, 3, s, s) -> (n*V, 3, s, s)


@torch.no_grad()
def hooked_features(target, layers: list[str], images: torch.Tensor, batch_size: int = 8,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Per layer the sort-matching features (n, C, P) of ``images``, float32 on the CPU."""
    from vital.models import channels_positions
    layouts = {info.name: info.layout for info in target.layers()}
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with target.hooks(layers) as feats:
        for chunk in tqdm(images.split(batch_size), desc="field features", disable=not progress,
                          leave=False):
            target(chunk.to(target.device))
            for name in layers:
                parts[name].append(channels_positions(feats[name], layouts[name]).float().cpu())
    return {name: torch.cat(p) for name, p in parts.items()}


def patch_tokens(x: torch.Tensor) -> torch.Tensor:
    """Sort-matching token features (n, D, 1+N) -> patch tokens (n, N, D)."""
    return x[:, :, 1:].transpose(1, 2)  # drop the class token; (n, D, N) -> (n, N, D)


def _field_settings(views_per_image: int, steps: int) -> dict:
    return {"version": VERSION, "views": views_per_image, "steps": steps, "zoom": VIEW_ZOOM,
            "hidden": nf.HIDDEN, "freqs": nf.N_FREQS, "freq_scale": nf.FREQ_SCALE,
            "lr": nf.LR, "seed": nf.SEED}


def _pack(fields: dict, ratios: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer, field in fields.items():
        tensors.update({f"{layer}{_SEP}{k}": v.detach().cpu().contiguous()
                        for k, v in field.state_dict().items()})
        tensors[f"{layer}{_SEP}ratio"] = torch.tensor(float(ratios[layer]))
    return tensors


def _unpack(tensors: dict, layers: list[str]) -> tuple[dict, dict] | None:
    grouped: dict[str, dict] = {}
    for key, value in tensors.items():
        layer, _, name = key.rpartition(_SEP)
        grouped.setdefault(layer, {})[name] = value
    if set(grouped) != set(layers):
        return None
    ratios = {layer: float(g.pop("ratio")) for layer, g in grouped.items()}
    return {layer: nf.FourierField.from_state_dict(g) for layer, g in grouped.items()}, ratios


def fit_fields(target, layers: list[str], files, num=None, views_per_image: int = 4,
               steps: int = 300, use_cache: bool = True, progress: bool = True) -> tuple:
    """({layer: FourierField}, info) for the token ``layers``, fitted at the input size."""
    size = target.input_size
    images, used = load_images(files, round(size * VIEW_ZOOM), num)
    settings = _field_settings(views_per_image, steps)
    key = cache.key({"refs": reference_key(target, layers, used, images.shape[-1]), **settings})
    path = cache.cache_dir("fields", f"{key}.safetensors")
    info = {"key": key, "size": size, "layers": list(layers), **settings}
    cached = cache.load_tensors(path, what="field cache") if use_cache else None
    found = _unpack(cached[0], layers) if cached is not None else None
    if found is not None:
        return found[0], {**info, "artefact_ratio": found[1], "cache_hit": True}
    gen = torch.Generator().manual_seed(nf.SEED)
    feats = hooked_features(target, layers, views(images, size, views_per_image, gen),
                            progress=progress)
    fields, ratios = {}, {}
    for layer in tqdm(layers, desc="neural fields", disable=not progress, leave=False):
        tokens = patch_tokens(feats[layer])
        fields[layer] = nf.fit_field(tokens, steps=steps, views=views_per_image)
        ratios[layer] = nf.artefact_ratio(fields[layer], tokens)
    if use_cache:
        cache.store_tensors(path, _pack(fields, ratios), info, what="field cache")
    return fields, {**info, "artefact_ratio": ratios, "cache_hit": False}


def field_quantiles(target, layers: list[str], fields: dict, field_key: str, files, size: int,
                    num=None, use_cache: bool = True, progress: bool = True) -> tuple:
    """Sorted reference features (C, P) per layer at ``size`` px, with the field removed from
    the patch tokens of the layers in ``fields``; returns (quantiles, info)."""
    images, used = load_images(files, size, num)
    key = cache.key({"refs": reference_key(target, layers, used, size), "field": field_key})
    path = cache.cache_dir("references", f"{key}.safetensors")
    info = {"key": key, "files": [str(p) for p in used], "size": size, "layers": list(layers),
            "field": field_key}
    cached = cache.load_tensors(path, expect=set(layers), what="reference cache") \
        if use_cache else None
    if cached is not None:
        return cached[0], {**info, "cache_hit": True}
    feats = hooked_features(target, layers, images, progress=progress)
    quantiles = {}
    for layer, x in feats.items():
        if layer in fields:
            x = nf.remove_field(x, fields[layer])
        quantiles[layer] = losses.sorted_reference(x)
    if use_cache:
        cache.store_tensors(path, quantiles, info, what="reference cache")
    return quantiles, {**info, "cache_hit": False}


def field_sort_matching(refs_by_size: dict, fields: dict, weights: dict) -> Objective:
    """Terms ``sort:<layer>``: sort matching of the synthetic features, minus the layer's field
    (if any), against the references of the current stage."""
    def term(layer):
        field = fields.get(layer)

        def fn(ctx):
            x = ctx["features"][layer]
            x = nf.remove_field(x, field) if field is not None else x
            return losses.sort_matching(x, refs_by_size[ctx["size"]][layer])
        return weights[layer] * Objective(fn, f"sort:{layer}")
    return sum(term(layer) for layer in weights)


def field_objective(cfg, target, layers, weights, files, ref_px: dict, num) -> tuple:
    """(feat_weight x objective, info per stage, metadata) for ``--neural_field``."""
    if target.kind != "clip-vit":
        raise ConfigError(f"--neural_field needs a CLIP ViT (token layers); {target.spec} is a "
                          f"{target.kind} model")
    tok_layers = token_layers(target, layers)
    if not tok_layers:
        raise ConfigError(f"--neural_field acts on token layers (embed, block.i, block.i.mlp); "
                          f"none among the matched layers {layers}")
    fields, fit_info = fit_fields(target, tok_layers, files, num, cfg.field_views,
                                  cfg.field_steps, cfg.cache, cfg.progress)
    by_px, px_info = {}, {}
    for px in sorted(set(ref_px.values())):
        q, px_info[px] = field_quantiles(target, layers, fields, fit_info["key"], files, px, num,
                                         cfg.cache, cfg.progress)
        by_px[px] = {k: v.to(target.device) for k, v in q.items()}  # once, not per step
    refs = {s: by_px[px] for s, px in ref_px.items()}
    obj = field_sort_matching(refs, fields, dict(zip(layers, weights)))
    meta = {"active": True, **{k: v for k, v in fit_info.items() if k != "layers"},
            "layers": tok_layers}
    return cfg.feat_weight * obj, {s: px_info[px] for s, px in ref_px.items()}, meta
