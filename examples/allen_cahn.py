"""Allen-Cahn equation in a stiff regime (max |L| about 1e4) with deis4.

    python examples/allen_cahn.py                   # t in [0, 60], a few seconds
    python examples/allen_cahn.py --plot ac.png     # also draw u(x, t) (needs matplotlib)
    python examples/allen_cahn.py --quick           # t in [0, 10] (a smoke test)

The equation ``u_t = eps u_xx + u - u^3`` with ``eps = 0.01`` on ``x`` in ``[0, 2 pi)`` (periodic) is
discretised by 2048 Fourier modes, so the diffusion symbol ``L = -eps k^2`` reaches ``-eps 1024^2 ~ -1.05e4``:
an explicit method needs about ``3e4`` steps per unit of time, while ``deis4`` integrates ``L`` exactly and
extrapolates only ``N(u) = u - u^3``:

    dv/dt = L v + rfft(irfft(v) - irfft(v)^3),    v = rfft(u).

From a smooth initial state the solution separates into phases ``u = +-1`` within a few time units, joined by
interfaces of width about ``sqrt(2 eps) = 0.14``. The interfaces then drift slowly (metastability) until the
narrowest phase disappears near ``t = 37``. The free energy

    E(u) = int eps/2 u_x^2 + (1 - u^2)^2 / 4 dx

decreases along every solution (``dE/dt = -int u_t^2``); the script prints it, and the number of interfaces.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torchdiffeq
from _spectral import SpectralProblem, Timer, pyplot_or_exit

import deis_ode  # noqa: F401  (registers the deis* methods in torchdiffeq)
from deis_ode import SemiLinearODE
from deis_ode.verify import count_evaluations

N_GRID = 2048
EPS = 0.01
LENGTH = 2 * math.pi


def initial_state(x: np.ndarray) -> np.ndarray:
    return 0.4 * np.sin(x) + 0.3 * np.cos(3 * x + 1) + 0.25 * np.sin(5 * x + 2) + 0.1 * np.cos(7 * x)


def make_problem(t_end: float = 10.0, n: int = N_GRID, eps: float = EPS) -> SpectralProblem:
    """Allen-Cahn with ``eps`` on ``n`` Fourier modes of ``[0, 2 pi)``, to ``t_end``."""
    x = LENGTH * np.arange(n) / n
    k = 2 * math.pi / LENGTH * np.arange(n // 2 + 1, dtype=np.float64)
    linear = -eps * k**2

    def nonlinear(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u = torch.fft.irfft(v, n=n)
        return torch.fft.rfft(u - u * u * u)

    def nonlinear_np(v: np.ndarray) -> np.ndarray:
        u = np.fft.irfft(v, n=n)
        return np.fft.rfft(u - u * u * u)  # not u**3: numpy's power is up to 30x slower on some data

    return SpectralProblem(
        name="Allen-Cahn",
        ode=SemiLinearODE(torch.from_numpy(linear), nonlinear),
        x0=torch.fft.rfft(torch.from_numpy(initial_state(x))),
        t_end=t_end,
        linear=linear,
        nonlinear_np=nonlinear_np,
        physical=lambda v: torch.fft.irfft(v, n=n),
        description=f"Allen-Cahn, eps = {eps:g}, x in [0, 2 pi), {n} modes, max |L| = {np.abs(linear).max():.3g}",
        info={"x": x, "k": k, "eps": eps},
    )


def energy(problem: SpectralProblem, v: torch.Tensor) -> torch.Tensor:
    """The free energy ``int eps/2 u_x^2 + (1 - u^2)^2 / 4 dx`` of the coefficients ``v`` (batched)."""
    n = len(problem.info["x"])
    k = torch.from_numpy(problem.info["k"])
    u = torch.fft.irfft(v, n=n)
    u_x = torch.fft.irfft(1j * k * v, n=n)
    density = 0.5 * problem.info["eps"] * u_x**2 + 0.25 * (1 - u**2) ** 2
    return density.sum(-1) * (LENGTH / n)


def interfaces(u: torch.Tensor) -> torch.Tensor:
    """Sign changes of ``u`` around the periodic domain (batched)."""
    return (u * torch.roll(u, 1, dims=-1) < 0).sum(-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t-end", type=float, default=60.0, help="final time (default 60)")
    parser.add_argument("--step", type=float, default=0.05, help="step size (default 0.05)")
    parser.add_argument("--method", default="deis4", choices=["deis2", "deis3", "deis4"])
    parser.add_argument("--quick", action="store_true", help="integrate to t = 10 only")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of u(x, t)")
    args = parser.parse_args(argv)
    plt = pyplot_or_exit() if args.plot else None  # before the run: without matplotlib, stop now with a hint
    torch.set_num_threads(1)
    t_end = 10.0 if args.quick else args.t_end

    problem = make_problem(t_end)
    print(problem.description)
    times = torch.linspace(0.0, t_end, round(t_end / 0.5) + 1, dtype=torch.float64)
    with count_evaluations(problem.ode) as calls, Timer() as clock:
        states = torchdiffeq.odeint(
            problem.ode, problem.x0, times, method=args.method, options={"step_size": args.step}
        )
    print(
        f"{args.method}, step {args.step:g}, t in [0, {t_end:g}]: {calls.count} evaluations of N, {clock.seconds:.2f} s"
    )
    u = problem.physical(states)
    e = energy(problem, states)
    walls = interfaces(u)
    for i in range(0, len(times), max(1, (len(times) - 1) // 10)):
        print(f"t = {times[i].item():5.1f}   energy {e[i].item():.6f}   interfaces {walls[i].item()}")
    increase = (e[1:] - e[:-1]).max().item()
    print(f"largest energy increase between outputs: {increase:.2e} (relative {increase / e[0].item():.2e})")
    print(f"max |u| = {u.abs().max().item():.6f}")

    if args.plot:
        fig, (ax, ax_e) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [3, 2]})
        mesh = ax.pcolormesh(problem.info["x"], times.numpy(), u.numpy(), cmap="RdBu_r", shading="auto")
        fig.colorbar(mesh, ax=ax, label="u")
        ax.set_xlabel("x")
        ax.set_ylabel("t")
        ax.set_title(f"Allen-Cahn, eps = {EPS:g}, {args.method}")
        ax_e.plot(times.numpy(), e.numpy())
        ax_e.set_xlabel("t")
        ax_e.set_ylabel("free energy")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
