"""The one engine behind odeint and sdeint: cached plans, batched coefficients, folded conversions, the loop's
contract with user code, and the boundary errors of a solve."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

import deis_ode
from deis_ode import VPODE, SemiLinearODE, VPSchedule
from deis_ode.diffusion import EDMSchedule, FlowSchedule, GaussianMixture, VESchedule, timesteps
from deis_ode.solvers import coefficients, multistep
from deis_ode.solvers.coefficients import step_coefficients

F64 = torch.float64


def _mixture_drift(schedule, prediction="eps", extrapolate="x0"):
    mixture = GaussianMixture.default(dim=2)

    def model(x, t):
        t64 = t.to(F64)
        alpha, sigma = schedule.alpha(t64), schedule.sigma(t64)
        eps = -sigma * mixture.score(x.to(F64), alpha, sigma)
        if prediction == "eps":
            return eps.to(x.dtype)
        x0 = (x.to(F64) - sigma * eps) / alpha
        return x0.to(x.dtype)

    cls = VPODE if isinstance(schedule, VPSchedule) else deis_ode.DiffusionODE
    return cls(model, schedule, prediction=prediction, extrapolate=extrapolate)


SCHEDULES = {
    "diffusers": VPSchedule.diffusers(),
    "linear": VPSchedule.linear(),
    "cosine": VPSchedule.cosine(),
    "ve": VESchedule(),
    "edm": EDMSchedule(),
    "flow": FlowSchedule(),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("basis", ["t", "rho", "logrho"])
@pytest.mark.parametrize("split", ["eps", "x0"])
def test_batched_coefficients_equal_the_single_step_formula(name, basis, split):
    # every update of a plan (warm-up, main, lower-order final) against step_coefficients, one step at a time
    schedule = SCHEDULES[name]
    if split == "eps" and name == "flow":
        pytest.skip("the eps split is singular where alpha = 0")
    ode = _mixture_drift(schedule, extrapolate=split)
    form = ode.exponential_form()
    lo, hi = schedule.time_range
    grid = timesteps(schedule, 9, "uniform", t_start=hi - 1e-3 * (hi - lo), t_end=lo + 1e-3 * (hi - lo))
    multistep.clear_plan_cache()
    plan = multistep.build_plan(form, basis, grid, 4, "lower_order", lower_order_final=True)
    for update in plan.updates():
        transition, weights = step_coefficients(
            form, basis, grid[update.source], grid[update.target], grid[list(update.nodes)]
        )
        assert update.transition == pytest.approx(float(transition), rel=1e-13)
        scale = max(abs(float(w)) for w in weights)
        for got, want in zip(update.weights, weights.tolist(), strict=True):
            assert abs(got - want) <= 1e-12 * scale, (update, got, want)


def test_batched_quadrature_splits_at_the_breakpoints_in_either_direction():
    # a discrete schedule: the t-basis moments of a decreasing step equal minus those of the same step increasing
    form = VPODE(lambda x, t: x, VPSchedule.diffusers(), prediction="eps").exponential_form()
    a = torch.tensor([900.5, 10.25], dtype=F64)
    b = torch.tensor([700.25, 0.0], dtype=F64)
    for t_a, t_b in ((a, b), (b, a)):
        log_m_b = form.log_scale(t_b)
        u_a, h = t_a, t_b - t_a
        m = coefficients.batched_quadrature_moments(form, "t", t_a, t_b, log_m_b, u_a, h, 2)
        for i in range(2):
            # the zeroth moment has a closed form: the DDIM weight -c_b expm1(sign (lambda_a - lambda_b))
            lam_a, lam_b = form.half_log_snr(t_a[i]), form.half_log_snr(t_b[i])
            closed = -torch.exp(form.log_cofactor(t_b[i])) * torch.expm1(form.sign * (lam_a - lam_b))
            assert float(m[i, 0]) == pytest.approx(float(closed), rel=1e-12)


def test_a_repeated_solve_reuses_its_plan_and_an_in_place_change_of_L_does_not():
    lin = -torch.logspace(0, 2, 6, dtype=F64)
    ode = SemiLinearODE(lin.clone(), lambda t, x: torch.cos(t) + 0.1 * x.roll(1, -1))
    x0 = torch.ones(6, dtype=F64)
    t = torch.linspace(0, 1, 21, dtype=F64)
    multistep.clear_plan_cache()
    calls = []
    original = multistep._build_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    multistep._build_plan = counting
    try:
        first = torchdiffeq.odeint(ode, x0, t, method="deis3")
        second = torchdiffeq.odeint(ode, x0, t, method="deis3")
        assert len(calls) == 1
        assert torch.equal(first, second)
        with torch.no_grad():
            ode.linear.mul_(2.0)  # in place: a new version of L, so a new plan
        third = torchdiffeq.odeint(ode, x0, t, method="deis3")
        assert len(calls) == 2
        ref = torchdiffeq.odeint(SemiLinearODE(2.0 * lin, ode.nonlinear), x0, t, method="deis3")
        assert torch.allclose(third, ref, rtol=1e-14, atol=1e-14)
    finally:
        multistep._build_plan = original


def test_a_time_dependent_linear_part_is_never_cached():
    scale = [1.0]
    ode = SemiLinearODE(lambda t: -scale[0] * (1 + t), lambda t, x: torch.sin(t) + 0 * x)
    x0 = torch.zeros(3, dtype=F64)
    t = torch.linspace(0, 1, 11, dtype=F64)
    a = torchdiffeq.odeint(ode, x0, t, method="deis2")
    scale[0] = 3.0
    b = torchdiffeq.odeint(ode, x0, t, method="deis2")
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("split", ["eps", "x0"])
def test_the_folded_conversion_equals_the_converted_nonlinear_part(prediction, split):
    # the loop stores y + r x and the plan carries c: the same solve as converting every output to N first
    schedule = VPSchedule.linear()
    mixture = GaussianMixture.default(dim=2)

    def model(x, t):
        t64 = t.to(F64)
        alpha, sigma = schedule.alpha(t64), schedule.sigma(t64)
        eps = -sigma * mixture.score(x, alpha, sigma)
        x0 = (x - sigma * eps) / alpha
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        if prediction == "v":
            return alpha * eps - sigma * x0
        return schedule.d_alpha(t64) * x0 + schedule.d_sigma(t64) * eps

    ode = VPODE(model, schedule, prediction=prediction, extrapolate=split)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = timesteps(schedule, 12, t_end=1e-3)
    folded = torchdiffeq.odeint(ode, x, t, method="deis3")
    plain = deis_ode.SemiLinearODE(ode.linear, ode.nonlinear, ode.weight, linear_integral=ode.linear_integral)
    converted = torchdiffeq.odeint(plain, x, t, method="deis3", options={"warmup": "lower_order"})
    assert torch.allclose(folded, converted, rtol=1e-9, atol=1e-9)


def test_nonlinear_part_may_keep_its_input_on_every_path():
    # small states run fused (in-place buffers), large ones unfused: N must never see a tensor the loop overwrites
    for size in (8, 20000):
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def nonlinear(t, x, seen=seen):
            seen.append((x, x.clone()))
            return torch.sin(x) + t

        ode = SemiLinearODE(torch.tensor(-1.0, dtype=F64), nonlinear)
        with torch.no_grad():
            torchdiffeq.odeint(ode, torch.full((size,), 0.1), torch.linspace(0, 1, 12), method="deis3")
        assert len(seen) == 11 + 4  # 10 steps, the last needs none; deis3's full-order warm-up adds (K - 1)^2
        for kept, copy in seen:
            assert torch.equal(kept, copy)


def test_the_loop_never_writes_into_what_N_returned():
    out = torch.full((5,), 0.25, dtype=F64)
    ode = SemiLinearODE(torch.tensor(-2.0, dtype=F64), lambda t, x: out)
    torchdiffeq.odeint(ode, torch.zeros(5, dtype=F64), torch.linspace(0, 1, 9, dtype=F64), method="deis3")
    assert torch.equal(out, torch.full((5,), 0.25, dtype=F64))
    schedule = VPSchedule.diffusers()
    fixed = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    copy = fixed.clone()
    drift = VPODE(lambda x, t: fixed, schedule, prediction="eps", extrapolate="x0")
    torchdiffeq.odeint(drift, torch.randn(4, 3), timesteps(schedule, 10), method="deis3")
    assert torch.equal(fixed, copy)


def test_gradient_with_respect_to_t_raises_a_clear_error():
    ode = SemiLinearODE(torch.tensor(-1.0, dtype=F64), lambda t, x: torch.sin(x))
    t = torch.linspace(0, 1, 5, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad.*t.detach"):
        torchdiffeq.odeint(ode, torch.ones(2, dtype=F64), t, method="deis2")


@pytest.mark.parametrize("bad", [True, 0.0, -1.0, math.nan, "0.1"])
def test_step_size_must_be_a_positive_number(bad):
    ode = SemiLinearODE(torch.tensor(-1.0, dtype=F64), lambda t, x: torch.sin(x))
    with pytest.raises(ValueError, match="step_size must be a positive finite number"):
        torchdiffeq.odeint(
            ode,
            torch.ones(2, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            method="deis2",
            options={"step_size": bad},
        )


def test_nan_in_the_linear_part_is_named():
    lin = torch.tensor([-1.0, math.nan], dtype=F64)
    ode = SemiLinearODE(lin, lambda t, x: torch.sin(x))
    with pytest.raises(ValueError, match="linear part L .* NaN or infinite"):
        torchdiffeq.odeint(ode, torch.ones(2, dtype=F64), torch.linspace(0, 1, 4, dtype=F64), method="deis2")
    ode = SemiLinearODE(lambda t: torch.tensor([-1.0, math.nan], dtype=F64) * (1 + t), lambda t, x: torch.sin(x))
    with pytest.raises(ValueError, match="linear part L"):
        torchdiffeq.odeint(ode, torch.ones(2, dtype=F64), torch.linspace(0, 1, 4, dtype=F64), method="deis2")


def test_a_vector_weight_and_a_misshapen_callable_L_are_named():
    ode = SemiLinearODE(-1.0, lambda t, x: torch.sin(x), weight=lambda t: torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="weight W\\(t\\) must be a scalar"):
        torchdiffeq.odeint(ode, torch.ones(3, dtype=F64), torch.linspace(0, 1, 4, dtype=F64), method="deis2")
    ode = SemiLinearODE(lambda t: -torch.ones(5, dtype=F64), lambda t, x: torch.sin(x))
    with pytest.raises(ValueError, match="L\\(t\\).*shape \\(5,\\).*does not broadcast"):
        torchdiffeq.odeint(ode, torch.ones(3, dtype=F64), torch.linspace(0, 1, 4, dtype=F64), method="deis2")


def test_a_float64_model_output_keeps_a_float32_state_float32_with_or_without_autograd():
    ode = SemiLinearODE(torch.tensor(-1.0, dtype=F64), lambda t, x: torch.sin(x).to(F64))
    x0 = torch.ones(3)
    t = torch.linspace(0, 1, 6)
    assert torchdiffeq.odeint(ode, x0, t, method="deis3").dtype == torch.float32
    assert torchdiffeq.odeint(ode, x0.clone().requires_grad_(), t, method="deis3").dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states_step_in_their_dtype(dtype):
    # the coefficients stay float64 on the host; the steps run in the state's dtype, close to the float64 solve
    ode = SemiLinearODE(-torch.linspace(1, 10, 4, dtype=F64), lambda t, x: torch.cos(x) + t)
    t = torch.linspace(0, 1, 11)
    ref = torchdiffeq.odeint(ode, torch.zeros(4, dtype=F64), t.to(F64), method="deis2")
    out = torchdiffeq.odeint(ode, torch.zeros(4, dtype=dtype), t, method="deis2")
    assert out.dtype == dtype
    assert torch.allclose(out.to(F64), ref, atol=3e-2)


def test_empty_batches_in_odeint_and_sdeint():
    schedule = VPSchedule.linear()
    drift = _mixture_drift(schedule)
    t = timesteps(schedule, 5, t_end=1e-3)
    out = torchdiffeq.odeint(drift, torch.zeros(0, 2, dtype=F64), t, method="deis3")
    assert out.shape == (6, 0, 2)
    out = deis_ode.sdeint(drift.reverse_sde(1.0), torch.zeros(0, 2, dtype=F64), -t, method="deis2")
    assert out.shape == (6, 0, 2)


def test_solves_are_bitwise_reproducible():
    schedule = VPSchedule.diffusers()
    drift = _mixture_drift(schedule)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = timesteps(schedule, 10)
    a = torchdiffeq.odeint(drift, x, t, method="deis3")
    multistep.clear_plan_cache()
    b = torchdiffeq.odeint(drift, x, t, method="deis3")
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(5)
    s1 = deis_ode.sdeint(drift.reverse_sde(1.0), x, -t, method="deis2", generator=gen)
    gen.manual_seed(5)
    s2 = deis_ode.sdeint(drift.reverse_sde(1.0), x, -t, method="deis2", generator=gen)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("method", ["deis1", "deis2", "deis3"])
def test_sdeint_runs_on_every_built_in_schedule(name, method):
    # the reverse SDE's form keeps the schedule's breakpoints (the discrete schedule's quadrature needs them)
    schedule = SCHEDULES[name]
    drift = _mixture_drift(schedule)
    lo, hi = schedule.time_range
    t = timesteps(schedule, 8, "uniform", t_start=hi - 1e-3 * (hi - lo), t_end=lo + 1e-3 * (hi - lo))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * float(schedule.sigma(t[0]))
    out = deis_ode.sdeint(drift.reverse_sde(1.0), x, -t, method=method, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    # eta = 0 is the ODE method of the same name
    ode_out = deis_ode.sdeint(drift.reverse_sde(0.0), x, -t, method=method)
    ref = torchdiffeq.odeint(drift, x, t, method=method, options={"warmup": "lower_order"})
    assert torch.allclose(ode_out, ref, rtol=1e-10, atol=1e-10)


def test_sdeint_rejects_a_generator_that_is_not_one():
    drift = _mixture_drift(VPSchedule.linear())
    t = timesteps(drift.schedule, 4, t_end=1e-3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        deis_ode.sdeint(drift.reverse_sde(1.0), torch.zeros(2, 2, dtype=F64), -t, generator=5)
    with pytest.raises(ValueError, match="dt must be a positive finite number"):
        deis_ode.sdeint(drift.reverse_sde(1.0), torch.zeros(2, 2, dtype=F64), -t, dt=True)


def test_callback_and_progress_options_see_every_step():
    ode = SemiLinearODE(torch.tensor(-1.0, dtype=F64), lambda t, x: torch.sin(x))
    seen = []
    t = torch.linspace(0, 1, 6, dtype=F64)
    torchdiffeq.odeint(
        ode,
        torch.ones(2, dtype=F64),
        t,
        method="deis3",
        options={"callback": lambda n, tn, x: seen.append((n, float(tn), x.clone()))},
    )
    assert [n for n, _, _ in seen] == [0, 1, 2, 3, 4]
    assert [tn for _, tn, _ in seen] == pytest.approx(t[:-1].tolist())
    with pytest.raises(ValueError, match="option callback must be a callable"):
        torchdiffeq.odeint(ode, torch.ones(2, dtype=F64), t, method="deis3", options={"callback": 3})


@pytest.mark.parametrize("split", ["eps", "x0"])
def test_the_no_grad_path_writing_into_the_result_is_bitwise_the_tracked_path(split):
    # grad mode off: states written into the output tensor, y + r x into reused buffers; on: fresh tensors each step
    schedule = VPSchedule.diffusers()
    generator = torch.Generator().manual_seed(2)
    weights = torch.randn(3, 3, generator=generator)

    def model(x, t):
        return torch.tanh(x @ weights) * (1 + t / 1000)

    drift = VPODE(model, schedule, prediction="eps", extrapolate=split)
    x = torch.randn(4000, 3, generator=generator)  # above the fused path's size
    t = timesteps(schedule, 12)
    tracked = torchdiffeq.odeint(drift, x, t, method="deis3")
    with torch.no_grad():
        untracked = torchdiffeq.odeint(drift, x, t, method="deis3")
        ends = torchdiffeq.odeint(drift, x, t[[0, 5, -1]], method="deis3", options={"grid_constructor": lambda *a: t})
    assert torch.equal(tracked, untracked)
    assert torch.equal(ends, untracked[[0, 5, -1]])


@pytest.mark.parametrize("split", ["eps", "x0"])
@pytest.mark.parametrize("method", ["deis3", "ipndm"])
def test_a_diffusion_callback_receives_the_data_prediction(split, method):
    if method == "ipndm" and split == "x0":
        split = "eps"
    schedule = VPSchedule.linear()
    drift = _mixture_drift(schedule, prediction="eps", extrapolate=split)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = timesteps(schedule, 6, t_end=1e-3)
    seen = []
    torchdiffeq.odeint(
        drift, x, t, method=method, options={"callback": lambda n, tn, xn, x0: seen.append((n, tn, xn.clone(), x0))}
    )
    assert [n for n, *_ in seen] == list(range(6))
    for n, tn, xn, x0 in seen:
        assert float(tn) == pytest.approx(float(t[n]))
        assert torch.allclose(x0, drift.predict(tn, xn, "x0"), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [1, 4, 5, 9])
def test_a_large_state_names_the_step_where_N_failed(bad):
    # the unfused loop records the state every K steps; a failure is located by a replay with a record per step
    size = 20000
    ode = SemiLinearODE(
        torch.tensor(-1.0, dtype=F64),
        lambda t, x: torch.where(torch.isclose(t, torch.tensor(bad / 10, dtype=t.dtype)), math.nan, 1.0) + 0 * x,
    )
    t = torch.linspace(0, 1, 11, dtype=F64)
    with torch.no_grad(), pytest.raises(FloatingPointError, match=rf"grid step {bad} \(t = 0\.{bad}"):
        torchdiffeq.odeint(
            ode, torch.zeros(size, dtype=F64), t[[0, -1]], method="deis3", options={"grid_constructor": lambda *a: t}
        )


def test_a_failure_that_a_replay_does_not_reproduce_names_the_window():
    calls = []

    def flaky(t, x):
        calls.append(float(t))
        first = len(calls) == 6
        return torch.full_like(x, math.nan if first else 0.5)

    ode = SemiLinearODE(
        torch.tensor(-1.0, dtype=F64),
        flaky,
    )
    t = torch.linspace(0, 1, 11, dtype=F64)
    with pytest.raises(FloatingPointError, match=r"between grid steps 3 and 6 .*N is not deterministic"):
        torchdiffeq.odeint(ode, torch.zeros(20000, dtype=F64), t, method="deis3", options={"warmup": "lower_order"})


@pytest.mark.parametrize("spacing,n", [("karras", 240), ("logsnr", 480)])
def test_tiny_steps_near_the_end_of_a_discrete_schedule_plan_in_the_t_basis(spacing, n):
    # steps of 1e-3 at t ~ 999 (squaredcos_cap_v2): theta = (tau - t_a) / h is formed without cancellation, so the
    # quadrature converges; the weights of every update sum to the DDIM weight (the Lagrange basis sums to 1)
    schedule = VPSchedule.diffusers("squaredcos_cap_v2")
    form = VPODE(lambda x, t: x, schedule, prediction="eps").exponential_form()
    grid = timesteps(schedule, n, spacing)
    multistep.clear_plan_cache()
    plan = multistep.build_plan(form, "t", grid, 3, "lower_order")
    for update in plan.updates():
        _, ddim = step_coefficients(
            form, "t", grid[update.source], grid[update.target], grid[update.source : update.source + 1]
        )
        assert sum(update.weights) == pytest.approx(float(ddim[0]), rel=1e-10, abs=1e-300)
