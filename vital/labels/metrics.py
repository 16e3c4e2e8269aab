"""How well an explanation predicts where a neuron fires: the metrics of NeuronEval (Oikarinen,
Yan & Weng, *Evaluating Neuron Explanations: A Unified Framework with Sanity Checks*, ICML 2025)
that pass both of its sanity checks (missing and extra labels): Pearson correlation, cosine,
AUPRC, F1 and IoU.

An explanation of neuron k is a column of concept scores c (N images), e.g. the concept model's
score for the neuron's label, or a linear explanation's prediction; the neuron's activations
are a column a (N images). Every function here compares *paired* columns: ``acts`` (N, K) with
``scores`` (N, K), column k with column k, and returns (K,) values. Scored on probe images the
label was not chosen on, they say whether the label generalises.

- ``pearson``: correlation of a and c over the images (0 when either column is constant).
- ``cosine``: cosine of a and c (not centred).
- ``auprc``: the neuron is "on" for its top ``alpha`` fraction of images (``top_alpha``: the
  ceil(alpha N) highest activations, ties at the cutoff included, as NeuronEval binarises);
  c ranks the images; the area under the precision-recall curve is the average precision with
  ties in c handled as ``sklearn.metrics.average_precision_score`` does (one threshold per
  distinct score). A random ranking scores about alpha.
- ``f1``, ``iou``: the neuron "on" as above, the concept "present" where c >= ``threshold``
  (NeuronEval: probability >= 0.5).
"""
from __future__ import annotations

import math

import torch

__all__ = ["pearson", "pearson_matrix", "cosine", "top_alpha", "average_precision", "auprc",
           "f1", "iou", "AUPRC_ALPHA"]

AUPRC_ALPHA = 0.01   # top 1 % of the images count as the neuron firing (NeuronEval's range)
_EPS = 1e-12


def _paired(acts: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if acts.dim() == 1:
        acts, scores = acts[:, None], scores[:, None]
    if acts.shape != scores.shape:
        raise ValueError(f"paired metrics need activations and scores of the same shape "
                         f"(images x neurons); got {tuple(acts.shape)} and {tuple(scores.shape)}")
    return acts.double(), scores.double()


def _unit_centred(x: torch.Tensor) -> torch.Tensor:
    """Each column minus its mean, divided by its L2 norm (a constant column becomes 0)."""
    x = x - x.mean(dim=0, keepdim=True)
    return x / x.norm(dim=0, keepdim=True).clamp_min(_EPS)


def pearson(acts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(K,) Pearson correlation of column k of ``acts`` with column k of ``scores``."""
    acts, scores = _paired(acts, scores)
    return (_unit_centred(acts) * _unit_centred(scores)).sum(0)


def pearson_matrix(acts: torch.Tensor, scores: torch.Tensor,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(K, M) correlation of every neuron (N, K) with every concept (N, M), in ``dtype``
    (float32 halves the memory for 20k concepts; the correlations stay good to ~1e-6)."""
    return _unit_centred(acts.to(dtype)).t() @ _unit_centred(scores.to(dtype))


def cosine(acts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(K,) cosine of column k of ``acts`` with column k of ``scores``."""
    acts, scores = _paired(acts, scores)
    num = (acts * scores).sum(0)
    return num / (acts.norm(dim=0) * scores.norm(dim=0)).clamp_min(_EPS)


def top_alpha(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    """(N, K) 0/1: the ceil(alpha N) highest activations of each column (ties included)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha is the fraction of images where a neuron counts as firing; "
                         f"it must be in (0, 1], got {alpha}")
    acts = acts.double() if acts.dim() == 2 else acts.double()[:, None]
    n = math.ceil(alpha * acts.shape[0])
    cutoff = acts.topk(n, dim=0).values[-1:]          # (1, K): the n-th highest value
    return (acts >= cutoff).double()


def average_precision(labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(K,) average precision of ``scores`` ranking the positives of ``labels`` (both (N, K)),
    one threshold per distinct score (sklearn's step-wise AP). A column without positives
    gets 0. Written in torch for all columns at once (sklearn takes one column per call)."""
    labels, scores = _paired(labels, scores)
    order = scores.argsort(dim=0, descending=True, stable=True)          # (N, K)
    y = labels.gather(0, order)
    s = scores.gather(0, order)
    hits = y.cumsum(0)                                                   # positives in top i+1
    # the last position of each run of equal scores: precision is taken only there
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[:-1] != s[1:]
    # for every position, the index of the end of its run of ties (scan from the bottom)
    n = s.shape[0]
    index = torch.arange(n, dtype=torch.long)[:, None].expand_as(s)
    end = torch.where(last, index, torch.full_like(index, n))
    end = end.flip(0).cummin(0).values.flip(0)                           # (N, K)
    precision_at_end = hits.gather(0, end) / (end + 1).double()
    positives = y.sum(0)
    return (y * precision_at_end).sum(0) / positives.clamp_min(1)


def auprc(acts: torch.Tensor, scores: torch.Tensor, alpha: float = AUPRC_ALPHA) -> torch.Tensor:
    """(K,) NeuronEval's AUPRC: how well ``scores`` find the images where the neuron fires
    (its top ``alpha`` fraction)."""
    acts, scores = _paired(acts, scores)
    return average_precision(top_alpha(acts, alpha), scores)


def _confusion(acts, scores, alpha, threshold):
    acts, scores = _paired(acts, scores)
    on = top_alpha(acts, alpha)
    present = (scores >= threshold).double()
    tp = (on * present).sum(0)
    return tp, (on * (1 - present)).sum(0), ((1 - on) * present).sum(0)


def f1(acts: torch.Tensor, scores: torch.Tensor, alpha: float = AUPRC_ALPHA,
       threshold: float = 0.5) -> torch.Tensor:
    """(K,) F1 of "concept present" (score >= threshold) against "neuron fires" (top alpha)."""
    tp, fp, fn = _confusion(acts, scores, alpha, threshold)
    return 2 * tp / (2 * tp + fp + fn).clamp_min(_EPS)


def iou(acts: torch.Tensor, scores: torch.Tensor, alpha: float = AUPRC_ALPHA,
        threshold: float = 0.5) -> torch.Tensor:
    """(K,) intersection over union of "neuron fires" and "concept present"."""
    tp, fp, fn = _confusion(acts, scores, alpha, threshold)
    return tp / (tp + fp + fn).clamp_min(_EPS)
