"""clip_custom preprocessing: the PIL pipeline equals open_clip's OpenAI transform; the tensor
version follows it closely and passes gradients."""
import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from clip_custom import preprocess_tensor, transform
from clip_custom.preprocess import CLIP_MEAN, CLIP_STD

SIZE = 32


def _smooth_image(h: int, w: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour gradients (no edges), so float and uint8 resampling can be compared."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([0.5 + 0.4 * np.sin(3 * xx), 0.5 + 0.4 * np.cos(2 * yy), 0.3 + 0.5 * xx * yy], -1)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return image.convert(mode)


@pytest.mark.parametrize("hw,mode", [((48, 80), "RGB"), ((90, 50), "RGBA"), ((40, 40), "L")])
def test_pil_pipeline_equals_open_clip(hw, mode):
    image = _smooth_image(*hw, mode=mode)
    peer = image_transform(SIZE, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    ours = transform(SIZE)(image)
    assert ours.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(ours, peer(image))


@pytest.mark.parametrize("hw", [(48, 80), (90, 50), (32, 32), (64, 64)])
def test_tensor_version_follows_pil_pipeline(hw):
    image = _smooth_image(*hw)
    x01 = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    ours = preprocess_tensor(x01, SIZE)[0]
    pil = transform(SIZE)(image)
    assert ours.shape == pil.shape
    # uint8 rounding in PIL: about one grey level, i.e. 1/255/std in normalised units
    assert (ours - pil).abs().max() < 1.5 / 255 / min(CLIP_STD)


def test_tensor_version_is_differentiable():
    x01 = torch.rand(2, 3, 40, 56, requires_grad=True)
    preprocess_tensor(x01, SIZE).square().sum().backward()
    assert x01.grad is not None and x01.grad.abs().sum() > 0
