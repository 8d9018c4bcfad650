"""Error-controlled DEIS (``adaptive_deisK``): work-precision on stiff PDEs, tolerance proportionality, and model
evaluations on a diffusion drift. Single-threaded; times on the process CPU clock as in ``benchmarks/stiff.py``.

    python benchmarks/adaptive.py --part ks ac          # Kuramoto-Sivashinsky and Allen-Cahn (about 2 minutes)
    python benchmarks/adaptive.py --part gs             # Gray-Scott 2-D, 256 x 256 modes (about 4 minutes)
    python benchmarks/adaptive.py --part diffusion      # VP diffusion with the exact mixture model (under a minute)
    python benchmarks/adaptive.py --part ks --quick     # fewer points and repeats

Stiff problems (``examples/``, the set-ups and references of ``benchmarks/stiff.py``: a deis4 solve with many more
steps than any measured run, checked there against scipy Radau): at each ``rtol`` (``atol = rtol * rms(x0)``, as for
scipy and dopri5) ``adaptive_deis3/4/5`` are timed (best of up to 5 runs, fewer once a second is spent) beside scipy
``LSODA``, ``Radau`` and ``BDF`` with the Jacobian of the linear part ``diag(L)`` (their best setting in
``benchmarks/stiff.py``), torchdiffeq ``dopri5`` (capped: a run past the cap is reported as "> cap") and the
fixed-step ``deis4`` / ``deis5`` over their step counts. The time and the evaluations of ``N`` to reach a relative
error of 1e-4 and 1e-6 are interpolated in log-log between the measured points (``stiff.at_target``). The
tolerance table lists, for rtol 1e-3 .. 1e-9, the achieved relative error and its ratio to rtol.

Diffusion: the VP probability-flow ODE of ``benchmarks/accuracy.py`` (8-D mixture of narrow Gaussians, exact eps
model, diffusers' schedule, 256 samples), from t = 999 to the last diffusers level. ``adaptive_deis2..5`` (eps and
x0 splits) and torchdiffeq ``dopri5`` on the same drift over a range of tolerances; the error is the median over the
samples of the max-norm error against a DOP853 reference in lambda at rtol 1e-12 (``reference.InHalfLogSNR``), and
the model evaluations (NFE) to reach a median error of 1e-2, 3e-3, 1e-3 and 1e-4 are interpolated as above.
"""

# ruff: noqa: E402  (the thread settings and the path to examples/ come before some imports)
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch
import torchdiffeq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import stiff
from _spectral import relative_error
from stiff import Point, at_target, fmt_evals, fmt_time, ratio, rms, run_deis, run_scipy, run_torchdiffeq, timed

import deis_ode
from deis_ode import reference
from deis_ode.adaptive import AdaptiveDEISSolver
from deis_ode.diffusion import VPODE, GaussianMixture, GaussianMixtureEps, VPSchedule

F64 = torch.float64
TARGETS = (1e-4, 1e-6)
ADAPTIVE = ("adaptive_deis3", "adaptive_deis4", "adaptive_deis5")
TOLERANCES = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9)
SCIPY_RTOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9)
FIXED = {
    "ks": {"deis4": [50, 75, 100, 150, 200], "deis5": [60, 80, 100, 150]},
    "ac": {"deis4": [50, 75, 100, 150, 200], "deis5": [75, 100, 150, 200]},
    "gs": {"deis4": [50, 100, 150, 200], "deis5": [50, 75, 100, 200]},
}
DOPRI5 = {"ks": ((1e-4, 1e-6), 20.0), "ac": ((1e-6,), 10.0), "gs": ((1e-6,), 60.0)}


def run_adaptive(problem, method: str, rtol: float, ref: torch.Tensor, repeats: int) -> Point:
    t = stiff.final_time(problem)

    def solve() -> torch.Tensor:
        return torchdiffeq.odeint(problem.ode, problem.x0, t, method=method, rtol=rtol, atol=rtol * rms(problem))[-1]

    seconds, end = timed(solve, repeats)
    stats = AdaptiveDEISSolver.last_stats
    note = f"{stats.accepted} acc, {stats.rejected} rej"
    return Point(method, f"rtol={rtol:.0e}", stats.evaluations, seconds, relative_error(problem, end, ref), note=note)


def stiff_part(key: str, quick: bool, log) -> None:
    setup = stiff.setups(quick)[key]()
    problem = setup.problem
    log(f"\n## {problem.description}")
    torch_n, numpy_rhs = stiff.rhs_costs(problem)
    log(
        f"one evaluation: N in torch {torch_n * 1e6:.1f} us; "
        f"the right-hand side in numpy (scipy) {numpy_rhs * 1e6:.1f} us"
    )
    ref = stiff.reference_state(setup, check_radau=False, log=log)
    repeats = 2 if quick else 5
    points: list[Point] = []
    stop = min(TARGETS) / 3

    def record(point: Point) -> Point:
        points.append(point)
        extra = f" +{point.jacobians} J" if point.jacobians else ""
        err = f"{point.error:.2e}" if point.ok else point.note
        note = f"  ({point.note})" if point.ok and point.note else ""
        log(
            f"  {point.family:<24} {point.setting:<11} {point.evaluations:>7d}{extra:<8} {point.seconds:>9.4f} s"
            f"   {err}{note}"
        )
        return point

    for method in ADAPTIVE:
        for rtol in TOLERANCES[::2] if quick else TOLERANCES:
            record(run_adaptive(problem, method, rtol, ref, repeats))
    for method in ("LSODA", "Radau", "BDF"):
        for rtol in SCIPY_RTOLS:
            point = record(run_scipy(problem, method, "linear", rtol, ref, repeats, 20.0))
            if not point.ok or point.error < stop:
                break
    for method, steps in FIXED[key].items():
        for m in steps:
            if record(run_deis(problem, method, m, ref, repeats)).error < stop:
                break
    rtols, cap = DOPRI5[key]
    for rtol in rtols:
        point = record(run_torchdiffeq(problem, "dopri5", rtol, ref, 1, 5.0 if quick else cap))
        if not point.ok:
            break

    families = list(dict.fromkeys(p.family for p in points))
    table = {f: {t: at_target([p for p in points if p.family == f], t) for t in TARGETS} for f in families}
    log(f"\n  {'method':<24} " + " ".join(f"{'time to ' + format(t, '.0e'):>14} {'N evals':>14}" for t in TARGETS))
    for f in families:
        cells = [f"{fmt_time(table[f][t][0], table[f][t][1]):>14} {fmt_evals(*table[f][t][2:]):>14}" for t in TARGETS]
        log(f"  {f:<24} " + " ".join(cells))

    log("\n  summary at 1e-6: best adaptive vs best scipy, dopri5 and the best fixed-step deis")
    best_adaptive = stiff.best(table, "adaptive_deis", 1e-6)
    best_scipy = stiff.best(table, "scipy", 1e-6)
    best_fixed = stiff.best(table, "deis", 1e-6)
    dopri5 = table["torchdiffeq dopri5"][1e-6]
    name, row = best_adaptive
    log(f"  {'best adaptive':<16} {name:<22} {fmt_time(row[0], row[1])}")
    for label, (other, other_row) in (("best scipy", best_scipy), ("best fixed deis", best_fixed)):
        log(
            f"  {label:<16} {other:<22} {fmt_time(other_row[0], other_row[1]):<12} "
            f"{label}/adaptive: {ratio(other_row, row)}"
        )
    log(
        f"  {'dopri5':<16} {'torchdiffeq dopri5':<22} {fmt_time(dopri5[0], dopri5[1]):<12} "
        f"dopri5/adaptive: {ratio(dopri5, row)}"
    )

    log("\n  tolerance proportionality: achieved relative error (error / rtol)")
    log(f"  {'rtol':>8} " + " ".join(f"{m:>22}" for m in ADAPTIVE))
    for rtol in TOLERANCES[::2] if quick else TOLERANCES:
        cells = []
        for m in ADAPTIVE:
            p = next(p for p in points if p.family == m and p.setting == f"rtol={rtol:.0e}")
            cells.append(f"{p.error:>11.2e} ({p.error / rtol:>6.2f})")
        log(f"  {rtol:>8.0e} " + " ".join(f"{c:>22}" for c in cells))


# --------------------------------------------------------------------------------------------- diffusion


def diffusion_part(quick: bool, log) -> None:
    schedule = VPSchedule.diffusers()
    mixture = GaussianMixture.default(dim=8)
    model = GaussianMixtureEps(mixture, schedule)
    samples = 64 if quick else 256
    x_start = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    t_start, t_end = 999.0, 1.0
    span = torch.tensor([t_start, t_end], dtype=F64)
    log(
        f"\n## Diffusion: VP probability-flow ODE, {mixture!r} = GaussianMixture.default(dim=8), exact eps model, "
        f"VPSchedule.diffusers(), {samples} samples, t from {t_start:g} to {t_end:g}"
    )
    ode_eps = VPODE(model, schedule, extrapolate="eps")
    with torch.no_grad():
        start = time.perf_counter()
        lam = schedule.half_log_snr(span)
        ref = reference.solve(reference.InHalfLogSNR(ode_eps), x_start, lam, rtol=1e-12, atol=1e-12).states[-1]
    log(f"reference: DOP853 in lambda, rtol = atol = 1e-12 ({time.perf_counter() - start:.1f} s)")

    def error(x: torch.Tensor) -> float:
        return float((x - ref).abs().amax(dim=-1).median())

    rows: dict[str, list[tuple[float, int, float]]] = {}

    def run(label: str, ode, method: str, tol: float, **kwargs) -> None:
        with torch.no_grad(), deis_ode.verify.count_evaluations(ode) as calls:
            out = torchdiffeq.odeint(ode, x_start, span, method=method, rtol=tol, atol=tol, **kwargs)[-1]
        rows.setdefault(label, []).append((tol, calls.count, error(out)))
        log(f"  {label:<34} rtol=atol={tol:<7.0e} NFE {calls.count:>5d}   median error {error(out):.2e}")

    tolerances = (1e-3, 1e-4, 1e-5, 1e-6) if quick else (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
    for extrapolate in ("eps", "x0"):
        ode = VPODE(model, schedule, extrapolate=extrapolate)
        for k in (2, 3, 4, 5):
            for tol in tolerances:
                run(f"adaptive_deis{k} ({extrapolate} split)", ode, f"adaptive_deis{k}", tol)
    for tol in tolerances:
        run("torchdiffeq dopri5", ode_eps, "dopri5", tol, options={"step_t": span[1:]})

    log("\n  NFE to reach a median error (interpolated in log-log; '<= n': the cheapest run already reaches it)")
    targets = (1e-2, 3e-3, 1e-3, 1e-4)
    log(f"  {'method':<34} " + " ".join(f"{'NFE to ' + format(t, '.0e'):>14}" for t in targets))
    reached: dict[str, dict[float, tuple[str, float] | None]] = {}
    for label, pts in rows.items():
        reached[label] = {t: nfe_at(pts, t) for t in targets}
        cells = []
        for target in targets:
            hit = reached[label][target]
            text = f"> {max(p[1] for p in pts)}" if hit is None else f"{hit[0]}{hit[1]:.0f}"
            cells.append(f"{text:>14}")
        log(f"  {label:<34} " + " ".join(cells))
    for target in targets:
        ours = [(v[target][1], k, v[target][0]) for k, v in reached.items() if k.startswith("adaptive") and v[target]]
        dopri5 = reached["torchdiffeq dopri5"][target]
        if ours and dopri5 is not None:
            nfe, label, relation = min(ours)
            bound = ">= " if relation and not dopri5[0] else ""
            log(
                f"  at {target:.0e}: best {label} {relation}{nfe:.0f} NFE, dopri5 {dopri5[0]}{dopri5[1]:.0f} NFE: "
                f"{bound}{dopri5[1] / nfe:.2f}x fewer"
            )


def nfe_at(points: list[tuple[float, int, float]], target: float) -> tuple[str, float] | None:
    """``(relation, NFE)`` to reach ``target`` error: log-log interpolation between the cheapest point that reaches
    it and the most expensive cheaper point that does not (relation ``""``), or ``("<= ", NFE)`` when the cheapest
    point already reaches it; ``None`` when no point does."""
    done = sorted(points, key=lambda p: p[1])
    hits = [p for p in done if p[2] <= target]
    if not hits:
        return None
    hi = hits[0]
    misses = [p for p in done if p[1] < hi[1] and p[2] > target]
    if not misses:
        return "<= ", float(hi[1])
    lo = misses[-1]
    w = math.log(target / lo[2]) / math.log(hi[2] / lo[2])
    return "", math.exp((1 - w) * math.log(lo[1]) + w * math.log(hi[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", default=["ks", "ac", "gs", "diffusion"])
    parser.add_argument("--quick", action="store_true", help="fewer points and repeats")
    parser.add_argument("--out", type=Path, default=None, help="append the report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    log(
        f"# python benchmarks/adaptive.py --part {' '.join(args.part)}{' --quick' if args.quick else ''}\n"
        f"# deis_ode {deis_ode.__version__}, torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, "
        f"scipy {scipy.__version__}, numpy {np.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, torch threads 1; times on the cpu clock"
    )
    for part in args.part:
        if part == "diffusion":
            diffusion_part(args.quick, log)
        else:
            stiff_part(part, args.quick, log)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
