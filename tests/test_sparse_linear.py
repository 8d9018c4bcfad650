"""SemiLinearODE with sparse, dense-operator and matrix-free linear parts, integrated by deisK through Krylov
phi-products (deis_ode.solvers.krylov_multistep): order K on a stiff finite-difference problem against scipy,
exactness, agreement between the representations, batched states, and the bad-input errors."""

from __future__ import annotations

import math
import re

import pytest
import scipy.sparse
import torch
import torchdiffeq
from _fd_problem import F64, D, fisher, initial, laplacian
from _subprocess import run_python

import deis_ode  # noqa: F401  (registers the deisK methods)
from deis_ode import SemiLinearODE, reference
from deis_ode.linear import DenseMatrix, KrylovError, MatrixFree, SparseMatrix
from deis_ode.solvers.coefficients import matrix_phi_functions
from deis_ode.solvers.krylov_multistep import operator_step

T_END = 1.0


def solve(ode: SemiLinearODE, x0: torch.Tensor, method: str, steps: int, **options) -> torch.Tensor:
    t = torch.linspace(0, T_END, steps + 1, dtype=F64)
    return torchdiffeq.odeint(ode, x0, t, method=method, options=options)[-1]


@pytest.fixture(scope="module")
def ref() -> torch.Tensor:
    ode = SemiLinearODE(laplacian(), fisher)
    return reference.solve(ode, initial(), [0.0, T_END], method="Radau", rtol=1e-12, atol=1e-13).states[-1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_order_on_sparse_dirichlet_problem(order: int, ref: torch.Tensor) -> None:
    ode = SemiLinearODE(laplacian(), fisher)
    steps = (40, 80, 160) if order == 4 else (20, 40, 80)  # deis4 reaches its asymptotic slope later
    errors = [_rel(solve(ode, initial(), f"deis{order}", m, krylov_tol=1e-13), ref) for m in steps]
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(s - order) < 0.2 for s in slopes), (errors, slopes)
    stats = ode.krylov_stats
    assert stats.calls >= 80 and 1 <= stats.max_dim <= 64


def test_lower_order_warmup_has_order_two(ref: torch.Tensor) -> None:
    ode = SemiLinearODE(laplacian(), fisher)
    errors = [_rel(solve(ode, initial(), "deis3", m, warmup="lower_order", krylov_tol=1e-13), ref) for m in (40, 80)]
    assert abs(math.log2(errors[0] / errors[1]) - 2) < 0.25


def test_exact_for_polynomial_forcing() -> None:
    """N independent of x and quadratic in t: deis3 (full-order warm-up) is exact up to the Krylov tolerance."""
    a = laplacian(20)
    c = [torch.randn(20, dtype=F64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    x0 = initial(20)

    def forcing(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return c[0] + c[1] * t + c[2] * t**2

    got = solve(SemiLinearODE(a, forcing), x0, "deis3", 7, krylov_tol=1e-13)
    phis = matrix_phi_functions(a.to_dense() * T_END, 3)
    exact = phis[0] @ x0 + T_END * phis[1] @ c[0] + T_END**2 * phis[2] @ c[1] + 2 * T_END**3 * phis[3] @ c[2]
    assert _rel(got, exact) < 1e-10


def test_representations_agree_and_explicit_methods_run_the_same_object(ref: torch.Tensor) -> None:
    a = laplacian()
    dense = a.to_dense()
    x0 = initial()
    answers = {
        "coo": solve(SemiLinearODE(a, fisher), x0, "deis3", 40, krylov_tol=1e-13),
        "csr": solve(SemiLinearODE(a.to_sparse_csr(), fisher), x0, "deis3", 40, krylov_tol=1e-13),
        "scipy csr": solve(
            SemiLinearODE(scipy.sparse.csr_matrix(dense.numpy()), fisher), x0, "deis3", 40, krylov_tol=1e-13
        ),
        "dense operator": solve(SemiLinearODE(DenseMatrix(dense), fisher), x0, "deis3", 40, krylov_tol=1e-13),
        "matrix-free": solve(
            SemiLinearODE(MatrixFree(lambda v: v @ dense.T, D, symmetric=True), fisher),
            x0,
            "deis3",
            40,
            krylov_tol=1e-13,
        ),
        "matrix=True": solve(SemiLinearODE(dense, fisher, matrix=True), x0, "deis3", 40),
    }
    base = answers["matrix=True"]  # exact dense phi-functions
    for name, got in answers.items():
        assert _rel(got, base) < 1e-11, name
    sparse_ode = SemiLinearODE(a, fisher)
    assert sparse_ode(torch.tensor(0.0, dtype=F64), x0.expand(3, D)).shape == (3, D)
    rk4 = solve(sparse_ode, x0, "rk4", 2000)  # explicit: stable for h ||A|| < 2.8
    assert _rel(rk4, ref) < 1e-8


def test_batched_states_match_one_at_a_time() -> None:
    a = laplacian()
    x0 = torch.stack([initial(), 0.5 * initial(), initial().flip(0)]).reshape(3, 1, D)
    ode = SemiLinearODE(a, fisher)
    together = solve(ode, x0, "deis2", 30, krylov_tol=1e-13)
    assert together.shape == (3, 1, D)
    for i in range(3):
        alone = solve(ode, x0[i, 0], "deis2", 30, krylov_tol=1e-13)
        assert _rel(together[i, 0], alone) < 1e-11


def test_float32_state(ref: torch.Tensor) -> None:
    ode = SemiLinearODE(laplacian(), fisher)
    got = solve(ode, initial().float(), "deis3", 80)
    assert got.dtype == torch.float32
    assert _rel(got.double(), solve(ode, initial(), "deis3", 80)) < 1e-5


def test_dense_square_tensor_must_say_what_it_is() -> None:
    a = laplacian(10).to_dense()
    with pytest.raises(ValueError, match="matrix=True.*DenseMatrix.*matrix=False"):
        SemiLinearODE(a, fisher)
    SemiLinearODE(a, fisher, matrix=False)  # diagonal symbols of a 2-D field: still possible
    ode = SemiLinearODE(a, fisher, matrix=True)
    assert ode(torch.tensor(0.0), torch.ones(10, dtype=F64)).shape == (10,)


def test_bad_operator_input() -> None:
    a = laplacian(10)
    with pytest.raises(ValueError, match="W = 1"):
        SemiLinearODE(a, fisher, weight=lambda t: t)
    ode = SemiLinearODE(a, fisher)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="does not match the state's shape"):
        torchdiffeq.odeint(ode, torch.ones(11, dtype=F64), t, method="deis2")
    complex_ode = SemiLinearODE(DenseMatrix(1j * a.to_dense()), fisher)
    with pytest.raises(ValueError, match="complex"):
        torchdiffeq.odeint(complex_ode, torch.ones(10, dtype=F64), t, method="deis2")
    with pytest.raises(ValueError, match="need a sparse or operator linear part"):
        torchdiffeq.odeint(
            SemiLinearODE(-1.0, fisher), torch.ones(10, dtype=F64), t, method="deis2", options={"krylov_tol": 1e-8}
        )
    with pytest.raises(ValueError, match="krylov_tol"):
        torchdiffeq.odeint(ode, torch.ones(10, dtype=F64), t, method="deis2", options={"krylov_tol": -1.0})
    with pytest.raises(TypeError, match="sparse matrix or operator"):
        SemiLinearODE(object(), fisher)


def test_failures_name_the_step() -> None:
    a = laplacian(10).to_dense()
    calls = [0]

    def flaky(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = v @ a.T
        return out * float("nan") if calls[0] > 40 else out

    t = torch.linspace(0, 1, 11, dtype=F64)
    with pytest.raises(KrylovError, match="step .* -> .*did not converge"):
        torchdiffeq.odeint(SemiLinearODE(MatrixFree(flaky, 10), fisher), torch.ones(10, dtype=F64), t, method="deis2")

    def nan_after(tt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u * float("nan") if tt > 0.45 else fisher(tt, u)

    with pytest.raises(FloatingPointError, match="grid step 5"):
        torchdiffeq.odeint(
            SemiLinearODE(SparseMatrix(laplacian(10)), nan_after), torch.ones(10, dtype=F64), t, method="deis2"
        )


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1))


def test_advection_diffusion_example_agrees_with_scipy_bdf() -> None:
    """The non-symmetric example in quick mode agrees with scipy BDF (exact sparse Jacobian, rtol 1e-9)."""
    out = run_python("examples/advection_diffusion_fd.py", "--quick", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "symmetric: False" in out.stdout
    assert _number(r"relative difference deis3 - BDF: (\S+)", out.stdout) < 1e-5


def test_reaction_diffusion_example_converges() -> None:
    """The Fisher-KPP example in quick mode is converged (difference from twice the steps) and its mass grows."""
    out = run_python("examples/reaction_diffusion_fd.py", "--quick", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _number(r"relative difference from 100 steps: (\S+)", out.stdout) < 2e-5
    mass = re.search(r"mass = (\S+) \(at t = 0: (\S+)\)", out.stdout)
    assert float(mass.group(1)) > 5 * float(mass.group(2))


@pytest.mark.parametrize("warmup", ["lower_order", "full_order"])
def test_operator_engine_matches_the_diagonal_engine(warmup: str) -> None:
    """A diagonal A given as a sparse matrix (Krylov runner) and as a diagonal tensor (the closed-form engine): the
    same method, warm-up and lower_order_final give the same answer for K = 1..5."""
    d = 12
    diag = -torch.linspace(1.0, 60.0, d, dtype=F64)
    sparse = torch.sparse_coo_tensor(torch.arange(d).repeat(2, 1), diag, (d, d), check_invariants=True)

    def coupled(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x.roll(1, -1)) + torch.cos(3 * t)

    x0 = torch.linspace(-1, 1, d, dtype=F64).expand(2, d)
    t = torch.linspace(0, 1, 13, dtype=F64) ** 1.5  # a non-uniform grid
    for order in range(1, 6):
        for last in (False, True):
            options = {"warmup": warmup, "lower_order_final": last}
            want = torchdiffeq.odeint(SemiLinearODE(diag, coupled), x0, t, method=f"deis{order}", options=options)
            got = torchdiffeq.odeint(
                SemiLinearODE(sparse, coupled), x0, t, method=f"deis{order}", options={**options, "krylov_tol": 1e-13}
            )
            assert _rel(got, want) < 1e-11, (order, last)


def test_operator_step_is_one_exponential_step() -> None:
    """operator_step(A, h, x, ws) = phi_0(hA) x + h sum_k k! phi_{k+1}(hA) ws[k], against dense phi-functions."""
    a = laplacian(15)
    x = initial(15)
    ws = [torch.cos(torch.arange(15, dtype=F64) * (k + 1)) for k in range(3)]
    h = 0.01
    phis = matrix_phi_functions(a.to_dense() * h, 4)
    want = phis[0] @ x + h * sum(math.factorial(k) * phis[k + 1] @ w for k, w in enumerate(ws))
    assert _rel(operator_step(SparseMatrix(a), h, x, ws, tol=1e-13), want) < 1e-11
    assert _rel(operator_step(SparseMatrix(a), h, x, []), phis[0] @ x) < 1e-9


def test_gradients_need_the_adjoint() -> None:
    """Autograd through the Krylov products is refused with a message naming the workaround; odeint_adjoint (deis
    forward pass, dopri5 adjoint) gives the same parameter gradient as the closed-form diagonal path."""
    d = 10
    diag = -torch.linspace(1.0, 5.0, d, dtype=F64)
    sparse = torch.sparse_coo_tensor(torch.arange(d).repeat(2, 1), diag, (d, d), check_invariants=True)
    t = torch.linspace(0, 1, 9, dtype=F64)
    x0 = torch.ones(d, dtype=F64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="odeint_adjoint"):
        torchdiffeq.odeint(SemiLinearODE(sparse, fisher), x0, t, method="deis2")

    class Reaction(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))

        def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(self.w * x)

    grads = []
    for linear in (sparse, diag):
        reaction = Reaction()
        y = torchdiffeq.odeint_adjoint(
            SemiLinearODE(linear, reaction),
            x0.detach(),
            t,
            method="deis3",
            adjoint_method="dopri5",
            adjoint_params=tuple(reaction.parameters()),
            adjoint_rtol=1e-10,
            adjoint_atol=1e-10,
        )[-1]
        y.sum().backward()
        grads.append(reaction.w.grad.item())
    assert abs(grads[0] - grads[1]) < 1e-9 * abs(grads[1])
