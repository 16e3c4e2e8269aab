"""The model's live opinion of the image being optimised.

CLIP: the top-k words of the BPE vocabulary's whole words by cosine to the image embedding
(vocabulary embeddings computed once per model, with a progress bar, and cached on disk by the
model's weight hash), plus the cosine to each line of a prompts file. Classifiers: the top-5
classes with their probabilities.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from vital import cache
from vital.config import packaged
from vital.models.classnames import encode_texts


def read_prompts(path: str | Path | None) -> list[str]:
    """Non-empty, non-comment lines of a prompts file (missing file: no prompts). The default
    ``input_prompts/prompts.txt``, not found from the working directory, is the one that ships
    in the package (``vital.config.packaged``)."""
    if not path:
        return []
    path = packaged(path)
    if not path.is_file():
        return []
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _vocab_cache(target, words: list[str]) -> Path:
    digest = cache.key({"format": cache.FORMAT, "words": words}, 12)
    return cache.cache_dir("opinion", f"{target.weight_hash[:24]}-{digest}.safetensors")


def vocabulary_embeddings(target, words: list[str], progress: bool = True) -> torch.Tensor:
    """Cached unit-norm embeddings of ``words`` for a CLIP target (rebuilt when corrupt)."""
    path = _vocab_cache(target, words)
    hit = cache.load_tensors(path, expect={"emb"}, what="vocabulary cache")
    if hit is not None and hit[0]["emb"].shape[0] == len(words):
        return hit[0]["emb"]
    emb = encode_texts(target.clip, words, target.device, progress=progress,
                       desc="CLIP vocabulary (once per model)")
    cache.store_tensors(path, {"emb": emb}, {"words": len(words)}, what="vocabulary cache")
    return emb


class ClipOpinion:
    """Top-k vocabulary words and prompt cosines for a CLIP target."""

    def __init__(self, target, prompts: list[str], top_k: int = 5, progress: bool = True,
                 words: list[str] | None = None):
        from clip_custom.tokenizer import SimpleTokenizer
        self.target, self.top_k, self.prompts = target, top_k, prompts
        self.words = words if words is not None else SimpleTokenizer().vocab_words()
        self.word_emb = vocabulary_embeddings(target, self.words, progress=progress)
        self.prompt_emb = encode_texts(target.clip, prompts, target.device) if prompts else None

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> dict:
        emb = F.normalize(self.target.embed(image).float(), dim=-1).mean(0).cpu()
        cos = self.word_emb @ emb
        top = cos.topk(min(self.top_k, len(self.words)))
        words = [(self.words[i], round(float(c), 4)) for c, i in zip(top.values, top.indices)]
        record = {"opinion": words}
        text = "CLIP: " + ", ".join(w for w, _ in words)
        if self.prompt_emb is not None:
            pc = (self.prompt_emb @ emb).tolist()
            record["prompts"] = {p: round(c, 4) for p, c in zip(self.prompts, pc)}
            best = max(range(len(pc)), key=pc.__getitem__)
            text += f" | best prompt: {self.prompts[best]!r} ({pc[best]:.3f})"
        record["opinion_text"] = text
        return record


class ClassifierOpinion:
    """Top-k classes of a classifier target."""

    def __init__(self, target, top_k: int = 5):
        self.target, self.top_k = target, top_k

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> dict:
        probs = self.target(image).float().softmax(-1).mean(0).cpu()
        top = probs.topk(min(self.top_k, probs.numel()))
        names = self.target.class_names or [str(i) for i in range(probs.numel())]
        classes = [(names[i], int(i), round(float(p), 4)) for p, i in zip(top.values, top.indices)]
        text = "top-5: " + ", ".join(f"{n} {p:.2f}" for n, _, p in classes)
        return {"opinion": classes, "opinion_text": text}


def make_opinion(target, prompts_file: str | None = None, top_k: int = 5, progress: bool = True):
    """The opinion callable that fits ``target`` (None for a model without classes or text)."""
    if getattr(target, "clip", None) is not None:
        try:
            target.check_vocabulary()
        except ValueError as err:   # an image-only run still works, without an opinion
            warnings.warn(f"no opinion: {err}", stacklevel=2)
            return None
        return ClipOpinion(target, read_prompts(prompts_file), top_k=top_k, progress=progress)
    if getattr(target, "class_names", None):
        return ClassifierOpinion(target, top_k=top_k)
    return None
