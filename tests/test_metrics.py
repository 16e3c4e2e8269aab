"""vital.eval.metrics on hand-made inputs with known answers, and against slow references
(plain loops, scipy's matrix square root, scikit-learn's ROC AUC)."""
import math

import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.metrics import roc_auc_score

from vital.eval import metrics


# ---------------------------------------------------------------- accuracy

def _slow_topk(logits, index, k):
    hits = []
    for row, cls in zip(logits.tolist(), index):
        ranked = sorted(range(len(row)), key=lambda j: -row[j])
        hits.append(float(cls in ranked[:k]))
    return hits


def test_topk_hits_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.0, 0.2, 0.05],
                           [2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    hits = metrics.topk_hits(logits, [1, 5])
    assert hits[1].tolist() == [1.0, 0.0]          # class 1 is first in row 0
    assert hits[5].tolist() == [1.0, 0.0]          # class 5 is last (6th) in row 1
    assert metrics.topk_hits(logits, 2)[5].tolist() == [1.0, 1.0]


def test_topk_hits_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 12, generator=gen)
    index = torch.randint(0, 12, (20,), generator=gen)
    for k in (1, 3, 5):
        got = metrics.topk_hits(logits, index, ks=(k,))[k].tolist()
        assert got == _slow_topk(logits, index.tolist(), k)


def test_topk_rejects_bad_index():
    with pytest.raises(ValueError, match="outside"):
        metrics.topk_hits(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="class indices"):
        metrics.topk_hits(torch.zeros(2, 3), [0, 1, 2])


def test_class_probability_is_softmax():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])
    assert metrics.class_probability(logits, 1).tolist() == pytest.approx([0.75, 0.2])


def test_zeroshot_classifier_averages_normalised_templates():
    # class 0: templates along x (lengths 1 and 3); class 1: along y and x+y
    text = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [1.0, 1.0]]])
    weights = metrics.zeroshot_classifier(text)
    mean1 = torch.tensor([0.5 * 2 ** -0.5, 0.5 + 0.5 * 2 ** -0.5])
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weights[1], mean1 / mean1.norm())
    logits = metrics.zeroshot_logits(torch.tensor([[5.0, 0.1], [0.0, 1.0]]), weights, scale=1.0)
    assert logits.argmax(1).tolist() == [0, 1]
    assert logits[1, 1].item() == pytest.approx(float(weights[1, 1]))   # cosine with unit y


# ---------------------------------------------------------------- FID

def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """FID written out with scipy's general matrix square root (as pytorch-fid does)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


@pytest.mark.parametrize("n_a, n_b, dim", [(40, 50, 5), (6, 9, 16)])
def test_fid_matches_scipy(n_a, n_b, dim):
    gen = torch.Generator().manual_seed(n_a)
    a = torch.randn(n_a, dim, generator=gen, dtype=torch.float64)
    b = 1.5 * torch.randn(n_b, dim, generator=gen, dtype=torch.float64) + 0.3
    want = _fid_reference(a.numpy(), b.numpy())
    assert metrics.fid(a, b) == pytest.approx(want, rel=1e-6, abs=1e-6)
    (mu1, c1), (mu2, c2) = metrics.covariance(a), metrics.covariance(b)
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_fid_of_a_set_with_itself_is_zero():
    feats = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    assert metrics.fid(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert metrics.fid(feats, feats, shrinkage=0.3) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_a_shifted_set_is_the_squared_shift():
    feats = torch.randn(30, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert metrics.fid(feats, feats + shift) == pytest.approx(5.25, rel=1e-9)


def test_fid_in_one_dimension_is_mean_and_std_gap():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    a = torch.tensor([[0.0], [2.0]])          # mean 1, unbiased std sqrt(2)
    b = torch.tensor([[3.0], [5.0], [7.0]])   # mean 5, unbiased std 2
    want = 16.0 + (2 ** 0.5 - 2.0) ** 2
    assert metrics.fid(a, b) == pytest.approx(want, rel=1e-9)
    assert metrics.fid(a, b, shrinkage=0.5) == pytest.approx(want, rel=1e-9)  # 1-D: no effect


def test_fid_rejects_too_few_samples_and_mismatched_features():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.fid(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="same D"):
        metrics.fid(torch.zeros(3, 3), torch.zeros(4, 2))


def test_shrinkage_keeps_the_trace_and_ends_at_a_scaled_identity():
    cov = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    half = metrics.shrink_covariance(cov, 0.5)
    assert half.trace().item() == pytest.approx(6.0)
    torch.testing.assert_close(metrics.shrink_covariance(cov, 1.0),
                               3.0 * torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.shrink_covariance(cov, 1.5)


def test_fid_rank_reports_rank_deficiency():
    assert metrics.fid_rank(4, 48, 1280) == {"rank_a": 3, "rank_b": 47, "dim": 1280,
                                             "rank_deficient": True}
    assert not metrics.fid_rank(100, 200, 16)["rank_deficient"]


# ---------------------------------------------------------------- AUC and MAD

def test_auc_of_separable_scores_is_one_and_reversed_zero():
    assert metrics.auc([5.0, 6.0, 7.0], [1.0, 2.0]) == 1.0
    assert metrics.auc([1.0, 2.0], [5.0, 6.0, 7.0]) == 0.0
    assert metrics.auc([3.0, 3.0], [3.0, 3.0]) == 0.5


def test_auc_matches_sklearn_with_ties():
    gen = np.random.default_rng(0)
    pos, neg = gen.integers(0, 6, 15).astype(float), gen.integers(0, 5, 23).astype(float)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    want = roc_auc_score(labels, np.r_[pos, neg])
    assert metrics.auc(torch.tensor(pos), torch.tensor(neg)) == pytest.approx(want)


def test_mad_by_hand():
    # real: mean 2, unbiased std 1; FVs: mean 5 -> 3 standard deviations above
    assert metrics.mad([4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(3.0)
    assert metrics.mad([2.0], [1.0, 2.0, 3.0]) == 0.0
    assert metrics.mad([3.0], [2.0, 2.0]) == math.inf
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mad([1.0], [1.0])


def test_auc_mad_on_neuron_activations():
    fv = torch.tensor([[[4.0, 6.0]], [[8.0, 8.0]]])        # (B, C, P): means 5 and 8
    real = torch.tensor([[[1.0, 1.0]], [[3.0, 1.0]], [[2.0, 4.0]]])   # means 1, 2, 3
    fv_acts, real_acts = metrics.channel_scores(fv, 0), metrics.channel_scores(real, 0)
    assert fv_acts.tolist() == [5.0, 8.0]
    assert metrics.auc_mad(fv_acts, real_acts) == {"auc": 1.0, "mad": pytest.approx(4.5)}
    with pytest.raises(ValueError, match="channel"):
        metrics.channel_scores(fv, 1)


def test_mean_spread():
    assert metrics.mean_spread([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert metrics.mean_spread([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in metrics.mean_spread([]))


# ---------------------------------------------------------------- image statistics

def _slow_sharpness(image):
    """Mean over pixels (all but the last row and column) of the grey-level gradient length,
    with plain loops."""
    r, g, b = image.double().tolist()
    h, w = len(r), len(r[0])
    grey = [[0.299 * r[y][x] + 0.587 * g[y][x] + 0.114 * b[y][x] for x in range(w)]
            for y in range(h)]
    total = 0.0
    for y in range(h - 1):
        for x in range(w - 1):
            dx, dy = grey[y][x + 1] - grey[y][x], grey[y + 1][x] - grey[y][x]
            total += math.hypot(dx, dy)
    return total / ((h - 1) * (w - 1))


def _slow_colourfulness(image):
    """Hasler & Süsstrunk's M = sigma_rgyb + 0.3 mu_rgyb on 0..255 values, with loops."""
    r, g, b = (255 * image.double()).reshape(3, -1).tolist()
    rg = [x - y for x, y in zip(r, g)]
    yb = [0.5 * (x + y) - z for x, y, z in zip(r, g, b)]

    def mean(v):
        return sum(v) / len(v)

    def var(v):
        m = mean(v)
        return sum((x - m) ** 2 for x in v) / len(v)
    return math.sqrt(var(rg) + var(yb)) + 0.3 * math.sqrt(mean(rg) ** 2 + mean(yb) ** 2)


def test_sharpness_and_colourfulness_equal_slow_loops():
    images = torch.rand(3, 3, 9, 7, generator=torch.Generator().manual_seed(2))
    for k in range(3):
        assert abs(float(metrics.sharpness(images)[k]) - _slow_sharpness(images[k])) < 1e-5
        assert abs(float(metrics.colourfulness(images)[k])
                   - _slow_colourfulness(images[k])) < 1e-3


def test_blur_lowers_sharpness_and_grey_has_no_colour():
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    blurred = torch.nn.functional.avg_pool2d(image, 3, 1, 1)
    assert metrics.sharpness(blurred) < 0.5 * metrics.sharpness(image)
    assert float(metrics.colourfulness(image.mean(1, keepdim=True).expand(-1, 3, -1, -1))) < 1e-6
    upscaled = torch.nn.functional.interpolate(image[..., :8, :8], size=32, mode="bilinear")
    assert metrics.sharpness(upscaled) < 0.5 * metrics.sharpness(image)   # a 4x zoom blurs
