"""Accuracy against the number of model evaluations (NFE) on a Gaussian-mixture VP diffusion.

The problem: the probability-flow ODE of an 8-dimensional mixture of narrow Gaussians (``GaussianMixture.default``)
under diffusers' DDPM training schedule (1000 linear betas, ``VPSchedule.diffusers()``), driven by the exact noise
prediction of the mixture, from a seeded batch of ``x_T ~ N(0, I)``.

Every sampler starts and ends at the same noise levels: those of diffusers' ``DEISMultistepScheduler`` (read from
the scheduler itself when diffusers is installed). In model time (the training timestep index) that is from its
first timestep to the timestep whose noise level its last step targets. The samplers:

* ``deis1`` .. ``deis4`` in each basis (``t``, ``rho``, ``logrho``), lower-order warm-up, on diffusers' grid
  (its timesteps plus the final point);
* ``deis3`` on that grid with diffusers' final-order lowering (``lower_order_final`` below 15 steps), beside
  diffusers' own DEIS (order 3): the like-for-like pair, which should agree to float32 round-off;
* diffusers' DPM-Solver++ (2M) and UniPC (bh2, order 2), ``final_sigmas_type="sigma_min"`` so that they stop at
  the same noise level, driven at their integer timesteps;
* torchdiffeq's ``euler`` (diffusers' grid), ``rk4`` (uniform grid, NFE / 4 steps) and ``dopri5`` (adaptive; its
  actual NFE at a few tolerances), all on the same ``VPODE``.

``deis2`` .. ``deis4`` in the ``t`` basis currently fail on this schedule (their weights come from a quadrature that
does not converge on an interpolated schedule); the table reports them as failed, with the library's message.

The reference is ``deis_ode.reference.solve`` (scipy DOP853, rtol = atol = 1e-12) on the same ODE written in the
half log-SNR ``lambda`` instead of model time: ``dx/dlambda = f(t, x) / (dlambda/dt)`` at ``t = t(lambda)``. The two
are the same solution, but the interpolated discrete schedule is only C^1 in ``t`` (its drift has a kink at every
training timestep, so an adaptive solver in ``t`` crawls across all 1000 of them), while in ``lambda`` the drift
``sigma^2 x - sigma eps`` is smooth. The full run also checks this reference against DOP853 in ``t``.

Columns: per-sample relative error ``|x - x_ref| / |x_ref|`` (L2 over the 8 coordinates) at the final time, its
median and maximum over the batch, and how many samples end closest to a different mixture component than their
reference (``GaussianMixture.classify``).

Usage::

    python benchmarks/accuracy.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/accuracy.py --quick    # a small run (under a minute)
    python benchmarks/accuracy.py --plot accuracy.png
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torchdiffeq

import deis_ode
from deis_ode import reference
from deis_ode.diffusion import VPODE, DiscreteVPSchedule, GaussianMixture, GaussianMixtureEps, VPSchedule, timesteps
from deis_ode.verify import count_evaluations

F64 = torch.float64
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
BASES = ("t", "rho", "logrho")


# --------------------------------------------------------------------------------------------------- the problem


@dataclass
class Problem:
    schedule: DiscreteVPSchedule
    mixture: GaussianMixture
    model: GaussianMixtureEps
    ode: VPODE
    x_start: torch.Tensor
    t_start: float
    t_end: float
    levels_note: str


def diffusers_grid(n: int, num_train_timesteps: int, t_end: float) -> torch.Tensor:
    """diffusers' default ``timestep_spacing="linspace"``: ``n + 1`` evenly spaced points from ``N - 1`` down to 0,
    rounded half to even (numpy's rule), the last one dropped; then the final point ``t_end``."""
    points = np.round(np.linspace(0.0, num_train_timesteps - 1, n + 1))[::-1][:-1]
    return torch.tensor([*points.tolist(), t_end], dtype=F64)


def diffusers_levels(schedule: DiscreteVPSchedule) -> tuple[float, float, str]:
    """Where diffusers' DEIS starts and ends, in model time, read from the scheduler (or its documented default)."""
    n_train = schedule.num_train_timesteps
    if not HAS_DIFFUSERS:
        return float(n_train - 1), 0.0, "diffusers not installed: assuming DEIS runs from t = N - 1 to sigma(t = 0)"
    from diffusers import DEISMultistepScheduler

    scheduler = DEISMultistepScheduler(solver_order=3)
    scheduler.set_timesteps(10)
    first = float(scheduler.timesteps[0])
    final_rho = float(scheduler.sigmas[-1])  # diffusers' "sigma" is sigma / alpha
    if final_rho == 0.0:
        raise RuntimeError("this diffusers version's DEIS ends at sigma = 0, which a VP model time cannot reach")
    # the training timestep whose noise level this is (diffusers keeps its levels in float32)
    train_rho = torch.sqrt((1.0 - scheduler.alphas_cumprod.to(F64)) / scheduler.alphas_cumprod.to(F64))
    index = int(torch.argmin((torch.log(train_rho) - math.log(final_rho)).abs()))
    mismatch = abs(final_rho / float(train_rho[index]) - 1.0)
    ours = float(schedule.sigma(float(index)) / schedule.alpha(float(index)))
    note = (
        f"diffusers DEISMultistepScheduler: first timestep {first:g}; the last step targets sigma/alpha = "
        f"{final_rho:.7g} = that of training index {index} (alphas_cumprod[{index}], relative mismatch "
        f"{mismatch:.1e}; ours {ours:.7g})"
    )
    return first, float(index), note


def make_problem(samples: int, seed: int) -> Problem:
    schedule = VPSchedule.diffusers()
    mixture = GaussianMixture.default(dim=8)
    model = GaussianMixtureEps(mixture, schedule)
    ode = VPODE(model, schedule, extrapolate="eps")  # diffusers' DEIS extrapolates eps: like for like
    generator = torch.Generator().manual_seed(seed)
    x_start = torch.randn(samples, mixture.dim, generator=generator, dtype=F64)
    t_start, t_end, note = diffusers_levels(schedule)
    return Problem(schedule, mixture, model, ode, x_start, t_start, t_end, note)


def reference_final(problem: Problem, rtol: float = 1e-12) -> tuple[torch.Tensor, int, float]:
    """The final state by DOP853 in lambda; returns (state, scipy's evaluations, seconds)."""
    lam = problem.schedule.half_log_snr(torch.tensor([problem.t_start, problem.t_end], dtype=F64))
    start = time.perf_counter()
    with torch.no_grad():
        sol = reference.solve(reference.InHalfLogSNR(problem.ode), problem.x_start, lam, rtol=rtol, atol=rtol)
    return sol.states[-1], sol.nfev, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- the runs


@dataclass
class Row:
    method: str
    grid: str
    nfe: int
    median: float = math.nan
    max: float = math.nan
    mismatched: int = -1
    seconds: float = math.nan
    note: str = ""
    state: torch.Tensor | None = None
    series: str = ""  # the line this row belongs to in the plot ("" = not plotted)


class Scorer:
    def __init__(self, problem: Problem, ref: torch.Tensor) -> None:
        self.ref = ref
        self.ref_norm = ref.norm(dim=-1)
        self.ref_class = problem.mixture.classify(ref)
        self.mixture = problem.mixture

    def fill(self, row: Row, x: torch.Tensor) -> Row:
        x = x.to(F64)
        err = (x - self.ref).norm(dim=-1) / self.ref_norm
        row.median = float(err.median()) if bool(torch.isfinite(err).all()) else math.inf
        row.max = float(err.max()) if bool(torch.isfinite(err).all()) else math.inf
        row.mismatched = int((self.mixture.classify(x) != self.ref_class).sum())
        row.state = x
        return row


def run_torchdiffeq(
    problem: Problem,
    scorer: Scorer,
    method: str,
    grid: torch.Tensor,
    label: str,
    *,
    name: str | None = None,
    options: dict | None = None,
    rtol: float | None = None,
    series: str | None = None,
    ode: VPODE | None = None,
) -> Row:
    ode = problem.ode if ode is None else ode
    kwargs = {} if rtol is None else {"rtol": rtol, "atol": rtol}
    row = Row(name or method, label, nfe=0, series=series if series is not None else (name or method))
    start = time.perf_counter()
    try:
        with torch.no_grad(), count_evaluations(ode) as calls:
            xs = torchdiffeq.odeint(ode, problem.x_start, grid, method=method, options=options or {}, **kwargs)
    except (RuntimeError, ValueError) as error:
        row.seconds = time.perf_counter() - start
        row.note = f"FAILED: {type(error).__name__}: {str(error).split(';')[0]}"
        return row
    row.seconds = time.perf_counter() - start
    row.nfe = calls.count
    return scorer.fill(row, xs[-1])


def run_diffusers(
    problem: Problem, scorer: Scorer, name: str, cls_name: str, config: dict, n: int, exact_levels: bool = False
) -> Row:
    """One diffusers multistep sampler at its own timesteps; ``exact_levels`` replaces its float32 noise levels
    (``scheduler.sigmas``, i.e. sigma / alpha) by float64 values of the same schedule, leaving the algorithm as is."""
    import diffusers

    scheduler = getattr(diffusers, cls_name)(**config)
    scheduler.set_timesteps(n)
    if exact_levels:
        times = torch.cat([scheduler.timesteps.to(F64), torch.tensor([problem.t_end], dtype=F64)])
        scheduler.sigmas = problem.schedule.sigma(times) / problem.schedule.alpha(times)
    grid = [float(t) for t in scheduler.timesteps]
    expected = diffusers_grid(n, problem.schedule.num_train_timesteps, problem.t_end)[:-1].tolist()
    note = "" if grid == expected else f"timesteps {grid} differ from the linspace grid"
    calls = 0
    x = problem.x_start.clone() * scheduler.init_noise_sigma
    start = time.perf_counter()
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            eps = problem.model(x, torch.tensor(float(timestep), dtype=F64))
            calls += 1
            x = scheduler.step(eps, timestep, x).prev_sample
    label = "diffusers, float64 noise levels" if exact_levels else "diffusers"
    row = Row(name, label, nfe=calls, seconds=time.perf_counter() - start, note=note)
    row.series = "" if exact_levels else name
    return scorer.fill(row, x)


DIFFUSERS_SAMPLERS = [
    # (label, class, config): default configurations except where noted
    ("diffusers DEIS (order 3)", "DEISMultistepScheduler", {"solver_order": 3}),
    (
        "diffusers DPM-Solver++ (2M)",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "sigma_min"},
    ),
    ("diffusers UniPC (bh2, 2)", "UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
]


# --------------------------------------------------------------------------------------------------- output


def fmt(value: float) -> str:
    return "   -    " if math.isnan(value) else ("     inf" if math.isinf(value) else f"{value:8.2e}")


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    header = f"{'method':<30} {'basis/grid':<40} {'NFE':>5} {'median':>9} {'max':>9} {'wrong mode':>10} {'time':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        mismatched = "-" if r.mismatched < 0 else str(r.mismatched)
        line = (
            f"{r.method:<30} {r.grid:<40} {r.nfe:>5} {fmt(r.median):>9} {fmt(r.max):>9} {mismatched:>10} "
            f"{r.seconds:6.2f}s"
        )
        print(line + (f"  {r.note}" if r.note else ""))


def plot(path: str, rows: list[Row], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5))
    series: dict[str, list[Row]] = {}
    for r in rows:
        if r.series and math.isfinite(r.median) and r.nfe > 0:
            series.setdefault(r.series, []).append(r)
    palette = plt.get_cmap("tab10").colors
    others = iter(plt.get_cmap("Dark2").colors)
    styles = {"t": "--", "rho": ":", "logrho": "-"}
    for name, points in series.items():
        points.sort(key=lambda r: r.nfe)
        if name.startswith("deis") and "[" in name and "like" not in name:
            order, basis = int(name[4]), name.split("[")[1].rstrip("]")
            color, style, marker = palette[order - 1], styles[basis], "o"
        else:
            color, style, marker = next(others), "-", "s" if name.startswith("diffusers") else "^"
        xs, ys = [r.nfe for r in points], [r.median for r in points]
        ax.loglog(xs, ys, style, color=color, marker=marker, label=name, ms=4, lw=1.2)
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel("median per-sample relative error")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"\nplot written to {path}")


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("torchdiffeq", "diffusers", "scipy", "numpy"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    parts.append(f"deis_ode {deis_ode.__version__}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run: fewer NFEs and tolerances (< 1 min)")
    parser.add_argument("--plot", metavar="FILE", help="write a log-log plot of median error against NFE")
    parser.add_argument("--samples", type=int, default=512, help="batch size (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of x_T (default 0)")
    parser.add_argument("--nfe", type=int, nargs="+", help="NFEs of the fixed-step samplers (default 5 10 20 50)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny float64 ops are far slower with several threads

    nfes = args.nfe or ([5, 10] if args.quick else [5, 10, 20, 50])
    tolerances = [1e-3, 1e-5] if args.quick else [1e-3, 1e-4, 1e-5, 1e-6]
    began = time.perf_counter()

    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print("versions: " + versions())
    print(f"torch threads: {torch.get_num_threads()}")

    problem = make_problem(args.samples, args.seed)
    schedule = problem.schedule
    print(
        f"problem: {problem.mixture!r} = GaussianMixture.default(dim=8), exact eps model, schedule {schedule!r}; "
        f"{args.samples} samples x_T ~ N(0, I), seed {args.seed}"
    )
    print(problem.levels_note)
    lam0, lam1 = schedule.half_log_snr(torch.tensor([problem.t_start, problem.t_end], dtype=F64)).tolist()
    print(
        f"every sampler integrates from model time t = {problem.t_start:g} (sigma/alpha = {math.exp(-lam0):.6g}) "
        f"to t = {problem.t_end:g} (sigma/alpha = {math.exp(-lam1):.6g})"
    )

    ref, ref_nfev, ref_seconds = reference_final(problem)
    check, _, _ = reference_final(problem, rtol=1e-10)
    consistency = float(((check - ref).norm(dim=-1) / ref.norm(dim=-1)).max())
    print(
        f"reference: DOP853 in lambda, rtol = atol = 1e-12: {ref_nfev} evaluations, {ref_seconds:.1f} s; max "
        f"per-sample difference to rtol = 1e-10: {consistency:.1e}"
    )
    if not args.quick:
        start = time.perf_counter()
        few = min(64, args.samples)
        with torch.no_grad():
            in_t = reference.solve(
                problem.ode, problem.x_start[:few], torch.tensor([problem.t_start, problem.t_end], dtype=F64)
            )
        diff = float(((in_t.states[-1] - ref[:few]).norm(dim=-1) / ref[:few].norm(dim=-1)).max())
        print(
            f"check: DOP853 in model time t (rtol = atol = 1e-12, first {few} samples) needs {in_t.nfev} "
            f"evaluations ({time.perf_counter() - start:.0f} s; kinks at the training timesteps) and differs by at "
            f"most {diff:.1e}"
        )
    scorer = Scorer(problem, ref)
    n_train = schedule.num_train_timesteps

    # deis1..4 in every basis on diffusers' grid
    rows: list[Row] = []
    failures: list[str] = []
    for n in nfes:
        grid = diffusers_grid(n, n_train, problem.t_end)
        for order in range(1, 5):
            for basis in BASES:
                row = run_torchdiffeq(
                    problem,
                    scorer,
                    f"deis{order}",
                    grid,
                    basis,
                    options={"basis": basis},
                    series=f"deis{order} [{basis}]",
                )
                row.nfe = row.nfe or n
                if row.note.startswith("FAILED"):
                    failures.append(f"deis{order} basis {basis} NFE {n}: {row.note}")
                    row.note = "FAILED (see below)"
                rows.append(row)
    print_table(
        "deis1..deis4 on diffusers' grid (its timesteps plus the final point), lower-order warm-up, no final lowering",
        rows,
    )
    for failure in failures:
        print("  " + failure)

    # like-for-like with diffusers' DEIS, and diffusers' other multistep samplers
    compare: list[Row] = []
    agreement: list[str] = []
    for n in nfes:
        grid = diffusers_grid(n, n_train, problem.t_end)
        ours = run_torchdiffeq(
            problem,
            scorer,
            "deis3",
            grid,
            "logrho, diffusers' grid" + (", final lowering" if n < 15 else ""),
            options={"basis": "logrho", "lower_order_final": n < 15},
            series="deis3 [logrho] like diffusers",
        )
        compare.append(ours)
        defaults = run_torchdiffeq(
            problem,
            scorer,
            "deis3",
            timesteps(schedule, n, t_start=problem.t_start, t_end=problem.t_end),
            "defaults (x0 split, t, power grid)",
            name="deis3",
            ode=VPODE(problem.model, schedule),
            series="deis3 defaults",
        )
        compare.append(defaults)
        if HAS_DIFFUSERS:
            for label, cls_name, config in DIFFUSERS_SAMPLERS:
                theirs = run_diffusers(problem, scorer, label, cls_name, config, n)
                compare.append(theirs)
                if cls_name == "DEISMultistepScheduler" and ours.state is not None:
                    exact = run_diffusers(problem, scorer, label, cls_name, config, n, exact_levels=True)
                    compare.append(exact)
                    gaps = [
                        float(((ours.state - other.state).norm(dim=-1) / ref.norm(dim=-1)).max())
                        for other in (theirs, exact)
                    ]
                    agreement.append(f"NFE {n}: {gaps[0]:.1e} ({gaps[1]:.1e} with float64 levels)")
    print_table("deis3 like-for-like with diffusers (diffusers: default configs unless noted)", compare)
    if agreement:
        print("  max per-sample |deis3 - diffusers DEIS| / |x_ref|: " + ", ".join(agreement))
        print(
            "  diffusers keeps its noise levels in float32 (its order-3 DEIS weights lose digits to cancellation);\n"
            "  DPM-Solver++ also steps its state in float32; DPM-Solver++ and UniPC use final_sigmas_type='sigma_min' "
            "to stop at the same level"
        )
    elif not HAS_DIFFUSERS:
        print("  diffusers is not installed: its samplers are skipped")

    # torchdiffeq's general-purpose methods on the same VPODE
    general: list[Row] = []
    for n in nfes:
        general.append(
            run_torchdiffeq(problem, scorer, "euler", diffusers_grid(n, n_train, problem.t_end), "diffusers")
        )
    for n in nfes:
        steps = n // 4
        if steps >= 1:
            grid = torch.linspace(problem.t_start, problem.t_end, steps + 1, dtype=F64)
            general.append(run_torchdiffeq(problem, scorer, "rk4", grid, f"uniform t, {steps} steps"))
    span = torch.tensor([problem.t_start, problem.t_end], dtype=F64)
    for tol in tolerances:
        # step_t: end a step exactly at t_end (torchdiffeq's adaptive solvers otherwise step past the last time and
        # interpolate back, evaluating the model at t < 0, outside the discrete schedule)
        general.append(
            run_torchdiffeq(
                problem,
                scorer,
                "dopri5",
                span,
                f"adaptive, rtol=atol={tol:g}",
                rtol=tol,
                options={"step_t": span[1:]},
            )
        )
    print_table("torchdiffeq's general methods on the same VPODE in model time t", general)

    # best configuration at each NFE
    everything = [r for r in rows + compare + general if math.isfinite(r.median)]
    print("\nbest median error with at most the given NFE:")
    for n in nfes:
        within = [r for r in everything if 0 < r.nfe <= n]
        if within:
            best = min(within, key=lambda r: r.median)
            print(
                f"  NFE <= {n:>3}: {best.method} [{best.grid}] NFE {best.nfe}: median {best.median:.2e}, "
                f"max {best.max:.2e}, wrong mode {best.mismatched}"
            )
    print("best deis configuration at each NFE:")
    for n in nfes:
        ours = [r for r in everything if r.method.startswith("deis") and r.nfe == n]
        if ours:
            best = min(ours, key=lambda r: r.median)
            print(
                f"  NFE {n:>3}: {best.method} [{best.grid}]: median {best.median:.2e}, max {best.max:.2e}, "
                f"wrong mode {best.mismatched}"
            )
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")

    if args.plot:
        plot(
            args.plot,
            rows + compare + general,
            f"{problem.mixture!r}, DDPM linear betas, t {problem.t_start:g} -> "
            f"{problem.t_end:g}, {args.samples} samples",
        )


if __name__ == "__main__":
    main()
