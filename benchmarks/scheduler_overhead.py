"""Per-step cost of ``DEISMultistepScheduler.step`` against the bare arithmetic of the update.

A zero-cost model (a fixed random tensor) drives 100 steps on a float32 state of shape (8, 4, 64, 64). For each
scheduler the time per ``step`` is divided by the time of the *minimal arithmetic* of the same update: for a step
that combines the sample with ``k`` noise predictions, ``torch.mul(x, a, out=buf)`` followed by ``k`` calls
``torch.add(buf, eps_j, alpha=c_j, out=buf)`` into preallocated buffers with Python-float coefficients -- the
same tensor reads and writes as the update, with nothing else around it.

    python benchmarks/scheduler_overhead.py [--device cuda] [--order 2] [--steps 100] [--repeats 20]

Prints a table (mean microseconds per step over the best half of the repeats, and the ratio to the minimal
arithmetic) for deis_ode's scheduler and diffusers' own ``DEISMultistepScheduler``.

    python benchmarks/scheduler_overhead.py --accuracy

measures instead what the scheduler's opt-in options buy: the final error of sampling the probability-flow ODE of
an 8-dimensional Gaussian mixture (``GaussianMixture.default``, diffusers' default linear training schedule) with
its exact noise prediction, in float64, for 256 seeded starting points. The reference is scipy's DOP853 (rtol =
atol = 1e-11) on ``d(x / alpha) / d rho = eps(x, rho)``. Two errors (median over the batch of ``|x - x_ref| /
|x_ref|``): against the exact ODE solution at the configuration's own last noise level (the discretisation error),
and against the solution at ``sigma = 0`` (the noise-free sample the user wants; a grid that stops at the smallest
training level leaves that level's noise in).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(runs: dict, repeats: int, device: torch.device) -> dict:
    """Seconds of one call of each of ``runs``: the mean of the faster half of ``repeats`` timed calls, the runs
    interleaved so that a change of machine load affects all of them alike (after one warm-up call each)."""
    for run in runs.values():
        run()
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.fmean(sorted(t)[: max(1, len(t) // 2)]) for name, t in times.items()}


def _scheduler_loop(scheduler, steps: int, x0: torch.Tensor, output: torch.Tensor, return_dict: bool):
    def run() -> None:
        scheduler.set_timesteps(steps, device=x0.device)
        x = x0
        for t in scheduler.timesteps:
            out = scheduler.step(output, t, x, return_dict=return_dict)
            x = out.prev_sample if return_dict else out[0]

    def run_steps_only() -> None:
        # reset the per-sampling state as set_timesteps does, without recomputing the grid
        scheduler.model_outputs = [None] * scheduler.config.solver_order
        scheduler.lower_order_nums = 0
        scheduler._step_index = None
        x = x0
        for t in scheduler.timesteps:
            out = scheduler.step(output, t, x, return_dict=return_dict)
            x = out.prev_sample if return_dict else out[0]

    run()
    return run_steps_only


def _minimal_loop(orders: list[int], x0: torch.Tensor, output: torch.Tensor, order: int):
    buffers = [torch.empty_like(x0), torch.empty_like(x0)]
    history = [output.clone() for _ in range(order)]
    coefficients = [0.9 + 0.01 * j for j in range(order + 1)]

    def run() -> None:
        x = x0
        for n, k in enumerate(orders):
            out = buffers[n % 2]
            torch.mul(x, coefficients[0], out=out)
            for j in range(k):
                torch.add(out, history[j], alpha=coefficients[j + 1], out=out)
            x = out

    return run


def _alpha_sigma(level: float, flow: bool) -> tuple[float, float]:
    """``(alpha, sigma)`` of diffusers' noise level: ``rho = sigma / alpha`` (VP) or the flow noise level."""
    if flow:
        return 1.0 - level, level
    alpha = 1.0 / (1.0 + level * level) ** 0.5
    return alpha, level * alpha


def _reference(mixture, flow: bool, x_start: torch.Tensor, start: float, ends: list[float]) -> dict:
    """The exact ODE solution at each noise level of ``ends``: DOP853 on ``d(x / alpha) / d rho = eps``."""
    from scipy.integrate import solve_ivp

    shape = x_start.shape

    def level(rho: float) -> float:  # diffusers' noise level of rho = sigma / alpha
        return rho / (1.0 + rho) if flow else rho

    def rho_of(value: float) -> float:
        return value / (1.0 - value) if flow else value

    def rhs(rho, y):
        alpha, sigma = _alpha_sigma(level(rho), flow)
        x = torch.from_numpy(y).reshape(shape) * alpha
        return (-sigma * mixture.score(x, alpha, sigma)).reshape(-1).numpy()

    y0 = (x_start / _alpha_sigma(start, flow)[0]).reshape(-1).numpy()
    ends = sorted(set(ends), reverse=True)
    rhos = [rho_of(e) for e in ends]
    solution = solve_ivp(rhs, (rho_of(start), rhos[-1]), y0, method="DOP853", rtol=1e-11, atol=1e-11, t_eval=rhos)
    return {e: torch.from_numpy(solution.y[:, j]).reshape(shape) * _alpha_sigma(e, flow)[0] for j, e in enumerate(ends)}


def accuracy(steps_list: list[int]) -> None:
    """The accuracy table (see the module docstring)."""
    import diffusers

    from deis_ode import DEISMultistepScheduler as Ours
    from deis_ode.diffusion import GaussianMixture

    mixture = GaussianMixture.default(dim=8)
    x_start = torch.randn(256, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flow = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
    problems = {
        "VP (linear betas), eps model": (
            False,
            [
                ("diffusers DEIS", diffusers.DEISMultistepScheduler, {}),
                ("deis_ode default", Ours, {}),
                ("final_sigmas_type='zero'", Ours, {"final_sigmas_type": "zero"}),
                ("solver_order=3", Ours, {"solver_order": 3}),
                ("solver_order=4", Ours, {"solver_order": 4}),
                ("solver_order=3, basis='rho'", Ours, {"solver_order": 3, "basis": "rho"}),
                ("solver_order=4, basis='rho'", Ours, {"solver_order": 4, "basis": "rho"}),
                ("solver_order=3, basis='t'", Ours, {"solver_order": 3, "basis": "t"}),
                ("solver_order=4, basis='t'", Ours, {"solver_order": 4, "basis": "t"}),
                ("karras (diffusers' grid)", Ours, {"use_karras_sigmas": True}),
                ("karras, 'sigma_min'", Ours, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
                ("karras, 'zero'", Ours, {"use_karras_sigmas": True, "final_sigmas_type": "zero"}),
            ],
        ),
        "flow sigmas (shift 3), flow model": (
            True,
            [
                ("diffusers DEIS", diffusers.DEISMultistepScheduler, flow),
                ("deis_ode default", Ours, flow),
                ("final_sigmas_type='sigma_min'", Ours, {**flow, "final_sigmas_type": "sigma_min"}),
                ("final_sigmas_type='zero'", Ours, {**flow, "final_sigmas_type": "zero"}),
                ("solver_order=3, zero", Ours, {**flow, "solver_order": 3, "final_sigmas_type": "zero"}),
            ],
        ),
    }
    for title, (is_flow, configurations) in problems.items():
        print(f"accuracy, {title}: GaussianMixture.default(dim=8), exact model, 256 samples, float64")
        print(f"{'configuration':<30} {'NFE':>4} {'moving':>6} {'last':>8} {'vs ODE at end':>14} {'vs sigma = 0':>13}")
        print("-" * 80)
        for steps in steps_list:
            runs = []
            for name, cls, options in configurations:
                scheduler = cls(**options)
                scheduler.set_timesteps(steps)
                levels = scheduler.sigmas.double()
                x = x_start.clone()
                for n, t in enumerate(scheduler.timesteps):
                    alpha, sigma = _alpha_sigma(float(levels[n]), is_flow)
                    eps = -sigma * mixture.score(x, alpha, sigma)
                    output = eps - (x - sigma * eps) / alpha if is_flow else eps  # flow: d x / d sigma
                    x = scheduler.step(output, t, x).prev_sample
                moving = int((levels[1:] != levels[:-1]).sum())
                runs.append((name, len(scheduler.timesteps), moving, float(levels[0]), float(levels[-1]), x))
            reference = _reference(mixture, is_flow, x_start, runs[0][3], [run[4] for run in runs] + [0.0])
            for name, nfe, moving, _, end, x in runs:
                errors = [((x - reference[r]).norm(dim=-1) / reference[r].norm(dim=-1)).median() for r in (end, 0.0)]
                print(f"{name:<30} {nfe:>4} {moving:>6} {end:>8.3g} {errors[0]:>14.2e} {errors[1]:>13.2e}")
            print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--order", type=int, default=2, help="solver_order (default 2, diffusers' default)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--accuracy", action="store_true", help="the accuracy table of the options instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.accuracy:
        accuracy([5, 10, 25])
        return

    import diffusers

    from deis_ode import DEISMultistepScheduler

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 64, 64, generator=generator).to(device)
    output = torch.randn(8, 4, 64, 64, generator=generator).to(device)

    ours = DEISMultistepScheduler(solver_order=args.order)
    ours.set_timesteps(args.steps)
    orders = [min(ours._order_cap[i], i + 1) for i in range(args.steps)]  # the orders the scheduler will use
    runs = {("minimal", None): _minimal_loop(orders, x0, output, args.order)}
    for name, cls in [("deis_ode", DEISMultistepScheduler), ("diffusers", diffusers.DEISMultistepScheduler)]:
        for return_dict in (True, False):
            runs[(name, return_dict)] = _scheduler_loop(
                cls(solver_order=args.order), args.steps, x0, output, return_dict
            )
    per_step = {key: seconds / args.steps for key, seconds in _time(runs, args.repeats, device).items()}
    minimal = per_step.pop(("minimal", None))

    print(
        f"step() on float32 {tuple(x0.shape)}, {args.steps} steps, solver_order={args.order}, device={device}, "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'scheduler':<12} {'return_dict':<12} {'us/step':>10} {'ratio to minimal':>18}")
    print(f"{'minimal':<12} {'-':<12} {minimal * 1e6:>10.1f} {1.0:>18.2f}")
    for (name, return_dict), seconds in per_step.items():
        print(f"{name:<12} {return_dict!s:<12} {seconds * 1e6:>10.1f} {seconds / minimal:>18.2f}")


if __name__ == "__main__":
    main()
