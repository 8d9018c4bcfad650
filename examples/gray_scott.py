"""Gray-Scott reaction-diffusion on 256 x 256 Fourier modes with deis4.

    python examples/gray_scott.py                     # t in [0, 3000], 3000 steps, about 20 s
    python examples/gray_scott.py --plot gs.png       # also draw v at six times (needs matplotlib)
    python examples/gray_scott.py --quick             # t in [0, 200] (a smoke test)

The system (Pearson 1993)

    u_t = D_u Lap u - u v^2 + F (1 - u),    v_t = D_v Lap v + u v^2 - (F + k) v,

with ``D_u = 2e-5``, ``D_v = 1e-5``, ``F = 0.04``, ``k = 0.06`` on the periodic square ``[0, 1]^2``, is
discretised by ``rfft2`` on a 256 x 256 grid: the state is the pair of half spectra, shape ``(2, 256, 129)``,
complex. Everything linear goes into the diagonal ``L`` (diffusion and the decay rates ``F``, ``F + k``);
the reaction is ``N``:

    L = (-D_u |k|^2 - F, -D_v |k|^2 - (F + k)),    N = rfft2(F - u v^2, u v^2).

With 256 modes on the unit square the patterns are resolved to round-off (beyond 80 % of the largest wavenumber
the spectrum stays below 3e-13 of its peak) and ``max |L| = 26``: a mildly stiff problem, on which explicit
methods need steps below 0.13, while ``deis4`` takes steps of 1. Three smooth spots of ``v`` grow into rings,
split, and fill the square with a labyrinth.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torchdiffeq
from _spectral import SpectralProblem, Timer, pyplot_or_exit, rfft_wavenumbers

import deis_ode  # noqa: F401  (registers the deis* methods in torchdiffeq)
from deis_ode import SemiLinearODE
from deis_ode.verify import count_evaluations

N_GRID = 256
LENGTH = 1.0
D_U, D_V, FEED, KILL = 2e-5, 1e-5, 0.04, 0.06
SPOTS = ((0.5, 0.5, 0.25), (0.3, 0.62, 0.2), (0.7, 0.35, 0.2))  # centre x, centre y, height of v
SPOT_WIDTH = 0.04


def initial_state(n: int = N_GRID) -> np.ndarray:
    """``(u, v)`` on the grid: ``u = 1 - 2 v`` and ``v`` a sum of three Gaussian spots."""
    x = LENGTH * np.arange(n) / n
    xx, yy = np.meshgrid(x, x, indexing="ij")
    v = np.zeros_like(xx)
    for cx, cy, height in SPOTS:
        v += height * np.exp(-((xx - cx * LENGTH) ** 2 + (yy - cy * LENGTH) ** 2) / (2 * (SPOT_WIDTH * LENGTH) ** 2))
    return np.stack([1 - 2 * v, v])


def make_problem(t_end: float = 100.0, n: int = N_GRID) -> SpectralProblem:
    """Gray-Scott on ``n x n`` Fourier modes of the unit square, to ``t_end``."""
    kx = 2 * math.pi / LENGTH * np.fft.fftfreq(n, d=1.0 / n)
    ky = rfft_wavenumbers(n, LENGTH)
    k2 = kx[:, None] ** 2 + ky[None, :] ** 2
    linear = np.stack([-D_U * k2 - FEED, -D_V * k2 - (FEED + KILL)])
    shape = (n, n)

    def nonlinear(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        uv = torch.fft.irfft2(w, s=shape)
        r = uv[0] * uv[1] ** 2
        return torch.fft.rfft2(torch.stack([FEED - r, r]))

    def nonlinear_np(w: np.ndarray) -> np.ndarray:
        uv = np.fft.irfft2(w, s=shape)
        r = uv[0] * uv[1] ** 2
        return np.fft.rfft2(np.stack([FEED - r, r]))

    return SpectralProblem(
        name="Gray-Scott",
        ode=SemiLinearODE(torch.from_numpy(linear), nonlinear),
        x0=torch.fft.rfft2(torch.from_numpy(initial_state(n))),
        t_end=t_end,
        linear=linear,
        nonlinear_np=nonlinear_np,
        physical=lambda w: torch.fft.irfft2(w, s=shape),
        description=f"Gray-Scott, F = {FEED}, k = {KILL}, [0, 1]^2, {n} x {n} modes, "
        f"max |L| = {np.abs(linear).max():.3g}",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t-end", type=float, default=3000.0, help="final time (default 3000)")
    parser.add_argument("--step", type=float, default=1.0, help="step size (default 1)")
    parser.add_argument("--method", default="deis4", choices=["deis2", "deis3", "deis4"])
    parser.add_argument("--quick", action="store_true", help="integrate to t = 200 only")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of v at six times")
    args = parser.parse_args(argv)
    plt = pyplot_or_exit() if args.plot else None  # before the run: without matplotlib, stop now with a hint
    torch.set_num_threads(1)
    t_end = 200.0 if args.quick else args.t_end

    problem = make_problem(t_end)
    print(problem.description)
    times = torch.linspace(0.0, t_end, 6, dtype=torch.float64)
    with count_evaluations(problem.ode) as calls, Timer() as clock:
        states = torchdiffeq.odeint(
            problem.ode, problem.x0, times, method=args.method, options={"step_size": args.step}
        )
    print(
        f"{args.method}, step {args.step:g}, t in [0, {t_end:g}]: {calls.count} evaluations of N, {clock.seconds:.2f} s"
    )
    fields = problem.physical(states)
    for i, t in enumerate(times.tolist()):
        u, v = fields[i]
        print(
            f"t = {t:6.0f}   u in [{u.min().item():.4f}, {u.max().item():.4f}]   "
            f"v in [{v.min().item():.4f}, {v.max().item():.4f}]   mean v {v.mean().item():.5f}"
        )

    if args.plot:
        fig, axes = plt.subplots(1, len(times), figsize=(2.2 * len(times), 2.5))
        for ax, t, field in zip(axes, times.tolist(), fields, strict=True):
            ax.imshow(field[1].numpy().T, origin="lower", extent=(0, LENGTH, 0, LENGTH), cmap="viridis")
            ax.set_title(f"t = {t:g}")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"Gray-Scott v, {args.method}, step {args.step:g}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
