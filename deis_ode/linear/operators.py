r"""What a constant linear part ``A`` acting on the last dimension of the state can be.

The operator protocol (duck-typed, nothing to inherit): any object ``A`` with

* ``A.shape == (d, d)``;
* ``A @ v`` for a tensor ``v`` of shape ``(..., d)``, returning ``A v`` applied to every vector along the last
  dimension (shape ``(..., d)``). The Krylov products call it with float64 (complex128) ``(B, d)`` blocks; the
  full drift ``forward`` calls it with the state itself;

and optionally

* ``A.symmetric``: ``True`` when ``A`` is symmetric (Hermitian): the Krylov products use the Lanczos recurrence
  (orthogonalisation against two vectors instead of all);
* ``A.dtype``, ``A.device``: checked against the state (complex against real, a lower precision than the state,
  another device are errors);
* ``A.norm()``: an estimate of ``||A||`` (informative only).

:class:`SparseMatrix` wraps a torch sparse COO/CSR matrix, :class:`DenseMatrix` a dense ``(d, d)`` tensor,
:class:`MatrixFree` a function ``v -> A v`` with its size. :func:`as_operator` turns what a user gives into one of
them (an object that already follows the protocol is returned unchanged) and :func:`check_operator` checks it
against a state. No wrapper ever forms a dense ``(d, d)`` matrix from a sparse or matrix-free one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


@runtime_checkable
class LinearOperator(Protocol):
    """``shape == (d, d)`` and ``A @ v`` on the last dimension of ``v`` (see the module docstring)."""

    shape: tuple[int, int]

    def __matmul__(self, v: Tensor) -> Tensor: ...


def _check_square(shape: Any, name: str) -> int:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}.shape must be a pair (d, d) of integers, got {shape!r}") from None
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"{name} must be a square (d, d) operator acting on the last dimension, got shape {shape}")
    return shape[0]


def _check_finite(values: Tensor, name: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} has NaN or inf entries")


class _CastCache:
    """A tensor kept in the dtypes and on the devices it was asked for (one conversion each)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self._copies: dict[tuple[torch.dtype, torch.device], Tensor] = {(tensor.dtype, tensor.device): tensor}

    def like(self, v: Tensor) -> Tensor:
        key = (v.dtype, v.device)
        if key not in self._copies:
            if self.tensor.is_complex() and not v.is_complex():
                raise ValueError("a complex linear operator cannot act on a real state: pass a complex state")
            self._copies[key] = self.tensor.to(device=v.device, dtype=v.dtype)
        return self._copies[key]


class SparseMatrix:
    """A torch sparse ``(d, d)`` matrix (COO, CSR or CSC; stored as CSR) acting on the last dimension.

    ``A @ v`` for ``v`` of shape ``(..., d)`` is one sparse-times-dense product with the ``prod(...)`` vectors as
    columns. ``symmetric``: ``None`` (default) detects exact symmetry (Hermitian for complex) from the stored entries
    (``O(nnz)``, once); ``True`` declares it (a matrix that is not symmetric to 1e-12 raises ``ValueError``);
    ``False`` forces Arnoldi.
    """

    def __init__(self, matrix: Tensor, *, symmetric: bool | None = None, name: str = "linear") -> None:
        if not isinstance(matrix, Tensor) or matrix.layout not in _SPARSE_LAYOUTS:
            raise TypeError(f"{name} must be a torch sparse COO/CSR/CSC tensor, got {type(matrix).__name__}")
        if matrix.dim() != 2:
            raise ValueError(f"{name} must be a 2-D sparse (d, d) matrix, got shape {tuple(matrix.shape)}")
        self.shape = (_check_square(matrix.shape, name),) * 2
        with warnings.catch_warnings():  # torch's "CSR support is in beta" warning, once per process
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = matrix.coalesce().to_sparse_csr() if matrix.layout == torch.sparse_coo else matrix.to_sparse_csr()
        _check_finite(csr.values(), name)
        coo = csr.to_sparse_coo().coalesce()
        diff = (coo - coo.t().conj()).coalesce().values()
        asymmetry = float(diff.abs().max()) if diff.numel() else 0.0
        if symmetric is None:
            symmetric = asymmetry == 0.0  # exactly equal to its (conjugate) transpose
        elif symmetric:
            scale = float(coo.values().abs().max()) if coo.values().numel() else 0.0
            if asymmetry > 1e-12 * scale:
                raise ValueError(f"{name} was declared symmetric but is not")
        self.symmetric = symmetric
        self.dtype, self.device = csr.dtype, csr.device
        self._csr = _CastCache(csr)

    @property
    def matrix(self) -> Tensor:
        """The CSR matrix as given (in its own dtype)."""
        return self._csr.tensor

    def __matmul__(self, v: Tensor) -> Tensor:
        d = self.shape[0]
        if v.numel() == d:  # one vector: a sparse matrix-vector product
            return (self._csr.like(v) @ v.reshape(d)).reshape(v.shape)
        flat = v.reshape(-1, d)
        out = (self._csr.like(v) @ flat.T).T
        return out.reshape(v.shape)

    def norm(self) -> float:
        """The 1-norm ``max_j sum_i |a_ij|`` (an upper bound of the spectral radius)."""
        coo = self._csr.tensor.to_sparse_coo().coalesce()
        cols = torch.zeros(self.shape[0], dtype=torch.float64, device=coo.device)
        cols.index_add_(0, coo.indices()[1], coo.values().abs().to(torch.float64))
        return float(cols.max())

    def __repr__(self) -> str:
        return f"SparseMatrix(shape={self.shape}, nnz={self._csr.tensor.values().numel()}, dtype={self.dtype})"


class DenseMatrix:
    """A dense ``(d, d)`` matrix acting on the last dimension (``A @ v`` is ``v @ A.T``), integrated by Krylov
    phi-products. For small ``d`` the exact dense phi-functions (``SemiLinearODE(A, N, matrix=True)``) are
    usually faster; this wrapper is for comparisons and for moderate ``d`` with few steps."""

    def __init__(self, matrix: Tensor, *, symmetric: bool | None = None, name: str = "linear") -> None:
        if not isinstance(matrix, Tensor) or matrix.layout != torch.strided:
            raise TypeError(f"{name} must be a dense torch tensor, got {type(matrix).__name__}")
        if matrix.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (d, d) matrix, got shape {tuple(matrix.shape)}")
        self.shape = (_check_square(matrix.shape, name),) * 2
        _check_finite(matrix, name)
        if symmetric is None:
            symmetric = bool(torch.equal(matrix, matrix.mH))
        elif symmetric and not torch.allclose(matrix, matrix.mH, rtol=1e-12, atol=0.0):
            raise ValueError(f"{name} was declared symmetric but is not")
        self.symmetric = symmetric
        self.dtype, self.device = matrix.dtype, matrix.device
        self._m = _CastCache(matrix)

    @property
    def matrix(self) -> Tensor:
        return self._m.tensor

    def __matmul__(self, v: Tensor) -> Tensor:
        return v @ self._m.like(v).T

    def norm(self) -> float:
        work = torch.complex128 if self.dtype.is_complex else torch.float64
        return float(torch.linalg.matrix_norm(self._m.tensor.to(work), ord=1))

    def __repr__(self) -> str:
        return f"DenseMatrix(shape={self.shape}, dtype={self.dtype})"


class MatrixFree:
    """A matrix-free operator from a function ``matvec(v) -> A v`` acting on the last dimension of ``v``.

    Args:
        matvec: ``(..., d) -> (..., d)``; called with float64 (complex128) blocks by the Krylov products.
        d: the size.
        symmetric: ``A`` is symmetric (Hermitian): Lanczos instead of Arnoldi.
        dtype: ``torch.complex128`` for a complex operator (acting on complex states only); real by default.
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        d: int,
        *,
        symmetric: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be a callable v -> A v, got {type(matvec).__name__}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be a positive int, got {d!r}")
        self.shape = (d, d)
        self.symmetric = symmetric
        if dtype is not None:
            self.dtype = dtype
        self._matvec = matvec

    def __matmul__(self, v: Tensor) -> Tensor:
        return self._matvec(v)

    def __repr__(self) -> str:
        return f"MatrixFree(d={self.shape[0]}, symmetric={self.symmetric})"


def is_operator(obj: Any) -> bool:
    """Whether ``obj`` is a torch sparse matrix or follows the operator protocol (``shape`` and ``@``), excluding
    dense tensors (whose meaning, diagonal or matrix, must be said)."""
    if isinstance(obj, Tensor):
        return obj.layout in _SPARSE_LAYOUTS
    if _is_scipy_sparse(obj):
        return True
    if type(obj).__module__.startswith("numpy"):
        return False  # a numpy array: refused by the caller with its own message
    return hasattr(obj, "shape") and hasattr(type(obj), "__matmul__")


def _is_scipy_sparse(obj: Any) -> bool:
    if not type(obj).__module__.startswith("scipy.sparse"):
        return False
    import scipy.sparse

    return scipy.sparse.issparse(obj)


def as_operator(obj: Any, name: str = "linear") -> Any:
    """A torch (or scipy) sparse matrix wrapped in :class:`SparseMatrix`; a protocol object returned unchanged after
    checking its ``shape``. Dense tensors are refused (wrap them in :class:`DenseMatrix`)."""
    if _is_scipy_sparse(obj):
        coo = obj.tocoo()
        indices = torch.from_numpy(_np_stack_int64(coo.row, coo.col))
        values = torch.from_numpy(coo.data)
        matrix = torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True)
        return SparseMatrix(matrix, name=name)
    if isinstance(obj, Tensor):
        if obj.layout in _SPARSE_LAYOUTS:
            return SparseMatrix(obj, name=name)
        raise TypeError(f"{name}: a dense tensor is not an operator; wrap it as deis_ode.linear.DenseMatrix({name})")
    if not is_operator(obj):
        raise TypeError(
            f"{name} must be a torch sparse matrix or an operator with .shape == (d, d) and A @ v, "
            f"got {type(obj).__name__}"
        )
    _check_square(obj.shape, name)
    return obj


def _np_stack_int64(rows: Any, cols: Any) -> Any:
    import numpy as np

    return np.stack([np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)])


def check_operator(op: Any, x: Tensor, name: str = "linear") -> None:
    """Check the operator ``op`` against the state ``x`` (batched along its leading dimensions).

    Raises ``ValueError`` naming ``name`` when the size does not match ``x.shape[-1]``, when ``op`` is complex and
    ``x`` real, when ``op`` is stored in a lower precision than ``x`` or on another device, or when one application
    to a probe vector returns the wrong shape or non-finite values.
    """
    d = _check_square(op.shape, name)
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(
            f"{name} is a ({d}, {d}) operator acting on the last dimension, which does not match the state's shape "
            f"{tuple(x.shape)}"
        )
    dtype = getattr(op, "dtype", None)
    if isinstance(dtype, torch.dtype):
        if dtype.is_complex and not x.is_complex():
            raise ValueError(f"{name} is complex ({dtype}) but the state is real ({x.dtype}): pass a complex state")
        real = x.real.dtype if x.is_complex() else x.dtype
        op_real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
        if op_real.is_floating_point and torch.finfo(op_real).eps > torch.finfo(real).eps:
            raise ValueError(
                f"{name} is stored in {dtype}, a lower precision than the state ({x.dtype}): convert one of them"
            )
    device = getattr(op, "device", None)
    if isinstance(device, torch.device) and device != x.device:
        raise ValueError(f"{name} is on {device} but the state is on {x.device}: move one of them")
    work = (
        torch.complex128 if x.is_complex() or (isinstance(dtype, torch.dtype) and dtype.is_complex) else torch.float64
    )
    probe = torch.linspace(0.5, 1.5, d, dtype=torch.float64, device=x.device).to(work).reshape(1, d)
    out = op @ probe
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, d):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name} @ v for v of shape (1, {d}) returned {got}; expected shape (1, {d})")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} @ v returned NaN or inf for a finite v (non-finite entries in {name}?)")
