"""Empirical convergence order of a torchdiffeq method on a semi-linear ODE.

:func:`empirical_order` integrates a problem on finer and finer grids, measures the error at
the final time against a scipy reference (:mod:`deis_ode.reference`), counts the evaluations
of ``N`` each run makes, and fits the slope of ``log(error)`` against ``log(mean step)``. A
method of global order ``K`` has slope ``K`` once the grids are fine enough.

:data:`PROBLEMS` holds smooth test problems by name; ``python -m deis_ode verify`` runs them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torchdiffeq
from torch import Tensor, nn

from . import reference as _reference
from .semilinear import SemiLinearODE

__all__ = [
    "EvaluationCounter",
    "OrderTable",
    "PROBLEMS",
    "Problem",
    "count_evaluations",
    "empirical_order",
    "make_grid",
]

GridFn = Callable[[int, float, float], Tensor]

# Global orders of torchdiffeq's fixed-grid methods whose names carry no digit.
_KNOWN_ORDERS = {"euler": 1, "midpoint": 2}

# Length of the repeated pattern of the "random" grid (prime, so that it never lines up with halvings).
_RANDOM_PERIOD = 4


# --------------------------------------------------------------------------- counting


class EvaluationCounter:
    """How many times ``N`` was evaluated (each call counts once, whatever the batch size)."""

    def __init__(self) -> None:
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def __repr__(self) -> str:
        return f"EvaluationCounter(count={self.count})"


class _Counting:
    """A plain callable that counts the calls of ``inner``."""

    def __init__(self, inner: Callable, counter: EvaluationCounter) -> None:
        self.inner = inner
        self.counter = counter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.counter.count += 1
        return self.inner(*args, **kwargs)


class _CountingModule(nn.Module):
    """The same for an ``nn.Module`` (so that the parent keeps it as a submodule)."""

    def __init__(self, inner: nn.Module, counter: EvaluationCounter) -> None:
        super().__init__()
        self.inner = inner
        self.counter = counter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.counter.count += 1
        return self.inner(*args, **kwargs)


@contextmanager
def count_evaluations(ode: Any, attribute: str | None = None) -> Iterator[EvaluationCounter]:
    """Count the evaluations of ``ode.nonlinear`` (of ``ode.model`` for a diffusion drift, whose solvers may call the
    model directly and fold its conversion into their coefficients) inside a ``with`` block.

    The instance attribute is replaced by a counting wrapper and restored on exit, even on an
    error. Every solver reaches ``N`` through it: the ``deis*`` methods directly, and the
    others through ``ode.forward``. Nested use is allowed; each counter sees its own block.

    Example::

        with count_evaluations(ode) as calls:
            torchdiffeq.odeint(ode, x0, grid, method="deis3")
        print(calls.count)
    """
    if attribute is None:
        attribute = "model" if hasattr(ode, "model") and hasattr(ode, "output_conversion") else "nonlinear"
    if not hasattr(ode, attribute):
        raise TypeError(f"{type(ode).__name__} has no attribute {attribute!r} to count")
    original = getattr(ode, attribute)
    if not callable(original):
        raise TypeError(f"{type(ode).__name__}.{attribute} is not callable")
    counter = EvaluationCounter()
    wrapper = _CountingModule(original, counter) if isinstance(original, nn.Module) else _Counting(original, counter)
    setattr(ode, attribute, wrapper)
    try:
        yield counter
    finally:
        setattr(ode, attribute, original)


# --------------------------------------------------------------------------- grids


def make_grid(grid: str | GridFn, n: int, t0: float, t1: float, *, seed: int = 0) -> Tensor:
    """A float64 grid of ``n`` steps from ``t0`` to ``t1`` (either direction).

    Args:
        grid: ``"uniform"``; ``"random"``: steps proportional to ``u_(i mod 7)`` with seven
            seeded multipliers ``u`` uniform in ``[0.5, 1.5]``, normalised to end at ``t1``
            (neighbouring steps differ by ratios up to 3 on every grid, and all grids share
            one shape, so the error constant is the same for every ``n``); or a callable
            ``(n, t0, t1) -> grid``.
        seed: seeds the random multipliers.
    """
    if n < 1:
        raise ValueError(f"a grid needs at least one step, got n={n}")
    if t0 == t1:
        raise ValueError("t0 and t1 must differ")
    if callable(grid):
        times = torch.as_tensor(grid(n, t0, t1)).to(dtype=torch.float64, device="cpu").reshape(-1)
    elif grid == "uniform":
        times = torch.linspace(t0, t1, n + 1, dtype=torch.float64)
    elif grid == "random":
        # A seeded pattern of step multipliers in [0.5, 1.5], repeated along the grid: every grid is rough
        # (neighbouring steps differ by ratios up to 3 at any n), yet all grids share one shape, so the error
        # constant does not jump from one n to the next and the fitted slope is not noisy.
        pattern = np.random.default_rng(seed).uniform(0.5, 1.5, size=_RANDOM_PERIOD)
        steps = pattern[np.arange(n) % _RANDOM_PERIOD]
        fractions = np.concatenate([[0.0], np.cumsum(steps) / steps.sum()])
        times = torch.from_numpy(t0 + (t1 - t0) * fractions)
    else:
        raise ValueError(f"grid must be 'uniform', 'random' or a callable (n, t0, t1) -> grid, got {grid!r}")
    if times.numel() < 2:
        raise ValueError(f"the grid for n={n} has fewer than two points")
    times[0], times[-1] = t0, t1  # end exactly where asked
    diffs = times[1:] - times[:-1]
    if not ((diffs > 0).all() if t1 > t0 else (diffs < 0).all()):
        raise ValueError(f"the grid for n={n} is not strictly monotone from {t0} to {t1}")
    return times


# --------------------------------------------------------------------------- order table


def expected_order(method: str, warmup: str | None = None) -> int | None:
    """The global order a method's name promises: its trailing digit (``deis3`` -> 3,
    ``rk4`` -> 4), ``euler`` -> 1, ``midpoint`` -> 2, else ``None``.

    With ``warmup="lower_order"`` a multistep ``deisK`` method starts with an exponential Euler step,
    whose O(h^2) local error caps the global order at 2."""
    match = re.search(r"(\d+)$", method)
    order = int(match.group(1)) if match else _KNOWN_ORDERS.get(method)
    if order is not None and warmup == "lower_order" and re.fullmatch(r"deis\d+", method):
        order = min(order, 2)
    return order


def fit_slope(step_sizes: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(step size)``."""
    h = np.log(np.asarray(step_sizes, dtype=np.float64))
    e = np.log(np.maximum(np.asarray(errors, dtype=np.float64), np.finfo(np.float64).tiny))
    if h.size < 2:
        return math.nan
    return float(np.polyfit(h, e, 1)[0])


@dataclass
class OrderTable:
    """The result of :func:`empirical_order`; ``str(table)`` prints it as a table.

    Attributes:
        method: the torchdiffeq method name.
        steps: the number of steps of each grid.
        nfe: evaluations of ``N`` each run made.
        errors: ``max|x - x_ref| / max|x_ref|`` at the final time, per run.
        slope: the least-squares slope of ``log(error)`` against ``log(mean step)``.
        expected: the order the method's name promises (:func:`expected_order`, which caps a
            ``deis*`` method at 2 under the ``"lower_order"`` warm-up), or ``None``.
        local_slopes: the slope between each pair of neighbouring runs.
        step_sizes: the mean step ``|t1 - t0| / steps`` of each run.
        grid: the grid kind (``"uniform"``, ``"random"`` or ``"custom"``).
        problem: a label for the problem, when known.
        expected_max: when set, a correct method's slope may lie anywhere from ``expected`` to ``expected_max``
            at the problem's step counts (see :meth:`Problem.expected_orders`).
    """

    method: str
    steps: list[int]
    nfe: list[int]
    errors: list[float]
    slope: float
    expected: int | None
    local_slopes: list[float] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    grid: str = "uniform"
    problem: str | None = None
    expected_max: int | None = None

    def __str__(self) -> str:
        title = f"method {self.method}"
        if self.problem:
            title += f"  problem {self.problem}"
        title += f"  grid {self.grid}"
        expected = "?" if self.expected is None else str(self.expected)
        if self.expected is not None and self.expected_max is not None and self.expected_max != self.expected:
            expected += f" to {self.expected_max}"
        title += f"  expected order {expected}  fitted slope {self.slope:.3f}"
        header = f"{'steps':>7} {'NFE':>7} {'mean step':>11} {'rel. error':>12} {'local slope':>12}"
        lines = [title, header, "-" * len(header)]
        for i, (n, nfe, err) in enumerate(zip(self.steps, self.nfe, self.errors, strict=True)):
            h = self.step_sizes[i] if i < len(self.step_sizes) else math.nan
            local = f"{self.local_slopes[i - 1]:12.3f}" if i > 0 and i - 1 < len(self.local_slopes) else f"{'':>12}"
            lines.append(f"{n:>7d} {nfe:>7d} {h:>11.4e} {err:>12.4e} {local}")
        return "\n".join(lines)


def _relative_error(x: Tensor, ref: Tensor) -> float:
    ref = ref.to(device="cpu")
    x = x.detach().to(device="cpu", dtype=ref.dtype)
    scale = ref.abs().max().item()
    err = (x - ref).abs().max().item()
    return err / scale if scale > 0 else err


def empirical_order(
    method: str,
    ode: SemiLinearODE,
    x0: Tensor,
    t0: float,
    t1: float,
    steps: Sequence[int] = (8, 16, 32, 64),
    grid: str | GridFn = "uniform",
    options: dict[str, Any] | None = None,
    reference: Tensor | _reference.ReferenceSolution | None = None,
    seed: int = 0,
    *,
    problem: str | None = None,
) -> OrderTable:
    """Measure the convergence order of a torchdiffeq ``method`` on ``ode``.

    For each ``n`` in ``steps``, integrates from ``t0`` to ``t1`` (``t0 > t1`` runs downward,
    as diffusion sampling does) with ``torchdiffeq.odeint(ode, x0, grid, method=method,
    options=options)`` in float64 on an ``n``-step grid (:func:`make_grid`), and compares the
    final state with the reference.

    Args:
        reference: the exact final state (a tensor) or a :class:`~deis_ode.reference.ReferenceSolution`
            (its last state is used); by default ``reference.solve(ode, x0, [t0, t1])``.
        seed: seeds the ``"random"`` grid.
        problem: a label printed in the table.

    Returns:
        an :class:`OrderTable`; its ``slope`` should be close to ``expected`` for a correct method.
    """
    t0, t1 = float(t0), float(t1)
    if len(steps) < 2:
        raise ValueError("empirical_order needs at least two step counts to fit a slope")
    x0 = torch.as_tensor(x0).detach()
    x0 = x0.to(torch.complex128 if x0.is_complex() else torch.float64)
    if reference is None:
        target = _reference.solve(ode, x0, torch.tensor([t0, t1], dtype=torch.float64)).states[-1]
    elif isinstance(reference, _reference.ReferenceSolution):
        target = reference.states[-1]
    else:
        target = torch.as_tensor(reference)
    if target.shape != x0.shape:
        raise ValueError(f"the reference state has shape {tuple(target.shape)}, x0 has {tuple(x0.shape)}")

    nfe, errors, sizes = [], [], []
    for n in steps:
        times = make_grid(grid, int(n), t0, t1, seed=seed).to(x0.device)
        with torch.no_grad(), count_evaluations(ode) as calls:
            xs = torchdiffeq.odeint(ode, x0, times, method=method, options=dict(options or {}))
        nfe.append(calls.count)
        errors.append(_relative_error(xs[-1], target))
        sizes.append(abs(t1 - t0) / (times.numel() - 1))

    local = [fit_slope(sizes[i : i + 2], errors[i : i + 2]) for i in range(len(sizes) - 1)]
    return OrderTable(
        method=method,
        steps=[int(n) for n in steps],
        nfe=nfe,
        errors=errors,
        slope=fit_slope(sizes, errors),
        expected=expected_order(method, (options or {}).get("warmup", getattr(ode, "default_warmup", None))),
        local_slopes=local,
        step_sizes=sizes,
        grid=grid if isinstance(grid, str) else "custom",
        problem=problem,
    )


# --------------------------------------------------------------------------- problems


class Problem(NamedTuple):
    """A test problem: unpacks as ``ode, x0, t0, t1, steps``."""

    ode: SemiLinearODE
    x0: Tensor
    t0: float
    t1: float
    steps: tuple[int, ...]

    def expected_orders(self, method: str, warmup: str | None = None) -> tuple[int, int] | None:
        """The slopes a correct ``method`` shows on this problem at its step counts, as ``(lowest, highest)``:
        here both are :func:`expected_order` (with ``warmup``, else the ODE's default warm-up); ``None`` when the
        method promises no order."""
        order = expected_order(method, warmup if warmup is not None else getattr(self.ode, "default_warmup", None))
        return None if order is None else (order, order)

    def steps_for(self, method: str) -> tuple[int, ...]:
        """The step counts at which ``method`` shows its order here: :attr:`steps`, doubled for ``deis5``, whose
        error reaches its asymptotic slope from about twice the steps (on ``scalar`` it fits 4.56 over 16-128 steps
        and 4.83 over 32-256)."""
        return tuple(2 * n for n in self.steps) if method == "deis5" else self.steps


_STEPS = (16, 32, 64, 128)


def _scalar() -> Problem:
    """``dx/dt = -2 x + cos(t + x)`` for three initial values, t from 0 to 1."""
    ode = SemiLinearODE(-2.0, lambda t, x: torch.cos(t + x))
    x0 = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    return Problem(ode, x0, 0.0, 1.0, _STEPS)


def _diagonal() -> Problem:
    """Six coupled components, a constant diagonal ``L`` with both signs, t from 0 to 1."""
    linear = torch.tensor([-2.0, -1.5, -1.0, -0.5, 0.25, 0.5], dtype=torch.float64)

    def nonlinear(t: Tensor, x: Tensor) -> Tensor:
        return -0.5 * torch.sin(x) + torch.cos(t) * torch.sin(torch.roll(x, 1, dims=-1))

    x0 = torch.tensor([1.0, -1.0, 0.5, 0.25, -0.75, 2.0], dtype=torch.float64)
    return Problem(SemiLinearODE(linear, nonlinear), x0, 0.0, 1.0, _STEPS)


def _time_varying() -> Problem:
    """``L(t) = -(1 + 0.5 sin t) d`` with ``d`` in ``[0.25, 2]`` (no exact integral is given, so
    the ``deis*`` methods integrate ``L`` by quadrature), t from 0 to 1. ``L`` accepts a time
    tensor of any shape ``S`` and returns shape ``(*S, 4)``."""
    d = torch.tensor([0.25, 0.5, 1.0, 2.0], dtype=torch.float64)

    def linear(t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return -(1.0 + 0.5 * torch.sin(t)).unsqueeze(-1) * d.to(t.device)

    def nonlinear(t: Tensor, x: Tensor) -> Tensor:
        return torch.cos(t) * torch.tanh(x) + 0.3 * torch.sin(2 * t + torch.roll(x, 1, dims=-1))

    x0 = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)
    return Problem(SemiLinearODE(linear, nonlinear), x0, 0.0, 1.0, _STEPS)


def _stiff() -> Problem:
    """Diagonal ``L`` from -1 down to -1e3 with a smooth ``N``, t from 0 to 1: explicit
    Runge-Kutta methods are unstable on these grids, exponential methods are not.

    The initial state lies on the slow manifold (it is the state at ``t = 0`` of a run started
    at ``t = -2``), so the solution has no initial layer: a fast transient would make
    ``N(t, x(t))`` non-smooth on the scale of a step and lower the order of any method that
    extrapolates ``N``.
    """
    linear = -torch.logspace(0, 3, 8, dtype=torch.float64)

    def nonlinear(t: Tensor, x: Tensor) -> Tensor:
        return torch.sin(t) + 0.5 * torch.cos(torch.roll(x, 1, dims=-1)) + 0.1 * torch.cos(t) * x

    ode = SemiLinearODE(linear, nonlinear)
    start = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    x0 = _reference.solve(ode, start, [-2.0, 0.0], method="LSODA").states[-1]
    return Problem(ode, x0, 0.0, 1.0, _STEPS)


class _WarmupBelowResolution(Problem):
    """A problem on which a lower-order warm-up's error is too small to set the slope at its step counts."""

    def expected_orders(self, method: str, warmup: str | None = None) -> tuple[int, int] | None:
        """From the warm-up's cap (2 for ``deis3``..``deis5`` under ``"lower_order"``) to the order of the main
        steps, the method's full order: which one the slope shows depends on which error is larger (see
        :func:`_vp_mixture`)."""
        capped = super().expected_orders(method, warmup)
        full = expected_order(method)
        if capped is None or full is None:
            return capped
        return min(capped[0], full), full


def _vp_mixture() -> Problem:
    """The probability-flow ODE of a VP (linear beta) diffusion with the exact noise model of
    an 8-dimensional Gaussian mixture, 16 samples of ``x_T ~ N(0, I)``, t from 1 to 1e-3, on 64
    to 512 steps.

    Why the expected slope of ``deis3``..``deis5`` is a range, from 2 to the method's order ``K``:
    a VP drift starts its multistep methods with the ``"lower_order"`` warm-up (an exponential
    Euler step, then orders 2, 3, ...), whose first step's local error ``O(h^2)`` caps the global
    order at 2 (:func:`expected_order`). But that step lies at ``t = 1``, where the noise
    prediction is nearly linear in ``x``, so its error constant is tiny: at these step counts the
    error of the main steps, ``O(h^K)``, is the larger one, and the slope lies between 2 and ``K``.
    For example ``deis5`` fits 4.5 over 64 to 512 steps; its local slopes fall to 2.0 from 256
    to 512 steps on ``t`` down to 0.3, where the main steps' error drops below the warm-up's
    (about 1e-8). The slope only reaches its asymptote once both are resolved, which no fixed
    set of step counts does for every ``K``. With ``--warmup full_order`` the expectation is
    ``K`` again, but near ``t = 1e-3`` the noise prediction changes on the scale of ``t`` itself,
    so the slopes of ``deis4`` and ``deis5`` are still pre-asymptotic on 64 to 512 steps (3.7
    and 4.6; 3.8 and 5.1 on 128 to 1024). The step counts start at 64 because ``deis2``'s local
    slopes are 1.40, 1.79 and 1.95 from 32 to 256 steps; on the rough ``"random"`` grid it fits
    1.78 over 64 to 512, still pre-asymptotic.
    """
    from deis_ode.diffusion import VPODE, GaussianMixture, GaussianMixtureEps, VPSchedule

    schedule = VPSchedule.linear()
    mixture = GaussianMixture.default(dim=8)
    ode = VPODE(GaussianMixtureEps(mixture, schedule), schedule)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    return _WarmupBelowResolution(ode, x0, 1.0, 1e-3, (64, 128, 256, 512))


#: Test problems by name: each value is a factory returning a :class:`Problem`.
PROBLEMS: dict[str, Callable[[], Problem]] = {
    "scalar": _scalar,
    "diagonal": _diagonal,
    "time-varying": _time_varying,
    "stiff": _stiff,
    "vp-mixture": _vp_mixture,
}
