"""Distribution error against the number of model evaluations (NFE): stochastic and deterministic samplers.

The problem: the 8-dimensional mixture of five narrow Gaussians ``GaussianMixture.default()`` under the continuous
linear VP schedule, driven by its exact noise prediction, from ``t = 1`` to ``t_end = 1e-3``. The samples start from
the exact marginal ``p_1`` (data noised by ``add_noise``), so every error below is the sampler's own; they are compared
with the exact marginal ``p_{t_end}``, again a Gaussian mixture (means ``alpha mu_k``, standard deviations
``sqrt(alpha^2 s_k^2 + sigma^2)``).

Distances (per-component moments; each sample is assigned to its most probable component under ``p_{t_end}``):

* ``weights``: total variation between the empirical component frequencies and the weights, ``1/2 sum |w_k' - w_k|``;
* ``mean``: ``sum_k w_k |m_k' - m_k| / (s_k sqrt(D))``, the RMS error of the component means in units of their std;
* ``std``: ``sum_k w_k |s_k' / s_k - 1|``, the relative error of the component standard deviations.

The same distances of as many exact samples give the Monte-Carlo floor. Samplers (one grid per NFE, uniform in the
half log-SNR ``lambda``, unless noted; all stochastic ones share one Brownian path):

* ``ode deisK``: the probability-flow ODE by ``torchdiffeq.odeint(drift, x, t, method="deisK")`` (x0 split; deis1 is
  DDIM);
* ``sde deisK eta``: ``deis_ode.sdeint(drift.reverse_sde(eta), x, -t, bm=bm, method="deisK")`` (x0 split, whose deis1 is
  DDIM with stochasticity; ``eta = 1``: DDPM ancestral sampling); one row with the eps split;
* ``torchsde euler``: torchsde's Euler-Maruyama on the same reverse SDE (``eta = 1``), on the same grid, and with its
  own uniform step ``dt`` in ``t``.

Usage::

    python benchmarks/sde.py                     # full run (about 3 minutes on 2 CPU cores)
    python benchmarks/sde.py --quick             # a small run (seconds)
    python benchmarks/sde.py --out benchmarks/results/sde.txt
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torchdiffeq
import torchsde

import deis_ode
from deis_ode.diffusion import VPODE, GaussianMixture, GaussianMixtureEps, VPSchedule, add_noise, timesteps

F64 = torch.float64
T_START, T_END = 1.0, 1e-3


class Counter:
    """Counts the model's evaluations (calls with a batch of states)."""

    def __init__(self, model: Callable) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t)


class Problem:
    def __init__(self, samples: int, seed: int) -> None:
        self.schedule = VPSchedule.linear()
        self.mixture = GaussianMixture.default()
        self.model = GaussianMixtureEps(self.mixture, self.schedule)
        generator = torch.Generator().manual_seed(seed)
        data, _ = self.mixture.sample(samples, generator)
        self.x_start = add_noise(self.schedule, data, T_START, generator=generator)
        alpha, sigma = self.schedule.alpha(T_END), self.schedule.sigma(T_END)
        self.alpha_end, self.sigma_end = alpha, sigma
        self.means = alpha * self.mixture.means
        self.stds = torch.sqrt(alpha**2 * self.mixture.stds**2 + sigma**2)
        self.seed = seed

    def exact_samples(self, n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        data, _ = self.mixture.sample(n, generator)
        return add_noise(self.schedule, data, T_END, generator=generator)

    def distances(self, x: torch.Tensor) -> tuple[float, float, float]:
        """(weights, mean, std) as in the module docstring; inf if a sample is not finite."""
        if not bool(torch.isfinite(x).all()):
            return math.inf, math.inf, math.inf
        labels = self.mixture.component_posterior(x, self.alpha_end, self.sigma_end).argmax(-1)
        k, dim = self.mixture.n_components, self.mixture.dim
        weights = self.mixture.weights
        freq = torch.bincount(labels, minlength=k).to(F64) / x.shape[0]
        tv, mean_err, std_err = 0.5 * float((freq - weights).abs().sum()), 0.0, 0.0
        for j in range(k):
            xj = x[labels == j]
            if xj.shape[0] < 2:
                return tv, math.inf, math.inf
            mean_err += float(weights[j] * (xj.mean(0) - self.means[j]).norm() / (self.stds[j] * math.sqrt(dim)))
            std_err += float(weights[j] * (xj.var(0).mean().sqrt() / self.stds[j] - 1.0).abs())
        return tv, mean_err, std_err

    def drift(self, counter: Counter) -> VPODE:
        return VPODE(counter, self.schedule, extrapolate="x0")

    def brownian(self) -> torchsde.BrownianInterval:
        return torchsde.BrownianInterval(-T_START, -T_END, size=self.x_start.shape, dtype=F64, entropy=self.seed + 2)


def logsnr_grid(problem: Problem, nfe: int) -> torch.Tensor:
    return timesteps(problem.schedule, nfe, "logsnr", t_start=T_START, t_end=T_END)


def run_ode(problem: Problem, method: str, nfe: int) -> tuple[torch.Tensor, int]:
    counter = Counter(problem.model)
    t = logsnr_grid(problem, nfe)
    x = torchdiffeq.odeint(problem.drift(counter), problem.x_start, t, method=method)[-1]
    return x, counter.calls


def run_sde(problem: Problem, method: str, nfe: int, eta: float, split: str = "x0") -> tuple[torch.Tensor, int]:
    counter = Counter(problem.model)
    drift = VPODE(counter, problem.schedule, extrapolate=split)
    t = logsnr_grid(problem, nfe)
    x = deis_ode.sdeint(drift.reverse_sde(eta), problem.x_start, -t, bm=problem.brownian(), method=method)[-1]
    return x, counter.calls


def run_euler_grid(problem: Problem, nfe: int) -> tuple[torch.Tensor, int]:
    """torchsde's Euler-Maruyama, one ``sdeint`` call per interval of the log-SNR grid (each call also evaluates the
    drift once for torchsde's shape check: that evaluation is not counted)."""
    counter = Counter(problem.model)
    sde = problem.drift(counter).reverse_sde(1.0)
    s = -logsnr_grid(problem, nfe)
    bm, x = problem.brownian(), problem.x_start
    steps = 0
    for i in range(nfe):
        before = counter.calls
        x = torchsde.sdeint(sde, x, s[i : i + 2], bm=bm, method="euler", dt=2.0 * float(s[i + 1] - s[i]))[-1]
        steps += counter.calls - before - 1
    return x, steps


def run_euler_uniform(problem: Problem, nfe: int) -> tuple[torch.Tensor, int]:
    """torchsde's Euler-Maruyama with its own uniform step ``dt = (1 - t_end) / nfe`` (one drift evaluation, not
    counted, for its shape check)."""
    counter = Counter(problem.model)
    sde = problem.drift(counter).reverse_sde(1.0)
    s = torch.tensor([-T_START, -T_END], dtype=F64)
    dt = (T_START - T_END) / nfe * (1.0 + 1e-12)  # no extra round-off step at the end
    x = torchsde.sdeint(sde, problem.x_start, s, bm=problem.brownian(), method="euler", dt=dt)[-1]
    return x, counter.calls - 1


def samplers() -> list[tuple[str, Callable[[Problem, int], tuple[torch.Tensor, int]]]]:
    rows = [(f"ode deis{k}", lambda p, n, k=k: run_ode(p, f"deis{k}", n)) for k in (1, 2, 3)]
    rows += [(f"sde deis{k} eta=1", lambda p, n, k=k: run_sde(p, f"deis{k}", n, 1.0)) for k in (1, 2, 3)]
    rows += [("sde deis3 eta=0.5", lambda p, n: run_sde(p, "deis3", n, 0.5))]
    rows += [("sde deis2 eta=1 (eps split)", lambda p, n: run_sde(p, "deis2", n, 1.0, "eps"))]
    rows += [("torchsde euler eta=1", run_euler_grid), ("torchsde euler eta=1, uniform t", run_euler_uniform)]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5000 samples, NFE 10 and 50")
    parser.add_argument("--samples", type=int, default=None, help="number of samples (default 50000)")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="NFEs (default 10 20 50 100 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="FILE", help="also write the tables to FILE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny float64 operations are slower with more threads on small CPUs
    warnings.filterwarnings("ignore", message="Should have tb<=t1")  # torchsde's own round-off overshoot
    samples = args.samples or (5000 if args.quick else 50000)
    nfes = args.nfe or ([10, 50] if args.quick else [10, 20, 50, 100, 200])
    problem = Problem(samples, args.seed)

    lines = [
        f"# {' '.join(['benchmarks/sde.py', *(argv if argv is not None else sys.argv[1:])])}",
        f"# deis_ode {deis_ode.__version__}, torch {torch.__version__}, torchsde {torchsde.__version__}, "
        f"python {platform.python_version()}",
        f"# {samples} samples, VP linear schedule, t from {T_START} to {T_END}, GaussianMixture.default() (D=8, K=5)",
    ]
    results: dict[str, dict[int, tuple[float, float, float]]] = {}
    floor = problem.distances(problem.exact_samples(samples))
    start = time.perf_counter()
    for name, run in samplers():
        results[name] = {}
        for nfe in nfes:
            with torch.no_grad():
                x, calls = run(problem, nfe)
            if calls != nfe:
                raise RuntimeError(f"{name}: {calls} model evaluations, expected {nfe}")
            results[name][nfe] = problem.distances(x)
        print(f"  {name}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    for index, metric in ((2, "std"), (0, "weights"), (1, "mean")):
        lines.append("")
        lines.append(f"## {metric} error (floor of {samples} exact samples: {floor[index]:.4f})")
        lines.append("")
        lines.append("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in nfes) + " |")
        for name, row in results.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row[n][index]) for n in nfes) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


def _fmt(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.4f}"


if __name__ == "__main__":
    main()
