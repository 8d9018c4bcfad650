"""Model-output conversions: every prediction type, built from its definition, converts back to eps and x0."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deis_ode.diffusion import PREDICTION_TYPES, to_eps, to_x0

F64 = torch.float64


def _outputs(x0: torch.Tensor, eps: torch.Tensor, a: float, s: float, da: float, ds: float) -> dict[str, torch.Tensor]:
    """Each model output written from its definition (not from the library's inverse formulas)."""
    return {
        "eps": eps,
        "x0": x0,
        "v": a * eps - s * x0,
        "score": -eps / s,  # grad log N(x; a x0, s^2 I) evaluated at x = a x0 + s eps
        "flow": da * x0 + ds * eps,  # d/dt (alpha_t x0 + sigma_t eps)
    }


@settings(max_examples=200, deadline=None)
@given(
    a=st.floats(0.05, 1.0),
    s=st.floats(0.05, 5.0),
    da=st.floats(-5.0, 0.0),
    ds=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_prediction_converts_back_exactly(a: float, s: float, da: float, ds: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, generator=gen, dtype=F64)
    eps = torch.randn(3, 4, generator=gen, dtype=F64)
    x = a * x0 + s * eps
    for prediction, output in _outputs(x0, eps, a, s, da, ds).items():
        kwargs = {"d_alpha": da, "d_sigma": ds} if prediction == "flow" else {}
        got_eps = to_eps(output, x, a, s, prediction, **kwargs)
        got_x0 = to_x0(output, x, a, s, prediction, **kwargs)
        # The conversions amplify round-off by at most ~ (1 + s/a)(1 + a/s) over these ranges.
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-11, msg=f"eps from {prediction}")
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-11, msg=f"x0 from {prediction}")


@settings(max_examples=50, deadline=None)
@given(t=st.floats(1e-3, 1.0), seed=st.integers(0, 2**31 - 1))
def test_vp_v_prediction_textbook_form(t: float, seed: int) -> None:
    # On a VP schedule alpha^2 + sigma^2 = 1, so eps = sigma x + alpha v and x0 = alpha x - sigma v.
    import math

    log_alpha = -(19.9 * t * t / 4 + 0.1 * t / 2)
    a = math.exp(log_alpha)
    s = math.sqrt(-math.expm1(2 * log_alpha))
    gen = torch.Generator().manual_seed(seed)
    x, v = torch.randn(2, 5, generator=gen, dtype=F64)
    torch.testing.assert_close(to_eps(v, x, a, s, "v"), s * x + a * v, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(to_x0(v, x, a, s, "v"), a * x - s * v, rtol=1e-13, atol=1e-13)


def test_tensor_coefficients_broadcast_per_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=gen, dtype=F64)
    eps = torch.randn(4, 3, generator=gen, dtype=F64)
    a = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=F64)[:, None]
    s = torch.sqrt(1 - a**2)
    x = a * x0 + s * eps
    torch.testing.assert_close(to_eps(a * eps - s * x0, x, a, s, "v"), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_x0(eps, x, a, s, "eps"), x0, rtol=0, atol=1e-12)


def test_identity_conversions_return_output_and_keep_dtype() -> None:
    x = torch.randn(2, 3, dtype=torch.float32)
    out = torch.randn(2, 3, dtype=torch.float32)
    assert to_eps(out, x, 0.5, 0.8, "eps") is out
    assert to_x0(out, x, 0.5, 0.8, "x0") is out
    for prediction in ("x0", "v", "score"):
        assert to_eps(out, x, 0.5, 0.8, prediction).dtype == torch.float32
        assert to_x0(out, x, torch.tensor(0.5, dtype=F64), 0.8, prediction).dtype == torch.float32
    assert to_eps(out, x, 0.5, 0.8, "flow", d_alpha=-1.0, d_sigma=1.0).dtype == torch.float32


def test_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="'eps', 'x0', 'v', 'score', 'flow'"):
        to_eps(x, x, 1.0, 1.0, "sample")
    with pytest.raises(ValueError, match="unknown prediction"):
        to_x0(x, x, 1.0, 1.0, "epsilon")
    with pytest.raises(ValueError, match="d_alpha and d_sigma"):
        to_eps(x, x, 1.0, 1.0, "flow")
    with pytest.raises(ValueError, match="shape"):
        to_eps(torch.zeros(3, 2), x, 1.0, 1.0, "v")
    assert PREDICTION_TYPES == ("eps", "x0", "v", "score", "flow")
