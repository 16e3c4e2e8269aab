"""--precision bf16: the model's forward runs under bfloat16 autocast, the features and every
loss term stay float32, and a short render lands close to the fp32 one."""
import pytest
import torch

from vital.optvis import losses
from vital.optvis import param
from vital.optvis.render import Schedule, render


def _render(target, precision, seen):
    gen = torch.Generator().manual_seed(0)
    ref = torch.linspace(-1, 1, 64).expand(16, 64).contiguous()   # (C, Q) ascending

    def spy(ctx):
        seen.append((ctx["features"]["stage1"].dtype, ctx["output"].dtype))
        return losses.sort_matching(ctx["features"]["stage1"], ref)
    objective = losses.Objective(spy, "sort:stage1") + losses.class_logprob_objective(3)
    return render(target, objective, param.make_param("laplacian", size=32, generator=gen),
                  Schedule((6,), lr=0.05, warmup=1), ["stage1"], generator=gen, save_steps=0,
                  progress=False, precision=precision)


def test_bf16_forward_keeps_fp32_terms_and_lands_near_fp32(tiny_cnn_target):
    fp32_seen, bf16_seen = [], []
    a = _render(tiny_cnn_target, "fp32", fp32_seen)
    b = _render(tiny_cnn_target, "bf16", bf16_seen)
    assert a.stopped is None and b.stopped is None and b.steps_done == 6
    assert set(fp32_seen) == set(bf16_seen) == {(torch.float32, torch.float32)}
    assert b.image.dtype == torch.float32
    assert not torch.equal(a.image, b.image)                    # bf16 did run
    assert (a.image - b.image).abs().mean() < 0.02              # ... and stays close


def test_unknown_precision_is_refused(tiny_cnn_target):
    with pytest.raises(ValueError, match="valid: fp32, bf16"):
        _render(tiny_cnn_target, "fp16", [])
