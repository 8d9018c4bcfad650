r"""Thresholding of the data prediction ``x0`` (Imagen, Saharia et al. 2022, section 2.3).

A model trained on data in ``[-1, 1]`` can predict an ``x0`` far outside that range, especially under strong
classifier-free guidance. Thresholding pulls the prediction back before the sampler uses it:

* ``"static"``: ``x0 <- clamp(x0, -M, M)`` with ``M = sample_max_value``.
* ``"dynamic"``: per sample ``b`` (the first dimension is the batch), let ``s_b`` be the ``ratio``-quantile of
  ``|x0_b|`` over all its other entries, clamped to ``[1, M]``; then ``x0_b <- clamp(x0_b, -s_b, s_b) / s_b``.
  A sample whose quantile is at most 1 is only clipped to ``[-1, 1]``; one with saturated entries is clipped
  and scaled back into ``[-1, 1]``. The output always lies in ``[-1, 1]``.

The names and defaults (``dynamic_thresholding_ratio=0.995``, ``sample_max_value=1.0``) are those of the diffusers
schedulers. The quantile is the linear interpolation between order statistics (numpy's and ``torch.quantile``'s
default), computed by a sort, so it has no size limit. Half-precision inputs are thresholded in float32 and cast
back.

A :class:`~deis_ode.diffusion.DiffusionODE` built with ``thresholding=...`` applies :func:`threshold` to every
data prediction of its model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["THRESHOLDING_TYPES", "check_thresholding", "dynamic_threshold", "static_threshold", "threshold"]

THRESHOLDING_TYPES: tuple[str, ...] = ("dynamic", "static")
"""The values of ``thresholding`` other than ``None``."""


def check_thresholding(
    thresholding: str | None, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0
) -> None:
    """Raise ``ValueError`` for an unknown ``thresholding`` or for parameters outside their range:
    ``0 <= dynamic_thresholding_ratio <= 1``; ``sample_max_value > 0`` (``>= 1`` for ``"dynamic"``)."""
    if thresholding is not None and thresholding not in THRESHOLDING_TYPES:
        valid = ", ".join(repr(k) for k in (None, *THRESHOLDING_TYPES))
        raise ValueError(f"thresholding must be one of {valid}, got {thresholding!r}")
    ratio, max_value = float(dynamic_thresholding_ratio), float(sample_max_value)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must lie in [0, 1], got {dynamic_thresholding_ratio!r}")
    if not (math.isfinite(max_value) and max_value > 0.0):
        raise ValueError(f"sample_max_value must be a positive number, got {sample_max_value!r}")
    if thresholding == "dynamic" and max_value < 1.0:
        raise ValueError(
            f"dynamic thresholding clamps the quantile to [1, sample_max_value]: sample_max_value must be >= 1, "
            f"got {sample_max_value!r}"
        )


def _per_sample_quantile(values: Tensor, q: float) -> Tensor:
    """The ``q``-quantile of each row of a 2-D tensor, interpolated linearly between order statistics."""
    ordered = torch.sort(values, dim=1).values
    position = q * (values.shape[1] - 1)
    below = math.floor(position)
    above = min(below + 1, values.shape[1] - 1)
    fraction = position - below
    return ordered[:, below] + fraction * (ordered[:, above] - ordered[:, below])


def _as_batch(x0: Tensor) -> tuple[Tensor, torch.dtype]:
    if x0.dim() < 1:
        raise ValueError(f"x0 must have a batch dimension first, got a 0-d tensor of shape {tuple(x0.shape)}")
    dtype = x0.dtype
    if dtype not in (torch.float32, torch.float64):
        x0 = x0.float()
    return x0.reshape(x0.shape[0], math.prod(x0.shape[1:])), dtype


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding of a batch ``x0`` (first dimension the batch); see the module docstring.
    An empty batch (or samples without entries) is returned as a copy: there is nothing to threshold."""
    check_thresholding("dynamic", ratio, max_value)
    flat, dtype = _as_batch(x0)
    if flat.numel() == 0:
        return x0.clone()
    s = _per_sample_quantile(flat.abs(), float(ratio))
    s = torch.clamp(s, min=1.0, max=float(max_value)).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def static_threshold(x0: Tensor, max_value: float = 1.0) -> Tensor:
    """``clamp(x0, -max_value, max_value)``."""
    check_thresholding("static", sample_max_value=max_value)
    flat, dtype = _as_batch(x0)
    return torch.clamp(flat, -float(max_value), float(max_value)).reshape(x0.shape).to(dtype)


def threshold(
    x0: Tensor,
    thresholding: str | None,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
) -> Tensor:
    """``x0`` thresholded by ``thresholding`` (``None``: returned unchanged, ``"dynamic"`` or ``"static"``)."""
    check_thresholding(thresholding, dynamic_thresholding_ratio, sample_max_value)
    if thresholding is None:
        return x0
    if thresholding == "dynamic":
        return dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    return static_threshold(x0, sample_max_value)
