"""The integration grid of a solve, prepared once: validation, subdivision, output indices, one float64 host copy.

Every front end (the torchdiffeq methods and :func:`deis_ode.sdeint`) calls :func:`prepare_grid`; nothing else checks
or subdivides a grid.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Grid", "prepare_grid"]


@dataclass(frozen=True)
class Grid:
    """A prepared grid.

    Attributes:
        times: the grid, float64 on the CPU, strictly increasing in the solver's time.
        outputs: the index in ``times`` of each requested time, in the order requested.
    """

    times: Tensor
    outputs: list[int]


def _host(values: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        if values.requires_grad:
            raise ValueError(
                f"{name} requires grad, but the deis methods do not differentiate with respect to the time grid (their "
                "coefficients are computed in float64 on the host): pass t.detach(), or use a torchdiffeq method such "
                "as 'rk4' for gradients with respect to t"
            )
        if values.is_complex():
            raise ValueError(f"{name} must be real, got {values.dtype}")
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def check_increasing(values: np.ndarray, name: str, hint: str = "", sign: float = 1.0) -> None:
    """``ValueError`` naming ``name`` unless ``values`` is a 1-D array of at least two finite, strictly increasing
    times. With ``sign = -1`` the values are the negated user times (torchdiffeq reverses a decreasing ``t``): the
    message shows the user's values and asks for a monotone grid."""
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"{name} must be a 1-D tensor with at least two times, got shape {tuple(values.shape)}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf: {values.tolist()}")
    diff = np.diff(values)
    if not (diff > 0).all():
        i = int(np.flatnonzero(diff <= 0)[0])
        word = "increasing" if name == "ts" else "monotone"
        raise ValueError(
            f"{name} must be strictly {word} without repeated times{hint}; entries {i} and {i + 1} are "
            f"{sign * values[i]:.10g} and {sign * values[i + 1]:.10g}"
        )


def subdivide(times: np.ndarray, step_size: float) -> np.ndarray:
    """Every interval of ``times`` split into the fewest equal steps of at most ``step_size`` (the ends kept
    exactly)."""
    a, b = times[:-1], times[1:]
    counts = np.maximum(1, np.ceil((b - a) / step_size - 1e-9).astype(np.int64))
    owner = np.repeat(np.arange(a.size), counts)
    offsets = np.cumsum(counts) - counts
    k = np.arange(owner.size) - offsets[owner] + 1  # 1 .. counts[owner]
    inner = a[owner] + (b[owner] - a[owner]) * (k / counts[owner])
    inner[np.cumsum(counts) - 1] = b  # interval ends exactly
    return np.concatenate([times[:1], inner])


def prepare_grid(
    t: Tensor,
    *,
    name: str = "t",
    sign: float = 1.0,
    step_size: float | None = None,
    grid_constructor: Callable[[], Tensor] | None = None,
    hint: str = "",
    step_name: str = "step_size",
) -> Grid:
    """The grid of a solve over the requested times ``t`` (in the solver's time, which must increase).

    Args:
        t: the requested times; checked to be a 1-D, finite, strictly increasing tensor without grad.
        name: how the error messages name ``t``.
        sign: ``-1`` when the solver's time is the negated user time (torchdiffeq's reversal); only used in messages.
        step_size: split every interval of ``t`` into the fewest equal steps of at most this size (a positive
            number; not a bool), so every requested time is a grid point.
        grid_constructor: a function returning a grid (in the solver's time) that starts at ``t[0]`` and ends at
            ``t[-1]``; the requested times are merged in.
        hint: appended to the monotonicity message.
        step_name: how the error messages name ``step_size``.

    Raises:
        ValueError: a malformed ``t``, ``step_size`` or constructed grid, naming which.
    """
    values = _host(t, name)
    check_increasing(values, name, hint, sign)
    if step_size is not None and grid_constructor is not None:
        raise ValueError(f"options {step_name} and grid_constructor are mutually exclusive")
    if step_size is not None:
        if (
            isinstance(step_size, bool)
            or not isinstance(step_size, numbers.Real)
            or not (math.isfinite(step_size) and step_size > 0)
        ):
            raise ValueError(f"{step_name} must be a positive finite number, got {step_size!r}")
        grid = subdivide(values, float(step_size))
    elif grid_constructor is not None:
        constructed = _host(torch.as_tensor(grid_constructor()), "the grid from grid_constructor")
        check_increasing(constructed, "the grid from grid_constructor", sign=sign)
        if constructed[0] != values[0] or constructed[-1] != values[-1]:
            raise ValueError(
                "grid_constructor must return a grid that starts at t[0] and ends at t[-1]; got "
                f"[{sign * constructed[0]:.10g}, {sign * constructed[-1]:.10g}] for t from {sign * values[0]:.10g} to "
                f"{sign * values[-1]:.10g}"
            )
        grid = np.union1d(constructed, values)
    else:
        grid = values
    outputs = np.searchsorted(grid, values).tolist()
    return Grid(torch.from_numpy(np.ascontiguousarray(grid)), outputs)
