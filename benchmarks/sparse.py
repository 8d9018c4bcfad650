"""Sparse linear parts: time and evaluations to a relative error of 1e-4 and 1e-6 on the 2-D Dirichlet
reaction-diffusion problem (``examples/reaction_diffusion_fd.py``, 128 x 128 interior points, d = 16384).

    python benchmarks/sparse.py --out benchmarks/results/sparse.txt
    python benchmarks/sparse.py --quick          # 48 x 48 points, fewer settings (under a minute)
    python benchmarks/sparse.py --n 256 --no-check --out benchmarks/results/sparse_256.txt   # d = 65536
    python benchmarks/sparse.py --adaptive --no-check --out benchmarks/results/sparse_adaptive.txt

Methods:

* ``deis2`` .. ``deis5`` (``full_order`` warm-up, Krylov phi-products with the default tolerance ``1e-10``, and
  deis4 also with ``krylov_tol=1e-8``): the number of steps ``M`` of the grid ``t_i = T (i / M)^2``, refined
  towards ``t = 0`` where the solution has an initial layer (``reaction_diffusion_fd.time_grid``); deis4 also on
  uniform grids ("uniform"), where the initial layer costs it its order;
* scipy ``solve_ivp`` ``BDF`` and ``Radau`` given the exact sparse Jacobian ``A + diag(N'(u))`` (a callable returning
  a scipy sparse matrix, so their linear algebra is sparse LU), and ``RK45``: ``rtol`` from 1e-3 down,
  ``atol = rtol * rms(u0)``; the right-hand side ``A u + N(u)`` in numpy/scipy.sparse;
* torchdiffeq ``dopri5`` on the same ``SemiLinearODE`` (its ``forward`` applies the torch sparse matrix);
* with ``--adaptive``: the error-controlled ``adaptive_deis3`` .. ``adaptive_deis5`` (two Krylov products per
  attempted step, the Krylov tolerance ``min(1e-10, 0.01 rtol)``), ``rtol`` from 1e-3 down, ``atol = rtol * rms(u0)``,
  beside deis4, deis5 and BDF only (the other families are left out of that run).

Times are process CPU time (``time.process_time``) with one thread, the best of up to three runs; a run is capped
(``--cap``, 60 s) and reported as "> cap". The error is the relative 2-norm error at the final time against a
reference from deis5 with many more steps (Krylov tolerance 1e-13), whose own error is estimated by halving its step
and checked against scipy Radau at rtol 1e-10. A sweep stops once its error is below a third of 1e-6. The time (and
evaluations) to reach a target is interpolated in log-log between the cheapest point that reaches it and the most
expensive cheaper point that does not; "<= t" means the cheapest measured point already reaches it.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import torch
import torchdiffeq
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import reaction_diffusion_fd as rd

import deis_ode

warnings.filterwarnings("ignore", message="Sparse .*")
TARGETS = (1e-4, 1e-6)
CLOCK = time.process_time


class OverBudget(Exception):
    pass


@dataclass
class Point:
    family: str
    setting: str
    evaluations: int  # evaluations of N (deis) or of the right-hand side (others)
    seconds: float
    error: float
    extra: str = ""  # Krylov statistics, Jacobians and LU factorisations

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeats):
        start = CLOCK()
        out = fn()
        best = min(best, CLOCK() - start)
        if best > 2.0:
            break
    return best, out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_deis(
    problem: rd.FDProblem, method: str, steps: int, ref: np.ndarray, repeats: int, cap: float, **options
) -> Point:
    count = [0]
    nonlinear = problem.ode.nonlinear
    deadline = [0.0]

    def counted(t, u):
        count[0] += 1
        if time.perf_counter() > deadline[0]:
            raise OverBudget
        return nonlinear(t, u)

    def solve():
        count[0] = 0
        deadline[0] = time.perf_counter() + cap
        return rd.solve(problem, method, steps, **options)

    problem.ode.nonlinear = counted
    label = method + ("" if not options else " " + ",".join(f"{k}={v:g}" for k, v in options.items()))
    label = label.replace("grading=2", "").replace("grading=1", "uniform").replace(" ,", " ").strip()
    try:
        seconds, u = timed(solve, repeats)
    except OverBudget:
        return Point(label, f"M={steps}", count[0], cap, math.nan, "capped")
    finally:
        problem.ode.nonlinear = nonlinear
    s = problem.ode.krylov_stats
    extra = (
        f"Krylov dim mean {s.mean_dim:.1f} max {s.max_dim}, substeps/product max {s.max_substeps}, A-apps {s.matvecs}"
    )
    return Point(label, f"M={steps}", count[0], seconds, rel(u.numpy(), ref), extra)


def run_adaptive(problem: rd.FDProblem, method: str, rtol: float, ref: np.ndarray, repeats: int, cap: float) -> Point:
    count = [0]
    nonlinear = problem.ode.nonlinear
    deadline = [0.0]
    atol = rtol * float(problem.x0.pow(2).mean().sqrt())
    t = torch.tensor([0.0, problem.t_end], dtype=torch.float64)

    def counted(tt, u):
        count[0] += 1
        if time.perf_counter() > deadline[0]:
            raise OverBudget
        return nonlinear(tt, u)

    def solve():
        count[0] = 0
        deadline[0] = time.perf_counter() + cap
        return torchdiffeq.odeint(problem.ode, problem.x0, t, method=method, rtol=rtol, atol=atol)[-1]

    problem.ode.nonlinear = counted
    try:
        seconds, u = timed(solve, repeats)
    except OverBudget:
        return Point(method, f"rtol={rtol:.0e}", count[0], cap, math.nan, "capped")
    finally:
        problem.ode.nonlinear = nonlinear
    s, steps = problem.ode.krylov_stats, deis_ode.adaptive.AdaptiveDEISSolver.last_stats
    extra = (
        f"{steps.accepted} accepted, {steps.rejected} rejected; Krylov dim mean {s.mean_dim:.1f} max {s.max_dim}, "
        f"substeps/product max {s.max_substeps}, A-apps {s.matvecs}"
    )
    return Point(method, f"rtol={rtol:.0e}", count[0], seconds, rel(u.numpy(), ref), extra)


def run_scipy(problem: rd.FDProblem, method: str, rtol: float, ref: np.ndarray, repeats: int, cap: float) -> Point:
    y0 = problem.x0.numpy()
    atol = rtol * float(np.sqrt(np.mean(y0**2)))
    deadline = [0.0]

    def rhs(t, y):
        if time.perf_counter() > deadline[0]:
            raise OverBudget
        return problem.rhs(t, y)

    options = {} if method == "RK45" else {"jac": problem.jac}

    def solve():
        deadline[0] = time.perf_counter() + cap
        return solve_ivp(
            rhs, (0.0, problem.t_end), y0, method=method, rtol=rtol, atol=atol, t_eval=[problem.t_end], **options
        )

    family = f"scipy {method}" + ("" if method == "RK45" else " (exact sparse J)")
    try:
        seconds, sol = timed(solve, repeats)
    except OverBudget:
        return Point(family, f"rtol={rtol:.0e}", 0, cap, math.nan, "capped")
    if not sol.success:
        return Point(family, f"rtol={rtol:.0e}", sol.nfev, seconds, math.nan, sol.message)
    extra = "" if method == "RK45" else f"{sol.njev} Jacobians, {sol.nlu} LU"
    return Point(family, f"rtol={rtol:.0e}", sol.nfev, seconds, rel(sol.y[:, -1], ref), extra)


def run_dopri5(problem: rd.FDProblem, rtol: float, ref: np.ndarray, cap: float) -> Point:
    count = [0]
    ode = problem.ode
    forward = type(ode).forward
    deadline = time.perf_counter() + cap

    class Counted(torch.nn.Module):
        def forward(self, t, x):
            count[0] += 1
            if time.perf_counter() > deadline:
                raise OverBudget
            return forward(ode, t, x)

    atol = rtol * float(problem.x0.pow(2).mean().sqrt())
    t = torch.tensor([0.0, problem.t_end], dtype=torch.float64)
    start = CLOCK()
    try:
        u = torchdiffeq.odeint(Counted(), problem.x0, t, method="dopri5", rtol=rtol, atol=atol)[-1]
    except OverBudget:
        return Point("torchdiffeq dopri5", f"rtol={rtol:.0e}", count[0], cap, math.nan, "capped")
    return Point("torchdiffeq dopri5", f"rtol={rtol:.0e}", count[0], CLOCK() - start, rel(u.numpy(), ref))


def to_target(points: list[Point], target: float) -> tuple[str, str]:
    """(time, evaluations) to reach ``target``, interpolated in log-log (see the module docstring)."""
    ok = sorted((p for p in points if p.ok), key=lambda p: p.seconds)
    reach = [p for p in ok if p.error <= target]
    capped = any(not p.ok and p.extra == "capped" for p in points)
    if not reach:
        worst = max((p.seconds for p in points), default=math.nan)
        return (f"> {worst:.3g} s" + (" (cap)" if capped else ""), "-")
    best = reach[0]
    below = [p for p in ok if p.seconds < best.seconds and p.error > target]
    if not below:
        return f"<= {best.seconds:.3g} s", f"<= {best.evaluations}"
    prev = below[-1]
    frac = math.log(target / prev.error) / math.log(best.error / prev.error)
    seconds = math.exp(math.log(prev.seconds) + frac * (math.log(best.seconds) - math.log(prev.seconds)))
    evals = math.exp(
        math.log(max(prev.evaluations, 1)) + frac * (math.log(best.evaluations) - math.log(max(prev.evaluations, 1)))
    )
    return f"{seconds:.3g} s", f"{evals:.0f}"


def observed_orders(say: Callable[[str], None], n: int = 48) -> None:
    """deis4's observed slopes on uniform and graded grids (the initial layer, see ``rd.time_grid``)."""
    problem = rd.make_problem(n)
    ref = rd.solve(problem, "deis5", 800, krylov_tol=1e-13).numpy()
    steps = (20, 40, 80, 160)
    for grading in (1.0, 2.0):
        errors = [rel(rd.solve(problem, "deis4", m, grading, krylov_tol=1e-12).numpy(), ref) for m in steps]
        slopes = ", ".join(f"{math.log2(errors[i] / errors[i + 1]):.2f}" for i in range(len(steps) - 1))
        say(
            f"deis4 on {n} x {n} points, grid t_i = T (i/M)^{grading:g}, M = {steps}: errors "
            + ", ".join(f"{e:.2e}" for e in errors)
            + f"; observed slopes {slopes}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=128, help="interior points per side (default 128)")
    parser.add_argument("--cap", type=float, default=60.0)
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--no-check", action="store_true", help="skip the reference's check against scipy Radau")
    parser.add_argument(
        "--adaptive", action="store_true", help="adaptive_deis3..5 beside deis4, deis5 and BDF only (see the docstring)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    n = 48 if args.quick else args.n
    problem = rd.make_problem(n)
    repeats = 1 if args.quick else 3
    cap = 10.0 if args.quick else args.cap
    say("# python benchmarks/sparse.py " + " ".join(sys.argv[1:] if argv is None else argv))
    say(
        f"# deis_ode {deis_ode.__version__}, torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, "
        f"scipy {scipy.__version__}, numpy {np.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, torch threads 1; cap per run {cap:g} s; times on the process CPU clock"
    )
    say()
    say(f"## {problem.description}")
    ref_steps = 400 if args.quick else 800
    start = CLOCK()
    ref = rd.solve(problem, "deis5", ref_steps, krylov_tol=1e-13).numpy()
    half = rd.solve(problem, "deis5", ref_steps // 2, krylov_tol=1e-13).numpy()
    say(
        f"reference: deis5 with {ref_steps} steps, krylov_tol 1e-13 ({CLOCK() - start:.1f} s with the check); "
        f"difference from {ref_steps // 2} steps: {rel(half, ref):.1e}"
    )
    if not args.no_check:
        start = CLOCK()
        y0 = problem.x0.numpy()
        sol = solve_ivp(
            problem.rhs,
            (0.0, problem.t_end),
            y0,
            method="Radau",
            rtol=1e-10,
            atol=1e-10 * float(np.sqrt(np.mean(y0**2))),
            jac=problem.jac,
            t_eval=[problem.t_end],
        )
        say(
            f"check: scipy Radau (exact sparse J, rtol 1e-10, {sol.nfev} evaluations, {CLOCK() - start:.1f} s) "
            f"differs from the reference by {rel(sol.y[:, -1], ref):.1e}"
        )
    if not args.quick and not args.adaptive:
        observed_orders(say)
    families: dict[str, list[Point]] = {}

    def sweep(name: str, settings, run) -> None:
        for setting in settings:
            point = run(setting)
            families.setdefault(point.family, []).append(point)
            say(
                f"  {point.family:34s} {point.setting:11s} {point.evaluations:8d} {point.seconds:10.3f} s   "
                f"{point.error:9.2e}   {point.extra}"
            )
            if not point.ok or point.error < TARGETS[-1] / 3:
                break

    say(f"  {'method':34s} {'setting':11s} {'evals':>8s} {'time':>12s}   {'error':>9s}")
    deis = {
        "deis2": [50, 100, 200, 400, 800],
        "deis3": [25, 50, 100, 200, 400],
        "deis4": [20, 30, 40, 60, 80, 120, 160],
        "deis5": [20, 30, 40, 60, 80, 120],
    }
    if args.quick:
        deis = {k: v[:3] for k, v in deis.items()}
    rtols = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]
    if args.adaptive:
        for method in ("deis4", "deis5"):
            sweep(method, deis[method], lambda m, method=method: run_deis(problem, method, m, ref, repeats, cap))
        for k in (3, 4, 5):
            method = f"adaptive_deis{k}"
            sweep(method, rtols[:6], lambda r, method=method: run_adaptive(problem, method, r, ref, repeats, cap))
        sweep("BDF", rtols, lambda r: run_scipy(problem, "BDF", r, ref, repeats, cap))
        report(say, families, args.out, lines)
        return 0
    for method, steps in deis.items():
        sweep(method, steps, lambda m, method=method: run_deis(problem, method, m, ref, repeats, cap))
    sweep("deis4 tol", deis["deis4"], lambda m: run_deis(problem, "deis4", m, ref, repeats, cap, krylov_tol=1e-8))
    uniform = [40, 80, 160, 320, 640]
    sweep("deis4 uniform", uniform, lambda m: run_deis(problem, "deis4", m, ref, repeats, cap, grading=1))
    for method in ("BDF", "Radau"):
        sweep(method, rtols, lambda r, method=method: run_scipy(problem, method, r, ref, repeats, cap))
    sweep("RK45", [1e-4, 1e-6, 1e-8], lambda r: run_scipy(problem, "RK45", r, ref, 1, cap))
    sweep("dopri5", [1e-4, 1e-6, 1e-8], lambda r: run_dopri5(problem, r, ref, cap))
    report(say, families, args.out, lines)
    return 0


def report(say: Callable[[str], None], families: dict[str, list[Point]], out: str | None, lines: list[str]) -> None:
    """The time and evaluations to each target, per family; the whole report to ``out`` when given."""
    say()
    say(f"  {'method':34s} " + " ".join(f"{'time to ' + f'{t:.0e}':>14s} {'evals':>7s}" for t in TARGETS))
    for family, points in families.items():
        cells = [to_target(points, t) for t in TARGETS]
        say(f"  {family:34s} " + " ".join(f"{c[0]:>14s} {c[1]:>7s}" for c in cells))
    if out:
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
