"""The probability-flow drift objects: the drift itself, its two splits, DDIM, and convergence of deis1..4."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import deis_ode  # noqa: F401  (registers the deis* methods)
from deis_ode.diffusion import (
    PREDICTION_TYPES,
    VEODE,
    VPODE,
    DiffusionODE,
    GaussianMixture,
    GaussianMixtureEps,
    VESchedule,
    VPSchedule,
)
from deis_ode.forms import DiffusionForm

F64 = torch.float64
BETA_MIN, BETA_MAX = 0.1, 20.0
SMIN, SMAX = 0.02, 30.0


# ---------------------------------------------------------------------------------------------------------------
# The schedules written out independently from their definitions (math module, not the library).


def vp_terms(t: float) -> dict[str, float]:
    """VP-linear: beta(t), alpha, sigma and their time derivatives."""
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    integral = BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t * t  # int_0^t beta
    alpha = math.exp(-0.5 * integral)
    sigma = math.sqrt(-math.expm1(-integral))
    d_alpha = -0.5 * beta * alpha
    d_sigma = alpha * alpha * beta / (2.0 * sigma)  # d sigma^2/dt = -d alpha^2/dt = alpha^2 beta
    return {"beta": beta, "alpha": alpha, "sigma": sigma, "d_alpha": d_alpha, "d_sigma": d_sigma}


def ve_terms(t: float) -> dict[str, float]:
    sigma = SMIN * (SMAX / SMIN) ** t
    return {"alpha": 1.0, "sigma": sigma, "d_alpha": 0.0, "d_sigma": sigma * math.log(SMAX / SMIN)}


TERMS = {"vp": vp_terms, "ve": ve_terms}


def make_schedule(kind: str):
    return VPSchedule.linear(BETA_MIN, BETA_MAX) if kind == "vp" else VESchedule(SMIN, SMAX)


class MixtureModel(nn.Module):
    """A model of any prediction type, built from the exact mixture score by each type's definition."""

    def __init__(self, mixture: GaussianMixture, kind: str, prediction: str) -> None:
        super().__init__()
        self.mixture, self.kind, self.prediction = mixture, kind, prediction
        self.calls: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls.append(t)
        c = TERMS[self.kind](float(t))
        score = self.mixture.score(x, c["alpha"], c["sigma"])
        eps = -c["sigma"] * score
        x0 = (x + c["sigma"] ** 2 * score) / c["alpha"]  # Tweedie: E[x0 | x_t]
        out = {
            "eps": eps,
            "x0": x0,
            "score": score,
            "v": c["alpha"] * eps - c["sigma"] * x0,
            "flow": c["d_alpha"] * x0 + c["d_sigma"] * eps,
        }[self.prediction]
        return out.to(x.dtype)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.default()


@pytest.fixture(scope="module")
def states(mixture: GaussianMixture) -> Tensor:
    return 1.5 * torch.randn(6, mixture.dim, generator=torch.Generator().manual_seed(11), dtype=F64)


def make_ode(kind: str, model, prediction: str = "eps", extrapolate: str = "eps") -> DiffusionODE:
    cls = VPODE if kind == "vp" else VEODE
    return cls(model, make_schedule(kind), prediction=prediction, extrapolate=extrapolate)


# ---------------------------------------------------------------------------------------------------------------
# (a), (b): the drift


@pytest.mark.parametrize("extrapolate", ["eps", "x0"])
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_vp_drift_is_probability_flow(mixture, states, prediction: str, extrapolate: str) -> None:
    ode = make_ode("vp", MixtureModel(mixture, "vp", prediction), prediction, extrapolate)
    for t in [1e-3, 0.05, 0.3, 0.7, 1.0]:
        c = vp_terms(t)
        score = mixture.score(states, c["alpha"], c["sigma"])
        # Song et al.: dx/dt = f x - g^2 score / 2 with f = -beta / 2, g^2 = beta.
        expected = -0.5 * c["beta"] * (states + score)
        # The general form: d log alpha/dt x - (d sigma^2/dt - 2 d log alpha/dt sigma^2) / 2 score.
        d_log_alpha = c["d_alpha"] / c["alpha"]
        d_sigma2 = 2.0 * c["sigma"] * c["d_sigma"]
        general = d_log_alpha * states - 0.5 * (d_sigma2 - 2.0 * d_log_alpha * c["sigma"] ** 2) * score
        torch.testing.assert_close(general, expected, rtol=1e-12, atol=1e-12)
        got = ode(torch.tensor(t, dtype=F64), states)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=f"t={t}")


@pytest.mark.parametrize("extrapolate", ["eps", "x0"])
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_ve_drift_is_probability_flow(mixture, states, prediction: str, extrapolate: str) -> None:
    ode = make_ode("ve", MixtureModel(mixture, "ve", prediction), prediction, extrapolate)
    for t in [0.0, 0.2, 0.6, 1.0]:
        c = ve_terms(t)
        score = mixture.score(states, 1.0, c["sigma"])
        expected = -c["sigma"] * c["d_sigma"] * score  # f = 0, g^2 = d sigma^2 / dt
        got = ode(torch.tensor(t, dtype=F64), states)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=f"t={t}")


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_eps_and_x0_splits(mixture, states, kind: str) -> None:
    model = GaussianMixtureEps(mixture, make_schedule(kind))
    eps_ode, x0_ode = make_ode(kind, model, "eps", "eps"), make_ode(kind, model, "eps", "x0")
    for t in [1e-3, 0.1, 0.5, 1.0]:
        tt = torch.tensor(t, dtype=F64)
        torch.testing.assert_close(eps_ode(tt, states), x0_ode(tt, states), rtol=1e-12, atol=1e-12)
        c = TERMS[kind](t)
        a, s, da, ds = c["alpha"], c["sigma"], c["d_alpha"], c["d_sigma"]
        d_rho = (ds * a - s * da) / a**2  # rho = sigma / alpha
        d_lam = da / a - ds / s  # lambda = log(alpha / sigma)
        for ode, linear, weight in [(eps_ode, da / a, a * d_rho), (x0_ode, ds / s, a * d_lam)]:
            assert float(ode.linear_part(tt)) == pytest.approx(linear, rel=1e-13, abs=1e-15)
            assert float(ode.weight_part(tt)) == pytest.approx(weight, rel=1e-12)
        # the exact integral of L: log m(t) - log m(s)
        s_time = torch.tensor(0.9, dtype=F64)
        c9 = TERMS[kind](0.9)
        integral_eps = eps_ode.linear_integral(tt, s_time)
        integral_x0 = x0_ode.linear_integral(tt, s_time)
        assert float(integral_eps) == pytest.approx(math.log(a / c9["alpha"]), rel=1e-13, abs=1e-15)
        assert float(integral_x0) == pytest.approx(math.log(s / c9["sigma"]), rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("extrapolate", ["eps", "x0"])
def test_exponential_form(mixture, extrapolate: str) -> None:
    schedule = VPSchedule.linear(BETA_MIN, BETA_MAX)
    ode = VPODE(GaussianMixtureEps(mixture, schedule), schedule, extrapolate=extrapolate)
    form = ode.exponential_form()
    assert isinstance(form, DiffusionForm)
    assert form.sign == (-1 if extrapolate == "eps" else 1)
    assert form.time_range == (0.0, 1.0)
    t = torch.tensor([0.01, 0.2, 0.5, 0.9, 1.0], dtype=F64, requires_grad=True)
    lam = torch.tensor([math.log(vp_terms(v)["alpha"] / vp_terms(v)["sigma"]) for v in t.tolist()], dtype=F64)
    torch.testing.assert_close(form.half_log_snr(t.detach()), lam, rtol=1e-13, atol=1e-13)
    # c = m exp(sign lambda)
    torch.testing.assert_close(
        form.log_cofactor(t.detach()), form.log_scale(t.detach()) + form.sign * lam, rtol=1e-13, atol=1e-13
    )
    # Phi(t, tau) W(tau) dtau = m(t) d[exp(sign lambda(tau))]:  W(tau) / m(tau) = d/dtau exp(sign lambda(tau))
    (d_clock,) = torch.autograd.grad(torch.exp(form.sign * form.half_log_snr(t)).sum(), t)
    weight = torch.stack([torch.as_tensor(ode.weight_part(v)) for v in t.detach()])
    torch.testing.assert_close(weight / torch.exp(form.log_scale(t.detach())), d_clock, rtol=1e-12, atol=0)
    torch.testing.assert_close(form.d_half_log_snr(t.detach()), schedule.d_half_log_snr(t.detach()))
    # the linear part is d log m / dt
    (d_log_scale,) = torch.autograd.grad(form.log_scale(t).sum(), t)
    linear = torch.stack([torch.as_tensor(ode.linear_part(v)) for v in t.detach()])
    torch.testing.assert_close(linear, d_log_scale, rtol=1e-12, atol=0)


def test_model_contract_dtype_and_registration(mixture) -> None:
    schedule = VPSchedule.linear()
    model = MixtureModel(mixture, "vp", "eps")
    model.scale = nn.Parameter(torch.ones(()))
    ode = VPODE(model, schedule)
    assert ode.model is model and ode.schedule is schedule
    assert (ode.prediction, ode.extrapolate) == ("eps", "x0")  # the x0 split is the default (docs/diffusion.md)
    assert ode.default_warmup == "lower_order" and VPODE.default_warmup == "lower_order"
    assert any(p is model.scale for p in ode.parameters())
    x32 = torch.randn(3, mixture.dim, dtype=torch.float32)
    out = ode(torch.tensor(0.5, dtype=torch.float32), x32)
    assert out.dtype == torch.float32 and out.shape == x32.shape
    t_seen = model.calls[-1]
    assert t_seen.dim() == 0 and t_seen.dtype == torch.float32 and t_seen.device == x32.device
    assert float(t_seen) == 0.5
    # a float64 time and a float32 state: the model still sees the state's dtype
    ode(torch.tensor(0.25, dtype=F64), x32)
    assert model.calls[-1].dtype == torch.float32 and model.calls[-1].dim() == 0
    # L and W follow the dtype of the t they are given
    for t in [torch.tensor(0.3, dtype=torch.float32), torch.tensor(0.3, dtype=F64)]:
        assert ode.linear_part(t).dtype == t.dtype and ode.weight_part(t).dtype == t.dtype
    # evaluations can be counted by wrapping ode.nonlinear
    count = 0
    inner = ode.nonlinear

    def counting(t: Tensor, x: Tensor) -> Tensor:
        nonlocal count
        count += 1
        return inner(t, x)

    ode.nonlinear = counting
    ode(torch.tensor(0.5, dtype=F64), x32.double())
    assert count == 1


def test_errors(mixture) -> None:
    vp, ve = VPSchedule.linear(), VESchedule(0.01, 50.0)
    model = GaussianMixtureEps(mixture, vp)
    with pytest.raises(TypeError, match="VPSchedule"):
        VPODE(model, ve)
    with pytest.raises(TypeError, match="VESchedule"):
        VEODE(model, vp)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        DiffusionODE(model, "vp")
    with pytest.raises(TypeError, match="callable"):
        VPODE(3, vp)
    with pytest.raises(ValueError, match="'eps', 'x0', 'v', 'score', 'flow'"):
        VPODE(model, vp, prediction="sample")
    with pytest.raises(ValueError, match="extrapolate"):
        VPODE(model, vp, extrapolate="v")
    bad = VPODE(lambda x, t: x[..., :2], vp)
    with pytest.raises(ValueError, match=r"model\(x, t\) returned \(4, 2\)"):
        bad(torch.tensor(0.5, dtype=F64), torch.zeros(4, 8, dtype=F64))


def test_dopri5_integrates_the_drift(mixture, states) -> None:
    schedule = VPSchedule.linear()
    ode = VPODE(GaussianMixtureEps(mixture, schedule), schedule)
    t = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    ref = deis_ode.reference.solve(ode, states, t).states
    out = torchdiffeq.odeint(ode, states, t, method="dopri5", rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# (c): deis1 is DDIM


def ddim(model, schedule, x: Tensor, times: list[float]) -> Tensor:
    """x_s = alpha_s / alpha_t x_t + (sigma_s - alpha_s sigma_t / alpha_t) eps(x_t, t), from VP-linear formulas."""
    for t, s in zip(times[:-1], times[1:], strict=True):
        ct, cs = vp_terms(t), vp_terms(s)
        eps = model(x, torch.tensor(t, dtype=x.dtype))
        x = cs["alpha"] / ct["alpha"] * x + (cs["sigma"] - cs["alpha"] * ct["sigma"] / ct["alpha"]) * eps
    return x


@pytest.mark.parametrize("basis", ["t", "rho", "logrho"])
@pytest.mark.parametrize("extrapolate", ["eps", "x0"])
def test_deis1_is_ddim(mixture, states, extrapolate: str, basis: str) -> None:
    schedule = VPSchedule.linear(BETA_MIN, BETA_MAX)
    model = GaussianMixtureEps(mixture, schedule)
    ode = VPODE(model, schedule, extrapolate=extrapolate)
    options = {"basis": basis}
    for t, s in [(1.0, 0.5), (0.5, 1e-3), (1.0, 1e-3), (0.3, 0.29)]:
        grid = torch.tensor([t, s], dtype=F64)
        out = torchdiffeq.odeint(ode, states, grid, method="deis1", options=options)
        assert out.shape == (2, *states.shape)
        torch.testing.assert_close(out[0], states, rtol=0, atol=0)
        # Round-off relative to the terms combined: alpha_s / alpha_t x_t reaches ~150 |x_t| from t = 1 to 1e-3.
        # 1e-14 of it also admits coefficients computed by quadrature to the design's 1e-14 relative accuracy.
        ct, cs = vp_terms(t), vp_terms(s)
        tol = 1e-14 * (1.0 + cs["alpha"] / ct["alpha"]) * float(states.abs().max())
        torch.testing.assert_close(out[1], ddim(model, schedule, states, [t, s]), rtol=0, atol=tol)
    # several steps: deis1 is iterated DDIM
    times = [1.0, 0.8, 0.5, 0.2, 0.05, 1e-3]
    out = torchdiffeq.odeint(ode, states, torch.tensor(times, dtype=F64), method="deis1", options=options)
    tol = 1e-14 * (1.0 + vp_terms(1e-3)["alpha"] / vp_terms(1.0)["alpha"]) * float(states.abs().max())
    torch.testing.assert_close(out[-1], ddim(model, schedule, states, times), rtol=0, atol=tol)


def test_deis1_is_ddim_in_float32(mixture, states) -> None:
    schedule = VPSchedule.linear(BETA_MIN, BETA_MAX)
    model = GaussianMixtureEps(mixture, schedule)
    times = [1.0, 0.6, 0.2, 1e-3]
    out = torchdiffeq.odeint(VPODE(model, schedule), states.float(), torch.tensor(times), method="deis1")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[-1], ddim(model, schedule, states, times).float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# (d): observed order of deis1..4 against a scipy DOP853 reference
#
# On uniform grids in t the VP drift near small t behaves like a function of sqrt(t) (sigma ~ sqrt(beta_min t)),
# so the asymptotic regime needs steps h << t_end. Ending at t = 1e-3 that holds for the rho basis (the clock of
# the exact ODE d(x/alpha)/d rho = eps) from ~250 steps; the t and logrho bases only get there beyond ~1e4 steps,
# so they are checked on [1, 0.1], where 200 -> 400 steps is asymptotic (observed slopes within 0.1 of K).
# Errors range over ~1e-8 .. 1e-2.

CONVERGENCE_CASES = [
    # (split, t_end, basis, (N1, N2)); the x0 split's rho basis is checked on [1, 0.1] too (to 1e-3 it is still
    # pre-asymptotic at 500 steps: slope 3.5 for deis4)
    ("eps", 1e-3, "rho", (250, 500)),
    ("eps", 0.1, "t", (200, 400)),
    ("eps", 0.1, "logrho", (200, 400)),
    ("x0", 0.1, "rho", (200, 400)),
    ("x0", 0.1, "t", (200, 400)),
    ("x0", 0.1, "logrho", (200, 400)),
]


@pytest.fixture(scope="module")
def convergence_setup(mixture):
    schedule = VPSchedule.linear(BETA_MIN, BETA_MAX)
    odes = {split: VPODE(GaussianMixtureEps(mixture, schedule), schedule, extrapolate=split) for split in ("eps", "x0")}
    x_T = torch.randn(4, mixture.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    refs = {}
    for t_end in {case[1] for case in CONVERGENCE_CASES}:
        ref = deis_ode.reference.solve(odes["eps"], x_T, torch.tensor([1.0, t_end], dtype=F64), rtol=1e-12, atol=1e-12)
        refs[t_end] = ref.states[-1]
    return odes, x_T, refs


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize(("split", "t_end", "basis", "steps"), CONVERGENCE_CASES)
def test_observed_order(convergence_setup, split, t_end: float, basis: str, steps: tuple[int, int], order: int) -> None:
    odes, x_T, refs = convergence_setup
    errors = []
    for n in steps:
        grid = torch.linspace(1.0, t_end, n + 1, dtype=F64)
        out = torchdiffeq.odeint(
            odes[split], x_T, grid, method=f"deis{order}", options={"warmup": "full_order", "basis": basis}
        )
        errors.append(float((out[-1] - refs[t_end]).abs().max()))
    assert min(errors) > 1e-9, f"errors {errors} too close to the reference's accuracy"
    slope = math.log(errors[0] / errors[1]) / math.log(steps[1] / steps[0])
    assert abs(slope - order) < 0.2, f"deis{order} {split}, {basis}, t_end {t_end}: errors {errors}, slope {slope:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# clear errors at the boundary of a diffusion solve


def _drift(model):
    return VPODE(model, VPSchedule.linear())


def test_sampling_outside_the_schedules_range_names_the_time():
    ode = _drift(lambda x, t: torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"t = 1\.5 is outside"):
        torchdiffeq.odeint(ode, torch.ones(2, 3), torch.tensor([1.5, 0.5], dtype=F64), method="deis2")


def test_a_model_output_of_the_wrong_shape_is_named():
    ode = _drift(lambda x, t: torch.zeros(x.shape[0]))
    with pytest.raises(ValueError, match="shape"):
        torchdiffeq.odeint(ode, torch.ones(2, 3), torch.tensor([1.0, 0.5], dtype=F64), method="deis2")


def test_nan_from_the_model_names_step_and_time():
    ode = _drift(lambda x, t: torch.where(t < 0.55, torch.full_like(x, float("nan")), torch.zeros_like(x)))
    with pytest.raises(FloatingPointError, match=r"grid step 2 \(t = 0\.5"):
        torchdiffeq.odeint(ode, torch.ones(2, 3), torch.linspace(1.0, 0.25, 4, dtype=F64), method="deis3")
