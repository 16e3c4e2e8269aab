"""Sort matching against a slow loop reference, priors by value, objective algebra."""
import pytest
import torch
import torch.nn.functional as F

from vital.optvis import losses as L


def _sort_matching_loops(x: torch.Tensor, ref_sorted: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 literally: per image and channel, rank x, gather the reference at the rank."""
    batch, channels, positions = x.shape
    total = x.new_zeros(())
    for b in range(batch):
        for c in range(channels):
            levels = torch.linspace(0, 1, positions, dtype=ref_sorted.dtype)
            ref = torch.quantile(ref_sorted[c], levels)         # peer resampling
            order = torch.argsort(x[b, c])
            rank = torch.argsort(order)                          # inverse sort index
            for p in range(positions):
                total = total + (x[b, c, p] - ref[rank[p]]) ** 2
    return total / (batch * channels * positions)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("q", [7, 4, 13])
def test_sort_matching_equals_loop_reference(q):
    x = torch.randn(2, 3, 7, generator=_gen(0), dtype=torch.float64)
    ref = torch.randn(3, q, generator=_gen(1), dtype=torch.float64).sort(-1).values
    torch.testing.assert_close(L.sort_matching(x, ref), _sort_matching_loops(x, ref))


def test_sort_matching_gradient_equals_loop_reference():
    x1 = torch.randn(2, 3, 6, generator=_gen(2), dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    ref = torch.randn(3, 6, generator=_gen(3), dtype=torch.float64).sort(-1).values
    L.sort_matching(x1, ref).backward()
    _sort_matching_loops(x2, ref).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_sort_matching_float32_cpu_path_equals_loop_reference():
    """float32 on CPU takes the packed-key sort; loss and gradient must equal Algorithm 1."""
    x1 = torch.randn(2, 4, 50, generator=_gen(12)).requires_grad_(True)
    x2 = x1.detach().double().requires_grad_(True)
    ref = torch.randn(4, 30, generator=_gen(13)).sort(-1).values
    loss = L.sort_matching(x1, ref)
    loss.backward()
    expected = _sort_matching_loops(x2, ref.double())
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-4, atol=1e-7)


def test_sort_order_is_a_stable_sort_of_float32_with_ties_and_signs():
    g = _gen(14)
    x = torch.randint(-3, 4, (3, 200), generator=g).float() * 0.5   # many ties, both signs
    x[0, :5] = torch.tensor([float("-inf"), float("inf"), -1e-30, 1e-30, -7.25])
    x[1] = torch.randn(200, generator=g) * 1e6
    order = L.sort_order(x)
    assert order.dtype == torch.int64 and order.shape == x.shape
    torch.testing.assert_close(order, x.sort(dim=-1, stable=True).indices, rtol=0, atol=0)
    torch.testing.assert_close(L.sort_values(x), x.sort(dim=-1).values, rtol=0, atol=0)
    strided = x.t().contiguous().t()                                  # non-contiguous input
    torch.testing.assert_close(L.sort_order(strided), order, rtol=0, atol=0)


def test_sort_matching_is_zero_for_the_same_distribution():
    ref = torch.randn(4, 10, generator=_gen(4)).sort(-1).values
    perms = torch.stack([torch.randperm(10, generator=_gen(5 + i)) for i in range(2 * 4)])
    x = ref.repeat(2, 1).gather(-1, perms).view(2, 4, 10)   # (B*C, P) -> (B, C, P)
    assert L.sort_matching(x, ref).item() == 0.0
    assert L.sort_matching(x + 0.1, ref).item() == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("q", [5, 3, 8])
def test_sort_matching_gradcheck(q):
    x = (torch.randperm(2 * 2 * 5, generator=_gen(6)).double() / 7).view(2, 2, 5)  # distinct values
    x.requires_grad_(True)
    ref = torch.randn(2, q, generator=_gen(7), dtype=torch.float64).sort(-1).values
    assert torch.autograd.gradcheck(lambda t: L.sort_matching(t, ref), (x,))


def test_sort_matching_averages_per_image_losses():
    x = torch.randn(3, 4, 9, generator=_gen(8))
    ref = torch.randn(4, 9, generator=_gen(9)).sort(-1).values
    per_image = torch.stack([L.sort_matching(x[i:i + 1], ref) for i in range(3)])
    torch.testing.assert_close(L.sort_matching(x, ref), per_image.mean())


def test_sort_matching_pulls_a_free_tensor_to_the_reference():
    ref = (torch.rand(5, 64, generator=_gen(10)) ** 3 * 4).sort(-1).values   # skewed target
    x = torch.randn(2, 5, 64, generator=_gen(11), requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = L.sort_matching(x, ref)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_sort_matching_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="same C"):
        L.sort_matching(torch.zeros(1, 3, 4), torch.zeros(4, 4))


def test_resample_quantiles_identity_endpoints_and_torch_quantile():
    ref = torch.randn(3, 11, generator=_gen(12), dtype=torch.float64).sort(-1).values
    assert L.resample_quantiles(ref, 11) is ref
    for p in (2, 5, 29):
        out = L.resample_quantiles(ref, p)
        assert out.shape == (3, p)
        torch.testing.assert_close(out[:, 0], ref[:, 0])
        torch.testing.assert_close(out[:, -1], ref[:, -1])
        levels = torch.linspace(0, 1, p, dtype=torch.float64)
        torch.testing.assert_close(out, torch.quantile(ref, levels, dim=-1).T)
    torch.testing.assert_close(L.resample_quantiles(ref, 1)[:, 0], ref.median(-1).values)


def test_sorted_reference_means_sorted_features():
    feats = torch.randn(4, 3, 6, generator=_gen(13))
    expected = torch.stack([torch.stack([feats[n, c].sort().values for c in range(3)])
                            for n in range(4)]).mean(0)
    torch.testing.assert_close(L.sorted_reference(feats), expected)
    torch.testing.assert_close(L.sorted_reference(list(feats)), expected)


def test_sorted_reference_resamples_different_sizes():
    a = torch.randn(3, 9, generator=_gen(14))
    b = torch.randn(2, 3, 5, generator=_gen(15))
    out = L.sorted_reference([a, b])
    assert out.shape == (3, 9)
    parts = [a.sort(-1).values] + [L.resample_quantiles(bi.sort(-1).values, 9) for bi in b]
    torch.testing.assert_close(out, torch.stack(parts).mean(0))
    with pytest.raises(ValueError, match="channels"):
        L.sorted_reference([a, torch.zeros(4, 9)])


def test_tv_by_value():
    img = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 2, 2)
    # horizontal 1, 2; vertical 2, 3; diagonal 4; anti-diagonal 2 - 1 = 1
    assert L.tv(img, p=2).item() == pytest.approx((1 + 4) / 2 + (4 + 9) / 2 + 16 + 1)
    assert L.tv(img, p=1).item() == pytest.approx(1.5 + 2.5 + 4 + 1)
    assert L.tv(torch.full((2, 3, 5, 5), 0.3)).item() == 0.0


def test_tv_is_resolution_agnostic_for_a_ramp():
    def ramp(n):  # horizontal ramp 0..1 sampled at n points, as (1, 1, n, n)
        return torch.linspace(0, 1, n).expand(n, n)[None, None]
    # per-pixel slope halves when the resolution doubles; the mean does not grow with pixels
    assert L.tv(ramp(33), p=1).item() == pytest.approx(L.tv(ramp(17), p=1).item() / 2, rel=1e-5)


def test_l2_by_value():
    img = torch.tensor([0.0, 1.0, 0.5, 0.5]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert L.l2(img).item() == pytest.approx(0.125)
    center = torch.tensor([0.0, 0.5, 1.0])
    expected = ((img - center.view(1, 3, 1, 1)) ** 2).mean()
    assert L.l2(img, center).item() == pytest.approx(expected.item())


def _const(name, value):
    return L.Objective(lambda ctx: torch.tensor(float(value)), name)


def test_objectives_add_scale_and_report_terms():
    a, b = _const("a", 2.0), _const("b", 3.0)
    obj = a + 0.1 * b
    terms = obj.terms({})
    assert set(terms) == {"a", "b"}
    assert terms["a"].item() == pytest.approx(2.0) and terms["b"].item() == pytest.approx(0.3)
    assert obj({}).item() == pytest.approx(2.3)
    assert obj.weights == {"a": 1.0, "b": 0.1}
    assert (a - b)({}).item() == pytest.approx(-1.0)
    assert (-(a / 4))({}).item() == pytest.approx(-0.5)
    assert (2 * (a + b))({}).item() == pytest.approx(10.0)
    assert sum([a, b, _const("c", 1)])({}).item() == pytest.approx(6.0)
    assert (a + a).weights == {"a": 2.0}
    assert (a + b - b).names == ["a"]
    assert a.rename("z").names == ["z"]


def test_objective_errors():
    a = _const("a", 1.0)
    with pytest.raises(ValueError, match="both named 'a'"):
        a + _const("a", 2.0)
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(ValueError, match="no terms"):
        (a - a)({})
    with pytest.raises(KeyError, match="captured"):
        L.sort_matching_objective("block.3", torch.zeros(2, 4))({"features": {"embed": None}})


def test_terms_name_the_term_that_blew_up():
    obj = _const("fine", 1.0) + L.Objective(lambda ctx: torch.tensor(float("nan")), "bad")
    bad = [name for name, value in obj.terms({}).items() if not torch.isfinite(value)]
    assert bad == ["bad"]


def test_class_logprob_and_cosine_match_torch():
    logits = torch.randn(3, 10, generator=_gen(16))
    obj = L.class_logprob_objective(4, weight=0.5)
    expected = 0.5 * F.cross_entropy(logits, torch.full((3,), 4))
    torch.testing.assert_close(obj({"output": logits}), expected)
    assert obj.names == ["class:4"]
    emb = torch.randn(3, 8, generator=_gen(17))
    vec = torch.randn(8, generator=_gen(18))
    expected = F.cosine_embedding_loss(emb, vec.expand(3, 8), torch.ones(3))
    torch.testing.assert_close(L.cosine_objective(vec)({"output": emb}), expected)


class _TinyNet(torch.nn.Module):
    """Two convolutions and a linear head; records its features as ctx expects."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, 5)
        with torch.no_grad():
            self.head.weight.mul_(20.0)   # confident enough logits to move in 15 steps

    def ctx(self, image):
        f1 = torch.relu(self.conv1(image))
        f2 = torch.relu(self.conv2(f1))
        feats = {"conv1": f1.flatten(2), "conv2": f2.flatten(2)}   # BCHW -> BC(HW)
        return {"image": image, "features": feats, "output": self.head(f2.mean((2, 3)))}


def _vital_objective(net):
    real = torch.rand(3, 3, 16, 16, generator=_gen(19)) ** 2
    with torch.no_grad():
        feats = net.ctx(real)["features"]
    refs = {k: L.sorted_reference(v) for k, v in feats.items()}
    return L.sort_matching_objectives(refs, {"conv2": 2.0})


@pytest.mark.parametrize("make", [
    _vital_objective,
    lambda net: L.tv_objective(p=2) + L.tv_objective(p=1),
    lambda net: L.l2_objective(center=torch.tensor([0.2, 0.5, 0.8])),
    lambda net: L.class_logprob_objective(3),
    lambda net: L.cosine_objective(torch.randn(5, generator=_gen(20))),
    lambda net: _vital_objective(net) + 0.1 * L.tv_objective() + L.class_logprob_objective(1),
], ids=["sort", "tv", "l2", "class", "cosine", "combined"])
def test_every_objective_falls_within_a_few_steps(make):
    net = _TinyNet()
    objective = make(net)
    image = torch.rand(2, 3, 16, 16, generator=_gen(21)).requires_grad_(True)
    opt = torch.optim.Adam([image], lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        terms = objective.terms(net.ctx(image))
        loss = sum(terms.values())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


class _PreviousSortMatching(torch.autograd.Function):
    """The implementation before rank_residual (sorted layout, scatter in the backward), kept
    as the reference the fast one must reproduce."""

    @staticmethod
    def forward(ctx, x, ref):
        order = x.detach().sort(dim=-1, stable=True).indices
        diff = x.gather(-1, order) - ref
        ctx.save_for_backward(order, diff)
        return diff.pow(2).mean()

    @staticmethod
    def backward(ctx, grad):
        order, diff = ctx.saved_tensors
        grad_sorted = diff * (grad * (2.0 / diff.numel()))
        return torch.empty_like(grad_sorted).scatter_(-1, order, grad_sorted), None


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_rank_residual_equals_the_previous_sort_matching(threads, monkeypatch):
    """Rows sorted in parallel chunks: the same order and gradient, bit for bit, and the same
    loss up to summation order, on 112 x 112-like rows with ReLU ties and a batch of 2."""
    monkeypatch.setattr(L, "PARALLEL_MIN_VALUES", 1)   # threads even on small test tensors
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = _gen(21)
    x = torch.randn(2, 7, 3000, generator=g).clamp_min(0)            # many exact ties (zeros)
    x[1, 3] = torch.randint(-2, 3, (3000,), generator=g).float()
    ref = torch.randn(7, 3000, generator=g).sort(-1).values
    torch.testing.assert_close(L.sort_order(x), x.sort(dim=-1, stable=True).indices,
                               rtol=0, atol=0)
    fast, old = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = L.sort_matching(fast, ref)
    expected = _PreviousSortMatching.apply(old, ref)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    (3 * loss).backward()
    (3 * expected).backward()
    torch.testing.assert_close(fast.grad, old.grad, rtol=0, atol=0)
    where = torch.empty_like(x).scatter_(-1, L.sort_order(x), ref.expand_as(x))
    torch.testing.assert_close(L.rank_residual(x, ref), x - where, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_q16_keys_rank_the_quantised_values_and_fall_back_when_they_cannot(threads,
                                                                           monkeypatch):
    """``keys="q16"`` equals a stable sort of each row's values quantised by hand to 16 bits
    of the row's range (slow reference); rows with NaN, longer rows than 16 bits of positions
    and non-float32 input rank exactly; the loss is within the quantisation of the exact one."""
    monkeypatch.setattr(L, "PARALLEL_MIN_VALUES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = _gen(22)
    x = torch.randn(2, 5, 3000, generator=g).clamp_min(0) * torch.rand(1, 5, 1, generator=g)
    x[0, 1] = 7.0                                                    # a constant row
    x[1, 2, :10] = torch.tensor([1.0, 1.0 + 1e-7, 1.0 - 1e-7] + [0.5] * 7)   # near-ties
    ref = torch.randn(5, 3000, generator=g).sort(-1).values
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)      # float32 as the fast path
    span = (hi - lo).clamp_min(1e-30)
    q = ((x - lo) * (torch.full_like(span, 65535.0) / span)).floor().clamp(max=65535)
    order = q.sort(dim=-1, stable=True).indices
    where = torch.empty_like(x).scatter_(-1, order, ref.expand_as(x))
    torch.testing.assert_close(L.rank_residual(x, ref, "q16"), x - where, rtol=0, atol=0)
    exact = L.sort_matching(x, ref)
    assert L.sort_matching(x, ref, "q16") == pytest.approx(exact.item(), rel=1e-3)
    nan = x.clone()
    nan[0, 0, 5] = float("nan")
    got, want = L.rank_residual(nan, ref, "q16"), L.rank_residual(nan, ref)
    torch.testing.assert_close(got[0, 0], want[0, 0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[0, 1:], (x - where)[0, 1:], rtol=0, atol=0)   # the others
    long_x = torch.randn(1, 2, 70000, generator=g)
    long_ref = torch.randn(2, 70000, generator=g).sort(-1).values
    torch.testing.assert_close(L.rank_residual(long_x, long_ref, "q16"),
                               L.rank_residual(long_x, long_ref), rtol=0, atol=0)
    torch.testing.assert_close(L.rank_residual(x.double(), ref.double(), "q16"),
                               L.rank_residual(x.double(), ref.double()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="sort keys must be one of"):
        L.rank_residual(x, ref, "q8")


def test_sort_matching_on_random_positions_is_an_option():
    """``positions`` matches a random subset per step against the resampled quantiles; 0 or a
    subset as large as the map is the full loss."""
    g = _gen(31)
    x = torch.randn(1, 3, 400, generator=g, requires_grad=True)
    refs = {32: {"a": torch.randn(3, 400, generator=g).sort(-1).values}}
    ctx = {"features": {"a": x}, "size": 32}
    full = L.staged_sort_matching(refs, {"a": 1.0})(ctx)
    assert L.staged_sort_matching(refs, {"a": 1.0}, positions=400)(ctx) == full
    sub = L.staged_sort_matching(refs, {"a": 1.0}, positions=50,
                                 generator=torch.Generator().manual_seed(5))(ctx)
    index = torch.randperm(400, generator=torch.Generator().manual_seed(5))[:50]
    torch.testing.assert_close(sub, L.sort_matching(x[..., index], refs[32]["a"]))
    sub.backward()
    assert (x.grad != 0).sum(-1).tolist() == [[50, 50, 50]]
