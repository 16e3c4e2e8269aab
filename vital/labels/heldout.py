"""Do the labels generalise? Label on one half of the probe images, score on the other half how
well the label's concept score predicts the neuron's activation (NeuronEval's correlation and
AUPRC, ``vital.labels.metrics``), and the same for the linear explanation fitted on the first
half; then swap the halves (2-fold cross-fitting) and average.

Used by ``describe_neurons.py --explain linear`` (the held-out columns of descriptions.csv) and
by ``bench/labels.py`` (the generalisation table), so both measure the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vital.labels import linear
from vital.labels.metrics import AUPRC_ALPHA, auprc, pearson

__all__ = ["halves", "HeldOut", "cross_fit", "score_labels"]


def halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(n)`` into two halves (sorted index tensors)."""
    if n < 2:
        raise ValueError(f"held-out scores need at least 2 probe images, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2].sort().values, perm[n // 2:].sort().values


def score_labels(P: torch.Tensor, A: torch.Tensor, labels: torch.Tensor,
                 alpha: float = AUPRC_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """(correlation, AUPRC), each (K,), of the label scores P[:, labels[k]] against column k of
    A (N, K), on whatever images P and A hold."""
    scores = P[:, labels].double()                               # (N, K): each neuron's label
    return pearson(A, scores), auprc(A, scores, alpha)


@dataclass
class HeldOut:
    """Per reported unit, averaged over the two folds: the single label's held-out correlation
    and AUPRC, and (with explanations) the linear explanation's."""
    label_corr: torch.Tensor
    label_auprc: torch.Tensor
    explanation_corr: torch.Tensor | None = None
    explanation_auprc: torch.Tensor | None = None
    explanation_terms: torch.Tensor | None = None   # mean number of terms

    def means(self) -> dict:
        out = {"label_corr": float(self.label_corr.mean()),
               "label_auprc": float(self.label_auprc.mean())}
        if self.explanation_corr is not None:
            out.update(explanation_corr=float(self.explanation_corr.mean()),
                       explanation_auprc=float(self.explanation_auprc.mean()),
                       explanation_terms=float(self.explanation_terms.mean()))
        return out


def cross_fit(P: torch.Tensor, A: torch.Tensor, units: list[int],
              label_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
              explain: bool = False, max_terms: int = linear.MAX_TERMS,
              candidates: int = linear.CANDIDATES, seed: int = 0,
              alpha: float = AUPRC_ALPHA) -> HeldOut:
    """2-fold held-out scores of the labels ``label_fn(P_half, A_half)`` ((K,) concept index of
    every neuron of the layer, computed on one half) and, with ``explain``, of linear
    explanations fitted on the same half; A holds the whole layer (K neurons), ``units`` are
    the neurons scored."""
    first, second = halves(P.shape[0], seed)
    sums: dict[str, torch.Tensor] = {}
    for fit, held in ((first, second), (second, first)):
        labels = label_fn(P[fit], A[fit])[units]
        corr, ap = score_labels(P[held], A[held][:, units], labels, alpha)
        parts = {"label_corr": corr, "label_auprc": ap}
        if explain:
            expls = linear.explain_units(P[fit], A[fit], units, max_terms=max_terms,
                                         candidates=candidates)
            pred = torch.stack([linear.predict(e, P[held]) for e in expls], dim=1)
            parts.update(explanation_corr=pearson(A[held][:, units], pred),
                         explanation_auprc=auprc(A[held][:, units], pred, alpha),
                         explanation_terms=torch.tensor([float(len(e.concepts))
                                                         for e in expls]))
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v.double() / 2
    return HeldOut(**sums)
