"""Sample a diffusion model on several processes with torchrun; the samples do not depend on the number of processes.

    torchrun --standalone --nproc_per_node=2 examples/distributed_sampling.py --samples 4096 --seed 0 --steps 10 \\
        --out samples.pt
    python examples/distributed_sampling.py --samples 64 --out samples.pt      # one process, no torchrun

On several machines, run the same command on each with torchrun's rendezvous flags instead of ``--standalone``
(see docs/scale.md). The script uses ``torch.distributed`` with ``env://`` initialisation, gloo on the CPU and nccl
on CUDA (one GPU per process, ``cuda:LOCAL_RANK``). Without torchrun's environment variables it runs as one process.

What it does, following EDM's ``generate.py``:

* sample ``i`` starts from the noise drawn by its own generator, the ``i``-th child of ``--seed``'s
  ``numpy.random.SeedSequence`` (float64 on the CPU, then cast and moved), so a sample's noise depends on
  ``(seed, i)`` only, and runs with different seeds share no noise (``torch.Generator().manual_seed`` keeps only
  the low 32 bits of its seed on the CPU, so ``seed * 2**32 + i`` would give every seed the same noise, and
  ``seed + i`` would make seed 1 a shift of seed 0);
* samples are cut, by index, into micro-batches of ``--chunk`` (the last one padded with the noise of the next
  indices, which is dropped), and micro-batches into batches of ``--batch`` samples; rank ``r`` of ``W`` takes
  ``all_batches[r::W]``;
* rank 0 builds ("loads") the model first while the others wait at a barrier (with real weights, rank 0 downloads
  them into the shared cache once and the others read the cache);
* each micro-batch is solved on its own: ``torchdiffeq.odeint(VPODE(model, schedule), x, t, method="deis3")``, or,
  with ``--sampler scheduler``, the loop of ``deis_ode.DEISMultistepScheduler`` (the ``diffusers`` extra);
* rank 0 gathers every rank's samples and writes them in sample order, ``{"samples": (N, D) tensor, ...metadata}``,
  to ``--out`` with ``torch.save``.

Bitwise guarantee: every model call and every solver operation that touches sample ``i`` sees a tensor of the same
shape (``--chunk`` rows), holding the same samples at the same rows, whatever ``W`` and ``--batch``. So on the same
hardware, PyTorch build and device type, with deterministic kernels, the output file's ``"samples"`` is bitwise the
same for every number of processes (on one or several machines) and every ``--batch``. ``--chunk``, ``--seed``,
``--steps``, ``--sampler``, ``--model`` and ``--dtype`` define the samples; a different ``--chunk`` may change them
in the last bits (a matrix product of 8 rows and one of 16 rows need not round alike).

The model is the exact noise prediction of ``GaussianMixture.default(dim=8)`` under diffusers' default (linear beta)
training schedule, so the script runs anywhere; ``--model mixture-mlp`` adds a small fixed random MLP (weights from
a fixed seed) scaled by 0.5, a stand-in for a trained network whose matrix products round differently at different
batch sizes; its samples are off the mixture, but the test uses it so that the guarantee is tested against a model
for which it can fail (with a scale of 0.01 the MLP's rounding differences were lost when added to the exact model,
and solving each rank's batch at once, without fixed micro-batches, passed the test).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchdiffeq
from torch import Tensor, nn

import deis_ode  # noqa: F401  (registers the deis* methods in torchdiffeq)
from deis_ode.diffusion import VPODE, GaussianMixture, GaussianMixtureEps, VPSchedule, timesteps

DIM = 8


class UsageError(Exception):
    """Bad command-line input found after parsing (every rank finds the same one)."""


# --------------------------------------------------------------------------------------------------- the model


class MixtureWithMLP(nn.Module):
    """``eps_exact(x, t) + scale * mlp([x, t / 1000])``: the exact mixture model plus a fixed random network."""

    def __init__(self, exact: GaussianMixtureEps, scale: float = 0.5, width: int = 64, seed: int = 1234) -> None:
        super().__init__()
        self.exact, self.scale = exact, scale
        generator = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(DIM + 1, width, generator=generator) / (DIM + 1) ** 0.5)
        self.w2 = nn.Parameter(torch.randn(width, DIM, generator=generator) / width**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        time_feature = (torch.as_tensor(t, dtype=x.dtype, device=x.device) / 1000.0).expand(*x.shape[:-1], 1)
        hidden = torch.nn.functional.silu(torch.cat([x, time_feature], dim=-1) @ self.w1.to(x.dtype))
        return self.exact(x, t) + self.scale * (hidden @ self.w2.to(x.dtype))


def load_model(name: str, device: torch.device) -> tuple[nn.Module, VPSchedule, GaussianMixture]:
    """The noise-prediction model, its training schedule (model time = diffusers' training timestep) and the
    mixture. A stand-in for reading a checkpoint: with real weights this is where rank 0 downloads them."""
    schedule = VPSchedule.diffusers()  # linear betas 1e-4 .. 0.02 over 1000 steps, diffusers' default
    mixture = GaussianMixture.default(dim=DIM)
    model: nn.Module = GaussianMixtureEps(mixture, schedule)
    if name == "mixture-mlp":
        model = MixtureWithMLP(model)
    return model.to(device).eval(), schedule, mixture


# --------------------------------------------------------------------------------------------------- the plan


def sample_noise(seed: int, start: int, stop: int) -> Tensor:
    """The starting noise of samples ``start .. stop - 1``: row ``i`` from its own generator, the ``i``-th child
    ``SeedSequence(seed, spawn_key=(i,))`` of ``seed`` (float64, CPU), so it does not depend on which process draws
    it or with whom. (The spawn key is kept apart from the seed's words: ``default_rng([seed, i])`` would give
    ``seed = 2**40, i = 0`` the noise of ``seed = 0, i = 256``.)"""
    rows = [
        np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,))).standard_normal(DIM)
        for i in range(start, stop)
    ]
    return torch.from_numpy(np.stack(rows))


def all_batches(samples: int, batch: int) -> list[tuple[int, int]]:
    """The batches ``[start, stop)`` of consecutive sample indices, in order (the last may be shorter)."""
    return [(start, min(start + batch, samples)) for start in range(0, samples, batch)]


def check_plan(samples: int, batch: int, chunk: int, world_size: int) -> None:
    """Raise :class:`UsageError` for a batch that is not whole micro-batches or more processes than batches."""
    if batch % chunk != 0:
        raise UsageError(f"--batch ({batch}) must be a multiple of --chunk ({chunk})")
    n_batches = len(all_batches(samples, batch))
    if world_size > n_batches:
        raise UsageError(
            f"{world_size} processes but only {n_batches} batch(es) of --batch {batch} for --samples {samples}: "
            f"every process needs at least one batch; use fewer processes or a smaller --batch"
        )


def check_output(path: Path) -> str | None:
    """Why ``path`` cannot be written (``None`` if it can): a missing or unwritable folder, or a folder as file."""
    folder = path.parent
    if path.is_dir():
        return f"--out {str(path)!r} is a directory, expected a file name"
    if not folder.is_dir():
        return f"--out {str(path)!r}: the folder {str(folder)!r} does not exist"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        return f"--out {str(path)!r}: cannot write in {str(folder)!r} ({error.strerror or error})"
    if path.exists() and not os.access(path, os.W_OK):
        return f"--out {str(path)!r} exists and is not writable"
    return None


# --------------------------------------------------------------------------------------------------- sampling


def solve_chunk(
    args: argparse.Namespace, model: nn.Module, schedule: VPSchedule, noise: Tensor, device: torch.device
) -> Tensor:
    """One micro-batch, from its noise (``(chunk, D)``) to samples, in ``--dtype`` on ``device``."""
    dtype = getattr(torch, args.dtype)
    x = noise.to(device=device, dtype=dtype)
    if args.sampler == "odeint":
        grid = timesteps(schedule, args.steps).to(device=device, dtype=dtype)  # quadratic in t, 999 down to 0
        return torchdiffeq.odeint(VPODE(model, schedule), x, grid, method=args.method)[-1]
    from deis_ode import DEISMultistepScheduler  # needs the diffusers extra

    order = int(args.method[-1])
    scheduler = DEISMultistepScheduler(solver_order=min(order, 3))  # diffusers' default training schedule
    scheduler.set_timesteps(args.steps, device=device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(x, t.to(torch.float64))
        x = scheduler.step(eps, t, x).prev_sample
    return x


@torch.no_grad()
def sample_indices(
    args: argparse.Namespace, model: nn.Module, schedule: VPSchedule, start: int, stop: int, device: torch.device
) -> Tensor:
    """Samples ``start .. stop - 1`` (a batch made of whole micro-batches), each micro-batch solved on its own."""
    out = []
    for lo in range(start, stop, args.chunk):
        hi = min(lo + args.chunk, stop)
        noise = sample_noise(args.seed, lo, lo + args.chunk)  # padded to a full micro-batch past the last sample
        out.append(solve_chunk(args, model, schedule, noise, device)[: hi - lo])
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------- processes


@dataclass
class Group:
    rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: one process, no process group

    def barrier(self) -> None:
        if self.backend is None:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if self.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


def start_group(device_choice: str) -> Group:
    """Join the process group torchrun describes (``env://``), or run as the only process without one."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    if "WORLD_SIZE" not in os.environ:
        return Group(0, 1, torch.device("cuda", 0) if use_cuda else torch.device("cpu"), None)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): run at most "
                f"one process per GPU (--nproc_per_node), or --device cpu"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(minutes=10))
    return Group(dist.get_rank(), dist.get_world_size(), device, backend)


def gather_samples(group: Group, mine: Tensor, batches: list[tuple[int, int]], samples: int) -> Tensor | None:
    """All ranks' samples on rank 0, in sample order (``None`` on the other ranks)."""
    if group.backend is None:
        return mine.cpu()
    counts = [sum(stop - start for start, stop in batches[r :: group.world_size]) for r in range(group.world_size)]
    padded = torch.zeros((max(counts), DIM), dtype=mine.dtype, device=group.device)
    padded[: mine.shape[0]] = mine
    received = [torch.empty_like(padded) for _ in range(group.world_size)] if group.rank == 0 else None
    dist.gather(padded, received, dst=0)
    if received is None:
        return None
    out = torch.empty((samples, DIM), dtype=mine.dtype)
    for r, rows in enumerate(received):
        at = 0
        for start, stop in batches[r :: group.world_size]:
            out[start:stop] = rows[at : at + stop - start].cpu()
            at += stop - start
    return out


# --------------------------------------------------------------------------------------------------- main


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=positive_int, required=True, help="number of samples N")
    parser.add_argument("--seed", type=int, default=0, help="base seed, >= 0 (default 0)")
    parser.add_argument("--steps", type=positive_int, default=10, help="solver steps (default 10)")
    parser.add_argument("--out", type=Path, required=True, help="output file (torch.save of a dict)")
    parser.add_argument("--chunk", type=positive_int, default=64, help="micro-batch: samples per solve (default 64)")
    parser.add_argument(
        "--batch", type=positive_int, default=None, help="samples per batch, a multiple of --chunk (default --chunk)"
    )
    parser.add_argument("--sampler", choices=("odeint", "scheduler"), default="odeint")
    parser.add_argument("--method", choices=("deis1", "deis2", "deis3"), default="deis3")
    parser.add_argument("--model", choices=("mixture", "mixture-mlp"), default="mixture")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"argument --seed: expected an integer >= 0, got {args.seed}")
    if args.batch is None:
        args.batch = args.chunk
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bad counts end here, on every rank, before any process group exists
    group = None
    try:
        group = start_group(args.device)
        check_plan(args.samples, args.batch, args.chunk, group.world_size)
        # rank 0 checks the output before anyone samples and tells the others
        verdict = [check_output(args.out) if group.rank == 0 else None]
        if group.backend is not None:
            dist.broadcast_object_list(verdict, src=0, device=group.device if group.backend == "nccl" else None)
        if verdict[0] is not None:
            raise UsageError(verdict[0])

        if group.rank != 0:
            group.barrier()  # wait until rank 0 has loaded (downloaded, cached) the model
        model, schedule, _ = load_model(args.model, group.device)
        if group.rank == 0:
            group.barrier()  # release the others

        start = time.perf_counter()
        batches = all_batches(args.samples, args.batch)
        mine = [
            sample_indices(args, model, schedule, lo, hi, group.device)
            for lo, hi in batches[group.rank :: group.world_size]
        ]
        samples = gather_samples(group, torch.cat(mine), batches, args.samples)
        seconds = time.perf_counter() - start
        if group.rank == 0:
            assert samples is not None
            result = {
                "samples": samples,
                "seed": args.seed,
                "steps": args.steps,
                "sampler": args.sampler,
                "method": args.method,
                "model": args.model,
                "chunk": args.chunk,
                "batch": args.batch,
                "dtype": args.dtype,
                "world_size": group.world_size,
                "device": group.device.type,
                "backend": group.backend,
                "torch": str(torch.__version__),
                "noise": "row i: default_rng(SeedSequence(seed, spawn_key=(i,))).standard_normal(D), numpy, float64",
                "numpy": np.__version__,
                "seconds": seconds,
            }
            partial = args.out.with_name(args.out.name + ".partial")
            torch.save(result, partial)
            os.replace(partial, args.out)
            print(
                f"wrote {args.samples} samples ({args.sampler}, {args.method}, {args.steps} steps) from "
                f"{group.world_size} process(es) to {args.out} in {seconds:.2f} s"
            )
        return 0
    except UsageError as error:
        if group is None or group.rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if group is not None:
            group.close()


if __name__ == "__main__":
    sys.exit(main())
