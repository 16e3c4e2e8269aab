#!/usr/bin/env python
"""Time and peak memory of neuron_effects.py's computation per 1000 probe images, for all 3072
neurons of one layer of a ViT-B/32-shaped CLIP with random weights (vision width 768, 12 layers,
patch 32, 224 px; a tiny text tower), loaded through ``load_target`` like a user's file.

Steps timed: the image-independent maps (once per layer), pass 1 (means) and pass 2 (centred
norms, top k with vectors) over ``--images`` generated PNGs (both passes scale with the number
of images: the figure per 1000 images is extrapolated linearly), the per-neuron PCA (once), and
optionally the OMP decomposition over ``--texts`` (random unit vectors as text embeddings, so no
text tower runs; once per layer). Peak memory is the process's maximum resident set size
(``ru_maxrss``), before the maps and at the end.

  nice -n 10 python bench/effects.py                         # 64 images, layer 9, 2 threads
  nice -n 10 python bench/effects.py --images 32 --layer 0 --texts 20000
  python bench/effects.py --images 32 --layer 10 --texts 2000 --plant 7   # issue 28

``--conventions K`` (issue 28) measures, on ``K`` neurons of the layer (with ``--plant``, the
planted one among them), how far the official code's share of layer-norm means and biases
(``vital.effects.official``) moves each second-order effect from ours (exact centring, biases
in the remainder), both in the official units: the relative difference, the part of it that is
the same for every neuron (the shares; the official effect of a neuron that never fires), the
overlap of the top images by centred norm, and the first PCs' cosine.

  python bench/effects.py --images 64 --layer 9 --conventions 64

``--plant N`` (with ``--texts``, layer <= 10) writes a combination (1.0, 0.6, 0.35) of three
random texts of the official dictionary into neuron N (``vital.effects.planted``) and reports
whether the pipeline recovers it: the first PC's cosine with it and precision@3 of the words.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vital.effects.run import EffectsCFG, layer_runs, pass_means, pass_top
from vital.effects.stats import summarise
from vital.effects.texts import dictionary, sparse_decompose
from vital.models import load_target
from vital.refs.patches import iter_images

from clip_shapes import random_vit_b32  # bench/ is on sys.path when a bench script runs


def probe_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for k in range(n):
        path = folder / f"img_{k:04d}.png"
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def timed(fn, *args):
    """(result, (wall s, process CPU s)); on a shared machine the CPU time is the steadier."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, (time.perf_counter() - start, time.process_time() - cpu)


@torch.no_grad()
def forwards(target, files, batch):
    """The image tower alone over the same images (what any pass costs at least)."""
    for images, _ in iter_images(files, target.input_size, batch=batch):
        target.output(images)


def line(name: str, t, per_1000: float | None = None) -> str:
    text = f"{name:<24}{t[0]:7.1f} s wall {t[1]:7.1f} s CPU"
    if per_1000:
        text += f"  -> {t[0] * per_1000:6.0f} s wall / {t[1] * per_1000:6.0f} s CPU per 1000 images"
    return text


@torch.no_grad()
def compare_conventions(target, files, args) -> None:
    """Our second-order effects against the official share convention on the same neurons."""
    from vital.effects.decompose import (clip_vit, coefficients, effect_maps, record,
                                         second_order)
    from vital.effects.official import official_second_order, record_official
    from vital.effects.stats import first_component
    keep = list(range(args.conventions))
    if args.plant >= 0 and args.plant not in keep:
        keep[-1] = args.plant
    neurons = torch.tensor(keep)
    maps = effect_maps(clip_vit(target), args.layer, neurons)
    ours, official, common = [], [], []
    start = time.perf_counter()
    for images, _ in iter_images(files, target.input_size, batch=8):
        rec = record(target, images, [args.layer])
        scale = 100 / rec.embedding.norm(dim=-1)[:, None, None]
        ours.append(second_order(coefficients(rec, maps), maps, slice(None)).double() * scale)
        rec_o = record_official(target, images, args.layer)
        official.append(official_second_order(target, rec_o, args.layer, neurons))
        rec_o.acts = torch.zeros_like(rec_o.acts)   # a neuron that never fires: the shares
        common.append(official_second_order(target, rec_o, args.layer, neurons[:1]))
    ours, official, common = torch.cat(ours), torch.cat(official), torch.cat(common)
    diff = official - ours                                              # (B, n, E)
    size = ours.norm(dim=-1)
    rel = (diff.norm(dim=-1) / size).flatten()
    own = ((diff - common).norm(dim=-1) / size).flatten()
    k = max(1, len(files) // 8)
    overlaps, cosines = [], []
    for j in range(len(keep)):
        a, b = ours[:, j], official[:, j]
        a, b = a - a.mean(0), b - b.mean(0)                              # per-neuron centring
        top_a, top_b = set(a.norm(dim=-1).topk(k).indices.tolist()), \
            set(b.norm(dim=-1).topk(k).indices.tolist())
        overlaps.append(len(top_a & top_b) / k)
        pa, _ = first_component(a.float())
        pb, _ = first_component(b.float())
        cosines.append(abs(float(torch.nn.functional.cosine_similarity(pa, pb, dim=0))))
    q = lambda t, p: float(t.quantile(p))   # noqa: E731
    print(f"ViT-B/32 (random weights), layer {args.layer}, {len(keep)} neurons, "
          f"{len(files)} images, {time.perf_counter() - start:.0f} s, {args.threads} threads")
    print(f"|official - ours| / |ours|: median {q(rel, 0.5):.3f}, 90th percentile "
          f"{q(rel, 0.9):.3f}")
    print(f"  of which the same for every neuron (the shares): median |shares| / |ours| "
          f"{q((common.norm(dim=-1) / size).flatten(), 0.5):.3f}; the rest (each neuron's own "
          f"mean): median {q(own, 0.5):.3f}, 90th percentile {q(own, 0.9):.3f}")
    cos = torch.tensor(cosines)
    print(f"top-{k} images by centred norm shared by both: mean {np.mean(overlaps):.2f}, "
          f"min {min(overlaps):.2f}; first PC cosine: median {q(cos, 0.5):.4f}, min "
          f"{float(cos.min()):.4f}")
    if args.plant >= 0:
        j = keep.index(args.plant)
        print(f"planted neuron {args.plant}: top-{k} overlap {overlaps[j]:.2f}, first PC "
              f"cosine {cosines[j]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--top_k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=0, help="random text set size for OMP")
    parser.add_argument("--plant", type=int, default=-1, help="neuron to plant a direction in")
    parser.add_argument("--conventions", type=int, default=0,
                        help="K > 0: compare the two mean/bias conventions on K neurons")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        os.environ["VITAL_CACHE"] = str(work / "cache")
        model = random_vit_b32(work / "vit_b32.safetensors")
        atoms = None
        if args.texts:
            gen = torch.Generator().manual_seed(1)
            atoms = dictionary(torch.nn.functional.normalize(
                torch.randn(args.texts, 512, generator=gen), dim=-1), "dimensions")
        if args.plant >= 0:
            from safetensors.torch import load_file, save_file
            from vital.effects.planted import plant_direction
            planted = {3: 1.0, args.texts // 2: 0.6, args.texts - 5: 0.35}
            goal = torch.nn.functional.normalize(
                sum(c * atoms[i] for i, c in planted.items()), dim=0)
            save_file(plant_direction(load_file(str(model)), args.layer, args.plant, goal, 12),
                      str(model))
        target = load_target(str(model))
        files = probe_images(work / "probe", args.images)
        if args.conventions:
            compare_conventions(target, files, args)
            return
        cfg = EffectsCFG(batch_size=args.batch, neuron_chunk=args.chunk, top_k=args.top_k,
                         progress=False)
        mlp = target.module.transformer.resblocks[args.layer].mlp
        neurons = torch.arange(mlp.c_fc.out_features)
        before = peak_mb()
        _, t_forward = timed(forwards, target, files, args.batch)
        runs, t_maps = timed(layer_runs, target, [args.layer], neurons, cfg)
        used, t_pass1 = timed(pass_means, target, files, runs, cfg)
        _, t_pass2 = timed(pass_top, target, used, runs, cfg, None)
        run = runs[args.layer]
        summaries, t_pca = timed(summarise, run.maps.neurons, run.top)
        t_omp = (0.0, 0.0)
        if args.texts:
            comps = torch.stack([s.component for s in summaries])
            words, t_omp = timed(sparse_decompose, comps, atoms, 32)
        if args.plant >= 0:
            at = run.maps.neurons.tolist().index(args.plant)
            cos = torch.nn.functional.cosine_similarity(summaries[at].component.double(),
                                                        goal.double(), dim=0)
            top3 = {i for i, _ in words[at].terms[:3]}
            recovered = (f"planted neuron {args.plant}: first PC cosine {abs(float(cos)):.4f}, "
                         f"explained {summaries[at].explained:.4f}, precision@3 "
                         f"{len(top3 & set(planted)) / 3:.2f}")
        per_1000 = 1000 / len(used)
        maps_mb = run.maps.second.numel() * 4 / 2**20
        top_mb = run.top.vectors.numel() * 4 / 2**20
    print(f"ViT-B/32 (random weights), layer {args.layer}, {len(neurons)} neurons, "
          f"{len(used)} images, batch {args.batch}, chunk {args.chunk}, top_k {args.top_k}, "
          f"{args.threads} threads")
    print(line("forward only (1 pass)", t_forward, per_1000))
    print(line("maps (once)", t_maps) + f"  ({maps_mb:.0f} MB)")
    print(line("pass 1 (means)", t_pass1, per_1000))
    print(line("pass 2 (top k)", t_pass2, per_1000))
    print(line("PCA (once)", t_pca) + f"  (top-k vectors {top_mb:.0f} MB)")
    if args.texts:
        print(line(f"OMP, {args.texts} texts", t_omp))
    both = [(t_pass1[i] + t_pass2[i]) * per_1000 for i in (0, 1)]
    once = [t_maps[i] + t_pca[i] + t_omp[i] for i in (0, 1)]
    print(f"per 1000 images (2 passes): {both[0]:.0f} s wall, {both[1]:.0f} s CPU; "
          f"plus once per layer {once[0]:.0f} s wall, {once[1]:.0f} s CPU")
    print(f"peak RSS: {peak_mb():.0f} MB (after loading the model: {before:.0f} MB)")
    if args.plant >= 0:
        print(recovered)


if __name__ == "__main__":
    main()
