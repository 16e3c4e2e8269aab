"""The render loop: loss falls, schedule, NaN naming, Ctrl-C keeps the image, alpha map."""
import math

import pytest
import torch

from vital.optvis import losses
from vital.optvis import param
from vital.optvis.render import Schedule, render


def _objective(index=3):
    return losses.class_logprob_objective(index) + 0.01 * losses.tv_objective()


def test_loss_falls_and_records(tiny_cnn_target):
    gen = torch.Generator().manual_seed(0)
    p = param.make_param("laplacian", size=32, generator=gen)
    saved = []
    result = render(tiny_cnn_target, _objective(), p, Schedule((30,), lr=0.1, warmup=2),
                    ["stage1"], generator=gen, save_steps=10,
                    callback=lambda s, im, rec: saved.append((s, rec)), progress=False)
    assert result.stopped is None and result.steps_done == 30
    assert [s for s, _ in saved] == [10, 20, 30]
    first, last = saved[0][1]["terms"]["class:3"], saved[-1][1]["terms"]["class:3"]
    assert last < first
    assert result.image.shape == (1, 3, 32, 32) and 0 <= result.image.min() <= result.image.max() <= 1
    assert result.alpha.shape == (1, 32, 32) and math.isclose(result.alpha.max().item(), 1.0)


def test_schedule_stages_and_lr():
    s = Schedule((10, 20, 30), lr=1.0, warmup=5, min_lr_frac=0.1)
    assert s.stage_sizes(224) == [56, 112, 224] and s.total == 60
    assert s.lr_at(0, 30) == pytest.approx(0.2) and s.lr_at(4, 30) == pytest.approx(1.0)
    assert s.lr_at(5, 30) == pytest.approx(1.0) and s.lr_at(30, 30) == pytest.approx(0.1)


def test_nan_stops_names_the_term_and_keeps_last_good_image(tiny_cnn_target):
    calls = {"n": 0}

    def blow_up(ctx):
        calls["n"] += 1
        return ctx["image"].mean() * (float("nan") if calls["n"] > 3 else 1.0)
    obj = losses.Objective(blow_up, "exploder") + 0.1 * losses.tv_objective()
    p = param.make_param("pixel", size=32, generator=torch.Generator().manual_seed(0))
    result = render(tiny_cnn_target, obj, p, Schedule((10,), warmup=1), ["stem"], progress=False)
    assert result.stopped.startswith("nan") and "'exploder'" in result.stopped
    assert result.steps_done == 3 and torch.isfinite(result.image).all()


def test_ctrl_c_keeps_what_exists(tiny_cnn_target):
    calls = {"n": 0}

    def interrupt(ctx):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return ctx["image"].mean()
    p = param.make_param("laplacian", size=32, generator=torch.Generator().manual_seed(0))
    result = render(tiny_cnn_target, losses.Objective(interrupt, "x"), p, Schedule((10,), warmup=1),
                    ["stem"], progress=False)
    assert result.stopped == "interrupted" and result.steps_done == 4
    assert result.image.shape == (1, 3, 32, 32)


def test_adam_eps_damps_steps_where_the_gradient_is_tiny(tiny_cnn_target):
    """A near-zero objective: Adam's normalisation turns it into lr-sized steps (grain) unless
    epsilon is large compared with the gradient."""
    def change(eps):
        gen = torch.Generator().manual_seed(0)
        p = param.make_param("laplacian", size=32, generator=gen)
        start = p[1]().detach().clone()
        result = render(tiny_cnn_target, 1e-7 * _objective(), p,
                        Schedule((20,), lr=0.05, warmup=1, eps=eps), [], generator=gen,
                        save_steps=0, progress=False)
        return (result.image - start).abs().mean().item()
    assert change(1e-8) > 10 * change(1e-3)


def _stall_slowly(losses_seen: list[float], fraction: float, window: int) -> int | None:
    """The obviously correct reference: the first step (1-based) at a window boundary, after
    two full windows, where the last window's mean fell by less than fraction x |previous|."""
    for end in range(2 * window, len(losses_seen) + 1):
        if end % window == 0 and end < len(losses_seen):
            before = sum(losses_seen[end - 2 * window:end - window]) / window
            now = sum(losses_seen[end - window:end]) / window
            if before - now < fraction * abs(before):
                return end
    return None


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.3])
def test_early_stop_ends_the_last_stage_where_the_loss_stalls(tiny_cnn_target, fraction):
    """A loss that flattens: the run ends where the reference says (never with 0), in the last
    stage only, and the result says at which step; the image is the final one, not a stop."""
    seen = []

    def flattening(ctx):
        value = ctx["image"].mean() * 0 + 1.0 / (1 + ctx["step"])   # falls fast, then slowly
        if ctx["stage"] == 1:
            seen.append(float(value))
        return value
    schedule = Schedule((20, 60), lr=0.05, warmup=1, early_stop=fraction, early_window=5)
    p = param.make_param("pixel", size=32, generator=torch.Generator().manual_seed(0))
    result = render(tiny_cnn_target, losses.Objective(flattening, "f"), p, schedule, ["stem"],
                    progress=False)
    full = [1.0 / (1 + step) for step in range(20, 80)]
    expected = _stall_slowly(full, fraction, 5) if fraction > 0 else None
    assert result.stopped is None
    assert result.early_stopped == (None if expected is None else 20 + expected)
    assert result.steps_done == (80 if expected is None else 20 + expected)
    assert seen == pytest.approx(full[:len(seen)]) and len(seen) == result.steps_done - 20
    if fraction == 0.3:
        assert expected is not None and expected < 60   # the case that must stop early


def test_early_stop_is_recorded_in_metrics_json(tmp_path, ref_folder):
    """A class run with --early_stop writes the step it stopped at; without, no such key."""
    import json
    from helpers import TINY_CNN
    from vital.modes.class_mode import ClassCFG, run_class
    base = dict(model=TINY_CNN, target="class3", ref_dir=str(ref_folder), size=32, steps=60,
                save_steps=0, out_dir=str(tmp_path), progress=False, device="cpu",
                early_window=5)
    run_dir, result = run_class(ClassCFG(**base, early_stop=0.9, run_name="early"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result.early_stopped == metrics["early_stopped"] == result.steps_done < 60
    assert metrics["status"] == "finished"
    run_dir, result = run_class(ClassCFG(**base, run_name="full"))
    assert "early_stopped" not in json.loads((run_dir / "metrics.json").read_text())
    assert result.steps_done == 60


@pytest.mark.parametrize("betas, eps", [((0.5, 0.99), 1e-8), ((0.9, 0.999), 1e-3)])
def test_adam_takes_torch_adams_steps(betas, eps):
    """The render's Adam against torch.optim.Adam (single-tensor path) on two parameters, one
    without a gradient at some steps, with the learning rate changed between steps."""
    from vital.optvis.render import Adam
    g = torch.Generator().manual_seed(5)
    start = [torch.randn(3, 8, 8, generator=g), torch.randn(5, generator=g)]
    ours = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    mine = Adam(ours, lr=0.05, betas=betas, eps=eps)
    ref = torch.optim.Adam(theirs, lr=0.05, betas=betas, eps=eps, foreach=False)
    for step in range(25):
        lr = 0.05 * (1 + math.cos(step / 25 * math.pi)) / 2 + 1e-3
        for opt in (mine, ref):
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
        for params in (ours, theirs):
            loss = (params[0].sin() ** 2).sum() + (0 if step % 3 == 1 else params[1].pow(3).sum())
            loss.backward()
        mine.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], start[0])
