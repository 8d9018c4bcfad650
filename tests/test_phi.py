"""phi-functions and single-step coefficients against independent references (mpmath, scipy quad)."""

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.integrate import quad

from deis_ode.forms import LinearForm
from deis_ode.solvers.coefficients import exponential_weights, lagrange_monomials, step_coefficients
from deis_ode.solvers.phi import phi_functions, phi_functions_host

F64 = torch.float64


def mp_phi(z, k):
    """phi_k(z) = (e^z - sum_{m<k} z^m/m!) / z^k with enough digits to survive the cancellation."""
    with mpmath.workdps(80):
        z = mpmath.mpmathify(z)
        if z == 0:
            return complex(1 / mpmath.factorial(k))
        return complex((mpmath.exp(z) - sum(z**m / mpmath.factorial(m) for m in range(k))) / z**k)


REAL_Z = np.concatenate(
    [
        -np.logspace(-10, 4, 60),
        [0.0],
        np.logspace(-10, 2, 50),
        [-1.0, 1.0, -0.999, 1.001, -1 - 1e-12, -1 + 1e-12, 1 - 1e-12, 1 + 1e-12],
    ]
)
IMAG_Z = [complex(0, y) for y in np.concatenate([np.logspace(-8, 3, 40), -np.logspace(-3, 2, 10)])]
MIXED_Z = [complex(x, y) for x in (-50.0, -3.0, -0.7, 0.2, 0.9) for y in (-7.0, -0.3, 0.6, 2.5)]


@pytest.mark.parametrize("zs", [REAL_Z, IMAG_Z, MIXED_Z], ids=["real", "imaginary", "complex"])
@pytest.mark.parametrize("host", [False, True], ids=["torch", "numpy"])
def test_phi_functions_match_mpmath(zs, host):
    dtype = torch.float64 if isinstance(zs[0], float) else torch.complex128
    z = torch.tensor(np.asarray(zs), dtype=dtype)
    phis = torch.from_numpy(phi_functions_host(z.numpy(), 5)) if host else phi_functions(z, 5)
    worst = 0.0
    for k in range(6):
        for i, zi in enumerate(zs):
            ref = mp_phi(zi, k)
            if ref == 0:
                continue
            worst = max(worst, abs(complex(phis[k, i].item()) - ref) / abs(ref))
    assert worst < 1e-13


def test_lagrange_monomials_interpolate():
    theta = torch.tensor([0.0, -0.8, -2.1, -3.5], dtype=F64)
    a = lagrange_monomials(theta)
    vander = theta[:, None] ** torch.arange(4, dtype=F64)
    assert torch.allclose(vander @ a.T, torch.eye(4, dtype=F64), atol=1e-13)


def _lagrange(nodes, j, x):
    out = 1.0
    for i, n in enumerate(nodes):
        if i != j:
            out *= (x - n) / (nodes[j] - n)
    return out


@pytest.mark.parametrize("lam", [-1e4, -250.0, -3.0, -1e-9, 0.0, 1e-9, 0.8, 20.0])
def test_exponential_weights_match_quadrature(lam):
    """C_j = h int_0^1 e^{z(1-s)} l_j(s) ds, for stiff, tiny and growing z, against mpmath quadrature."""
    h = 0.37
    theta = [0.0, -0.6, -1.7, -2.2]
    z64, h64 = torch.tensor(lam * h, dtype=F64), torch.tensor(h, dtype=F64)
    weights = exponential_weights(z64, h64, torch.tensor(theta, dtype=F64))
    with mpmath.workdps(40):
        z = mpmath.mpf(lam) * mpmath.mpf(h)
        # split where the kernel e^{z(1-s)} has decayed, so the quadrature resolves the boundary layer
        cut = 1 - min(mpmath.mpf(1), 40 / max(abs(z), mpmath.mpf("1e-30")))
        for j in range(4):
            ref = h * mpmath.quad(lambda s, j=j: mpmath.exp(z * (1 - s)) * _lagrange(theta, j, s), [0, cut, 1])
            assert abs(weights[j].item() - float(ref)) <= 1e-13 * abs(float(ref))


def test_quadrature_path_matches_closed_form():
    """A constant weight W = 1 given as a callable takes the Gauss-Legendre path; it must agree with the
    phi-function closed form, and so must a 'time-varying' L that happens to be constant."""
    lin = torch.tensor([-3.0, 0.5, -40.0, 2.0 + 0j], dtype=torch.complex128)
    t_a, t_b = torch.tensor(0.3, dtype=F64), torch.tensor(0.45, dtype=F64)
    nodes = torch.tensor([0.3, 0.2, 0.12, 0.05], dtype=F64)
    closed = step_coefficients(LinearForm(lin), "t", t_a, t_b, nodes)
    weighted = step_coefficients(LinearForm(lin, weight_fn=lambda t: torch.ones((), dtype=F64)), "t", t_a, t_b, nodes)
    varying = step_coefficients(LinearForm(None, linear_fn=lambda t: lin), "t", t_a, t_b, nodes)
    for other in (weighted, varying):
        assert torch.allclose(other[0], closed[0], rtol=1e-13, atol=0)
        assert torch.allclose(other[1], closed[1], rtol=1e-13, atol=1e-16)


def test_time_varying_linear_part_against_quad():
    d = torch.tensor([1.0, 4.0], dtype=F64)
    form = LinearForm(
        None, linear_fn=lambda t: -(1 + 0.5 * torch.sin(t)) * d, weight_fn=lambda t: 1 + 0.3 * torch.cos(t)
    )
    t_a, t_b = torch.tensor(0.9, dtype=F64), torch.tensor(0.7, dtype=F64)  # a step backwards in time
    nodes = torch.tensor([0.9, 1.05, 1.2], dtype=F64)
    transition, weights = step_coefficients(form, "t", t_a, t_b, nodes)

    def log_phi(e, b, s):  # int_s^b L exactly
        return -d[e].item() * ((b - s) - 0.5 * (math.cos(b) - math.cos(s)))

    for e in range(2):
        assert transition[e].item() == pytest.approx(math.exp(log_phi(e, 0.7, 0.9)), rel=1e-14)
        for j in range(3):
            ref = quad(
                lambda s, e=e, j=j: (
                    math.exp(log_phi(e, 0.7, s)) * (1 + 0.3 * math.cos(s)) * _lagrange(nodes.tolist(), j, s)
                ),
                0.9,
                0.7,
                epsabs=0,
                epsrel=1e-13,
            )[0]
            assert weights[j, e].item() == pytest.approx(ref, rel=1e-12)


def test_coefficients_are_differentiable_in_the_linear_part():
    lin = torch.tensor(-1.3, dtype=F64, requires_grad=True)
    h = torch.tensor(0.2, dtype=F64)
    weights = exponential_weights(lin * h, h, torch.tensor([0.0, -1.0], dtype=F64))
    (grad,) = torch.autograd.grad(weights.sum(), lin)
    eps = 1e-6
    up = exponential_weights((lin.detach() + eps) * h, h, torch.tensor([0.0, -1.0], dtype=F64)).sum()
    down = exponential_weights((lin.detach() - eps) * h, h, torch.tensor([0.0, -1.0], dtype=F64)).sum()
    assert grad.item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-7)
