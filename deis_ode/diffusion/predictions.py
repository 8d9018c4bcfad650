r"""Exact conversions of a diffusion model's output to a noise (eps) or data (x0) prediction.

With ``x = alpha x0 + sigma eps`` every supported output is linear in ``(x0, eps)``, so each conversion is
``target = c_x x + c_out output`` with scalar coefficients depending only on the schedule:

* ``"eps"``: the noise. ``eps = output``, ``x0 = (x - sigma output) / alpha``.
* ``"x0"`` (diffusers' ``"sample"``): the data. ``eps = (x - alpha output) / sigma``, ``x0 = output``.
* ``"v"``: ``v = alpha eps - sigma x0``. ``eps = (sigma x + alpha v) / (alpha^2 + sigma^2)``,
  ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``.
* ``"score"``: ``grad_x log p_t(x) = -eps / sigma``. ``eps = -sigma output``, ``x0 = (x + sigma^2 output) / alpha``.
* ``"flow"``: the velocity ``u = dx/dt = alpha' x0 + sigma' eps``. ``eps = (alpha u - alpha' x) / D``,
  ``x0 = (sigma' x - sigma u) / D``,

where ``alpha' = d alpha / dt``, ``sigma' = d sigma / dt`` and ``D = alpha sigma' - sigma alpha'`` is the determinant
of the 2x2 system ``[x; u] = [[alpha, sigma], [alpha', sigma']] [x0; eps]`` (``D = -alpha sigma d lambda / dt > 0``).

The coefficients are computed in float64 and applied in the dtype of ``x``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["PREDICTION_TYPES", "check_prediction", "conversion_coefficients", "to_eps", "to_x0"]

PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v", "score", "flow")
"""The model output types understood by :func:`to_eps` and :func:`to_x0`."""

Scalar = Tensor | float


def check_prediction(prediction: str) -> str:
    """Return ``prediction`` if it is one of :data:`PREDICTION_TYPES`, else raise ``ValueError`` listing them."""
    if not isinstance(prediction, str) or prediction not in PREDICTION_TYPES:
        valid = ", ".join(repr(p) for p in PREDICTION_TYPES)
        raise ValueError(f"unknown prediction type {prediction!r}; valid types are {valid}")
    return prediction


def _f64(value: Scalar) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def conversion_coefficients(
    prediction: str,
    target: Literal["eps", "x0"],
    alpha: Scalar,
    sigma: Scalar,
    d_alpha: Scalar | None = None,
    d_sigma: Scalar | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Float64 coefficients ``(c_x, c_out)`` with ``target = c_x x + c_out output`` (see the module table).

    Args:
        prediction: what the model outputs, one of :data:`PREDICTION_TYPES`.
        target: ``"eps"`` or ``"x0"``.
        alpha, sigma: the schedule at the current time (numbers or tensors broadcastable against ``x``).
        d_alpha, d_sigma: ``d alpha / dt`` and ``d sigma / dt``; required for ``"flow"`` only.
    """
    check_prediction(prediction)
    if target not in ("eps", "x0"):
        raise ValueError(f"target must be 'eps' or 'x0', got {target!r}")
    a, s = _f64(alpha), _f64(sigma)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    if prediction == "eps":
        return (zero, one) if target == "eps" else (1.0 / a, -s / a)
    if prediction == "x0":
        return (1.0 / s, -a / s) if target == "eps" else (zero, one)
    if prediction == "v":
        norm = a * a + s * s
        return (s / norm, a / norm) if target == "eps" else (a / norm, -s / norm)
    if prediction == "score":
        return (zero, -s * one) if target == "eps" else (1.0 / a, s * s / a)
    # flow
    if d_alpha is None or d_sigma is None:
        raise ValueError("the 'flow' prediction needs d_alpha and d_sigma (the time derivatives of alpha and sigma)")
    da, ds = _f64(d_alpha), _f64(d_sigma)
    det = a * ds - s * da
    return (-da / det, a / det) if target == "eps" else (ds / det, -s / det)


def _convert(
    target: Literal["eps", "x0"],
    output: Tensor,
    x: Tensor,
    alpha: Scalar,
    sigma: Scalar,
    prediction: str,
    d_alpha: Scalar | None,
    d_sigma: Scalar | None,
) -> Tensor:
    if output.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(output.shape)}; expected the state's shape {tuple(x.shape)}")
    if prediction == target:
        return output
    c_x, c_out = conversion_coefficients(prediction, target, alpha, sigma, d_alpha, d_sigma)
    c_x = c_x.to(device=x.device, dtype=x.dtype)
    c_out = c_out.to(device=x.device, dtype=x.dtype)
    if prediction == "score":  # eps = -sigma score has no x term
        return c_out * output if target == "eps" else c_x * x + c_out * output
    return c_x * x + c_out * output


def to_eps(
    output: Tensor,
    x: Tensor,
    alpha: Scalar,
    sigma: Scalar,
    prediction: str = "eps",
    *,
    d_alpha: Scalar | None = None,
    d_sigma: Scalar | None = None,
) -> Tensor:
    r"""The noise prediction ``eps`` from a model ``output`` of type ``prediction`` at state ``x``.

    ``alpha``, ``sigma`` (and, for ``"flow"``, ``d_alpha``, ``d_sigma``) are numbers or tensors broadcastable
    against ``x``. The result has ``x``'s dtype and device.
    """
    return _convert("eps", output, x, alpha, sigma, check_prediction(prediction), d_alpha, d_sigma)


def to_x0(
    output: Tensor,
    x: Tensor,
    alpha: Scalar,
    sigma: Scalar,
    prediction: str = "eps",
    *,
    d_alpha: Scalar | None = None,
    d_sigma: Scalar | None = None,
) -> Tensor:
    r"""The data prediction ``x0`` from a model ``output`` of type ``prediction`` at state ``x``.

    ``alpha``, ``sigma`` (and, for ``"flow"``, ``d_alpha``, ``d_sigma``) are numbers or tensors broadcastable
    against ``x``. The result has ``x``'s dtype and device.
    """
    return _convert("x0", output, x, alpha, sigma, check_prediction(prediction), d_alpha, d_sigma)
