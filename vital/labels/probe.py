"""The probe set and the neurons' activations on it, summarised to one number per image and
neuron, computed in batches and cached on disk (``vital.cache``).

Summary of a layer's output per image (``--pool``):

- CNN channels (B, C, H, W): ``avg`` (CLIP-Dissect's default) or ``max`` over the H x W positions.
- Token layers (B, 1+N, D) of a CLIP ViT (``block.N``, ``block.N.mlp``): ``avg`` / ``max`` over
  the N patch tokens, the class token left out (as inner mode scores neurons); ``cls`` takes the
  class token alone, which is what CLIP-Dissect did for ViTs. Other token layers (no class token
  known) pool over all tokens; ``cls`` takes the first token.
- Vector layers (B, C), e.g. a classifier's ``fc`` or ``ln_post``: the value itself.

A layer without neurons (an attention map (B, heads, L, L), a tuple output) is refused with a
sentence naming layers that work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vital import cache
from vital.models import channels_positions
from vital.refs.images import PREPROCESS_TAG
from vital.refs.patches import data_files, iter_images

__all__ = ["POOLS", "ProbeSet", "probe_set", "LayerSpec", "layer_spec", "summarise",
           "Activations", "layer_activations", "cached_tensors", "load_entry", "store_entry",
           "image_batches"]

POOLS = ("avg", "max", "cls")
_NEURON_LAYOUTS = ("BCHW", "BND", "BC")
_NAMES = {"values", "used"}


@dataclass
class ProbeSet:
    """The images of a probe folder (recursive, sorted) and a digest of their contents."""
    folder: Path
    files: list[Path]
    digest: str


def probe_set(folder) -> ProbeSet:
    """The probe images under ``folder``; an empty or missing folder -> ReferenceError."""
    files = data_files(folder)
    return ProbeSet(Path(folder), files, cache.files_digest(files))


@dataclass(frozen=True)
class LayerSpec:
    """A layer whose neurons can be labelled: layout, neuron count, class-token handling."""
    name: str
    layout: str
    channels: int
    skip: int       # leading tokens left out of avg / max (1 = a CLIP ViT's class token)
    pool: str


def _labelable(target) -> str:
    names = [i.name for i in target.layers() if i.layout in _NEURON_LAYOUTS]
    return ", ".join(names[-6:])


def layer_spec(target, layer: str, pool: str) -> LayerSpec:
    """Check a layer and a pooling against the model (ValueError with one sentence)."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
    info = target.layer_info(layer)   # unknown name -> ValueError naming valid layers
    if info.layout not in _NEURON_LAYOUTS or not info.channels:
        what = "an attention map (heads x tokens x tokens)" if info.layout == "BHLL" else \
            f"an output of shape {info.shape}"
        raise ValueError(f"layer {layer!r} of {target.spec} is {what}, which has no neurons to "
                         f"label; pick a layer of channels, tokens or features, e.g. "
                         f"{_labelable(target)}")
    if pool == "cls" and info.layout != "BND":
        raise ValueError(f"--pool cls needs a token layer (a ViT's block.N or block.N.mlp); "
                         f"{layer!r} has layout {info.layout}; use avg or max")
    skip = 1 if target.kind == "clip-vit" and info.layout == "BND" else 0
    return LayerSpec(layer, info.layout, int(info.channels), skip, pool)


def summarise(output: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """A hooked output -> (B, C): one number per image and neuron (see the module docstring)."""
    if spec.layout == "BC":
        return output.float()
    if spec.pool == "cls":
        return output[:, 0].float()                                # (B, 1+N, D) -> (B, D)
    x = channels_positions(output, spec.layout)[..., spec.skip:]   # (B, C, P)
    return (x.amax(-1) if spec.pool == "max" else x.mean(-1)).float()


def image_batches(files: list[Path], size: int, batch: int, progress: bool, desc: str):
    """(images, indices into ``files``) in batches, with a progress bar; unreadable files are
    skipped with a warning."""
    where = {Path(f): i for i, f in enumerate(files)}
    bar = tqdm(total=len(files), desc=desc, disable=not progress, leave=False)
    for images, used in iter_images(files, size, batch):
        bar.update(len(used))
        yield images, torch.tensor([where[Path(u)] for u in used], dtype=torch.long)
    bar.close()


def _entry(kind: str, spec: dict) -> tuple[Path, dict]:
    spec = {"format": cache.FORMAT, "kind": kind, **spec}
    return cache.cache_dir("labels", kind, cache.key(spec) + ".safetensors"), spec


def load_entry(kind: str, spec: dict, names: set[str]) -> dict[str, torch.Tensor] | None:
    """The cache entry ``labels/<kind>/<key(spec)>``, or None when it is missing or corrupt
    (a corrupt entry is reported and deleted by ``vital.cache.load_tensors``)."""
    path, _ = _entry(kind, spec)
    found = cache.load_tensors(path, expect=names, what=f"label cache entry ({kind})")
    return None if found is None else found[0]


def store_entry(kind: str, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
    path, full = _entry(kind, spec)
    cache.store_tensors(path, tensors, {"spec": full}, what=f"label cache entry ({kind})")


def cached_tensors(kind: str, spec: dict, compute, use_cache: bool, names: set[str]):
    """(tensors, cache hit): the entry for ``spec`` or ``compute()``, stored for next time."""
    found = load_entry(kind, spec, names) if use_cache else None
    if found is not None:
        return found, True
    tensors = compute()
    if use_cache:
        store_entry(kind, spec, tensors)
    return tensors, False


@dataclass
class Activations:
    """(N, K) activation summaries of one layer on the probe images ``used`` (indices into the
    probe set's files; unreadable images are left out)."""
    layer: LayerSpec
    values: torch.Tensor
    used: torch.Tensor
    cache_hit: bool
    seconds: float


@torch.no_grad()
def _compute(target, specs: list[LayerSpec], probe: ProbeSet, batch: int,
             progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    names = [s.name for s in specs]
    parts = {n: [] for n in names}
    used = []
    with target.hooks(names) as feats:
        for images, index in image_batches(probe.files, target.input_size, batch, progress,
                                           f"activations {', '.join(names)}"):
            target(images.to(target.device))
            for s in specs:
                parts[s.name].append(summarise(feats[s.name], s).cpu())
            used.append(index)
    used = torch.cat(used)
    return {n: {"values": torch.cat(parts[n]), "used": used} for n in names}


def _key_spec(target, spec: LayerSpec, probe: ProbeSet) -> dict:
    return {"model": str(target.spec), "weights": target.weight_hash, "layer": spec.name,
            "pool": spec.pool, "skip": spec.skip, "probe": probe.digest,
            "size": target.input_size, "mean": target.mean, "std": target.std,
            "preprocess": PREPROCESS_TAG}


def layer_activations(target, specs: list[LayerSpec], probe: ProbeSet, *, batch: int = 32,
                      use_cache: bool = True, progress: bool = True) -> dict[str, Activations]:
    """Activation summaries of every layer in ``specs``; cached layers are read, the others are
    computed together in one pass over the probe images (and stored)."""
    out, missing = {}, []
    for spec in specs:
        start = time.perf_counter()
        found = load_entry("activations", _key_spec(target, spec, probe), _NAMES) \
            if use_cache else None
        if found is None:
            missing.append(spec)
            continue
        out[spec.name] = Activations(spec, found["values"], found["used"], True,
                                     time.perf_counter() - start)
    if missing:
        start = time.perf_counter()
        computed = _compute(target, missing, probe, batch, progress)
        seconds = (time.perf_counter() - start) / len(missing)   # one shared pass
        for spec in missing:
            tensors = computed[spec.name]
            if use_cache:
                store_entry("activations", _key_spec(target, spec, probe), tensors)
            out[spec.name] = Activations(spec, tensors["values"], tensors["used"], False, seconds)
    return {s.name: out[s.name] for s in specs}
