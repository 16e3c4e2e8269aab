"""Neuron-concept similarity functions: CLIP-Dissect's (Oikarinen & Weng, 2022; ``similarity.py``
of Trustworthy-ML-Lab/CLIP-dissect), rewritten for the toolkit, and the Pearson correlation
(NeuronEval's metric that passes its sanity checks, used here to choose labels).

Every function takes

    P  (N, M)  the image-concept matrix of the probe set (N images, M concepts)
    A  (N, K)  the activation summary of K neurons on the same images

and returns ``(K, M)``: the similarity of every neuron to every concept; a neuron's label is the
argmax of its row. P is whatever the concept model path gives (CLIP: cosine of image and text
embeddings; a classifier: its logits, log-probabilities or probabilities, ``--concept_scores``);
the WPMI functions turn it into probabilities with ``softmax(a * P)`` over concepts whatever it
is, as the reference code does (on a classifier's logits with a = 1 that is its own softmax).

Sizes that depend on the probe set are fractions of it: CLIP-Dissect's top_k (100 for soft-WPMI,
28 for WPMI) were set for its 50,000 ImageNet validation images, so unless ``top_k`` is given,
a neuron's top images are ``top_k_for(N, top_fraction)`` = ceil(top_fraction N) with
top_fraction = 100 / 50,000 (soft-WPMI) and 28 / 50,000 (WPMI): the paper's values at 50k
images, 1 to 3 images on a probe set of 1000 (``bench/labels.py`` measured that this is what
generalises on small probe sets; docs/labels.md).

``forward_labels`` orders a neuron's labels by forward selection on the correlation: the first is
the concept that correlates best, each next one the concept that correlates best with what the
labels before it leave unexplained, so a neuron that fires for two concepts gets both among its
first labels instead of the first concept and its near-synonyms.

Work is done in chunks of neurons (and concepts for ``rank_reorder``) so that memory stays at a
few tens of MB for 20k concepts x 1000 neurons x 1000 images.
"""
from __future__ import annotations

import math

import torch

from vital.labels.metrics import pearson_matrix

__all__ = ["SIMILARITIES", "DEFAULTS", "similarity", "correlation", "cos_similarity",
           "cos_similarity_cubed", "wpmi", "soft_wpmi", "rank_reorder", "top_k_for",
           "forward_labels", "PAPER_PROBE_IMAGES"]

_CHUNK_ELEMENTS = 1 << 22   # float64 elements of one (neurons x images x concepts) block (32 MB)
_BASELINE_PERMUTATIONS = 5  # random orders averaged for rank_reorder's baseline error
_MIN_AVG_P = 1e-6           # floor of rank_reorder's mean concept score (see rank_reorder)
_EPS_NORM = 1e-12           # cos_similarity: a dead (all-zero) column stays zero, not NaN
PAPER_PROBE_IMAGES = 50_000  # CLIP-Dissect's probe set (ImageNet val), where its top_k were set


def top_k_for(n_images: int, top_fraction: float) -> int:
    """A neuron's number of top images on a probe set of ``n_images``: ceil(fraction N), >= 1."""
    return max(1, min(n_images, math.ceil(top_fraction * n_images - 1e-9)))


def _check(P: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if P.dim() != 2 or A.dim() != 2 or P.shape[0] != A.shape[0]:
        raise ValueError(f"similarity needs P (images x concepts) and A (images x neurons) with "
                         f"the same images; got {tuple(P.shape)} and {tuple(A.shape)}")
    return P.double(), A.double()   # float64: the log-sums over 100 images stay exact enough


def correlation(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each neuron's column with each concept's column over the images
    (``vital.labels.metrics.pearson_matrix``): the label is the concept whose scores rise and
    fall with the neuron's activation over the whole probe set, not only its top images. A
    constant column (a dead neuron, a concept no image shows) gets 0. Computed in float32, as
    P is kept (N x 20k concepts)."""
    _check(P, A)
    return pearson_matrix(A, P, torch.float32)


def cos_similarity(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Cosine between each neuron's and each concept's column over the images: ``A^T P`` with
    both columns L2-normalised. A dead neuron (all zeros) gets 0 for every concept (the
    reference code divides by zero there)."""
    P, A = _check(P, A)
    P = P / P.norm(dim=0, keepdim=True).clamp_min(_EPS_NORM)
    A = A / A.norm(dim=0, keepdim=True).clamp_min(_EPS_NORM)
    return (A.t() @ P).float()


def cos_similarity_cubed(P: torch.Tensor, A: torch.Tensor, min_norm: float = 1e-3) -> torch.Tensor:
    """Cosine of the centred, cubed columns (the cube stresses the images far from the mean):
    each column minus its mean over images, cubed, divided by max(L2 norm, ``min_norm``)."""
    P, A = _check(P, A)

    def prep(x):
        x = (x - x.mean(dim=0, keepdim=True)) ** 3
        return x / x.norm(dim=0, keepdim=True).clamp_min(min_norm)
    return (prep(A).t() @ prep(P)).float()


def _top_images(A: torch.Tensor, top_k: int) -> torch.Tensor:
    """(K, top_k) indices of each neuron's most activating images, highest first."""
    return A.topk(min(top_k, A.shape[0]), dim=0).indices.t()   # (top_k, K) -> (K, top_k)


def _neuron_chunks(K: int, per_neuron: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_neuron))
    for start in range(0, K, step):
        yield slice(start, min(K, start + step))


def _concept_probs(P: torch.Tensor, a: float) -> torch.Tensor:
    """softmax(a P) over concepts, kept in float32 (N x 20k concepts is 88 MB, not 176 MB);
    the gathered blocks are summed in float64."""
    return torch.softmax(a * P.float(), dim=1)


def _pmi(log_p_given_neuron: torch.Tensor, lam: float) -> torch.Tensor:
    """log p(m|k) - lam * log p(m), where p(m) is the mean of p(m|k) over the K neurons
    (logsumexp over neurons minus log K, so products of 100 probabilities do not underflow)."""
    K = log_p_given_neuron.shape[0]
    log_p = torch.logsumexp(log_p_given_neuron, dim=0, keepdim=True) - math.log(K)
    return (log_p_given_neuron - lam * log_p).float()


def wpmi(P: torch.Tensor, A: torch.Tensor, top_k: int | None = None,
         top_fraction: float = 28 / PAPER_PROBE_IMAGES, a: float = 2.0, lam: float = 0.6,
         min_prob: float = 1e-7) -> torch.Tensor:
    """Weighted pointwise mutual information: log p(m|k) = sum over neuron k's ``top_k`` images
    (None: ceil(top_fraction N)) of log(softmax(a P)[i, m] + min_prob); minus ``lam`` log p(m)."""
    _check(P, A)
    probs = _concept_probs(P, a)                               # (N, M) over concepts
    top = _top_images(A.double(), top_k or top_k_for(A.shape[0], top_fraction))   # (K, t)
    out = torch.empty(A.shape[1], P.shape[1], dtype=torch.float64)
    for part in _neuron_chunks(A.shape[1], top.shape[1] * P.shape[1]):
        picked = probs[top[part]].double()                     # (k, t, M)
        out[part] = torch.log(picked + min_prob).sum(1)
    return _pmi(out, lam)


def soft_wpmi(P: torch.Tensor, A: torch.Tensor, top_k: int | None = None,
              top_fraction: float = 100 / PAPER_PROBE_IMAGES, a: float = 10.0, lam: float = 1.0,
              min_prob: float = 1e-7, p_start: float = 0.998, p_end: float = 0.97) -> torch.Tensor:
    """Soft WPMI (CLIP-Dissect's default): image i of rank r among neuron k's ``top_k`` images
    (None: ceil(top_fraction N)) belongs to the neuron's concept with probability
    p_r = p_start - r (p_start - p_end) / top_k, so
    log p(m|k) = sum_r log(p_r softmax(a P)[i_r, m] + 1 - p_r + min_prob); minus ``lam``
    log p(m). ``top_k`` is capped at the number of images (and the ramp then runs over those)."""
    _check(P, A)
    probs = _concept_probs(P, a)                               # (N, M) over concepts
    top = _top_images(A.double(), top_k or top_k_for(A.shape[0], top_fraction))   # (K, t)
    t = top.shape[1]
    ranks = torch.arange(t, dtype=torch.float64)
    p_in = (p_start - ranks / t * (p_start - p_end)).view(1, t, 1)   # (1, t, 1)
    out = torch.empty(A.shape[1], P.shape[1], dtype=torch.float64)
    for part in _neuron_chunks(A.shape[1], t * P.shape[1]):
        picked = probs[top[part]].double()                     # (k, t, M)
        out[part] = torch.log(p_in * picked + (1 - p_in) + min_prob).sum(1)
    return _pmi(out, lam)


def _baseline_error(ascending: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mean |s - s permuted|^p over random permutations: the error of a random ordering."""
    perms = [ascending[torch.randperm(len(ascending), generator=generator)]
             for _ in range(_BASELINE_PERMUTATIONS)]
    return ((ascending[:, None] - torch.stack(perms, 1)).abs() ** p).mean()


def rank_reorder(P: torch.Tensor, A: torch.Tensor, p: float = 3.0, top_fraction: float = 0.05,
                 scale_p: float = 0.5, seed: int = 0, chunk: int = 1500) -> torch.Tensor:
    """Rank reorder: neuron k's top n = max(1, int(top_fraction N)) images with activations t
    (descending) are re-ordered by each concept's P; the activation sequence that ordering
    implies (the sorted activations s given out by P rank) is compared with t:
    err = mean |t - reorg|^p / (the same error of random orders), divided by
    (mean P over the n images)^scale_p; the similarity is -err. Raw P, no softmax."""
    _check(P, A)
    A = A.double()
    n = max(1, int(top_fraction * A.shape[0]))
    values, index = A.topk(n, dim=0)                           # (n, K), descending
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(A.shape[1], P.shape[1], dtype=torch.float64)
    for k in range(A.shape[1]):
        t = values[:, k]                                       # (n,) descending
        s = t.flip(0)                                          # ascending
        # all top activations equal: every order is as good as any; avoid 0 / 0
        baseline = _baseline_error(s, p, generator).clamp_min(1e-12)
        Pk = P[index[:, k]].t().double().contiguous()          # (n, M) -> (M, n): rows sort fast
        # the mean concept score can be tiny or negative (CLIP cosines); the reference code
        # would give NaN or huge values there: a floor of 1e-6 makes such concepts rank last
        avg = Pk.mean(1).clamp_min(_MIN_AVG_P) ** scale_p      # (M,)
        for start in range(0, P.shape[1], chunk):
            block = Pk[start:start + chunk]                    # (c, n)
            rank = block.argsort(dim=1, stable=True).argsort(dim=1)   # image ranks, ascending P
            reorg = s[rank]                                    # (c, n)
            err = ((t[None] - reorg).abs() ** p).mean(1) / baseline
            out[k, start:start + chunk] = -err / avg[start:start + chunk]
    return out.float()


def forward_labels(P: torch.Tensor, A: torch.Tensor, n: int) -> torch.Tensor:
    """(K, n) concept indices per neuron by forward selection on the correlation: the first is
    the argmax of ``correlation``; each next one is the concept whose (centred, unit) column has
    the largest inner product with the residual of the neuron's (centred, unit) column after
    removing its projection on the labels picked so far (Gram-Schmidt on the picked columns).
    A neuron that fires for two concepts gets the second one next, not near-synonyms of the
    first. Neurons are done in chunks; P is kept in float32."""
    _check(P, A)
    X = P.float() - P.float().mean(0, keepdim=True)
    X = X / X.norm(dim=0, keepdim=True).clamp_min(_EPS_NORM)            # (N, M) unit columns
    n = min(n, X.shape[1])
    out = torch.empty(A.shape[1], n, dtype=torch.long)
    for part in _neuron_chunks(A.shape[1], X.shape[1]):
        R = A[:, part].float() - A[:, part].float().mean(0, keepdim=True)
        R = R / R.norm(dim=0, keepdim=True).clamp_min(_EPS_NORM)        # (N, k) residuals
        cols = torch.arange(R.shape[1])
        basis = []                                                     # orthonormal (N, k) each
        for j in range(n):
            score = X.t() @ R                                          # (M, k)
            if j:
                score[out[part, :j].t(), cols[None, :]] = -math.inf    # no concept twice
            pick = score.argmax(0)                                     # (k,)
            out[part, j] = pick
            v = X[:, pick]                                             # (N, k) picked columns
            for q in basis:
                v = v - q * (q * v).sum(0, keepdim=True)
            v = v / v.norm(dim=0, keepdim=True).clamp_min(_EPS_NORM)
            R = R - v * (v * R).sum(0, keepdim=True)
            basis.append(v)
    return out


SIMILARITIES = {"correlation": correlation, "soft_wpmi": soft_wpmi, "wpmi": wpmi,
                "rank_reorder": rank_reorder, "cos_similarity": cos_similarity,
                "cos_similarity_cubed": cos_similarity_cubed}

# each function's constants (CLIP-Dissect's defaults; top_k from the probe set's size): the
# options a caller may override
DEFAULTS = {
    "correlation": {},
    "soft_wpmi": {"top_k": None, "top_fraction": 100 / PAPER_PROBE_IMAGES, "a": 10.0,
                  "lam": 1.0, "min_prob": 1e-7, "p_start": 0.998, "p_end": 0.97},
    "wpmi": {"top_k": None, "top_fraction": 28 / PAPER_PROBE_IMAGES, "a": 2.0, "lam": 0.6,
             "min_prob": 1e-7},
    "rank_reorder": {"p": 3.0, "top_fraction": 0.05, "scale_p": 0.5, "seed": 0},
    "cos_similarity": {},
    "cos_similarity_cubed": {"min_norm": 1e-3},
}


def similarity(name: str, P: torch.Tensor, A: torch.Tensor, **options) -> tuple[torch.Tensor, dict]:
    """(K, M) similarities with function ``name``; ``options`` that are None keep the function's
    default, options the function does not take are ignored. Returns (similarity, constants
    used); an unset top_k is given as the number it came to on these images."""
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; valid: {', '.join(SIMILARITIES)}")
    used = {k: (options[k] if options.get(k) is not None else v)
            for k, v in DEFAULTS[name].items()}
    if "top_k" in used and used["top_k"] is None:
        used["top_k"] = top_k_for(A.shape[0], used["top_fraction"])
    return SIMILARITIES[name](P, A, **used), used
