"""2-D advection-diffusion-reaction with Dirichlet boundaries: a NON-symmetric sparse operator (upwind advection),
solved by deis3 with Krylov phi-products (Arnoldi), checked against scipy BDF with the exact sparse Jacobian.

    python examples/advection_diffusion_fd.py                 # 96 x 96 interior points
    python examples/advection_diffusion_fd.py --plot ad.png   # also draw the fields (needs matplotlib)
    python examples/advection_diffusion_fd.py --quick         # 32 x 32 (a smoke test)

``u_t = eps (u_xx + u_yy) - v . grad u - u^3 + s(x, y)`` on the unit square, ``u = 0`` on the boundary, with
``eps = 0.01``, a constant wind ``v = (1, 0.5)`` discretised by first-order upwind differences and a Gaussian
source ``s`` near the inflow corner. The linear part ``A = eps Laplacian - v . grad`` is not symmetric (its Krylov
products use the Arnoldi process); ``N(u) = -u^3 + s`` is what deis3 extrapolates. The plume is carried towards
the outflow walls, where it meets the Dirichlet condition in a boundary layer. The script prints the difference
from scipy's BDF (exact sparse Jacobian, rtol 1e-9) and the Krylov statistics.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch
import torchdiffeq
from _fd import advection_diffusion_2d, grid, to_torch
from scipy.integrate import solve_ivp

import deis_ode  # noqa: F401  (registers the deis* methods in torchdiffeq)
from deis_ode import SemiLinearODE

EPS = 0.01
WIND = (1.0, 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96, help="interior points per side (default 96)")
    parser.add_argument("--steps", type=int, default=60, help="deis3 steps (default 60)")
    parser.add_argument("--t-end", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="32 x 32 points (a smoke test)")
    parser.add_argument("--plot", metavar="PNG", help="draw the source and u at the end (needs matplotlib)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n = 32 if args.quick else args.n
    x, y = grid(n)
    source = (5.0 * np.exp(-((x - 0.25) ** 2 + (y - 0.3) ** 2) / 0.005)).reshape(-1)
    a = advection_diffusion_2d(n, EPS, WIND)
    s_torch = torch.from_numpy(source)

    def nonlinear(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return -(u**3) + s_torch

    ode = SemiLinearODE(to_torch(a), nonlinear)
    x0 = torch.zeros(n * n, dtype=torch.float64)
    print(
        f"advection-diffusion-reaction on (0, 1)^2, {n} x {n} interior points (d = {n * n}), eps = {EPS}, "
        f"v = {WIND}, ||A||_1 = {abs(a).sum(axis=0).max():.3g}, symmetric: {ode.operator.symmetric}"
    )
    t = torch.linspace(0.0, args.t_end, args.steps + 1, dtype=torch.float64)
    start = time.process_time()
    u = torchdiffeq.odeint(ode, x0, t, method="deis3")[-1]
    seconds = time.process_time() - start
    print(f"deis3, {args.steps} steps: {seconds:.2f} s of CPU time")
    print(f"Krylov (Arnoldi): {ode.krylov_stats.summary()}")
    start = time.process_time()
    sol = solve_ivp(
        lambda _, v: a @ v - v**3 + source,
        (0.0, args.t_end),
        x0.numpy(),
        method="BDF",
        rtol=1e-9,
        atol=1e-12,
        jac=lambda _, v: (a - sp.diags(3 * v**2)).tocsc(),
        t_eval=[args.t_end],
    )
    bdf = sol.y[:, -1]
    print(
        f"scipy BDF (exact sparse J, rtol 1e-9): {time.process_time() - start:.2f} s of CPU time, "
        f"{sol.nfev} evaluations"
    )
    print(f"relative difference deis3 - BDF: {np.linalg.norm(u.numpy() - bdf) / np.linalg.norm(bdf):.3e}")
    print(f"max u = {float(u.max()):.6f}")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 1
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for ax, field, title in zip(axes, (source, u.numpy()), ("source s", f"u at t = {args.t_end:g}"), strict=True):
            image = ax.imshow(field.reshape(n, n), origin="lower", extent=(0, 1, 0, 1), cmap="magma")
            ax.set_title(title)
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"advection-diffusion, wind {WIND}, {n} x {n} points, deis3 (Arnoldi Krylov)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
