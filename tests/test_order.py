"""Observed order of deis1..deis4 against the scipy reference on random smooth semi-linear problems.

The default (full-order) warm-up must show order K, the lower-order warm-up about min(K, 2) on uniform
grids; both on uniform and on rough non-uniform grids, for scalar, diagonal and time-varying linear parts
of either sign, integrating forwards or backwards in time.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deis_ode import SemiLinearODE, reference
from deis_ode.verify import empirical_order

F64 = torch.float64
DIM = 3
# step counts in the asymptotic regime of each order (errors from ~1e-4 down to ~1e-10)
STEPS = {1: (16, 32, 64), 2: (32, 64, 128), 3: (32, 64, 128), 4: (48, 96, 192)}


def random_smooth_problem(seed: int, kind: str, sign: str):
    """A smooth problem whose N varies on an O(1) time scale, so that 16..64 steps are asymptotic."""
    rng = np.random.default_rng(seed)
    magnitude = rng.uniform(0.2, 1.0, size=DIM)
    signs = {"negative": -1.0, "positive": 1.0, "mixed": rng.choice([-1.0, 1.0], size=DIM)}[sign]
    d = torch.tensor(signs * magnitude, dtype=F64)
    if kind == "scalar":
        lin = d[0]
    elif kind == "diagonal":
        lin = d
    else:
        omega = rng.uniform(0.5, 2.0)

        def lin(t, d=d, omega=omega):
            return d * (1.0 + 0.5 * torch.sin(omega * t))

    a = torch.tensor(rng.uniform(0.3, 1.0, size=DIM), dtype=F64)
    b = torch.tensor(rng.uniform(-0.5, 0.5, size=DIM), dtype=F64)
    w = float(rng.uniform(0.5, 1.5))

    def nonlinear(t, x):
        return a * torch.sin(w * t + b * x) + 0.3 * torch.tanh(x.roll(1, -1))

    x0 = torch.tensor(rng.uniform(-1.0, 1.0, size=DIM), dtype=F64)
    return SemiLinearODE(lin, nonlinear), x0


problems = dict(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["scalar", "diagonal", "time-varying"]),
    sign=st.sampled_from(["negative", "positive", "mixed"]),
    grid=st.sampled_from(["uniform", "random"]),
    backwards=st.booleans(),
)
quick = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _measure(method, seed, kind, sign, grid, backwards, warmup, steps):
    ode, x0 = random_smooth_problem(seed, kind, sign)
    t0, t1 = (1.0, 0.0) if backwards else (0.0, 1.0)
    ref = reference.solve(ode, x0, torch.tensor([t0, t1], dtype=F64), rtol=1e-13, atol=1e-13)
    return empirical_order(
        method, ode, x0, t0, t1, steps=steps, grid=grid, options={"warmup": warmup}, reference=ref, seed=seed
    )


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@quick
@given(**problems)
def test_full_order_warmup_shows_order_k(order, seed, kind, sign, grid, backwards):
    steps = STEPS[order]
    table = _measure(f"deis{order}", seed, kind, sign, grid, backwards, "full_order", steps)
    assert min(table.errors) > 1e-11, table  # above the reference's own accuracy
    assert abs(table.slope - order) <= 0.2, str(table)


@pytest.mark.parametrize("order", [3, 4])
@quick
@given(**{k: v for k, v in problems.items() if k != "grid"})
def test_lower_order_warmup_caps_the_order_at_two(order, seed, kind, sign, backwards):
    table = _measure(f"deis{order}", seed, kind, sign, "uniform", backwards, "lower_order", (32, 64, 128))
    assert abs(table.slope - 2.0) <= 0.2, str(table)
