"""Sample a flow-matching (rectified-flow) model with DEIS, and compare with scipy and with Euler.

    python examples/flow_matching.py                  # a few seconds
    python examples/flow_matching.py --plot flow.png  # also draw the samples (needs matplotlib)
    python examples/flow_matching.py --quick          # fewer samples and step counts (a smoke test)

Flow matching with straight paths noises data as ``x_t = (1 - t) x_0 + t eps`` (``FlowSchedule()``: ``alpha = 1 - t``,
``sigma = t``) and learns the velocity ``u(x, t) = E[eps - x_0 | x_t = x]``; sampling integrates ``dx/dt = u`` from
pure noise at ``t = 1`` to data at ``t = 0``. Instead of a trained network this example uses the *exact* velocity of
a 2-D Gaussian mixture (what a perfectly trained model would output), so the only error left is the sampler's,
measured against scipy's DOP853 at ``rtol = atol = 1e-10`` on the same starting points.

The model outputs the velocity, so the drift is

    DiffusionODE(velocity, FlowSchedule(), prediction="flow", extrapolate="x0")

whose ``deis*`` methods extrapolate the data prediction ``x0`` (finite at ``t = 1``, where ``alpha = 0``), in the
basis ``t`` (``log rho`` is infinite at both ends of ``[0, 1]``). The grid is uniform in ``t`` and ends exactly at
``t = 0``. Euler on the same grid is the usual flow-matching sampler; for these straight paths it coincides with
``deis1`` (exponential Euler on the x0 split, i.e. DDIM) to round-off. Every method here spends one velocity
evaluation per step. With few steps the error is pre-asymptotic (at 10 steps ``deis2`` is the most accurate);
from about 20 steps on ``deis3`` shows its third order.
"""

from __future__ import annotations

import argparse
import math

import torch
import torchdiffeq
from torch import Tensor, nn

import deis_ode  # noqa: F401  (registers the deis* methods in torchdiffeq)
from deis_ode import reference
from deis_ode.diffusion import DiffusionODE, FlowSchedule, GaussianMixture
from deis_ode.verify import count_evaluations


def ring_mixture(n_modes: int = 6, radius: float = 2.0) -> GaussianMixture:
    """``n_modes`` Gaussians on a circle, of unequal widths (0.15 to 0.4) and weights."""
    angles = 2 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    stds = torch.linspace(0.15, 0.4, n_modes, dtype=torch.float64)
    return GaussianMixture(means, stds, 1.0 + 0.5 * torch.arange(n_modes, dtype=torch.float64))


class MixtureVelocity(nn.Module):
    r"""The exact flow-matching velocity ``u = alpha' E[x0 | x] + sigma' E[eps | x]`` of a Gaussian mixture.

    Per component ``k`` (weight ``w_k``, mean ``mu_k``, std ``s_k``), ``x_t`` is Gaussian with mean ``alpha mu_k`` and
    variance ``v_k = alpha^2 s_k^2 + sigma^2``, and ``E[x0 | x, k] = mu_k + alpha s_k^2 (x - alpha mu_k) / v_k``.
    With the component posterior ``r_k(x)``, ``E[x0 | x] = sum_k r_k E[x0 | x, k]`` and ``E[eps | x] = -sigma score``.
    Both stay finite on all of ``[0, 1]``, including ``alpha = 0`` and ``sigma = 0``.
    """

    def __init__(self, mixture: GaussianMixture, schedule: FlowSchedule) -> None:
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        m = self.mixture
        posterior = m.component_posterior(x, alpha, sigma)  # (B, K)
        var = alpha**2 * m.stds**2 + sigma**2  # (K,)
        shrink = (alpha * m.stds**2 / var)[:, None]  # (K, 1)
        x0_given_k = m.means + shrink * (x[:, None, :] - alpha * m.means)  # (B, K, D)
        x0 = (posterior[..., None] * x0_given_k).sum(dim=1)
        eps = -sigma * m.score(x, alpha, sigma)
        return (self.schedule.d_alpha(t) * x0 + self.schedule.d_sigma(t) * eps).to(x.dtype)


def median_error(x: Tensor, ref: Tensor) -> float:
    return (x - ref).norm(dim=-1).median().item()


def plot(path: str, mixture: GaussianMixture, ref: Tensor, samples: dict[str, Tensor]) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise SystemExit("--plot needs matplotlib: pip install deis_ode[bench]") from error
    data = mixture.sample(ref.shape[0], torch.Generator().manual_seed(3))[0]
    panels = [("data (exact samples)", data, None), *[(label, x, ref) for label, x in samples.items()]]
    figure = Figure(figsize=(3.2 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), sharex=True, sharey=True)
    for ax, (title, x, target) in zip(axes, panels, strict=True):
        if target is not None:
            ax.scatter(target[:, 0], target[:, 1], s=12, facecolors="none", edgecolors="0.6", linewidths=0.6)
        ax.scatter(x[:, 0], x[:, 1], s=3, color="C0" if target is None else "C3")
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
    figure.suptitle("flow matching: samples (red) over the scipy reference (grey circles)", fontsize=10)
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, help="number of samples (default 1000; 200 with --quick)")
    parser.add_argument("--steps", type=int, nargs="+", help="step counts (default 5 10 20 40; 5 10 20 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smaller run (a smoke test)")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of the samples (at 10 steps) over the reference")
    args = parser.parse_args()
    if args.samples is None:
        args.samples = 200 if args.quick else 1000
    if args.steps is None:
        args.steps = [5, 10, 20] if args.quick else [5, 10, 20, 40]

    torch.set_num_threads(1)  # tiny float64 tensors: threads cost more than they give
    schedule = FlowSchedule()
    mixture = ring_mixture()
    velocity = MixtureVelocity(mixture, schedule)
    ode = DiffusionODE(velocity, schedule, prediction="flow", extrapolate="x0")
    x_1 = torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    # the reference integrates dx/dt = u(x, t) itself, independently of the semi-linear split
    ref = reference.solve(lambda t, x: velocity(x, t), x_1, [1.0, 0.0], rtol=1e-10, atol=1e-10).states[-1]

    print(
        f"flow matching (alpha = 1 - t, sigma = t) of a 2-D mixture of {mixture.n_components} Gaussians with its exact "
        f"velocity; {args.samples} samples from t = 1 to 0 on a uniform grid.\n"
        "median |x - x_ref| per sample against scipy DOP853 (rtol = atol = 1e-10); NFE = velocity evaluations\n"
    )
    methods = ("deis1", "deis2", "deis3", "euler")
    header = f"{'steps':>5} " + " ".join(f"{m:>10}" for m in methods)
    print(header)
    print("-" * len(header))
    samples: dict[str, Tensor] = {}
    plot_steps = 10 if 10 in args.steps else args.steps[0]
    errors: dict[str, list[float]] = {m: [] for m in methods}
    for steps in args.steps:
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        row = []
        for method in methods:
            options = {"basis": "t"} if method.startswith("deis") else {}
            with torch.no_grad(), count_evaluations(ode) as calls:
                x = torchdiffeq.odeint(ode, x_1, grid, method=method, options=options)[-1]
            if calls.count != steps:  # every method here makes one evaluation per step
                raise RuntimeError(f"{method} made {calls.count} evaluations in {steps} steps")
            errors[method].append(median_error(x, ref))
            row.append(f"{errors[method][-1]:>10.2e}")
            if steps == plot_steps and method in ("deis3", "euler"):
                samples[f"{method}, {steps} steps"] = x
        print(f"{steps:>5} " + " ".join(row))
    if len(args.steps) > 1:
        logs = [math.log(steps) for steps in args.steps]
        slopes = []
        for method in methods:
            err = [math.log(e) for e in errors[method]]
            slopes.append(-(err[-1] - err[-2]) / (logs[-1] - logs[-2]))
        print(f"{'order':>5} " + " ".join(f"{s:>10.2f}" for s in slopes) + "   (slope over the last two step counts)")
    last = args.steps[-1]
    deis3, euler = errors["deis3"][-1], errors["euler"][-1]
    print(
        f"\ndeis3 with {last} velocity evaluations: median error {deis3:.3e} "
        f"(Euler with as many: {euler:.3e}, {euler / deis3:.0f} times larger)"
    )
    if args.plot:
        plot(args.plot, mixture, ref, samples)


if __name__ == "__main__":
    main()
