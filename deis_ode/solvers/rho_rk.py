r"""rho-Runge-Kutta: explicit Runge-Kutta methods on the probability-flow ODE in the ``rho`` variable.

On the eps split of a diffusion ODE the exact flow is ``d y / d rho = eps(alpha y, t(rho))`` with ``y = x / alpha``
and ``rho = sigma / alpha``: the linear part is gone, and a classical Runge-Kutta method applied to this equation
is exact in it. With a Butcher tableau ``(c, A, b)`` and ``h = rho_{n+1} - rho_n``, step ``n`` is

    k_i     = eps(t_{n,i}, x_{n,i}),         t_{n,i} = t(rho_n + c_i h),
    x_{n,i} = (alpha_{n,i} / alpha_n) x_n + alpha_{n,i} h sum_{j<i} A_{ij} k_j,
    x_{n+1} = (alpha_{n+1} / alpha_n) x_n + alpha_{n+1} h sum_i b_i k_i,

which is ``y_{n,i} = y_n + h sum_j A_{ij} k_j`` and ``y_{n+1} = y_n + h sum_i b_i k_i`` multiplied by ``alpha``.
The stage times come from the schedule's inverse ``t(lambda)`` at ``lambda = -log rho`` (stages with ``c = 0`` or
``c = 1`` use the grid times themselves). The DEIS paper (Zhang and Chen 2022) calls these rho-RK; the methods are

* ``deis_rk2``: Heun's method (the trapezoidal rule), 2 evaluations per step, order 2;
* ``deis_rk3``: Kutta's third-order method (Simpson's rule), 3 evaluations per step, order 3;
* ``deis_rk4``: the classic fourth-order method, 4 evaluations per step, order 4.

As in the multistep engine, every coefficient is computed once per grid in float64 on the host, each stage is
one linear combination (an :class:`~deis_ode.solvers.multistep.Update`) on the state's device and dtype, and
finiteness of ``eps`` is recorded on the device and checked once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from ..forms import ExponentialForm
from .ipndm import require_eps_diffusion
from .multistep import FiniteChecks, Update, apply_update, place_updates

F64 = torch.float64


@dataclass(frozen=True)
class Tableau:
    """An explicit Butcher tableau: ``a[i]`` holds ``A_{i0} .. A_{i,i-1}`` (``a[0]`` is empty)."""

    name: str
    c: tuple[Fraction, ...]
    a: tuple[tuple[Fraction, ...], ...]
    b: tuple[Fraction, ...]


_F = Fraction
#: The tableaus by global order.
TABLEAUS: dict[int, Tableau] = {
    2: Tableau("Heun", (_F(0), _F(1)), ((), (_F(1),)), (_F(1, 2), _F(1, 2))),
    3: Tableau(
        "Kutta3",
        (_F(0), _F(1, 2), _F(1)),
        ((), (_F(1, 2),), (_F(-1), _F(2))),
        (_F(1, 6), _F(2, 3), _F(1, 6)),
    ),
    4: Tableau(
        "RK4",
        (_F(0), _F(1, 2), _F(1, 2), _F(1)),
        ((), (_F(1, 2),), (_F(0), _F(1, 2)), (_F(0), _F(0), _F(1))),
        (_F(1, 6), _F(1, 3), _F(1, 3), _F(1, 6)),
    ),
}


@dataclass
class RKStep:
    """One step from grid point ``source`` to ``target``: ``stages[i]`` builds the state of stage ``i`` from
    ``x_source`` and the earlier stage values (``None`` for the first stage, which is ``x_source`` itself);
    ``final`` builds ``x_target``. Node indices are stage indices."""

    source: int
    target: int
    stages: list[Update | None]
    final: Update


@dataclass
class RKPlan:
    """Everything the loop needs, computed once per grid.

    ``stage_times`` (float64, the schedule's time) holds the time of every evaluation, in the order the loop
    makes them: step ``n``, stage ``i`` is entry ``n * stages + i``.
    """

    order: int
    stages: int
    steps: list[RKStep]
    stage_times: Tensor

    @property
    def evaluations(self) -> int:
        """Number of evaluations of eps the loop performs."""
        return self.stages * len(self.steps)


def build_rho_rk_plan(form: ExponentialForm, times: Tensor, order: int) -> RKPlan:
    """The rho-Runge-Kutta plan of the given order (2, 3 or 4) on the float64 grid ``times`` (strictly monotone,
    the schedule's time).

    Raises:
        ValueError: an unknown order, a form other than a diffusion eps split, a form without the inverse
            ``t_of_half_log_snr`` (needed for the intermediate stages), or a grid on which ``rho`` is not finite.
    """
    if order not in TABLEAUS:
        raise ValueError(f"rho-Runge-Kutta orders are {sorted(TABLEAUS)}, got {order!r}")
    method = f"deis_rk{order}"
    form = require_eps_diffusion(form, method)
    tableau = TABLEAUS[order]
    interior = sorted({c for c in tableau.c if 0 < c < 1})
    if interior and form.t_of_half_log_snr is None:
        raise ValueError(
            f"method {method!r} evaluates eps between grid points and needs the schedule's inverse t(lambda): "
            "the DiffusionForm has t_of_half_log_snr=None"
        )
    times = times.to(F64)
    rho = torch.exp(-form.half_log_snr(times))
    h = rho[1:] - rho[:-1]
    if not bool(torch.isfinite(h).all()):
        n = int(torch.nonzero(~torch.isfinite(h))[0, 0])
        raise ValueError(
            f"method {method!r}: rho = sigma / alpha is not finite on the step [{times[n].item():.6g}, "
            f"{times[n + 1].item():.6g}] (alpha = 0 there); use deis1..deis4 with extrapolate='x0'"
        )
    # The time of each stage: the grid times for c = 0 and c = 1, the inverse of the schedule in between.
    columns = []
    for c in tableau.c:
        if c == 0:
            columns.append(times[:-1])
        elif c == 1:
            columns.append(times[1:])
        else:
            lam = -torch.log(rho[:-1] + float(c) * h)
            columns.append(torch.as_tensor(form.t_of_half_log_snr(lam), dtype=F64).reshape(-1))
    stage_times = torch.stack(columns, dim=1)  # (steps, stages)
    log_alpha = form.log_scale(times)
    log_alpha_stage = form.log_scale(stage_times.reshape(-1)).reshape(stage_times.shape)

    steps = []
    for n in range(times.numel() - 1):
        stages: list[Update | None] = [None]
        for i in range(1, len(tableau.c)):
            alpha_i = torch.exp(log_alpha_stage[n, i])
            nodes = tuple(j for j, a in enumerate(tableau.a[i]) if a != 0)
            weights = [alpha_i * h[n] * float(tableau.a[i][j]) for j in nodes]
            stages.append(Update(n, i, nodes, torch.exp(log_alpha_stage[n, i] - log_alpha[n]), weights))
        alpha_b = torch.exp(log_alpha[n + 1])
        nodes = tuple(j for j, b in enumerate(tableau.b) if b != 0)
        weights = [alpha_b * h[n] * float(tableau.b[j]) for j in nodes]
        final = Update(n, n + 1, nodes, torch.exp(log_alpha[n + 1] - log_alpha[n]), weights)
        steps.append(RKStep(n, n + 1, stages, final))
    return RKPlan(order, len(tableau.c), steps, stage_times.reshape(-1))


def place_rho_rk_plan(plan: RKPlan, like: Tensor) -> RKPlan:
    """``plan`` with every coefficient on the device and dtype of the state ``like`` (a new plan)."""
    flat = [u for step in plan.steps for u in (*(s for s in step.stages if s is not None), step.final)]
    updates = iter(place_updates(flat, like))
    steps = []
    for step in plan.steps:
        stages = [None if stage is None else next(updates) for stage in step.stages]
        steps.append(RKStep(step.source, step.target, stages, next(updates)))
    return RKPlan(plan.order, plan.stages, steps, plan.stage_times)


def run_rho_rk(
    plan: RKPlan,
    nonlinear: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    stage_times: Tensor,
    outputs: list[int],
    on_step: Callable[[int, Tensor], None] | None = None,
) -> list[Tensor]:
    """Execute ``plan`` from ``x0`` and return the states at the grid indices ``outputs`` (increasing).

    Args:
        nonlinear: ``(t, x) -> eps(t, x)``; ``t`` is a 0-dim tensor of the state's real dtype.
        stage_times: ``plan.stage_times`` on the state's device in the state's real dtype.
        on_step: called as ``on_step(n, x_n)`` once per grid step.

    Raises:
        FloatingPointError: if eps returned NaN or inf; names the first step, stage and time where it did.
    """
    checks = FiniteChecks(plan.evaluations, x0)
    wanted = set(outputs)
    results: dict[int, Tensor] = {0: x0} if 0 in wanted else {}
    x = x0
    e = 0
    for step in plan.steps:
        if on_step is not None:
            on_step(step.source, x)
        values: dict[int, Tensor] = {}
        for i, stage in enumerate(step.stages):
            x_stage = x if stage is None else apply_update(stage, x, values)
            k = nonlinear(stage_times[e], x_stage)
            values[i] = k
            checks.record(e, k)
            e += 1
        x = apply_update(step.final, x, values)
        if step.target in wanted:
            results[step.target] = x

    first = checks.first_bad()
    if first is not None:
        n, i = divmod(first, plan.stages)
        raise FloatingPointError(
            f"the noise prediction eps(t, x) returned NaN or inf at grid step {n}, stage {i} "
            f"(t = {stage_times[first].item():.8g}); the model or the state diverged there"
        )
    return [results[i] for i in outputs]
