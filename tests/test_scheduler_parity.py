"""Parity of deis_ode's scheduler with diffusers' ``DEISMultistepScheduler`` over the configuration grid.

Both schedulers are driven with the same random model outputs. Three checks per configuration:

* *same method*: run in float64 (diffusers with its float32 noise levels cast to float64, so that its formulas are
  evaluated in float64 too), the two agree to 1e-7 relative -- our closed forms and diffusers' formulas are the same
  integrals;
* *float32 parity*: where diffusers' own float32 result is accurate (within 1e-6 of its float64 result), ours is
  within 1e-5 of it;
* *never less accurate*: everywhere, our float32 error (against the float64 result) is at most
  ``max(2e-5, diffusers' float32 error)``. diffusers' float32 arithmetic is ill-conditioned where ``alpha`` is tiny
  (the first steps of ``squaredcos_cap_v2``, flow sigmas near 1: up to 3e-2, and 2.3 with beta sigmas) and in its
  third-order weights on close noise levels (1e-2): there the two float32 results differ by diffusers' round-off.

Where diffusers 0.42 raises IndexError (repeated first timesteps), it is run with ``set_begin_index(0)``.
``test_parity_sample`` draws a fixed (derandomized) sample of the grid; ``test_parity_full_grid`` (slow) runs all
of it.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

diffusers = pytest.importorskip("diffusers")

from deis_ode.scheduler import DEISMultistepScheduler  # noqa: E402

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "sample", "v_prediction", "flow_prediction"]
ORDERS = [1, 2, 3]
SPACINGS = ["linspace", "leading", "trailing"]
SIGMAS = [None, "karras", "exponential", "beta", "flow"]
STEPS = [1, 2, 3, 5, 10, 25]


def _config(beta_schedule, prediction_type, order, spacing, sigmas, thresholding, lower_order_final) -> dict | None:
    if sigmas == "flow" and (spacing != "linspace" or beta_schedule != "linear"):
        return None  # flow sigmas ignore the spacing and the training betas
    if prediction_type == "flow_prediction" and sigmas != "flow":
        return None
    config = {
        "beta_schedule": beta_schedule,
        "prediction_type": prediction_type,
        "solver_order": order,
        "timestep_spacing": spacing,
        "thresholding": thresholding,
        "lower_order_final": lower_order_final,
        "sample_max_value": 1.5,
    }
    if sigmas == "flow":
        config.update(use_flow_sigmas=True, flow_shift=3.0)
    elif sigmas is not None:
        config[f"use_{sigmas}_sigmas"] = True
    return config


GRID = [
    (config, steps)
    for *combination, steps in itertools.product(
        BETA_SCHEDULES, PREDICTIONS, ORDERS, SPACINGS, SIGMAS, [False, True], [True, False], STEPS
    )
    if (config := _config(*combination)) is not None
]


def _run(cls, config, steps, dtype, begin=None):
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    if dtype == torch.float64 and cls is not DEISMultistepScheduler:
        scheduler.sigmas = scheduler.sigmas.double()  # diffusers' formulas in float64 on the same noise levels
    if begin is not None:
        scheduler.set_begin_index(begin)
    generator = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64).to(dtype)
    states = []
    for t in scheduler.timesteps:
        output = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64).to(dtype)
        x = scheduler.step(output, t, x).prev_sample
        states.append(x.double())
    return states


def _relative(a, b) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


def check_parity(config: dict, steps: int) -> dict:
    begin = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs32 = _run(diffusers.DEISMultistepScheduler, config, steps, torch.float32)
        except IndexError:  # diffusers' lookup of repeated first timesteps
            begin = 0
            theirs32 = _run(diffusers.DEISMultistepScheduler, config, steps, torch.float32, begin)
        theirs64 = _run(diffusers.DEISMultistepScheduler, config, steps, torch.float64, begin)
    ours32 = _run(DEISMultistepScheduler, config, steps, torch.float32)
    ours64 = _run(DEISMultistepScheduler, config, steps, torch.float64)
    result = {
        "method": _relative(ours64, theirs64),
        "parity": _relative(ours32, theirs32),
        "ours": _relative(ours32, theirs64),
        "diffusers": _relative(theirs32, theirs64),
    }
    where = f"{config}, {steps} steps: {result}"
    assert result["method"] <= 1e-7, where
    if result["diffusers"] <= 1e-6:
        assert result["parity"] <= 1e-5, where
    assert result["ours"] <= max(2e-5, result["diffusers"]), where
    return result


def test_grid_size():
    assert len(GRID) == 8064


@settings(max_examples=800, derandomize=True, deadline=None, database=None)
@given(st.sampled_from(GRID))
def test_parity_sample(case):
    check_parity(*case)


@pytest.mark.parametrize(
    "case",
    [
        ({"solver_order": 2}, 25),  # diffusers' defaults
        ({"solver_order": 3, "timestep_spacing": "trailing", "use_karras_sigmas": True}, 10),
        ({"solver_order": 3, "prediction_type": "v_prediction", "beta_schedule": "scaled_linear"}, 5),
        ({"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction", "solver_order": 3}, 10),
    ],
)
def test_parity_common_configurations(case):
    check_parity(*case)


@pytest.mark.slow
def test_parity_full_grid():
    results = [(check_parity(config, steps), config, steps) for config, steps in GRID]
    accurate = [r for r in results if r[0]["diffusers"] <= 1e-6]
    within = sum(r["parity"] <= 1e-5 for r, _, _ in results)
    print(f"float32 difference to diffusers <= 1e-5 in {within} of {len(results)} configurations")
    for name, subset in [("all", results), ("where diffusers' float32 is within 1e-6", accurate)]:
        print(f"{name} ({len(subset)} configurations):")
        for key in ("method", "parity", "ours", "diffusers"):
            value, config, steps = max(((r[key], c, n) for r, c, n in subset), key=lambda item: item[0])
            print(f"  worst {key}: {value:.3g} at {config}, {steps} steps")
