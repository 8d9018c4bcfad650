"""Observed orders of deis1..deis5 on the built-in problems, both warm-ups, uniform and rough grids.

    python benchmarks/orders.py [--problems scalar diagonal time-varying stiff] [--grids uniform random]

Prints one fitted slope (least squares of log error against log step over the problem's step counts) per
method, warm-up, problem and grid; the full tables come from ``python -m deis_ode verify``.
"""

from __future__ import annotations

import argparse
import sys

import torch

import deis_ode
from deis_ode import reference
from deis_ode.verify import PROBLEMS, empirical_order


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["scalar", "diagonal", "time-varying", "stiff"])
    parser.add_argument("--grids", nargs="+", default=["uniform", "random"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# {' '.join(sys.argv)}")
    print(f"# deis_ode {deis_ode.__version__}, torch {torch.__version__}")
    problems = {name: PROBLEMS[name]() for name in args.problems}
    refs = {
        name: reference.solve(p.ode, p.x0, torch.tensor([p.t0, p.t1], dtype=torch.float64), rtol=1e-13, atol=1e-13)
        for name, p in problems.items()
    }
    columns = [(name, grid) for name in args.problems for grid in args.grids]
    header = f"{'method':<7} {'warm-up':<12}" + "".join(f" {name[:12] + '/' + grid[:4]:>18}" for name, grid in columns)
    print(header)
    print("-" * len(header))
    for warmup in ("full_order", "lower_order"):
        for k in (1, 2, 3, 4, 5):
            if warmup == "lower_order" and k == 1:
                continue
            cells = []
            for name, grid in columns:
                p = problems[name]
                table = empirical_order(
                    f"deis{k}",
                    p.ode,
                    p.x0,
                    p.t0,
                    p.t1,
                    steps=p.steps_for(f"deis{k}"),
                    grid=grid,
                    options={"warmup": warmup},
                    reference=refs[name],
                )
                cells.append(f" {table.slope:>18.2f}")
            print(f"deis{k:<3} {warmup:<12}" + "".join(cells))
    print(f"\nsteps per problem: { {name: list(p.steps) for name, p in problems.items()} } (twice these for deis5)")


if __name__ == "__main__":
    main()
