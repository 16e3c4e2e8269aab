"""How much memory an optimisation step needs at a given image size, estimated from the model's
layer shapes before anything runs, so that an impossible ``--size`` is refused up front instead
of running out of memory after the model and the references have loaded."""
from __future__ import annotations

import math
import os
import warnings

import torch

from vital.config import ConfigError

# float32 activations, each kept for the backward pass and matched by a gradient of its size
_BYTES_PER_VALUE = 4 * 2
_WARN_FRACTION = 0.5   # warn when the estimate is above this share of the free memory


def step_bytes(target, size: int, batch: int = 1) -> int:
    """Rough bytes of one forward + backward at ``size`` px for ``batch`` images: every listed
    layer's output at the model's input size, scaled by the pixel count (attention maps,
    layout BHLL, by its square: they are positions x positions). An upper bound (nested modules
    are counted with their parents)."""
    scale = (size / target.input_size) ** 2
    values = sum(math.prod(info.shape) * (scale ** 2 if info.layout == "BHLL" else scale)
                 for info in target.layers())
    return int(values * batch * _BYTES_PER_VALUE)


def free_bytes(device) -> int | None:
    """Free memory on ``device`` (CUDA: the driver's count; CPU: MemAvailable), or None."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(target, size: int, batch: int = 1, free: int | None = None,
                 what: str = "--batch") -> int:
    """Refuse (ConfigError) a size whose estimated step memory exceeds the free memory; warn
    above half of it. ``what`` names the option that sets ``batch``. Returns the estimate in
    bytes."""
    need = step_bytes(target, size, batch)
    free = free_bytes(target.device) if free is None else free
    if free is None:
        return need
    gb = lambda n: f"{n / 2 ** 30:.1f} GB"
    said = (f"--size {size} with {what} {batch} needs about {gb(need)} for {target.spec} "
            f"(estimated from its layer shapes); {gb(free)} are free on {target.device}")
    if need > free:
        raise ConfigError(f"{said}: use a smaller --size or {what}")
    if need > _WARN_FRACTION * free:
        warnings.warn(f"{said}: the run may run out of memory", stacklevel=2)
    return need
