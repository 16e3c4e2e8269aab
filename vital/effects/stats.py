"""Running statistics of per-neuron effects over a stream of images, and the per-neuron PCA.

Memory does not grow with the effects: per neuron we keep its mean (pass 1), the centred norm
of every image (4 bytes per image and neuron), and the k images with the largest centred norm
with their centred effect vectors ((N, k, E) floats: 3072 x 100 x 512 x 4 B = 629 MB for a
ViT-B layer with the official k = 100).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MeanTracker", "TopTracker", "NeuronSummary", "first_component", "summarise"]


class MeanTracker:
    """Sum and count of (B, n, E) effects per neuron, in float64."""

    def __init__(self, neurons: int, dim: int):
        self.total = torch.zeros(neurons, dim, dtype=torch.float64)
        self.count = 0

    def update(self, part: slice, effects: torch.Tensor) -> None:
        self.total[part] += effects.double().sum(0).cpu()

    def step(self, batch: int) -> None:
        self.count += batch

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no image was read, so there is no mean effect")
        return (self.total / self.count).float()


class TopTracker:
    """Per neuron: the centred norm of every image seen, and the k largest with their vectors."""

    def __init__(self, neurons: int, k: int, dim: int):
        self.k = k
        self.values = torch.full((neurons, k), float("-inf"))
        self.index = torch.full((neurons, k), -1, dtype=torch.long)
        self.vectors = torch.zeros(neurons, k, dim)
        self.norm_parts: list[torch.Tensor] = []   # one (B, N) block per image batch
        self._batch: torch.Tensor | None = None

    def start_batch(self, batch: int, neurons: int) -> None:
        self._batch = torch.zeros(batch, neurons)

    def update(self, part: slice, centred: torch.Tensor, offset: int) -> None:
        """``centred`` (B, n, E): effects minus the neuron means; images offset.. offset+B-1."""
        centred = centred.float().cpu()
        norms = centred.norm(dim=-1)                                          # (B, n)
        self._batch[:, part] = norms
        b = norms.shape[0]
        values = torch.cat([self.values[part], norms.t()], 1)                 # (n, k+B)
        index = torch.cat([self.index[part],
                           torch.arange(offset, offset + b).expand(values.shape[0], b)], 1)
        vectors = torch.cat([self.vectors[part], centred.transpose(0, 1)], 1)  # (n, k+B, E)
        top = values.topk(self.k, dim=1)
        self.values[part] = top.values
        self.index[part] = index.gather(1, top.indices)
        self.vectors[part] = vectors.gather(1, top.indices[..., None].expand(-1, -1,
                                                                             vectors.shape[-1]))

    def end_batch(self) -> None:
        self.norm_parts.append(self._batch)
        self._batch = None

    def norms(self) -> torch.Tensor:
        """(images, N) centred norms."""
        return torch.cat(self.norm_parts) if self.norm_parts else torch.zeros(0, 0)


def first_component(vectors: torch.Tensor) -> tuple[torch.Tensor, float]:
    """First right singular vector of the (k, E) centred effects and the share of their
    squared norm it explains; signed so that most of them project positively (official)."""
    vectors = vectors.double()
    _, s, vh = torch.linalg.svd(vectors, full_matrices=False)
    direction = vh[0]
    if int((vectors @ direction > 0).sum()) <= vectors.shape[0] // 2:
        direction = -direction
    power = float((s ** 2).sum())
    return direction.float(), float(s[0] ** 2) / power if power > 0 else 0.0


@dataclass
class NeuronSummary:
    neuron: int
    component: torch.Tensor     # (E,) unit
    explained: float            # variance of the top-k centred effects along the component
    significant: float          # fraction of images whose centred norm reaches the k-th largest
    top_norm_mean: float        # mean centred norm of the top-k images (the ranking)
    top_share: float            # share of the summed squared norms held by the top-k images
    norm_median: float
    norm_p99: float
    norm_max: float
    top_images: list[int]       # image indices, largest norm first


def summarise(neurons: torch.Tensor, top: TopTracker) -> list[NeuronSummary]:
    """PCA and norm distribution of every neuron (see module docstring)."""
    norms = top.norms()                                                       # (I, N)
    out = []
    for j, neuron in enumerate(neurons.tolist()):
        valid = top.index[j] >= 0
        vectors, values = top.vectors[j][valid], top.values[j][valid]
        component, explained = first_component(vectors)
        column = norms[:, j]
        threshold = float(values.min())
        squares = float((column ** 2).sum())
        out.append(NeuronSummary(
            neuron=neuron, component=component, explained=explained,
            significant=float((column >= threshold).float().mean()),
            top_norm_mean=float(values.mean()),
            top_share=float((values ** 2).sum()) / squares if squares > 0 else 0.0,
            norm_median=float(column.median()), norm_p99=float(column.quantile(0.99)),
            norm_max=float(column.max()), top_images=top.index[j][valid].tolist()))
    return out
