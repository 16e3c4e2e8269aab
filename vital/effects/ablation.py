"""Mean ablation of neurons' second-order effects and CLIP zero-shot accuracy (the paper's
ablation study).

A labelled folder holds one subfolder per class, named by the ImageNet class (CLIP's cleaned
name, "golden retriever", or torchvision's, underscores read as spaces). The zero-shot
classifier is OpenAI's: per class, the 80 templates' unit text embeddings averaged and
normalised again; cached on disk per model. Ablating replaces each neuron's second-order effect
by its mean over the probe images: ``embedding - sum_n e_n + sum_n mean_n``, for all neurons or
for all but the ``keep`` neurons with the largest centred effect norm on that image.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.nn.functional as F

from vital import cache
from vital.config import ConfigError
from vital.models.classnames import clip_classnames, encode_texts, imagenet_classes, imagenet_templates
from vital.refs.patches import data_files

__all__ = ["labelled_folder", "zeroshot_classifier", "AblationCounter"]


def _norm_name(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def labelled_folder(folder) -> tuple[list[Path], list[int], list[int]]:
    """(image files, their ImageNet class index, the distinct classes in folder order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"labelled folder {folder} does not exist or is not a folder")
    lookup = {}
    for names in (imagenet_classes(), clip_classnames()):
        for i, name in enumerate(names):
            lookup.setdefault(_norm_name(name), i)
    files, labels, classes = [], [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        key = _norm_name(sub.name)
        if key not in lookup:
            close = difflib.get_close_matches(key, list(lookup), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"class folder {sub.name!r} in {folder} is not an ImageNet class "
                              f"name{hint}")
        found = data_files(sub)
        files += found
        labels += [lookup[key]] * len(found)
        classes.append(lookup[key])
    if not files:
        raise ConfigError(f"labelled folder {folder} has no class subfolders with images")
    return files, labels, classes


def zeroshot_classifier(target, classes: list[int], progress: bool = True) -> torch.Tensor:
    """(C, E) unit class embeddings for the ImageNet class indices ``classes``."""
    names, templates = clip_classnames(), imagenet_templates()
    spec = {"format": cache.FORMAT, "weights": target.weight_hash, "classes": classes,
            "names": [names[c] for c in classes], "templates": templates}
    path = cache.cache_dir("zeroshot", cache.key(spec) + ".safetensors")
    hit = cache.load_tensors(path, expect={"classifier"}, what="zero-shot classifier cache")
    if hit is not None:
        return hit[0]["classifier"]
    prompts = [t.format(names[c]) for c in classes for t in templates]
    emb = encode_texts(target.clip, prompts, target.device, progress=progress,
                       desc="zero-shot classifier (once per model)")
    emb = F.normalize(emb.view(len(classes), len(templates), -1).mean(1), dim=-1)
    cache.store_tensors(path, {"classifier": emb}, {"classes": len(classes)},
                        what="zero-shot classifier cache")
    return emb


class AblationCounter:
    """Correct predictions with and without ablation, over batches."""

    def __init__(self, classifier: torch.Tensor, classes: list[int], keep: list[int]):
        self.classifier = classifier
        self.classes = torch.tensor(classes)
        self.keep = list(keep)
        self.correct = {"none": 0, **{self.name(k): 0 for k in self.keep}}
        self.total = 0

    @staticmethod
    def name(keep: int) -> str:
        return "all" if keep == 0 else f"all_but_top{keep}"

    def _hits(self, emb: torch.Tensor, labels: torch.Tensor) -> int:
        pred = self.classes[(F.normalize(emb.float(), dim=-1) @ self.classifier.t()).argmax(1)]
        return int((pred == labels).sum())

    def update(self, embedding: torch.Tensor, labels: torch.Tensor,
               ablated: dict[int, torch.Tensor]) -> None:
        """``ablated[keep]`` (B, E): the embedding with the ablation applied."""
        self.total += len(labels)
        self.correct["none"] += self._hits(embedding, labels)
        for keep, emb in ablated.items():
            self.correct[self.name(keep)] += self._hits(emb, labels)

    def accuracy(self) -> dict[str, float]:
        return {k: v / max(1, self.total) for k, v in self.correct.items()}
