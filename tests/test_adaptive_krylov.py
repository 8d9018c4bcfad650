"""Error-controlled DEIS (``adaptive_deis2`` .. ``adaptive_deis5``) on sparse and matrix-free linear parts (Krylov
phi-products, deis_ode.solvers.adaptive_krylov): agreement with scipy and with the dense ``matrix=True`` path at
several tolerances, tolerance proportionality, a matrix-free diagonal operator against the diagonal path, float32,
the Krylov counters, and the bad-input errors."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from _fd_problem import F64, fisher, initial, laplacian

import deis_ode  # noqa: F401  (registers the methods)
from deis_ode import SemiLinearODE, reference
from deis_ode.adaptive import AdaptiveDEISSolver
from deis_ode.linear import KrylovError, MatrixFree, SparseMatrix
from deis_ode.solvers.adaptive_krylov import krylov_tolerance

TIMES = [0.0, 0.5, 1.0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ref() -> torch.Tensor:
    ode = SemiLinearODE(laplacian(), fisher)
    return reference.solve(ode, initial(), TIMES, method="Radau", rtol=1e-12, atol=1e-13).states


CASES = [(k, r) for k in (2, 3, 4, 5) for r in (1e-4, 1e-6, 1e-8) if not (k == 2 and r == 1e-8)]  # deis2: 3600 steps


@pytest.mark.parametrize(("order", "rtol"), CASES)
def test_sparse_agrees_with_scipy_and_the_dense_path(order: int, rtol: float, ref: torch.Tensor) -> None:
    """Measured: errors 0.04 .. 0.40 rtol at both outputs; sparse vs dense at most 0.002 rtol."""
    t = torch.tensor(TIMES, dtype=F64)
    sparse_ode = SemiLinearODE(laplacian(), fisher)
    out = torchdiffeq.odeint(sparse_ode, initial(), t, method=f"adaptive_deis{order}", rtol=rtol, atol=rtol)
    stats = AdaptiveDEISSolver.last_stats
    for i in (1, 2):
        assert rel(out[i], ref[i]) < 2 * rtol
    if rtol > 1e-8:  # the dense path forms (d, d) phi-matrices every step: 3 s at 1e-8
        dense = SemiLinearODE(laplacian().to_dense(), fisher, matrix=True)
        out_dense = torchdiffeq.odeint(dense, initial(), t, method=f"adaptive_deis{order}", rtol=rtol, atol=rtol)
        for i in (1, 2):
            assert rel(out[i], out_dense[i]) < 0.02 * rtol
    krylov = sparse_ode.krylov_stats
    assert krylov.calls == 2 * (stats.accepted + stats.rejected)  # one predictor and one estimate product per step
    assert krylov.matvecs > krylov.calls and 1 <= krylov.max_dim <= 64


def test_error_falls_with_rtol(ref: torch.Tensor) -> None:
    """Measured (adaptive_deis4): 1.7e-5, 2.8e-7, 3.1e-9 at rtol 1e-4, 1e-6, 1e-8."""
    t = torch.tensor(TIMES, dtype=F64)
    errors = []
    for rtol in (1e-4, 1e-6, 1e-8):
        out = torchdiffeq.odeint(
            SemiLinearODE(laplacian(), fisher), initial(), t, method="adaptive_deis4", rtol=rtol, atol=rtol
        )
        errors.append(rel(out[-1], ref[-1]))
    assert errors[0] > 30 * errors[1] > 900 * errors[2]


def test_matrix_free_diagonal_operator_matches_the_dense_path_and_lsoda() -> None:
    """A diagonal A applied matrix-free (Krylov) against the same A as a dense matrix and against LSODA. Measured:
    errors 3.9e-5 and 3.7e-8 at rtol 1e-5 and 1e-8 (the diagonal tensor path, whose steps lie on a ladder: 1.9e-5
    and 1.8e-8)."""
    lam = -torch.logspace(0, 3, 40, dtype=F64)

    def nonlinear(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) + torch.cos(2.0 * t)

    x0 = torch.linspace(-1.0, 1.0, 40, dtype=F64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    exact = reference.solve(SemiLinearODE(lam, nonlinear), x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states
    for rtol in (1e-5, 1e-8):
        free = SemiLinearODE(MatrixFree(lambda v: v * lam, 40, symmetric=True), nonlinear)
        out = torchdiffeq.odeint(free, x0, t, method="adaptive_deis3", rtol=rtol, atol=rtol)
        assert rel(out[-1], exact[-1]) < 6 * rtol
        if rtol > 1e-8:  # the dense path forms (d, d) phi-matrices every step
            dense = SemiLinearODE(torch.diag(lam), nonlinear, matrix=True)
            out_dense = torchdiffeq.odeint(dense, x0, t, method="adaptive_deis3", rtol=rtol, atol=rtol)
            assert rel(out[-1], out_dense[-1]) < 0.1 * rtol


def test_batched_state_and_backward_time() -> None:
    """A batch of states (one Krylov block) matches the states one at a time; a decreasing ``t`` runs too."""
    a = laplacian(20, coef=0.005)
    x0 = torch.stack([initial(20), 0.5 * initial(20), 0.25 * initial(20)])  # u < 0 would blow up
    t = torch.tensor([0.0, 0.5], dtype=F64)
    ode = SemiLinearODE(SparseMatrix(a), fisher)
    batched = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis3", rtol=1e-7, atol=1e-7)[-1]
    for row in range(3):
        ref = reference.solve(ode, x0[row], t, method="Radau", rtol=1e-12, atol=1e-13).states[-1]
        assert rel(batched[row], ref) < 1e-6
    back = torch.tensor([0.5, 0.0], dtype=F64)  # mild diffusion: the backward problem stays well conditioned
    ref = reference.solve(ode, x0[0], back, method="Radau", rtol=1e-12, atol=1e-13).states[-1]
    out = torchdiffeq.odeint(ode, x0[0], back, method="adaptive_deis4", rtol=1e-7, atol=1e-7)[-1]
    assert rel(out, ref) < 1e-6


def test_float32_state(ref: torch.Tensor) -> None:
    a = laplacian()
    t = torch.tensor(TIMES, dtype=F64)
    sparse32 = torch.sparse_coo_tensor(a.indices(), a.values().float(), a.shape, check_invariants=True)
    ode = SemiLinearODE(sparse32, fisher)
    out = torchdiffeq.odeint(ode, initial().float(), t.float(), method="adaptive_deis4", rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32
    assert rel(out[-1].double(), ref[-1]) < 2e-5


def test_krylov_tolerance_rule() -> None:
    assert krylov_tolerance(F64, 1e-4, None) == 1e-10
    assert krylov_tolerance(F64, 1e-9, None) == pytest.approx(1e-11)
    assert krylov_tolerance(torch.float32, 1e-4, None) == 1e-7
    assert krylov_tolerance(torch.float32, 1e-6, None) == pytest.approx(1e-8)
    assert krylov_tolerance(F64, torch.tensor([1e-6, 1e-8]), None) == pytest.approx(1e-10)
    assert krylov_tolerance(F64, 1e-4, 1e-6) == 1e-6  # a given tolerance is used as it is


def test_bad_krylov_options_and_failures() -> None:
    ode = SemiLinearODE(laplacian(10), fisher)
    x0 = initial(10)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for bad in (0.0, 1.5, float("nan"), "1e-8", True):
        with pytest.raises(ValueError, match="krylov_tol must be a number in"):
            torchdiffeq.odeint(ode, x0, t, method="adaptive_deis3", options={"krylov_tol": bad})
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="krylov_max_dim must be a positive int"):
            torchdiffeq.odeint(ode, x0, t, method="adaptive_deis3", options={"krylov_max_dim": bad})
    with pytest.raises(ValueError, match="need a sparse or operator linear part"):
        torchdiffeq.odeint(
            SemiLinearODE(-torch.ones(10, dtype=F64), fisher),
            x0,
            t,
            method="adaptive_deis3",
            options={"krylov_tol": 1e-9},
        )
    with pytest.raises(ValueError, match="does not match the state's shape"):
        torchdiffeq.odeint(ode, initial(11), t, method="adaptive_deis3")
    # given options are used: a larger tolerance and a small basis still solve the problem
    out = torchdiffeq.odeint(
        ode, x0, t, method="adaptive_deis3", rtol=1e-5, atol=1e-5, options={"krylov_tol": 1e-8, "krylov_max_dim": 8}
    )
    assert ode.krylov_stats.max_dim <= 8 and bool(torch.isfinite(out).all())

    dense = laplacian(10).to_dense()
    calls = [0]

    def flaky(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = v @ dense.T
        return out * float("nan") if calls[0] > 60 else out

    with pytest.raises(KrylovError, match=r"step from t = .* failed"):
        torchdiffeq.odeint(SemiLinearODE(MatrixFree(flaky, 10), fisher), x0, t, method="adaptive_deis3")

    def nan_after(tt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u * float("nan") if tt > 0.45 else fisher(tt, u)

    with pytest.raises(FloatingPointError, match=r"NaN or inf at t = 0\.4|NaN or inf at t = 0\.5"):
        torchdiffeq.odeint(SemiLinearODE(laplacian(10), nan_after), x0, t, method="adaptive_deis3")


def test_complex_state_matches_the_dense_path_and_gradients_are_refused() -> None:
    a = laplacian(20, coef=0.005)

    def schrodinger_like(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return 1j * u - 0.1 * u * u.abs() ** 2

    x0 = (initial(20) * (1 + 0.5j)).to(torch.complex128)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    out = torchdiffeq.odeint(SemiLinearODE(a, schrodinger_like), x0, t, method="adaptive_deis4", rtol=1e-8, atol=1e-8)
    dense = SemiLinearODE(a.to_dense().to(torch.complex128), schrodinger_like, matrix=True)
    out_dense = torchdiffeq.odeint(dense, x0, t, method="adaptive_deis4", rtol=1e-8, atol=1e-8)
    assert out.dtype == torch.complex128
    assert rel(out[-1], out_dense[-1]) < 1e-9
    with pytest.raises(NotImplementedError, match="gradients through the Krylov phi-products"):
        x0 = initial(20).requires_grad_()
        torchdiffeq.odeint(SemiLinearODE(a, fisher), x0, t, method="adaptive_deis3")


def test_adjoint_gradients_match_dopri5() -> None:
    """``odeint_adjoint`` runs its forward pass without autograd, so the Krylov products serve it; its gradient
    matches dopri5's direct backpropagation (measured 3.5e-9)."""
    ode = SemiLinearODE(laplacian(20, coef=0.005), fisher)
    t = torch.tensor([0.0, 0.3], dtype=F64)
    x0 = initial(20).requires_grad_()
    out = torchdiffeq.odeint_adjoint(
        ode,
        x0,
        t,
        method="adaptive_deis3",
        rtol=1e-8,
        atol=1e-8,
        adjoint_method="dopri5",
        adjoint_rtol=1e-10,
        adjoint_atol=1e-10,
        adjoint_params=(),
    )
    out[-1].sum().backward()
    x1 = initial(20).requires_grad_()
    torchdiffeq.odeint(ode, x1, t, method="dopri5", rtol=1e-10, atol=1e-10)[-1].sum().backward()
    assert rel(x0.grad, x1.grad) < 1e-7
