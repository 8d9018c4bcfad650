"""Command line: ``python -m deis_ode demo`` and ``python -m deis_ode verify``.

``demo`` samples a Gaussian-mixture VP diffusion with DEIS at 10 evaluations of the noise
model and compares it with dopri5, rk4 and Euler at about the same effort, against a scipy
reference (``--plot FILE`` draws the samples; a progress bar shows on a terminal). ``verify``
prints the empirical convergence order of a method on the test problems of :mod:`deis_ode.verify`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch

DEIS_METHODS = ("deis1", "deis2", "deis3", "deis4", "deis5")


# --------------------------------------------------------------------------- verify


def _verify(args: argparse.Namespace) -> int:
    import deis_ode  # noqa: F401  (registers the deis* methods with torchdiffeq)
    from deis_ode import reference
    from deis_ode.verify import PROBLEMS, empirical_order

    methods = list(DEIS_METHODS) if args.method == "all" else [args.method]
    problems = list(PROBLEMS) if args.problem == "all" else [args.problem]
    options = {}
    if args.warmup is not None:
        options["warmup"] = args.warmup
    if args.basis is not None:
        options["basis"] = args.basis

    failed = []
    for name in problems:
        problem = PROBLEMS[name]()
        target = reference.solve(problem.ode, problem.x0, torch.tensor([problem.t0, problem.t1], dtype=torch.float64))
        for method in methods:
            steps = tuple(args.steps) if args.steps else problem.steps_for(method)
            try:
                table = empirical_order(
                    method,
                    problem.ode,
                    problem.x0,
                    problem.t0,
                    problem.t1,
                    steps=steps,
                    grid=args.grid,
                    options=options or None,
                    reference=target,
                    seed=args.seed,
                    problem=name,
                )
            except ValueError as error:  # an unknown method, an option this ODE does not take, ...
                print(f"method {method}  problem {name}: {error}\n")
                failed.append(f"{method} on {name}: {error}")
                continue
            orders = problem.expected_orders(method, options.get("warmup"))
            if orders is not None:
                table.expected, table.expected_max = orders
            print(table)
            print()
            if args.check and orders is not None:
                lowest, highest = orders
                if not lowest - args.tolerance <= table.slope <= highest + args.tolerance:
                    expected = f"{lowest}" if lowest == highest else f"{lowest} to {highest}"
                    failed.append(
                        f"{method} on {name}: slope {table.slope:.3f}, expected {expected} +- {args.tolerance:g}"
                    )
    if failed:
        print("verify failed:\n  " + "\n  ".join(failed))
        return 1
    return 0


# --------------------------------------------------------------------------- demo


def _power_grid(n: int, t0: float, t1: float, power: float = 2.0) -> torch.Tensor:
    """``n`` steps from ``t0`` to ``t1``, uniform in ``t ** (1 / power)`` (DEIS' quadratic grid):
    small steps near ``t1 = 0``, where the data's detail is resolved."""
    u = torch.linspace(t0 ** (1 / power), t1 ** (1 / power), n + 1, dtype=torch.float64)
    grid = u**power
    grid[0], grid[-1] = t0, t1
    return grid


class Progress:
    """A progress bar in the style of k-diffusion's samplers: tqdm when it is installed, otherwise a plain
    textual bar on ``stream`` (stderr).

    Args:
        total: the value that means "done" (a count, or e.g. 1000 for a fraction in permille).
        desc: the label in front of the bar.
        disable: ``True`` shows nothing, ``False`` always shows the bar, ``None`` (default) shows it only when
            ``stream`` is a terminal.
        stream: where the bar is written (default ``sys.stderr``).

    Use it as a context manager; :meth:`advance_to` moves the bar forward (never back), :meth:`update` by a step.
    """

    def __init__(self, total: int, desc: str, disable: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        if disable is None:
            disable = not (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.total, self.desc, self.disable, self.n = total, desc, disable, 0
        self._postfix = ""
        self._shown = ""
        self._tqdm = None
        if not disable:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self._draw()
            else:
                self._tqdm = tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Move the bar ``n`` steps forward."""
        self.advance_to(self.n + n)

    def advance_to(self, value: float) -> None:
        """Move the bar to ``value`` (clipped to ``[n, total]``; a smaller value is ignored)."""
        value = int(min(max(value, self.n), self.total))
        if value == self.n:
            return
        step, self.n = value - self.n, value
        if self._tqdm is not None:
            self._tqdm.update(step)
        elif not self.disable:
            self._draw()

    def set_postfix(self, text: str) -> None:
        """Show ``text`` after the bar (e.g. what is being computed)."""
        self._postfix = text
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text)
        elif not self.disable:
            self._draw()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        elif not self.disable and self._shown:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
            self.stream.flush()
            self._shown = ""

    def _draw(self, width: int = 30) -> None:
        done = round(width * self.n / self.total) if self.total else width
        line = f"{self.desc}: |{'#' * done}{'.' * (width - done)}| {self.n}/{self.total} {self._postfix}".rstrip()
        if line != self._shown:
            padding = " " * max(len(self._shown) - len(line), 0)
            self.stream.write("\r" + line + padding)
            self.stream.flush()
            self._shown = line


@dataclass
class DemoRow:
    """One method of the demo: its label, its evaluations of the noise model, its samples and their errors."""

    label: str
    nfe: int
    samples: torch.Tensor
    median_error: float
    max_error: float
    wrong_component: int = 0


@dataclass
class DemoResult:
    """What :func:`run_demo` computes: the rows, the reference samples and the reference's wall time."""

    rows: list[DemoRow]
    reference: torch.Tensor
    reference_seconds: float
    t0: float
    t1: float


def run_demo(
    nfe: int = 10,
    samples: int = 256,
    seed: int = 0,
    *,
    disable: bool | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> DemoResult:
    """The computation behind ``python -m deis_ode demo``.

    Args:
        nfe: the budget of noise-model evaluations per method.
        samples: the number of samples of ``x_T ~ N(0, I)`` in 8 dimensions.
        seed: the seed of ``x_T``.
        disable: the progress bars (reference solve, then the methods): ``True`` hides them, ``False`` shows them,
            ``None`` shows them on a terminal only.
        callback: called after each method with ``{"i", "label", "nfe", "x", "reference", "median_error",
            "max_error"}`` (``i`` counts the methods from 0, ``x`` holds its samples).
    """
    import torchdiffeq

    from deis_ode import reference
    from deis_ode.diffusion import VPODE, GaussianMixture, GaussianMixtureEps, VPSchedule, optimize_timesteps
    from deis_ode.verify import count_evaluations

    torch.manual_seed(seed)
    t0, t1, budget = 1.0, 1e-3, nfe
    schedule = VPSchedule.linear()
    mixture = GaussianMixture.default(dim=8)
    ode = VPODE(GaussianMixtureEps(mixture, schedule), schedule)
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(samples, 8, generator=generator, dtype=torch.float64)

    started = time.perf_counter()
    with Progress(1000, "scipy reference", disable) as bar:

        def tracked(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            bar.advance_to(1000 * (t0 - float(t)) / (t0 - t1))  # how far in t scipy has got, in permille
            return ode(t, x)

        ref = reference.solve(tracked, x_T, torch.tensor([t0, t1], dtype=torch.float64)).states[-1]
        bar.advance_to(1000)
    ref_seconds = time.perf_counter() - started

    def run(method: str, grid: torch.Tensor, **options: object) -> tuple[torch.Tensor, int]:
        with torch.no_grad(), count_evaluations(ode) as calls:
            out = torchdiffeq.odeint(ode, x_T, grid, method=method, **options)
        return out[-1], calls.count

    rows: list[DemoRow] = []
    ref_component = mixture.classify(ref)
    methods = ("deis3", "deis3 optimised", "deis1", "dopri5", "rk4", "euler")
    bar = Progress(len(methods), "methods", disable)

    def add(label: str, x: torch.Tensor, nfe: int) -> None:
        per_sample = (x - ref).reshape(x.shape[0], -1).norm(dim=-1)
        wrong = int((mixture.classify(x) != ref_component).sum())
        row = DemoRow(label, nfe, x, per_sample.median().item(), per_sample.max().item(), wrong)
        rows.append(row)
        bar.update()
        if callback is not None:
            callback(
                {
                    "i": len(rows) - 1,
                    "label": label,
                    "nfe": nfe,
                    "x": x,
                    "reference": ref,
                    "median_error": row.median_error,
                    "max_error": row.max_error,
                }
            )

    with bar:
        # deis*: the most steps whose evaluations fit the budget (the warm-up may cost extra ones).
        for method in ("deis3", "deis1"):
            bar.set_postfix(method)
            for steps in range(budget, 0, -1):
                x, used = run(method, _power_grid(steps, t0, t1))
                if used <= budget:
                    break
            add(f"{method} ({steps} steps)" + (" = DDIM" if method == "deis1" else ""), x, used)
            if method == "deis3":
                # the same solver on a grid optimised for this model from 32 other noise draws (not x_T)
                bar.set_postfix("deis3, optimize_timesteps")
                calibration = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed + 1), dtype=x_T.dtype)
                grid = optimize_timesteps(ode, calibration, steps, t_start=t0, t_end=t1)
                x, used = run("deis3", grid)
                add(f"optimised grid: deis3 ({steps} steps)", x, used)

        # dopri5 is adaptive: the loosest tolerance that spends at least the budget.
        bar.set_postfix("dopri5")
        for tol in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
            x, used = run("dopri5", torch.tensor([t0, t1], dtype=torch.float64), rtol=tol, atol=tol)
            if used >= budget:
                break
        add(f"dopri5 (rtol=atol={tol:g})", x, used)

        bar.set_postfix("rk4")
        rk4_steps = math.ceil(budget / 4)
        x, used = run("rk4", _power_grid(rk4_steps, t0, t1))
        add(f"rk4 ({rk4_steps} steps)", x, used)
        bar.set_postfix("euler")
        x, used = run("euler", _power_grid(budget, t0, t1))
        add(f"euler ({budget} steps)", x, used)
    return DemoResult(rows, ref, ref_seconds, t0, t1)


def _import_matplotlib_figure() -> Any:
    """matplotlib's ``Figure`` class (no pyplot, so no display is needed), or ``ImportError`` saying how to get it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "--plot needs matplotlib, which is not installed: pip install deis_ode[bench] (or pip install matplotlib)"
        ) from error
    return Figure


def plot_demo(result: DemoResult, path: str) -> None:
    """Save a PNG with one panel per method: the first two coordinates of its samples over the reference's."""
    figure_class = _import_matplotlib_figure()
    rows = result.rows
    figure = figure_class(figsize=(3.2 * len(rows), 3.4), layout="constrained")
    axes = figure.subplots(1, len(rows), sharex=True, sharey=True, squeeze=False)[0]
    ref = result.reference.reshape(result.reference.shape[0], -1)[:, :2].numpy()
    for ax, row in zip(axes, rows, strict=True):
        x = row.samples.reshape(row.samples.shape[0], -1)[:, :2].numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=14, facecolors="none", edgecolors="0.6", linewidths=0.8, label="reference")
        ax.scatter(x[:, 0], x[:, 1], s=5, color="C3", label="samples")
        ax.set_title(f"{row.label}\nNFE {row.nfe}, median error {row.median_error:.2g}", fontsize=9)
        ax.set_xlabel("x[0]")
    axes[0].set_ylabel("x[1]")
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(f"VP diffusion of an 8-D Gaussian mixture, t from {result.t0:g} to {result.t1:g}", fontsize=10)
    figure.savefig(path, dpi=120)


def _demo(args: argparse.Namespace) -> int:
    if args.plot is not None:
        try:
            _import_matplotlib_figure()  # fail before the computation, not after it
        except ImportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    disable = None if args.progress is None else not args.progress
    result = run_demo(args.nfe, args.samples, args.seed, disable=disable)
    print(
        f"VP diffusion (linear beta) of an 8-D Gaussian mixture with its exact noise model: {args.samples} samples "
        f"of x_T ~ N(0, I), t from {result.t0:g} to {result.t1:g}, quadratic time grid.\n"
        f"Error: |x - x_ref| per sample against scipy DOP853 (rtol=atol=1e-12, {result.reference_seconds:.1f} s). "
        "NFE: evaluations of the noise model.\n"
    )
    width = max(len(r.label) for r in result.rows)
    header = f"{'method':<{width}} {'wrong mode':>10} {'NFE':>5} {'median error':>13} {'max error':>11}"
    print(header)
    print("-" * len(header))
    for row in result.rows:
        print(
            f"{row.label:<{width}} {row.wrong_component:>10d} {row.nfe:>5d} {row.median_error:>13.3e} "
            f"{row.max_error:>11.3e}"
        )
    print(
        "\nwrong mode: samples that end nearest a different mixture component than their reference sample "
        "(a different image, for an image model)."
    )
    deis3 = result.rows[0]
    better = [r for r in result.rows[1:] if r.nfe <= deis3.nfe + 2 and not r.label.startswith("optimised")]
    for r in better:
        wins = [
            what
            for what, ours, theirs in (
                ("median error", deis3.median_error, r.median_error),
                ("max error", deis3.max_error, r.max_error),
                ("wrong-mode count", deis3.wrong_component, r.wrong_component),
            )
            if theirs < ours
        ]
        if wins:
            extra = f" with {r.nfe - deis3.nfe} more evaluations" if r.nfe > deis3.nfe else ""
            print(f"{r.label} beats deis3 on the quadratic grid in {', '.join(wins)}{extra}.")
    if deis3.wrong_component:
        print(
            f"deis3's max error is the {deis3.wrong_component} sample(s) ending in another mixture component: the "
            f"distance between two\ncomponents, not the size of its error elsewhere (median {deis3.median_error:.2e}). "
            "Samples near the boundary between components\ncross it or not depending on the direction of each "
            "method's error at high noise, not only on its size."
        )
    optimised = next((r for r in result.rows if r.label.startswith("optimised")), None)
    if optimised is not None:
        print(
            f"On a grid from optimize_timesteps (32 other noise draws, no training) deis3 reaches median "
            f"{optimised.median_error:.2e} with {optimised.wrong_component} wrong-mode sample(s).\n"
            "Across 14 problems: docs/diffusion.md, 'A family of problems' (benchmarks/family.py)."
        )
    if args.plot is not None:
        plot_demo(result, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from deis_ode.verify import PROBLEMS

    parser = argparse.ArgumentParser(prog="python -m deis_ode", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="{demo,verify}")

    demo = commands.add_parser("demo", help="DEIS against dopri5, rk4 and Euler on a Gaussian-mixture diffusion")
    demo.add_argument("--nfe", type=int, default=10, help="evaluations of the noise model (default 10)")
    demo.add_argument("--samples", type=int, default=256, help="number of samples (default 256)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", metavar="FILE", help="write a PNG scatter of the samples against the reference")
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars (default: only on a terminal)",
    )
    demo.set_defaults(handler=_demo)

    verify = commands.add_parser("verify", help="empirical convergence order of a method on a test problem")
    verify.add_argument("--method", default="deis3", help="a torchdiffeq method name, or 'all' for deis1..deis5")
    verify.add_argument("--problem", default="scalar", choices=[*PROBLEMS, "all"])
    verify.add_argument("--grid", default="uniform", choices=["uniform", "random"])
    verify.add_argument(
        "--steps", type=int, nargs="+", help="step counts (default: the problem's own, doubled for deis5)"
    )
    verify.add_argument("--warmup", choices=["lower_order", "full_order"], help="deis* warm-up (default: the ODE's)")
    verify.add_argument("--basis", choices=["t", "rho", "logrho"], help="deis* basis variable (default: the solver's)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random grid")
    verify.add_argument("--check", action="store_true", help="exit 1 when a slope misses its expected order")
    verify.add_argument("--tolerance", type=float, default=0.2, help="allowed |slope - expected| for --check")
    verify.set_defaults(handler=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "verify" and args.steps is not None and len(args.steps) < 2:
        parser.error("--steps needs at least two step counts")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
