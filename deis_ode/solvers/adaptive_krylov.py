r"""The error-controlled step of ``adaptive_deisK`` for a constant operator ``A`` (sparse or matrix-free), ``W = 1``.

The predictor-corrector pair of :mod:`deis_ode.solvers.adaptive`, applied to vectors by Krylov products instead of
formed coefficients. With the step ``h`` (the user's time), the ``p`` past nodes ``theta_j = (t_{n-j} - t_n) / h``
(``theta_0 = 0``) and the Lagrange bases written in monomials
(:func:`~deis_ode.solvers.coefficients.lagrange_monomials`, float64 on the host),
``l^P_j(theta) = sum_k a^P_{jk} theta^k`` through the ``p`` past nodes and ``l^C_j(theta) = sum_k a^C_{jk} theta^k``
through ``(1, theta_0, .., theta_{p-1})``:

    x^P = phi_0(h A) x_n + sum_{k<p} h k! phi_{k+1}(h A) sum_j a^P_{jk} N_{n-j}           (ONE product)
    e   = sum_{k<=p} h k! phi_{k+1}(h A) [a^C_{0k} N_{n+1} + sum_j (a^C_{j+1,k} - a^P_{jk}) N_{n-j}]   (ONE product)
    x_{n+1} = x^P + e

(``a^P_{jp} = 0``). ``e`` is the corrector minus the predictor, computed as one product of the difference of the two
weight sets rather than as the difference of two products: its Krylov error is then relative to the size of those
(small) vectors instead of ``||x_n||``, so the estimate carries no cancellation of two products' errors. Each call is
:func:`~deis_ode.solvers.krylov_multistep.operator_step` (one :func:`~deis_ode.linear.krylov.phiv`).

The Krylov tolerance: each product's error is about ``tol`` times the size of its vectors (``~ ||x_n||`` for the
predictor). Unless ``krylov_tol`` is given, ``tol = min(default_tol(dtype), 0.01 * min(rtol))`` (``default_tol``:
``1e-10`` for float64 states, ``1e-7`` otherwise), so that the Krylov error of an accepted step stays about 100x below
what the error control allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..linear.krylov import KrylovError, KrylovStats
from .coefficients import lagrange_monomials
from .krylov_multistep import MAX_DIM, default_tol, operator_step

F64 = torch.float64
#: The default Krylov tolerance is at most this fraction of the smallest ``rtol``.
RTOL_FRACTION = 0.01


def krylov_tolerance(dtype: torch.dtype, rtol: float | Tensor, given: float | None) -> float:
    """The Krylov tolerance of an adaptive solve: ``given`` when set, else ``min(default_tol(dtype), 0.01 rtol)``."""
    if given is not None:
        return given
    smallest = float(rtol.min()) if isinstance(rtol, Tensor) else float(rtol)
    return min(default_tol(dtype), RTOL_FRACTION * smallest)


def check_krylov_options(tol: object, max_dim: object) -> None:
    """``ValueError`` naming the option unless ``krylov_tol`` is ``None`` or a number in (0, 1) and
    ``krylov_max_dim`` a positive int."""
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and 0 < tol < 1)
    ):
        raise ValueError(f"option krylov_tol must be a number in (0, 1), got {tol!r}")
    if isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1:
        raise ValueError(f"option krylov_max_dim must be a positive int, got {max_dim!r}")


def merge_stats(parts: list[KrylovStats]) -> KrylovStats:
    """One :class:`KrylovStats` with the counters of ``parts`` added (maxima taken, dimensions concatenated)."""
    out = KrylovStats()
    for s in parts:
        out.calls += s.calls
        out.substeps += s.substeps
        out.rejected += s.rejected
        out.matvecs += s.matvecs
        out.max_dim = max(out.max_dim, s.max_dim)
        out.max_substeps = max(out.max_substeps, s.max_substeps)
        out.dims.extend(s.dims)
    return out


def _weights(mix: list[list[float]], values: list[Tensor]) -> list[Tensor]:
    """``w_k = sum_j mix[j][k] values[j]`` for every column ``k``."""
    out = []
    for k in range(len(mix[0])):
        w = None
        for row, v in zip(mix, values, strict=True):
            if row[k] != 0.0:
                w = row[k] * v if w is None else w.add(v, alpha=row[k])
        out.append(torch.zeros_like(values[0]) if w is None else w)
    return out


@dataclass
class OperatorSteps:
    """The Krylov predictor and error estimate of one adaptive step (see the module docstring).

    ``predictor_stats`` and ``estimate_stats`` are kept apart, so that each kind of product uses its own last
    Krylov dimension as the hint of :func:`~deis_ode.linear.krylov.phiv`; :attr:`stats` merges them.
    """

    op: object
    tol: float
    max_dim: int = MAX_DIM
    predictor_stats: KrylovStats = field(default_factory=KrylovStats)
    estimate_stats: KrylovStats = field(default_factory=KrylovStats)

    @property
    def stats(self) -> KrylovStats:
        return merge_stats([self.predictor_stats, self.estimate_stats])

    @staticmethod
    def mixes(h: float, nodes: list[float]) -> tuple[list[list[float]], list[list[float]]]:
        """The monomial weights ``(a^P, a^C - a^P)`` (rows: nodes, columns: powers) for the step of size ``h`` from
        ``nodes[0]`` with the past ``nodes`` (the user's times, newest first); ``a^C - a^P`` has the new node's row
        first and ``a^P`` padded with zeros."""
        theta = [(s - nodes[0]) / h for s in nodes]
        a_p = lagrange_monomials(torch.tensor(theta, dtype=F64)).tolist()
        a_c = lagrange_monomials(torch.tensor([1.0, *theta], dtype=F64)).tolist()
        p = len(theta)
        diff = [a_c[0]] + [[a_c[j + 1][k] - (a_p[j][k] if k < p else 0.0) for k in range(p + 1)] for j in range(p)]
        return a_p, diff

    def predict(self, h: float, x: Tensor, history: list[Tensor], mix: list[list[float]], t: float) -> Tensor:
        """``x^P`` from ``x = x_n`` and ``history = [N_n, N_{n-1}, ..]`` (``t``: the user's time, for errors)."""
        return self._product(h, x, _weights(mix, history), self.predictor_stats, t)

    def estimate(self, h: float, n_new: Tensor, history: list[Tensor], mix: list[list[float]], t: float) -> Tensor:
        """``e = x_{n+1} - x^P`` from ``N_{n+1}`` and the history (``mix``: the second value of :meth:`mixes`)."""
        ws = _weights(mix, [n_new, *history])
        return self._product(h, torch.zeros_like(n_new), ws, self.estimate_stats, t)

    def _product(self, h: float, x: Tensor, ws: list[Tensor], stats: KrylovStats, t: float) -> Tensor:
        try:
            return operator_step(self.op, h, x, ws, tol=self.tol, max_dim=self.max_dim, stats=stats)
        except KrylovError as err:
            raise KrylovError(
                f"the Krylov phi-product of the step from t = {t:.10g} (step {h:.3g}) failed: {err} (raise "
                "krylov_max_dim, or check the operator for non-finite or enormous values)"
            ) from None
