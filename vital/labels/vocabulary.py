"""Concept sets and the concept model: what each probe image shows, as an image-concept matrix
P (N images x M concepts).

Concept sets (``--concepts``):

- ``imagenet``: the 1000 ImageNet class names (CLIP's cleaned names for a CLIP concept model,
  the torchvision names for a classifier).
- ``words20k``: the 20,000 most frequent English words of ``wordfreq`` (``top_n_list('en')``),
  keeping words of ASCII letters only, at least 2 long, lowercase, without duplicates, in
  frequency order. CLIP-Dissect's ``20k.txt`` is an unfiltered web word list (it holds single
  letters, numbers are absent); our filter drops tokens such as "don't", "2", "i" that are not
  concepts. The list depends on the installed wordfreq version (its digest keys the cache and is
  written to summary.json).
- a text file: one concept a line; empty lines and lines starting with ``#`` are skipped,
  duplicates are dropped (first kept).
- empty: the classifier's own class names, or ``words20k`` for a CLIP concept model.

Concept models (``--concept_model``):

- a CLIP spec: image embeddings (``encode_image``) and text embeddings of the raw concept strings
  (no prompt template, as CLIP-Dissect), both L2-normalised; P = their cosine.
- a classifier spec (``efficientnet-lite1``, ``torchvision:NAME``): the concepts are its class
  names (a concept file may pick a subset of them); P = the columns of the chosen concepts of
  one of three score paths (``--concept_scores``), all over all its classes: ``logits``,
  ``logprobs`` (log-softmax) or ``probs`` (softmax). The WPMI similarities apply softmax(a P)
  over concepts on top, as CLIP-Dissect's code does for any P: on probabilities with a = 10
  that is the "double softmax" softmax(10 softmax(z)); on logits with a = 1 it is the
  classifier's own probabilities. Which path each similarity gets by default was measured
  (``bench/labels.py``, docs/labels.md).
- ``auto``: ViT-B/16 (CLIP-Dissect's choice) when its weights are already in the cache, else
  the embedded ``efficientnet-lite1`` (this machine cannot download CLIP weights).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vital.config import ConfigError
from vital.models.classnames import clip_classnames, encode_texts, imagenet_classes
from vital.labels.probe import ProbeSet, cached_tensors, image_batches
from vital.refs.images import PREPROCESS_TAG

__all__ = ["CONCEPT_SETS", "WORDS20K_SIZE", "CLASSIFIER_SCORES", "words20k", "concepts_digest",
           "default_concept_model", "classifier_scores", "ConceptModel", "concept_model",
           "read_concept_file", "ProbeMatrix", "probe_matrix"]

CONCEPT_SETS = ("imagenet", "words20k")
CLASSIFIER_SCORES = ("logits", "logprobs", "probs")   # a classifier's score paths; CLIP: cosine
WORDS20K_SIZE = 20_000
_WORDFREQ_POOL = 30_000     # words asked from wordfreq, so 20k remain after the filter
_AUTO_CLIP = "ViT-B/16"
_AUTO_CLASSIFIER = "efficientnet-lite1"


def words20k(n: int = WORDS20K_SIZE) -> list[str]:
    """The ``n`` most frequent English words (wordfreq), filtered (see the module docstring)."""
    import wordfreq
    kept, seen = [], set()
    for word in wordfreq.top_n_list("en", _WORDFREQ_POOL):
        word = word.lower()
        if len(word) >= 2 and word.isascii() and word.isalpha() and word not in seen:
            kept.append(word)
            seen.add(word)
        if len(kept) == n:
            break
    return kept


def concepts_digest(concepts: list[str]) -> str:
    return hashlib.sha256("\n".join(concepts).encode()).hexdigest()


def read_concept_file(path: Path) -> list[str]:
    """One concept a line; blanks and ``#`` comments skipped; duplicates dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"concept file {path} is not UTF-8 text (byte {err.start}: "
                          f"{err.object[err.start:err.start + 1]!r}); save it as UTF-8, one "
                          f"concept a line") from None
    lines = (line.strip() for line in text.splitlines())
    concepts = list(dict.fromkeys(c for c in lines if c and not c.startswith("#")))
    if not concepts:
        raise ValueError(f"concept file {path} holds no concepts (one concept a line)")
    return concepts


def default_concept_model() -> str:
    """ViT-B/16 when its weights are cached (nothing is downloaded), else efficientnet-lite1."""
    try:
        from clip_custom.download import MODELS, cache_dir
        if (cache_dir() / Path(MODELS[_AUTO_CLIP]).name).is_file():
            return _AUTO_CLIP
    except ImportError:
        pass
    return _AUTO_CLASSIFIER


def classifier_scores(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """A classifier's logits (B, classes) -> its scores of path ``kind`` (over all classes)."""
    if kind == "logits":
        return logits
    if kind == "logprobs":
        return torch.log_softmax(logits, dim=-1)
    if kind == "probs":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"unknown classifier score path {kind!r}; valid: "
                     f"{', '.join(CLASSIFIER_SCORES)}")


@dataclass
class ConceptModel:
    """A loaded concept model and its concepts; ``scores(images)`` is a block of P."""
    target: object                      # the TargetModel (CLIP or classifier)
    concepts: list[str]
    source: str                         # "imagenet", "words20k", "class names" or the file
    text: torch.Tensor | None = None    # CLIP: (M, E) unit text embeddings
    columns: torch.Tensor | None = None  # classifier: class index of each concept
    score_kind: str = "probs"           # classifier: logits | logprobs | probs; CLIP: cosine

    @property
    def is_clip(self) -> bool:
        return getattr(self.target, "clip", None) is not None

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP: unit image embeddings (B, E); classifier: logits (B, classes)."""
        out = self.target.embed(images.to(self.target.device)) if self.is_clip else \
            self.target.output(images.to(self.target.device))
        out = out.float().cpu()
        return F.normalize(out, dim=-1) if self.is_clip else out

    def matrix(self, features: torch.Tensor) -> torch.Tensor:
        """Image features -> P (B, M): cosine to the concept texts, or the columns of the
        classifier's scores (``score_kind``)."""
        if self.is_clip:
            return features @ self.text.t()
        return classifier_scores(features, self.score_kind)[:, self.columns]

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """P for a batch of images in [0, 1] (e.g. rendered visualisations)."""
        return self.matrix(self.image_features(images))

    def key(self) -> dict:
        return {"model": str(self.target.spec), "weights": self.target.weight_hash}


def _concept_list(target, spec: str) -> tuple[list[str], str]:
    is_clip = getattr(target, "clip", None) is not None
    if not spec:
        spec = "words20k" if is_clip else "classes"
    if spec == "classes" and not is_clip:
        return list(target.class_names), "class names"
    if spec == "imagenet":
        return (clip_classnames() if is_clip else list(imagenet_classes())), "imagenet"
    if spec == "words20k":
        return words20k(), "words20k"
    path = Path(spec).expanduser()
    if path.is_file():
        return read_concept_file(path), str(path)
    raise ValueError(f"unknown concept set or file {spec!r}; valid: {', '.join(CONCEPT_SETS)}, "
                     f"or a text file with one concept a line")


def _class_columns(target, concepts: list[str], source: str) -> torch.Tensor:
    if concepts == list(target.class_names):   # all classes, in order (names may repeat:
        return torch.arange(len(concepts))     # ImageNet has two "crane"s and two "maillot"s)
    names = [n.lower() for n in target.class_names]
    where = {n: i for i, n in enumerate(names)}
    missing = [c for c in concepts if c.lower() not in where]
    if missing:
        raise ValueError(f"the classifier {target.spec} can only name its own classes, but the "
                         f"concepts from {source} include {missing[0]!r} ({len(missing)} not "
                         f"among its classes); use a CLIP concept model for free-form concepts "
                         f"or leave --concepts empty")
    return torch.tensor([where[c.lower()] for c in concepts], dtype=torch.long)


def concept_model(target, concepts_spec: str = "", *, scores: str = "probs",
                  progress: bool = True, use_cache: bool = True, batch: int = 1024) -> ConceptModel:
    """The concept model for a loaded ``target`` (CLIP or classifier) and a concept set;
    ``scores`` is a classifier's score path (ignored for CLIP, whose P is the cosine)."""
    if getattr(target, "clip", None) is None and not getattr(target, "class_names", None):
        raise ValueError(f"concept model {target.spec} is neither a CLIP nor a classifier with "
                         f"class names; use a CLIP spec or e.g. efficientnet-lite1")
    concepts, source = _concept_list(target, concepts_spec)
    model = ConceptModel(target, concepts, source)
    if not model.is_clip:
        if scores not in CLASSIFIER_SCORES:
            raise ValueError(f"unknown classifier score path {scores!r}; valid: "
                             f"{', '.join(CLASSIFIER_SCORES)}")
        model.score_kind = scores
        model.columns = _class_columns(target, concepts, source)
        return model
    spec = {**model.key(), "concepts": concepts_digest(concepts), "template": None}
    tensors, _ = cached_tensors("concept_texts", spec, lambda: {"text": encode_texts(
        target.clip, concepts, target.device, batch=batch, progress=progress,
        desc="concept text embeddings")}, use_cache, {"text"})
    model.text = tensors["text"].float()
    model.score_kind = "cosine"
    return model


@dataclass
class ProbeMatrix:
    """P (N, M) over the probe images ``used`` (indices into the probe set's files), and the
    concept model's image features it came from (CLIP unit embeddings or classifier logits)."""
    P: torch.Tensor
    used: torch.Tensor
    cache_hit: bool
    features: torch.Tensor | None = None


def probe_matrix(model: ConceptModel, probe: ProbeSet, *, batch: int = 32, use_cache: bool = True,
                 progress: bool = True) -> ProbeMatrix:
    """P of the probe set. The concept model's image features are cached (keyed by model,
    weights, probe contents and preprocessing), so another concept set only costs the texts."""
    target = model.target
    spec = {**model.key(), "probe": probe.digest, "size": target.input_size,
            "mean": target.mean, "std": target.std, "preprocess": PREPROCESS_TAG,
            "features": "unit-embedding" if model.is_clip else "logits"}

    @torch.no_grad()
    def compute():
        feats, used = [], []
        for images, index in image_batches(probe.files, target.input_size, batch, progress,
                                           f"concept model {target.spec}"):
            feats.append(model.image_features(images))
            used.append(index)
        return {"features": torch.cat(feats), "used": torch.cat(used)}
    tensors, hit = cached_tensors("concept_images", spec, compute, use_cache,
                                  {"features", "used"})
    return ProbeMatrix(model.matrix(tensors["features"]), tensors["used"], hit,
                       tensors["features"])
