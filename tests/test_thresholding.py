"""Thresholding of the data prediction: the functions against numpy, and the drift option ``thresholding``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchdiffeq
from hypothesis import given
from hypothesis import strategies as st

import deis_ode  # noqa: F401  (registers the deis* methods)
from deis_ode.diffusion import (
    THRESHOLDING_TYPES,
    VEODE,
    VPODE,
    DiffusionODE,
    VESchedule,
    VPSchedule,
    dynamic_threshold,
    static_threshold,
    threshold,
)

torch.set_num_threads(1)


def numpy_dynamic(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Imagen's dynamic thresholding written out with numpy, one sample at a time."""
    out = np.empty_like(x0)
    for b in range(x0.shape[0]):
        s = np.quantile(np.abs(x0[b]).ravel(), ratio)
        s = min(max(s, 1.0), max_value)
        out[b] = np.clip(x0[b], -s, s) / s
    return out


def wild(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Samples with very different spreads: some inside [-1, 1], some far outside."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 1.5, shape[0], dtype=torch.float64).reshape(-1, *([1] * (len(shape) - 1)))
    return spread * torch.randn(shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- the functions


@given(
    shape=st.sampled_from([(5, 3, 4, 4), (4, 7), (3, 1), (2, 2, 3), (6,)]),
    ratio=st.floats(0.0, 1.0),
    max_value=st.floats(1.0, 20.0),
    seed=st.integers(0, 2**16),
)
def test_dynamic_matches_numpy(shape, ratio, max_value, seed):
    x0 = wild(shape, seed)
    got = dynamic_threshold(x0, ratio, max_value)
    assert got.shape == x0.shape and got.dtype == x0.dtype
    np.testing.assert_allclose(got.numpy(), numpy_dynamic(x0.numpy(), ratio, max_value), rtol=1e-13, atol=1e-15)
    assert got.abs().max() <= 1.0


@given(shape=st.sampled_from([(5, 3, 4), (4, 7), (6,)]), max_value=st.floats(0.01, 20.0), seed=st.integers(0, 999))
def test_static_matches_numpy(shape, max_value, seed):
    x0 = wild(shape, seed)
    got = static_threshold(x0, max_value)
    np.testing.assert_array_equal(got.numpy(), np.clip(x0.numpy(), -max_value, max_value))


def test_dynamic_is_per_sample():
    x0 = wild((4, 50), 1)
    alone = torch.cat([dynamic_threshold(x0[i : i + 1], 0.9, 5.0) for i in range(4)])
    torch.testing.assert_close(dynamic_threshold(x0, 0.9, 5.0), alone, rtol=0, atol=0)


def test_dynamic_leaves_small_samples_unchanged_and_matches_torch_quantile():
    small = 0.5 * torch.rand(3, 10, dtype=torch.float64)
    torch.testing.assert_close(dynamic_threshold(small), small, rtol=0, atol=0)
    x0 = wild((3, 2, 8), 2)
    s = torch.quantile(x0.reshape(3, -1).abs(), 0.995, dim=1).clamp(1.0, 3.0).reshape(3, 1, 1)
    torch.testing.assert_close(dynamic_threshold(x0, 0.995, 3.0), x0.clamp(-s, s) / s, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_keeps_its_dtype(dtype):
    x0 = wild((3, 16), 3)
    got = dynamic_threshold(x0.to(dtype), 0.8, 4.0)
    assert got.dtype == dtype
    expected = dynamic_threshold(x0.to(dtype).double(), 0.8, 4.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)


def test_threshold_dispatch():
    x0 = wild((4, 6), 4)
    assert threshold(x0, None) is x0
    torch.testing.assert_close(threshold(x0, "static", sample_max_value=2.0), x0.clamp(-2, 2))
    torch.testing.assert_close(threshold(x0, "dynamic", 0.7, 3.0), dynamic_threshold(x0, 0.7, 3.0))
    assert THRESHOLDING_TYPES == ("dynamic", "static")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thresholding": "clip"}, "thresholding must be one of"),
        ({"thresholding": True}, "thresholding must be one of"),
        ({"thresholding": "dynamic", "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
        ({"thresholding": "static", "sample_max_value": 0.0}, "sample_max_value"),
        ({"thresholding": "dynamic", "sample_max_value": 0.5}, "must be >= 1"),
    ],
)
def test_invalid_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VPODE(lambda x, t: x, VPSchedule.linear(), **kwargs)


def test_needs_a_batch_dimension():
    with pytest.raises(ValueError, match="batch dimension"):
        dynamic_threshold(torch.tensor(3.0))
    with pytest.raises(ValueError, match="batch dimension"):
        static_threshold(torch.tensor(3.0))


@pytest.mark.parametrize("shape", [(0, 3, 4), (0,), (2, 0)])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_an_empty_batch_is_returned_empty(shape, kind):
    x0 = torch.empty(shape, dtype=torch.float16)
    out = threshold(x0, kind)
    assert out.shape == x0.shape and out.dtype == x0.dtype


def test_an_empty_batch_samples_with_dynamic_thresholding():
    ode = VPODE(lambda x, t: 0.5 * x, VPSchedule.linear(), thresholding="dynamic")
    x = torch.empty(0, 3, dtype=torch.float64)
    out = torchdiffeq.odeint(ode, x, torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64), method="deis2")
    assert out.shape == (3, 0, 3)


# --------------------------------------------------------------------------- the drift


def x0_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A model whose data prediction is far outside [-1, 1]."""
    return 5.0 * x + 3.0 + 4.0 * t


def model_output(prediction: str, x: torch.Tensor, t: float, schedule) -> torch.Tensor:
    """The output of type ``prediction`` of a model whose data prediction is :func:`x0_model`."""
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = schedule.alpha(tt), schedule.sigma(tt)
    x0 = x0_model(x, tt)
    eps = (x - a * x0) / s
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return a * eps - s * x0
    da, ds = a * schedule.d_log_alpha(tt), s * schedule.d_log_sigma(tt)
    return da * x0 + ds * eps  # flow


SCHEDULES = [("vp", VPSchedule.linear(), 0.4), ("ve", VESchedule(), 0.3)]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("extrapolate", ["eps", "x0"])
@pytest.mark.parametrize("kind", ["static", "dynamic"])
@pytest.mark.parametrize(("name", "schedule", "t"), SCHEDULES)
def test_drift_uses_the_thresholded_x0(prediction, extrapolate, kind, name, schedule, t):
    x = wild((4, 2, 5), 5)
    tt = torch.tensor(t, dtype=torch.float64)

    def model(x, t_):
        return model_output(prediction, x, float(t_), schedule)

    ode = DiffusionODE(
        model,
        schedule,
        prediction,
        extrapolate,
        thresholding=kind,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=2.5,
    )
    # the formula, independently: numpy thresholding of the model's x0, then eps = (x - alpha x0) / sigma
    x0 = x0_model(x, tt).numpy()
    x0 = np.clip(x0, -2.5, 2.5) if kind == "static" else numpy_dynamic(x0, 0.9, 2.5)
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    expected = x0 if extrapolate == "x0" else (x.numpy() - a * x0) / s
    np.testing.assert_allclose(ode.nonlinear(tt, x).numpy(), expected, rtol=1e-10, atol=1e-10)
    # and the full drift is L x + W N with that N
    full = ode.linear_part(tt) * x + ode.weight_part(tt) * torch.as_tensor(expected)
    torch.testing.assert_close(ode(tt, x), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "flow"])
@pytest.mark.parametrize("extrapolate", ["eps", "x0"])
def test_none_leaves_the_drift_unchanged(prediction, extrapolate):
    schedule = VPSchedule.linear()
    x = wild((3, 4), 6)
    tt = torch.tensor(0.3, dtype=torch.float64)

    def model(x, t_):
        return torch.sin(3 * x) + t_

    plain = DiffusionODE(model, schedule, prediction, extrapolate)
    none = DiffusionODE(model, schedule, prediction, extrapolate, thresholding=None, sample_max_value=7.0)
    assert none.thresholding is None and "thresholding" not in repr(none)
    torch.testing.assert_close(none.nonlinear(tt, x), plain.nonlinear(tt, x), rtol=0, atol=0)
    torch.testing.assert_close(none(tt, x), plain(tt, x), rtol=0, atol=0)
    # a static threshold that never binds only round-trips x0 -> N
    loose = DiffusionODE(model, schedule, prediction, extrapolate, thresholding="static", sample_max_value=1e6)
    torch.testing.assert_close(loose(tt, x), plain(tt, x), rtol=1e-12, atol=1e-12)


def test_subclasses_and_repr_carry_the_options():
    ve = VEODE(x0_model, VESchedule(), "x0", thresholding="static", sample_max_value=3.0)
    assert ve.thresholding == "static" and ve.sample_max_value == 3.0
    vp = VPODE(x0_model, VPSchedule.linear(), "x0", "x0", thresholding="dynamic", dynamic_thresholding_ratio=0.9)
    assert "thresholding='dynamic'" in repr(vp) and "dynamic_thresholding_ratio=0.9" in repr(vp)


@pytest.mark.parametrize("extrapolate", ["eps", "x0"])
@pytest.mark.parametrize("method", ["deis1", "deis2", "deis3", "deis4"])
def test_sample_lies_within_the_static_range(extrapolate, method):
    # Sampling to t = 0 (sigma = 0), the last step of deis1 (or of any deis* with lower_order_final) returns
    # alpha(0) times the last data prediction: the thresholded x0 of a wild model, inside [-max, max].
    schedule = VPSchedule.linear()
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grid = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    options = {"lower_order_final": True}
    wild_ode = VPODE(x0_model, schedule, "x0", extrapolate)
    unclipped = torchdiffeq.odeint(wild_ode, x_T, grid, method=method, options=options)[-1]
    assert unclipped.abs().max() > 5.0  # without thresholding the sample is far out
    ode = VPODE(x0_model, schedule, "x0", extrapolate, thresholding="static", sample_max_value=1.5)
    sample = torchdiffeq.odeint(ode, x_T, grid, method=method, options=options)[-1]
    assert torch.isfinite(sample).all()
    assert sample.abs().max() <= 1.5 * (1 + 1e-12)
    assert sample.abs().max() >= 1.5 * (1 - 1e-12)  # the threshold binds


def test_dynamic_sample_lies_within_unit_range():
    schedule = VPSchedule.linear()
    x_T = torch.randn(32, 2, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grid = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    ode = VPODE(x0_model, schedule, "x0", thresholding="dynamic", dynamic_thresholding_ratio=0.9, sample_max_value=4.0)
    sample = torchdiffeq.odeint(ode, x_T, grid, method="deis3", options={"lower_order_final": True})[-1]
    assert sample.abs().max() <= 1.0 + 1e-12
