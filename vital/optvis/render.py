"""The optimisation loop: multi-resolution schedule, Adam with warm-up and cosine decay,
the transparency map, NaN detection and Ctrl-C handling.

The loop knows nothing about files or the terminal beyond a progress bar: every ``save_steps``
it hands the current image and record to a callback (see ``vital.modes.outputs.RunWriter``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vital.models import channels_positions


@dataclass
class Schedule:
    """Steps per resolution stage, low to high: (400, 1200) = 400 at half size, 1200 at full."""
    steps_multires: tuple[int, ...] = (400, 1200)
    lr: float = 0.05          # peak Adam learning rate
    warmup: int = 50          # linear warm-up steps at the start of each stage
    min_lr_frac: float = 0.05  # cosine decay ends at lr * min_lr_frac
    betas: tuple[float, float] = (0.5, 0.99)
    eps: float = 1e-8         # Adam epsilon; larger values damp steps where gradients are tiny
    size_multiple: int = 1    # every stage size is a multiple of this (a ViT's patch size)
    early_stop: float = 0.0   # > 0: the last stage ends when a window improved less than this
    early_window: int = 40    # steps per window of early_stop

    def stalled(self, losses: list[float]) -> bool:
        """Whether the last stage may end now: ``early_stop`` > 0, at a window boundary, and
        the mean loss of the last ``early_window`` steps fell by less than ``early_stop`` times
        the previous window's (absolute) mean. Losses are noisy (augmentation), hence means."""
        w = int(self.early_window)
        if not self.early_stop > 0 or len(losses) < 2 * w or len(losses) % w:
            return False
        before = sum(losses[-2 * w:-w]) / w
        now = sum(losses[-w:]) / w
        return before - now < self.early_stop * abs(before)

    def stage_sizes(self, size: int) -> list[int]:
        """Px per stage: halving from ``size`` (the last stage), at least 16, each rounded to
        the nearest multiple of ``size_multiple`` (halves round up)."""
        k, m = len(self.steps_multires), max(1, int(self.size_multiple))
        sizes = [max(16, size // 2 ** (k - 1 - i)) for i in range(k)]
        return [max(m, int(s / m + 0.5) * m) for s in sizes[:-1]] + [sizes[-1]]

    @property
    def total(self) -> int:
        return int(sum(self.steps_multires))

    def lr_at(self, t: int, n: int) -> float:
        """Learning rate at step ``t`` of a stage of ``n`` steps."""
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        progress = (t - self.warmup) / max(1, n - self.warmup)
        low = self.lr * self.min_lr_frac
        return low + 0.5 * (self.lr - low) * (1 + math.cos(math.pi * progress))


@dataclass
class RenderResult:
    image: torch.Tensor              # (B, 3, H, W) in [0, 1], last good image
    alpha: torch.Tensor              # (B, H, W) accumulated |gradient|, normalised to [0, 1]
    history: list[dict] = field(default_factory=list)   # one record per save step
    steps_done: int = 0
    stopped: str | None = None       # None, "interrupted", "terminated (SIGTERM...)", "stopped"
                                     # (should_stop) or "nan: <term>"
    step_seconds: float = 0.0        # optimisation time per step, without save steps / callbacks
    early_stopped: int | None = None  # the step at which --early_stop ended the last stage


def ends_the_loop(stopped: str | None) -> bool:
    """The one stop rule of every loop over runs, batches, layers or sweeps: after a run that
    stopped by Ctrl-C ("interrupted"), SIGTERM ("terminated ...") or a stop request
    ("stopped"), nothing further starts; a run that ended normally (None) or on a non-finite
    loss ("nan: ...", that run's own failure, recorded) lets the next one go on."""
    return bool(stopped) and not stopped.startswith("nan")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the term."""


class _StopRequested(Exception):
    """``should_stop()`` said yes: end the run like Ctrl-C, keeping what exists."""


def _first_bad_term(terms: dict[str, torch.Tensor]) -> str:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            return name
    return "total"


def _step_features(target, feats: dict, layouts: dict) -> dict[str, torch.Tensor]:
    # float32 whatever the forward's precision: sort matching and the terms stay in fp32
    return {name: channels_positions(t, layouts[name]).float() for name, t in feats.items()}


PRECISIONS = ("fp32", "bf16")


def _autocast(device: torch.device, precision: str):
    """The model's forward in ``precision``: fp32 as is, bf16 under autocast (CPU and CUDA)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def downsample(image: torch.Tensor, size: int) -> torch.Tensor:
    """An image at a low-resolution stage's size: antialiased bilinear. Its gradient spreads
    smoothly over neighbouring pixels; "area" pooling (used before) sends every full-size
    pixel of a 2 x 2 block the same gradient, so the low-resolution stage grew block-constant
    2 x 2 tiles in the full-size parameters that later stages left in flat regions (the
    stair-stepped tiles seen on class images)."""
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


@contextlib.contextmanager
def _embedding(target, wanted: bool):
    """``target.embed_hook()`` when the embedding is wanted, else an unused dict."""
    if not wanted:
        yield {}
        return
    with target.embed_hook() as grabbed:
        yield grabbed


class Adam:
    """Adam (Kingma & Ba), step for step the update of ``torch.optim.Adam(params, lr, betas,
    eps)`` without weight decay or amsgrad (its single-tensor path; tests compare the two).
    Written out because torch.optim's first optimizer imports torch._dynamo: about 2 s of every
    run's start-up on CPU, 10 % of a class picture. ``param_groups[0]["lr"]`` is read at every
    step, as the schedule sets it."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [{"params": list(params), "lr": lr}]
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        lr = self.param_groups[0]["lr"]
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            state = self.state.get(p)
            if state is None:
                state = self.state[p] = {"step": 0, "m": torch.zeros_like(p),
                                         "v": torch.zeros_like(p)}
            state["step"] += 1
            t, m, v, grad = state["step"], state["m"], state["v"], p.grad
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def folded_for_render(target, layers):
    """Batch norms folded into their convolutions for the render (the same function, less
    work per step: ``TargetModel.batchnorm_folded``); the hooked layers stay as they are."""
    fold = getattr(target, "batchnorm_folded", None)
    return fold(keep=layers) if fold is not None else contextlib.nullcontext()


def render(target, objective, param, schedule: Schedule, layers: list[str],
           augment: Callable | None = None, generator: torch.Generator | None = None,
           save_steps: int = 200, callback: Callable | None = None,
           progress: bool = True, record_fn: Callable | None = None,
           on_progress: Callable | None = None, progress_every: int = 5,
           should_stop: Callable[[], bool] | None = None, embed: bool = False,
           precision: str = "fp32") -> RenderResult:
    """Optimise ``param`` = (params, image_fn) so that ``objective`` falls.

    ``objective.terms(ctx)`` returns the named, already weighted loss terms; their sum is the
    loss. ``ctx`` holds "image" (full size, [0,1]), "input" (what the model saw), "features"
    ({layer: (B, C, P)}), "output", "stage", "size" and "step". ``callback(step, image, record)``
    runs every ``save_steps`` and at the end; ``record_fn(image)`` may add fields (e.g. the model's
    opinion) to those records. ``on_progress(step, total, loss, image)`` (optional) runs after
    step 1, every ``progress_every`` steps and after the last; ``should_stop()`` (optional) is
    asked before every step and ends the run like Ctrl-C (``stopped = "stopped"``). Neither
    touches a random generator, so they never change the result. With ``embed`` the context
    also holds "embed": the model's embedding of the step's input (``TargetModel.embed``), read
    during the same forward. ``precision`` "bf16" runs the model's forward under bfloat16
    autocast; features, output and every loss term stay float32.
    """
    import time
    params, image_fn = param
    after_step = getattr(image_fn, "after_step", None)
    layouts = {info.name: info.layout for info in target.layers()}
    size = image_fn().shape[-1]
    sizes = schedule.stage_sizes(size)
    with torch.no_grad():
        last_good = image_fn().detach().clone()
    alpha = torch.zeros(last_good.shape[0], *last_good.shape[-2:], device=last_good.device)
    result = RenderResult(image=last_good, alpha=alpha)
    bar = tqdm(total=schedule.total, desc="render", disable=not progress, dynamic_ncols=True)
    step, started, outside = 0, time.perf_counter(), 0.0
    try:
        with folded_for_render(target, layers), target.hooks(layers) as feats, \
                _embedding(target, embed) as grabbed:
            for stage, (n_steps, stage_size) in enumerate(zip(schedule.steps_multires, sizes)):
                optimizer = Adam(params, lr=schedule.lr, betas=schedule.betas,
                                 eps=schedule.eps)
                last_stage, losses = stage == len(sizes) - 1, []
                for t in range(n_steps):
                    if should_stop is not None and should_stop():
                        raise _StopRequested
                    for group in optimizer.param_groups:
                        group["lr"] = schedule.lr_at(t, n_steps)
                    optimizer.zero_grad(set_to_none=True)
                    image = image_fn()
                    image.retain_grad()
                    x = image if stage_size == size else downsample(image, stage_size)
                    if augment is not None:
                        x = augment(x, generator)
                    with _autocast(x.device, precision):
                        output = target(x).float()
                    ctx = {"image": image, "input": x, "output": output, "stage": stage,
                           "size": stage_size, "step": step,
                           "features": _step_features(target, feats, layouts)}
                    if embed:
                        ctx["embed"] = grabbed.get("embed", output).float()
                    terms = objective.terms(ctx)
                    loss = sum(terms.values())
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"loss became non-finite at step {step} in term "
                                            f"{_first_bad_term(terms)!r}")
                    loss.backward()
                    alpha += image.grad.detach().abs().sum(1)
                    optimizer.step()
                    if after_step is not None:
                        after_step()   # e.g. pixel_norm's clipping to the valid range
                    result.image = image.detach()
                    step += 1
                    bar.update(1)
                    if step % 10 == 0 or step == 1:
                        bar.set_postfix(loss=f"{loss.item():.4g}", size=stage_size)
                    aside = time.perf_counter()
                    if save_steps and step % save_steps == 0:
                        _save(result, step, terms, callback, record_fn, bar)
                    if on_progress is not None and (step == 1 or step == schedule.total
                                                    or step % max(1, progress_every) == 0):
                        on_progress(step, schedule.total, loss.item(), result.image)
                    outside += time.perf_counter() - aside
                    if last_stage and schedule.early_stop > 0:
                        losses.append(loss.item())
                        if t + 1 < n_steps and schedule.stalled(losses):
                            result.early_stopped = step
                            break
    except KeyboardInterrupt as err:   # Ctrl-C, or SIGTERM as vital.cli.Terminated
        result.stopped = getattr(err, "stopped_as", "interrupted")
    except _StopRequested:
        result.stopped = "stopped"
    except NonFiniteLoss as err:
        result.stopped = f"nan: {err}"
    finally:
        bar.close()
    result.steps_done = step
    result.step_seconds = (time.perf_counter() - started - outside) / max(1, step)
    with torch.no_grad():
        final = image_fn().detach()
        if result.stopped is None and torch.isfinite(final).all():
            result.image = final
    peak = alpha.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    result.alpha = (alpha / peak).clamp(0, 1)
    return result


def _save(result: RenderResult, step: int, terms: dict, callback, record_fn, bar) -> None:
    record = {"step": step, "loss": float(sum(v.item() for v in terms.values())),
              "terms": {k: float(v.item()) for k, v in terms.items()}}
    if record_fn is not None:
        with torch.no_grad():
            record.update(record_fn(result.image))
    result.history.append(record)
    if callback is not None:
        callback(step, result.image, record)
    if record.get("opinion_text"):
        bar.write(f"step {step}: loss {record['loss']:.4g} | {record['opinion_text']}")
