"""Warm-up trade-off: the lower-order start (no extra evaluations) against the full-order start
((K-1)^2 extra evaluations of N), error versus evaluations, on built-in problems.

    python benchmarks/warmup.py [--problems diagonal stiff vp-mixture] [--steps 8 16 32 64]

Prints, for each problem, method and warm-up, the number of evaluations of N, the relative error at the
final time against the scipy reference, and the fitted slope. Reads: which warm-up gives the smaller error
for the same number of evaluations.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import deis_ode
from deis_ode import reference
from deis_ode.verify import PROBLEMS, empirical_order


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["diagonal", "stiff", "vp-mixture"], choices=list(PROBLEMS))
    parser.add_argument("--steps", nargs="+", type=int, default=None, help="step counts (default: the problem's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# {' '.join(sys.argv)}")
    print(f"# deis_ode {deis_ode.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    for name in args.problems:
        ode, x0, t0, t1, steps = PROBLEMS[name]()
        steps = tuple(args.steps or steps)
        ref = reference.solve(ode, x0, torch.tensor([t0, t1], dtype=torch.float64), method="DOP853")
        print(f"\n## problem {name}: t from {t0} to {t1}, steps {list(steps)}")
        print(f"{'method':<7} {'warm-up':<12} " + " ".join(f"{'NFE':>5} {'error':>9}" for _ in steps) + "  slope")
        for k in (2, 3, 4, 5):
            for warmup in ("lower_order", "full_order"):
                table = empirical_order(
                    f"deis{k}", ode, x0, t0, t1, steps=steps, options={"warmup": warmup}, reference=ref
                )
                cells = " ".join(f"{n:>5d} {e:>9.2e}" for n, e in zip(table.nfe, table.errors, strict=True))
                print(f"deis{k:<3} {warmup:<12} {cells}  {table.slope:5.2f}")


if __name__ == "__main__":
    main()
