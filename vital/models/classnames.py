"""Class names and texts: ImageNet class names (torchvision order), CLIP's ImageNet class names
and the 80 prompt templates of OpenAI's zero-shot evaluation, CLIP text embeddings and the text
target of a class for CLIP."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DATA = Path(__file__).parent / "data"
IMAGENET_FILE = DATA / "imagenet_classes.txt"
_WORD_BATCH = 1024


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard (torchvision) order."""
    return tuple(IMAGENET_FILE.read_text().splitlines())


def imagenet_templates() -> list[str]:
    """The 80 prompt templates of OpenAI's ImageNet zero-shot evaluation ("a photo of a {}.")."""
    lines = (DATA / "imagenet_templates.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def clip_classnames() -> list[str]:
    """CLIP's cleaned ImageNet class names (OpenAI's notebook), in class order."""
    return (DATA / "imagenet_clip_classnames.txt").read_text().splitlines()


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


def clip_text_target(target, text: str) -> tuple[torch.Tensor, str]:
    """Unit text embedding for a CLIP target: an ImageNet class (name or index, 80 templates
    averaged) or, failing that, the text itself as a free prompt."""
    names = clip_classnames()
    lowered = [n.lower() for n in names]
    index = None
    if text.strip().isdigit() and int(text) < len(names):
        index = int(text)
    elif text.strip().lower() in lowered:
        index = lowered.index(text.strip().lower())
    if index is None:
        prompts, label = [text], text
    else:
        prompts, label = [t.format(names[index]) for t in imagenet_templates()], names[index]
    emb = encode_texts(target.clip, prompts, target.device).mean(0)
    return F.normalize(emb, dim=-1), label
