"""Scoring feature visualisations with models: the visualised model, a judge classifier, an
optional CLIP zero-shot judge and the model whose features FID compares. The arithmetic lives in
``vital.eval.metrics``; this module loads models once, maps class names between them, feeds images
at each model's input size and returns plain numbers for ``result.json``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from vital.eval import metrics
from vital.config import ConfigError
from vital.models import load_target
from vital import cache
from vital.refs.images import list_images, load_images
from vital.imaging import fit_images, quantise, read_png  # noqa: F401  (re-exported)

IMAGENET_CLASSES = 1000
_CHUNK = 8   # images per forward pass while scoring


@dataclass(frozen=True)
class ClassRef:
    """A sweep target resolved on the visualised model and on each judge."""
    index: int            # class index on the visualised model
    label: str            # its class name
    judge_index: int      # the same class on the judge
    clip_index: int | None  # the ImageNet index for a CLIP zero-shot judge (None: no CLIP judge)


def _num_classes(model) -> int | None:
    if model.clip is not None:
        return IMAGENET_CLASSES
    return len(model.class_names) if model.class_names else None


def _clip_class(text: str) -> int:
    """ImageNet index of a CLIP target given as a class name (CLIP's names) or an index."""
    from vital.models.classnames import clip_classnames
    names = [n.lower() for n in clip_classnames()]
    text = str(text).strip()
    if text.isdigit() and int(text) < len(names):
        return int(text)
    if text.lower() in names:
        return names.index(text.lower())
    raise ConfigError(f"target {text!r} is not an ImageNet class; on a CLIP model a sweep's "
                      f"targets must be ImageNet class names or indices 0..999 so that "
                      f"accuracy can be measured")


def _accuracy(prefix: str, logits: torch.Tensor, index: int) -> dict[str, float]:
    hits = metrics.topk_hits(logits, index, ks=(1, 5))
    prob = metrics.class_probability(logits, index)
    return {f"{prefix}_top1": float(hits[1].mean()), f"{prefix}_top5": float(hits[5].mean()),
            f"{prefix}_prob": float(prob.mean())}


class Scorer:
    """Models used for scoring, loaded once; ``judge`` and ``fid_model`` are model specs,
    ``clip_judge`` an optional CLIP spec for zero-shot classification."""

    def __init__(self, judge: str, fid_model: str = "", clip_judge: str = "", device="cpu",
                 progress: bool = False, heldout_root: str = ""):
        self.judge, self.fid_model = judge, fid_model or judge
        self.heldout_root = heldout_root
        self.heldout: dict[str, tuple[int, Path]] = {}   # target -> (judge class, folder)
        self._heldout_judge = None
        self.clip_judge, self.device, self.progress = clip_judge, device, progress
        self._models: dict[str, object] = {}
        self._zeroshot: dict[str, torch.Tensor] = {}
        self._real: dict[tuple, torch.Tensor] = {}

    # ----- models and classes -------------------------------------------------------------
    def model(self, spec: str):
        if spec not in self._models:
            self._models[spec] = load_target(spec, device=self.device)
        return self._models[spec]

    def resolve(self, model_spec: str, target: str) -> ClassRef:
        """The target's class on every model; an unknown class raises ValueError/ConfigError."""
        model = self.model(model_spec)
        if model.clip is not None:
            from vital.models.classnames import clip_classnames
            index = _clip_class(target)
            label = clip_classnames()[index]
        elif not model.class_names:
            raise ConfigError(f"{model_spec} has no classes; the evaluation needs a classifier "
                              f"or a CLIP model")
        else:
            index = model.class_index(target)
            label = model.class_names[index]
        judge_index = self._judge_class(self.judge, model, index, label)
        clip_index = self._judge_class(self.clip_judge, model, index, label) \
            if self.clip_judge else None
        return ClassRef(index, label, judge_index, clip_index)

    def _judge_class(self, judge_spec: str, model, index: int, label: str) -> int:
        """Both ImageNet-1k: the same index. Otherwise the judge must know the class name."""
        judge = self.model(judge_spec)
        if _num_classes(judge) == _num_classes(model) == IMAGENET_CLASSES:
            return index
        if judge.clip is not None or not judge.class_names:
            raise ConfigError(f"judge {judge_spec} cannot score class {label!r} of "
                              f"{model.spec}: a CLIP judge needs ImageNet-1k targets and a "
                              f"judge without classes cannot classify")
        try:
            return judge.class_index(label)
        except ValueError as err:
            raise ConfigError(f"judge {judge_spec} does not know class {label!r} of "
                              f"{model.spec} ({err})") from None

    # ----- forward passes -----------------------------------------------------------------
    @torch.no_grad()
    def logits(self, spec: str, images: torch.Tensor) -> torch.Tensor:
        """(B, K) class scores: a classifier's logits or CLIP zero-shot logits (80 templates)."""
        model = self.model(spec)
        out = []
        for chunk in fit_images(images, model.input_size).split(_CHUNK):
            chunk = chunk.to(model.device)
            if model.clip is not None:
                out.append(metrics.zeroshot_logits(model.embed(chunk), self._classifier(model)))
            else:
                out.append(model(chunk).float())
        return torch.cat(out).cpu()

    @torch.no_grad()
    def embed(self, spec: str, images: torch.Tensor) -> torch.Tensor:
        """(B, D) features for FID: penultimate features of a classifier, CLIP's embedding."""
        model = self.model(spec)
        chunks = fit_images(images, model.input_size).split(_CHUNK)
        return torch.cat([model.embed(c.to(model.device)).float().cpu() for c in chunks])

    def _classifier(self, model) -> torch.Tensor:
        key = model.weight_hash
        if key not in self._zeroshot:
            self._zeroshot[key] = zeroshot_weights(model, progress=self.progress).to(model.device)
        return self._zeroshot[key]

    def real_images(self, ref_dir: str, num: int, size: int) -> torch.Tensor:
        key = (str(ref_dir), num, size)
        if key not in self._real:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "fewer images than asked": the run warned
                self._real[key] = load_images(list_images(ref_dir), size, num)[0]
        return self._real[key]

    # ----- one run ------------------------------------------------------------------------
    def score(self, model_spec: str, cls: ClassRef, images: torch.Tensor, ref_dir: str,
              num_ref: int) -> dict:
        """Metrics of FVs (B, 3, H, W) in [0, 1] for one class; see ``vital.eval.metrics``."""
        own_model = self.model(model_spec)
        real = self.real_images(ref_dir, num_ref, own_model.input_size)
        own, own_real = self.logits(model_spec, images), self.logits(model_spec, real)
        out = {**_accuracy("self", own, cls.index),
               **_accuracy("judge", self.logits(self.judge, images), cls.judge_index)}
        if cls.clip_index is not None:
            out.update(_accuracy("clip", self.logits(self.clip_judge, images), cls.clip_index))
        neuron = metrics.auc_mad(own[:, cls.index], own_real[:, cls.index])
        out.update(class_auc=neuron["auc"], class_mad=neuron["mad"])
        return out

    def score_real(self, model_spec: str, cls: ClassRef, ref_dir: str, num_ref: int) -> dict:
        """The same accuracies on the reference images themselves (an upper bound)."""
        judge_size = self.model(self.judge).input_size
        own = self.real_images(ref_dir, num_ref, self.model(model_spec).input_size)
        out = {**_accuracy("self", self.logits(model_spec, own), cls.index),
               **_accuracy("judge", self.logits(self.judge, self.real_images(
                   ref_dir, num_ref, judge_size)), cls.judge_index)}
        return out

    def curve(self, model_spec: str, cls: ClassRef, step_files: list[Path]) -> list[dict]:
        """Self and judge accuracy of each saved step PNG (steps/step_XXXX.png)."""
        if not step_files:
            return []
        images = torch.cat([read_png(p) for p in step_files])
        own, judged = self.logits(model_spec, images), self.logits(self.judge, images)
        rows = []
        for k, path in enumerate(step_files):
            step = int(path.stem.split("_")[-1])
            rows.append({"step": step, **_accuracy("self", own[k:k + 1], cls.index),
                         **_accuracy("judge", judged[k:k + 1], cls.judge_index)})
        return rows

    def fid_features(self, images: torch.Tensor, ref_dir: str, num_ref: int,
                     target: str | None = None) -> dict:
        """{"fv": (B, D), "real": (N, D)} features of the FVs and the references for FID, and
        with held-out photos {"fv_judge", "heldout"}: the judge's features of the FVs and of
        the target's held-out photos (KID / FID against held-out photos in the report)."""
        size = self.model(self.fid_model).input_size
        out = {"fv": self.embed(self.fid_model, images),
               "real": self.embed(self.fid_model, self.real_images(ref_dir, num_ref, size))}
        if target is not None and target in self.heldout:
            judge = self.heldout_judge()
            out["fv_judge"] = judge.run(images)[0]
            out["heldout"] = judge.features[target]
        return out

    def heldout_judge(self):
        """The judge with the held-out photos of every target (built once)."""
        if self._heldout_judge is None:
            from vital.eval.heldout import HeldoutJudge
            self._heldout_judge = HeldoutJudge(self.model(self.judge), dict(self.heldout))
        return self._heldout_judge

    def score_heldout(self, target: str, images: torch.Tensor,
                      feats: torch.Tensor | None = None) -> dict:
        """Nearest-centroid top-1 of the FVs among the held-out centroids of every target;
        ``feats``: the judge's features of ``images`` if already computed (``fid_features``)."""
        if target not in self.heldout:
            return {}
        judge = self.heldout_judge()
        feats = judge.run(images)[0] if feats is None else feats
        label = judge.names.index(target)
        return {"centroid_top1": metrics.centroid_top1(feats, [label] * len(feats),
                                                       judge.centroids)}

    def score_heldout_real(self, target: str) -> dict:
        """The held-out photos' own judge top-1 / top-5 (the ceiling of the table)."""
        if target not in self.heldout:
            return {}
        judge = self.heldout_judge()
        index = self.heldout[target][0]
        hits = metrics.topk_hits(judge.logits[target], index)
        return {"heldout_judge_top1": float(hits[1].mean()),
                "heldout_judge_top5": float(hits[5].mean())}


# ---------------------------------------------------------------- CLIP zero-shot weights

def _zeroshot_cache(model) -> Path:
    return cache.cache_dir("eval", f"zeroshot-{model.weight_hash[:24]}.safetensors")


def zeroshot_weights(model, progress: bool = False) -> torch.Tensor:
    """(1000, E) zero-shot classifier of a CLIP target: CLIP's ImageNet class names, each with
    the 80 templates of OpenAI's evaluation (``vital.eval.metrics.zeroshot_classifier``); cached on
    disk by the model's weight hash (80,000 prompts are slow to encode on a CPU)."""
    from vital.models.classnames import clip_classnames, imagenet_templates
    from vital.models.classnames import encode_texts
    path = _zeroshot_cache(model)
    hit = cache.load_tensors(path, expect={"weights"}, what="zero-shot cache")
    if hit is not None:
        return hit[0]["weights"]
    names, templates = clip_classnames(), imagenet_templates()
    prompts = [t.format(name) for name in names for t in templates]   # class-major order
    emb = encode_texts(model.clip, prompts, model.device, progress=progress,
                       desc="CLIP zero-shot prompts (once per model)")
    weights = metrics.zeroshot_classifier(
        emb.view(len(names), len(templates), -1))   # (C*T, E) -> (C, T, E), class-major
    cache.store_tensors(path, {"weights": weights}, what="zero-shot cache")
    return weights
