r"""The exponential Adams-Bashforth method for a constant operator ``A`` (sparse or matrix-free) and ``W = 1``.

With the Lagrange basis through the nodes ``theta_j`` (in units of the step ``h``, basis ``u = t``) written in
monomials, ``l_j(theta) = sum_k a_{jk} theta^k``, the K-node step of :mod:`deis_ode.solvers.multistep` is

    x_{n+1} = phi_0(h A) x_n + sum_{k<K} phi_{k+1}(h A) v_{k+1},     v_{k+1} = h k! sum_j a_{jk} N_{n-j},

(``int_0^1 e^{hA(1-theta)} theta^k dtheta = k! phi_{k+1}(hA)``). The scalars ``h k! a_{jk}`` are computed once per
grid in float64; each step forms the ``K`` vectors ``v_{k+1}`` and makes ONE call of
:func:`deis_ode.linear.krylov.phiv`, so the phi-functions of ``h A`` are never formed: memory ``O(m d)`` for a
Krylov dimension ``m``.

The plan's structure (which nodes each update combines, the warm-up: ``lower_order`` or ``full_order`` with its
Picard sweeps, ``lower_order_final``) does not depend on ``L`` and is taken from
:func:`deis_ode.solvers.multistep.build_plan`, so both engines run the same method.

The Krylov tolerance: ``tol`` bounds the error of each product relative to the size of its vectors (about
``||x_n||``); it adds at most ``M tol ||x||`` over ``M`` steps. The default, ``1e-10`` for float64 states and
``1e-7`` for float32 ones, keeps it below the method's error at any step count where that error is above the
state's rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..forms import LinearForm
from ..linear.krylov import KrylovError, KrylovStats, phiv
from .coefficients import lagrange_monomials
from .multistep import FiniteChecks, build_plan

F64 = torch.float64
_STRUCTURE_FORM = LinearForm(torch.zeros((), dtype=F64))  # L = 0: only the plan's structure is used (one cache entry)
#: Default largest Krylov dimension.
MAX_DIM = 64


def default_tol(dtype: torch.dtype) -> float:
    """The default Krylov tolerance for a state of ``dtype``: ``1e-10`` in double precision, ``1e-7`` otherwise."""
    return 1e-10 if dtype in (torch.float64, torch.complex128) else 1e-7


def operator_step(
    op: object,
    h: float,
    x: Tensor,
    ws: list[Tensor],
    *,
    tol: float | None = None,
    max_dim: int = MAX_DIM,
    stats: KrylovStats | None = None,
) -> Tensor:
    r"""One exponential step ``phi_0(h A) x + h sum_k k! phi_{k+1}(h A) ws[k]`` by one Krylov product, in ``x``'s
    dtype. With ``ws[k] = sum_j a_{jk} N_j`` this is the K-node step; ``ws = []`` is ``exp(h A) x``."""
    vs = [x] + [(h * math.factorial(k)) * w.to(x.dtype) for k, w in enumerate(ws)]
    tol = default_tol(x.dtype) if tol is None else tol
    return phiv(op, h, vs, tol=tol, max_dim=max_dim, stats=stats).to(x.dtype)


@dataclass
class OperatorUpdate:
    """``x[target] = phi_0(h A) x[source] + sum_k phi_{k+1}(h A) sum_j mix[k][j] N[nodes[j]]``."""

    source: int
    target: int
    nodes: tuple[int, ...]
    h: float
    mix: list[list[float]]  # mix[k][j] = h k! a_{jk}


@dataclass
class OperatorPlan:
    order: int
    start: list[OperatorUpdate]
    block: list[OperatorUpdate]
    sweeps: int
    main: list[OperatorUpdate]

    @property
    def evaluations(self) -> int:
        return len(self.start) + self.sweeps * len(self.block) + len(self.main)


def build_operator_plan(
    times: Tensor, order: int, warmup: str = "lower_order", lower_order_final: bool = False
) -> OperatorPlan:
    """The plan of the ``order``-node method on the float64 grid ``times`` (see the module docstring)."""
    structure = build_plan(_STRUCTURE_FORM, "t", times, order, warmup, lower_order_final)
    grid = times.tolist()

    def convert(update) -> OperatorUpdate:
        h = grid[update.target] - grid[update.source]
        theta = torch.tensor([(grid[n] - grid[update.source]) / h for n in update.nodes], dtype=F64)
        a = lagrange_monomials(theta).tolist()  # a[j][k]
        k_nodes = len(update.nodes)
        mix = [[h * math.factorial(k) * a[j][k] for j in range(k_nodes)] for k in range(k_nodes)]
        return OperatorUpdate(update.source, update.target, tuple(update.nodes), h, mix)

    return OperatorPlan(
        order=order,
        start=[convert(u) for u in structure.start],
        block=[convert(u) for u in structure.block],
        sweeps=structure.sweeps,
        main=[convert(u) for u in structure.main],
    )


def run_operator_plan(
    plan: OperatorPlan,
    op: object,
    nonlinear: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    times: Tensor,
    outputs: list[int],
    on_step: Callable[[int, Tensor], None] | None = None,
    *,
    tol: float | None = None,
    max_dim: int = MAX_DIM,
    stats: KrylovStats | None = None,
) -> list[Tensor]:
    """Execute ``plan`` from ``x0`` (the arguments as for :func:`deis_ode.solvers.multistep.run_plan`) and return
    the states at the grid indices ``outputs``; ``stats`` accumulates the Krylov counters.

    Raises:
        FloatingPointError: N returned NaN or inf (names the first step where it did).
        KrylovError: a Krylov product did not converge (names the step).
    """
    tol = default_tol(x0.dtype) if tol is None else tol
    if not (isinstance(tol, float | int) and 0 < tol < 1):
        raise ValueError(f"krylov_tol must be a number in (0, 1), got {tol!r}")
    if isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1:
        raise ValueError(f"krylov_max_dim must be a positive int, got {max_dim!r}")
    stats = KrylovStats() if stats is None else stats
    values: dict[int, Tensor] = {}
    checks = FiniteChecks(len(plan.start) + plan.sweeps * len(plan.block) + len(plan.main), x0)

    def evaluate(i: int, x: Tensor) -> None:
        out = nonlinear(times[i], x)
        values[i] = out
        checks.record(i, out)

    def check_finite() -> None:
        i = checks.first_bad()
        if i is not None:
            raise FloatingPointError(
                f"the nonlinear part N(t, x) returned NaN or inf at grid step {i} (t = {times[i].item():.8g}); "
                "the model or the state diverged there"
            )

    def advance(update: OperatorUpdate, x: Tensor) -> Tensor:
        ws = [sum(c * values[n] for c, n in zip(row, update.nodes, strict=True)) for row in update.mix]
        vs = [x, *ws]
        try:
            out = phiv(op, update.h, vs, tol=tol, max_dim=max_dim, stats=stats)
        except KrylovError as err:
            check_finite()  # a NaN in N shows as a Krylov failure: name the real cause
            raise KrylovError(
                f"step {update.source} -> {update.target} (t = {times[update.source].item():.8g}): {err}"
            ) from None
        return out.to(x.dtype)

    states: dict[int, Tensor] = {0: x0}
    results: dict[int, Tensor] = {}
    wanted = set(outputs)

    def keep(i: int, x: Tensor) -> None:
        if i in wanted:
            results[i] = x

    keep(0, x0)
    for update in plan.start:
        evaluate(update.source, states[update.source])
        states[update.target] = advance(update, states[update.source])
    for _ in range(plan.sweeps):
        for update in plan.block:
            evaluate(update.target, states[update.target])
        for update in plan.block:
            states[update.target] = advance(update, states[update.source])
    for update in plan.block:
        if on_step is not None:
            on_step(update.source, states[update.source])
        keep(update.target, states[update.target])
    x = states[max(states)]
    for update in plan.main:
        if on_step is not None:
            on_step(update.source, x)
        evaluate(update.source, x)
        x = advance(update, x)
        keep(update.target, x)
        for stale in [i for i in values if i <= update.target - plan.order]:
            del values[stale]
    check_finite()
    return [results[i] for i in outputs]
