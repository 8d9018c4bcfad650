r"""An isotropic Gaussian mixture as a data distribution, and its exact noise-prediction model.

Data ``x_0 ~ sum_k w_k N(mu_k, s_k^2 I)`` noised by ``x_t = alpha x_0 + sigma eps`` has the marginal

    p_t(x) = sum_k w_k N(x; alpha mu_k, v_k I),   v_k = alpha^2 s_k^2 + sigma^2,

whose score is ``grad log p_t(x) = -sum_k r_k(x) (x - alpha mu_k) / v_k`` with the component posterior
``r_k(x) = w_k N(x; alpha mu_k, v_k I) / p_t(x)``. The ideal noise prediction is ``eps(x, t) = -sigma_t score``, so
:class:`GaussianMixtureEps` is an exact "trained model" for tests, demos and benchmarks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .schedules import NoiseSchedule

__all__ = ["GaussianMixture", "GaussianMixtureEps"]

_LOG_2PI = math.log(2.0 * math.pi)


def _normalise(log_joint: Tensor) -> Tensor:
    """``exp(log_joint - logsumexp(log_joint))`` over the last axis (a softmax; ``torch.softmax`` is
    pathologically slow for tiny float64 tensors on some CPU builds)."""
    return torch.exp(log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True))


class GaussianMixture:
    r"""``p_0 = sum_k w_k N(mu_k, s_k^2 I)`` in ``D`` dimensions (float64).

    Args:
        means: ``(K, D)`` component means ``mu_k``.
        stds: ``(K,)`` component standard deviations ``s_k > 0``.
        weights: ``(K,)`` non-negative weights (normalised to sum to one).
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64).to(means.device)
        weights = torch.as_tensor(weights, dtype=torch.float64).to(means.device)
        if means.dim() != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(f"means must have shape (K, D) with K, D >= 1, got {tuple(means.shape)}")
        k = means.shape[0]
        if stds.shape != (k,) or weights.shape != (k,):
            raise ValueError(
                f"stds and weights must have shape ({k},) to match means {tuple(means.shape)}, "
                f"got {tuple(stds.shape)} and {tuple(weights.shape)}"
            )
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        if not bool(((stds > 0) & torch.isfinite(stds)).all()):
            raise ValueError(f"stds must be finite and > 0, got {stds.tolist()}")
        if not bool(((weights >= 0) & torch.isfinite(weights)).all()) or float(weights.sum()) <= 0.0:
            raise ValueError(f"weights must be finite, >= 0 and not all zero, got {weights.tolist()}")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    @classmethod
    def default(
        cls,
        dim: int = 8,
        n_modes: int = 5,
        radius: float = 3.0,
        std_range: tuple[float, float] = (0.3, 0.5),
        seed: int = 0,
    ) -> GaussianMixture:
        """A small fixed mixture of narrow, well separated modes shared by demos, tests and benchmarks.

        The means are ``radius`` times unit vectors drawn from a generator seeded with ``seed`` (so the same
        arguments always give the same mixture), the standard deviations are spaced evenly over ``std_range`` and
        the weights are proportional to ``1, 1.25, 1.5, ...`` (unequal, so that mode-weight errors are visible).
        """
        if dim < 1 or n_modes < 1:
            raise ValueError(f"dim and n_modes must be >= 1, got dim={dim}, n_modes={n_modes}")
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(n_modes, dim, generator=generator, dtype=torch.float64)
        means = radius * directions / directions.norm(dim=1, keepdim=True)
        stds = torch.linspace(std_range[0], std_range[1], n_modes, dtype=torch.float64)
        weights = 1.0 + 0.25 * torch.arange(n_modes, dtype=torch.float64)
        return cls(means, stds, weights)

    def __repr__(self) -> str:
        k, d = self.means.shape
        return f"GaussianMixture(K={k}, D={d})"

    @property
    def dim(self) -> int:
        """The dimension ``D``."""
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        """The number of components ``K``."""
        return self.means.shape[0]

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(means, stds, log weights) on ``device``, cached."""
        if device not in self._cache:
            self._cache[device] = (self.means.to(device), self.stds.to(device), torch.log(self.weights).to(device))
        return self._cache[device]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples of ``p_0`` (float64, ``(n, D)``) and their component labels (int64, ``(n,)``), on the CPU
        (or on ``generator``'s device)."""
        device = generator.device if generator is not None else torch.device("cpu")
        means, stds, _ = self._on(device)
        labels = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)
        return means[labels] + stds[labels, None] * noise, labels

    def _log_joint(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        r"""``log w_k + log N(x; alpha mu_k, v_k I)`` (``(..., K)``), ``x - alpha mu_k`` (``(..., K, D)``), ``v_k``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension D={self.dim}, got shape {tuple(x.shape)}")
        x = x.to(torch.float64)
        means, stds, log_w = self._on(x.device)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).to(x.device)[..., None]  # (..., 1) over components
        sigma = torch.as_tensor(sigma, dtype=torch.float64).to(x.device)[..., None]
        var = alpha * alpha * stds * stds + sigma * sigma  # (..., K)
        diff = x[..., None, :] - alpha[..., None] * means  # (..., K, D)
        sq = (diff * diff).sum(-1)
        log_joint = log_w - 0.5 * (self.dim * (_LOG_2PI + torch.log(var)) + sq / var)
        return log_joint, diff, var

    def marginal_log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        r"""``log p_t(x) = logsumexp_k [log w_k + log N(x; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)]``.

        ``x`` has shape ``(..., D)``; ``alpha``, ``sigma`` are numbers or tensors broadcastable to ``x.shape[:-1]``.
        Returns float64 of the broadcast batch shape.
        """
        log_joint, _, _ = self._log_joint(x, alpha, sigma)
        return torch.logsumexp(log_joint, dim=-1)

    def component_posterior(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        r"""``r_k(x) = P(component k | x_t = x)``, float64 of shape ``(..., K)``."""
        log_joint, _, _ = self._log_joint(x, alpha, sigma)
        return _normalise(log_joint)

    def score(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        r"""``grad_x log p_t(x) = -sum_k r_k(x) (x - alpha mu_k) / v_k``, float64 of ``x``'s (broadcast) shape."""
        log_joint, diff, var = self._log_joint(x, alpha, sigma)
        resp = _normalise(log_joint)
        return -((resp / var)[..., None] * diff).sum(-2)

    def classify(self, x0: Tensor) -> Tensor:
        """The most probable component of each clean sample ``x0`` (``(..., D)`` -> int64 ``(...)``)."""
        log_joint, _, _ = self._log_joint(x0, 1.0, 0.0)
        return log_joint.argmax(dim=-1)


class GaussianMixtureEps(nn.Module):
    r"""The exact noise prediction of a :class:`GaussianMixture` under a schedule: ``eps(x, t) = -sigma_t score``.

    ``forward(x, t)``: ``x`` of shape ``(..., D)``; ``t`` a 0-dim time or a tensor of times broadcastable to
    ``x.shape[:-1]``. Computed in float64 (log-sum-exp over components), returned in ``x``'s dtype.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule) -> None:
        super().__init__()
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.mixture = mixture
        self.schedule = schedule

    def extra_repr(self) -> str:
        return f"mixture={self.mixture!r}, schedule={self.schedule!r}"

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).to(x.device)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        eps = -sigma[..., None] * self.mixture.score(x, alpha, sigma)
        return eps.to(x.dtype)
