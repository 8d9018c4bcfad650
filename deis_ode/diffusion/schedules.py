r"""Noise schedules of the forward diffusion process ``x_t = alpha_t x_0 + sigma_t eps``.

A schedule is described by ``log alpha(t)`` and ``log sigma(t)`` and their time derivatives; everything else is
derived from them:

* ``alpha = exp(log alpha)``, ``sigma = exp(log sigma)``;
* the half log signal-to-noise ratio ``lambda = log(alpha / sigma) = log alpha - log sigma`` (strictly decreasing
  in ``t``), its derivative ``d lambda / dt`` and its exact inverse ``t(lambda)``;
* ``rho = sigma / alpha = exp(-lambda)``, the clock of the probability-flow ODE ``d(x / alpha) / d rho = eps``.

Every method takes a tensor ``t`` of any shape on any device (or a Python number), computes in float64 and returns
float64 on ``t``'s device. Working with logarithms keeps the formulas free of cancellation, e.g. for a
variance-preserving schedule ``sigma^2 = 1 - alpha^2`` is evaluated as ``-expm1(2 log alpha)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "CosineVPSchedule",
    "DiscreteVPSchedule",
    "EDMSchedule",
    "FlowSchedule",
    "LinearVPSchedule",
    "NoiseSchedule",
    "VESchedule",
    "VPSchedule",
]

_LOG2 = math.log(2.0)


def as_float64(t: Tensor | float) -> Tensor:
    """``t`` as a float64 tensor on its own device (a Python number lands on the CPU)."""
    return torch.as_tensor(t, dtype=torch.float64)


def log1mexp(a: Tensor) -> Tensor:
    r"""``log(1 - exp(a))`` for ``a <= 0`` without cancellation.

    Uses ``log(-expm1(a))`` for ``-log 2 < a <= 0`` and ``log1p(-exp(a))`` below (Maechler's rule).
    """
    return torch.where(a > -_LOG2, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def log_expm1(y: Tensor) -> Tensor:
    r"""``log(exp(y) - 1)`` for ``y >= 0``, free of overflow: ``y + log(1 - exp(-y))`` for large ``y``."""
    big = y > 1.0
    return torch.where(big, y + log1mexp(-torch.where(big, y, 1.0)), torch.log(torch.expm1(torch.where(big, 1.0, y))))


def softplus(x: Tensor) -> Tensor:
    r"""``log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))``, exact for every ``x`` (no linear cut-off)."""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-torch.abs(x)))


class NoiseSchedule(ABC):
    r"""A forward process ``x_t = alpha_t x_0 + sigma_t eps`` with ``eps ~ N(0, I)``.

    Subclasses implement :meth:`log_alpha`, :meth:`log_sigma`, their time derivatives :meth:`d_log_alpha`,
    :meth:`d_log_sigma`, the inverse :meth:`t_of_half_log_snr` and :attr:`time_range`. The half log-SNR
    ``lambda(t) = log(alpha_t / sigma_t)`` must be strictly decreasing on :attr:`time_range`.
    """

    def _parameters(self) -> tuple:
        """The values that define this schedule among those of its class (equality and hashing use them)."""
        return (id(self),)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._parameters() == other._parameters()

    def __hash__(self) -> int:
        return hash((type(self).__name__, *self._parameters()))

    # --- the primitives ---------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def time_range(self) -> tuple[float, float]:
        """The closed interval ``(t_min, t_max)`` of times on which the schedule is defined."""

    @abstractmethod
    def log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``log alpha_t``."""

    @abstractmethod
    def log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``log sigma_t``."""

    @abstractmethod
    def d_log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``d log alpha_t / dt``."""

    @abstractmethod
    def d_log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d log sigma_t / dt``."""

    @abstractmethod
    def t_of_half_log_snr(self, lam: Tensor | float) -> Tensor:
        r"""The exact inverse of :meth:`half_log_snr`: the time ``t`` with ``lambda(t) = lam``."""

    # --- derived quantities -----------------------------------------------------------------------------------

    def alpha(self, t: Tensor | float) -> Tensor:
        r"""``alpha_t = exp(log alpha_t)``."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        r"""``sigma_t = exp(log sigma_t)``."""
        return torch.exp(self.log_sigma(t))

    def half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``lambda_t = log(alpha_t / sigma_t) = log alpha_t - log sigma_t`` (``rho_t = exp(-lambda_t)``)."""
        return self.log_alpha(t) - self.log_sigma(t)

    def d_half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``d lambda_t / dt = d log alpha_t / dt - d log sigma_t / dt`` (negative)."""
        return self.d_log_alpha(t) - self.d_log_sigma(t)

    def d_alpha(self, t: Tensor | float) -> Tensor:
        r"""``d alpha_t / dt = alpha_t d log alpha_t / dt``; schedules where ``alpha`` reaches 0 override it with a
        form that stays finite there."""
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d sigma_t / dt = sigma_t d log sigma_t / dt``; schedules where ``sigma`` reaches 0 override it with a
        form that stays finite there."""
        return self.sigma(t) * self.d_log_sigma(t)

    @property
    def breakpoints(self) -> Tensor | None:
        """Sorted times where the schedule is not smooth (``None``: smooth on its whole range)."""
        return None

    def check_times(self, t: Tensor | float, name: str = "t") -> None:
        """Raise ``ValueError`` naming ``name``, the offending value and the range if any ``t`` lies outside
        :attr:`time_range` (or is NaN). Meant to be called once per time grid, not inside a solver loop."""
        lo, hi = self.time_range
        values = as_float64(t).detach().reshape(-1).cpu()
        bad = ~((values >= lo) & (values <= hi))
        if bool(bad.any()):
            value = float(values[bad][0])
            raise ValueError(
                f"{name} = {value!r} is outside the time range [{lo!r}, {hi!r}] of {self!r}"
                + (f" ({int(bad.sum())} of {values.numel()} values are out of range)" if values.numel() > 1 else "")
            )


class VPSchedule(NoiseSchedule):
    r"""A variance-preserving schedule: ``alpha_t^2 + sigma_t^2 = 1``.

    A VP schedule is fixed by ``log alpha(t)`` alone. Subclasses implement :meth:`log_alpha`, :meth:`d_log_alpha`,
    its inverse :meth:`t_of_log_alpha` and :attr:`time_range`; this class derives, without cancellation,

    * ``log sigma = 0.5 log(1 - alpha^2) = 0.5 log1mexp(2 log alpha)``,
    * ``d log sigma / dt = -(alpha^2 / sigma^2) d log alpha / dt = -d log alpha / dt / expm1(-2 log alpha)``,
    * ``lambda = -0.5 log(alpha^{-2} - 1) = -0.5 log_expm1(-2 log alpha)``,
    * ``d lambda / dt = (d log alpha / dt) / sigma^2``,
    * ``t(lambda) = t_of_log_alpha(-0.5 softplus(-2 lambda))``, since ``alpha^2 = 1 / (1 + exp(-2 lambda))``.

    Construct one with :meth:`VPSchedule.linear`, :meth:`VPSchedule.cosine`, :meth:`VPSchedule.discrete`,
    :meth:`VPSchedule.from_betas` or :meth:`VPSchedule.diffusers`.
    """

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> LinearVPSchedule:
        """The continuous linear-beta schedule of score SDEs (``beta(t) = beta_min + t (beta_max - beta_min)``)."""
        return LinearVPSchedule(beta_min, beta_max)

    @classmethod
    def cosine(cls, s: float = 0.008, lambda_min: float = -10.0) -> CosineVPSchedule:
        """The continuous cosine schedule of improved DDPM, ``alpha_t^2 = cos^2((t + s) / (1 + s) pi / 2) /
        cos^2(s / (1 + s) pi / 2)``, cut where the half log-SNR reaches ``lambda_min`` (see
        :class:`CosineVPSchedule`)."""
        return CosineVPSchedule(s, lambda_min)

    @classmethod
    def discrete(cls, alphas_cumprod: Tensor | Sequence[float]) -> DiscreteVPSchedule:
        """The schedule of a model trained on ``N`` discrete noise levels, over model time ``t in [0, N - 1]``
        (the training timestep index): exact at the integers, ``alpha(i)^2 = alphas_cumprod[i]``, with ``lambda``
        interpolated monotonically in between (see :class:`DiscreteVPSchedule`)."""
        return DiscreteVPSchedule(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas: Tensor | Sequence[float]) -> DiscreteVPSchedule:
        r""":meth:`discrete` with ``alphas_cumprod[i] = prod_{j <= i} (1 - betas[j])``, computed in float64."""
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least two values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0.0) & (betas < 1.0)).all()):
            raise ValueError("betas must lie in the open interval (0, 1)")
        return DiscreteVPSchedule(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def diffusers(
        cls,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
        trained_betas: Tensor | Sequence[float] | None = None,
    ) -> DiscreteVPSchedule:
        r"""The training schedule of a diffusers scheduler with the same configuration, built in float64.

        The arguments mean what they mean in diffusers' scheduler configurations. The betas are

        * ``"linear"``: ``beta_start`` to ``beta_end``, evenly spaced (DDPM);
        * ``"scaled_linear"``: the squares of ``sqrt(beta_start)`` to ``sqrt(beta_end)``, evenly spaced (latent
          diffusion);
        * ``"squaredcos_cap_v2"``: ``beta_i = min(1 - f((i + 1) / N) / f(i / N), 0.999)`` with
          ``f(u) = cos(pi / 2 (u + 0.008) / 1.008)^2`` (the cosine schedule of improved DDPM);
        * ``trained_betas``, when given, overrides all of the above.

        diffusers computes the same numbers in float32; they agree to float32 round-off.
        """
        if trained_betas is not None:
            return cls.from_betas(trained_betas)
        n = int(num_train_timesteps)
        if n < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            u = torch.arange(n + 1, dtype=torch.float64) / n
            alpha_bar = torch.cos((u + 0.008) / 1.008 * (math.pi / 2)) ** 2
            betas = torch.clamp(1.0 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
        else:
            raise ValueError(
                f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', got {beta_schedule!r}"
            )
        schedule = cls.from_betas(betas)
        schedule._description = (
            f"VPSchedule.diffusers(beta_schedule={beta_schedule!r}, beta_start={beta_start!r}, "
            f"beta_end={beta_end!r}, num_train_timesteps={n!r})"
        )
        return schedule

    @abstractmethod
    def t_of_log_alpha(self, log_alpha: Tensor) -> Tensor:
        r"""The exact inverse of :meth:`log_alpha` (float64 in, float64 out)."""

    def log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``log sigma_t = 0.5 log(1 - alpha_t^2)``."""
        return 0.5 * log1mexp(2.0 * self.log_alpha(t))

    def d_log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d log sigma_t / dt = -(alpha_t^2 / sigma_t^2) d log alpha_t / dt``."""
        return -self.d_log_alpha(t) / torch.expm1(-2.0 * self.log_alpha(t))

    def half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``lambda_t = -0.5 log(alpha_t^{-2} - 1)``."""
        return -0.5 * log_expm1(-2.0 * self.log_alpha(t))

    def d_half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``d lambda_t / dt = (d log alpha_t / dt) / sigma_t^2``."""
        return self.d_log_alpha(t) / -torch.expm1(2.0 * self.log_alpha(t))

    def t_of_half_log_snr(self, lam: Tensor | float) -> Tensor:
        r"""``t(lambda) = t_of_log_alpha(-0.5 log(1 + exp(-2 lambda)))``."""
        return self.t_of_log_alpha(-0.5 * softplus(-2.0 * as_float64(lam)))


class LinearVPSchedule(VPSchedule):
    r"""The continuous linear-beta VP schedule (Song et al. 2021; DEIS's default).

    ``beta(t) = beta_min + t (beta_max - beta_min)`` on ``t in [0, 1]`` and

        log alpha_t = -int_0^t beta / 2 = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2.

    Args:
        beta_min: ``beta(0) >= 0``.
        beta_max: ``beta(1) >= beta_min``, and ``> 0``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        beta_min, beta_max = float(beta_min), float(beta_max)
        if not (math.isfinite(beta_min) and math.isfinite(beta_max)):
            raise ValueError(f"beta_min and beta_max must be finite, got beta_min={beta_min}, beta_max={beta_max}")
        if beta_min < 0.0:
            raise ValueError(f"beta_min must be >= 0, got {beta_min}")
        if beta_max < beta_min or beta_max <= 0.0:
            raise ValueError(f"beta_max must be >= beta_min and > 0, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min = beta_min
        self.beta_max = beta_max
        # log alpha = -(a t^2 + b t)
        self._a = 0.25 * (beta_max - beta_min)
        self._b = 0.5 * beta_min

    def __repr__(self) -> str:
        return f"VPSchedule.linear(beta_min={self.beta_min!r}, beta_max={self.beta_max!r})"

    def _parameters(self) -> tuple:
        return (self.beta_min, self.beta_max)

    @property
    def time_range(self) -> tuple[float, float]:
        """``(0.0, 1.0)``."""
        return (0.0, 1.0)

    def beta(self, t: Tensor | float) -> Tensor:
        r"""``beta(t) = beta_min + t (beta_max - beta_min) = -2 d log alpha_t / dt``."""
        t = as_float64(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``log alpha_t = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2``."""
        t = as_float64(t)
        return -t * (self._a * t + self._b)

    def d_log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``d log alpha_t / dt = -beta(t) / 2``."""
        t = as_float64(t)
        return -(2.0 * self._a * t + self._b)

    def t_of_log_alpha(self, log_alpha: Tensor | float) -> Tensor:
        r"""Root ``t >= 0`` of ``a t^2 + b t + c = 0`` with ``a = (beta_max - beta_min) / 4``,
        ``b = beta_min / 2``, ``c = log alpha``, in the cancellation-free form
        ``t = -2 c / (b + sqrt(b^2 - 4 a c))``."""
        c = as_float64(log_alpha)
        denom = self._b + torch.sqrt(self._b * self._b - 4.0 * self._a * c)
        # c = 0 (t = 0) with beta_min = 0 would be 0 / 0.
        return torch.where(c == 0.0, torch.zeros_like(c), -2.0 * c / torch.where(c == 0.0, 1.0, denom))


class VESchedule(NoiseSchedule):
    r"""A variance-exploding schedule (Song et al. 2021): ``alpha_t = 1`` and a geometric ``sigma``,

        sigma_t = sigma_min (sigma_max / sigma_min)^t,   t in [0, 1].

    So ``log sigma_t = log sigma_min + t log(sigma_max / sigma_min)``, ``lambda_t = -log sigma_t`` and
    ``t(lambda) = (-lambda - log sigma_min) / log(sigma_max / sigma_min)``.

    Args:
        sigma_min: ``sigma_0 > 0``.
        sigma_max: ``sigma_1 > sigma_min``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not (math.isfinite(sigma_min) and sigma_min > 0.0):
            raise ValueError(f"sigma_min must be a finite number > 0, got {sigma_min}")
        if not (math.isfinite(sigma_max) and sigma_max > sigma_min):
            raise ValueError(
                f"sigma_max must be a finite number > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._log_sigma_min = math.log(sigma_min)
        self._log_ratio = math.log(sigma_max) - math.log(sigma_min)

    def __repr__(self) -> str:
        return f"VESchedule(sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r})"

    def _parameters(self) -> tuple:
        return (self.sigma_min, self.sigma_max)

    @property
    def time_range(self) -> tuple[float, float]:
        """``(0.0, 1.0)``."""
        return (0.0, 1.0)

    def log_alpha(self, t: Tensor | float) -> Tensor:
        """``log alpha_t = 0``."""
        return torch.zeros_like(as_float64(t))

    def d_log_alpha(self, t: Tensor | float) -> Tensor:
        """``d log alpha_t / dt = 0``."""
        return torch.zeros_like(as_float64(t))

    def log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``log sigma_t = log sigma_min + t log(sigma_max / sigma_min)``."""
        return self._log_sigma_min + as_float64(t) * self._log_ratio

    def d_log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d log sigma_t / dt = log(sigma_max / sigma_min)``."""
        return torch.full_like(as_float64(t), self._log_ratio)

    def half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``lambda_t = -log sigma_t``."""
        return -self.log_sigma(t)

    def t_of_half_log_snr(self, lam: Tensor | float) -> Tensor:
        r"""``t = (-lambda - log sigma_min) / log(sigma_max / sigma_min)``."""
        return (-as_float64(lam) - self._log_sigma_min) / self._log_ratio


class DiscreteVPSchedule(VPSchedule):
    r"""A VP schedule given at ``N`` integer times: ``alpha(i)^2 = alphas_cumprod[i]`` for ``i = 0 .. N - 1``.

    This is the schedule of a model trained on discrete noise levels (DDPM and the diffusers schedulers), with the
    training timestep index as model time ``t in [0, N - 1]``. Between the integers the half log-SNR ``lambda`` is
    interpolated by a monotone ``C^1`` piecewise cubic Hermite polynomial (PCHIP, Fritsch and Carlson 1980) through
    the knots ``lambda_i = 0.5 (log a_i - log(1 - a_i))``:

    * interior slopes: the harmonic mean ``2 d_{i-1} d_i / (d_{i-1} + d_i)`` of the neighbouring secants ``d``;
    * end slopes: the one-sided three-point estimate ``(3 d_0 - d_1) / 2``, kept between ``d_0 / 2`` and
      ``3 d_0 / 2`` (and likewise at the other end).

    Every slope then has the sign of the secants and at most twice their size, inside the Fritsch-Carlson region,
    so ``lambda`` is strictly decreasing with ``d lambda / dt < 0`` everywhere. The rest follows from ``lambda``
    without cancellation:

    * ``log alpha = -0.5 softplus(-2 lambda)``, ``log sigma = -0.5 softplus(2 lambda)``;
    * ``d log alpha / dt = sigma^2 d lambda / dt``, ``d log sigma / dt = -alpha^2 d lambda / dt``;
    * ``t(lambda)``: the interval is located by a binary search over the knots, and the cubic on it is solved by
      Newton's method safeguarded by bisection, to round-off.

    Times outside ``[0, N - 1]`` (and half log-SNRs outside ``[lambda_{N-1}, lambda_0]``) raise ``ValueError``:
    the schedule is not extrapolated.

    Args:
        alphas_cumprod: ``N >= 2`` values in ``(0, 1)``, strictly decreasing (a tensor or a sequence; the
            schedule works in float64).
    """

    _description: str | None = None

    def __init__(self, alphas_cumprod: Tensor | Sequence[float]) -> None:
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().clone()
        if a.dim() != 1 or a.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D sequence of at least two values, got shape {tuple(a.shape)}"
            )
        if not bool(((a > 0.0) & (a < 1.0)).all()):
            bad = a[~((a > 0.0) & (a < 1.0))][0]
            raise ValueError(f"alphas_cumprod must lie in the open interval (0, 1), got {float(bad)!r}")
        knots = 0.5 * (torch.log(a) - torch.log1p(-a))
        secants = knots[1:] - knots[:-1]
        if not bool((secants < 0.0).all()):
            i = int(torch.nonzero(secants >= 0.0)[0, 0])
            raise ValueError(
                f"alphas_cumprod must be strictly decreasing; entries {i} and {i + 1} are {float(a[i])!r} and "
                f"{float(a[i + 1])!r}"
            )
        self.alphas_cumprod = a
        self._n = a.numel()
        self._knots = knots
        self._slopes = self._pchip_slopes(secants)
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._breakpoints: Tensor | None = None

    @staticmethod
    def _pchip_slopes(secants: Tensor) -> Tensor:
        """Knot slopes of the monotone cubic on a unit-spaced grid (see the class docstring)."""
        if secants.numel() == 1:
            return torch.cat([secants, secants])
        inner = 2.0 * secants[:-1] * secants[1:] / (secants[:-1] + secants[1:])

        def end(near: Tensor, far: Tensor) -> Tensor:
            ratio = torch.clamp(1.5 - 0.5 * far / near, min=0.5, max=1.5)
            return (ratio * near).reshape(1)

        return torch.cat([end(secants[0], secants[1]), inner, end(secants[-1], secants[-2])])

    def __repr__(self) -> str:
        if self._description is not None:
            return self._description
        return f"VPSchedule.discrete(<{self._n} alphas_cumprod from {float(self.alphas_cumprod[0]):.6g} to " + (
            f"{float(self.alphas_cumprod[-1]):.6g}>)"
        )

    def _parameters(self) -> tuple:
        return (self.alphas_cumprod.numpy().tobytes(),)

    @property
    def breakpoints(self) -> Tensor:
        """The training timesteps ``0, 1, ..., N-1``: the interpolant is a cubic between them, and its second
        derivative jumps there (quadratures over ``t`` split at these points)."""
        if self._breakpoints is None:
            self._breakpoints = torch.arange(self._n, dtype=torch.float64)
        return self._breakpoints

    @property
    def betas(self) -> Tensor:
        r"""``beta_i = 1 - a_i / a_{i-1}`` (with ``a_{-1} = 1``), float64 on the CPU."""
        previous = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return -torch.expm1(torch.log(self.alphas_cumprod) - torch.log(previous))

    @property
    def num_train_timesteps(self) -> int:
        """``N``, the number of discrete noise levels."""
        return self._n

    @property
    def time_range(self) -> tuple[float, float]:
        """``(0.0, N - 1.0)``."""
        return (0.0, float(self._n - 1))

    # --- the cubic ------------------------------------------------------------------------------------------------

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(knots, slopes, curvature and cubic coefficients per interval) on ``device``, cached.

        On interval ``i`` with ``s = t - i`` in ``[0, 1]``: ``p(s) = y_i + s (m_i + s (c2_i + s c3_i))`` with
        ``c2 = 3 d - 2 m_i - m_{i+1}`` and ``c3 = m_i + m_{i+1} - 2 d``.
        """
        if device not in self._cache:
            y, m = self._knots, self._slopes
            d = y[1:] - y[:-1]
            c2 = 3.0 * d - 2.0 * m[:-1] - m[1:]
            c3 = m[:-1] + m[1:] - 2.0 * d
            self._cache[device] = (y.to(device), m.to(device), c2.to(device), c3.to(device))
        return self._cache[device]

    def _locate(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, i, s)``: the float64 times, the interval index and ``s = t - i`` in ``[0, 1]``."""
        t = as_float64(t)
        self._check_range(t, "t", 0.0, float(self._n - 1))
        i = torch.clamp(torch.floor(t.detach()), 0, self._n - 2).to(torch.long)
        return t, i, t - i.to(t.dtype)

    def _check_range(self, x: Tensor, name: str, lo: float, hi: float) -> None:
        # Checked where it is free: on the host. On an accelerator the check would wait for the device at every
        # model evaluation; there the solvers check the whole grid once, before stepping.
        if x.device.type != "cpu":
            return
        bad = ~((x >= lo) & (x <= hi))
        if bool(bad.any()):
            value = float(x.detach()[bad].reshape(-1)[0])
            raise ValueError(f"{name} = {value!r} is outside [{lo!r}, {hi!r}], where {self!r} is defined")

    def _cubic(self, i: Tensor, s: Tensor) -> Tensor:
        """``lambda`` on interval ``i`` at ``s``, expanded about the nearer knot (so it is exact at the knots)."""
        y, m, c2, c3 = self._tables(s.device)
        a, b, q, r = y[i], m[i], c2[i], c3[i]
        left = a + s * (b + s * (q + s * r))
        # About s = 1: p = y_{i+1} + u (m_{i+1} + u (c2 + 3 c3 + u c3)), u = s - 1.
        u = s - 1.0
        right = y[i + 1] + u * (m[i + 1] + u * (q + 3.0 * r + u * r))
        return torch.where(s <= 0.5, left, right)

    def _cubic_slope(self, i: Tensor, s: Tensor) -> Tensor:
        """``d lambda / dt = m_i + s (2 c2 + 3 c3 s)`` on interval ``i``."""
        _, m, c2, c3 = self._tables(s.device)
        return m[i] + s * (2.0 * c2[i] + 3.0 * c3[i] * s)

    # --- the schedule -------------------------------------------------------------------------------------------

    def half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``lambda(t)``: the monotone cubic through ``lambda_i = 0.5 log(a_i / (1 - a_i))``."""
        _, i, s = self._locate(t)
        return self._cubic(i, s)

    def d_half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``d lambda / dt``, from the same cubic (continuous, strictly negative)."""
        _, i, s = self._locate(t)
        return self._cubic_slope(i, s)

    def log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``log alpha = -0.5 softplus(-2 lambda)``."""
        return -0.5 * softplus(-2.0 * self.half_log_snr(t))

    def log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``log sigma = -0.5 softplus(2 lambda)``."""
        return -0.5 * softplus(2.0 * self.half_log_snr(t))

    def d_log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``d log alpha / dt = sigma^2 d lambda / dt``."""
        _, i, s = self._locate(t)
        return torch.sigmoid(-2.0 * self._cubic(i, s)) * self._cubic_slope(i, s)

    def d_log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d log sigma / dt = -alpha^2 d lambda / dt``."""
        _, i, s = self._locate(t)
        return -torch.sigmoid(2.0 * self._cubic(i, s)) * self._cubic_slope(i, s)

    def t_of_half_log_snr(self, lam: Tensor | float) -> Tensor:
        r"""The exact inverse of :meth:`half_log_snr`.

        The interval ``i`` with ``lambda_{i+1} <= lam <= lambda_i`` is found by a binary search over the knots;
        on it ``p(s) = lam`` is solved for ``s in [0, 1]`` by Newton's method from the secant guess, falling back
        to bisection of a bracket whenever a Newton step would leave it, until the steps are a few units of round-off.
        """
        lam = as_float64(lam).detach()
        y, _, _, _ = self._tables(lam.device)
        lo, hi = float(self._knots[-1]), float(self._knots[0])
        self._check_range(lam, "lambda", lo, hi)
        # Ascending keys -lambda_i; interval i holds -lambda_i <= -lam <= -lambda_{i+1}.
        i = torch.searchsorted(-y, (-lam).contiguous(), right=True) - 1
        i = torch.clamp(i, 0, self._n - 2)
        a, b = y[i], y[i + 1]
        s = torch.clamp((a - lam) / (a - b), 0.0, 1.0)
        left, right = torch.zeros_like(s), torch.ones_like(s)
        for _ in range(100):
            f = self._cubic(i, s) - lam  # decreasing in s
            left = torch.where(f > 0.0, s, left)
            right = torch.where(f < 0.0, s, right)
            newton = s - f / self._cubic_slope(i, s)
            inside = (newton > left) & (newton < right)
            new = torch.where(f == 0.0, s, torch.where(inside, newton, 0.5 * (left + right)))
            step = (new - s).abs()
            s = new
            if not bool((step > 4e-16).any()):
                break
        return i.to(s.dtype) + s

    def t_of_log_alpha(self, log_alpha: Tensor | float) -> Tensor:
        r"""``t(log alpha) = t(lambda)`` with ``lambda = -0.5 log(alpha^{-2} - 1)``."""
        return self.t_of_half_log_snr(-0.5 * log_expm1(-2.0 * as_float64(log_alpha)))


class CosineVPSchedule(VPSchedule):
    r"""The continuous cosine VP schedule of improved DDPM (Nichol and Dhariwal 2021).

    ``alpha_t^2 = f(t) / f(0)`` with ``f(t) = cos^2(theta_t)``, ``theta_t = (t + s) / (1 + s) * pi / 2``. Writing
    ``c = pi / (2 (1 + s))`` and ``theta_0 = s c``, every quantity has a closed form free of cancellation:

    * in the low-noise half ``theta_t - theta_0 = t c < pi / 4``:
      ``log alpha = log1p(-2 sin^2(t c / 2) - tan(theta_0) sin(t c))``,
      ``sigma^2 = sin(t c) sin((t + 2 s) c) / cos^2 theta_0`` (``sigma = 0`` exactly at ``t = 0``) and
      ``d log sigma / dt = c (cot(t c) + cot((t + 2 s) c)) / 2``;
    * in the high-noise half: ``log alpha = log sin((1 - t) c) - log cos theta_0`` (``alpha = 0`` exactly at
      ``t = 1``), ``log sigma = log(1 - alpha^2) / 2`` and ``d log sigma / dt = -(alpha^2 / sigma^2) d log alpha / dt``;
    * ``d log alpha / dt = -c tan theta_t = -c / tan((1 - t) c)``;
    * the inverse of ``lambda``: ``tan theta = sqrt(sin^2 theta_0 + e^{-2 lambda}) / cos theta_0``, evaluated for
      ``lambda >= 0`` through ``tan(theta - theta_0)`` so that ``t`` near 0 keeps its relative accuracy.

    ``alpha`` vanishes at ``t = 1``, where the eps form of the probability-flow ODE is singular, so the schedule is
    cut where the half log-SNR reaches a floor: ``time_range = (0, t_max)`` with ``lambda(t_max) = lambda_min``. The
    default ``lambda_min = -10`` (``alpha^2 ~ 2e-9``) is about the last noise level of diffusers'
    ``squaredcos_cap_v2`` schedule with 1000 steps (whose final beta is clipped at 0.999); ``t_max ~ 0.99997``.

    Args:
        s: the offset ``s >= 0`` (0.008 in the paper).
        lambda_min: the half log-SNR floor that fixes ``t_max``.
    """

    def __init__(self, s: float = 0.008, lambda_min: float = -10.0) -> None:
        s, lambda_min = float(s), float(lambda_min)
        if not (math.isfinite(s) and s >= 0.0):
            raise ValueError(f"s must be a finite number >= 0, got {s}")
        if not math.isfinite(lambda_min):
            raise ValueError(f"lambda_min must be finite, got {lambda_min}")
        self.s = s
        self.lambda_min = lambda_min
        self._c = math.pi / (2.0 * (1.0 + s))
        self._theta0 = s * self._c
        self._log_cos0 = math.log(math.cos(self._theta0))
        self._tan0 = math.tan(self._theta0)
        self._t_max = float(self.t_of_half_log_snr(lambda_min))

    def __repr__(self) -> str:
        return f"VPSchedule.cosine(s={self.s!r}, lambda_min={self.lambda_min!r})"

    def _parameters(self) -> tuple:
        return (self.s, self.lambda_min)

    @property
    def time_range(self) -> tuple[float, float]:
        """``(0.0, t_max)``, ``t_max`` the time where ``lambda = lambda_min``."""
        return (0.0, self._t_max)

    def _halves(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``(near, t_near, t_far)``: the mask of the low-noise half ``t c < pi / 4``, and ``t`` with the other half
        replaced by a harmless value, so that neither branch of a ``torch.where`` makes an infinity or a NaN (whose
        gradient would poison the selected branch)."""
        t = as_float64(t)
        near = t * self._c < 0.25 * math.pi
        return near, torch.where(near, t, 0.5 / (1.0 + self.s)), torch.where(near, 0.75, t)

    def _log_alpha_near(self, t: Tensor) -> Tensor:
        d = t * self._c  # theta_t - theta_0
        return torch.log1p(-(2.0 * torch.sin(0.5 * d) ** 2 + self._tan0 * torch.sin(d)))

    def _log_alpha_far(self, t: Tensor) -> Tensor:
        return torch.log(torch.sin((1.0 - t) * self._c)) - self._log_cos0

    def log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``log alpha_t = log cos(theta_t) - log cos(theta_0)`` (see the class docstring for the evaluation)."""
        near, t_near, t_far = self._halves(t)
        return torch.where(near, self._log_alpha_near(t_near), self._log_alpha_far(t_far))

    def d_log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``d log alpha_t / dt = -c tan(theta_t) = -c / tan((1 - t) c)``."""
        t = as_float64(t)
        return -self._c / torch.tan((1.0 - t) * self._c)

    def log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``log sigma_t = (log sin(t c) + log sin((t + 2 s) c)) / 2 - log cos(theta_0)`` in the low-noise half,
        ``log(1 - alpha_t^2) / 2`` (from the accurate ``log alpha``) in the high-noise half."""
        near, t_near, t_far = self._halves(t)
        product = 0.5 * (
            torch.log(torch.sin(t_near * self._c)) + torch.log(torch.sin((t_near + 2.0 * self.s) * self._c))
        )
        return torch.where(near, product - self._log_cos0, 0.5 * log1mexp(2.0 * self._log_alpha_far(t_far)))

    def d_log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d log sigma_t / dt = c (cot(t c) + cot((t + 2 s) c)) / 2`` in the low-noise half,
        ``-(alpha_t^2 / sigma_t^2) d log alpha_t / dt`` in the high-noise half."""
        near, t_near, t_far = self._halves(t)
        product = (
            0.5 * self._c * (1.0 / torch.tan(t_near * self._c) + 1.0 / torch.tan((t_near + 2.0 * self.s) * self._c))
        )
        ratio = -self.d_log_alpha(t_far) / torch.expm1(-2.0 * self._log_alpha_far(t_far))
        return torch.where(near, product, ratio)

    def half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``lambda_t = log alpha_t - log sigma_t``."""
        return self.log_alpha(t) - self.log_sigma(t)

    def d_half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``d lambda_t / dt = d log alpha_t / dt - d log sigma_t / dt``."""
        return self.d_log_alpha(t) - self.d_log_sigma(t)

    def t_of_half_log_snr(self, lam: Tensor | float) -> Tensor:
        r"""``t(lambda) = (theta - theta_0) / c`` with ``tan theta = sqrt(sin^2 theta_0 + q) / cos theta_0``,
        ``q = e^{-2 lambda}``. For ``lambda >= 0`` the difference is taken as
        ``theta - theta_0 = atan2(tan theta - tan theta_0, 1 + tan theta tan theta_0)`` with
        ``tan theta - tan theta_0 = q / ((r + sin theta_0) cos theta_0)``, ``r = sqrt(sin^2 theta_0 + q)``."""
        lam = as_float64(lam)
        sin0, cos0 = math.sin(self._theta0), math.cos(self._theta0)
        positive = lam >= 0.0
        q = torch.exp(-2.0 * lam)
        q_pos = torch.where(positive, q, 0.0)
        r_pos = torch.sqrt(sin0 * sin0 + q_pos)
        diff = q_pos / ((r_pos + sin0) * cos0)
        near = torch.atan2(diff, 1.0 + (r_pos / cos0) * self._tan0)
        far = torch.atan2(torch.sqrt(sin0 * sin0 + torch.where(positive, 1.0, q)), torch.full_like(q, cos0))
        return torch.where(positive, near, far - self._theta0) / self._c

    def t_of_log_alpha(self, log_alpha: Tensor | float) -> Tensor:
        r"""``t(log alpha) = t(lambda)`` with ``lambda = -0.5 log(alpha^{-2} - 1)``."""
        return self.t_of_half_log_snr(-0.5 * log_expm1(-2.0 * as_float64(log_alpha)))


class EDMSchedule(NoiseSchedule):
    r"""The schedule of Karras et al. (2022, "EDM"): ``alpha_t = 1``, ``sigma_t = t``.

    So ``log sigma = log t``, ``d log sigma / dt = 1 / t``, ``lambda = -log t`` and ``t(lambda) = exp(-lambda)``.
    Time is the noise level itself. The time range is ``[0, sigma_max]``: ``t = 0`` (``sigma = 0``,
    ``lambda = +inf``) is allowed as the end of a sampling grid. ``sigma_min`` is not a bound of the time range; it
    is the smallest positive noise level, which the time grids use where a formula needs one (the ``"karras"`` and
    ``"logsnr"`` spacings of :func:`~deis_ode.diffusion.timesteps`, ending at ``sigma = 0``).

    Args:
        sigma_min: the smallest positive noise level of the grids, ``0 < sigma_min < sigma_max``.
        sigma_max: the largest noise level (the start of sampling).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not (math.isfinite(sigma_min) and sigma_min > 0.0):
            raise ValueError(f"sigma_min must be a finite number > 0, got {sigma_min}")
        if not (math.isfinite(sigma_max) and sigma_max > sigma_min):
            raise ValueError(
                f"sigma_max must be a finite number > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __repr__(self) -> str:
        return f"EDMSchedule(sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r})"

    def _parameters(self) -> tuple:
        return (self.sigma_min, self.sigma_max)

    @property
    def time_range(self) -> tuple[float, float]:
        """``(0.0, sigma_max)``."""
        return (0.0, self.sigma_max)

    def alpha(self, t: Tensor | float) -> Tensor:
        """``alpha_t = 1``."""
        return torch.ones_like(as_float64(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        """``sigma_t = t``."""
        return as_float64(t)

    def d_sigma(self, t: Tensor | float) -> Tensor:
        """``d sigma_t / dt = 1``."""
        return torch.ones_like(as_float64(t))

    def log_alpha(self, t: Tensor | float) -> Tensor:
        """``log alpha_t = 0``."""
        return torch.zeros_like(as_float64(t))

    def d_log_alpha(self, t: Tensor | float) -> Tensor:
        """``d log alpha_t / dt = 0``."""
        return torch.zeros_like(as_float64(t))

    def log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``log sigma_t = log t``."""
        return torch.log(as_float64(t))

    def d_log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d log sigma_t / dt = 1 / t``."""
        return 1.0 / as_float64(t)

    def half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``lambda_t = -log t``."""
        return -torch.log(as_float64(t))

    def t_of_half_log_snr(self, lam: Tensor | float) -> Tensor:
        r"""``t = exp(-lambda)``."""
        return torch.exp(-as_float64(lam))


class FlowSchedule(NoiseSchedule):
    r"""Rectified flow (flow matching with straight paths): ``x_t = (1 - sigma_t) x_0 + sigma_t eps``.

    Without shift ``sigma_t = t`` and ``alpha_t = 1 - t``. The time shift of Stable Diffusion 3 and FLUX with factor
    ``shift`` reparametrises the noise level as

        sigma_t = shift t / (1 + (shift - 1) t),   alpha_t = 1 - sigma_t = (1 - t) / (1 + (shift - 1) t),

    which spends more of ``t in [0, 1]`` at high noise for ``shift > 1``. Closed forms (``k = shift - 1``):

    * ``alpha = (1 - t) / (1 + k t)``, ``sigma = shift t / (1 + k t)``; ``log alpha = log1p(-sigma)`` while
      ``sigma < 1/2`` and ``log sigma = log1p(-alpha)`` while ``alpha < 1/2`` (else the logarithm itself);
    * ``d log sigma / dt = 1 / (t (1 + k t))``, ``d log alpha / dt = -shift / ((1 - t) (1 + k t))``;
    * ``d sigma / dt = -d alpha / dt = shift / (1 + k t)^2`` (finite at both ends);
    * ``lambda = log(1 - t) - log t - log(shift)``, ``d lambda / dt = -1 / (t (1 - t))``;
    * ``t(lambda) = 1 / (1 + shift e^lambda) = sigmoid(-lambda - log shift)``.

    Both ends are in the time range ``[0, 1]``: ``alpha = 0`` at ``t = 1`` (``lambda = -inf``, pure noise, where
    sampling starts) and ``sigma = 0`` at ``t = 0`` (``lambda = +inf``). Integrate from ``t = 1`` with
    ``extrapolate="x0"``: the eps form of the probability-flow ODE is singular where ``alpha = 0``.

    The ``"flow"`` prediction of :class:`~deis_ode.diffusion.DiffusionODE` is the velocity in this schedule's
    time, ``dx/dt = alpha' x_0 + sigma' eps = sigma'(t) (eps - x_0)``. A rectified-flow network outputs
    ``eps - x_0 = dx / d sigma``; with ``shift = 1`` the two coincide, otherwise multiply the network's output by
    :meth:`d_sigma` (and give it the noise level ``sigma(t)`` it was trained on).

    Args:
        shift: the time-shift factor ``> 0`` (1: no shift; SD3 uses 3).
    """

    def __init__(self, shift: float = 1.0) -> None:
        shift = float(shift)
        if not (math.isfinite(shift) and shift > 0.0):
            raise ValueError(f"shift must be a finite number > 0, got {shift}")
        self.shift = shift
        self._k = shift - 1.0
        self._log_shift = math.log(shift)

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift!r})"

    def _parameters(self) -> tuple:
        return (self.shift,)

    @property
    def time_range(self) -> tuple[float, float]:
        """``(0.0, 1.0)``."""
        return (0.0, 1.0)

    def alpha(self, t: Tensor | float) -> Tensor:
        r"""``alpha_t = (1 - t) / (1 + (shift - 1) t)``."""
        t = as_float64(t)
        return (1.0 - t) / (1.0 + self._k * t)

    def sigma(self, t: Tensor | float) -> Tensor:
        r"""``sigma_t = shift t / (1 + (shift - 1) t)``."""
        t = as_float64(t)
        return self.shift * t / (1.0 + self._k * t)

    def log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``log alpha_t``: ``log1p(-sigma_t)`` while ``sigma_t < 1/2``, else ``log alpha_t`` directly."""
        sigma = self.sigma(t)
        return torch.where(sigma < 0.5, torch.log1p(-sigma), torch.log(self.alpha(t)))

    def log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``log sigma_t``: ``log1p(-alpha_t)`` while ``alpha_t < 1/2``, else ``log sigma_t`` directly."""
        alpha = self.alpha(t)
        return torch.where(alpha < 0.5, torch.log1p(-alpha), torch.log(self.sigma(t)))

    def d_log_alpha(self, t: Tensor | float) -> Tensor:
        r"""``d log alpha_t / dt = -shift / ((1 - t) (1 + (shift - 1) t))``."""
        t = as_float64(t)
        return -self.shift / ((1.0 - t) * (1.0 + self._k * t))

    def d_log_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d log sigma_t / dt = 1 / (t (1 + (shift - 1) t))``."""
        t = as_float64(t)
        return 1.0 / (t * (1.0 + self._k * t))

    def d_sigma(self, t: Tensor | float) -> Tensor:
        r"""``d sigma_t / dt = shift / (1 + (shift - 1) t)^2``."""
        t = as_float64(t)
        return self.shift / (1.0 + self._k * t) ** 2

    def d_alpha(self, t: Tensor | float) -> Tensor:
        r"""``d alpha_t / dt = -d sigma_t / dt``."""
        return -self.d_sigma(t)

    def half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``lambda_t = log1p(-t) - log t - log(shift)``."""
        t = as_float64(t)
        return torch.log1p(-t) - torch.log(t) - self._log_shift

    def d_half_log_snr(self, t: Tensor | float) -> Tensor:
        r"""``d lambda_t / dt = -1 / (t (1 - t))``."""
        t = as_float64(t)
        return -1.0 / (t * (1.0 - t))

    def t_of_half_log_snr(self, lam: Tensor | float) -> Tensor:
        r"""``t = sigmoid(-lambda - log(shift))``."""
        return torch.sigmoid(-as_float64(lam) - self._log_shift)
