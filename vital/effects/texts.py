"""Text sets and the sparse decomposition of a neuron's component over them.

A text set is a file (one text per line) or a bundled set: ``words20k`` (the 20,000 most
frequent English words of ``wordfreq``, alphabetic only) or ``imagenet`` (CLIP's ImageNet class
names). The raw strings are embedded once by the CLIP text tower (no templates), L2-normalised
and cached on disk per model (``vital.models.opinion.vocabulary_embeddings``, through
``vital.cache``). As the official code, the embeddings are mean-centred over the set before the
decomposition, then each is normalised again (orthogonal matching pursuit wants unit atoms).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vital.config import ConfigError
from vital.models.labels import clip_classnames
from vital.models.opinion import vocabulary_embeddings

__all__ = ["BUNDLED", "text_set", "text_embeddings", "dictionary", "Decomposition",
           "sparse_decompose"]

BUNDLED = ("words20k", "imagenet")
_WORDS = 20000


def _words20k() -> list[str]:
    from wordfreq import top_n_list
    return [w for w in top_n_list("en", _WORDS) if w.isalpha()]


def text_set(spec: str) -> list[str]:
    """The texts of a bundled set name or a file; a file with no lines is an error."""
    if spec == "words20k":
        return _words20k()
    if spec == "imagenet":
        return clip_classnames()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"text set {spec!r} is neither a file nor a bundled set "
                          f"({', '.join(BUNDLED)})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise ConfigError(f"text file {path} has no lines; give one text per line")
    return texts


def text_embeddings(target, texts: list[str], progress: bool = True) -> torch.Tensor:
    """(N, E) unit CLIP text embeddings of the raw strings, cached per model weights."""
    return vocabulary_embeddings(target, texts, progress=progress)


def dictionary(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean-centred over the set, each row unit again: the atoms of the decomposition."""
    return F.normalize(embeddings.float() - embeddings.float().mean(0, keepdim=True), dim=-1)


@dataclass
class Decomposition:
    terms: list[tuple[int, float]]   # (text index, coefficient), largest |coefficient| first
    cosine: float                    # cosine of the reconstruction with the component


def sparse_decompose(components: torch.Tensor, atoms: torch.Tensor,
                     k: int) -> list[Decomposition]:
    """Orthogonal matching pursuit: each component (M, E) as at most ``k`` atoms (N, E)."""
    from sklearn.linear_model import orthogonal_mp
    k = max(1, min(k, atoms.shape[0], atoms.shape[1]))
    x = atoms.double().t().numpy()                                            # (E, N)
    y = components.double().t().numpy()                                      # (E, M)
    coef = np.asarray(orthogonal_mp(x, y, n_nonzero_coefs=k, precompute=False))
    coef = coef.reshape(atoms.shape[0], -1)                                   # (N, M)
    out = []
    for m in range(coef.shape[1]):
        c = coef[:, m]
        nonzero = np.flatnonzero(c)
        order = nonzero[np.argsort(-np.abs(c[nonzero]), kind="stable")]
        recon = x @ c
        denom = np.linalg.norm(recon) * np.linalg.norm(y[:, m])
        cosine = float(recon @ y[:, m] / denom) if denom > 0 else 0.0
        out.append(Decomposition([(int(i), float(c[i])) for i in order], cosine))
    return out
