"""KID against a slow reference, nearest-centroid accuracy, and the harness refusing held-out
photos that are also references."""
import itertools

import pytest
import torch

from vital.eval import metrics


def _kid_loops(a, b):
    """Unbiased MMD^2 with k(x, y) = (x.y/D + 1)^3, written as plain loops over the pairs."""
    def k(x, y):
        return (float(x @ y) / len(x) + 1.0) ** 3
    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_slow_loops():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(9, 5, generator=gen, dtype=torch.float64) + 0.7
    assert metrics.kid(a, b) == pytest.approx(_kid_loops(a, b), rel=1e-10)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(1)
    same = [metrics.kid(torch.randn(20, 8, generator=gen), torch.randn(200, 8, generator=gen))
            for _ in range(30)]
    assert abs(sum(same) / len(same)) < 0.05
    shifted = metrics.kid(torch.randn(20, 8, generator=gen) + 1.0,
                          torch.randn(200, 8, generator=gen))
    assert shifted > 10 * abs(sum(same) / len(same)) and shifted > 0.1


def test_centroid_top1():
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [9.0, 0.0]])
    assert metrics.centroid_top1(feats, [0, 1, 2, 2], centroids) == pytest.approx(0.75)
