"""Linear algebra of the implicit solvers: options, Jacobians, the W operators, GMRES.

``options`` (the validated :class:`LinearOptions`) → ``jacobian`` (how J is formed) → ``gmres``
→ ``operators`` (one :class:`WOperator` class per way of solving with ``W = I − g·J``); each
module imports only those before it.
"""

from .gmres import GMRESResult, gmres
from .jacobian import (
    SparseJacobian,
    autograd_on,
    batched_fd_jacobian,
    batched_jacobian,
    color_columns,
    dense_jacobian,
    diagonal_positions,
    fd_jacobian,
    grad_leaf,
    sparsity_pattern,
    to_csc,
)
from .operators import (
    HOST_DTYPES,
    SMALL,
    BatchedLU,
    DenseLU,
    MatrixFreeGMRES,
    SmallInverse,
    SparseLU,
    WOperator,
    bump,
    closed_form_inverse,
    sparse_factor,
    sparse_solve,
    w_operator,
)
from .options import LinearOptions

__all__ = [
    "GMRESResult",
    "gmres",
    "SparseJacobian",
    "autograd_on",
    "batched_fd_jacobian",
    "batched_jacobian",
    "color_columns",
    "dense_jacobian",
    "diagonal_positions",
    "fd_jacobian",
    "grad_leaf",
    "sparsity_pattern",
    "to_csc",
    "HOST_DTYPES",
    "SMALL",
    "BatchedLU",
    "DenseLU",
    "MatrixFreeGMRES",
    "SmallInverse",
    "SparseLU",
    "WOperator",
    "bump",
    "closed_form_inverse",
    "sparse_factor",
    "sparse_solve",
    "w_operator",
    "LinearOptions",
]
