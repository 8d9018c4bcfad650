"""Stiff linear parts: orders without order reduction, stability at |h L| = 1e4, dense matrix linear parts,
and coefficient accuracy over the stiff range in float64 and float32."""

import math

import mpmath
import numpy as np
import pytest
import torch
import torchdiffeq

from deis_ode import SemiLinearODE
from deis_ode.solvers.coefficients import exponential_weights, matrix_phi_functions
from deis_ode.solvers.phi import phi_functions
from deis_ode.verify import empirical_order

F64 = torch.float64
STIFF = -torch.logspace(0, 4, 9, dtype=F64)  # L from -1 to -1e4


def manufactured(lin, matrix=False):
    """dx/dt = L x + N(t, x) with N(t, x) = x*'(t) - L x*(t) + sin(x - x*(t)): the exact solution is x*(t)."""
    c = torch.linspace(0.5, 1.5, lin.shape[-1], dtype=lin.dtype)

    def exact(t):
        return torch.sin(t) * c + torch.cos(2 * t)

    def d_exact(t):
        return torch.cos(t) * c - 2 * torch.sin(2 * t)

    def nonlinear(t, x):
        star = exact(t)
        lx = star @ lin.T if matrix else lin * star
        return d_exact(t) - lx + torch.sin(x - star)

    return SemiLinearODE(lin, nonlinear, matrix=matrix), exact


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_stiff_diagonal_problem_shows_full_order(order):
    ode, exact = manufactured(STIFF)
    t1 = torch.tensor(1.0, dtype=F64)
    steps = {1: (16, 32, 64), 2: (16, 32, 64), 3: (32, 64, 128), 4: (32, 64, 128), 5: (24, 48, 96)}[order]
    table = empirical_order(
        f"deis{order}", ode, exact(torch.tensor(0.0, dtype=F64)), 0.0, 1.0, steps=steps, reference=exact(t1)
    )
    assert abs(table.slope - order) <= 0.2, str(table)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_stable_at_h_l_of_ten_thousand(order):
    """Steps of h = 0.05 with L down to -2e5 (|h L| = 1e4) give the same error as with L down to -1e2: the error
    is set by the smooth part of the solution, not by the stiffness (no instability, no order reduction)."""
    errors = []
    for stiffest in (2.0, 5.3):  # L down to -1e2, then to -2e5
        ode, exact = manufactured(-torch.logspace(0, stiffest, 6, dtype=F64))
        t = torch.linspace(0.0, 1.0, 21, dtype=F64)
        xs = torchdiffeq.odeint(ode, exact(t[0]), t, method=f"deis{order}")
        errors.append((xs[-1] - exact(t[-1])).abs().max().item())
    assert math.isfinite(errors[1]) and errors[1] <= 2.0 * errors[0], errors


def random_matrix(rng, d, stiff=False):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    eig = -np.logspace(0, 3, d) if stiff else rng.uniform(-3, 1, size=d)
    return torch.tensor(q @ np.diag(eig) @ q.T + 0.5 * (q @ np.triu(rng.normal(size=(d, d)), 1) @ q.T), dtype=F64)


def test_matrix_phi_functions_match_the_eigendecomposition():
    rng = np.random.default_rng(0)
    v = torch.tensor(rng.normal(size=(4, 4)), dtype=F64)
    eig = torch.tensor([-300.0, -2.0, -1e-3, 0.7], dtype=F64)
    a = v @ torch.diag(eig) @ torch.linalg.inv(v)
    phis = matrix_phi_functions(a, 4)
    for k in range(5):
        ref = v @ torch.diag(phi_functions(eig, k)[k]) @ torch.linalg.inv(v)
        assert torch.allclose(phis[k], ref, rtol=1e-10, atol=1e-12 * ref.abs().max())


def test_matrix_linear_part_equals_its_diagonal_version():
    d = torch.tensor([-5.0, -0.5, 0.3], dtype=F64)
    nonlinear = lambda t, x: torch.cos(t + x.roll(1, -1))  # noqa: E731
    x0 = torch.tensor([[0.2, -0.4, 1.0], [1.0, 0.0, -1.0]], dtype=F64)
    t = torch.linspace(0, 1, 11, dtype=F64)
    diag = torchdiffeq.odeint(SemiLinearODE(d, nonlinear), x0, t, method="deis3")
    dense = torchdiffeq.odeint(SemiLinearODE(torch.diag(d), nonlinear, matrix=True), x0, t, method="deis3")
    assert torch.allclose(dense, diag, rtol=1e-13, atol=1e-14)


def test_matrix_forward_is_the_matrix_vector_product_with_a_non_symmetric_l():
    """``forward`` of ``matrix=True`` is ``L x`` for each state row, written out as sums over the last dimension (a
    symmetric ``L`` could not tell ``x @ L.T`` from ``x @ L``); dopri5 on that forward and deis3 on the
    exponential form agree, so both read ``L`` the same way round."""
    a = torch.tensor([[-2.0, 1.5, 0.0], [-0.7, -1.0, 0.9], [0.3, -1.2, -0.5]], dtype=F64)
    assert not torch.allclose(a, a.T)
    nonlinear = lambda t, x: 0.3 * torch.cos(t + x)  # noqa: E731
    ode = SemiLinearODE(a, nonlinear, matrix=True)
    x = torch.tensor([[0.2, -0.4, 1.0], [1.0, 0.5, -1.0]], dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    by_hand = torch.tensor(
        [[sum(float(a[i, j]) * float(row[j]) for j in range(3)) for i in range(3)] for row in x], dtype=F64
    )
    torch.testing.assert_close(ode(t, x), by_hand + nonlinear(t, x), rtol=1e-15, atol=1e-15)
    grid = torch.linspace(0, 1, 41, dtype=F64)
    reference = torchdiffeq.odeint(ode, x, grid[[0, -1]], method="dopri5", rtol=1e-12, atol=1e-12)[-1]
    exponential = torchdiffeq.odeint(ode, x, grid, method="deis3")[-1]
    assert float((exponential - reference).abs().max()) < 2e-5  # deis3 on 40 steps: 5e-6; x @ L instead: 0.79


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_dense_matrix_whole_solve_is_exact_for_polynomial_n(order):
    rng = np.random.default_rng(order)
    a = random_matrix(rng, 3)
    coef = torch.tensor(rng.normal(size=(order, 3)), dtype=F64)

    def poly(t):
        return sum(coef[k] * t**k for k in range(order))

    def dpoly(t):
        return sum(k * coef[k] * t ** (k - 1) for k in range(1, order)) if order > 1 else 0 * coef[0]

    ode = SemiLinearODE(a, lambda t, x: dpoly(t) - poly(t) @ a.T, matrix=True)
    t = torch.tensor([0.0, 0.3, 0.45, 0.8, 1.0, 1.35], dtype=F64)
    xs = torchdiffeq.odeint(ode, poly(t[0]), t, method=f"deis{order}", options={"warmup": "full_order"})
    exact = torch.stack([poly(ti) for ti in t])
    assert (xs - exact).abs().max() <= 1e-11 * exact.abs().max()


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_stiff_dense_matrix_shows_full_order(order):
    a = random_matrix(np.random.default_rng(7), 4, stiff=True)
    ode, exact = manufactured(a, matrix=True)
    table = empirical_order(
        f"deis{order}",
        ode,
        exact(torch.tensor(0.0, dtype=F64)),
        0.0,
        1.0,
        steps=(32, 64, 128),
        reference=exact(torch.tensor(1.0, dtype=F64)),
    )
    assert abs(table.slope - order) <= 0.2, str(table)


def mp_weights(z, h, theta, j):
    """h int_0^1 e^{z(1-s)} l_j(s) ds via the mpmath phi-functions at 60 digits."""
    with mpmath.workdps(60):
        z = mpmath.mpmathify(z)
        coeffs = [mpmath.mpf(1)]
        for i, node in enumerate(theta):
            if i == j:
                continue
            denom = mpmath.mpf(theta[j]) - node
            new = [mpmath.mpf(0)] * (len(coeffs) + 1)
            for k, c in enumerate(coeffs):
                new[k + 1] += c / denom
                new[k] -= c * node / denom
            coeffs = new

        def phi(k):
            if z == 0:
                return 1 / mpmath.factorial(k)
            return (mpmath.exp(z) - sum(z**m / mpmath.factorial(m) for m in range(k))) / z**k

        return complex(mpmath.mpf(h) * sum(c * mpmath.factorial(k) * phi(k + 1) for k, c in enumerate(coeffs)))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_coefficient_accuracy_over_the_stiff_and_oscillatory_range(dtype, tol):
    """Relative error of every weight of deis1..deis5 over z in [-1e4, 1e2], on the imaginary axis and off it,
    computed in float64 and applied in ``dtype``."""
    h = 0.25
    # float32 overflows beyond e^88: there the largest positive z is 80 (the weights are then ~1e33)
    zs = [complex(x) for x in -np.logspace(-6, 4, 25)] + [complex(x) for x in np.logspace(-6, 2, 12)]
    if dtype == torch.float32:
        zs = [z for z in zs if z.real <= 80.0] + [80.0 + 0j]
    zs += [complex(0, y) for y in np.logspace(-4, 3, 15)] + [complex(-x, y) for x in (0.5, 40.0) for y in (3.0, 300.0)]
    worst = 0.0
    for order in (1, 2, 3, 4, 5):
        theta = [0.0, -1.0, -2.3, -3.1, -4.0][:order]
        z = torch.tensor(zs, dtype=torch.complex128)
        weights = exponential_weights(z, torch.tensor(h, dtype=F64), torch.tensor(theta, dtype=F64))
        weights = weights.to(torch.complex64 if dtype == torch.float32 else torch.complex128)
        for j in range(order):
            for i, zi in enumerate(zs):
                ref = mp_weights(zi, h, theta, j)
                worst = max(worst, abs(complex(weights[j, i]) - ref) / abs(ref))
    assert worst <= tol
    assert math.isfinite(worst)
