"""Focusing nonlinear Schroedinger equation (a complex, purely imaginary linear part) with deis4.

    python examples/nls.py                   # the second-order soliton over two periods, a few seconds
    python examples/nls.py --plot nls.png    # also draw |u(x, t)| (needs matplotlib)
    python examples/nls.py --quick           # one period (a smoke test)

The equation ``i u_t + u_xx / 2 + |u|^2 u = 0`` on ``x`` in ``[-20, 20)`` (periodic), with 1024 Fourier modes
of the complex field ``u`` (``v = fft(u)``), is the semi-linear ODE

    dv/dt = L v + N(v),    L = -i k^2 / 2,    N(v) = i fft(|u|^2 u),    u = ifft(v).

``L`` is purely imaginary and reaches ``|L| = 3.2e3``: the linear part only rotates phases, and ``deis4``
rotates them exactly. Two solutions are integrated:

* the fundamental soliton ``u = sech(x) exp(i t / 2)``, an exact solution (up to its ``2e-9`` tails at the
  periodic boundary): the printed error is against it;
* the second-order soliton ``u(x, 0) = 2 sech(x)``, a breather whose modulus is periodic with period ``pi/2``
  and focuses to a peak of height 4 at ``t = pi/4``. The mass ``int |u|^2 dx`` (8) is conserved by the
  equation; the printed drift is the integrator's.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torchdiffeq
from _spectral import SpectralProblem, Timer, fft_wavenumbers, pyplot_or_exit

import deis_ode  # noqa: F401  (registers the deis* methods in torchdiffeq)
from deis_ode import SemiLinearODE
from deis_ode.verify import count_evaluations

N_GRID = 1024
HALF_WIDTH = 20.0
PERIOD = math.pi / 2


def make_problem(amplitude: float = 2.0, t_end: float = PERIOD, n: int = N_GRID) -> SpectralProblem:
    """NLS from ``u(x, 0) = amplitude * sech(x)`` on ``n`` modes of ``[-20, 20)``, to ``t_end``."""
    length = 2 * HALF_WIDTH
    x = -HALF_WIDTH + length * np.arange(n) / n
    k = fft_wavenumbers(n, length)
    linear = -0.5j * k**2

    def nonlinear(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u = torch.fft.ifft(v)
        return 1j * torch.fft.fft((u.real**2 + u.imag**2) * u)

    def nonlinear_np(v: np.ndarray) -> np.ndarray:
        u = np.fft.ifft(v)
        return 1j * np.fft.fft((u.real**2 + u.imag**2) * u)

    u0 = amplitude / np.cosh(x)
    return SpectralProblem(
        name="NLS",
        ode=SemiLinearODE(torch.from_numpy(linear), nonlinear),
        x0=torch.fft.fft(torch.from_numpy(u0.astype(np.complex128))),
        t_end=t_end,
        linear=linear,
        nonlinear_np=nonlinear_np,
        physical=torch.fft.ifft,
        description=f"NLS, u0 = {amplitude:g} sech(x), x in [-20, 20), {n} modes, max |L| = {np.abs(linear).max():.3g}",
        info={"x": x, "dx": length / n},
    )


def mass(problem: SpectralProblem, v: torch.Tensor) -> torch.Tensor:
    """``int |u|^2 dx`` of the coefficients ``v`` (batched)."""
    return (problem.physical(v).abs() ** 2).sum(-1) * problem.info["dx"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--periods", type=float, default=2.0, help="breather periods pi/2 to integrate (default 2)")
    parser.add_argument("--step", type=float, default=PERIOD / 500, help="step size (default pi/1000)")
    parser.add_argument("--method", default="deis4", choices=["deis2", "deis3", "deis4"])
    parser.add_argument("--quick", action="store_true", help="one period only")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of |u(x, t)|")
    args = parser.parse_args(argv)
    plt = pyplot_or_exit() if args.plot else None  # before the run: without matplotlib, stop now with a hint
    torch.set_num_threads(1)
    periods = 1.0 if args.quick else args.periods
    options = {"step_size": args.step}

    # the fundamental soliton against the exact solution
    soliton = make_problem(amplitude=1.0)
    t1 = torch.tensor([0.0, PERIOD * periods], dtype=torch.float64)
    end = torchdiffeq.odeint(soliton.ode, soliton.x0, t1, method=args.method, options=options)[-1]
    exact = soliton.physical(soliton.x0) * np.exp(0.5j * t1[-1].item())
    error = (soliton.physical(end) - exact).abs().max().item()
    print(f"fundamental soliton, t = {t1[-1].item():.4f}: max |u - sech(x) exp(it/2)| = {error:.2e}")

    # the breather
    problem = make_problem(amplitude=2.0, t_end=PERIOD * periods)
    print(problem.description)
    times = torch.linspace(0.0, problem.t_end, round(40 * periods) + 1, dtype=torch.float64)
    with count_evaluations(problem.ode) as calls, Timer() as clock:
        states = torchdiffeq.odeint(problem.ode, problem.x0, times, method=args.method, options=options)
    print(
        f"{args.method}, step {args.step:.4g}, t in [0, {problem.t_end:.4f}]: {calls.count} evaluations of N, "
        f"{clock.seconds:.2f} s"
    )
    m = mass(problem, states)
    print(f"mass {m[0].item():.12f}, largest relative drift {((m - m[0]).abs().max() / m[0]).item():.2e}")
    modulus = problem.physical(states).abs()
    print(f"peak |u| = {modulus.max().item():.4f} (4 at t = pi/4)")
    back = (modulus[-1] - modulus[0]).abs().max().item()
    print(f"max | |u(t_end)| - |u(0)| | = {back:.2e} after {periods:g} period(s) of pi/2")

    if args.plot:
        keep = np.abs(problem.info["x"]) <= 5
        fig, ax = plt.subplots(figsize=(6, 4.5))
        mesh = ax.pcolormesh(problem.info["x"][keep], times.numpy(), modulus[:, keep].numpy(), shading="auto")
        fig.colorbar(mesh, ax=ax, label="|u|")
        ax.set_xlabel("x")
        ax.set_ylabel("t")
        ax.set_title(f"NLS second-order soliton, {args.method}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
