"""Honest class metrics: visualisations compared with held-out photos of their classes, never
with the references they were matched to.

- ``heldout_folder``: a class's held-out folder (``HELDOUT_ROOT/<the reference folder's
  name>``, the layout of ``imagenette-dev``: ``refs/217_English_springer`` <->
  ``heldout/217_English_springer``); ``check_disjoint`` refuses a held-out file whose content
  equals a reference's.
- ``HeldoutJudge``: a judge model's penultimate features and logits of the held-out photos of
  every class, once; then per set of visualisations: judge top-1 / top-5, nearest-class-centroid
  top-1 (centroids of the held-out photos in the judge's features), KID (unbiased, the right
  statistic for tens of images) and FID against the held-out photos of the same classes.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vital import cache
from vital.config import ConfigError
from vital.eval import metrics
from vital.imaging import fit_images
from vital.refs.images import list_images, load_images


def heldout_folder(ref_dir: str | Path, heldout_root: str | Path) -> Path:
    """The held-out photos of the class whose references are in ``ref_dir``."""
    folder = Path(heldout_root) / Path(ref_dir).name
    if not folder.is_dir():
        raise ConfigError(f"no held-out folder {folder} for the references {ref_dir}: "
                          f"--heldout_root must hold one folder per class named like the "
                          f"reference folder")
    return folder


def check_disjoint(ref_files, heldout_files) -> None:
    """Held-out photos are never references: refuse any file whose bytes equal a reference's."""
    refs = {cache.file_sha256(f): f for f in ref_files}
    same = [(h, refs[d]) for h in heldout_files if (d := cache.file_sha256(h)) in refs]
    if same:
        raise ConfigError(f"{len(same)} held-out photo(s) are also references (same content), "
                          f"e.g. {same[0][0]} = {same[0][1]}; held-out photos must never be "
                          f"matched, or the metrics reward copying")


@dataclass
class HeldoutJudge:
    """A judge (a classifier TargetModel) and the held-out photos of the compared classes:
    ``classes`` maps a class name to (judge class index, held-out folder)."""
    judge: object
    classes: dict[str, tuple[int, Path]]
    num: int = 50
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for name, (_, folder) in self.classes.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                images, _ = load_images(list_images(folder), self.judge.input_size, self.num)
            self.features[name], self.logits[name] = self.run(images)
        self.names = list(self.classes)
        self.centroids = torch.stack([self.features[n].mean(0) for n in self.names])

    @torch.no_grad()
    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features, logits) of images in [0, 1] at any size."""
        feats, logits = [], []
        for chunk in fit_images(images, self.judge.input_size).split(16):
            with self.judge.embed_hook() as grabbed:
                out = self.judge(chunk.to(self.judge.device)).float()
                feats.append(grabbed["embed"].float().cpu())
            logits.append(out.cpu())
        return torch.cat(feats), torch.cat(logits)

    def score(self, images_by_class: dict[str, torch.Tensor]) -> dict:
        """Metrics of visualisations ({class: (n, 3, H, W)}) of some of the classes."""
        feats, labels, top1, top5 = [], [], [], []
        for name, images in images_by_class.items():
            f, logits = self.run(images)
            index = self.classes[name][0]
            hits = metrics.topk_hits(logits, index)
            top1 += hits[1].float().tolist()
            top5 += hits[5].float().tolist()
            feats.append(f)
            labels += [self.names.index(name)] * len(f)
        feats = torch.cat(feats)
        real = torch.cat([self.features[n] for n in images_by_class])
        return {"judge_top1": sum(top1) / len(top1), "judge_top5": sum(top5) / len(top5),
                "centroid_top1": metrics.centroid_top1(feats, labels, self.centroids),
                "kid_heldout": metrics.kid(feats, real) if len(feats) > 1 else math.nan,
                "fid_heldout": metrics.fid(feats, real) if len(feats) > 1 else math.nan}

    def ceiling(self) -> dict:
        """The held-out photos' own judge top-1 / top-5 and centroid top-1 (leave-one-out
        centroids, so a photo does not vote for itself): the ceiling of the table."""
        top1, top5, hits = [], [], 0
        total = 0
        for k, name in enumerate(self.names):
            index = self.classes[name][0]
            h = metrics.topk_hits(self.logits[name], index)
            top1 += h[1].float().tolist()
            top5 += h[5].float().tolist()
            own = self.features[name]
            for i in range(len(own)):
                centroids = self.centroids.clone()
                centroids[k] = torch.cat([own[:i], own[i + 1:]]).mean(0)
                hits += int(torch.cdist(own[i:i + 1].double(), centroids.double()).argmin() == k)
                total += 1
        return {"judge_top1": sum(top1) / len(top1), "judge_top5": sum(top5) / len(top5),
                "centroid_top1": hits / total}
