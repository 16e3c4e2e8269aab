"""Image parameterisations: fit a real image, reproduce an init image, stay in [0, 1]."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from vital.optvis import param as P

SIZE = 32
FIT_STEPS = 200
FIT_TOL = 2e-3        # MSE after FIT_STEPS Adam steps; the random start is at ~0.1
FIT_LR = {"laplacian": 0.05, "pixel": 0.05, "fft": 0.05, "maco": 0.1, "pixel_norm": 0.1}


def _fixture(size=SIZE) -> torch.Tensor:
    """The astronaut's face: a 128 px crop area-downsampled to (1, 3, size, size) in [0, 1]."""
    crop = torch.from_numpy(data.astronaut()[80:208, 160:288]).permute(2, 0, 1)  # HWC -> CHW
    return F.interpolate(crop[None].double() / 255.0, size=(size, size), mode="area").float()


def _make(name, size=SIZE, image=None, **kw):
    if name == "maco":
        kw.setdefault("magnitude", P.magnitude_spectrum(_fixture() if image is None else image, size))
    return P.make_param(name, size, **kw)


@pytest.mark.parametrize("name", sorted(P.PARAMETERISATIONS))
def test_fits_fixture_image(name):
    target = _fixture()
    params, image_fn = _make(name, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(params, lr=FIT_LR[name])
    with torch.no_grad():
        start = F.mse_loss(image_fn(), target).item()
    for _ in range(FIT_STEPS):
        opt.zero_grad()
        loss = F.mse_loss(image_fn(), target)
        loss.backward()
        opt.step()
        getattr(image_fn, "after_step", lambda: None)()   # the render loop's contract
    final = F.mse_loss(image_fn(), target).item()
    assert start > 0.02, "the random start should be far from the fixture"
    assert final < FIT_TOL, f"{name}: MSE {start:.4f} -> {final:.5f}"


@pytest.mark.parametrize("levels", [1, 2, 4])
@pytest.mark.parametrize("init_mode", ["distribute", "finest"])
@pytest.mark.parametrize("level_gain", [1.0, 2.0])
def test_laplacian_init_reproduces_image(levels, init_mode, level_gain):
    image = F.interpolate(_fixture(), size=(30, 44), mode="bilinear")  # sizes not powers of 2
    params, image_fn = P.laplacian((30, 44), batch=2, levels=levels, init=image,
                                   init_mode=init_mode, level_gain=level_gain)
    assert [tuple(p.shape) for p in params] == \
        [(2, 3, -(-30 // 2 ** k), -(-44 // 2 ** k)) for k in range(levels)]
    torch.testing.assert_close(image_fn(), image.expand(2, -1, -1, -1), atol=1e-4, rtol=0)


def test_laplacian_distributes_a_flat_image_to_the_coarsest_level():
    image = torch.full((1, 3, 16, 16), 0.7)
    params, _ = P.laplacian(16, levels=3, init=image, init_mode="distribute")
    z = torch.atanh(torch.tensor(2 * 0.7 - 1))
    torch.testing.assert_close(params[-1], torch.full_like(params[-1], z.item()))
    for band in params[:-1]:
        torch.testing.assert_close(band, torch.zeros_like(band), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["pixel", "fft", "maco"])
def test_init_reproduces_image(name):
    image = _fixture()
    _, image_fn = _make(name, init=image)
    torch.testing.assert_close(image_fn(), image, atol=1e-4, rtol=0)


def test_pixel_clamp_init_reproduces_image():
    image = _fixture()
    _, image_fn = P.pixel(SIZE, init=image, squash="clamp")
    torch.testing.assert_close(image_fn(), image)


@pytest.mark.parametrize("name", sorted(P.PARAMETERISATIONS))
def test_output_in_unit_range_and_batched(name):
    params, image_fn = _make(name, batch=3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in params:
            p.mul_(50.0)     # push far past any saturation
    image = image_fn()
    assert image.shape == (3, 3, SIZE, SIZE)
    assert image.min() >= 0 and image.max() <= 1
    assert not torch.equal(image[0], image[1]), "batch members should start differently"


@pytest.mark.parametrize("name", sorted(P.PARAMETERISATIONS))
def test_every_parameter_gets_gradient(name):
    params, image_fn = _make(name, batch=2, generator=torch.Generator().manual_seed(2))
    (image_fn() * torch.randn(2, 3, SIZE, SIZE)).sum().backward()
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(P.PARAMETERISATIONS))
def test_random_start_is_seeded(name):
    def first(seed):
        return _make(name, generator=torch.Generator().manual_seed(seed))[1]().detach()
    assert torch.equal(first(3), first(3))
    assert not torch.equal(first(3), first(4))


def test_fft_non_square_and_decorrelate_off():
    _, image_fn = P.fft((24, 40), batch=2, decorrelate=False,
                        generator=torch.Generator().manual_seed(0))
    assert image_fn().shape == (2, 3, 24, 40)
    params, image_fn = P.fft((24, 40))
    with torch.no_grad():
        params[0].zero_()
    torch.testing.assert_close(image_fn(), torch.full((1, 3, 24, 40), 0.5))


def test_magnitude_spectrum_matches_numpy():
    images = torch.rand(2, 3, 16, 12, dtype=torch.float64)
    spectra = np.abs(np.fft.rfft2(images.numpy(), axes=(-2, -1))).mean(0)
    expected = torch.from_numpy(spectra) / (16 * 12) ** 0.5    # numpy's rfft2 is unnormalised
    torch.testing.assert_close(P.magnitude_spectrum(images), expected)
    assert P.magnitude_spectrum(images, size=8).shape == (3, 8, 5)


def test_maco_keeps_its_magnitude():
    low_contrast = 0.4 + 0.2 * _fixture()           # keeps the image clear of the clamp
    magnitude = P.magnitude_spectrum(low_contrast)
    params, image_fn = P.maco(SIZE, magnitude, batch=2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(params, lr=0.1)
    target = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for _ in range(10):                              # move the phase somewhere arbitrary
        opt.zero_grad()
        F.mse_loss(image_fn(), target).backward()
        opt.step()
    image = image_fn().detach().double()
    assert image.min() > 0 and image.max() < 1, "the check needs an unclamped image"
    spectrum = torch.fft.rfft2(image, norm="ortho").abs()
    interior = slice(1, SIZE // 2)                   # columns irfft2 keeps exactly
    torch.testing.assert_close(spectrum[..., interior],
                               magnitude[..., interior].expand(2, -1, -1, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spectrum[..., 0, 0], magnitude[..., 0, 0].expand(2, -1), rtol=1e-4,
                               atol=1e-4)


def test_make_param_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="fft, laplacian, maco, pixel"):
        P.make_param("lapacian", SIZE)
    with pytest.raises(ValueError, match="magnitude_spectrum"):
        P.maco(SIZE, torch.ones(3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"init must be"):
        P.laplacian(SIZE, init=torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="levels"):
        P.laplacian(SIZE, levels=0)


def test_pyramid_gain_setting_scales_the_coarse_levels():
    from vital.modes.setup import RenderCFG, make_param

    def coarse_effect(gain):
        cfg = RenderCFG(pyramid_gain=gain, pyramid_levels=3)
        tensors, image_fn = make_param(cfg, 32, "cpu", torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = image_fn().clone()
            tensors[-1].add_(0.01)                 # the coarsest level, 8 x 8
            return (image_fn() - before).abs().mean().item()
    # level 2 enters the sum scaled by gain^2: 0.25 of its effect at gain 1
    assert coarse_effect(0.5) == pytest.approx(0.25 * coarse_effect(1.0), rel=0.05)
