"""Krylov phi-function-vector products (deis_ode.linear.krylov) against dense phi-functions, and the operator
wrappers' checks."""

from __future__ import annotations

import pytest
import torch

from deis_ode.linear import DenseMatrix, KrylovError, KrylovStats, MatrixFree, SparseMatrix, check_operator, phiv
from deis_ode.solvers.coefficients import matrix_phi_functions

F64 = torch.float64


def _laplacian_1d(d: int) -> torch.Tensor:
    """The Dirichlet second-difference matrix on d interior points of (0, 1), sparse COO."""
    dx = 1.0 / (d + 1)
    i = torch.arange(d)
    rows = torch.cat([i, i[1:], i[:-1]])
    cols = torch.cat([i, i[:-1], i[1:]])
    vals = torch.cat([torch.full((d,), -2.0), torch.ones(d - 1), torch.ones(d - 1)]).to(F64) / dx**2
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (d, d), check_invariants=True).coalesce()


def _advection_diffusion(d: int, c: float = 40.0) -> torch.Tensor:
    """A non-symmetric operator: the Laplacian plus upwind advection, sparse."""
    dx = 1.0 / (d + 1)
    lap = _laplacian_1d(d).to_dense()
    adv = (torch.diag(torch.ones(d - 1, dtype=F64), -1) - torch.eye(d, dtype=F64)) * (c / dx)
    return (0.01 * lap + adv).to_sparse()


def _dense_reference(a: torch.Tensor, h: float, vs: list[torch.Tensor]) -> torch.Tensor:
    phis = matrix_phi_functions(a * h, len(vs) - 1)
    return sum(v @ phis[k].T for k, v in enumerate(vs))


def _relative(got: torch.Tensor, exact: torch.Tensor, vs: list[torch.Tensor]) -> float:
    ref = sum(v.norm(dim=-1) for v in vs)
    return float(((got - exact).norm(dim=-1) / ref).max())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("p", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("h", [1e-4, 2e-3, 0.05])
def test_phiv_matches_dense_phi_functions(symmetric: bool, p: int, h: float) -> None:
    d = 50
    a = _laplacian_1d(d) if symmetric else _advection_diffusion(d)
    gen = torch.Generator().manual_seed(p)
    vs = [torch.randn(3, d, dtype=F64, generator=gen) for _ in range(p + 1)]
    stats = KrylovStats()
    got = phiv(SparseMatrix(a, symmetric=symmetric), h, vs, tol=1e-12, max_dim=30, stats=stats)
    assert _relative(got, _dense_reference(a.to_dense(), h, vs), vs) < 1e-10
    if h == 0.05:  # h ||A|| ~ 5e2 (symmetric) / 1e2: the substeps are needed
        assert stats.substeps > 1
    assert stats.max_dim <= 30 and stats.calls == 1


def test_lanczos_and_arnoldi_agree() -> None:
    d = 40
    a = _laplacian_1d(d)
    vs = [torch.randn(d, dtype=F64) for _ in range(3)]
    lanczos = phiv(SparseMatrix(a, symmetric=True), 1e-3, vs, tol=1e-12)
    arnoldi = phiv(SparseMatrix(a), 1e-3, vs, tol=1e-12)
    assert _relative(lanczos, arnoldi, vs) < 1e-11


def test_phiv_batched_equals_one_at_a_time() -> None:
    d = 30
    op = SparseMatrix(_advection_diffusion(d))
    vs = [torch.randn(2, 3, d, dtype=F64) for _ in range(3)]
    together = phiv(op, 0.01, vs, tol=1e-12)
    assert together.shape == (2, 3, d)
    for i in range(2):
        for j in range(3):
            alone = phiv(op, 0.01, [v[i, j] for v in vs], tol=1e-12)
            assert torch.allclose(together[i, j], alone, rtol=0, atol=1e-10 * float(alone.norm()))


def test_phiv_matrix_free_complex_and_float32() -> None:
    d = 40
    a = _laplacian_1d(d)
    dense = a.to_dense()
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.dtype)
        return v @ dense.to(v.dtype).T

    vs = [torch.randn(d, dtype=F64) for _ in range(2)]
    got = phiv(MatrixFree(matvec, d, symmetric=True), 1e-3, vs, tol=1e-12)
    assert _relative(got, _dense_reference(dense, 1e-3, vs), vs) < 1e-10
    assert set(calls) == {F64}  # the Krylov process runs in float64
    # float32 inputs: the product is still computed in float64
    got32 = phiv(SparseMatrix(a), 1e-3, [v.float() for v in vs], tol=1e-12)
    assert got32.dtype == F64
    exact32 = _dense_reference(dense, 1e-3, [v.float().double() for v in vs])
    assert _relative(got32, exact32, vs) < 1e-10
    # complex operator (Schroedinger-like i * Laplacian), complex vectors
    c = (1j * a.to_dense()).to(torch.complex128)
    cv = [torch.randn(d, dtype=torch.complex128) for _ in range(2)]
    got_c = phiv(DenseMatrix(c), 1e-3, cv, tol=1e-12)
    assert _relative(got_c, _dense_reference(c, 1e-3, cv), cv) < 1e-10


def test_phiv_tolerance_is_met_and_looser_is_cheaper() -> None:
    d = 200
    a = _laplacian_1d(d)
    vs = [torch.randn(d, dtype=F64) for _ in range(4)]
    exact = _dense_reference(a.to_dense(), 1e-3, vs)
    loose, tight = KrylovStats(), KrylovStats()
    got_loose = phiv(SparseMatrix(a, symmetric=True), 1e-3, vs, tol=1e-6, stats=loose)
    got_tight = phiv(SparseMatrix(a, symmetric=True), 1e-3, vs, tol=1e-12, stats=tight)
    assert _relative(got_loose, exact, vs) < 1e-5
    assert _relative(got_tight, exact, vs) < 1e-10
    assert loose.matvecs < tight.matvecs


def test_phiv_zero_vectors_and_zero_step() -> None:
    d = 20
    op = SparseMatrix(_laplacian_1d(d))
    zero = [torch.zeros(d, dtype=F64)] * 3
    assert torch.equal(phiv(op, 1e-3, zero), torch.zeros(d, dtype=F64))
    v = torch.randn(d, dtype=F64)
    assert torch.equal(phiv(op, 0.0, [v]), v)


def test_phiv_reports_non_convergence() -> None:
    d = 20

    def bad(v: torch.Tensor) -> torch.Tensor:
        return v * float("nan")

    with pytest.raises(KrylovError, match="did not converge"):
        phiv(MatrixFree(bad, d), 0.1, [torch.ones(d, dtype=F64)], max_dim=8)


def test_phiv_bad_arguments() -> None:
    op = SparseMatrix(_laplacian_1d(10))
    with pytest.raises(ValueError, match="vs\\[1\\] has shape"):
        phiv(op, 0.1, [torch.ones(10, dtype=F64), torch.ones(9, dtype=F64)])
    with pytest.raises(ValueError, match="tol"):
        phiv(op, 0.1, [torch.ones(10, dtype=F64)], tol=0.0)
    with pytest.raises(ValueError, match="max_dim"):
        phiv(op, 0.1, [torch.ones(10, dtype=F64)], max_dim=0)


def test_operator_wrappers_reject_bad_input() -> None:
    lap = _laplacian_1d(10)
    with pytest.raises(ValueError, match="square"):
        SparseMatrix(
            torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (3, 4), check_invariants=True)
        )
    with pytest.raises(ValueError, match="NaN or inf"):
        vals = lap.values().clone()
        vals[0] = float("inf")
        SparseMatrix(torch.sparse_coo_tensor(lap.indices(), vals, lap.shape, check_invariants=True))
    with pytest.raises(ValueError, match="declared symmetric"):
        SparseMatrix(_advection_diffusion(10), symmetric=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        DenseMatrix(torch.full((3, 3), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="square"):
        DenseMatrix(torch.zeros(3, 4, dtype=F64))
    op = SparseMatrix(lap)
    with pytest.raises(ValueError, match="does not match the state's shape"):
        check_operator(op, torch.zeros(4, 11, dtype=F64))
    with pytest.raises(ValueError, match="complex"):
        check_operator(DenseMatrix(torch.eye(10, dtype=torch.complex128)), torch.zeros(10, dtype=F64))
    with pytest.raises(ValueError, match="lower precision"):
        check_operator(SparseMatrix(lap.float()), torch.zeros(10, dtype=F64))
    with pytest.raises(ValueError, match="returned"):
        check_operator(MatrixFree(lambda v: v[..., :5], 10), torch.zeros(10, dtype=F64))
    with pytest.raises(ValueError, match="NaN or inf"):
        check_operator(MatrixFree(lambda v: v / 0.0, 10), torch.zeros(10, dtype=F64))
    check_operator(op, torch.zeros(2, 10, dtype=torch.float32))  # a float64 operator on a float32 state is fine
