"""The stiff 1-D Dirichlet Fisher-KPP problem shared by the sparse and adaptive-Krylov tests."""

from __future__ import annotations

import math

import torch

F64 = torch.float64
D = 63


def laplacian(d: int = D, coef: float = 0.05) -> torch.Tensor:
    """``coef`` times the Dirichlet second difference on ``d`` interior points of (0, 1), sparse COO
    (``||A|| ~ 4 coef (d + 1)^2 ~ 800`` for ``d = 63``: stiff)."""
    dx = 1.0 / (d + 1)
    i = torch.arange(d)
    rows = torch.cat([i, i[1:], i[:-1]])
    cols = torch.cat([i, i[:-1], i[1:]])
    vals = torch.cat([torch.full((d,), -2.0), torch.ones(d - 1), torch.ones(d - 1)]).to(F64) * coef / dx**2
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (d, d), check_invariants=True).coalesce()


def initial(d: int = D) -> torch.Tensor:
    x = torch.linspace(0, 1, d + 2, dtype=F64)[1:-1]
    return torch.sin(math.pi * x) + 0.5 * torch.sin(2 * math.pi * x)


def fisher(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A smooth, time-dependent reaction term (Fisher-KPP), zero on the boundary values."""
    return u * (1 - u) * (1 + 0.5 * torch.cos(3 * t))
