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
