"""Kuramoto-Sivashinsky equation with deis4, in the set-up of Kassam and Trefethen (2005).

    python examples/kuramoto_sivashinsky.py                   # t in [0, 150], a few seconds
    python examples/kuramoto_sivashinsky.py --plot ks.png     # also draw u(x, t) (needs matplotlib)
    python examples/kuramoto_sivashinsky.py --quick           # t in [0, 30] (a smoke test)

The equation ``u_t = -u u_x - u_xx - u_xxxx`` on ``x`` in ``[0, 32 pi)`` (periodic), with
``u(x, 0) = cos(x/16) (1 + sin(x/16))``, is discretised by ``N = 128`` Fourier modes. On the coefficients
``v = rfft(u)`` (65 complex numbers) it is the semi-linear ODE

    dv/dt = L v + N(v),    L = k^2 - k^4,    N(v) = -(i k / 2) rfft(irfft(v)^2),

with ``k = m/16``, ``m = 0 .. 64`` (and ``k = 0`` at the Nyquist mode, as in Kassam and Trefethen). ``L``
reaches -225: explicit methods need steps below about 0.01, while ``deis4`` integrates ``L`` exactly
and takes steps of 1/8 (1200 evaluations of ``N`` to ``t = 150``). Its stability limit comes from the
extrapolated nonlinear term: with steps of 1/4 (Kassam and Trefethen's choice for the one-step ETDRK4) the
four-step ``deis4`` blows up near ``t = 60``; ``deis3`` is stable there but less accurate.

Printed: the cost of the run, and the relative difference from scipy's Radau (exact Jacobian, rtol 1e-10)
at ``t = 10``, where the flow is not yet chaotic enough to amplify round-off visibly.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torchdiffeq
from _spectral import PackedSystem, SpectralProblem, Timer, pyplot_or_exit, relative_error, unpack

import deis_ode  # noqa: F401  (registers the deis* methods in torchdiffeq)
from deis_ode import SemiLinearODE
from deis_ode.verify import count_evaluations

N_GRID = 128
LENGTH = 32 * math.pi


def make_problem(t_end: float = 10.0, n: int = N_GRID) -> SpectralProblem:
    """The Kassam-Trefethen KS problem on ``n`` Fourier modes, to ``t_end``."""
    x = LENGTH * np.arange(1, n + 1) / n
    u0 = np.cos(x / 16) * (1 + np.sin(x / 16))
    k = 2 * math.pi / LENGTH * np.arange(n // 2 + 1, dtype=np.float64)
    k[-1] = 0.0  # the Nyquist mode has no well-defined odd derivative
    linear = k**2 - k**4
    g = -0.5j * k
    g_t = torch.from_numpy(g)

    def nonlinear(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return g_t * torch.fft.rfft(torch.fft.irfft(v, n=n) ** 2)

    def nonlinear_np(v: np.ndarray) -> np.ndarray:
        return g * np.fft.rfft(np.fft.irfft(v, n=n) ** 2)

    size = n // 2 + 1
    # the derivative of the packed system along every unit vector: re(v_m) -> e_m, im(v_m) -> i e_m
    directions = np.zeros((2 * size, size), dtype=np.complex128)
    directions[0::2] = np.eye(size)
    directions[1::2] = 1j * np.eye(size)
    linear_part = linear * directions

    def jacobian(t: float, y: np.ndarray) -> np.ndarray:
        u = np.fft.irfft(unpack(y, (size,)), n=n)
        du = np.fft.irfft(directions, n=n, axis=-1)
        columns = linear_part + g * np.fft.rfft(2 * u * du, axis=-1)
        return columns.view(np.float64).T.copy()  # row j of `columns` is column j of J

    ode = SemiLinearODE(torch.from_numpy(linear), nonlinear)
    return SpectralProblem(
        name="KS",
        ode=ode,
        x0=torch.fft.rfft(torch.from_numpy(u0)),
        t_end=t_end,
        linear=linear,
        nonlinear_np=nonlinear_np,
        physical=lambda v: torch.fft.irfft(v, n=n),
        dense_jacobian=jacobian,
        description=f"Kuramoto-Sivashinsky, x in [0, 32 pi), {n} modes, max |L| = {np.abs(linear).max():.3g}",
        info={"x": x},
    )


def scipy_reference(problem: SpectralProblem, t_end: float, rtol: float = 1e-10) -> torch.Tensor:
    """The coefficients at ``t_end`` from scipy's Radau with the exact Jacobian (``atol = rtol * rms(v0)``)."""
    from scipy.integrate import solve_ivp

    system = PackedSystem(problem)
    atol = rtol * float(np.sqrt(np.mean(system.y0**2)))
    sol = solve_ivp(
        system.rhs, (0.0, t_end), system.y0, method="Radau", rtol=rtol, atol=atol, jac=problem.dense_jacobian
    )
    if not sol.success:
        raise RuntimeError(sol.message)
    return torch.from_numpy(unpack(sol.y[:, -1], system.shape).copy())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t-end", type=float, default=150.0, help="final time (default 150)")
    parser.add_argument("--step", type=float, default=0.125, help="step size (default 1/8)")
    parser.add_argument("--method", default="deis4", choices=["deis2", "deis3", "deis4"])
    parser.add_argument("--quick", action="store_true", help="integrate to t = 30 only")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of u(x, t)")
    args = parser.parse_args(argv)
    plt = pyplot_or_exit() if args.plot else None  # before the run: without matplotlib, stop now with a hint
    torch.set_num_threads(1)
    t_end = 30.0 if args.quick else args.t_end

    problem = make_problem(t_end)
    print(problem.description)
    times = torch.linspace(0.0, t_end, round(t_end / 0.25) + 1, dtype=torch.float64)  # output every 1/4
    with count_evaluations(problem.ode) as calls, Timer() as clock:
        states = torchdiffeq.odeint(
            problem.ode, problem.x0, times, method=args.method, options={"step_size": args.step}
        )
    print(
        f"{args.method}, step {args.step:g}, t in [0, {t_end:g}]: {calls.count} evaluations of N, {clock.seconds:.2f} s"
    )
    u = problem.physical(states)
    print(f"max |u| = {u.abs().max().item():.4f} (from {u[0].abs().max().item():.4f} at t = 0)")

    # scipy agreement at t = 10 (same step, a separate run ending exactly there)
    t_check = min(10.0, t_end)
    check = torch.tensor([0.0, t_check], dtype=torch.float64)
    ours = torchdiffeq.odeint(problem.ode, problem.x0, check, method=args.method, options={"step_size": args.step})
    ref = scipy_reference(problem, t_check)
    print(
        f"relative difference from scipy Radau (rtol 1e-10) at t = {t_check:g}: "
        f"{relative_error(problem, ours[-1], ref):.2e}"
    )

    if args.plot:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        mesh = ax.pcolormesh(problem.info["x"], times.numpy(), u.numpy(), cmap="RdBu_r", shading="auto")
        fig.colorbar(mesh, ax=ax, label="u")
        ax.set_xlabel("x")
        ax.set_ylabel("t")
        ax.set_title(f"Kuramoto-Sivashinsky, {args.method}, step {args.step:g}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
