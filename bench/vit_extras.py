#!/usr/bin/env python
"""ViT extras: what large visualisations, attention steering and the neural field cost and do.

No pretrained CLIP weights can be fetched here, so the CLIP is a ViT-B/32-shaped model with
random weights (vision width 768, 12 blocks, patch 32, 224 px; a tiny text tower), written as
safetensors and loaded like a user's file; ``--model tiny`` uses the tests' 2-block ViT instead.
Random weights make the *pictures* meaningless; the figures measure what the switches do to
the quantities they act on (step time, the class token's attention, the artefact share).

1. Step time at the native size and at 2x (positional embeddings interpolated; references at
   the native size, resampled), steering on and off.
2. Attention steering: class visualisations with and without it (same seeds); the final image's
   class-token attention in the last block: entropy (fraction of log N), RMS distance of the
   attended patches from the centre (fraction of the side), attention mass in the central
   half box. A PNG grid (images and attention maps, without | with) goes to out_bench/.
3. Neural field: fitted per layer on views of a third of the real photos of
   ../shared/imagenet-dev (the bundled photos if absent); on the other two thirds, the
   position-locked share of the tokens before and after removing it (see ``field_figures``);
   the embed-layer field against the model's own (centred) positional embedding.
4. The evaluation harness (``evaluate_fvis.py``) on one class with and without --neural_field.

  python bench/vit_extras.py                        # ViT-B/32-shaped, every part
  python bench/vit_extras.py --model tiny --steps 40
  python bench/vit_extras.py --parts field speed
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import torch
import torch.nn.functional as F

from vital.optvis import attention as att
from vital.optvis import neural_field as nf
from vital.refs import fields as field_refs
from vital.refs.bundled import PHOTOS, build_reference_folders
from vital.modes.class_mode import ClassCFG, plan_class
from vital.models import load_target
from vital.imaging import grid, to_pil
from vital.refs.images import list_images, load_images
from vital.optvis.render import render

IMAGENET_DEV = REPO.parent / "shared" / "imagenet-dev"
SHAPES = {"vit-b32": dict(layers=12, width=768, patch_size=32, image_size=224, embed=512),
          "tiny": dict(layers=2, width=64, patch_size=8, image_size=32, embed=32)}
PARTS = ("speed", "steering", "field", "harness")
TILE = 128  # smallest tile of the steering grid in px (tiny models are upscaled, nearest)


def write_model(name: str, path: Path) -> Path:
    """A CLIP of shape ``name`` with random weights, OpenAI layout, as safetensors."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    if path.exists():
        return path
    s = SHAPES[name]
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=s["layers"], width=s["width"], patch_size=s["patch_size"],
                           image_size=s["image_size"])
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = CLIP(s["embed"], vision, text, quick_gelu=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def class_cfg(spec: str, ref_dir: Path, **kw) -> ClassCFG:
    base = dict(model=spec, target="espresso", ref_dir=str(ref_dir), num_ref=12, save_steps=0,
                progress=False, device="cpu")
    return ClassCFG(**{**base, **kw})


def build(cfg: ClassCFG, target):
    """The plan ``run_class`` renders (objective, hooked layers, parameterisation ...), without
    the run folder and the live opinion."""
    return plan_class(cfg, target)


def render_built(cfg: ClassCFG, target, plan):
    return render(target, plan.objective, plan.param, plan.schedule, plan.layers,
                  augment=plan.augment, generator=plan.generator, save_steps=0, progress=False)


def render_cfg(cfg: ClassCFG, target):
    return render_built(cfg, target, build(cfg, target))


# ---------------------------------------------------------------- 1. speed

SPEED_ROWS = ((1, False), (1, True), (2, True))  # (size / native, steering)


def speed(spec: str, ref_dir: Path, native: int, steps: int) -> list[dict]:
    """Wall and CPU ms per step (after one warm-up step); the machine may be shared, CPU
    time is the steadier figure."""
    target = load_target(spec)
    rows = []
    for factor, steer in SPEED_ROWS:
        cfg = class_cfg(spec, ref_dir, size=factor * native, steps=steps, attn_steering=steer)
        built = build(cfg, target)
        render_built(class_cfg(spec, ref_dir, size=factor * native, steps=1,
                               attn_steering=steer), target, built)
        cpu = time.process_time()
        result = render_built(cfg, target, built)
        rows.append({"size": factor * native, "steering": steer,
                     "wall_ms": 1e3 * result.step_seconds,
                     "cpu_ms": 1e3 * (time.process_time() - cpu) / steps})
    return rows


# ---------------------------------------------------------------- 2. steering

@torch.no_grad()
def attention_stats(target, image: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Statistics of the last block's class-token attention on ``image`` and its map (g, g)."""
    layer = f"block.{len(target.module.transformer.resblocks) - 1}.attn"
    with target.hooks([layer]) as feats:
        target(image)
        p = att.class_token_attention(feats[layer])  # (B, H, N)
    side = nf.grid_side(p.shape[-1])
    entropy = att.attention_entropy(p).mean() / math.log(p.shape[-1])
    c = (torch.arange(side) + 0.5) / side - 0.5
    d2 = (c[:, None] ** 2 + c[None, :] ** 2).flatten()  # (side*side,), side = 1
    box = ((c[:, None].abs() < 0.25) & (c[None, :].abs() < 0.25)).flatten().float()
    stats = {"entropy": float(entropy), "centre_dist": float((p * d2).sum(-1).mean().sqrt()),
             "centre_mass": float((p * box).sum(-1).mean())}
    return stats, p.mean((0, 1)).view(side, side)  # (N,) -> (side, side), rows = y


def heat(amap: torch.Tensor, size: int) -> torch.Tensor:
    """An attention map (g, g) as a (3, size, size) grey image, brightest = max."""
    up = F.interpolate(amap[None, None] / amap.max(), size=(size, size), mode="nearest")
    return up[0].expand(3, -1, -1)  # (1, 1, s, s) -> (3, s, s)


def steering(spec: str, ref_dir: Path, seeds: list[int], steps: int, weights: list[float],
             out: Path) -> list[dict]:
    """Per seed: steering off, then on with each weight (entropy and spatial weight alike).
    Grid rows: one per seed; columns: image and attention map per setting."""
    target = load_target(spec)
    rows, tiles, labels = [], [], []
    for seed in seeds:
        for weight in [0.0] + list(weights):
            cfg = class_cfg(spec, ref_dir, steps=steps, seed=seed, attn_steering=weight > 0,
                            attn_entropy_weight=weight, attn_spatial_weight=weight,
                            save_steps=steps)
            result = render_cfg(cfg, target)
            stats, amap = attention_stats(target, result.image)
            sort = sum(v for k, v in result.history[-1]["terms"].items() if k.startswith("sort:"))
            rows.append({"seed": seed, "attn_weight": weight, **stats, "sort_loss": sort})
            tag = f"w{weight:g}" if weight else "off"
            side = max(TILE, result.image.shape[-1])
            tiles += [to_pil(F.interpolate(result.image, size=(side, side), mode="nearest")),
                      to_pil(heat(amap, side))]
            labels += [f"s{seed} {tag}", f"attn {tag}"]
    out.mkdir(parents=True, exist_ok=True)
    grid(tiles, labels, cols=2 * (1 + len(weights))).save(out / "steering_grid.png")
    return rows


# ---------------------------------------------------------------- 3. neural field

def photo_files(work: Path) -> list[Path]:
    if (IMAGENET_DEV / "index.tsv").is_file():
        return sorted(p for p in IMAGENET_DEV.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    folders = build_reference_folders(work / "photos", n_views=6)
    return [f for folder in folders.values() for f in list_images(folder)]


def view_tokens(target, layers: list[str], files: list[Path], count: int) -> dict:
    """Per layer the patch tokens (n*count, N, D) of ``count`` views of each file."""
    size = target.input_size
    images, _ = load_images(files, round(size * field_refs.VIEW_ZOOM))
    shots = field_refs.views(images, size, count, torch.Generator().manual_seed(0))
    feats = field_refs.hooked_features(target, layers, shots)
    return {name: field_refs.patch_tokens(x) for name, x in feats.items()}


def field_figures(spec: str, work: Path, views: int, steps: int, images: int) -> list[dict]:
    """Fit on a third of the photos; on the other two thirds (two independent sets A and B):
    the position-locked RMS over the features' RMS before and after removing the field
    (``nf.locked_rms``), and
    the norm of a field fitted on held-out set A before and after removal (``artefact_ratio``,
    which has a noise floor of about 1 / sqrt(images x views))."""
    target = load_target(spec)
    layers = field_refs.token_layers(target, target.default_layers())
    files = photo_files(work)[:images]
    fit, held_a, held_b = (view_tokens(target, layers, files[k::3], views) for k in range(3))
    pos = target.module.positional_embedding[1:].detach().float()
    rows = []
    for name in layers:
        field = nf.fit_field(fit[name], steps=steps, views=views)
        clean_a, clean_b = (nf.remove_from_tokens(t[name], field) for t in (held_a, held_b))
        scale = nf.feature_rms(torch.cat([held_a[name], held_b[name]]))
        row = {"layer": name, "field_ratio": nf.artefact_ratio(field, fit[name]),
               "locked_before": nf.locked_rms(held_a[name], held_b[name]) / scale,
               "locked_after": nf.locked_rms(clean_a, clean_b) / scale,
               "refit_before": nf.artefact_ratio(nf.fit_field(held_a[name], steps, views),
                                                 held_a[name]),
               "refit_after": nf.artefact_ratio(nf.fit_field(clean_a, steps, views), clean_a)}
        if name == "embed":
            g = field.grid(nf.grid_side(pos.shape[0]))
            row["cos_pos_embed"] = float(F.cosine_similarity(g.flatten(), (pos - pos.mean(0))
                                                             .flatten(), dim=0))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- 4. evaluation harness

HARNESS_KEYS = ("self_top1", "judge_top1", "fid", "class_auc", "class_mad", "seconds_per_step")


def harness(spec: str, ref_dir: Path, steps: int, seeds: list[int], out: Path) -> list[dict]:
    """Run evaluate_fvis.py with and without --neural_field (FID needs 2+ seeds); return the
    report's mean per method (summary.json)."""
    methods = [{"name": "vital", "overrides": {}},
               {"name": "vital_field", "overrides": {"neural_field": True}}]
    sweep = {"out_dir": str(out), "models": [spec], "targets": [f"espresso={ref_dir}"],
             "methods": methods, "seeds": seeds, "device": "cpu", "progress": False,
             "settings": {"steps_multires": [steps // 3, steps - steps // 3], "num_ref": 12}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, str(REPO / "evaluate_fvis.py"), "--json_cfg",
                    str(out / "sweep.json")], check=True, cwd=REPO, env=env)
    summary = json.loads((out / "report" / "summary.json").read_text())[spec]["rows"]
    return [{"method": m, **{k: summary[m][k][0] for k in HARNESS_KEYS if k in summary[m]}}
            for m in summary]


# ---------------------------------------------------------------- report

def table(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="vit-b32", choices=sorted(SHAPES))
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--steps", type=int, default=40, help="steps of each steering / harness run")
    p.add_argument("--speed_steps", type=int, default=4, help="timed steps per speed row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--attn_weights", type=float, nargs="+", default=[1.0],
                   help="steering weights compared with steering off")
    p.add_argument("--harness_seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--field_steps", type=int, default=300)
    p.add_argument("--field_views", type=int, default=2)
    p.add_argument("--field_images", type=int, default=60, help="photos: 1/3 fit, 2/3 held out")
    p.add_argument("--out", default=str(REPO / "out_bench" / "vit_extras"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default; "
                   "one is fastest on a shared machine, see bench/README.md)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) / args.model
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VITAL_CACHE", str(work / "cache"))
    spec = str(write_model(args.model, work / f"{args.model}_random.safetensors"))
    ref_dir = build_reference_folders(work / "refs", n_views=12, photos=PHOTOS[:1])["espresso"]
    native, started = SHAPES[args.model]["image_size"], time.perf_counter()
    jobs = {"speed": lambda: speed(spec, ref_dir, native, args.speed_steps),
            "steering": lambda: steering(spec, ref_dir, args.seeds, args.steps,
                                         args.attn_weights, out),
            "field": lambda: field_figures(spec, work, args.field_views, args.field_steps,
                                           args.field_images),
            "harness": lambda: harness(spec, ref_dir, args.steps, args.harness_seeds,
                                       out / "harness")}
    path = out / "results.json"
    for part in args.parts:  # each part is saved as soon as it is done (runs are long)
        results = json.loads(path.read_text()) if path.exists() else {}
        results[part] = jobs[part]()
        path.write_text(json.dumps(results, indent=2, default=str))
        rows = results[part]
        print(f"\n## {part}\n{table(rows)}", flush=True)
    print(f"\n{args.model} (random weights), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.perf_counter() - started:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
