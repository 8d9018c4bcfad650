"""Wall time of ``examples/distributed_sampling.py`` under torchrun with 1 and 2 processes, and the equality check.

    python benchmarks/distributed_sampling.py [--samples 4096] [--steps 10] [--repeats 3] [--procs 1 2]

Runs, alternating the process counts so that a noisy machine's drift hits each alike,

    python -m torch.distributed.run --standalone --nproc_per_node=P examples/distributed_sampling.py \\
        --samples N --seed 0 --steps K --out FILE.pt

with ``OMP_NUM_THREADS=1`` for every ``P`` (torchrun sets it to 1 only for ``P > 1``; fixing it makes the
comparison one process per core against one process per core), and prints for each ``P`` the wall time of the
whole command (start-up of the interpreters and of the process group included) and the sampling time the script
reports (from the barrier after loading to the written file on rank 0), the median over the repeats, and whether
every output's ``"samples"`` equals the first one's bit for bit.

First it prints why the micro-batches must be fixed: the largest difference between the rows of a float32 matrix
product ``x @ W`` (``x`` of 64 rows, ``W`` of 256 x 256, standard normal) computed at once and computed in pieces
of ``B`` rows, for a few ``B``; on a CPU or GPU whose kernels depend on the number of rows it is not zero.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "distributed_sampling.py"


def run(procs: int, samples: int, steps: int, out: Path) -> tuple[float, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", str(SCRIPT),
        "--samples", str(samples), "--seed", "0", "--steps", str(steps), "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return wall, torch.load(out, weights_only=True)


def batch_dependence(pieces: tuple[int, ...] = (1, 2, 8, 16, 32)) -> str:
    """``max |(x @ W)[rows] - x[rows] @ W|`` over pieces of ``B`` rows, for each ``B`` in ``pieces``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=generator)
    w = torch.randn(256, 256, generator=generator)
    whole = x @ w
    parts = []
    for b in pieces:
        split = torch.cat([x[i : i + b] @ w for i in range(0, 64, b)])
        parts.append(f"B={b}: {float((split - whole).abs().max()):.1e}")
    return "float32 x @ W, 64 rows at once against pieces of B rows, max |difference|: " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    print(batch_dependence(), flush=True)
    walls: dict[int, list[float]] = {p: [] for p in args.procs}
    inner: dict[int, list[float]] = {p: [] for p in args.procs}
    first = None
    equal = True
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for procs in args.procs:
                wall, result = run(procs, args.samples, args.steps, Path(folder) / f"p{procs}.pt")
                walls[procs].append(wall)
                inner[procs].append(result["seconds"])
                assert result["world_size"] == procs
                if first is None:
                    first = result["samples"]
                equal = equal and torch.equal(first, result["samples"])

    print(
        f"command: python -m torch.distributed.run --standalone --nproc_per_node=P examples/distributed_sampling.py "
        f"--samples {args.samples} --seed 0 --steps {args.steps} --out FILE.pt   (OMP_NUM_THREADS=1)"
    )
    print(
        f"defaults: --chunk 64 --batch 64 --sampler odeint --method deis3 --model mixture --dtype float32; "
        f"torch {torch.__version__}, {os.cpu_count()} CPU(s), median of {args.repeats} alternating runs"
    )
    print(f"{'P':>3}  {'wall s':>8}  {'sampling s':>11}  {'wall runs':<24}  sampling runs")
    for procs in args.procs:
        w, s = walls[procs], inner[procs]
        print(
            f"{procs:>3}  {statistics.median(w):8.2f}  {statistics.median(s):11.2f}  "
            f"{' '.join(f'{x:.2f}' for x in w):<24}  {' '.join(f'{x:.2f}' for x in s)}"
        )
    base = args.procs[0]
    for procs in args.procs[1:]:
        ratio = statistics.median(walls[base]) / statistics.median(walls[procs])
        ratio_inner = statistics.median(inner[base]) / statistics.median(inner[procs])
        print(f"speed-up of {procs} over {base} process(es): wall {ratio:.2f}x, sampling {ratio_inner:.2f}x")
    print(f"samples bitwise equal across all {args.repeats * len(args.procs)} runs: {equal}")
    print(f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} (shared CPUs)")


if __name__ == "__main__":
    main()
