"""The official VITAL LRP rule (``--relevance lrp_paper``) against a slow, obviously correct
loop implementation on a tiny CNN with a residual block: values and conservation."""
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from vital.models import load_target
from vital.optvis.relevance import relevance_and_features

EPS = 1e-5


class TinyResidual(nn.Module):
    """conv1 (raw output hooked) -> bn -> relu -> a torchvision BasicBlock (residual sum)."""
    input_size = 8
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.block = BasicBlock(4, 4)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))

    def forward(self, x):
        return self.block(self.relu(self.bn1(self.conv1(x))))


def _bn(x, bn):
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return x * scale[None, :, None, None] + (bn.bias - bn.running_mean * scale)[None, :, None, None]


def _zplus_conv_loops(a, conv, r_out):
    """Relevance of the conv's input: R_i = sum_j a_i w+_ij / (sum_i' a_i' w+_i'j + eps) R_j,
    written as loops over every output unit j and every input unit i in its window."""
    a, r_out = a[0].double().numpy(), r_out[0].double().numpy()
    w = conv.weight.detach().double().clamp(min=0).numpy()         # (O, I, k, k)
    pad, k = conv.padding[0], conv.kernel_size[0]
    cin, height, width = a.shape
    padded = np.pad(a, ((0, 0), (pad, pad), (pad, pad)))
    r_in = np.zeros_like(padded)
    for o in range(w.shape[0]):
        for y in range(r_out.shape[1]):
            for x in range(r_out.shape[2]):
                window = padded[:, y:y + k, x:x + k]
                contrib = window * w[o]
                z = contrib.sum() + EPS
                r_in[:, y:y + k, x:x + k] += contrib / z * r_out[o, y, x]
    return torch.from_numpy(r_in[:, pad:pad + height, pad:pad + width])[None]


def _slow_lrp(model, image, channel):
    """Relevance at conv1's output for the target channel of the block's output."""
    with torch.no_grad():
        a1 = model.conv1(image)
        h = torch.relu(_bn(a1, model.bn1))                       # block input (skip)
        b = model.block
        c1 = b.conv1(h)
        g = torch.relu(_bn(c1, b.bn1))
        c2 = b.conv2(g)
        main = _bn(c2, b.bn2)
        out = torch.relu(main + h)
    start = torch.zeros_like(out)
    start[:, channel] = out[:, channel]                            # the channel's activation map
    share = main.abs() / (main.abs() + h.abs() + EPS)              # |main| / (|main| + |skip|)
    r_main, r_skip = start * share, start * (h.abs() / (main.abs() + h.abs() + EPS))
    r_g = _zplus_conv_loops(g, b.conv2, r_main)                    # bn2 and relu pass through
    r_h = _zplus_conv_loops(h, b.conv1, r_g) + r_skip              # bn1 and relu pass through
    return r_h, start                                              # bn1, relu pass: R(conv1)


@pytest.fixture
def tiny():
    return load_target(TinyResidual().eval())


def _fast(tiny, image, channel):
    def score(feats):                                             # (B, C, P) -> (B,)
        return feats[:, channel].mean(-1)
    rel, _ = relevance_and_features(tiny, image, ["conv1", "block"], "block", score,
                                    "lrp_paper")
    positions = image.shape[-1] * image.shape[-2]
    return rel["conv1"].double() * positions, rel["block"].double() * positions  # undo 1/P


@pytest.mark.parametrize("channel", [0, 3])
def test_paper_lrp_equals_slow_loops(tiny, channel):
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(channel),
                       )
    slow, start = _slow_lrp(tiny.module, image, channel)
    fast, top = _fast(tiny, image, channel)
    torch.testing.assert_close(top.reshape(start.shape), start.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.reshape(slow.shape), slow, rtol=1e-4, atol=1e-6)


def test_paper_lrp_conserves_relevance(tiny):
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5),
                       )
    fast, top = _fast(tiny, image, 1)
    assert (fast >= -1e-7).all(), "z+ with non-negative relevance stays non-negative"
    total_in, total_top = fast.sum((1, 2)), top.sum((1, 2))
    torch.testing.assert_close(total_in, total_top, rtol=1e-3, atol=1e-6)   # up to eps


class TinyPool(nn.Module):
    """conv1 -> relu -> max pool (3 x 3, stride 2, padding 1: a ResNet stem's) -> conv2."""
    input_size = 8
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        with torch.no_grad():
            for m in (self.conv1, self.conv2):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.conv1(x))))


def _avg_pool_rule_loops(a, r_out):
    """The official max-pool rule as loops: every 2 x 2 window (stride 2) of the pool's input
    shares its output unit's relevance in proportion to its values, R_i = a_i / 4 /
    (mean of the window + eps) R_j."""
    a, r_out = a[0].double(), r_out[0].double()
    r_in = torch.zeros_like(a)
    for c in range(a.shape[0]):
        for y in range(r_out.shape[1]):
            for x in range(r_out.shape[2]):
                window = a[c, 2 * y:2 * y + 2, 2 * x:2 * x + 2]
                z = window.mean() + EPS
                r_in[c, 2 * y:2 * y + 2, 2 * x:2 * x + 2] += window / 4 / z * r_out[c, y, x]
    return r_in[None]


@pytest.mark.parametrize("channel", [0, 4])
def test_paper_lrp_max_pool_as_the_official_average_pool(channel):
    model = load_target(TinyPool().eval())
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    m = model.module
    with torch.no_grad():
        h = m.relu(m.conv1(image))                                # the pool's input (= conv1's)
        out = m.conv2(m.pool(h))
    start = torch.zeros_like(out)
    start[:, channel] = out[:, channel]
    slow = _avg_pool_rule_loops(h, _zplus_conv_loops(m.pool(h), m.conv2, start))

    def score(feats):                                             # (B, C, P) -> (B,)
        return feats[:, channel].mean(-1)
    rel, _ = relevance_and_features(model, image, ["conv1"], "conv2", score, "lrp_paper")
    fast = rel["conv1"].double() * out.shape[-1] * out.shape[-2]   # undo the score's 1 / P
    torch.testing.assert_close(fast.reshape(slow.shape), slow, rtol=1e-4, atol=1e-6)
    # not the max rule (which gives each window's relevance to one input): some 2 x 2 window
    # shares it between several inputs
    per_window = (fast.reshape(slow.shape).abs() > 1e-9).double()
    per_window = torch.nn.functional.avg_pool2d(per_window[0], 2) * 4    # non-zero per window
    assert per_window.max() > 1
