#!/usr/bin/env python
"""CLIP-Dissect's headline check on the embedded model (not a test; CPU-heavy).

1. Final layer: EfficientNet-Lite0's ``fc`` neurons (ImageNet classes, known meanings) labelled
   with ``efficientnet-lite1`` as the concept model (concepts = its 1000 class names), probing
   with ../shared/imagenette-dev (refs/ + heldout/: 10 classes x 100 photos) and
   ../shared/imagenet-dev (100 classes x 1 photo). A neuron is right when its label is its own
   class (top-1) or its class is among its 5 best concepts (top-5); reported over the neurons of
   the classes present, for every similarity function.
2. Inner layer: all channels of ``blocks.15`` labelled by ``describe_neurons.py`` in a child
   process (its activations computed, the concept matrix from step 1's cache; wall time, peak
   RSS), then again from the cache with ``--visualise 10 --check``.

    nice -n 10 .venv/bin/python bench/labels.py [--shared ../shared] [--out out_labels/bench]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from vital.labels import similarity as S
from vital.labels.concepts import concept_model, probe_matrix
from vital.labels.probe import layer_activations, layer_spec, probe_set
from vital.models import load_target

ROOT = Path(__file__).resolve().parent.parent


def build_probe(shared: Path, folder: Path) -> dict[str, int]:
    """Symlinks to every probe photo in ``folder`` (one flat folder); file name -> class."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    nette = shared / "imagenette-dev"
    for split in ("refs", "heldout"):
        for cls_dir in sorted((nette / split).iterdir()):
            cls = int(cls_dir.name.split("_")[0])          # "000_tench" -> 0 (ImageNet index)
            for f in sorted(cls_dir.iterdir()):
                name = f"nette_{split}_{cls_dir.name}_{f.name}"
                _link(f, folder / name)
                truth[name] = cls
    dev = shared / "imagenet-dev"
    for line in (dev / "index.tsv").read_text().splitlines():
        parts = line.split("\t")
        if not parts[0].isdigit():                          # header
            continue
        name = f"dev_{parts[3]}"
        _link(dev / parts[3], folder / name)
        truth[name] = int(parts[0])
    return truth


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.symlink_to(src.resolve())


def accuracy(sim: torch.Tensor, classes: list[int]) -> tuple[float, float]:
    """Share of the neurons ``classes`` whose own class is their best / among their 5 best."""
    top5 = sim[classes].topk(5, dim=1).indices
    own = torch.tensor(classes)[:, None]
    return (float((top5[:, :1] == own).any(1).float().mean()),
            float((top5 == own).any(1).float().mean()))


def final_layer(probe, truth, out: dict) -> None:
    target = load_target("efficientnet-lite0", device="cpu")
    cm = concept_model(load_target("efficientnet-lite1", device="cpu"), "")
    acts = layer_activations(target, [layer_spec(target, "fc", "avg")], probe)["fc"]
    t0 = time.perf_counter()
    pm = probe_matrix(cm, probe)
    assert torch.equal(acts.used, pm.used)
    out["fc_activations"] = {"seconds": round(acts.seconds, 1), "cache_hit": acts.cache_hit}
    out["lite1_concept_matrix"] = {"seconds": round(time.perf_counter() - t0, 1),
                                   "cache_hit": pm.cache_hit}
    names = [probe.files[int(i)].name for i in pm.used]
    nette = sorted({truth[n] for n in names if n.startswith("nette_")})
    dev = sorted({truth[n] for n in names if n.startswith("dev_")} - set(nette))
    groups = {"imagenette (10 classes x 100 photos)": nette,
              "imagenet-dev (100 classes x 1 photo)": dev, "all 110 classes": nette + dev}
    rows = []
    for name in S.SIMILARITIES:
        t0 = time.perf_counter()
        sim, _ = S.similarity(name, pm.P, acts.values)
        seconds = time.perf_counter() - t0
        rows.append({"similarity": name, "seconds": round(seconds, 2),
                     **{g: accuracy(sim, c) for g, c in groups.items()}})
    out["fc"] = {"images": len(names), "rows": rows}


def child(args: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "describe_neurons.py"), *args], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_mb_so_far": round(peak_kb / 1024),
            "stdout_tail": proc.stdout.strip().splitlines()[-4:]}


def inner_layer(probe_dir: Path, out_dir: Path, out: dict, visualise: int) -> None:
    """blocks.15: the activations are computed (nothing cached for this layer yet), the
    concept matrix of efficientnet-lite1 comes from the cache the fc step filled; then the same
    run with --visualise --check reads both from the cache."""
    common = ["--model", "efficientnet-lite0", "--layers", "blocks.15", "--probe_dir",
              str(probe_dir), "--concept_model", "efficientnet-lite1", "--device", "cpu",
              "--out_dir", str(out_dir), "--no-progress", "--sheets", "10"]
    out["blocks15_cold"] = child(common + ["--run_name", "blocks15"], dict(os.environ))
    if visualise:
        out["blocks15_visualise"] = child(common + [
            "--run_name", "blocks15_visualise", "--visualise", str(visualise), "--check"],
            dict(os.environ))


def markdown(out: dict) -> str:
    groups = [k for k in out["fc"]["rows"][0] if k not in ("similarity", "seconds")]
    lines = ["| similarity | " + " | ".join(f"{g} top-1 / top-5" for g in groups) +
             " | seconds |", "|---" * (len(groups) + 2) + "|"]
    for r in out["fc"]["rows"]:
        cells = [f"{100 * r[g][0]:.1f} % / {100 * r[g][1]:.1f} %" for g in groups]
        lines.append(f"| {r['similarity']} | " + " | ".join(cells) + f" | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--out", default=str(ROOT / "out_labels" / "bench"))
    parser.add_argument("--visualise", type=int, default=10)
    parser.add_argument("--skip_inner", action="store_true")
    args = parser.parse_args()
    out_dir = Path(args.out)
    probe_dir = out_dir / "probe"
    truth = build_probe(Path(args.shared), probe_dir)
    probe = probe_set(probe_dir)
    out = {"uptime_start": os.popen("uptime").read().strip(), "probe_images": len(probe.files),
           "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    final_layer(probe, truth, out)
    print(markdown(out), flush=True)
    if not args.skip_inner:
        inner_layer(probe_dir, out_dir, out, args.visualise)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["parent_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["uptime_end"] = os.popen("uptime").read().strip()
    (out_dir / "result.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "fc"}, indent=2))


if __name__ == "__main__":
    main()
