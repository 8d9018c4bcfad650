"""The Gaussian-mixture data distribution and its exact noise model."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import multivariate_normal

from deis_ode.diffusion import GaussianMixture, GaussianMixtureEps, VESchedule, VPSchedule

F64 = torch.float64


def _small_mixture() -> GaussianMixture:
    means = torch.tensor([[0.0, 1.0, -1.0], [2.0, -0.5, 0.3], [-1.5, -1.0, 1.0]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.3, 0.5, 0.8], dtype=F64), torch.tensor([1.0, 2.0, 1.0], dtype=F64))


@pytest.mark.parametrize(("alpha", "sigma"), [(1.0, 0.0), (0.9, 0.3), (0.2, 0.98), (1.0, 5.0), (0.01, 1.0)])
def test_marginal_log_prob_against_scipy(alpha: float, sigma: float) -> None:
    mix = _small_mixture()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = 0.0
    for k in range(3):
        var = alpha**2 * float(mix.stds[k]) ** 2 + sigma**2
        dist = multivariate_normal(mean=(alpha * mix.means[k]).numpy(), cov=var * torch.eye(3, dtype=F64).numpy())
        expected = expected + float(mix.weights[k]) * dist.pdf(x.numpy())
    got = mix.marginal_log_prob(x, alpha, sigma)
    torch.testing.assert_close(got, torch.log(torch.as_tensor(expected)), rtol=1e-12, atol=1e-12)
    # weights are normalised
    torch.testing.assert_close(mix.weights, torch.tensor([0.25, 0.5, 0.25], dtype=F64))


@pytest.mark.parametrize(("alpha", "sigma"), [(1.0, 0.0), (0.9, 0.3), (0.2, 0.98), (0.05, 1.0)])
def test_score_is_gradient_of_marginal_log_prob(alpha: float, sigma: float) -> None:
    mix = GaussianMixture.default()
    x = (2.0 * torch.randn(16, mix.dim, generator=torch.Generator().manual_seed(2), dtype=F64)).requires_grad_()
    (grad,) = torch.autograd.grad(mix.marginal_log_prob(x, alpha, sigma).sum(), x)
    torch.testing.assert_close(mix.score(x.detach(), alpha, sigma), grad, rtol=1e-11, atol=1e-11)


def test_per_sample_alpha_sigma() -> None:
    mix = _small_mixture()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    alpha = torch.tensor([1.0, 0.8, 0.5, 0.1], dtype=F64)
    sigma = torch.sqrt(1 - alpha**2)
    batched = mix.score(x, alpha, sigma)
    rows = torch.stack([mix.score(x[i], float(alpha[i]), float(sigma[i])) for i in range(4)])
    torch.testing.assert_close(batched, rows, rtol=1e-14, atol=1e-14)


def test_component_posterior_is_bayes_rule() -> None:
    mix = _small_mixture()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    alpha, sigma = 0.7, 0.6
    joint = []
    for k in range(3):
        var = alpha**2 * float(mix.stds[k]) ** 2 + sigma**2
        sq = ((x - alpha * mix.means[k]) ** 2).sum(-1)
        joint.append(float(mix.weights[k]) * torch.exp(-0.5 * sq / var) / (2 * math.pi * var) ** 1.5)
    joint = torch.stack(joint, dim=-1)
    torch.testing.assert_close(mix.component_posterior(x, alpha, sigma), joint / joint.sum(-1, keepdim=True))


@pytest.mark.parametrize("schedule", [VPSchedule.linear(), VESchedule(0.01, 50.0)])
def test_single_component_eps_closed_form(schedule) -> None:
    # One component N(mu, s^2 I): x_t ~ N(alpha mu, (alpha^2 s^2 + sigma^2) I), eps = sigma (x - alpha mu) / v.
    mu = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=F64)
    s = 0.4
    mix = GaussianMixture(mu, torch.tensor([s], dtype=F64), torch.tensor([3.0], dtype=F64))
    model = GaussianMixtureEps(mix, schedule)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    for t in [1e-3, 0.1, 0.5, 0.9, 1.0]:
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        v = alpha**2 * s**2 + sigma**2
        expected = sigma * (x - alpha * mu) / v
        torch.testing.assert_close(model(x, torch.tensor(t, dtype=F64)), expected, rtol=1e-13, atol=1e-14)


def test_eps_model_batched_t_dtype_and_stability() -> None:
    mix = GaussianMixture.default()
    schedule = VPSchedule.linear()
    model = GaussianMixtureEps(mix, schedule)
    x = torch.randn(5, mix.dim, generator=torch.Generator().manual_seed(6), dtype=F64)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 1.0], dtype=F64)
    batched = model(x, t)
    rows = torch.cat([model(x[i : i + 1], t[i]) for i in range(5)])
    torch.testing.assert_close(batched, rows, rtol=1e-14, atol=1e-14)
    out32 = model(x.float(), torch.tensor(0.5))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, model(x, torch.tensor(0.5, dtype=F64)).float())
    # far from every mode the log-sum-exp keeps the result finite (a naive sum of densities underflows to 0/0)
    far = torch.full((2, mix.dim), 1e3, dtype=F64)
    assert bool(torch.isfinite(model(far, torch.tensor(1e-3, dtype=F64))).all())
    assert isinstance(model, torch.nn.Module)


def test_default_mixture_sample_and_classify() -> None:
    mix = GaussianMixture.default()
    again = GaussianMixture.default()
    assert torch.equal(mix.means, again.means) and torch.equal(mix.weights, again.weights)
    assert mix.dim == 8 and 4 <= mix.n_components <= 6
    assert bool(((mix.stds >= 0.3) & (mix.stds <= 0.5)).all())
    n = 20000
    x0, labels = mix.sample(n, generator=torch.Generator().manual_seed(7))
    assert x0.shape == (n, 8) and x0.dtype == F64 and labels.shape == (n,) and labels.dtype == torch.int64
    # component frequencies match the weights (5 standard errors)
    freq = torch.bincount(labels, minlength=mix.n_components).to(F64) / n
    stderr = torch.sqrt(mix.weights * (1 - mix.weights) / n)
    assert bool((torch.abs(freq - mix.weights) < 5 * stderr).all())
    # within-component moments
    k = 0
    members = x0[labels == k]
    torch.testing.assert_close(
        members.mean(0), mix.means[k], rtol=0, atol=6 * float(mix.stds[k]) / members.shape[0] ** 0.5
    )
    # the modes are narrow and well separated: classify recovers the labels
    assert float((mix.classify(x0) == labels).to(F64).mean()) > 0.999
    # same seed, same samples
    x0b, labels_b = mix.sample(n, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x0, x0b) and torch.equal(labels, labels_b)


def test_validation() -> None:
    means = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3, dtype=F64), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="stds and weights"):
        GaussianMixture(means, torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(means, torch.tensor([1.0, 0.0]), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(means, torch.ones(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="last dimension"):
        GaussianMixture(means, torch.ones(2), torch.ones(2)).score(torch.zeros(4, 2), 1.0, 0.5)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        GaussianMixtureEps(GaussianMixture.default(), "vp")
