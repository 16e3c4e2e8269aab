"""The model's live opinion of the image being optimised.

CLIP: the top-k words of the BPE vocabulary's whole words by cosine to the image embedding
(vocabulary embeddings computed once per model, with a progress bar, and cached on disk by the
model's weight hash), plus the cosine to each line of a prompts file. Classifiers: the top-5
classes with their probabilities.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vital.references import cache_dir

_WORD_BATCH = 1024


_REPO = Path(__file__).resolve().parent.parent


def read_prompts(path: str | Path | None) -> list[str]:
    """Non-empty, non-comment lines of a prompts file (missing file: no prompts). A relative
    path not found from the working directory is looked up in the project folder."""
    if not path:
        return []
    path = Path(path)
    if not path.is_file() and not path.is_absolute():
        path = _REPO / path
    if not path.is_file():
        return []
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@torch.no_grad()
def encode_texts(clip, texts: list[str], device, batch: int = _WORD_BATCH,
                 progress: bool = False, desc: str = "text embeddings") -> torch.Tensor:
    """Unit-norm text embeddings (N, E). Sequences are cut after their end token: the text
    tower is causal, so the end token's output does not depend on the padding after it."""
    import clip_custom
    out = []
    for start in tqdm(range(0, len(texts), batch), desc=desc, disable=not progress, leave=False):
        tokens = clip_custom.tokenize(texts[start:start + batch], truncate=True)
        length = int((tokens != 0).sum(1).max())
        emb = clip.encode_text(tokens[:, :length].to(device))
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


def _vocab_cache(target, words: list[str]) -> Path:
    digest = hashlib.sha256("\n".join(words).encode()).hexdigest()[:12]
    return cache_dir() / "opinion" / f"{target.weight_hash[:24]}-{digest}.safetensors"


def vocabulary_embeddings(target, words: list[str], progress: bool = True) -> torch.Tensor:
    """Cached unit-norm embeddings of ``words`` for a CLIP target (rebuilt when corrupt)."""
    path = _vocab_cache(target, words)
    if path.exists():
        try:
            emb = load_file(str(path))["emb"]
            if emb.shape[0] == len(words) and torch.isfinite(emb).all():
                return emb
            raise ValueError("wrong shape or non-finite values")
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            warnings.warn(f"vocabulary cache {path} is corrupt ({err}); rebuilding it")
    emb = encode_texts(target.clip, words, target.device, progress=progress,
                       desc="CLIP vocabulary (once per model)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"emb": emb.contiguous()}, str(tmp))
        tmp.replace(path)
    except OSError as err:
        warnings.warn(f"could not cache vocabulary embeddings at {path}: {err}")
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
        return ClipOpinion(target, read_prompts(prompts_file), top_k=top_k, progress=progress)
    if getattr(target, "class_names", None):
        return ClassifierOpinion(target, top_k=top_k)
    return None
