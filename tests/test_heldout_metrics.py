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


def test_heldout_photos_equal_to_a_reference_are_refused(tmp_path):
    from helpers import write_images
    from vital.config import ConfigError
    from vital.eval.heldout import check_disjoint, heldout_folder
    from vital.refs.images import list_images
    refs = write_images(tmp_path / "refs" / "001_cat", 3, seed=0)
    held = write_images(tmp_path / "heldout" / "001_cat", 3, seed=1)
    assert heldout_folder(refs, tmp_path / "heldout") == held
    check_disjoint(list_images(refs), list_images(held))             # distinct: fine
    (held / "copy.png").write_bytes((refs / "img_01.png").read_bytes())  # a renamed copy
    with pytest.raises(ConfigError, match="also references"):
        check_disjoint(list_images(refs), list_images(held))
    with pytest.raises(ConfigError, match="no held-out folder"):
        heldout_folder(tmp_path / "refs" / "002_dog", tmp_path / "heldout")
