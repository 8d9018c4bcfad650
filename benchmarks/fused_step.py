"""The fused multistep step against the unfused one, by state size: where ``FUSED_MAX_ELEMENTS`` comes from.

    python benchmarks/fused_step.py [--out benchmarks/results/fused_step.txt]

One step of a K-node method with per-element coefficients (a diagonal linear part), single-threaded, best of 200:

* fused (:mod:`deis_ode.solvers.fused`): store N in the buffer, one product with the coefficient stack, one sum over
  the leading dimension (three tensor operations);
* unfused (:func:`deis_ode.solvers.multistep.apply_update`): ``a * x`` and K ``addcmul_`` (1 + K operations).

The ratio unfused / fused is measured side by side in one run; above 1 the fused step is faster.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from deis_ode.solvers.multistep import FUSED_MAX_ELEMENTS


def best(fn, repeats: int = 200) -> float:
    out = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


def measure(dtype: torch.dtype, n: int, k: int) -> tuple[float, float]:
    """Seconds of one fused and one unfused step of ``k`` nodes on a state of ``n`` elements."""
    buffer = torch.randn(k + 1, n, dtype=dtype)
    scratch, state = torch.empty_like(buffer), buffer[k]
    stack = torch.randn(k + 1, n, dtype=dtype)
    value = torch.randn(n, dtype=dtype)
    history = [torch.randn(n, dtype=dtype) for _ in range(k)]
    x = torch.randn(n, dtype=dtype)

    def fused() -> None:
        buffer[0].copy_(value)
        torch.sum(torch.mul(stack, buffer, out=scratch), dim=0, out=state)

    def unfused() -> None:
        out = x * stack[k]
        for j in range(k):
            out.addcmul_(stack[j], history[j])

    return best(fused), best(unfused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    k = args.order
    lines = [
        f"# python benchmarks/fused_step.py --order {k}; torch {torch.__version__}, 1 thread; "
        f"FUSED_MAX_ELEMENTS = {FUSED_MAX_ELEMENTS}",
        f"{'dtype':<16} {'elements':>9} {'fused us':>9} {'unfused us':>11} {'unfused/fused':>14}",
    ]
    print("\n".join(lines))
    for dtype in (torch.float32, torch.float64, torch.complex128):
        for n in (256, 1024, 4096, 8192, 16384, 65536):
            f, u = measure(dtype, n, k)
            line = f"{str(dtype):<16} {n:>9d} {1e6 * f:>9.1f} {1e6 * u:>11.1f} {u / f:>14.2f}"
            print(line)
            lines.append(line)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
