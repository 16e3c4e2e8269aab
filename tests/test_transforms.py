"""Augmentations by value on 2x2 / 3x3 tensors, and determinism given a seeded generator."""
import pytest
import torch

from vital.optvis import transforms as T


def _grid(n=3):
    return torch.arange(n * n, dtype=torch.float32).view(1, 1, n, n)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_roll_by_value():
    assert T.roll(_grid(), 1, 0)[0, 0].tolist() == [[6, 7, 8], [0, 1, 2], [3, 4, 5]]
    assert T.roll(_grid(), 0, 1)[0, 0].tolist() == [[2, 0, 1], [5, 3, 4], [8, 6, 7]]
    assert T.roll(_grid(), -1, -1)[0, 0].tolist() == [[4, 5, 3], [7, 8, 6], [1, 2, 0]]


def test_hflip_by_value():
    assert T.hflip(_grid(2))[0, 0].tolist() == [[1, 0], [3, 2]]


def test_rescale_zoom_in_by_value():
    # bilinear x2 of [[0, 1], [2, 3]] samples (0.25, 0.25) .. (0.75, 0.75) in the centre 2x2
    out = T.rescale(_grid(2), 2.0)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.75, 1.25], [1.75, 2.25]]))


def test_rescale_zoom_out_pads_by_reflection():
    img = torch.rand(2, 3, 8, 8, generator=_gen(0))
    out = T.rescale(img, 0.5)                       # 4x4 content, 2 px reflected each side
    assert out.shape == img.shape
    torch.testing.assert_close(out[..., 2:6, 0], out[..., 2:6, 4])
    torch.testing.assert_close(out[..., 0, 2:6], out[..., 4, 2:6])
    flat = torch.full((1, 3, 7, 9), 0.25)
    for factor in (0.5, 0.8, 1.3, 2.0):
        torch.testing.assert_close(T.rescale(flat, factor), flat)
    assert T.rescale(img, 1.0) is img


def test_random_roll_is_a_roll_within_range_and_seeded():
    img = _grid(3)
    shifts = set()
    for seed in range(20):
        out = T.random_roll(1)(img, _gen(seed))
        match = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if torch.equal(out, T.roll(img, dy, dx))]
        assert match, "output is not a roll within +-1"
        shifts.add(match[0])
        assert torch.equal(out, T.random_roll(1)(img, _gen(seed)))
    assert len(shifts) > 3, "shifts should vary with the seed"


def test_random_flip_probability_edges():
    img = _grid(2)
    assert torch.equal(T.random_flip(1.0)(img, _gen(0)), T.hflip(img))
    assert torch.equal(T.random_flip(0.0)(img, _gen(0)), img)
    flips = sum(torch.equal(T.random_flip(0.5)(img, _gen(s)), T.hflip(img)) for s in range(40))
    assert 5 < flips < 35


def test_random_noise_statistics_and_zero():
    img = torch.full((1, 3, 64, 64), 0.5)
    noisy = T.random_noise(0.1)(img, _gen(1))
    assert (noisy - img).std().item() == pytest.approx(0.1, rel=0.05)
    assert abs((noisy - img).mean().item()) < 0.01
    assert torch.equal(T.random_noise(0.0)(img, _gen(1)), img)


def test_compose_applies_in_order():
    img = _grid(3)
    both = T.compose([lambda x, g: T.roll(x, 0, 1), lambda x, g: T.hflip(x)])
    assert torch.equal(both(img, None), T.hflip(T.roll(img, 0, 1)))


def test_standard_is_deterministic_given_the_generator():
    img = torch.rand(2, 3, 16, 16, generator=_gen(2))
    augment = T.standard(jitter=3, scales=(0.9, 1.0, 1.1), flip=True, noise=0.05)
    a = augment(img, _gen(7))
    assert a.shape == img.shape
    assert torch.equal(a, augment(img, _gen(7)))
    assert not torch.equal(a, augment(img, _gen(8)))
    gen = _gen(7)
    assert not torch.equal(augment(img, gen), augment(img, gen)), "state should advance"


def test_standard_with_everything_off_is_identity():
    img = torch.rand(1, 3, 5, 5, generator=_gen(3))
    assert torch.equal(T.standard(jitter=0, scales=None, flip=False, noise=0.0)(img, _gen(0)), img)


def test_invalid_arguments_say_what_is_valid():
    with pytest.raises(ValueError, match="max_shift"):
        T.random_roll(-1)
    with pytest.raises(ValueError, match="positive"):
        T.random_scale([1.0, 0.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        T.random_flip(1.5)
    with pytest.raises(ValueError, match="std"):
        T.random_noise(-0.1)
