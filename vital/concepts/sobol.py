"""Sobol total-order indices with the Jansen estimator over a quasi-Monte-Carlo design, as
CRAFT (Fel et al. 2023) uses them to rank concepts.

Design: two independent QMC matrices A and B of ``n`` points in [0, 1]^d, and for every input
i a matrix C_i = A with column i taken from B. The model is evaluated at all
``n * (d + 2)`` rows (A, B, C_1 ... C_d, in that order). Jansen (1999):

    ST_i = sum_j (f(A)_j - f(C_i)_j)^2 / (2 n Var f(A))

ST_i is the share of the output's variance that involves input i (alone or with others).
"""
from __future__ import annotations

import math

import torch

_EPS = 1e-12


def design(dim: int, n: int, seed: int = 0) -> torch.Tensor:
    """The rows [A; B; C_1; ...; C_dim] as a (n * (dim + 2), dim) float tensor in [0, 1].

    A and B are the two halves of a Sobol sequence in 2 * dim dimensions (scipy's
    ``qmc.Sobol``, Owen-scrambled with ``seed``: unscrambled, the first points have all
    coordinates equal, so for small ``n`` A and B coincide); ``n`` must be a power of two (the
    sequence is balanced only then).
    """
    from scipy.stats import qmc
    if dim < 1:
        raise ValueError(f"a Sobol design needs dim >= 1, got {dim}")
    if n < 2 or n & (n - 1):
        raise ValueError(f"the number of Sobol designs must be a power of two >= 2, got {n}")
    points = qmc.Sobol(2 * dim, scramble=True, seed=seed).random_base2(int(math.log2(n)))
    ab = torch.as_tensor(points, dtype=torch.float32)        # (n, 2 * dim)
    a, b = ab[:, :dim], ab[:, dim:]
    swap = torch.eye(dim, dtype=torch.bool)[:, None, :]      # (dim, 1, dim): column i of C_i
    c = torch.where(swap, b[None], a[None])                  # (dim, n, dim)
    return torch.cat([a, b, c.reshape(dim * n, dim)])        # (dim, n, d) -> (dim * n, d)


def jansen_total(outputs: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Total-order indices (dim,) from the outputs (n * (dim + 2),) at the rows of ``design``."""
    outputs = outputs.reshape(-1).double()
    if outputs.numel() != n * (dim + 2):
        raise ValueError(f"expected {n * (dim + 2)} outputs for n={n}, dim={dim}, "
                         f"got {outputs.numel()}")
    f_a = outputs[:n]
    f_c = outputs[2 * n:].reshape(dim, n)                    # (dim * n,) -> (dim, n)
    var = f_a.var(unbiased=True).clamp_min(_EPS)
    return ((f_a[None] - f_c).pow(2).sum(1) / (2 * n * var)).float()
