r"""Sampling time grids for diffusion probability-flow ODEs.

:func:`timesteps` returns ``n + 1`` strictly decreasing float64 times in the schedule's own time, from ``t_start``
(noise) to ``t_end`` (data), ready to be passed as ``t`` to ``torchdiffeq.odeint``. With the names of
:mod:`deis_ode.diffusion.schedules` (``lambda = log(alpha / sigma)``, ``rho = sigma / alpha = exp(-lambda)``) the
spacings are, for ``i = 0 .. n``:

* ``"uniform"``: ``t_i = t_start + i / n (t_end - t_start)``;
* ``"power"``: ``t_i = (t_start^(1/p) + i / n (t_end^(1/p) - t_start^(1/p)))^p`` with ``p = power`` (``p = 2`` is the
  quadratic grid of the DEIS paper);
* ``"logsnr"``: uniform in ``lambda``, mapped back with ``t_of_half_log_snr``;
* ``"karras"``: ``rho_i = (rho_max^(1/r) + i / n (rho_min^(1/r) - rho_max^(1/r)))^r`` with ``r = rho`` (Karras et al.
  2022, whose ``sigma`` is our ``rho``), mapped back through ``lambda = -log rho``;
* ``"linspace"``, ``"leading"``, ``"trailing"``: the integer timesteps of diffusers' multistep schedulers (DEIS,
  DPM-Solver, UniPC) for ``N = num_train_timesteps`` training steps, followed by ``t_end``; see
  :func:`diffusers_timesteps`.

Ends where ``lambda`` is infinite (``alpha = 0`` at the start of a flow-matching grid, ``sigma = 0`` at the end of
an EDM or flow grid) cannot take part in a formula in ``lambda`` or ``rho``. There, ``"logsnr"`` and ``"karras"``
place only that end point and spread the other points by the formula over a finite range, as Karras et al. do
when they append ``sigma = 0`` to their grid:

* an end at ``sigma = 0`` is replaced in the formula by the schedule's ``sigma_min`` attribute (the smallest
  positive ``rho``; :class:`~deis_ode.diffusion.EDMSchedule` has one) when it has one below the other end's
  ``rho``, else by the time one uniform step ``(t_start - t_end) / n`` above ``t_end``;
* an end at ``alpha = 0`` is replaced by the time one uniform step below ``t_start``.

So with ``sigma = 0`` at ``t_end`` (and a finite start) the first ``n`` points follow the formula from
``t_start`` to the replacement and the last one is ``t_end``: for an EDM schedule, ``"karras"`` is exactly the
``n``-step grid of Karras et al. (``n`` values from ``sigma_max`` to ``sigma_min``, then 0).

Every grid starts exactly at ``t_start`` and ends exactly at ``t_end``. A point that is not strictly below its
predecessor (rounding can make two neighbours equal when the range is tiny compared with ``n``, and a diffusers
spacing can put its last timestep on ``t_end``) is dropped, so a grid never repeats a point and never has a
zero-length step; it then has fewer than ``n + 1`` points. This happens only in such degenerate cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .schedules import EDMSchedule, NoiseSchedule, as_float64

__all__ = ["DIFFUSERS_SPACINGS", "SIGMA_RAMPS", "SPACINGS", "diffusers_timesteps", "sigma_ramp", "timesteps"]

DIFFUSERS_SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing")
"""The ``timestep_spacing`` options of diffusers' schedulers."""

SPACINGS: tuple[str, ...] = ("uniform", "power", "logsnr", "karras", *DIFFUSERS_SPACINGS)
"""The spacings understood by :func:`timesteps`."""

_F64 = torch.float64


def timesteps(
    schedule: NoiseSchedule,
    n: int | None = None,
    spacing: str | None = None,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    power: float = 2.0,
    rho: float = 7.0,
    num_train_timesteps: int | None = None,
    steps_offset: int = 0,
    sigmas: Tensor | Sequence[float] | None = None,
    times: Tensor | Sequence[float] | None = None,
) -> Tensor:
    r"""``n + 1`` strictly decreasing float64 times (on the CPU) from ``t_start`` to ``t_end`` for ``n`` steps.

    Args:
        schedule: the :class:`~deis_ode.diffusion.NoiseSchedule`; times are in its own time.
        n: the number of steps (``>= 1``). May be omitted with ``times`` or ``sigmas``; if given, it must equal
            their length minus one.
        spacing: one of :data:`SPACINGS` (see the module docstring); default ``"power"``, and ``"karras"`` for an
            :class:`~deis_ode.diffusion.EDMSchedule` (whose time is the noise level itself, over four decades: the
            quadratic grid in it gave 0.85 median error at 5 evaluations where ``"karras"`` gave 0.37, in
            ``benchmarks/family.py``). Not allowed together with ``times`` or ``sigmas``.
        t_start: the first time; default the schedule's largest time.
        t_end: the last time; default the schedule's smallest time (where ``sigma = 0`` if the schedule reaches it).
        power: the exponent ``p > 0`` of the ``"power"`` spacing.
        rho: the exponent ``r > 0`` of the ``"karras"`` spacing (7 in Karras et al.).
        num_train_timesteps: ``N`` for the diffusers spacings; default the schedule's ``num_train_timesteps``
            (a :class:`~deis_ode.diffusion.DiscreteVPSchedule`).
        steps_offset: added to the ``"leading"`` timesteps, as diffusers' ``steps_offset``.
        sigmas: the grid given as noise-to-signal ratios ``rho = sigma / alpha`` (Karras' ``sigma``), strictly
            monotone; ``0`` and ``inf`` are allowed where the schedule reaches ``sigma = 0`` or ``alpha = 0``.
        times: the grid given as times, strictly monotone, within the time range.

    A grid given by ``times`` or ``sigmas`` is returned in decreasing time, whichever its direction. The diffusers
    spacings fix the first time, so ``t_start`` is not allowed with them; ``t_end`` (default the schedule's smallest
    time) is appended after the last integer timestep.

    Raises:
        ValueError: for ``n < 1``, an unknown spacing (the message lists the valid ones), times outside the
            schedule's time range, ``t_start <= t_end``, a non-monotone ``times`` or ``sigmas``, or conflicting
            arguments.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if times is not None or sigmas is not None:
        if times is not None and sigmas is not None:
            raise ValueError("give the grid as times= or as sigmas=, not both")
        if spacing is not None:
            raise ValueError(f"spacing={spacing!r} cannot be combined with a grid given by times= or sigmas=")
        if t_start is not None or t_end is not None:
            raise ValueError("t_start and t_end cannot be combined with a grid given by times= or sigmas=")
        grid = _from_times(schedule, times) if times is not None else _from_sigmas(schedule, sigmas)
        if n is not None and _check_n(n) != grid.numel() - 1:
            steps = grid.numel() - 1
            raise ValueError(f"n = {n} does not match the given grid of {steps + 1} points ({steps} steps)")
        return grid

    n = _check_n(n)
    spacing = ("karras" if isinstance(schedule, EDMSchedule) else "power") if spacing is None else spacing
    if spacing not in SPACINGS:
        valid = ", ".join(repr(s) for s in SPACINGS)
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings are {valid}")
    lo, hi = schedule.time_range

    if spacing in DIFFUSERS_SPACINGS:
        if t_start is not None:
            raise ValueError(f"spacing {spacing!r} fixes the first time; t_start cannot be given with it")
        end = lo if t_end is None else _check_time(schedule, t_end, "t_end")
        if num_train_timesteps is None:
            num_train_timesteps = getattr(schedule, "num_train_timesteps", None)
            if num_train_timesteps is None:
                raise ValueError(
                    f"spacing {spacing!r} needs num_train_timesteps: pass it, or use a discrete schedule "
                    f"(VPSchedule.diffusers(...) or VPSchedule.discrete(...)); {schedule!r} has none"
                )
        steps = diffusers_timesteps(spacing, n, num_train_timesteps, steps_offset)
        schedule.check_times(steps, f"the {spacing!r} timestep")
        if end > float(steps[-1]):
            raise ValueError(
                f"t_end = {end!r} lies above the last {spacing!r} timestep {float(steps[-1])!r}; it must not"
            )
        return _finish(torch.cat([steps, steps.new_tensor([end])]), float(steps[0]), end)

    start = hi if t_start is None else _check_time(schedule, t_start, "t_start")
    end = lo if t_end is None else _check_time(schedule, t_end, "t_end")
    if not start > end:
        raise ValueError(f"t_start must be greater than t_end (sampling runs from noise to data): {start!r}, {end!r}")
    frac = torch.arange(n + 1, dtype=_F64) / n

    if spacing == "uniform":
        return _finish(start + frac * (end - start), start, end)
    if spacing == "power":
        p = _check_positive(power, "power")
        if end < 0.0:
            raise ValueError(f"the 'power' spacing needs times >= 0, got t_end = {end!r}")
        a, b = start ** (1.0 / p), end ** (1.0 / p)
        return _finish((a + frac * (b - a)) ** p, start, end)
    if spacing == "logsnr":
        return _uniform_in(schedule, n, start, end, lambda lam: lam, lambda u: u)
    r = _check_positive(rho, "rho")
    return _uniform_in(schedule, n, start, end, lambda lam: torch.exp(-lam / r), lambda u: -r * torch.log(u))


def diffusers_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0) -> Tensor:
    r"""The ``n`` integer timesteps (as float64, decreasing) of diffusers' multistep schedulers for ``n`` steps.

    These are the ``timestep_spacing`` rules of diffusers' ``DEISMultistepScheduler`` (and of its DPM-Solver and
    UniPC schedulers), with ``N = num_train_timesteps``; sampling then takes a last step to ``t = 0``:

    * ``"linspace"``: ``round(i (N - 1) / n)`` for ``i = n .. 1``, so with the final ``0`` the ``n + 1`` points
      are ``n + 1`` evenly spaced values over ``[0, N - 1]``, rounded;
    * ``"leading"``: ``i floor(N / (n + 1)) + steps_offset`` for ``i = n .. 1``;
    * ``"trailing"``: ``round(N - i N / n) - 1`` for ``i = 0 .. n - 1``.

    Rounding is numpy's (half to even), on the same float64 values as diffusers (its ``np.arange`` included). Two
    remarks on how these relate to diffusers:

    * ``DDIMScheduler`` uses the same ``"trailing"`` rule, but its ``"linspace"`` and ``"leading"`` rules for
      ``n`` steps are the rules above for ``n + 1`` points (the grid with ``t_end = 0``, for ``steps_offset = 0``):
      its last step runs from its last timestep to beyond ``t = 0``, outside a discrete schedule's range.
    * For some ``(N, n)`` (e.g. ``N = 1000``, ``n = 61``) diffusers' float ``np.arange`` in ``"trailing"`` yields
      one extra timestep ``-1``; it lies outside the training range and is not reproduced.

    Raises:
        ValueError: for an unknown spacing, ``n < 1`` or ``n >= N`` (the ``n + 1`` points ``0 .. N - 1`` would
            not all be distinct integers).
    """
    if spacing not in DIFFUSERS_SPACINGS:
        valid = ", ".join(repr(s) for s in DIFFUSERS_SPACINGS)
        raise ValueError(f"unknown diffusers spacing {spacing!r}; valid ones are {valid}")
    n = _check_n(n)
    big_n = int(num_train_timesteps)
    if big_n != num_train_timesteps or big_n < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    if n >= big_n:
        raise ValueError(f"spacing {spacing!r} needs n < num_train_timesteps = {big_n}, got n = {n}")
    offset = int(steps_offset)
    if offset != steps_offset:
        raise ValueError(f"steps_offset must be an integer, got {steps_offset!r}")
    if spacing == "linspace":
        values = np.round(np.linspace(0, big_n - 1, n + 1))[:0:-1]
    elif spacing == "leading":
        values = np.arange(n, 0, -1) * (big_n // (n + 1)) + offset
    else:
        # numpy's float arange (which steps by its own first difference) as diffusers calls it, cut to n values.
        values = np.round(np.arange(big_n, 0, -(big_n / n))[:n]) - 1
    return torch.from_numpy(np.array(values, dtype=np.float64))  # a copy: positive strides


# --- helpers ------------------------------------------------------------------------------------------------------


def _check_n(n: int | None) -> int:
    if n is None:
        raise ValueError("n, the number of steps, is required unless the grid is given by times= or sigmas=")
    if isinstance(n, bool) or int(n) != n:
        raise ValueError(f"n must be an integer, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (the number of steps), got {n}")
    return int(n)


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_time(schedule: NoiseSchedule, t: float, name: str) -> float:
    t = float(t)
    schedule.check_times(torch.tensor(t, dtype=_F64), name)
    return t


def _finish(points: Tensor, start: float, end: float) -> Tensor:
    """Set the ends exactly and drop every point that is not strictly between its kept predecessor and ``end``."""
    values = points.to(_F64).tolist()
    kept = [start]
    for value in values[1:-1]:
        if end < value < kept[-1]:
            kept.append(value)
    kept.append(end)
    return torch.tensor(kept, dtype=_F64)


def _uniform_in(
    schedule: NoiseSchedule,
    n: int,
    start: float,
    end: float,
    to_var: Callable[[Tensor], Tensor],
    from_var: Callable[[Tensor], Tensor],
) -> Tensor:
    """Points uniform in ``u = to_var(lambda)`` from ``start`` to ``end``, with infinite ends handled as the
    module docstring says. ``from_var`` inverts ``to_var``."""
    if n == 1:
        return torch.tensor([start, end], dtype=_F64)
    lam_start = float(schedule.half_log_snr(torch.tensor(start, dtype=_F64)))
    lam_end = float(schedule.half_log_snr(torch.tensor(end, dtype=_F64)))
    start_inf, end_inf = math.isinf(lam_start), math.isinf(lam_end)
    h = (start - end) / n
    first = lam_start if not start_inf else float(schedule.half_log_snr(torch.tensor(start - h, dtype=_F64)))
    if not end_inf:
        last = lam_end
    else:
        last = float(schedule.half_log_snr(torch.tensor(end + h, dtype=_F64)))
        floor = getattr(schedule, "sigma_min", None)
        if isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0.0 and -math.log(floor) > first:
            last = -math.log(floor)
    m = n + 1 - int(start_inf) - int(end_inf)  # points placed by the formula
    u_first, u_last = to_var(torch.tensor(first, dtype=_F64)), to_var(torch.tensor(last, dtype=_F64))
    if m == 1:
        lam = from_var(0.5 * (u_first + u_last).reshape(1))
    else:
        lam = from_var(u_first + torch.arange(m, dtype=_F64) / (m - 1) * (u_last - u_first))
        lam[0], lam[-1] = first, last  # exactly, not through to_var and back
    middle = schedule.t_of_half_log_snr(lam.clamp(min=first, max=last)).to(_F64).cpu()
    pieces = [torch.tensor([start], dtype=_F64)] if start_inf else []
    pieces.append(middle)
    if end_inf:
        pieces.append(torch.tensor([end], dtype=_F64))
    return _finish(torch.cat(pieces), start, end)


def _from_times(schedule: NoiseSchedule, times: Tensor | Sequence[float]) -> Tensor:
    grid = as_float64(times).detach().cpu().reshape(-1)
    _check_monotone(grid, "times")
    schedule.check_times(grid, "times")
    return grid.flip(0) if bool(grid[0] < grid[-1]) else grid.clone()


def _from_sigmas(schedule: NoiseSchedule, sigmas: Tensor | Sequence[float]) -> Tensor:
    rho = as_float64(sigmas).detach().cpu().reshape(-1)
    _check_monotone(rho, "sigmas")
    if bool((rho < 0.0).any()):
        raise ValueError(f"sigmas (noise-to-signal ratios rho = sigma / alpha) must be >= 0, got {rho.tolist()}")
    if bool(rho[0] < rho[-1]):
        rho = rho.flip(0)
    lo, hi = schedule.time_range
    lam_lo = float(schedule.half_log_snr(torch.tensor(lo, dtype=_F64)))
    lam_hi = float(schedule.half_log_snr(torch.tensor(hi, dtype=_F64)))
    rho_min, rho_max = math.exp(-lam_lo), math.exp(-lam_hi)
    bad = (rho < rho_min * (1.0 - 1e-12)) | (rho > rho_max * (1.0 + 1e-12))
    if bool(bad.any()):
        raise ValueError(
            f"sigma (rho) = {float(rho[bad][0])!r} is outside [{rho_min!r}, {rho_max!r}], the noise-to-signal "
            f"ratios of {schedule!r}"
        )
    lam = -torch.log(rho)  # +inf at rho = 0, -inf at rho = inf
    grid = schedule.t_of_half_log_snr(lam.clamp(min=lam_hi, max=lam_lo)).to(_F64).cpu()
    grid = torch.where(lam >= lam_lo, lo, torch.where(lam <= lam_hi, hi, grid))
    schedule.check_times(grid, "the times of sigmas")
    return _finish(grid, float(grid[0]), float(grid[-1]))


def _check_monotone(values: Tensor, name: str) -> None:
    if values.numel() < 2:
        raise ValueError(f"{name} must hold at least two values (one step), got {values.numel()}")
    if bool(torch.isnan(values).any()):
        raise ValueError(f"{name} contains NaN")
    diff = values[1:] - values[:-1]
    if not (bool((diff > 0.0).all()) or bool((diff < 0.0).all())):
        raise ValueError(f"{name} must be strictly monotone, got {values.tolist()}")


# --- the noise-level ramps of diffusers' schedulers -------------------------------------------------------------

#: The exponent of Karras et al. (2022).
KARRAS_RHO = 7.0
#: The parameters of the Beta distribution of "Beta Sampling is All You Need" (Lee et al. 2024).
BETA_SIGMAS_AB = 0.6
SIGMA_RAMPS: tuple[str, ...] = ("karras", "exponential", "beta")
"""The noise-level ramps of :func:`sigma_ramp` (diffusers' ``use_karras_sigmas``, ``use_exponential_sigmas``,
``use_beta_sigmas``)."""


def sigma_ramp(kind: str, lo: float, hi: float, count: int) -> np.ndarray:
    r"""``count`` noise levels from ``hi`` down to ``lo`` (float64 numpy), as diffusers' schedulers space them:

    * ``"karras"``: uniform in ``level^(1/7)`` (Karras et al. 2022);
    * ``"exponential"``: uniform in ``log level``;
    * ``"beta"``: at the quantiles ``1 - i / (count - 1)`` of a Beta(0.6, 0.6) distribution, mapped to
      ``[lo, hi]``.

    Levels are diffusers' ``sigma``: the noise-to-signal ratio ``rho = sigma / alpha`` of a VP schedule.
    """
    if kind not in SIGMA_RAMPS:
        raise ValueError(f"unknown sigma ramp {kind!r}; valid ones are {SIGMA_RAMPS}")
    if kind == "karras":
        top, bottom = hi ** (1 / KARRAS_RHO), lo ** (1 / KARRAS_RHO)
        return (top + np.linspace(0, 1, count) * (bottom - top)) ** KARRAS_RHO
    if kind == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), count))
    import scipy.stats

    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, count), BETA_SIGMAS_AB, BETA_SIGMAS_AB)
    return np.array([lo + q * (hi - lo) for q in quantiles])
