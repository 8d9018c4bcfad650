"""diffusers' own test suite of its DEIS scheduler, restated for :class:`deis_ode.DEISMultistepScheduler`.

CI has package registries but no GitHub, so diffusers' test files cannot be fetched there; they are not copied
either. Each test below makes the checks of one test of ``tests/schedulers/test_scheduler_deis.py`` (class
``DEISMultistepSchedulerTest``) or of its base class ``SchedulerCommonTest`` in ``tests/schedulers/test_schedulers.py``
of diffusers (read at v0.40; the DEIS test file is unchanged since early 2025, and the installed diffusers is 0.42),
named in its docstring, with our scheduler in place of theirs. Where diffusers' test only compares a scheduler with
its own saved and reloaded copy, the test here also compares with diffusers' scheduler itself (``_theirs``): the
same checks, and parity on top. ``test_from_save_pretrained`` is skipped by diffusers for DEIS, and the base class's
``SchedulerBaseTests`` test diffusers' config machinery with mock schedulers, not a scheduler; neither is restated.

The four fixed numbers (0.23916, 0.091, 315.3016, 0.41054) are diffusers' expected results of its own loops.
"""

from __future__ import annotations

import inspect
import tempfile
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.utils import logging as diffusers_logging  # noqa: E402

from deis_ode.scheduler import DEISMultistepScheduler  # noqa: E402

BASE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
STEPS = 25  # the number of inference steps of diffusers' per-configuration checks


def _config(**changes):
    return {**BASE, "solver_order": 2, **changes}


def _random_sample() -> torch.Tensor:
    return torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))


def _ramp(reverse: bool = False) -> torch.Tensor:
    """A deterministic batch of 4 images (3 x 8 x 8): 0, 1/768, 2/768, ... laid out channel-major, batch last."""
    count = 4 * 3 * 8 * 8
    values = torch.arange(count)
    if reverse:
        values = values.flip(-1)
    return (values.reshape(3, 8, 8, 4) / count).permute(3, 0, 1, 2)


def _toy_model(sample: torch.Tensor, t) -> torch.Tensor:
    """The model of diffusers' loops: ``sample * t / (t + 1)``."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *([1] * (sample.dim() - 1))).to(sample.dtype)
    return sample * t / (t + 1)


def _past(residual: torch.Tensor, order: int) -> list[torch.Tensor]:
    return [residual + 0.2, residual + 0.15, residual + 0.10][:order]


def _reloaded(scheduler):
    with tempfile.TemporaryDirectory() as directory:
        scheduler.save_config(directory)
        return type(scheduler).from_pretrained(directory)


def _theirs(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.DEISMultistepScheduler(**config)


def _check_configuration(time_step: int = 0, steps: int = STEPS, **changes) -> None:
    """diffusers' ``check_over_configs``: the scheduler and its saved-and-reloaded copy, both with the same three
    poked past outputs, take ``solver_order + 1`` equal steps from ``time_step``; here diffusers' scheduler, poked
    the same way, takes them too."""
    config = _config(**changes)
    sample = _random_sample()
    residual = 0.1 * sample
    schedulers = [DEISMultistepScheduler(**config)]
    schedulers.append(_reloaded(schedulers[0]))
    schedulers.append(_theirs(config))
    for scheduler in schedulers:
        scheduler.set_timesteps(steps)
        scheduler.model_outputs = _past(residual, scheduler.config.solver_order)
    outputs = [sample] * 3
    for index in range(time_step, time_step + config["solver_order"] + 1):
        t = schedulers[0].timesteps[index]
        outputs = [s.step(residual, t, x).prev_sample for s, x in zip(schedulers, outputs, strict=True)]
        ours, reloaded, theirs = outputs
        assert float((ours - reloaded).abs().sum()) < 1e-5, "the reloaded scheduler steps differently"
        assert bool(torch.isfinite(ours).all())
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _check_forward(steps: int, time_step=0) -> None:
    """diffusers' ``check_over_forward``: one step at ``time_step`` (``0`` is not a timestep of the grid, so the
    step is the last one) by the scheduler and its reloaded copy, both with poked past outputs."""
    config = _config()
    sample = _random_sample()
    residual = 0.1 * sample
    ours = DEISMultistepScheduler(**config)
    ours.set_timesteps(steps)
    ours.model_outputs = _past(residual, 2)
    copy = _reloaded(ours)
    copy.set_timesteps(steps)
    copy.model_outputs = _past(residual, 2)
    output = ours.step(residual, time_step, sample).prev_sample
    assert float((output - copy.step(residual, time_step, sample).prev_sample).abs().sum()) < 1e-5
    assert bool(torch.isfinite(output).all())
    theirs = _theirs(config)
    theirs.set_timesteps(steps)
    theirs.model_outputs = _past(residual, 2)
    torch.testing.assert_close(output, theirs.step(residual, time_step, sample).prev_sample, rtol=1e-5, atol=1e-5)


def _full_loop(steps: int = 10, **changes) -> torch.Tensor:
    """diffusers' ``full_loop``: 10 steps of the toy model from the deterministic ramp."""
    scheduler = DEISMultistepScheduler(**_config(**changes))
    return _loop(scheduler, steps)


def _loop(scheduler, steps: int = 10) -> torch.Tensor:
    sample = _ramp()
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        sample = scheduler.step(_toy_model(sample, t), t, sample).prev_sample
    return sample


# --- DEISMultistepSchedulerTest --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_train_timesteps", [25, 50, 100, 999, 1000])
def test_timesteps(num_train_timesteps):
    """``test_timesteps``; 25 training timesteps with 25 inference steps repeat one rounded timestep."""
    _check_configuration(num_train_timesteps=num_train_timesteps)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sample_max_value", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_thresholding(order, sample_max_value, prediction_type):
    """``test_thresholding``, ``sample_max_value < 1`` included (diffusers then clips every sample to
    ``[-M, M]`` and divides by ``M``)."""
    _check_configuration(
        thresholding=True,
        prediction_type=prediction_type,
        sample_max_value=sample_max_value,
        algorithm_type="deis",
        solver_order=order,
        solver_type="logrho",
    )


def test_thresholding_off():
    """``test_thresholding``, its first check."""
    _check_configuration(thresholding=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_type(prediction_type):
    """``test_prediction_type``."""
    _check_configuration(prediction_type=prediction_type)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_solver_order_and_type(order, prediction_type):
    """``test_solver_order_and_type``: the configuration check and a full loop without NaN; here the loop also
    equals diffusers'."""
    changes = {"solver_order": order, "solver_type": "logrho", "prediction_type": prediction_type}
    _check_configuration(algorithm_type="deis", **changes)
    sample = _full_loop(algorithm_type="deis", **changes)
    assert not bool(torch.isnan(sample).any())
    torch.testing.assert_close(sample, _loop(_theirs(_config(**changes))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_lower_order_final(lower_order_final):
    """``test_lower_order_final``."""
    _check_configuration(lower_order_final=lower_order_final)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 50, 100, 999, 1000])
def test_inference_steps(steps):
    """``test_inference_steps``: up to ``num_inference_steps == num_train_timesteps``."""
    _check_forward(steps)


def test_full_loop_no_noise():
    """``test_full_loop_no_noise``."""
    assert abs(float(_full_loop().abs().mean()) - 0.23916) < 1e-3


def test_full_loop_with_v_prediction():
    """``test_full_loop_with_v_prediction``."""
    assert abs(float(_full_loop(prediction_type="v_prediction").abs().mean()) - 0.091) < 1e-3


def test_switch():
    """``test_switch``: through DPM-Solver (single- and multistep) and UniPC configurations and back, the loop is
    unchanged."""
    scheduler = DEISMultistepScheduler(**_config())
    assert abs(float(_loop(scheduler).abs().mean()) - 0.23916) < 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = diffusers.DPMSolverSinglestepScheduler.from_config(scheduler.config)
        other = diffusers.DPMSolverMultistepScheduler.from_config(other.config)
        other = diffusers.UniPCMultistepScheduler.from_config(other.config)
    scheduler = DEISMultistepScheduler.from_config(other.config)
    assert abs(float(_loop(scheduler).abs().mean()) - 0.23916) < 1e-3


def test_fp16_support():
    """``test_fp16_support``: a half-precision loop with thresholding at ratio 0 stays in half precision."""
    scheduler = DEISMultistepScheduler(**_config(thresholding=True, dynamic_thresholding_ratio=0))
    scheduler.set_timesteps(10)
    sample = _ramp().half()
    for t in scheduler.timesteps:
        sample = scheduler.step(_toy_model(sample, t), t, sample).prev_sample
    assert sample.dtype == torch.float16


def test_full_loop_with_noise():
    """``test_full_loop_with_noise``: noise added at the ninth timestep, then the last two steps."""
    scheduler = DEISMultistepScheduler(**_config())
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps[8 * scheduler.order :]
    sample = scheduler.add_noise(_ramp(), _ramp(reverse=True), timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(_toy_model(sample, t), t, sample).prev_sample
    assert abs(float(sample.abs().sum()) - 315.3016) < 1e-2
    assert abs(float(sample.abs().mean()) - 0.41054) < 1e-3


@pytest.mark.parametrize("sigmas", ["use_beta_sigmas", "use_exponential_sigmas"])
def test_beta_and_exponential_sigmas(sigmas):
    """``test_beta_sigmas`` and ``test_exponential_sigmas``."""
    _check_configuration(**{sigmas: True})


def test_step_shape():
    """``test_step_shape`` (DEIS's version): steps at the sixth and seventh timesteps keep the sample's shape."""
    scheduler = DEISMultistepScheduler(**_config())
    scheduler.set_timesteps(STEPS)
    sample = _random_sample()
    residual = 0.1 * sample
    scheduler.model_outputs = _past(residual, 2)
    first = scheduler.step(residual, scheduler.timesteps[5], sample).prev_sample
    second = scheduler.step(residual, scheduler.timesteps[6], sample).prev_sample
    assert first.shape == sample.shape == second.shape


# --- SchedulerCommonTest ---------------------------------------------------------------------------------------------


def test_compatibles():
    """``test_compatibles``: every compatible scheduler loads our config, ours loads theirs back with the same
    values, and the keys it adds are none of our constructor's arguments."""
    scheduler = DEISMultistepScheduler(**_config())
    assert all(c is not None for c in scheduler.compatibles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for compatible in scheduler.compatibles:
            other = compatible.from_config(scheduler.config)
            assert other is not None
    back = DEISMultistepScheduler.from_config(other.config)
    assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config)
    added = {k for k in back.config if k not in scheduler.config}
    assert added.isdisjoint(inspect.signature(DEISMultistepScheduler.__init__).parameters)


def test_from_pretrained(tmp_path):
    """``test_from_pretrained``: ``save_pretrained`` then ``from_pretrained`` gives the same config."""
    scheduler = DEISMultistepScheduler(**_config())
    scheduler.save_pretrained(tmp_path)
    loaded = DEISMultistepScheduler.from_pretrained(tmp_path)
    config = dict(scheduler.config)
    del config["_use_default_values"]
    assert config == loaded.config


def test_scheduler_outputs_equivalence():
    """``test_scheduler_outputs_equivalence``: ``return_dict=False`` gives the tuple of the dict's values."""
    results = []
    for return_dict in (True, False):
        scheduler = DEISMultistepScheduler(**_config())
        scheduler.set_timesteps(STEPS)
        sample = _random_sample()
        output = scheduler.step(0.1 * sample, scheduler.timesteps[0], sample, return_dict=return_dict)
        results.append(output.prev_sample if return_dict else output[0])
        if not return_dict:
            assert isinstance(output, tuple) and len(output) == 1
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)


def test_scheduler_public_api():
    """``test_scheduler_public_api``: ``init_noise_sigma``, ``scale_model_input`` (keeps the shape) and ``step``."""
    scheduler = DEISMultistepScheduler(**_config())
    assert hasattr(scheduler, "init_noise_sigma") and callable(scheduler.step)
    sample = _random_sample()
    assert scheduler.scale_model_input(sample, 0.0).shape == sample.shape


def test_add_noise_device():
    """``test_add_noise_device``: noise added at one timestep keeps the sample's shape."""
    scheduler = DEISMultistepScheduler(**_config())
    scheduler.set_timesteps(50)
    sample = scheduler.scale_model_input(_random_sample(), 0.0)
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
    assert scheduler.add_noise(sample, noise, scheduler.timesteps[5][None]).shape == sample.shape


def test_deprecated_kwargs():
    """``test_deprecated_kwargs``: no ``**kwargs`` in the constructor, and no deprecated keyword declared."""
    assert "kwargs" not in inspect.signature(DEISMultistepScheduler.__init__).parameters
    assert len(DEISMultistepScheduler._deprecated_kwargs) == 0


def test_trained_betas(tmp_path):
    """``test_trained_betas``: given betas survive ``save_pretrained`` / ``from_pretrained``."""
    scheduler = DEISMultistepScheduler(**_config(), trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    assert scheduler.betas.tolist() == DEISMultistepScheduler.from_pretrained(tmp_path).betas.tolist()


def test_getattr_is_correct(capfd):
    """``test_getattr_is_correct``: own attributes and methods are read without a warning; a config entry read as
    an attribute gives diffusers' ``FutureWarning``."""
    scheduler = DEISMultistepScheduler(**_config())
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    diffusers_logging.set_verbosity_warning()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler.dummy_attribute == 5
        assert callable(scheduler.save_pretrained)  # a method, found without a warning
    assert "warn" not in capfd.readouterr().err.lower()
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
