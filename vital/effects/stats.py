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
        """``centred`` (B, n, E): effects minus the neuron means; images offset.. offset+B-1.
        Only the vectors of images that enter a neuron's top k are copied (into the slots of
        the ones they push out), so a batch costs O(entries) rather than O(n k E)."""
        centred = centred.float().cpu()
        norms = centred.norm(dim=-1)                                          # (B, n)
        self._batch[:, part] = norms
        values = self.values[part]                                            # (n, k) view
        joint = torch.cat([values, norms.t()], 1)                             # (n, k+B)
        chosen = torch.zeros_like(joint, dtype=torch.bool)
        chosen.scatter_(1, joint.topk(self.k, dim=1).indices, True)
        # evicted slots and entering images pair up row by row (nonzero is row-major, and a
        # row has as many of each)
        out_rows, out_slots = (~chosen[:, :self.k]).nonzero(as_tuple=True)
        in_rows, in_images = chosen[:, self.k:].nonzero(as_tuple=True)
        values[out_rows, out_slots] = norms.t()[in_rows, in_images]
        self.index[part][out_rows, out_slots] = offset + in_images
        self.vectors[part][out_rows, out_slots] = centred.transpose(0, 1)[in_rows, in_images]

    def end_batch(self) -> None:
        self.norm_parts.append(self._batch)
        self._batch = None

    def ranked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, image index), each (N, k), largest first; index -1 = not filled."""
        order = self.values.argsort(dim=1, descending=True, stable=True)
        return self.values.gather(1, order), self.index.gather(1, order)

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
    top_norms: list[float]      # their centred norms


def _components(vectors: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``first_component`` over (n, k, E) with invalid rows zeroed: the top eigenvector
    of the (k, k) Gram matrix gives the first left singular vector u; v = V^T u / s."""
    v = vectors.double() * valid[..., None]
    gram = v @ v.transpose(1, 2)                                              # (n, k, k)
    evals, evecs = torch.linalg.eigh(gram)                                    # ascending
    u, power = evecs[..., -1], evals[..., -1].clamp_min(0)                    # (n, k), (n,)
    direction = (v.transpose(1, 2) @ u[..., None])[..., 0]                    # (n, E)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    positive = ((v @ direction[..., None])[..., 0] > 0) & valid                # (n, k)
    flip = positive.sum(1) <= valid.sum(1) // 2
    direction = torch.where(flip[:, None], -direction, direction)
    total = (v ** 2).sum((1, 2))
    explained = torch.where(total > 0, power / total.clamp_min(1e-300), torch.zeros_like(total))
    return direction.float(), explained.float()


def summarise(neurons: torch.Tensor, top: TopTracker, chunk: int = 256) -> list[NeuronSummary]:
    """PCA and norm distribution of every neuron (see module docstring)."""
    norms = top.norms()                                                       # (I, N)
    values, index = top.ranked()
    valid = index >= 0
    quantiles = norms.quantile(torch.tensor([0.5, 0.99]), dim=0)             # (2, N)
    threshold = torch.where(valid, values, torch.full_like(values, float("inf"))).min(1).values
    significant = (norms >= threshold[None]).float().mean(0)
    squares = (norms ** 2).sum(0)
    top_squares = torch.where(valid, values ** 2, torch.zeros_like(values)).sum(1)
    out = []
    for start in range(0, len(neurons), chunk):
        part = slice(start, start + chunk)
        comps, explained = _components(top.vectors[part], top.index[part] >= 0)
        for j in range(comps.shape[0]):
            i = start + j
            kept = valid[i]
            out.append(NeuronSummary(
                neuron=int(neurons[i]), component=comps[j], explained=float(explained[j]),
                significant=float(significant[i]), top_norm_mean=float(values[i][kept].mean()),
                top_share=float(top_squares[i] / squares[i]) if squares[i] > 0 else 0.0,
                norm_median=float(quantiles[0, i]), norm_p99=float(quantiles[1, i]),
                norm_max=float(norms[:, i].max()), top_images=index[i][kept].tolist(),
                top_norms=values[i][kept].tolist()))
    return out
