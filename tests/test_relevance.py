"""vital.optvis.relevance: conservation of LRP / gradient x activation on bias-free tiny models,
guided backprop against a hand-written backward pass, and the relevance-weighted loss."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vital.optvis import losses
from vital.optvis import relevance as rel
from vital.models import load_target


class BiasFreeCNN(nn.Module):
    """conv-ReLU x 3 without biases: positively homogeneous, so gradient x activation sums to
    the score. With ``positive`` weights every unit has positive contributions, the condition
    under which LRP's z+ rule conserves relevance."""

    input_size = 32

    def __init__(self, positive: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1, bias=False), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1, bias=False), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 10, 3, 1, 1, bias=False), nn.ReLU())
        if positive:
            with torch.no_grad():
                for p in self.parameters():
                    p.abs_()

    def forward(self, x):
        return self.stage2(self.stage1(self.stem(x)))


def _channel(c):
    return lambda feats: feats[:, c].mean(-1)     # (B, C, P) -> (B,)


def _score(target, images, layer, c):
    with torch.no_grad(), target.hooks([layer]) as feats:
        target(images)
        return feats[layer].flatten(2)[:, c].mean(-1)


@pytest.fixture
def cnn():
    return load_target(BiasFreeCNN(), mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.parametrize("rule, positive", [("lrp", True), ("gradxact", False)])
def test_cnn_relevance_is_conserved(rule, positive):
    cnn = load_target(BiasFreeCNN(positive), mean=(0.5,) * 3, std=(0.25,) * 3)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = rel.layer_relevance(cnn, images, ["stem", "stage1"], "stage2", _channel(4), rule)
    score = _score(cnn, images, "stage2", 4)
    assert (score > 0).all()
    for layer in ("stem", "stage1"):
        torch.testing.assert_close(maps[layer].sum((1, 2)), score, rtol=1e-4, atol=1e-6)


def _manual_zplus(net, x, channel):
    """Slow reference: the z+ rule written out for the last conv of BiasFreeCNN (relevance at
    stage1); relevance of units without positive contributions is lost, as the rule says."""
    a = net.stage1(net.stem(x))                                   # (B, 8, H, W)
    z = net.stage2[0](a)
    top = torch.zeros_like(z)
    top[:, channel] = net.stage2(a)[:, channel] / z[0, 0].numel()
    z_plus = F.conv2d(a, net.stage2[0].weight.clamp(min=0), padding=1)
    ratio = top / torch.where(z_plus > 0, z_plus, torch.ones_like(z_plus))
    return a * F.conv_transpose2d(ratio, net.stage2[0].weight.clamp(min=0), padding=1)


def test_lrp_matches_hand_written_zplus_rule():
    cnn = load_target(BiasFreeCNN(), mean=(0.5,) * 3, std=(0.25,) * 3)   # signed weights
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    maps = rel.layer_relevance(cnn, images, ["stage1"], "stage2", _channel(3), "lrp")
    with torch.no_grad():
        expected = _manual_zplus(cnn.module, cnn.normalize(images), 3).flatten(2)
    torch.testing.assert_close(maps["stage1"], expected, rtol=1e-4, atol=1e-7)
    assert (maps["stage1"] >= -1e-7).all()    # z+ gives post-ReLU units non-negative relevance


def _bias_free_lite():
    from vital.models.efficientnet import EfficientNetLite
    torch.manual_seed(2)
    net = EfficientNetLite(stem=8, blocks=[(8, 8, 8, 3, 1), (8, 16, 8, 3, 1), (8, 16, 12, 3, 2)],
                           head=16, classes=5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):        # positive contributions everywhere (z+ conserves)
                m.weight.abs_()
            if isinstance(m, nn.BatchNorm2d):   # merged into the convs: zero bias after merging;
                m.eps = 0.0                       # zennit leaves 1/sqrt(1 + eps) in the merged BN
                m.running_mean.zero_()
                m.bias.zero_()
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


def test_lrp_canonizes_batch_norm_and_residual_sums():
    target = load_target(_bias_free_lite(), input_size=32)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    score_fn = _channel(2)
    maps = rel.layer_relevance(target, images, ["stem", "blocks.0"], "blocks.1", score_fn, "lrp")
    score = _score(target, images, "blocks.1", 2)
    for layer in ("stem", "blocks.0"):   # blocks.1 has a skip connection: it must split, not copy
        torch.testing.assert_close(maps[layer].sum((1, 2)), score, rtol=1e-3, atol=1e-5)
    blocks = dict(target.module.named_modules())
    assert not hasattr(blocks["blocks.1"], "canonizer_sum")           # canonizer removed again
    torch.testing.assert_close(blocks["stem.bn"].bias, torch.zeros(8))  # batch norm restored


def _bias_free_vit(path):
    target = load_target(str(path))
    with torch.no_grad():
        for name, p in target.clip.visual.named_parameters():
            if "bias" in name:
                p.zero_()
    return target


def test_vit_conservative_lrp_is_conserved(tiny_clip_file):
    target = _bias_free_vit(tiny_clip_file)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    score_fn = lambda f: f[:, 7, 1:].mean(-1)   # neuron 7, patch tokens only  # noqa: E731
    maps = rel.layer_relevance(target, images, ["embed", "block.0"], "block.1.mlp", score_fn,
                               "lrp")
    with torch.no_grad(), target.hooks(["block.1.mlp"]) as feats:
        target(images)
        score = feats["block.1.mlp"][:, 1:, 7].mean(-1)
    for layer in ("embed", "block.0"):
        torch.testing.assert_close(maps[layer].sum((1, 2)), score, rtol=1e-3, atol=1e-5)
    plain = rel.layer_relevance(target, images, ["block.0"], "block.1.mlp", score_fn, "gradxact")
    assert not torch.allclose(plain["block.0"].sum((1, 2)), score, rtol=1e-3)  # GELU/LN/softmax


def _manual_guided(net, x, channel):
    """Slow reference: guided backprop written out for BiasFreeCNN, relevance at stage1."""
    a1 = net.stem(x)
    z2 = net.stage1[0](a1)
    a2 = z2.relu()
    z3 = net.stage2[0](a2)
    a3 = z3.relu()
    g = torch.zeros_like(a3)
    g[:, channel] = 1.0 / a3[0, 0].numel()
    g = g.clamp_min(0) * (z3 > 0)                      # through ReLU 3: positive gradients only
    (g2,) = torch.autograd.grad(z3, a2, g)             # through conv 3 (linear)
    return a2 * g2.clamp_min(0)


def test_guided_matches_hand_written_backward(cnn):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    maps = rel.layer_relevance(cnn, images, ["stage1"], "stage2", _channel(1), "guided")
    x = cnn.normalize(images).requires_grad_(True)
    expected = _manual_guided(cnn.module, x, 1).flatten(2)
    torch.testing.assert_close(maps["stage1"], expected.detach(), rtol=1e-5, atol=1e-7)
    assert (maps["stage1"] >= 0).all()


def test_unknown_rule_names_the_valid_ones(cnn):
    with pytest.raises(ValueError, match="lrp, gradxact, guided"):
        rel.layer_relevance(cnn, torch.rand(1, 3, 32, 32), ["stem"], "stage2", _channel(0), "x")


def test_weights_and_importance_by_value():
    r = torch.tensor([[[1.0, 3.0, 2.0], [0.0, 0.0, 4.0]]])    # (1, 2, 3)
    torch.testing.assert_close(rel.spatial_weights(r),
                               torch.tensor([[[0.0, 1.0, 0.5], [0.0, 0.0, 1.0]]]))
    torch.testing.assert_close(rel.channel_importance(r), torch.tensor([0.0, 1.0]))


def test_weighted_sort_matching_against_plain_sort_matching():
    gen = torch.Generator().manual_seed(6)
    x, ref = torch.randn(2, 4, 9, generator=gen), torch.randn(4, 5, generator=gen).sort(-1).values
    torch.testing.assert_close(rel.weighted_sort_matching(x, ref, torch.ones(4)),
                               losses.sort_matching(x, ref))
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0])   # the mean over all 4 channels: / 4
    torch.testing.assert_close(rel.weighted_sort_matching(x, ref, one_hot),
                               losses.sort_matching(x[:, 2:3], ref[2:3]) / 4)


def _official_weighted_loss(x, ref_values, importance):
    """The official inner code's loss for one synthetic image, as plain loops (float64):
    ``sort_matching(input, target) * importance_neuron.unsqueeze(-1)`` then ``.mean()``, with
    sort_matching = (x_cp - mean over references of the sorted reference values, at the rank
    of x_cp)^2 (1, C, P) and importance (N refs, C): the mean over N, C and P of
    w_nc * err_cp."""
    n, c = importance.shape
    p = x.shape[-1]
    ref_sorted = ref_values.sort(-1).values.mean(0)                 # (N, C, P) -> (C, P)
    total = 0.0
    for i in range(n):
        for ch in range(c):
            order = sorted(range(p), key=lambda k: float(x[0, ch, k]))
            for rank, pos in enumerate(order):
                err = float(x[0, ch, pos]) - float(ref_sorted[ch, rank])
                total += float(importance[i, ch]) * err * err
    return total / (n * c * p)


def test_weighted_sort_matching_equals_a_loop_of_the_official_formula():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 5, 7, generator=gen, dtype=torch.float64)
    ref_values = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)    # 3 references
    importance = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    ours = rel.weighted_sort_matching(x, ref_values.sort(-1).values.mean(0),
                                      importance.mean(0))
    assert abs(float(ours) - _official_weighted_loss(x, ref_values, importance)) < 1e-12


def test_relevance_sort_matching_lowers_its_loss(cnn):
    refs_images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    layers = ["stem", "stage1"]
    refs, imp = rel.weighted_references(cnn, refs_images, layers, "stage2", _channel(0), "lrp")
    maps = rel.SyntheticMaps(cnn, layers, "stage2", _channel(0), "lrp")
    obj = rel.relevance_sort_matching({32: refs}, {32: imp}, {k: 1.0 for k in layers}, maps)
    img = torch.full((1, 3, 32, 32), 0.5).add_(0.05 * torch.randn(1, 3, 32, 32)).requires_grad_()
    opt = torch.optim.Adam([img], lr=0.05)
    values = []
    with cnn.hooks(layers) as feats:
        for step in range(15):
            cnn(img)
            ctx = {"input": img, "size": 32, "step": step,
                   "features": {k: feats[k].flatten(2) for k in layers}}
            loss = obj(ctx)
            values.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert values[-1] < 0.7 * values[0]


def test_synthetic_maps_are_reused_and_resized(cnn, monkeypatch):
    calls = []
    real = rel.layer_relevance
    monkeypatch.setattr(rel, "layer_relevance", lambda *a, **k: calls.append(1) or real(*a, **k))
    maps = rel.SyntheticMaps(cnn, ["stage1"], "stage2", _channel(0), "gradxact", every=3)

    def ctx(step, size):
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(step))
        with cnn.hooks(["stage1"]) as feats:
            cnn(x)
            return {"input": x, "step": step, "features": {"stage1": feats["stage1"].flatten(2)}}
    first = maps(ctx(0, 32))["stage1"]                 # (1, 8, 8*8)
    bigger = maps(ctx(1, 48))["stage1"]                # reused, resized to 12 x 12
    assert len(calls) == 1 and bigger.shape == (1, 8, 144)
    expected = F.interpolate(first.unflatten(-1, (8, 8)), size=(12, 12), mode="bilinear",
                             align_corners=False).flatten(2)
    torch.testing.assert_close(bigger, expected)
    maps(ctx(3, 32))                                   # every=3: recomputed at step 3
    assert len(calls) == 2


@pytest.mark.parametrize("rule", ["gradxact", "guided"])
def test_vit_rules_give_maps_per_token(tiny_clip_file, rule):
    target = load_target(str(tiny_clip_file))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    maps = rel.layer_relevance(target, images, ["embed", "block.0"], "block.1.mlp",
                               lambda f: f[:, 3, 1:].mean(-1), rule)
    for layer in ("embed", "block.0"):
        assert maps[layer].shape == (2, 64, 17) and torch.isfinite(maps[layer]).all()
        assert maps[layer].abs().sum() > 0
    if rule == "guided":
        with target.hooks(["block.0"]) as feats:            # a x relu(g): sign of a
            target(images)
            act = feats["block.0"].transpose(1, 2)
        assert ((maps["block.0"] == 0) | (torch.sign(maps["block.0"]) == torch.sign(act))).all()


def test_spatial_weights_floor_keeps_every_activation_in_the_matching():
    from vital.optvis.relevance import spatial_weights
    r = torch.tensor([[[0.0, 1.0, 3.0, -1.0]]])
    plain = spatial_weights(r)
    torch.testing.assert_close(plain, torch.tensor([[[0.25, 0.5, 1.0, 0.0]]]))
    floored = spatial_weights(r, 0.5)
    torch.testing.assert_close(floored, 0.5 + 0.5 * plain)
    assert floored.min().item() == 0.5 and floored.max().item() == 1.0
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1\)"):
        spatial_weights(r, 1.0)
