"""Diffusion sampling on a family of problems: defaults chosen on one half, reported on the other (held-out) half.

    python benchmarks/family.py            # full run (~10 min on a busy 2-core machine)
    python benchmarks/family.py --quick    # a smoke run: 3 members, 64 samples, NFE 5 and 10

The family: Gaussian mixtures with exact noise models (``x0``, ``eps`` or ``v`` predictions computed in closed form
from the mixture, diagonal covariances so that components can be anisotropic) varying the dimension (2 .. 64), the
number of components (2 .. 32), the component widths (0.02 .. 1, isotropic or per-coordinate), the weights (even
or skewed: proportional to 1, 2, 4, ... capped at 16) and the schedule: diffusers' discrete DDPM schedules
(``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` betas, 1000 steps, model time 999 -> 0), the continuous VP
linear and cosine schedules, EDM (80 -> 0.002) and flow matching (from pure noise t = 1 to 1e-3). Plus the 2-D MLP
of ``examples/train_2d_mlp.py`` trained here for 2000 steps (components = its 8 known ring modes). Every member's
mixture and noise batch come from the seeds written in ``MEMBERS``; the split into a "choose" half and a
"held-out" half is that fixed list.

Per member and NFE (5, 10, 20 model evaluations), two metrics against the scipy reference (``deis_ode.reference``,
DOP853 at rtol = atol = 1e-10, in the half log-SNR where both ends have a finite one, else in t): the median over
samples of the relative error ``|x - x_ref| / |x_ref|``, and the number of samples whose final component (largest
posterior responsibility at noise level 0, i.e. nearest mean in the component's own metric) differs from the
reference sample's. Methods:

* ``defaults``: ``deis3`` with every default (x0 split, basis t, lower-order warm-up, ``timesteps()`` spacing);
* ``optimised``: the same solver on ``optimize_timesteps`` (calibration batch of 64 other noise draws);
* diffusers' ``DEISMultistepScheduler`` (order 3), ``DPMSolverMultistepScheduler`` (dpmsolver++, order 3 = 3M)
  and ``UniPCMultistepScheduler`` (its default bh2, order 2), default configuration at their own timesteps, on the
  discrete members only (the schedules they implement; DPM-Solver++ and UniPC with ``final_sigmas_type="sigma_min"``
  so that all end at the noise level of t = 0); "n/a" elsewhere.

On the choose half the script also sweeps deis2..deis4 x split x basis x spacing x ``lower_order_final`` (lower-order
warm-up: the full-order warm-up never paid in ``benchmarks/defaults.py``) and ranks the configurations by the
geometric mean of the median error over choose members and NFEs, with their total wrong-component count.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchdiffeq
from torch import Tensor, nn

import deis_ode  # noqa: F401  (registers the deis* methods)
from deis_ode import reference
from deis_ode.diffusion import (
    DiffusionODE,
    EDMSchedule,
    FlowSchedule,
    NoiseSchedule,
    VPSchedule,
    optimize_timesteps,
    timesteps,
)

F64 = torch.float64
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------------- mixtures


class DiagonalMixture:
    """``sum_k w_k N(mu_k, diag(s_k^2))``; the diagonal generalisation of ``deis_ode.diffusion.GaussianMixture``."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor) -> None:
        self.means, self.stds = means.to(F64), stds.to(F64)  # (K, D), (K, D)
        self.log_w = torch.log(weights.to(F64) / weights.sum())

    def _log_joint(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        var = alpha**2 * self.stds**2 + sigma**2  # (K, D)
        diff = x[..., None, :] - alpha * self.means  # (B, K, D)
        log_joint = self.log_w - 0.5 * (torch.log(var).sum(-1) + self.means.shape[1] * _LOG_2PI)
        log_joint = log_joint - 0.5 * (diff * diff / var).sum(-1)
        return log_joint, diff, var

    def predict(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """The exact ``(eps, x0)`` predictions at ``x_t = x`` (posterior means of the noise and of the data)."""
        log_joint, diff, var = self._log_joint(x, alpha, sigma)
        resp = torch.exp(log_joint - torch.logsumexp(log_joint, -1, keepdim=True))[..., None]
        eps = sigma * (resp * diff / var).sum(-2)  # -sigma * score
        x0 = (resp * (self.means + alpha * self.stds**2 / var * diff)).sum(-2)
        return eps, x0

    def classify(self, x0: Tensor) -> Tensor:
        log_joint, _, _ = self._log_joint(x0, torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64))
        return log_joint.argmax(-1)


class MixtureModel(nn.Module):
    """The exact model of a :class:`DiagonalMixture` under a schedule, predicting ``eps``, ``x0`` or ``v``."""

    def __init__(self, mixture: DiagonalMixture, schedule: NoiseSchedule, prediction: str) -> None:
        super().__init__()
        self.mixture, self.schedule, self.prediction = mixture, schedule, prediction

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=F64)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        eps, x0 = self.mixture.predict(x.to(F64), alpha, sigma)
        out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[self.prediction]
        return out.to(x.dtype)


@dataclass(frozen=True)
class Member:
    name: str
    half: str  # "choose" or "held-out"
    schedule: str
    dim: int = 8
    components: int = 5
    widths: tuple[float, float] = (0.3, 0.5)
    anisotropic: bool = False
    weights: str = "even"
    radius: float = 2.0
    prediction: str = "eps"
    seed: int = 0


MEMBERS = [
    # the "choose" half: defaults are selected here
    Member("C1 ddpm-lin D8 K5", "choose", "ddpm-linear", 8, 5, (0.3, 0.5), False, "skewed", 3.0, "eps", 11),
    Member("C2 ddpm-scaled D32 K16 aniso", "choose", "ddpm-scaled", 32, 16, (0.05, 0.5), True, "even", 2.0, "eps", 12),
    Member("C3 ddpm-cos D2 K8 narrow", "choose", "ddpm-cos", 2, 8, (0.02, 0.05), False, "skewed", 1.5, "eps", 13),
    Member("C4 vp-linear D16 K4 aniso", "choose", "vp-linear", 16, 4, (0.1, 1.0), True, "even", 3.0, "eps", 14),
    Member("C5 edm D64 K32", "choose", "edm", 64, 32, (0.1, 0.3), False, "skewed", 2.0, "eps", 15),
    Member("C6 flow D4 K3 aniso", "choose", "flow", 4, 3, (0.02, 0.2), True, "even", 1.5, "x0", 16),
    # the "held-out" half: reported only
    Member("H1 ddpm-lin D64 K8 aniso", "held-out", "ddpm-linear", 64, 8, (0.02, 0.3), True, "skewed", 2.0, "eps", 21),
    Member("H2 ddpm-lin D4 K32 wide", "held-out", "ddpm-linear", 4, 32, (0.1, 1.0), False, "even", 3.0, "eps", 22),
    Member("H3 ddpm-cos D16 K4", "held-out", "ddpm-cos", 16, 4, (0.05, 0.1), False, "even", 1.0, "eps", 23),
    Member("H4 ddpm-scaled D2 K2 aniso", "held-out", "ddpm-scaled", 2, 2, (0.02, 1.0), True, "skewed", 2.0, "eps", 24),
    Member("H5 cosine D32 K8 v-pred", "held-out", "cosine", 32, 8, (0.2, 0.6), False, "skewed", 2.0, "v", 25),
    Member("H6 edm D8 K16 aniso", "held-out", "edm", 8, 16, (0.02, 0.2), True, "even", 1.0, "eps", 26),
    Member("H7 flow D16 K8", "held-out", "flow", 16, 8, (0.05, 0.3), False, "skewed", 2.0, "x0", 27),
    Member("H8 mlp-2d ring (trained)", "held-out", "vp-linear", 2, 8, (0.1, 0.1), False, "even", 2.0, "eps", 28),
]
QUICK = ("C1 ddpm-lin D8 K5", "C6 flow D4 K3 aniso", "H1 ddpm-lin D64 K8 aniso")


def make_schedule(name: str) -> tuple[NoiseSchedule, float, float, str | None]:
    """(schedule, t_start, t_end, diffusers beta_schedule or None)."""
    if name.startswith("ddpm"):
        beta = {"ddpm-linear": "linear", "ddpm-scaled": "scaled_linear", "ddpm-cos": "squaredcos_cap_v2"}[name]
        kwargs = {"beta_start": 0.00085, "beta_end": 0.012} if beta == "scaled_linear" else {}
        return VPSchedule.diffusers(beta_schedule=beta, **kwargs), 999.0, 0.0, beta
    if name == "vp-linear":
        return VPSchedule.linear(), 1.0, 1e-3, None
    if name == "cosine":
        schedule = VPSchedule.cosine()
        return schedule, schedule.time_range[1], 1e-3, None
    if name == "edm":
        return EDMSchedule(0.002, 80.0), 80.0, 0.002, None
    if name == "flow":
        return FlowSchedule(), 1.0, 1e-3, None
    raise ValueError(name)


def make_mixture(m: Member) -> DiagonalMixture:
    g = torch.Generator().manual_seed(m.seed)
    directions = torch.randn(m.components, m.dim, generator=g, dtype=F64)
    means = m.radius * directions / directions.norm(dim=1, keepdim=True)
    lo, hi = math.log(m.widths[0]), math.log(m.widths[1])
    shape = (m.components, m.dim) if m.anisotropic else (m.components, 1)
    stds = torch.exp(lo + (hi - lo) * torch.rand(shape, generator=g, dtype=F64)).expand(m.components, m.dim)
    if m.weights == "even":
        weights = torch.ones(m.components, dtype=F64)
    else:
        weights = torch.clamp(2.0 ** torch.arange(m.components, dtype=F64), max=16.0)
    return DiagonalMixture(means, stds.clone(), weights)


class _RingClassifier:
    def __init__(self, centres: Tensor) -> None:
        self.centres = centres.to(F64)

    def classify(self, x: Tensor) -> Tensor:
        return torch.cdist(x.to(F64), self.centres).argmin(-1)


def make_mlp(schedule: NoiseSchedule, steps: int) -> tuple[nn.Module, _RingClassifier]:
    path = Path(__file__).resolve().parent.parent / "examples" / "train_2d_mlp.py"
    spec = importlib.util.spec_from_file_location("train_2d_mlp", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    net, _ = example.train(example.NoiseMLP(schedule), schedule, steps, 256, 0)
    return net.double().requires_grad_(False), _RingClassifier(example.mode_centres())


# --------------------------------------------------------------------------------------------------- running


@dataclass
class Problem:
    member: Member
    schedule: NoiseSchedule
    t_start: float
    t_end: float
    beta: str | None
    model: nn.Module
    classifier: object
    x: Tensor
    x_cal: Tensor
    ref: Tensor = field(default=None)
    ref_class: Tensor = field(default=None)
    ref_seconds: float = 0.0

    def drift(self, **kwargs) -> DiffusionODE:
        return DiffusionODE(self.model, self.schedule, prediction=self.member.prediction, **kwargs)

    def score(self, out: Tensor) -> tuple[float, int]:
        out = out.to(F64)
        err = (out - self.ref).norm(dim=-1) / self.ref.norm(dim=-1)
        if not bool(torch.isfinite(err).all()):
            return math.inf, out.shape[0]
        return float(err.median()), int((self.classifier.classify(out) != self.ref_class).sum())


class _InHalfLogSNRClamped(reference.InHalfLogSNR):
    """``reference.InHalfLogSNR`` with lambda clamped to the schedule's range: scipy's first-step probe can land a
    rounding error beyond the end of the range (the drift is smooth there, so the clamp changes nothing else)."""

    def __init__(self, drift, lam_range: tuple[float, float]) -> None:
        super().__init__(drift)
        self.lam_range = lam_range

    def __call__(self, lam: Tensor, x: Tensor) -> Tensor:
        return super().__call__(torch.as_tensor(lam, dtype=F64).clamp(*self.lam_range), x)


def make_problem(m: Member, samples: int, mlp_steps: int) -> Problem:
    schedule, t_start, t_end, beta = make_schedule(m.schedule)
    if m.name.startswith("H8"):
        model, classifier = make_mlp(schedule, mlp_steps)
    else:
        mixture = make_mixture(m)
        model, classifier = MixtureModel(mixture, schedule, m.prediction), mixture
    g = torch.Generator().manual_seed(1000 + m.seed)
    x = torch.randn(samples, m.dim, generator=g, dtype=F64)
    x_cal = torch.randn(64, m.dim, generator=g, dtype=F64)
    if m.schedule == "edm":  # EDM starts from N(0, sigma_max^2 I)
        x, x_cal = x * t_start, x_cal * t_start
    p = Problem(m, schedule, t_start, t_end, beta, model, classifier, x, x_cal)
    began = time.perf_counter()
    ode = p.drift()
    lam = schedule.half_log_snr(torch.tensor([t_start, t_end], dtype=F64))
    with torch.no_grad():
        if bool(torch.isfinite(lam).all()):
            lo, hi = schedule.half_log_snr(torch.tensor(schedule.time_range, dtype=F64)).tolist()
            system = _InHalfLogSNRClamped(ode, (min(lo, hi), max(lo, hi)))
            sol = reference.solve(system, x, lam, rtol=1e-10, atol=1e-10)
        else:  # flow from alpha = 0: in t (the x0 split's drift is finite there)
            sol = reference.solve(ode, x, torch.tensor([t_start, t_end], dtype=F64), rtol=1e-10, atol=1e-10)
    p.ref = sol.states[-1]
    p.ref_class = classifier.classify(p.ref)
    p.ref_seconds = time.perf_counter() - began
    return p


def run_deis(p: Problem, grid: Tensor, method: str = "deis3", options: dict | None = None, **drift_kwargs):
    try:
        with torch.no_grad():
            out = torchdiffeq.odeint(p.drift(**drift_kwargs), p.x, grid, method=method, options=options or {})[-1]
    except (RuntimeError, ValueError):
        return None
    return p.score(out)


DIFFUSERS = [
    ("diffusers DEIS 3", "DEISMultistepScheduler", {"solver_order": 3}),
    (
        "DPM-Solver++ 3M",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    ),
    ("UniPC (bh2)", "UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
]


def run_diffusers(p: Problem, cls_name: str, config: dict, n: int):
    if p.beta is None or not HAS_DIFFUSERS:
        return None
    import diffusers

    kwargs = {"beta_schedule": p.beta}
    if p.beta == "scaled_linear":
        kwargs.update(beta_start=0.00085, beta_end=0.012)
    scheduler = getattr(diffusers, cls_name)(**config, **kwargs)
    scheduler.set_timesteps(n)
    x = p.x.clone()
    with torch.no_grad():
        for step in scheduler.timesteps:
            eps = p.model(x, torch.tensor(float(step), dtype=F64))
            x = scheduler.step(eps, step, x).prev_sample
    return p.score(x)


# --------------------------------------------------------------------------------------------------- output


def cell(result) -> str:
    if result is None:
        return f"{'n/a':>14}"
    median, wrong = result
    return f"{median:8.1e} {wrong:>4}" + " " * 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 members, 64 samples, NFE 5 10, small sweep")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep of configurations")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    samples = args.samples or (64 if args.quick else 256)
    nfes = [5, 10] if args.quick else [5, 10, 20]
    members = [m for m in MEMBERS if m.name in QUICK] if args.quick else MEMBERS
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"{samples} samples per member, NFE {nfes}; cells are 'median relative error, wrong-component count'")

    problems = []
    for m in members:
        p = make_problem(m, samples, mlp_steps=300 if args.quick else 2000)
        problems.append(p)
        print(
            f"  {m.name:<30} {m.half:<8} t {p.t_start:g} -> {p.t_end:g}, prediction {m.prediction}, "
            f"reference {p.ref_seconds:.1f} s"
        )

    # the per-member table
    methods = ["defaults", "optimised", *[label for label, _, _ in DIFFUSERS]]
    results: dict[tuple[str, str, int], object] = {}
    costs = []
    for p in problems:
        for n in nfes:
            results[p.member.name, "defaults", n] = run_deis(
                p, timesteps(p.schedule, n, t_start=p.t_start, t_end=p.t_end)
            )
            grid, info = optimize_timesteps(p.drift(), p.x_cal, n, t_start=p.t_start, t_end=p.t_end, return_info=True)
            costs.append((p.member.name, n, info))
            results[p.member.name, "optimised", n] = run_deis(p, grid)
            for label, cls_name, config in DIFFUSERS:
                results[p.member.name, label, n] = run_diffusers(p, cls_name, config, n)
    header = f"{'member':<30} {'method':<17}" + "".join(f"{'NFE ' + str(n):>15}" for n in nfes)
    for half in ("choose", "held-out"):
        print(f"\n== {half} half: median relative error / wrong-component samples (of {samples})")
        print(header)
        print("-" * len(header))
        for p in problems:
            if p.member.half != half:
                continue
            for method in methods:
                line = f"{p.member.name:<30} {method:<17}" + "".join(
                    cell(results[p.member.name, method, n]) for n in nfes
                )
                print(line)
    print("\ncalibration cost of optimize_timesteps (64 noise draws; teacher deis3, 120 candidates x 4 substeps):")
    for name, n, info in costs:
        print(
            f"  {name:<30} NFE {n:>2}: {info.model_evaluations:>5} model evaluations on the batch "
            f"({info.teacher_evaluations} teacher), {info.solves} solves, {info.seconds:5.1f} s, start {info.start}"
        )

    # the targets, on the held-out members with diffusers
    print("\ntargets on held-out members (diffusers: discrete schedules only):")
    for p in problems:
        if p.member.half != "held-out":
            continue
        name = p.member.name
        for n in nfes:
            deis = results[name, "diffusers DEIS 3", n]
            if deis is None:
                continue
            best_wrong = min(results[name, label, n][1] for label, _, _ in DIFFUSERS)
            d, o = results[name, "defaults", n], results[name, "optimised", n]
            checks = [f"defaults vs DEIS: median {d[0] / deis[0]:.2f}x, wrong {d[1]} vs {deis[1]}"]
            checks.append(f"optimised vs DEIS: median {o[0] / deis[0]:.3f}x, wrong {o[1]} vs {deis[1]}")
            checks.append(f"optimised wrong {o[1]} vs best diffusers {best_wrong}")
            flags = []
            if d[0] > deis[0] or d[1] > deis[1]:
                flags.append("defaults BEHIND DEIS")
            if n == 10 and (o[0] > deis[0] / 8 or o[1] > best_wrong):
                flags.append("optimised MISSES the NFE-10 target")
            if n == 5 and (o[0] >= deis[0] or o[1] > deis[1]):
                flags.append("optimised MISSES the NFE-5 target")
            print(f"  {name:<30} NFE {n:>2}: " + "; ".join(checks) + ("  <- " + ", ".join(flags) if flags else ""))

    if not args.no_sweep:
        sweep([p for p in problems if p.member.half == "choose"], nfes, args.quick)
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")


def sweep(problems: list[Problem], nfes: list[int], quick: bool) -> None:
    """deis2..4 x split x basis x spacing x lower_order_final on the choose half, ranked."""
    orders = (3,) if quick else (2, 3, 4)
    spacings = ("power", "logsnr", "karras", "uniform")
    configs = list(itertools.product(orders, ("x0", "eps"), ("t", "logrho"), spacings, (False, True)))
    table: dict[tuple, dict[tuple[str, int], tuple[float, int] | None]] = {}
    for config in configs:
        k, split, basis, spacing, lof = config
        table[config] = {}
        for p in problems:
            for n in nfes:
                grid = timesteps(p.schedule, n, spacing, t_start=p.t_start, t_end=p.t_end)
                r = run_deis(p, grid, f"deis{k}", {"basis": basis, "lower_order_final": lof}, extrapolate=split)
                table[config][p.member.name, n] = r if r is not None and math.isfinite(r[0]) else None
    # rank on the members where every configuration runs
    ranked = [p for p in problems if all(table[c][p.member.name, n] is not None for c in configs for n in nfes)]
    left = [p.member.name.split()[0] for p in problems if p not in ranked]
    names = ", ".join(p.member.name.split()[0] for p in ranked)
    print(f"\n== sweep on the choose half: {len(configs)} configurations (lower-order warm-up), ranked on {names}")
    if left:
        print(f"   ({', '.join(left)} left out of the ranking: some configurations cannot run there, e.g. eps split")
        print("   at alpha = 0 on the flow member; its column shows the x0-split configurations)")
    print("   by the geometric-mean median error over members and NFEs; 'wrong' = total wrong-component samples")
    head = f"{'configuration':<30} {'gm median':>9} {'wrong':>6}" + "".join(f"{'NFE ' + str(n):>16}" for n in nfes)
    head += "".join(f"{name:>16}" for name in left)
    print(head)
    print("-" * len(head))
    rows = []
    for config in configs:
        cells = [table[config][p.member.name, n] for p in ranked for n in nfes]
        gm = math.exp(sum(math.log(c[0]) for c in cells) / len(cells))
        wrong = sum(c[1] for c in cells)
        per = {
            n: (
                math.exp(sum(math.log(table[config][p.member.name, n][0]) for p in ranked) / len(ranked)),
                sum(table[config][p.member.name, n][1] for p in ranked),
            )
            for n in nfes
        }
        rows.append((config, gm, wrong, per))
    rows.sort(key=lambda r: r[1])
    default = (3, "x0", "t", "power", False)

    def show(row) -> None:
        (k, split, basis, spacing, lof), gm, wrong, per = row
        label = f"deis{k} {split:<3} {basis:<6} {spacing:<7} {'lof' if lof else ''}"
        line = f"{label:<30} {gm:9.2e} {wrong:>6}" + "".join(f"{per[n][0]:>10.2e} {per[n][1]:>5}" for n in nfes)
        for p in problems:
            if p not in ranked:
                cells = [table[row[0]][p.member.name, n] for n in nfes]
                text = "n/a" if any(c is None for c in cells) else "/".join(f"{c[0]:.1e}:{c[1]}" for c in cells)
                line += f"  {text}"
        print(line + ("  <- defaults" if row[0] == default else ""))

    for row in rows[:16]:
        show(row)
    for row in rows[16:]:
        if row[0] == default:
            show(row)
    fewest = sorted(rows, key=lambda r: (r[2], r[1]))[:6]
    print("fewest wrong-component samples (then gm median):")
    for row in fewest:
        show(row)

    # the same ranking on the VP members only, and every spacing of the default solver on the other members
    vp = [p for p in ranked if p.member.schedule.startswith(("ddpm", "vp", "cosine"))]
    if vp and len(vp) < len(ranked):
        print(f"\nranking on the VP members only ({', '.join(p.member.name.split()[0] for p in vp)}):")
        print(f"{'configuration':<30} {'gm median':>9} {'wrong':>6}" + "".join(f"{'NFE ' + str(n):>16}" for n in nfes))
        vp_rows = []
        for config in configs:
            per = {
                n: (
                    math.exp(sum(math.log(table[config][p.member.name, n][0]) for p in vp) / len(vp)),
                    sum(table[config][p.member.name, n][1] for p in vp),
                )
                for n in nfes
            }
            gm = math.exp(sum(math.log(per[n][0]) for n in nfes) / len(nfes))
            vp_rows.append((config, gm, sum(per[n][1] for n in nfes), per))
        vp_rows.sort(key=lambda r: r[1])
        for row in vp_rows[:10] + [r for r in vp_rows[10:] if r[0] == default]:
            (k, split, basis, spacing, lof), gm, wrong, per = row
            label = f"deis{k} {split:<3} {basis:<6} {spacing:<7} {'lof' if lof else ''}"
            cells = "".join(f"{per[n][0]:>10.2e} {per[n][1]:>5}" for n in nfes)
            print(f"{label:<30} {gm:9.2e} {wrong:>6}{cells}" + ("  <- defaults" if row[0] == default else ""))
        print("fewest wrong-component samples on the VP members:")
        for row in sorted(vp_rows, key=lambda r: (r[2], r[1]))[:4]:
            (k, split, basis, spacing, lof), gm, wrong, per = row
            print(f"  deis{k} {split} {basis} {spacing} {'lof' if lof else ''}: gm median {gm:.2e}, wrong {wrong}")
    for p in problems:
        if p in vp:
            continue
        print(f"{p.member.name}: deis3 x0 t (the default solver) by spacing, median / wrong at NFE {nfes}:")
        for spacing in spacings:
            cells = [table[(3, "x0", "t", spacing, False)][p.member.name, n] for n in nfes]
            print(f"  {spacing:<8} " + "  ".join("n/a" if c is None else f"{c[0]:.1e} / {c[1]}" for c in cells))


if __name__ == "__main__":
    main()
