"""Batch norms folded into their convolutions for a render (TargetModel.batchnorm_folded): the
same function up to float rounding, hooked layers untouched, restored afterwards, and the
official LRP rule (which passes batch norms on their own) computed on the original modules."""
import pytest
import torch
from torch import nn

from vital.models import load_target
from vital.optvis import losses, param
from vital.optvis import relevance as rel
from vital.optvis.render import Schedule, render

from helpers import perturb


class BNNet(nn.Module):
    """conv-bn-act blocks in Sequentials (EfficientNet's layout) and one conv / bn pair as
    plain attributes (a CLIP ResNet's layout, which must stay unfolded)."""
    input_size = 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.class_names = [f"c{i}" for i in range(5)]
        block = lambda i, o, s: nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False),  # noqa: E731
                                              nn.BatchNorm2d(o), nn.ReLU6())
        self.stem, self.stage1 = block(3, 8, 2), block(8, 16, 2)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(self.stage1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def target():
    net = perturb(BNNet(), 0.2, seed=1)
    with torch.no_grad():       # gammas of both signs: z+ would see the difference
        net.stage1[1].weight.mul_(torch.linspace(-1.5, 1.5, 16))
    return load_target(net)


def test_folded_model_is_the_same_function_and_is_restored(target):
    x = torch.rand(2, 3, 32, 32)
    modules = list(target.module.modules())
    with torch.no_grad():
        before = target(x)
        with target.batchnorm_folded() as n:
            folded = target(x)
            assert isinstance(target.module.stem[1], nn.Identity)
            assert not any(p.requires_grad for p in target.module.parameters())
        after = target(x)
    assert n == 2                                    # the two Sequential pairs, not conv2 / bn2
    torch.testing.assert_close(folded, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, before) and list(target.module.modules()) == modules


def test_hooked_layers_are_kept_and_a_folded_one_cannot_be_hooked(target):
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), target.hooks(["stem.0", "stage1"]) as feats:
        target(x)
        plain = {k: v.clone() for k, v in feats.items()}
    with torch.no_grad(), target.batchnorm_folded(keep=["stem.0"]) as n:
        assert n == 1 and isinstance(target.module.stem[1], nn.BatchNorm2d)
        with target.hooks(["stem.0", "stage1"]) as feats:
            target(x)
            torch.testing.assert_close(feats["stem.0"], plain["stem.0"])   # the conv, pre-BN
            torch.testing.assert_close(feats["stage1"], plain["stage1"], rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="stage1.1.*folded"):
            with target.hooks(["stage1.1"]):
                pass


def test_input_gradient_is_the_same_and_render_folds_around_its_hooks(target, monkeypatch):
    """The render's loss and its gradient w.r.t. the image equal the plain model's (a whole
    render is not compared: Adam's first steps turn rounding-level gradient differences into
    lr-sized moves); the render folds with its hooked layers kept."""
    ref = torch.randn(16, 64).sort(-1).values
    x = torch.rand(1, 3, 32, 32)

    def loss_and_grad():
        image = x.clone().requires_grad_(True)
        with target.hooks(["stage1"]) as feats:
            out = target(image)
            loss = losses.sort_matching(feats["stage1"].flatten(2), ref) + out[:, 1].sum()
        loss.backward()
        return loss.detach(), image.grad
    plain = loss_and_grad()
    with target.batchnorm_folded(keep=["stage1"]):
        folded = loss_and_grad()
    torch.testing.assert_close(folded[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded[1], plain[1], rtol=1e-3, atol=1e-6)

    seen, real = [], type(target).batchnorm_folded
    monkeypatch.setattr(type(target), "batchnorm_folded",
                        lambda self, keep=(): seen.append(list(keep)) or real(self, keep))
    gen = torch.Generator().manual_seed(0)
    result = render(target, losses.sort_matching_objective("stage1", ref),
                    param.make_param("pixel", 32, generator=gen),
                    Schedule(steps_multires=(2,), lr=0.05), ["stage1"], generator=gen,
                    save_steps=0, progress=False)
    assert seen == [["stage1"]] and result.steps_done == 2
    assert isinstance(target.module.stem[1], nn.BatchNorm2d)      # restored after the render


@pytest.mark.parametrize("rule", ["lrp_paper", "lrp", "gradxact"])
def test_relevance_is_the_same_inside_a_folded_render(target, rule):
    x = torch.rand(2, 3, 32, 32)

    def maps():
        return rel.layer_relevance(target, x, ["stem", "stage1"], "fc",
                                   lambda f: f[:, 2].reshape(f.shape[0], -1).sum(-1), rule)
    plain = maps()
    with target.batchnorm_folded(keep=["stem", "stage1", "fc"]):
        folded = maps()
    for layer in ("stem", "stage1"):
        a, b = plain[layer], folded[layer]
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_the_embedded_model_folds_every_pair():
    target = load_target("efficientnet-lite0")
    convs = sum(isinstance(m, nn.Conv2d) for m in target.module.modules())
    with target.batchnorm_folded(keep=["blocks.4"]) as n:
        pass
    assert n == convs == 49
