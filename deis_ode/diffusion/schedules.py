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

import torch
from torch import Tensor

__all__ = ["LinearVPSchedule", "NoiseSchedule", "VESchedule", "VPSchedule"]

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

    Construct one with :meth:`VPSchedule.linear`.
    """

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> LinearVPSchedule:
        """The continuous linear-beta schedule of score SDEs (``beta(t) = beta_min + t (beta_max - beta_min)``)."""
        return LinearVPSchedule(beta_min, beta_max)

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

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LinearVPSchedule):
            return NotImplemented
        return (self.beta_min, self.beta_max) == (other.beta_min, other.beta_max)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.beta_min, self.beta_max))

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

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VESchedule):
            return NotImplemented
        return (self.sigma_min, self.sigma_max) == (other.sigma_min, other.sigma_max)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.sigma_min, self.sigma_max))

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
