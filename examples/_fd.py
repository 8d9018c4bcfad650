"""Shared pieces of the finite-difference examples: sparse operators on the unit square with Dirichlet boundaries.

The unknowns are the values at the ``n x n`` interior points of a uniform grid on ``(0, 1)^2`` (spacing
``dx = 1 / (n + 1)``, zero on the boundary), flattened row-major into a vector of length ``d = n^2``, the last
dimension of the state. The operators are built as scipy sparse matrices (scipy's implicit solvers take them as
Jacobians) and handed to deis_ode as torch sparse CSR matrices: no dense ``(d, d)`` matrix is formed anywhere.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch


def grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The interior points ``(x, y)``, each of shape ``(n, n)`` (``x`` varies along the last axis)."""
    x = np.arange(1, n + 1) / (n + 1)
    return np.meshgrid(x, x)


def second_difference(n: int) -> sp.csr_matrix:
    """The 1-D Dirichlet second difference ``(u_{i-1} - 2 u_i + u_{i+1}) / dx^2`` on ``n`` interior points."""
    dx = 1.0 / (n + 1)
    return sp.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(n, n), format="csr") / dx**2


def upwind_first_difference(n: int, c: float) -> sp.csr_matrix:
    """``-c u_x`` by first-order upwinding (``c > 0``: backward differences), Dirichlet zero inflow."""
    dx = 1.0 / (n + 1)
    return sp.diags([c, -c], [-1, 0], shape=(n, n), format="csr") / dx


def laplacian_2d(n: int, coef: float = 1.0) -> sp.csr_matrix:
    """``coef`` times the 5-point Dirichlet Laplacian on the ``n x n`` interior points (symmetric, negative
    definite, ``||A|| ~ 8 coef (n + 1)^2``)."""
    lap = second_difference(n)
    eye = sp.identity(n, format="csr")
    return (coef * (sp.kron(eye, lap) + sp.kron(lap, eye))).tocsr()


def advection_diffusion_2d(n: int, diffusion: float, velocity: tuple[float, float]) -> sp.csr_matrix:
    """``diffusion * Laplacian - (v . grad)`` with upwind differences: a non-symmetric operator."""
    eye = sp.identity(n, format="csr")
    vx, vy = velocity
    advection = sp.kron(eye, upwind_first_difference(n, vx)) + sp.kron(upwind_first_difference(n, vy), eye)
    return (laplacian_2d(n, diffusion) + advection).tocsr()


def to_torch(matrix: sp.spmatrix, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A scipy sparse matrix as a torch sparse CSR tensor."""
    csr = sp.csr_matrix(matrix)
    csr.sort_indices()
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data).to(dtype),
            size=csr.shape,
            check_invariants=True,
        )
