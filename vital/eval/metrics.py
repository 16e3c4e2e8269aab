"""Evaluation metrics for feature visualisations (FVs): pure functions on tensors.

The metrics are those of the VITAL paper (Görgün, Schiele, Fischer, arXiv 2503.22399, sec. 4.2
and appendix B.1):

- accuracy: top-k of a classifier on each FV, for the class the FV shows (``topk_hits``);
- another model's opinion: the same with a second classifier, or CLIP zero-shot over the
  ImageNet classes with the 80 prompt templates (``zeroshot_classifier``, ``zeroshot_logits``);
- FID between the FVs and real images of the same classes on a model's features (``fid``);
- for neurons: AUC and MAD of the neuron's activations on the FVs against its activations on
  real images (``auc``, ``mad``, ``auc_mad``, ``channel_scores``).

Nothing here loads a model or a file; ``vital.eval.harness`` feeds these functions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["topk_hits", "class_probability", "zeroshot_classifier", "zeroshot_logits",
           "covariance", "shrink_covariance", "frechet_distance", "fid", "fid_rank",
           "auc", "mad", "auc_mad", "channel_scores", "mean_spread", "sharpness",
           "colourfulness"]

CLIP_LOGIT_SCALE = 100.0   # CLIP's trained temperature exp(4.6052); only ranks matter here


# ---------------------------------------------------------------- accuracy

def _as_index(index, batch: int, device) -> torch.Tensor:
    index = torch.as_tensor(index, device=device).long().reshape(-1)
    if index.numel() == 1:
        index = index.expand(batch)
    if index.numel() != batch:
        raise ValueError(f"{index.numel()} class indices for {batch} images")
    return index


def topk_hits(logits: torch.Tensor, index, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """For each k, a (B,) float tensor: 1 where class ``index`` is among the k largest logits.

    ``logits`` (B, K); ``index`` one class for every image or one per image. A tie with the
    k-th logit counts as a hit only if the class is ranked within k by ``torch.topk``.
    Top-k accuracy of a set of FVs is the mean of these hits (paper sec. 4.2, "accuracy").
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, K), got {tuple(logits.shape)}")
    index = _as_index(index, logits.shape[0], logits.device)
    if ((index < 0) | (index >= logits.shape[1])).any():
        raise ValueError(f"class index {index.tolist()} outside the {logits.shape[1]} logits")
    out = {}
    for k in ks:
        top = logits.topk(min(int(k), logits.shape[1]), dim=1).indices   # (B, k)
        out[int(k)] = (top == index[:, None]).any(1).float()
    return out


def class_probability(logits: torch.Tensor, index) -> torch.Tensor:
    """(B,) softmax probability of class ``index`` (one for all images or one per image)."""
    index = _as_index(index, logits.shape[0], logits.device)
    return logits.float().softmax(-1).gather(1, index[:, None]).squeeze(1)


def zeroshot_classifier(text_emb: torch.Tensor) -> torch.Tensor:
    """CLIP zero-shot weights (C, E) from template embeddings (C, T, E).

    Radford et al. 2021 (CLIP, prompt ensembling): each class's T prompt embeddings (e.g. the 80
    ImageNet templates) are normalised, averaged and normalised again.
    """
    if text_emb.dim() != 3:
        raise ValueError(f"text_emb must be (classes, templates, dim), got {tuple(text_emb.shape)}")
    return F.normalize(F.normalize(text_emb.float(), dim=-1).mean(1), dim=-1)


def zeroshot_logits(image_emb: torch.Tensor, classifier: torch.Tensor,
                    scale: float = CLIP_LOGIT_SCALE) -> torch.Tensor:
    """(B, C) ``scale`` x cosine between image embeddings (B, E) and class weights (C, E)."""
    return scale * F.normalize(image_emb.float(), dim=-1) @ classifier.float().t()


# ---------------------------------------------------------------- FID

def covariance(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of samples (N, D), in float64; N >= 2."""
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"need samples (N >= 2, D), got {tuple(feats.shape)}")
    x = feats.detach().double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.t() @ centred / (x.shape[0] - 1)


def shrink_covariance(cov: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * cov + alpha * (tr(cov) / D) * I: shrinkage toward a scaled identity.

    Keeps the trace (total variance) and makes a rank-deficient covariance (fewer samples than
    feature dimensions) full rank for ``alpha`` > 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {alpha}")
    dim = cov.shape[0]
    target = torch.eye(dim, dtype=cov.dtype, device=cov.device) * (cov.trace() / dim)
    return (1.0 - alpha) * cov + alpha * target


def _psd_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    vals, vecs = torch.linalg.eigh((mat + mat.t()) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.t()


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between the Gaussians N(mu1, cov1) and N(mu2, cov2):

        ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))

    (Dowson & Landau 1982; FID, Heusel et al. 2017). ``cov1 cov2`` is similar to
    ``s cov2 s`` with ``s = cov1^(1/2)``, which is symmetric PSD, so the trace of its root is
    the sum of the square roots of its eigenvalues (no complex parts to discard).
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t).double() for t in (mu1, mu2, cov1, cov2))
    root = _psd_sqrt(cov1)
    middle = root @ cov2 @ root
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.t()) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt
    return float(value.clamp_min(0))


def _fid_low_rank(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact FID from samples without forming D x D matrices.

    With centred samples X1 (n1, D), X2 (n2, D) and cov_i = X_i^T X_i / (n_i - 1), the non-zero
    eigenvalues of cov1 cov2 are those of A A^T / ((n1-1)(n2-1)) with A = X1 X2^T (n1, n2), so
    tr((cov1 cov2)^(1/2)) = ||A||_* / sqrt((n1-1)(n2-1)) (nuclear norm = sum of singular values).
    """
    x1, x2 = a.detach().double(), b.detach().double()
    mu1, mu2 = x1.mean(0), x2.mean(0)
    c1, c2 = x1 - mu1, x2 - mu2
    d1, d2 = x1.shape[0] - 1, x2.shape[0] - 1
    tr_sqrt = torch.linalg.svdvals(c1 @ c2.t()).sum() / math.sqrt(d1 * d2)
    value = (mu1 - mu2).pow(2).sum() + c1.pow(2).sum() / d1 + c2.pow(2).sum() / d2 - 2 * tr_sqrt
    return float(value.clamp_min(0))


def fid(feats_a: torch.Tensor, feats_b: torch.Tensor, shrinkage: float = 0.0) -> float:
    """Fréchet Inception Distance between two sets of features (N_a, D) and (N_b, D).

    Each set is fitted by a Gaussian (mean, unbiased covariance) and ``frechet_distance`` is
    returned; FID of a set with itself is 0. With fewer samples than dimensions the covariances
    are rank-deficient (see ``fid_rank``): the value is exact for those Gaussians but biased
    upward against a large-sample FID, so compare only values computed with the same numbers of
    samples. ``shrinkage`` > 0 regularises both covariances with ``shrink_covariance``.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"FID needs (N, D) features with the same D, got "
                         f"{tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if min(feats_a.shape[0], feats_b.shape[0]) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {feats_a.shape[0]} and "
                         f"{feats_b.shape[0]}")
    if shrinkage == 0.0:
        return _fid_low_rank(feats_a, feats_b)
    (mu1, cov1), (mu2, cov2) = covariance(feats_a), covariance(feats_b)
    return frechet_distance(mu1, shrink_covariance(cov1, shrinkage),
                            mu2, shrink_covariance(cov2, shrinkage))


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """KID's kernel (Binkowski et al. 2018): k(x, y) = (x . y / D + 1) ^ degree, (N_a, N_b)."""
    return (a @ b.t() / a.shape[1] + 1.0) ** degree


def kid(feats_a: torch.Tensor, feats_b: torch.Tensor, degree: int = 3) -> float:
    """Kernel Inception Distance: the unbiased estimate of the squared MMD between two sets of
    features (N_a, D) and (N_b, D) with ``polynomial_kernel``, using every pair (no subsets).
    Unlike FID it has no bias from the sample size, so it is the right statistic for tens of
    images; it can be slightly negative when the sets are alike."""
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"KID needs (N, D) features with the same D, got "
                         f"{tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    m, n = feats_a.shape[0], feats_b.shape[0]
    if min(m, n) < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {m} and {n}")
    a, b = feats_a.double(), feats_b.double()
    k_aa, k_bb = polynomial_kernel(a, a, degree), polynomial_kernel(b, b, degree)
    k_ab = polynomial_kernel(a, b, degree)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def centroid_top1(feats: torch.Tensor, labels, centroids: torch.Tensor) -> float:
    """Nearest-class-centroid accuracy: the share of rows of ``feats`` (N, D) whose nearest
    (Euclidean) row of ``centroids`` (K, D) is their label (N,)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    nearest = torch.cdist(feats.double(), centroids.double()).argmin(1)
    return float((nearest == labels).double().mean())


def fid_rank(n_a: int, n_b: int, dim: int) -> dict:
    """How much of the feature space the two covariances can span: ranks are at most N - 1."""
    rank = min(n_a - 1, dim), min(n_b - 1, dim)
    return {"rank_a": rank[0], "rank_b": rank[1], "dim": dim,
            "rank_deficient": min(rank) < dim}


# ---------------------------------------------------------------- neurons: AUC and MAD

def _flat(scores) -> torch.Tensor:
    t = torch.as_tensor(scores).detach().double().reshape(-1)
    if t.numel() == 0:
        raise ValueError("AUC / MAD need at least one score per set")
    return t


def auc(positive, negative) -> float:
    """Area under the ROC curve when ``positive`` scores should exceed ``negative`` ones.

    Equals P(p > n) + 0.5 P(p == n) over all pairs (Mann-Whitney U / (n_p n_n)); 1 when the
    sets are perfectly separated, 0.5 when they are indistinguishable. Used as in CoSy (Kopf et
    al. 2024), whose AUC and MAD the VITAL paper adopts for inner neurons: the neuron's
    activations are the scores, the FVs are the positive class and the real images the negative.
    """
    p, n = _flat(positive), _flat(negative)
    greater = (p[:, None] > n[None, :]).double().mean()     # (P, N) pairwise comparisons
    ties = (p[:, None] == n[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def mad(positive, negative) -> float:
    """Mean activation difference: (mean(positive) - mean(negative)) / std(negative).

    CoSy's MAD (Kopf et al. 2024), adopted by VITAL: how many standard deviations of the real
    images' activations the FVs' mean activation lies above theirs. ``std`` is the unbiased
    sample standard deviation; a constant negative set (std 0) gives +-inf or 0.
    """
    p, n = _flat(positive), _flat(negative)
    if n.numel() < 2:
        raise ValueError("MAD needs at least 2 negative (real-image) scores for a spread")
    diff, spread = float(p.mean() - n.mean()), float(n.std())
    if spread == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / spread


def auc_mad(fv_acts, real_acts) -> dict[str, float]:
    """AUC and MAD of a neuron's activations on FVs (any shape, one value per image) against
    its activations on real images, e.g. its top-activating natural images. See ``auc``/``mad``.
    """
    return {"auc": auc(fv_acts, real_acts), "mad": mad(fv_acts, real_acts)}


def channel_scores(feats: torch.Tensor, channel: int) -> torch.Tensor:
    """One activation per image for a channel: the mean over positions of ``feats`` (B, C, P)
    (``vital.models.channels_positions`` layout), as CoSy averages a conv channel spatially."""
    if feats.dim() != 3 or not 0 <= channel < feats.shape[1]:
        raise ValueError(f"feats must be (B, C, P) with channel < C, got {tuple(feats.shape)} "
                         f"and channel {channel}")
    return feats[:, channel].float().mean(-1)


# ---------------------------------------------------------------- summaries

def mean_spread(values) -> tuple[float, float]:
    """Mean and unbiased standard deviation (0 for a single value) of finite numbers."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


# ---------------------------------------------------------------- image statistics

_LUMA = (0.299, 0.587, 0.114)   # ITU-R BT.601 weights: grey level of an RGB pixel


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """(B,) mean gradient magnitude per pixel of each image's grey level, in grey levels of
    [0, 1] per px: sqrt(dx^2 + dy^2) of forward differences, averaged over the pixels where
    both exist. Blur lowers it; it depends on the px scale, so compare images at the scale
    the model sees their content (references at their native resolution, not upscaled)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    grey = (images * w).sum(1)                                    # (B, H, W)
    dx = grey[:, :-1, 1:] - grey[:, :-1, :-1]
    dy = grey[:, 1:, :-1] - grey[:, :-1, :-1]
    return (dx.pow(2) + dy.pow(2)).sqrt().flatten(1).mean(1)


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """(B,) colourfulness of Hasler & Süsstrunk (2003) on [0, 1] RGB images scaled to 0..255:
    sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2) with rg = R - G and
    yb = (R + G) / 2 - B. 0 for a grey image; ~15 "slightly", ~33 "moderately", ~59 "quite",
    ~82 "highly colourful" (the paper's scale)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    r, g, b = (images.double() * 255.0).unbind(1)                 # (B, H, W) each
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    spread = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
    centre = (rg.mean(1).pow(2) + yb.mean(1).pow(2)).sqrt()
    return (spread + 0.3 * centre).to(images.dtype)
