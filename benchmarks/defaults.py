"""Choosing the defaults of deis* on diffusion drifts: variants x time grids x NFE 5/10/20.

    python benchmarks/defaults.py [--samples 512] [--nfe 5 10 20] [--top 12]

The problem is the one of ``benchmarks/accuracy.py``: an 8-dimensional Gaussian mixture with narrow components and
its exact noise model under diffusers' DDPM linear-beta schedule (1000 training steps), 512 samples from x_T ~ N(0, I),
every sampler from model time 999 to 0 (diffusers' DEIS start and end levels). Two numbers per run, because grids
trade them against each other: the median over samples of the per-sample relative error against the scipy reference,
and the number of samples that end nearest to a different mixture component than the reference does.

Sweeps deis2..deis4 x basis (t, rho, logrho) x split (eps, x0) x warm-up x lower_order_final x spacing, plus the
paper's iPNDM and rho-RK variants, and prints the best configurations at each NFE beside diffusers' DEIS order 3 on
its default grid and the configuration that ``deis3`` uses by default.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
import time

import torch
from accuracy import DIFFUSERS_SAMPLERS, HAS_DIFFUSERS, Row, Scorer, make_problem, reference_final, run_diffusers

from deis_ode import VPODE
from deis_ode.diffusion import timesteps
from deis_ode.solvers.multistep import full_order_sweeps
from deis_ode.verify import count_evaluations

SPACINGS = ("uniform", "power", "logsnr", "karras", "linspace", "leading", "trailing")


def run(problem, scorer, method: str, grid: torch.Tensor, label: str, ode, options: dict) -> Row:
    import torchdiffeq

    row = Row(method, label, nfe=0)
    try:
        with torch.no_grad(), count_evaluations(ode) as calls:
            xs = torchdiffeq.odeint(ode, problem.x_start, grid, method=method, options=options)
    except (RuntimeError, ValueError) as error:
        row.note = f"FAILED: {error}"
        return row
    row.nfe = calls.count
    return scorer.fill(row, xs[-1])


def grid_for(problem, spacing: str, steps: int) -> torch.Tensor:
    kwargs = {} if spacing in ("linspace", "leading", "trailing") else {"t_start": problem.t_start}
    return timesteps(problem.schedule, steps, spacing, t_end=problem.t_end, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--top", type=int, default=12, help="rows of the ranking printed per NFE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    problem = make_problem(args.samples, args.seed)
    ref, _, _ = reference_final(problem)
    scorer = Scorer(problem, ref)
    odes = {split: VPODE(problem.model, problem.schedule, extrapolate=split) for split in ("eps", "x0")}
    print(f"{args.samples} samples, model time {problem.t_start:g} -> {problem.t_end:g}; {problem.levels_note}")

    for nfe in args.nfe:
        rows: list[Row] = []
        for k, basis, split, warmup, final, spacing in itertools.product(
            (2, 3, 4), ("t", "rho", "logrho"), ("eps", "x0"), ("lower_order", "full_order"), (False, True), SPACINGS
        ):
            steps = nfe - ((k - 1) * full_order_sweeps(k) if warmup == "full_order" else 0)
            if steps < max(1, k - 1 if warmup == "full_order" else 1):
                continue
            options = {"basis": basis, "warmup": warmup, "lower_order_final": final}
            label = f"{basis:<6} {split:<3} {warmup:<11} {'lof' if final else '   '} {spacing}"
            rows.append(
                run(problem, scorer, f"deis{k}", grid_for(problem, spacing, steps), label, odes[split], options)
            )
        for method, per_step in (("ipndm", 1), ("ipndm_v", 1), ("deis_rk2", 2), ("deis_rk3", 3)):
            steps = nfe // per_step
            for spacing in SPACINGS:
                rows.append(run(problem, scorer, method, grid_for(problem, spacing, steps), spacing, odes["eps"], {}))
        if HAS_DIFFUSERS:
            label, cls_name, config = DIFFUSERS_SAMPLERS[0]
            rows.append(run_diffusers(problem, scorer, label, cls_name, config, nfe))
        default = run(
            problem,
            scorer,
            "deis3",
            timesteps(problem.schedule, nfe, t_start=problem.t_start, t_end=problem.t_end),
            "defaults",
            VPODE(problem.model, problem.schedule),  # the drift's defaults too
            {},
        )
        default.method = "deis3 (all defaults)"
        rows.append(default)

        ok = [r for r in rows if not r.note and math.isfinite(r.median)]
        ok.sort(key=lambda r: (r.median, r.mismatched))
        print(f"\n== NFE {nfe}: {len(rows)} runs, {len(rows) - len(ok)} failed; best {args.top} by median error")
        columns = "basis  split warm-up     lof spacing"
        header = f"{'method':<24} {columns:<44} {'NFE':>4} {'median':>9} {'max':>9} {'wrong':>5}"
        print(header)
        print("-" * len(header))
        shown = ok[: args.top] + [r for r in ok if r.method.startswith(("diffusers", "deis3 (all"))]
        seen = set()
        for r in shown:
            if id(r) in seen:
                continue
            seen.add(id(r))
            print(f"{r.method:<24} {r.grid:<44} {r.nfe:>4} {r.median:9.2e} {r.max:9.2e} {r.mismatched:>5}")
        for spacing in SPACINGS:
            best = [r for r in ok if r.method == "deis3" and r.grid.endswith(spacing)]
            if best:
                b = best[0]
                print(f"  best deis3 on {spacing:<9}: {b.grid:<44} median {b.median:.2e}, wrong {b.mismatched}")
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
