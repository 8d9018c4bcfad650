"""Stiff PDEs: time to a relative error of 1e-4 and 1e-6 for deis2/3/4/5, scipy and torchdiffeq, single-threaded.

    python benchmarks/stiff.py                 # full run, 5 to 10 minutes
    python benchmarks/stiff.py --quick         # fewer points and repeats, 5 s caps, no Radau check (2 to 3 minutes)
    python benchmarks/stiff.py --out benchmarks/results/stiff.txt --plot stiff.png
    python benchmarks/stiff.py --reference-only   # only the references and their check against scipy Radau

(``--quick`` took 106 s and 173 s of wall time on a shared two-core machine; the full run's total is the last line of
``benchmarks/results/stiff.txt``, 413 s there.)

Problems (``examples/``): Kuramoto-Sivashinsky (Kassam-Trefethen set-up, t in [0, 10]), Allen-Cahn (max |L|
about 1e4, t in [0, 10]) and Gray-Scott (256 x 256 modes, t in [0, 100]), each on complex Fourier coefficients
with a constant diagonal linear part ``L``.

Methods and what is swept:

* ``deis2`` .. ``deis5`` (default ``full_order`` warm-up): the number of uniform steps;
* scipy ``solve_ivp`` on the same right-hand side written in numpy, as a real system (real and imaginary parts
  interleaved): ``RK45``, ``DOP853``, and ``BDF``, ``Radau``, ``LSODA`` with the Jacobian of the linear part,
  ``diag(L)`` (a constant sparse matrix for ``BDF``/``Radau``, banded storage for ``LSODA``), and on the small
  KS system also with the exact dense Jacobian: ``rtol`` from 1e-2 to 1e-11, ``atol = rtol * rms(y0)``;
* torchdiffeq ``dopri5`` (the same tolerances) and ``rk4`` (the number of steps, from about its stability
  limit), on the ``SemiLinearODE`` itself.

A sweep stops once its error is below 1e-6/3. Each configuration is timed as the best of up to seven runs (fewer
once a second is spent) and capped (``--cap``, 20 s; dopri5 on Gray-Scott 150 s; a capped run is reported as
"> cap"). Times are process CPU time by default (``--clock cpu``): with one thread (``torch.set_num_threads(1)``,
one BLAS thread) that is the wall time on an idle machine, and it is not inflated when other processes share the
cores; ``--clock wall`` measures wall time. The error is the relative 2-norm error of the grid values at the
final time against a reference from ``deis4`` with many more steps than any measured run; the reference's own
error is estimated by halving its step and checked against scipy ``Radau`` at ``rtol = 1e-12`` (``1e-11`` for
Gray-Scott). The time (and the evaluations of ``N``) to reach a target is interpolated linearly in log-log
between the cheapest measured point that reaches it and the most expensive cheaper point that does not; "<= t"
means the cheapest measured point already reaches it, "> t" that no point does.

Where the time of the best deis run goes (:func:`breakdown`): the evaluations of ``N`` (and, inside them, the FFTs),
building the coefficients, the step arithmetic (fused or not, as the engine chooses) and the rest (Python, warm-up,
checks); a bare loop over the same updates gives what the step itself costs.
"""

# ruff: noqa: E402  (the thread settings and the path to examples/ come before some imports)
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # single-threaded BLAS/LAPACK for scipy's linear algebra, before numpy loads

import argparse
import math
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import torch
import torchdiffeq
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import allen_cahn
import gray_scott
import kuramoto_sivashinsky
from _spectral import PackedSystem, SpectralProblem, relative_error, unpack

import deis_ode
from deis_ode import methods as adapter
from deis_ode.solvers import fused, multistep
from deis_ode.verify import count_evaluations

TARGETS = (1e-4, 1e-6)


class OverBudget(Exception):
    """A run exceeded its wall-time cap."""


@dataclass
class Point:
    """One measured configuration."""

    family: str  # "deis4", "scipy LSODA diag(L)", "torchdiffeq dopri5", ...
    setting: str  # "M=100", "rtol=1e-06"
    evaluations: int  # evaluations of N (right-hand sides); the capped run's count when capped
    seconds: float
    error: float  # nan when capped or failed
    jacobians: int = 0
    note: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error)


@dataclass
class Setup:
    """A problem with its sweeps."""

    key: str
    problem: SpectralProblem
    deis_steps: dict[str, list[int]]
    rk4_steps: list[int]
    reference_steps: int
    radau_rtol: float
    dopri5_cap: float = 20.0  # seconds per dopri5 run in a full run
    dopri5_rtols: tuple[float, ...] | None = None  # default: the scipy sweep


def setups(quick: bool) -> dict[str, Callable[[], Setup]]:
    def ks() -> Setup:
        deis = {
            "deis2": [200, 400, 800, 1600, 3200, 6400],
            "deis3": [50, 100, 200, 400, 800],
            "deis4": [25, 50, 100, 200, 400],
            "deis5": [40, 60, 80, 100, 150, 200],
        }
        return Setup("ks", kuramoto_sivashinsky.make_problem(10.0), deis, [800, 1600, 3200], 6400, 1e-12)

    def ac() -> Setup:
        deis = {
            "deis2": [25, 50, 100, 200, 400, 800, 1600, 3200],
            "deis3": [25, 50, 100, 200, 400, 800],
            "deis4": [25, 50, 75, 100, 200, 400],
            "deis5": [50, 75, 100, 150, 200, 400],
        }
        return Setup("ac", allen_cahn.make_problem(10.0), deis, [40000, 80000], 6400, 1e-12)

    def gs() -> Setup:
        deis = {
            "deis2": [100, 200, 400, 800, 1600],
            "deis3": [25, 50, 100, 200, 400],
            "deis4": [25, 50, 100, 200, 400],
            "deis5": [25, 50, 75, 100, 200, 400],
        }
        # dopri5 needs about a minute per run here: a longer cap, and two tolerances
        return Setup("gs", gray_scott.make_problem(100.0), deis, [1000, 2000], 3200, 1e-11, 150.0, (1e-4, 1e-6))

    return {"ks": ks, "ac": ac, "gs": gs}


# --------------------------------------------------------------------------------------------- timing


#: The clock of the reported times: process CPU time by default (``--clock cpu``), which on an idle machine equals the
#: wall time of these single-threaded runs and is not inflated when other processes share the cores; ``--clock wall``.
CLOCK: Callable[[], float] = time.process_time


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best time (on :data:`CLOCK`) of repeated calls and the last result: at most ``repeats`` calls, and no more
    once a second has been spent (a single call when it takes over a second)."""
    best, result, spent = math.inf, None, 0.0
    for _ in range(repeats):
        start = CLOCK()
        result = fn()
        elapsed = CLOCK() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > 1.0:
            break
    return best, result


class CappedNonlinear:
    """Replaces ``ode.nonlinear`` inside a ``with`` block by a wrapper that raises :class:`OverBudget` once
    ``cap`` seconds have passed since entering, and counts the calls."""

    def __init__(self, ode: torch.nn.Module, cap: float) -> None:
        self.ode, self.cap, self.count = ode, cap, 0

    def __enter__(self) -> CappedNonlinear:
        self.inner = self.ode.nonlinear
        self.deadline = time.perf_counter() + self.cap
        outer = self

        def capped(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            outer.count += 1
            if time.perf_counter() > outer.deadline:
                raise OverBudget
            return outer.inner(t, x)

        self.ode.nonlinear = capped
        return self

    def __exit__(self, *exc: object) -> None:
        self.ode.nonlinear = self.inner


# --------------------------------------------------------------------------------------------- runners


def final_time(problem: SpectralProblem) -> torch.Tensor:
    return torch.tensor([0.0, problem.t_end], dtype=torch.float64)


def deis_solve(problem: SpectralProblem, method: str, steps: int) -> torch.Tensor:
    options = {"step_size": problem.t_end / steps}
    return torchdiffeq.odeint(problem.ode, problem.x0, final_time(problem), method=method, options=options)[-1]


def run_deis(problem: SpectralProblem, method: str, steps: int, ref: torch.Tensor, repeats: int) -> Point:
    try:
        seconds, end = timed(lambda: deis_solve(problem, method, steps), repeats)
    except FloatingPointError:  # the step is beyond the method's stability limit on this problem
        return Point(method, f"M={steps}", 0, math.nan, math.nan, note="unstable")
    with count_evaluations(problem.ode) as calls:
        deis_solve(problem, method, steps)
    return Point(method, f"M={steps}", calls.count, seconds, relative_error(problem, end, ref))


def rms(problem: SpectralProblem) -> float:
    return float(torch.linalg.vector_norm(problem.x0) / math.sqrt(2 * problem.x0.numel()))


def run_torchdiffeq(
    problem: SpectralProblem, method: str, setting: float, ref: torch.Tensor, repeats: int, cap: float
) -> Point:
    if method == "rk4":
        kwargs = {"options": {"step_size": problem.t_end / setting}}
        label = f"M={int(setting)}"
    else:
        kwargs = {"rtol": setting, "atol": setting * rms(problem)}
        label = f"rtol={setting:.0e}"
    counter = None

    def solve() -> torch.Tensor:
        nonlocal counter
        with CappedNonlinear(problem.ode, cap) as counter:
            return torchdiffeq.odeint(problem.ode, problem.x0, final_time(problem), method=method, **kwargs)[-1]

    family = f"torchdiffeq {method}"
    start = time.perf_counter()
    try:
        seconds, end = timed(solve, repeats)
    except OverBudget:
        return Point(family, label, counter.count, time.perf_counter() - start, math.nan, note="capped")
    error = relative_error(problem, end, ref)
    if not math.isfinite(error):
        return Point(family, label, counter.count, seconds, math.nan, note="unstable")
    return Point(family, label, counter.count, seconds, error)


def scipy_options(system: PackedSystem, problem: SpectralProblem, method: str, jac: str) -> dict:
    if jac == "none":
        return {}
    if jac == "exact":
        return {"jac": problem.dense_jacobian}
    if method == "LSODA":
        bands, banded = system.banded_linear_jacobian()
        return {"jac": banded, **bands}
    return {"jac": system.sparse_linear_jacobian()}


def run_scipy(
    problem: SpectralProblem, method: str, jac: str, rtol: float, ref: torch.Tensor, repeats: int, cap: float
) -> Point:
    system = PackedSystem(problem)
    options = scipy_options(system, problem, method, jac)
    family = f"scipy {method}" + ("" if jac == "none" else f" {'diag(L)' if jac == 'linear' else 'exact J'}")
    label = f"rtol={rtol:.0e}"

    def solve():
        system.evaluations = 0
        deadline = time.perf_counter() + cap

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            if time.perf_counter() > deadline:
                raise OverBudget
            return system.rhs(t, y)

        sol = solve_ivp(
            rhs, (0.0, problem.t_end), system.y0, method=method, rtol=rtol, atol=rtol * rms(problem), **options
        )
        return sol

    start = time.perf_counter()
    try:
        with np.errstate(all="ignore"):  # explicit methods overflow before their step-size control catches up
            seconds, sol = timed(solve, repeats)
    except OverBudget:
        return Point(family, label, system.evaluations, time.perf_counter() - start, math.nan, note="capped")
    if not sol.success:
        return Point(family, label, system.evaluations, seconds, math.nan, note="failed")
    end = torch.from_numpy(unpack(sol.y[:, -1], system.shape).copy())
    return Point(family, label, system.evaluations, seconds, relative_error(problem, end, ref), jacobians=sol.njev)


# --------------------------------------------------------------------------------------------- analysis


def at_target(points: list[Point], target: float) -> tuple[str, float, float | None, float | None]:
    """``(relation, seconds, evaluations, jacobians)`` to reach ``target``: relation is "=" (interpolated), "<="
    (the cheapest point reaches it) or ">" (none does; seconds is then the largest time spent)."""
    done = sorted((p for p in points if p.ok), key=lambda p: p.seconds)
    hits = [p for p in done if p.error <= target]
    if not hits:
        spent = max((p.seconds for p in points), default=math.nan)
        return ">", spent, None, None
    hi = hits[0]
    misses = [p for p in done if p.seconds < hi.seconds and p.error > target]
    if not misses:
        return "<=", hi.seconds, hi.evaluations, hi.jacobians
    lo = misses[-1]
    w = math.log(target / lo.error) / math.log(hi.error / lo.error)

    def interp(a: float, b: float) -> float:
        return math.exp((1 - w) * math.log(max(a, 1e-300)) + w * math.log(max(b, 1e-300)))

    jac = interp(lo.jacobians, hi.jacobians) if lo.jacobians and hi.jacobians else hi.jacobians
    return "=", interp(lo.seconds, hi.seconds), interp(lo.evaluations, hi.evaluations), jac


def fmt_time(relation: str, seconds: float) -> str:
    prefix = {"=": "", "<=": "<= ", ">": "> "}[relation]
    return f"{prefix}{seconds:.3g} s"


def fmt_evals(evaluations: float | None, jacobians: float | None) -> str:
    if evaluations is None:
        return "-"
    text = f"{evaluations:.0f}"
    return text + (f" (+{jacobians:.0f} J)" if jacobians else "")


# --------------------------------------------------------------------------------------------- where the time goes


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    best = math.inf
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


class _Stopwatch:
    """Wraps ``owner.name`` (a function) in a timer that adds to ``spent[key]`` until :meth:`restore`."""

    def __init__(self, owner: object, name: str, spent: dict[str, float], key: str) -> None:
        self.owner, self.name = owner, name
        self.inner = getattr(owner, name)
        inner = self.inner

        def timed_call(*args: object, **kwargs: object) -> object:
            start = CLOCK()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[key] += CLOCK() - start

        setattr(owner, name, timed_call)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.inner)


def breakdown(problem: SpectralProblem, method: str, steps: int) -> dict[str, float]:
    """Seconds of one deis solve spent in its parts.

    Timed inside the solve (with timers around the pieces): the user's ``N``, and building the coefficients (the
    adapter's ``build_plan`` and ``place_plan``, and the fused loop's ``coefficient_stacks``). Timed apart, on the
    same plan: the step arithmetic (for a state of at most ``FUSED_MAX_ELEMENTS`` elements the fused loop's three
    tensor operations per step: storing ``N`` in the buffer, the product and the sum; for a larger one the unfused
    update's ``1 + K``) and the FFT pair inside ``N``. The rest of the solve is the loop's Python, the
    warm-up's updates, the finiteness sums and the adapter. A bare loop (``N`` and the step arithmetic only, over
    the main steps) gives what a step costs at least.
    """
    ode = problem.ode
    keys = ("N", "plan")
    plain = best_of(lambda: deis_solve(problem, method, steps), 3)
    best: dict[str, float] = {"total": math.inf}
    for _ in range(3):
        spent = dict.fromkeys(keys, 0.0)
        watches = [
            _Stopwatch(ode, "nonlinear", spent, "N"),
            _Stopwatch(adapter, "build_plan", spent, "plan"),
            _Stopwatch(adapter, "place_plan", spent, "plan"),
            _Stopwatch(fused, "coefficient_stacks", spent, "plan"),
        ]
        try:
            with count_evaluations(ode) as calls:
                start = CLOCK()
                deis_solve(problem, method, steps)
                total = CLOCK() - start
        finally:
            for watch in reversed(watches):
                watch.restore()
        if total < best["total"]:
            best = {"total": total, **spent, "evaluations": calls.count}
    x0 = problem.x0
    if problem.name == "NLS":
        per_fft = best_of(lambda: torch.fft.fft(torch.fft.ifft(x0)), 20)
    elif x0.dim() == 1:
        n = problem.physical(x0).shape[-1]
        per_fft = best_of(lambda: torch.fft.rfft(torch.fft.irfft(x0, n=n)), 20)
    else:
        shape = problem.physical(x0).shape[-2:]
        per_fft = best_of(lambda: torch.fft.rfft2(torch.fft.irfft2(x0, s=shape)), 20)
    best["FFT"] = per_fft * best["evaluations"]
    # the engine's step on the same plan, fused or not as the engine chooses for this state, with and without N
    # (its values are not the solution: the warm-up is skipped; its time per step is what counts)
    order = int(method[-1])
    grid = torch.linspace(0.0, problem.t_end, steps + 1, dtype=torch.float64)
    plan = adapter.place_plan(adapter.build_plan(ode.exponential_form(), "t", grid, order, "full_order"), x0)
    times = grid.unbind()
    value = ode.nonlinear(times[0], x0)
    best["fused"] = x0.numel() <= multistep.FUSED_MAX_ELEMENTS
    if best["fused"]:
        stacks = fused.coefficient_stacks(plan.main, order, x0)
        buffer = torch.zeros((order + 1, *x0.shape), dtype=x0.dtype)
        rows, scratch = buffer.unbind(0), torch.empty_like(buffer)
        state = rows[order]

        def loop(with_n: bool) -> None:
            state.copy_(x0)
            for update, stack in zip(plan.main, stacks, strict=True):
                out = ode.nonlinear(times[update.source], state) if with_n else value
                rows[update.source % order].copy_(out)
                torch.sum(torch.mul(stack, buffer, out=scratch), dim=0, out=state)

    else:

        def loop(with_n: bool) -> None:
            values = dict.fromkeys(range(order), value)
            x = x0
            for update in plan.main:
                values[update.source] = ode.nonlinear(times[update.source], x) if with_n else value
                x = multistep.apply_update(update, x, values)
                values.pop(update.source - order + 1, None)

    best["arithmetic"] = best_of(lambda: loop(False), 3) / len(plan.main) * best["evaluations"]
    best["bare"] = best_of(lambda: loop(True), 3) / len(plan.main) * best["evaluations"]
    best["other"] = best["total"] - sum(best[k] for k in (*keys, "arithmetic"))
    best["plain"] = plain
    return best


# --------------------------------------------------------------------------------------------- main


def reference_state(setup: Setup, check_radau: bool, log: Callable[[str], None]) -> torch.Tensor:
    problem = setup.problem
    start = time.perf_counter()
    ref = deis_solve(problem, "deis4", setup.reference_steps)
    half = deis_solve(problem, "deis4", setup.reference_steps // 2)
    log(
        f"reference: deis4 with {setup.reference_steps} steps ({time.perf_counter() - start:.1f} s with the check); "
        f"difference from {setup.reference_steps // 2} steps: {relative_error(problem, half, ref):.1e}"
    )
    if check_radau:
        system = PackedSystem(problem)
        jac = "exact" if problem.dense_jacobian is not None else "linear"
        options = scipy_options(system, problem, "Radau", jac)
        start = time.perf_counter()
        rtol = setup.radau_rtol
        sol = solve_ivp(
            system.rhs, (0.0, problem.t_end), system.y0, method="Radau", rtol=rtol, atol=rtol * rms(problem), **options
        )
        radau = torch.from_numpy(unpack(sol.y[:, -1], system.shape).copy())
        log(
            f"check: scipy Radau ({'exact J' if jac == 'exact' else 'diag(L)'}, rtol {rtol:g}, "
            f"{sol.nfev} evaluations, {time.perf_counter() - start:.1f} s) differs from the reference by "
            f"{relative_error(problem, radau, ref):.1e}"
        )
    return ref


def sweep(setup: Setup, args: argparse.Namespace, ref: torch.Tensor, log: Callable[[str], None]) -> list[Point]:
    problem = setup.problem
    repeats = 3 if args.quick else 7
    points: list[Point] = []
    stop = min(TARGETS) / 3  # a point this accurate brackets every target: finer ones are not needed

    def record(point: Point) -> Point:
        points.append(point)
        extra = f" +{point.jacobians} J" if point.jacobians else ""
        err = f"{point.error:.2e}" if point.ok else point.note
        log(
            f"  {point.family:<26} {point.setting:<11} {point.evaluations:>7d}{extra:<8} "
            f"{point.seconds:>9.4f} s   {err}"
        )
        return point

    for method, steps in setup.deis_steps.items():
        for m in steps[::2] if args.quick else steps:
            if record(run_deis(problem, method, m, ref, repeats)).error < stop:
                break
    rtols = [1e-2, 1e-4, 1e-6, 1e-8] if args.quick else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-11]
    scipy_methods = [("RK45", "none"), ("DOP853", "none")]
    for method in ("BDF", "Radau", "LSODA"):
        scipy_methods.append((method, "linear"))
        if problem.dense_jacobian is not None:
            scipy_methods.append((method, "exact"))
    for method, jac in scipy_methods:
        for rtol in rtols:
            point = record(run_scipy(problem, method, jac, rtol, ref, repeats, args.cap))
            if not point.ok or point.error < stop:
                break
    dopri5_cap = args.dopri5_cap or (args.cap if args.quick else setup.dopri5_cap)
    for rtol in (setup.dopri5_rtols or rtols) if not args.quick else rtols:
        point = record(run_torchdiffeq(problem, "dopri5", rtol, ref, repeats, dopri5_cap))
        if not point.ok or point.error < stop:
            break
    for m in setup.rk4_steps:
        point = record(run_torchdiffeq(problem, "rk4", m, ref, repeats, args.cap))
        if point.note == "capped" or (point.ok and point.error < stop):
            break
    return points


def summarise(points: list[Point], log: Callable[[str], None]) -> dict[str, dict[float, tuple]]:
    families = list(dict.fromkeys(p.family for p in points))
    table = {f: {t: at_target([p for p in points if p.family == f], t) for t in TARGETS} for f in families}
    log(f"\n  {'method':<26} " + " ".join(f"{'time to ' + format(t, '.0e'):>14} {'N evals':>14}" for t in TARGETS))
    for f in families:
        cells = []
        for t in TARGETS:
            rel, sec, ev, jac = table[f][t]
            cells.append(f"{fmt_time(rel, sec):>14} {fmt_evals(ev, jac):>14}")
        log(f"  {f:<26} " + " ".join(cells))
    return table


def best(table: dict, prefix: str, target: float) -> tuple[str, tuple]:
    rows = {f: v[target] for f, v in table.items() if f.startswith(prefix)}
    reached = {f: v for f, v in rows.items() if v[0] != ">"}
    pool = reached or rows
    name = min(pool, key=lambda f: pool[f][1])
    return name, pool[name]


def rhs_costs(problem: SpectralProblem) -> tuple[float, float]:
    """Seconds of one evaluation of ``N`` in torch (what deis calls) and of scipy's numpy right-hand side."""
    t0 = torch.zeros((), dtype=torch.float64)
    torch_n = best_of(lambda: problem.ode.nonlinear(t0, problem.x0), 20)
    system = PackedSystem(problem)
    numpy_rhs = best_of(lambda: system.rhs(0.0, system.y0), 20)
    return torch_n, numpy_rhs


def ratio(slow: tuple, fast: tuple) -> str:
    """``slow / fast`` as text: a value, or the bound that the relations ("=", "<=", ">") of the two times allow."""
    (rel_s, sec_s, *_), (rel_f, sec_f, *_) = slow, fast
    value = f"{sec_s / sec_f:.3g}x"
    if rel_f == "=":
        return {"=": value, "<=": "<= " + value, ">": "> " + value}[rel_s]
    if rel_f == "<=":  # the fast time is at most sec_f: the ratio is at least the value
        return {"=": ">= " + value, "<=": "?", ">": "> " + value}[rel_s]
    return {"=": "< " + value, "<=": "< " + value, ">": "?"}[rel_s]  # the fast time exceeds sec_f


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["ks", "ac", "gs"], choices=["ks", "ac", "gs"])
    parser.add_argument("--quick", action="store_true", help="fewer points and repeats, tighter caps, no Radau check")
    parser.add_argument("--cap", type=float, default=None, help="wall-time cap per run in seconds (20; quick: 5)")
    parser.add_argument("--dopri5-cap", type=float, default=None, help="cap for dopri5 runs (20; gs 150; quick: 5)")
    parser.add_argument(
        "--check-reference",
        nargs="*",
        default=None,
        choices=["ks", "ac", "gs"],
        help="problems whose reference is checked against scipy Radau (default all; quick: none)",
    )
    parser.add_argument("--reference-only", action="store_true", help="compute and check the references, then stop")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="clock of the reported times")
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of error against time (needs matplotlib)")
    parser.add_argument("--replot", metavar="OUTPUT", help="only draw --plot from a saved output (--out)")
    args = parser.parse_args(argv)
    if args.replot:
        plot(read_points(args.replot), args.plot or "stiff.png", args.clock)
        return
    if args.cap is None:
        args.cap = 5.0 if args.quick else 20.0
    if args.check_reference is None:
        args.check_reference = [] if args.quick else ["ks", "ac", "gs"]
    torch.set_num_threads(1)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    log(f"# {' '.join(['python', 'benchmarks/stiff.py', *(sys.argv[1:] if argv is None else argv)])}")
    log(
        f"# deis_ode {deis_ode.__version__}, torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, "
        f"scipy {scipy.__version__}, numpy {np.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, torch threads {torch.get_num_threads()}; cap per run {args.cap:g} s, "
        f"dopri5 {args.dopri5_cap or '20 (Gray-Scott 150)'} s; times on the {args.clock} clock"
    )
    started = time.perf_counter()
    all_points: dict[str, list[Point]] = {}
    summary: dict[str, dict] = {}
    builders = setups(args.quick)
    for key in args.problems:
        setup = builders[key]()
        problem = setup.problem
        log(f"\n## {problem.description}, t in [0, {problem.t_end:g}]")
        torch_n, numpy_rhs = rhs_costs(problem)
        log(
            f"one evaluation: N in torch (deis) {1e6 * torch_n:.1f} us; the right-hand side in numpy (scipy) "
            f"{1e6 * numpy_rhs:.1f} us"
        )
        ref = reference_state(setup, check_radau=key in args.check_reference, log=log)
        if args.reference_only:
            continue
        log(f"  {'method':<26} {'setting':<11} {'N evals':>7}{'':<8} {'time':>11}   error")
        points = sweep(setup, args, ref, log)
        all_points[key] = points
        table = summarise(points, log)
        summary[key] = table

        ours = best(table, "deis", TARGETS[-1])[0]
        steps = _steps_for(points, ours, TARGETS[-1])
        parts = breakdown(problem, ours, steps)
        total = parts["total"]
        log(
            f"\n  where the time of {ours} goes ({steps} steps, {parts['evaluations']} evaluations, "
            f"{'fused' if parts['fused'] else 'unfused'} steps; {parts['plain']:.4f} s, {total:.4f} s with the timers):"
        )
        labels = {
            "N": "evaluations of N",
            "FFT": "  of which FFTs",
            "plan": "building the coefficients",
            "arithmetic": "step arithmetic",
            "other": "rest (Python, warm-up, checks)",
        }
        for name, label in labels.items():
            log(
                f"    {label:<28} {parts[name]:9.4f} s  {100 * parts[name] / total:5.1f} %  "
                f"{1e6 * parts[name] / parts['evaluations']:8.1f} us per evaluation"
            )
        log(
            f"    a bare loop (N and the coefficient updates only) would take {parts['bare']:.4f} s "
            f"({1e6 * parts['bare'] / parts['evaluations']:.1f} us per evaluation)"
        )
        sp_name, sp = best(table, "scipy", TARGETS[-1])
        sp_runs = [p for p in points if p.family == sp_name and p.ok and p.error <= TARGETS[-1]]
        if sp_runs:
            run = min(sp_runs, key=lambda p: p.seconds)
            in_rhs = run.evaluations * numpy_rhs
            log(
                f"  best scipy, {sp_name} at {run.setting}: {run.seconds:.4f} s, of which about {in_rhs:.4f} s "
                f"({100 * in_rhs / run.seconds:.0f} %) in its {run.evaluations} right-hand sides"
            )

    log(f"\n## summary: time ({args.clock} clock, one thread) and evaluations of N to reach the target relative error")
    log(
        f"  {'problem':<8} {'target':<7} {'best deis':<30} {'best scipy':<46} {'scipy/deis':>10}  "
        f"{'torchdiffeq dopri5':<26} {'dopri5/deis':>11}"
    )
    for key, table in summary.items():
        for target in TARGETS:
            ours_name, ours = best(table, "deis", target)
            sp_name, sp = best(table, "scipy", target)
            dp = table.get("torchdiffeq dopri5", {}).get(target, (">", math.nan, None, None))
            cell_ours = f"{ours_name} {fmt_time(ours[0], ours[1])} ({fmt_evals(ours[2], None)})"
            cell_sp = f"{sp_name.removeprefix('scipy ')} {fmt_time(sp[0], sp[1])} ({fmt_evals(sp[2], sp[3])})"
            cell_dp = f"{fmt_time(dp[0], dp[1])} ({fmt_evals(dp[2], None)})"
            log(
                f"  {key:<8} {target:<7.0e} {cell_ours:<30} {cell_sp:<46} {ratio(sp, ours):>10}  "
                f"{cell_dp:<26} {ratio(dp, ours):>11}"
            )
    log(f"\n# total {time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.plot:
        plot(all_points, args.plot, args.clock)


def _steps_for(points: list[Point], family: str, target: float) -> int:
    """The step count of the cheapest measured run of ``family`` that reaches ``target`` (else the finest)."""
    runs = [p for p in points if p.family == family and p.ok]
    hits = [p for p in runs if p.error <= target]
    chosen = min(hits, key=lambda p: p.seconds) if hits else max(runs, key=lambda p: p.seconds)
    return int(chosen.setting.removeprefix("M="))


def read_points(path: str) -> dict[str, list[Point]]:
    """The measured points of a saved output (``--out``), by problem, for ``--replot``."""
    keys = {"Kuramoto": "ks", "Allen": "ac", "Gray": "gs"}
    pattern = re.compile(r"^  (\S.{25}) (\S+)\s+(\d+)(?: \+(\d+) J)?\s+([0-9.]+) s   (\S+)$")
    points: dict[str, list[Point]] = {}
    key = None
    for line in Path(path).read_text().splitlines():
        if line.startswith("## ") and not line.startswith("## summary"):
            key = next((k for name, k in keys.items() if line[3:].startswith(name)), None)
            points.setdefault(key, [])
        elif key and (match := pattern.match(line)):
            family, setting, evals, jacs, seconds, error = match.groups()
            value = float(error) if error[0].isdigit() else math.nan
            note = "" if error[0].isdigit() else error
            points[key].append(Point(family.strip(), setting, int(evals), float(seconds), value, int(jacs or 0), note))
    return {k: v for k, v in points.items() if k and v}


def plot(all_points: dict[str, list[Point]], path: str, clock: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"ks": "Kuramoto-Sivashinsky", "ac": "Allen-Cahn", "gs": "Gray-Scott 256 x 256"}
    palette = plt.get_cmap("tab10").colors
    methods = ["deis2", "deis3", "deis4", "RK45", "DOP853", "BDF", "Radau", "LSODA", "dopri5", "rk4"]
    fig, axes = plt.subplots(1, len(all_points), figsize=(4.6 * len(all_points), 4.9), squeeze=False)
    legend: dict[str, object] = {}  # one legend for all panels, below them: inside a panel it covers data
    for ax, (key, points) in zip(axes[0], all_points.items(), strict=True):
        for family in dict.fromkeys(p.family for p in points):
            runs = sorted((p for p in points if p.family == family and p.ok), key=lambda p: p.seconds)
            if not runs:
                continue
            label = family.replace("scipy ", "").replace("torchdiffeq ", "")
            method = label.split()[0]
            deis = family.startswith("deis")
            if deis:
                style = "-o"
            elif family.startswith("scipy"):
                style = "-.s" if "exact" in family else "--s"
            else:
                style = ":^"
            ax.loglog(
                [p.seconds for p in runs],
                [p.error for p in runs],
                style,
                color=palette[methods.index(method) % len(palette)] if method in methods else "black",
                ms=3,
                lw=1.8 if deis else 0.9,
                label=label,
            )
        for target in TARGETS:
            ax.axhline(target, color="grey", lw=0.5)
        ax.set_ylim(1e-12, 1)
        ax.set_title(titles[key])
        ax.set_xlabel(f"time [s], one thread ({clock} clock)")
        ax.set_ylabel("relative error at the final time")
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=8, fontsize=7, frameon=False)
    rows = -(-len(legend) // 8)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.01, 1, 1))
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
