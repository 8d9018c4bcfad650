"""What ``torchdiffeq.odeint(..., method="deis3")`` costs beyond the model, beside the other ways to sample.

    python benchmarks/odeint_overhead.py [--steps 100] [--repeats 15] [--memory]

Three tables, all on one CPU thread:

1. **Overhead per step.** A zero-cost model (a fixed tensor, ``prediction="eps"``) drives ``VPODE`` over
   ``VPSchedule.diffusers()`` on a float32 state of shape (8, 4, 64, 64), ``--steps`` steps of the quadratic grid. Each
   row is the mean time per step (faster half of the repeats, the rows interleaved so that load changes hit all alike)
   and its ratio to the *minimal arithmetic* of an order-3 update: ``torch.mul(x, a, out=buf)`` and one
   ``torch.add(buf, N_j, alpha=c_j, out=buf)`` per node into preallocated buffers. Rows: ``odeint`` deis3 with the x0
   split and with the eps split (only the end state returned), with every state returned (beside the minimal
   arithmetic writing every state into a new result tensor, which pays the same first touch of the result's
   memory), a first solve on a grid
   never seen before (each call on a new grid, scaled by ``1 - k 1e-9``), deis_ode's ``DEISMultistepScheduler``
   (``solver_order=3``), diffusers' own ``DEISMultistepScheduler`` (``solver_order=3``) and torchdiffeq's ``euler``
   with the same ``grid_constructor``.
2. **Planning time** (``build_plan``, cache emptied) for 10, 100 and 1000 steps on every built-in schedule, deis3,
   t basis, x0 split, lower-order warm-up: what a first solve on a new grid pays once.
3. With ``--memory``: the peak extra resident memory of one solve on a 512 MiB float32 state (end state only), in
   units of the state's size, for deis3, torchdiffeq's euler and rk4 (each in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torchdiffeq

import deis_ode
from deis_ode import VPODE, VPSchedule
from deis_ode.diffusion import EDMSchedule, FlowSchedule, VESchedule, timesteps
from deis_ode.solvers import multistep

SHAPE = (8, 4, 64, 64)


def _time(runs: dict, repeats: int) -> dict:
    """Seconds of one call of each run: mean of the faster half of ``repeats`` calls, interleaved (one warm-up)."""
    for run in runs.values():
        run()
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.fmean(sorted(t)[: max(1, len(t) // 2)]) for name, t in times.items()}


def _minimal(orders: list[int], x0: torch.Tensor, output: torch.Tensor):
    buffers = [torch.empty_like(x0), torch.empty_like(x0)]
    history = [output.clone() for _ in range(max(orders))]

    def run() -> None:
        x = x0
        for n, k in enumerate(orders):
            out = buffers[n % 2]
            torch.mul(x, 0.99, out=out)
            for j in range(k):
                torch.add(out, history[j], alpha=0.01 * (j + 1), out=out)
            x = out

    return run


def _minimal_every_state(orders: list[int], x0: torch.Tensor, output: torch.Tensor):
    """The minimal arithmetic, each state written into a new ``(steps + 1, *shape)`` result (what returning every
    state costs at least: the result's memory is fresh at every call)."""
    history = [output.clone() for _ in range(max(orders))]

    def run() -> None:
        result = torch.empty((len(orders) + 1, *x0.shape), dtype=x0.dtype)
        result[0].copy_(x0)
        for n, k in enumerate(orders):
            out = result[n + 1]
            torch.mul(result[n], 0.99, out=out)
            for j in range(k):
                torch.add(out, history[j], alpha=0.01 * (j + 1), out=out)

    return run


def overhead(steps: int, repeats: int) -> None:
    import diffusers

    from deis_ode import DEISMultistepScheduler

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(*SHAPE, generator=generator)
    output = torch.randn(*SHAPE, generator=generator)

    def model(x, t):
        return output

    schedule = VPSchedule.diffusers()
    grid = timesteps(schedule, steps)
    ends = grid[[0, -1]]
    x0_split = VPODE(model, schedule, prediction="eps", extrapolate="x0")
    eps_split = VPODE(model, schedule, prediction="eps", extrapolate="eps")
    options = {"grid_constructor": lambda func, y0, t: grid}

    def solve(ode, t):
        def run() -> None:
            with torch.no_grad():
                torchdiffeq.odeint(ode, x0, t, method="deis3", options=options)

        return run

    fresh_grids = iter(range(1, 10**6))

    def first_solve() -> None:
        # a grid never seen before (scaled by 1 - k 1e-9): the solve plans it; the other rows keep their cached plans
        scale = 1.0 - next(fresh_grids) * 1e-9
        with torch.no_grad():
            torchdiffeq.odeint(
                x0_split, x0, ends * scale, method="deis3", options={"grid_constructor": lambda f, y, t: grid * scale}
            )

    def scheduler_loop(cls):
        scheduler = cls(solver_order=3)
        scheduler.set_timesteps(steps)

        def run() -> None:
            scheduler.model_outputs = [None] * 3
            scheduler.lower_order_nums = 0
            scheduler._step_index = None
            x = x0
            for t in scheduler.timesteps:
                x = scheduler.step(output, t, x, return_dict=False)[0]

        return run

    def euler() -> None:
        with torch.no_grad():
            torchdiffeq.odeint(x0_split, x0, ends, method="euler", options=options)

    orders = [min(3, n + 1) for n in range(steps)]
    runs = {
        "minimal arithmetic (order 3)": _minimal(orders, x0, output),
        "odeint deis3, x0 split, end state": solve(x0_split, ends),
        "odeint deis3, eps split, end state": solve(eps_split, ends),
        "minimal arithmetic, every state kept": _minimal_every_state(orders, x0, output),
        "odeint deis3, x0 split, every state": solve(x0_split, grid),
        "odeint deis3, x0 split, first solve": first_solve,
        "deis_ode DEISMultistepScheduler": scheduler_loop(DEISMultistepScheduler),
        "diffusers DEISMultistepScheduler": scheduler_loop(diffusers.DEISMultistepScheduler),
        "torchdiffeq euler, same grid": euler,
    }
    per_step = {name: seconds / steps for name, seconds in _time(runs, repeats).items()}
    minimal = per_step["minimal arithmetic (order 3)"]
    print(
        f"overhead per step: float32 {SHAPE}, {steps} steps, zero-cost eps model, VPSchedule.diffusers(), torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}, deis_ode {deis_ode.__version__}, 1 thread"
    )
    print(f"{'run':<40} {'us/step':>9} {'/ minimal':>10}")
    for name, seconds in per_step.items():
        print(f"{name:<40} {seconds * 1e6:>9.1f} {seconds / minimal:>10.2f}")
    print()


def planning(repeats: int) -> None:
    schedules = {
        "VPSchedule.diffusers()": VPSchedule.diffusers(),
        "VPSchedule.linear()": VPSchedule.linear(),
        "VPSchedule.cosine()": VPSchedule.cosine(),
        "VESchedule()": VESchedule(),
        "EDMSchedule()": EDMSchedule(),
        "FlowSchedule()": FlowSchedule(),
    }
    print("planning time (build_plan, cache emptied): deis3, t basis, x0 split, lower-order warm-up, power grid")
    counts = (10, 100, 1000)
    print(f"{'schedule':<26} " + " ".join(f"{f'{n} steps':>12}" for n in counts))
    for name, schedule in schedules.items():
        form = VPODE if isinstance(schedule, VPSchedule) else deis_ode.DiffusionODE
        ode = form(lambda x, t: x, schedule, prediction="eps", extrapolate="x0")
        row = []
        for n in counts:
            grid = timesteps(schedule, n, "uniform" if isinstance(schedule, (EDMSchedule, FlowSchedule)) else None)

            def run(grid=grid, ode=ode) -> None:
                multistep.clear_plan_cache()
                multistep.build_plan(ode.exponential_form(), "t", grid, 3, "lower_order")

            row.append(_time({"plan": run}, repeats)["plan"])
        print(f"{name:<26} " + " ".join(f"{seconds * 1e3:>9.2f} ms" for seconds in row))
    print()


def _peak_child(method: str) -> None:
    """One solve on a 512 MiB float32 state; prints the peak extra resident memory in states."""
    import resource

    numel = 512 * 2**20 // 4
    x0 = torch.randn(numel // 4096, 4096)
    output = torch.randn_like(x0) * 0.01
    ode = VPODE(lambda x, t: output[: x.shape[0]], VPSchedule.diffusers(), prediction="eps", extrapolate="x0")
    grid = timesteps(ode.schedule, 10)
    with torch.no_grad():
        torchdiffeq.odeint(
            ode, x0[:2].clone(), grid[[0, -1]], method=method, options={"grid_constructor": lambda *a: grid}
        )
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        torchdiffeq.odeint(ode, x0, grid[[0, -1]], method=method, options={"grid_constructor": lambda *a: grid})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "states": (peak - base) / (numel * 4)}))


def memory() -> None:
    print("peak extra resident memory of one solve, float32 state of 512 MiB, end state only, 10 steps (in states)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for method in ("deis3", "euler", "rk4"):
        out = subprocess.run(
            [sys.executable, __file__, "--peak-child", method], capture_output=True, text=True, env=env, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{method:<8} {result['states']:>6.2f}")
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--memory", action="store_true", help="also the memory table (needs about 6 GB)")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.peak_child:
        _peak_child(args.peak_child)
        return
    overhead(args.steps, args.repeats)
    planning(max(3, args.repeats // 3))
    if args.memory:
        memory()


if __name__ == "__main__":
    main()
