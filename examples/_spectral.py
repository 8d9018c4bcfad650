"""Shared pieces of the stiff-PDE examples: Fourier pseudo-spectral problems in semi-linear form.

A periodic PDE ``u_t = L u + N(u)`` with a constant linear differential operator ``L`` becomes, on the
Fourier coefficients ``v`` of ``u``, the ODE

    dv/dt = diag(L_hat) v + N_hat(v),

with ``L_hat`` the Fourier symbol of ``L`` (a diagonal) and ``N_hat`` evaluated pseudo-spectrally
(transform to the grid, multiply there, transform back). For a real field the state is the half
spectrum of ``torch.fft.rfft`` (complex); for a complex field it is the full ``torch.fft.fft``.

:class:`SpectralProblem` bundles the :class:`deis_ode.SemiLinearODE` (what ``deis*``, ``dopri5`` and
``rk4`` integrate) with a numpy copy of the same right-hand side for scipy. scipy's ``solve_ivp`` wants
a real system, so :class:`PackedSystem` views the complex coefficients as interleaved real and
imaginary parts and offers the Jacobian of the linear part in the forms scipy's implicit methods take:
a sparse matrix (``BDF``, ``Radau``) and a banded array (``LSODA``).

The examples (``kuramoto_sivashinsky.py``, ``allen_cahn.py``, ``nls.py``, ``gray_scott.py``) and
``benchmarks/stiff.py`` import this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from deis_ode import SemiLinearODE

__all__ = ["PackedSystem", "SpectralProblem", "Timer", "relative_error", "rfft_wavenumbers", "fft_wavenumbers"]


def pyplot_or_exit():
    """matplotlib's ``pyplot`` on the file-only Agg backend, for ``--plot``; without matplotlib, exit with an
    install hint (called before the run, so a missing extra does not cost the whole integration)."""
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("--plot needs matplotlib: pip install deis_ode[bench]") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rfft_wavenumbers(n: int, length: float) -> np.ndarray:
    """Wavenumbers of ``rfft`` of ``n`` samples on a period ``length``: ``2 pi m / length``, ``m = 0 .. n/2``."""
    return 2.0 * math.pi / length * np.arange(n // 2 + 1, dtype=np.float64)


def fft_wavenumbers(n: int, length: float) -> np.ndarray:
    """Wavenumbers of ``fft`` of ``n`` samples on a period ``length``, in ``fftfreq`` order."""
    return 2.0 * math.pi / length * np.fft.fftfreq(n, d=1.0 / n)


@dataclass
class SpectralProblem:
    """One stiff semi-linear problem on Fourier coefficients.

    Attributes:
        name: short name (used in tables).
        ode: the :class:`~deis_ode.SemiLinearODE` on the complex128 coefficients.
        x0: the initial coefficients (complex128).
        t_end: the final time of the standard run (it starts at ``t = 0``).
        linear: the diagonal linear part ``L_hat`` as a numpy array of the state's shape.
        nonlinear_np: ``N_hat(v)`` in numpy (the same function as ``ode.nonlinear``, for scipy).
        physical: coefficients -> grid values (torch), for errors, invariants and plots.
        dense_jacobian: optional ``(t, y) -> J``, the exact Jacobian of the packed real system
            (:class:`PackedSystem`), where the system is small enough for a dense one.
        description: one line for printed headers.
    """

    name: str
    ode: SemiLinearODE
    x0: Tensor
    t_end: float
    linear: np.ndarray
    nonlinear_np: Callable[[np.ndarray], np.ndarray]
    physical: Callable[[Tensor], Tensor]
    dense_jacobian: Callable[[float, np.ndarray], np.ndarray] | None = None
    description: str = ""
    info: dict = field(default_factory=dict)

    @property
    def stiffness(self) -> float:
        """``max |L_hat|``."""
        return float(np.abs(self.linear).max())


def relative_error(problem: SpectralProblem, v: Tensor, v_ref: Tensor) -> float:
    """Relative 2-norm error of the grid values of ``v`` against those of ``v_ref``."""
    u, u_ref = problem.physical(v), problem.physical(v_ref)
    return float(torch.linalg.vector_norm(u - u_ref) / torch.linalg.vector_norm(u_ref))


def pack(v: np.ndarray) -> np.ndarray:
    """Complex coefficients as a flat real vector ``[re_0, im_0, re_1, im_1, ...]`` (a view when possible)."""
    return np.ascontiguousarray(v, dtype=np.complex128).reshape(-1).view(np.float64)


def unpack(y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`pack`."""
    return np.ascontiguousarray(y, dtype=np.float64).view(np.complex128).reshape(shape)


class PackedSystem:
    """The problem as the real system ``dy/dt = f(t, y)`` that scipy's ``solve_ivp`` integrates.

    ``y`` holds the interleaved real and imaginary parts of the coefficients (:func:`pack`). For
    ``v' = L v`` with ``L = a + i b`` each coefficient contributes the 2x2 block ``[[a, -b], [b, a]]``
    to the Jacobian of the linear part, which is therefore block diagonal (diagonal for real ``L``).
    """

    def __init__(self, problem: SpectralProblem) -> None:
        self.problem = problem
        self.shape = tuple(problem.x0.shape)
        self.linear = np.broadcast_to(problem.linear, self.shape).astype(np.complex128).reshape(-1)
        self.y0 = pack(problem.x0.numpy()).copy()
        self.evaluations = 0

    def rhs(self, t: float, y: np.ndarray) -> np.ndarray:
        self.evaluations += 1
        v = unpack(y, self.shape)
        return pack(self.linear.reshape(self.shape) * v + self.problem.nonlinear_np(v))

    def linear_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Main, upper and lower diagonals of the Jacobian of the linear part (length ``size``)."""
        a, b = self.linear.real, self.linear.imag
        main = np.repeat(a, 2)
        upper = np.zeros_like(main)  # J[2m, 2m + 1] = -b_m, stored at column 2m + 1
        lower = np.zeros_like(main)  # J[2m + 1, 2m] = b_m, stored at column 2m
        upper[1::2] = -b
        lower[0::2] = b
        return main, upper, lower

    @property
    def real_linear(self) -> bool:
        return not np.any(self.linear.imag)

    def sparse_linear_jacobian(self) -> scipy.sparse.csc_matrix:
        """``diag(L)`` of the packed system as a constant sparse matrix (for ``BDF`` and ``Radau``)."""
        main, upper, lower = self.linear_blocks()
        if self.real_linear:
            return scipy.sparse.diags(main, 0, format="csc")
        return scipy.sparse.diags([main, upper[1:], lower[:-1]], [0, 1, -1], format="csc")

    def banded_linear_jacobian(self) -> tuple[dict, Callable[[float, np.ndarray], np.ndarray]]:
        """``diag(L)`` in LSODA's banded storage: ``(options, jac)`` with ``options = {lband, uband}``."""
        main, upper, lower = self.linear_blocks()
        if self.real_linear:
            band = main[None, :].copy()
            return {"lband": 0, "uband": 0}, lambda t, y: band
        band = np.stack([upper, main, lower])  # row uband + i - j holds J[i, j]
        return {"lband": 1, "uband": 1}, lambda t, y: band


class Timer:
    """Wall time of a block: ``with Timer() as clock: ...; clock.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
