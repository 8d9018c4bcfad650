"""The diffusers-compatible scheduler: contract, state semantics, fixed faults of diffusers' DEIS, opt-in options.

Parity over the configuration grid is in ``test_scheduler_parity.py``; a whole pipeline in
``test_scheduler_pipeline.py``.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from _subprocess import run_python

diffusers = pytest.importorskip("diffusers")

import deis_ode  # noqa: E402
from deis_ode.scheduler import DEISMultistepScheduler  # noqa: E402

F64 = torch.float64
SHAPE = (2, 3, 8, 8)


def _inputs(steps: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator, dtype=F64).to(dtype)
    outputs = [torch.randn(SHAPE, generator=generator, dtype=F64).to(dtype) for _ in range(steps)]
    return x, outputs


def _sample(scheduler, x, outputs, begin=None, on_step=None):
    """Drive ``scheduler`` over its timesteps (from ``begin``) with the given model outputs; all states."""
    timesteps = scheduler.timesteps
    if begin is not None:
        scheduler.set_begin_index(begin)
        timesteps = timesteps[begin:]
    states = []
    for n, t in enumerate(timesteps):
        if on_step is not None:
            on_step(n, scheduler)
        x = scheduler.step(outputs[n], t, x).prev_sample
        states.append(x)
    return states


def _close(a, b, tol):
    for x, y in zip(a, b, strict=True):
        assert float((x - y).abs().max()) <= tol * float(y.abs().max()), float((x - y).abs().max() / y.abs().max())


# --- import and package ----------------------------------------------------------------------------------------------


def test_lazy_export():
    assert deis_ode.DEISMultistepScheduler is DEISMultistepScheduler
    assert "DEISMultistepScheduler" not in deis_ode.__all__  # `from deis_ode import *` must not need diffusers
    with pytest.raises(AttributeError):
        deis_ode.NoSuchName  # noqa: B018


def test_import_error_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import deis_ode\n"
        "try:\n"
        "    deis_ode.DEISMultistepScheduler\n"
        "except ImportError as error:\n"
        "    print('IMPORT-ERROR', error)\n"
    )
    result = run_python("-c", code, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR" in result.stdout and "pip install deis_ode[diffusers]" in result.stdout


# --- configuration ---------------------------------------------------------------------------------------------------


def test_every_diffusers_parameter_with_its_default():
    theirs = inspect.signature(diffusers.DEISMultistepScheduler.__init__).parameters
    ours = inspect.signature(DEISMultistepScheduler.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name
    assert set(ours) - set(theirs) == {"final_sigmas_type", "basis", "check_finite"}
    assert DEISMultistepScheduler._compatibles == diffusers.DEISMultistepScheduler._compatibles
    assert DEISMultistepScheduler.order == 1


def test_save_load_and_from_config_round_trips(tmp_path):
    ours = DEISMultistepScheduler(solver_order=3, use_karras_sigmas=True, final_sigmas_type="zero", basis="rho")
    ours.save_pretrained(tmp_path)

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    loaded = DEISMultistepScheduler.from_pretrained(tmp_path)
    assert public(loaded.config) == public(ours.config)
    assert public(DEISMultistepScheduler.from_config(ours.config).config) == public(ours.config)
    # to and from diffusers' own schedulers
    theirs = diffusers.DEISMultistepScheduler(solver_order=3, prediction_type="v_prediction")
    swapped = DEISMultistepScheduler.from_config(theirs.config)
    assert swapped.config.solver_order == 3 and swapped.config.prediction_type == "v_prediction"
    assert swapped.config.final_sigmas_type is None and swapped.config.basis == "logrho"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = diffusers.DEISMultistepScheduler.from_config(ours.config)
    assert back.config.solver_order == 3 and back.config.use_karras_sigmas
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler):
        other = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        swapped = DEISMultistepScheduler.from_config(other.config)
        assert swapped.config.beta_schedule == "scaled_linear" and swapped.config.beta_end == 0.012
        cls.from_config(swapped.config)


def test_diffusers_aliases_and_rejections():
    assert DEISMultistepScheduler(algorithm_type="dpmsolver++").config.algorithm_type == "deis"
    assert DEISMultistepScheduler(solver_type="midpoint").config.solver_type == "logrho"
    for kwargs in [
        {"algorithm_type": "unipc"},
        {"solver_type": "rho"},
        {"beta_schedule": "cubic"},
        {"time_shift_type": "linear"},
    ]:
        with pytest.raises(NotImplementedError):
            DEISMultistepScheduler(**kwargs)
    for kwargs in [
        {"use_karras_sigmas": True, "use_beta_sigmas": True},
        {"solver_order": 5},
        {"solver_order": 2.0},
        {"prediction_type": "eps"},
        {"timestep_spacing": "uniform"},
        {"final_sigmas_type": "last"},
        {"basis": "lambda"},
    ]:
        with pytest.raises(ValueError):
            DEISMultistepScheduler(**kwargs)


# --- the contract ----------------------------------------------------------------------------------------------------


def test_state_before_and_after_set_timesteps():
    ours, theirs = DEISMultistepScheduler(), diffusers.DEISMultistepScheduler()
    for name in ("timesteps", "sigmas", "betas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.init_noise_sigma == 1.0 and len(ours) == 1000
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    ours.set_timesteps(10, device="cpu")
    theirs.set_timesteps(10, device="cpu")
    assert ours.timesteps.dtype == torch.int64 and torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.device.type == "cpu"
    assert ours.num_inference_steps == 10 and ours.model_outputs == [None, None]
    assert ours.step_index is None and ours.begin_index is None and ours.lower_order_nums == 0
    x = torch.randn(SHAPE)
    assert ours.scale_model_input(x, ours.timesteps[0]) is x


def test_step_outputs_and_counters():
    ours = DEISMultistepScheduler(solver_order=3)
    ours.set_timesteps(5)
    x, outputs = _inputs(5)
    result = ours.step(outputs[0], ours.timesteps[0], x)
    assert isinstance(result, diffusers.schedulers.scheduling_utils.SchedulerOutput)
    assert ours.step_index == 1 and ours.lower_order_nums == 1
    assert ours.model_outputs[-1] is outputs[0] and ours.model_outputs[:2] == [None, None]
    as_tuple = ours.step(outputs[1], ours.timesteps[1], result.prev_sample, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    x = as_tuple[0]
    for n in range(2, 5):
        x = ours.step(outputs[n], ours.timesteps[n], x).prev_sample
    assert ours.lower_order_nums == 3 and ours.step_index == 5
    with pytest.raises(IndexError, match="past the last"):
        ours.step(outputs[0], ours.timesteps[-1], x)


@pytest.mark.parametrize("begin", [0, 3, 7])
def test_begin_index_as_diffusers(begin):
    """Image-to-image pipelines start mid-schedule with set_begin_index: the warm-up restarts there."""
    x, outputs = _inputs(12)
    runs = []
    for cls in (DEISMultistepScheduler, diffusers.DEISMultistepScheduler):
        scheduler = cls(solver_order=3)
        scheduler.set_timesteps(12)
        runs.append(_sample(scheduler, x, outputs, begin=begin))
    _close(*runs, 1e-5)


def test_start_found_from_the_timestep_value():
    """Without set_begin_index the first step is found from the timestep, by value or by position."""
    x, outputs = _inputs(8)
    reference = DEISMultistepScheduler()
    reference.set_timesteps(8)
    expected = _sample(reference, x, outputs)
    for convert in (int, lambda t: t.clone(), lambda t: t):
        scheduler = DEISMultistepScheduler()
        scheduler.set_timesteps(8)
        y = x
        for n, t in enumerate(scheduler.timesteps):
            y = scheduler.step(outputs[n], convert(t), y).prev_sample
        assert torch.equal(y, expected[-1])
    # a timestep that is not in the schedule means the last step (diffusers' rule)
    scheduler = DEISMultistepScheduler()
    scheduler.set_timesteps(8)
    scheduler.step(outputs[0], 12345, x)
    assert scheduler.step_index == 8


def test_poked_state_behaves_as_in_diffusers():
    """Tools reset model_outputs and lower_order_nums mid-run to restart the warm-up."""

    def poke(n, scheduler):
        if n == 5:
            scheduler.model_outputs = [None] * scheduler.config.solver_order
            scheduler.lower_order_nums = 0

    x, outputs = _inputs(20)
    runs = []
    for cls in (DEISMultistepScheduler, diffusers.DEISMultistepScheduler):
        scheduler = cls(solver_order=3)
        scheduler.set_timesteps(20)
        runs.append(_sample(scheduler, x, outputs, on_step=poke))
    _close(*runs, 1e-5)


def test_add_noise_as_diffusers():
    generator = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    for kwargs in [{}, {"use_flow_sigmas": True, "flow_shift": 3.0}]:
        ours, theirs = DEISMultistepScheduler(**kwargs), diffusers.DEISMultistepScheduler(**kwargs)
        for s in (ours, theirs):
            s.set_timesteps(10)
        t = ours.timesteps[[0, 3, 5, 9]]
        assert torch.allclose(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
        for s in (ours, theirs):
            s.set_begin_index(4)
        assert torch.allclose(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("sample_dtype", "output_dtype"),
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_dtypes_as_diffusers(sample_dtype, output_dtype):
    """The result has diffusers' dtype (the promoted one of sample and model output) and is no less accurate."""
    x, outputs = _inputs(6, dtype=F64)
    results = []
    for cls, sample, output in [
        (DEISMultistepScheduler, sample_dtype, output_dtype),
        (diffusers.DEISMultistepScheduler, sample_dtype, output_dtype),
        (DEISMultistepScheduler, F64, F64),
    ]:
        scheduler = cls(solver_order=3)
        scheduler.set_timesteps(6)
        results.append(_sample(scheduler, x.to(sample), [o.to(output) for o in outputs])[-1])
    ours, theirs, exact = results
    assert ours.dtype == theirs.dtype == torch.promote_types(sample_dtype, output_dtype)
    error = [float((r.double() - exact).abs().max() / exact.abs().max()) for r in (ours, theirs)]
    assert error[0] <= 1.5 * error[1] + 1e-4, error


def test_step_does_no_host_work(monkeypatch):
    """After set_timesteps, a step reads nothing back from the tensors (no .item(), no numpy, no bool())."""
    scheduler = DEISMultistepScheduler(solver_order=3, prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    x, outputs = _inputs(10)

    def forbidden(*args, **kwargs):
        raise AssertionError("host-side read of a tensor inside step()")

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for n, t in enumerate(scheduler.timesteps):  # pipelines pass elements of scheduler.timesteps
        x = scheduler.step(outputs[n], t, x).prev_sample
    monkeypatch.undo()
    assert torch.isfinite(x).all()


# --- diffusers' faults, fixed ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_repeated_first_timesteps(sigmas, order):
    """diffusers 0.42 looks the first step up by value and takes the *second* match of a repeated timestep: it skips
    the first step and raises IndexError at the last. Stepping by position gives diffusers' own update sequence
    (diffusers run with set_begin_index(0), which avoids the lookup)."""
    config = {"beta_schedule": "squaredcos_cap_v2", sigmas: True, "solver_order": order}
    theirs = diffusers.DEISMultistepScheduler(**config)
    theirs.set_timesteps(25)
    assert theirs.timesteps[0] == theirs.timesteps[1]
    x, outputs = _inputs(25, dtype=F64)
    try:
        _sample(theirs, x, outputs)
    except IndexError:
        pass
    else:  # pragma: no cover - a later diffusers may fix it
        pytest.skip("this diffusers no longer fails here")
    ours = DEISMultistepScheduler(**config)
    ours.set_timesteps(25)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    states = _sample(ours, x, outputs)  # float64: the exact update
    reference = diffusers.DEISMultistepScheduler(**config)
    reference.set_timesteps(25)
    reference.sigmas = reference.sigmas.double()
    _close(states, _sample(reference, x, outputs, begin=0), 1e-9)
    ours.set_timesteps(25)
    in_float32 = _sample(ours, x.float(), [o.float() for o in outputs])
    assert all(torch.isfinite(s).all() for s in in_float32)
    _close(in_float32, states, 1e-5)


def test_pipelines_may_pass_a_generator():
    """DDPMPipeline passes generator= to step, which diffusers' DEIS rejects; the step is deterministic."""
    scheduler = DEISMultistepScheduler()
    scheduler.set_timesteps(3)
    x, outputs = _inputs(3)
    a = scheduler.step(outputs[0], scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(1))
    scheduler.set_timesteps(3)
    b = scheduler.step(outputs[0], scheduler.timesteps[0], x)
    assert torch.equal(a.prev_sample, b.prev_sample)


# --- equivalences ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_first_order_is_ddim(steps, prediction_type):
    ours = DEISMultistepScheduler(solver_order=1, timestep_spacing="trailing", prediction_type=prediction_type)
    ddim = diffusers.DDIMScheduler(
        timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False, prediction_type=prediction_type
    )
    ours.set_timesteps(steps)
    ddim.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ddim.timesteps)
    x, outputs = _inputs(steps)
    _close(_sample(ours, x, outputs), _sample(ddim, x, outputs), 1e-5)


def _point_mass_model(x0, prediction_type, flow):
    """The exact model output for data concentrated at ``x0``: along the exact ODE path every prediction is constant
    in the right variables, so every order of DEIS lands on ``x0`` at ``sigma = 0``."""

    def model(x, level):
        if flow:
            alpha, sigma = 1.0 - level, level
        else:
            alpha = 1.0 / math.sqrt(1.0 + level * level)
            sigma = level * alpha
        eps = (x - alpha * x0) / sigma
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0.expand_as(x).clone()
        if prediction_type == "v_prediction":
            return alpha * eps - sigma * x0
        return eps - x0  # flow

    return model


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_karras_sigmas": True, "solver_order": 3},
        {"use_beta_sigmas": True, "prediction_type": "v_prediction", "solver_order": 4},
        {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction", "solver_order": 3},
        {"prediction_type": "sample", "thresholding": True, "sample_max_value": 2.0, "basis": "rho"},
    ],
)
def test_final_sigmas_zero_ends_on_the_data(config):
    scheduler = DEISMultistepScheduler(final_sigmas_type="zero", **config)
    scheduler.set_timesteps(12)
    assert scheduler.sigmas[-1] == 0 and bool((scheduler.sigmas[:-1] > scheduler.sigmas[1:]).all())
    x0 = torch.linspace(-0.9, 0.9, 3 * 8 * 8, dtype=F64).reshape(1, 3, 8, 8)
    model = _point_mass_model(x0, scheduler.config.prediction_type, scheduler.config.use_flow_sigmas)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    for n, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(x, float(scheduler.sigmas[n])), t, x).prev_sample
    assert float((x - x0).abs().max()) < 1e-9


@pytest.mark.parametrize(
    "sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"]
)
def test_no_zero_length_step_with_sigma_min(sigmas):
    default, distinct = (
        DEISMultistepScheduler(**{sigmas: True}),
        DEISMultistepScheduler(**{sigmas: True}, final_sigmas_type="sigma_min"),
    )
    default.set_timesteps(10)
    distinct.set_timesteps(10)
    assert default.sigmas[-1] == default.sigmas[-2]  # diffusers' grid: the last step does nothing
    assert len(distinct.timesteps) == 10 and bool((distinct.sigmas[:-1] > distinct.sigmas[1:]).all())
    assert torch.equal(distinct.sigmas[:1], default.sigmas[:1])
    x, outputs = _inputs(10)
    states = _sample(distinct, x, outputs)
    assert all(not torch.equal(a, b) for a, b in zip([x, *states[:-1]], states, strict=True))


# --- custom grids ----------------------------------------------------------------------------------------------------


def test_custom_timesteps_and_sigmas_reproduce_the_standard_grids():
    x, outputs = _inputs(10)
    standard = DEISMultistepScheduler(solver_order=3)
    standard.set_timesteps(10)
    custom = DEISMultistepScheduler(solver_order=3)
    custom.set_timesteps(timesteps=standard.timesteps.tolist())
    assert torch.equal(custom.sigmas, standard.sigmas) and torch.equal(custom.timesteps, standard.timesteps)
    _close(_sample(custom, x, outputs), _sample(standard, x, outputs), 1e-7)

    karras = DEISMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="zero")
    karras.set_timesteps(10)
    custom = DEISMultistepScheduler(final_sigmas_type="zero")
    custom.set_timesteps(sigmas=karras.sigmas[:-1])
    assert torch.equal(custom.sigmas, karras.sigmas)
    assert float((custom.timesteps - karras.timesteps).abs().max()) <= 0.5  # not rounded: the exact training time
    _close(_sample(custom, x, outputs), _sample(karras, x, outputs), 1e-7)

    with pytest.raises(ValueError, match="decrease"):
        DEISMultistepScheduler().set_timesteps(sigmas=[1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="decrease strictly"):  # 500 betas for 1000 training steps: levels repeat
        DEISMultistepScheduler(trained_betas=np.linspace(1e-4, 0.02, 500).tolist()).set_timesteps(10)
    with pytest.raises(ValueError, match="does not match"):
        DEISMultistepScheduler().set_timesteps(5, sigmas=[3.0, 2.0, 1.0])


@pytest.mark.parametrize("prediction_type", ["flow_prediction", "sample"])
def test_flux_style_flow_grid_from_sigma_one(prediction_type):
    """FLUX-style pipelines pass sigmas = linspace(1, 1/n, n) and mu; sigma = 1 is alpha = 0, where the first step
    is the exact x0-split step and the eps polynomial starts at the second node."""
    n = 8
    config = {
        "use_flow_sigmas": True,
        "use_dynamic_shifting": True,
        "prediction_type": prediction_type,
        "final_sigmas_type": "zero",
        "solver_order": 3,
    }
    scheduler = DEISMultistepScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=0.8)
    assert scheduler.sigmas[0] == 1.0 and scheduler.sigmas[-1] == 0.0
    shift = math.exp(0.8)
    assert math.isclose(float(scheduler.sigmas[1]), shift * (1 - 1 / n) / (1 + (shift - 1) * (1 - 1 / n)), rel_tol=1e-6)
    assert scheduler.config.flow_shift == 1.0  # the configuration is left as it was
    x0 = torch.linspace(-0.9, 0.9, 3 * 8 * 8, dtype=F64).reshape(1, 3, 8, 8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    model = _point_mass_model(x0, "flow" if prediction_type == "flow_prediction" else prediction_type, flow=True)
    for m, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(x, float(scheduler.sigmas[m])), t, x).prev_sample
        assert torch.isfinite(x).all()
    assert float((x - x0).abs().max()) < 1e-9
    with pytest.raises(ValueError, match="alpha = 0"):
        DEISMultistepScheduler(use_flow_sigmas=True).set_timesteps(sigmas=[1.0, 0.5])


# --- orders and bases ------------------------------------------------------------------------------------------------


def _exact_step(scheduler, i, polynomial, basis):
    """``x_{i+1}`` of the exact ODE ``d(x / alpha) / d rho = p(u) v`` from ``x_i`` for a polynomial ``p`` of the basis
    variable ``u``, by adaptive quadrature (scipy, float64)."""
    from scipy.integrate import quad

    levels = scheduler.sigmas.double()
    rho_a, rho_b = float(levels[i]), float(levels[i + 1])
    if basis == "t":
        schedule = scheduler._schedule()
        times = scheduler._form_basis_times[2]
        t_a, t_b = float(times[i]), float(times[i + 1])

        def integrand(t):
            tt = torch.tensor(t, dtype=F64)
            rho = torch.exp(-schedule.half_log_snr(tt))
            return polynomial(t) * float(-schedule.d_half_log_snr(tt) * rho)

        integral = quad(integrand, t_a, t_b, points=list(range(math.ceil(t_b), math.floor(t_a) + 1)), limit=200)[0]
    else:
        u = math.log if basis == "logrho" else (lambda r: r)
        integral = quad(lambda r: polynomial(u(r)), rho_a, rho_b, epsabs=0, epsrel=1e-13, limit=200)[0]
    return rho_a, rho_b, integral


@pytest.mark.parametrize("basis", ["logrho", "rho", "t"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_order_k_is_exact_for_degree_k_minus_1(basis, order):
    """With eps a polynomial of degree < k in the basis variable and exact past values, a k-node step is exact."""
    scheduler = DEISMultistepScheduler(solver_order=order, basis=basis, lower_order_final=False)
    scheduler.set_timesteps(10)
    i = 6
    rng = np.random.default_rng(order)
    coefficients = rng.normal(size=order)
    if basis == "t":
        times = scheduler._form_basis_times[2]
        center, scale = float(times[i]), float(times[i] - times[i + 1])
    else:
        center, scale = 0.0, 1.0

    def polynomial(u):
        return float(np.polyval(coefficients, (u - center) / scale))

    levels = scheduler.sigmas.double()
    if basis == "t":
        nodes = [float(t) for t in scheduler._form_basis_times[2]]
    elif basis == "logrho":
        nodes = [math.log(float(r)) for r in levels]
    else:
        nodes = [float(r) for r in levels]
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=F64)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=F64)
    scheduler.set_begin_index(i)
    scheduler.lower_order_nums = order - 1
    scheduler.model_outputs = [None] + [polynomial(nodes[j]) * v for j in range(i - order + 1, i)]
    result = scheduler.step(polynomial(nodes[i]) * v, scheduler.timesteps[i], x).prev_sample
    rho_a, rho_b, integral = _exact_step(scheduler, i, polynomial, basis)
    alpha_a, alpha_b = 1 / math.sqrt(1 + rho_a**2), 1 / math.sqrt(1 + rho_b**2)
    expected = alpha_b * (x / alpha_a + integral * v)
    assert float((result - expected).abs().max()) <= 1e-9 * float(expected.abs().max())


def test_solver_order_4_differs_from_diffusers_order_3():
    """diffusers accepts solver_order=4 but steps at order 3; ours is the 4-node method."""
    x, outputs = _inputs(20)
    ours = DEISMultistepScheduler(solver_order=4)
    theirs = diffusers.DEISMultistepScheduler(solver_order=4)
    third = DEISMultistepScheduler(solver_order=3)
    for s in (ours, theirs, third):
        s.set_timesteps(20)
    a, b, c = _sample(ours, x, outputs), _sample(theirs, x, outputs), _sample(third, x, outputs)
    _close(b, c, 1e-5)
    assert float((a[-1] - b[-1]).abs().max()) > 1e-3 * float(b[-1].abs().max())


def test_basis_t_needs_the_training_schedule():
    with pytest.raises(ValueError, match="training schedule"):
        DEISMultistepScheduler(basis="t", use_flow_sigmas=True).set_timesteps(10)
    with pytest.raises(ValueError, match="training range"):
        DEISMultistepScheduler(basis="t", final_sigmas_type="zero").set_timesteps(10)
    with pytest.raises(ValueError, match="training range"):
        DEISMultistepScheduler(basis="t").set_timesteps(sigmas=[1e4, 10.0, 1.0])
    scheduler = DEISMultistepScheduler(basis="t", use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    x, outputs = _inputs(10)
    assert torch.isfinite(_sample(scheduler, x, outputs)[-1]).all()


def test_coefficients_are_reused_for_the_same_grid():
    scheduler = DEISMultistepScheduler(solver_order=3)
    scheduler.set_timesteps(20)
    first = scheduler._updates
    scheduler.set_timesteps(20)
    assert scheduler._updates is not first and scheduler._updates == first


# --- inputs diffusers accepts or rejects (issue 14) ------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2.7, 3.0, "3", torch.tensor(3.0)])
def test_non_integer_step_counts_raise_type_error_as_diffusers(steps):
    for cls in (diffusers.DEISMultistepScheduler, DEISMultistepScheduler):
        with pytest.raises(TypeError):
            cls().set_timesteps(steps)
    with pytest.raises(TypeError, match="num_inference_steps must be an integer"):
        DEISMultistepScheduler().set_timesteps(steps)
    for steps in (np.int64(3), torch.tensor(3)):  # integers of other types are taken, as by diffusers
        scheduler = DEISMultistepScheduler()
        scheduler.set_timesteps(steps)
        assert len(scheduler.timesteps) == 3
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        DEISMultistepScheduler().set_timesteps(0)


def test_negative_begin_index_is_an_error():
    """diffusers takes begin_index -1 as the last step and applies its coefficients to the first one."""
    scheduler = DEISMultistepScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="begin_index must be >= 0"):
        scheduler.set_begin_index(-1)
    with pytest.raises(ValueError, match="at most the number of steps"):
        scheduler.set_begin_index(11)
    with pytest.raises(TypeError, match="begin_index"):
        scheduler.set_begin_index(1.5)
    scheduler.set_begin_index(10)  # strength 0 in an image-to-image pipeline: nothing left to do
    assert scheduler.begin_index == 10


def test_shape_mismatch_names_both_shapes():
    scheduler = DEISMultistepScheduler()
    scheduler.set_timesteps(10)
    x, _ = _inputs(1)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 3, 8, 1\) but sample has shape \(2, 3, 8, 8\)"):
        scheduler.step(x[..., :1], scheduler.timesteps[0], x)


def test_check_finite_names_the_step():
    x, outputs = _inputs(10)
    bad = outputs[3].clone()
    bad[0, 0, 0, 0] = float("nan")
    for check in (False, True):
        scheduler = DEISMultistepScheduler(check_finite=check)
        scheduler.set_timesteps(10)
        for n, t in enumerate(scheduler.timesteps[:3]):
            x = scheduler.step(outputs[n], t, x).prev_sample
        if not check:  # diffusers' behaviour by default: the NaN reaches the sample
            assert bool(scheduler.step(bad, scheduler.timesteps[3], x).prev_sample.isnan().any())
        else:
            timestep = int(scheduler.timesteps[3])
            with pytest.raises(FloatingPointError, match=rf"step 3 \(timestep {timestep}, noise level"):
                scheduler.step(bad, scheduler.timesteps[3], x)
            inf = outputs[3].clone()
            inf[1, 2, 3, 4] = float("inf")
            with pytest.raises(FloatingPointError, match="step 3"):
                scheduler.step(inf, scheduler.timesteps[3], x)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps", [25, 26])
def test_as_many_steps_as_training_timesteps(spacing, steps):
    """diffusers accepts num_inference_steps >= num_train_timesteps; rounding repeats timesteps, and diffusers'
    multistep update then divides by a zero difference of log rho (NaN). Here each repeat is a step that leaves
    the sample unchanged, every state is finite, and the steps before the first repeat equal those of a sampler
    on the grid without the repeats."""
    scheduler = DEISMultistepScheduler(num_train_timesteps=25, solver_order=3, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    repeats = [i for i in range(steps - 1) if timesteps[i] == timesteps[i + 1]]
    assert repeats or spacing == "trailing"
    x, outputs = _inputs(steps, dtype=F64)
    states = _sample(scheduler, x, outputs)
    assert all(bool(s.isfinite().all()) for s in states)
    for i in repeats:
        assert torch.equal(states[i], states[i - 1])
    # the same steps without the repeats (their levels once each), with the same model outputs
    kept = [i for i in range(steps) if i not in repeats]
    custom = DEISMultistepScheduler(num_train_timesteps=25, solver_order=3, final_sigmas_type=None)
    custom.set_timesteps(sigmas=scheduler.sigmas[kept].tolist())
    if len(repeats) == 0:
        return
    lower_final = len(kept) < 15  # the rule of lower_order_final depends on the number of steps
    assert not lower_final
    reference = _sample(custom, x, [outputs[i] for i in kept])
    # identical until the step after the first repeat, whose polynomial restarts (first order) here only
    first = repeats[0]
    _close([states[i] for i in range(first)], reference[:first], 1e-12)


def test_leading_spacing_needs_fewer_steps_than_training_timesteps():
    with pytest.raises(ValueError, match="'leading' needs num_inference_steps < num_train_timesteps"):
        DEISMultistepScheduler(timestep_spacing="leading").set_timesteps(1000)


def test_last_step_to_sigma_zero_is_first_order():
    """With lower_order_final and 15 or more steps (where diffusers' own rule keeps the full order), the step that
    ends at sigma = 0 is forced to first order: the sample it returns is the data prediction of its model output.
    A second- or third-order last step would extrapolate the noise prediction to log rho = -inf."""
    steps = 20
    scheduler = DEISMultistepScheduler(solver_order=3, final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    x, outputs = _inputs(steps, dtype=F64)
    states = _sample(scheduler, x, outputs)
    sigma = float(scheduler.sigmas[-2])
    alpha = 1 / math.sqrt(1 + sigma**2)
    data = (states[-2] - sigma * alpha * outputs[-1]) / alpha  # x0 = (x - sigma_t eps) / alpha_t at the last node
    torch.testing.assert_close(states[-1], data, rtol=1e-10, atol=1e-10)
