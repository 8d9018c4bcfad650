"""Linear parts that act on the last dimension of the state as operators: torch sparse matrices, dense matrices and
matrix-free objects (:mod:`~deis_ode.linear.operators`), and the Krylov phi-function-vector products that integrate
them exactly up to a tolerance (:mod:`~deis_ode.linear.krylov`)."""

from .krylov import KrylovError, KrylovStats, phiv
from .operators import DenseMatrix, LinearOperator, MatrixFree, SparseMatrix, as_operator, check_operator, is_operator

__all__ = [
    "DenseMatrix",
    "KrylovError",
    "KrylovStats",
    "LinearOperator",
    "MatrixFree",
    "SparseMatrix",
    "as_operator",
    "check_operator",
    "is_operator",
    "phiv",
]
