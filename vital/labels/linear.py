"""Linear explanations (Oikarinen & Weng, *Linear Explanations for Individual Neurons*, ICML
2024): a neuron as a sparse non-negative combination of concepts, "0.62 dog + 0.31 grass",
fitted on the probe activations, with the correlation it reaches on probe images it was not
fitted on (their "simulation" score).

Our fit (scikit-learn and scipy, not the paper's GLM-SAGA + greedy search):

1. Candidates: the neuron's ``candidates`` concepts of highest correlation, plus its first
   ``max_terms`` labels of ``forward_labels`` (which find a second concept that near-synonyms of
   the first would hide).
2. Support: ``LassoLarsIC(criterion="bic", positive=True)`` on the standardised candidate
   columns and the standardised activations: the LARS-lasso path with non-negative weights, cut
   where the Bayesian information criterion is lowest; at most ``max_terms`` terms (the largest).
3. Weights: non-negative least squares (``scipy.optimize.nnls``) of the centred activations on
   the centred concept scores of the support, so the weights are not shrunk by the lasso
   penalty; the intercept makes the means agree.

The weights shown are standardised (beta) weights: w_j std(score_j) / std(activation), i.e. how
many standard deviations of the activation one standard deviation of the concept's score brings;
a neuron that is exactly one concept's score reads "1.00 concept". ``coef`` and ``intercept``
are the raw weights on the concept scores (the prediction is ``intercept + scores @ coef``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from vital.labels.metrics import pearson_matrix
from vital.labels.similarity import forward_labels

__all__ = ["LinearExplanation", "fit_linear", "explain_units", "iter_explanations", "predict",
           "path_labels",
           "MAX_TERMS", "CANDIDATES"]

MAX_TERMS = 5        # the paper's no-search explanations have 5 terms
CANDIDATES = 64      # concepts handed to the lasso per neuron (plus the forward-selected ones)
_MIN_STD = 1e-12
_MIN_NOISE = 1e-6     # floor of the noise variance of a standardised activation (see _support)


@dataclass
class LinearExplanation:
    """One neuron's explanation: concept indices with their standardised and raw weights,
    largest first."""
    concepts: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)    # standardised (beta), >= 0
    coef: list[float] = field(default_factory=list)       # raw weights on the concept scores
    intercept: float = 0.0

    def text(self, names: list[str], digits: int = 2) -> str:
        """"0.62 dog + 0.31 grass" (or "(none)" when no concept helps)."""
        if not self.concepts:
            return "(none)"
        return " + ".join(f"{w:.{digits}f} {names[c]}" for c, w in zip(self.concepts,
                                                                         self.weights))

    def as_dict(self, names: list[str]) -> dict:
        return {"terms": [{"concept": names[c], "index": c, "weight": w, "coef": k}
                          for c, w, k in zip(self.concepts, self.weights, self.coef)],
                "intercept": self.intercept, "text": self.text(names)}


def predict(expl: LinearExplanation, P: torch.Tensor) -> torch.Tensor:
    """(N,) the explanation's prediction of the activation from concept scores P (N, M)."""
    if not expl.concepts:
        return torch.full((P.shape[0],), expl.intercept, dtype=torch.float64)
    return expl.intercept + P[:, expl.concepts].double() @ torch.tensor(expl.coef,
                                                                        dtype=torch.float64)


def _noise_variance(X: np.ndarray, y: np.ndarray) -> float:
    """The noise variance of y (standardised) for BIC: the residual variance of the least-squares
    fit on all of X (LassoLarsIC's own estimate), floored so that a neuron that is exactly a
    combination of concept scores (a planted one) gets a finite criterion instead of log 0."""
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    rss = float(((y - X @ coef) ** 2).sum())
    return max(rss / (len(y) - X.shape[1]), _MIN_NOISE)


def _support(X: np.ndarray, y: np.ndarray, max_terms: int) -> np.ndarray:
    """Columns of X (standardised) picked by the positive LARS-lasso cut at the lowest BIC."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LassoLarsIC
    n, c = X.shape
    if n <= c + 1:   # the noise estimate fits all candidates by least squares: it needs n > c + 1
        X = X[:, :max(1, n - 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LassoLarsIC(criterion="bic", positive=True, fit_intercept=False,
                            max_iter=4 * max_terms,
                            noise_variance=_noise_variance(X, y)).fit(X, y)
    coef = model.coef_
    order = np.argsort(-coef, kind="stable")
    return np.array([i for i in order[:max_terms] if coef[i] > 0], dtype=np.int64)


def fit_linear(P: torch.Tensor, a: torch.Tensor, candidates: list[int], *,
               max_terms: int = MAX_TERMS) -> LinearExplanation:
    """The explanation of one neuron (activations ``a``, (N,)) from concept scores ``P`` (N, M),
    choosing among the concept indices ``candidates`` (see the module docstring)."""
    from scipy.optimize import nnls
    y = a.double().numpy()
    Xall = P[:, candidates].double().numpy()
    mean_y = float(y.mean())
    yc = y - mean_y
    sd_y = float(yc.std())
    if sd_y < _MIN_STD or len(y) < 4:                    # a dead neuron, or too few images
        return LinearExplanation(intercept=mean_y)
    Xc = Xall - Xall.mean(0)
    sd = Xc.std(0)
    alive = np.nonzero(sd > _MIN_STD)[0]
    if not len(alive):
        return LinearExplanation(intercept=mean_y)
    picked = alive[_support(Xc[:, alive] / sd[alive], yc / sd_y, max_terms)]
    if not len(picked):                                  # nothing passed the BIC: the best one,
        best = alive[int(np.argmax(Xc[:, alive].T @ yc / sd[alive]))]   # if it helps at all
        picked = np.array([best]) if Xc[:, best] @ yc > 0 else picked
    if not len(picked):
        return LinearExplanation(intercept=mean_y)
    w, _ = nnls(Xc[:, picked], yc)
    keep = w > 0
    picked, w = picked[keep], w[keep]
    beta = w * sd[picked] / sd_y
    order = np.argsort(-beta, kind="stable")
    concepts = [int(candidates[i]) for i in picked[order]]
    intercept = mean_y - float(Xall[:, picked].mean(0) @ w)
    return LinearExplanation(concepts, [float(b) for b in beta[order]],
                             [float(x) for x in w[order]], intercept)


def _candidates(P: torch.Tensor, A: torch.Tensor, count: int,
                max_terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, count + max_terms) candidate concepts per neuron: its first ``max_terms`` forward
    labels, then its ``count`` concepts of highest correlation (repeats possible); and the
    (K, count) top-correlation part alone, best first."""
    corr = pearson_matrix(A, P, torch.float32)                     # (K, M)
    top = corr.topk(min(count, P.shape[1]), dim=1).indices
    return torch.cat([forward_labels(P, A, max_terms), top], dim=1), top


def _standardised(x: np.ndarray) -> np.ndarray:
    """Columns centred and divided by their standard deviation (a constant column -> 0)."""
    x = x - x.mean(0)
    sd = x.std(0)
    return x / np.where(sd > _MIN_STD, sd, np.inf)


def path_labels(P: torch.Tensor, A: torch.Tensor, n: int, *,
                candidates: int = CANDIDATES) -> torch.Tensor:
    """(K, n) labels per neuron in the order the concepts enter the non-negative lasso path
    (LARS, ``sklearn.linear_model.lars_path(method="lasso", positive=True)``) of the neuron's
    standardised activations on the standardised scores of its candidates (as for the linear
    explanations). The first to enter is the concept of highest correlation (the
    ``correlation`` label); the lasso's shrinkage keeps the first concept's share in the residual,
    so concepts like it enter next (church: monastery, bell cote, palace), while a second concept
    the neuron also fires for enters as soon as it explains as much: both are among the first
    labels. Neurons whose path ends early are filled up with their next concepts by correlation.
    """
    from sklearn.linear_model import lars_path
    cand, top = _candidates(P, A, candidates, n)
    out = torch.empty(A.shape[1], n, dtype=torch.long)
    for k in range(A.shape[1]):
        chosen = list(dict.fromkeys(cand[k].tolist()))
        X = _standardised(P[:, chosen].double().numpy())
        y = _standardised(A[:, k:k + 1].double().numpy())[:, 0]
        order = [int(top[k, 0])]                                   # the correlation label
        if y.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # lars_path warns on collinear candidates
                _, active, _ = lars_path(X, y, method="lasso", positive=True,
                                         max_iter=3 * n)
            order += [chosen[i] for i in active]
        order += top[k].tolist()
        labels = list(dict.fromkeys(order))[:n]
        out[k, :len(labels)] = torch.tensor(labels)
        out[k, len(labels):] = labels[-1]                          # fewer concepts than n
    return out


def iter_explanations(P: torch.Tensor, A: torch.Tensor, units: list[int], *,
                      max_terms: int = MAX_TERMS, candidates: int = CANDIDATES,
                      progress: bool = False):
    """The explanation of each neuron of ``units`` (columns of A, fitted on all rows of P and
    A), one at a time: a caller interrupted half-way keeps those it has."""
    if max_terms < 1:
        raise ValueError(f"a linear explanation needs at least 1 term, got max_terms={max_terms}")
    cand, _ = _candidates(P, A[:, units], candidates, max_terms)
    for row, unit in enumerate(tqdm(units, desc="linear explanations", disable=not progress,
                                    leave=False)):
        chosen = list(dict.fromkeys(cand[row].tolist()))        # forward picks first, no repeats
        yield fit_linear(P, A[:, unit], chosen, max_terms=max_terms)


def explain_units(P: torch.Tensor, A: torch.Tensor, units: list[int], *,
                  max_terms: int = MAX_TERMS, candidates: int = CANDIDATES,
                  progress: bool = False) -> list[LinearExplanation]:
    """An explanation for each neuron of ``units`` (see ``iter_explanations``)."""
    return list(iter_explanations(P, A, units, max_terms=max_terms, candidates=candidates,
                                  progress=progress))
