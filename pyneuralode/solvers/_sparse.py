"""Sparse Jacobians and sparse LU for large stiff systems (``linsolve="sparse"``).

Semi-discretised PDEs and reaction networks have Jacobians with a few nonzeros per row. Given
their pattern (``jac_sparsity``, as scipy's ``solve_ivp`` and OrdinaryDiffEq's ``jac_prototype``
take it), the Jacobian is formed from one product per *colour* — a group of rows (or columns)
that share no column (row) (Curtis, Powell & Reid 1974; greedy colouring) — instead of one per
state component, and ``W = I − g·J`` is factored by SuperLU (``scipy.sparse.linalg.splu``).

CPU only (SuperLU runs on host memory). Under autograd the solves are differentiable with respect
to the right-hand side (the transpose solve gives the gradient); the Jacobian is held fixed, as in
the ESDIRK and QNDF engines. A Rosenbrock step's exact gradient needs dJ/dθ, so ``DirectAdjoint``
through a Rosenbrock method with a sparse J raises unless ``differentiable_jac=False`` is passed.
"""
from __future__ import annotations

import numpy as np
import torch


def _scipy_sparse(owner: str):
    try:
        import scipy.sparse as sp
        import scipy.sparse.linalg  # noqa: F401  (SuperLU)
    except ImportError:
        raise ImportError(f"{owner}: linsolve='sparse' factors with scipy's SuperLU; install scipy "
                          "(pip install scipy) or use linsolve='lu'/'gmres'") from None
    return sp


def sparsity_pattern(jac_sparsity, n: int, owner: str):
    """``jac_sparsity`` (a scipy sparse matrix, a numpy array or a tensor, nonzero = may be nonzero)
    as a CSC pattern of ones with the diagonal included (W = I − g·J has it)."""
    sp = _scipy_sparse(owner)

    if isinstance(jac_sparsity, torch.Tensor):
        jac_sparsity = jac_sparsity.to_dense() if jac_sparsity.is_sparse else jac_sparsity
        jac_sparsity = jac_sparsity.detach().cpu().numpy()
    try:
        P = sp.csc_matrix(jac_sparsity, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{owner}: jac_sparsity must be an N×N scipy sparse matrix, array or tensor; {e}") from None
    if P.shape != (n, n):
        raise ValueError(f"{owner}: jac_sparsity has shape {P.shape}, but the (flattened) state has {n} components; "
                         f"it must be ({n}, {n})")
    P = (P != 0).astype(np.float64) + sp.identity(n, format="csc")
    P = (P != 0).astype(np.float64).tocsc()
    P.sort_indices()
    return P


def color_columns(P) -> np.ndarray:
    """Greedy colouring: columns of one colour share no row, so one product ``J v`` recovers them all.

    Column by column, the smallest colour not already taken by a column that shares a row with it
    (the column-intersection graph ``PᵀP``; Curtis, Powell & Reid 1974).
    """
    import scipy.sparse as sp

    n = P.shape[1]
    B = sp.csc_matrix(P, dtype=np.float64, copy=True)
    B.data[:] = 1.0
    G = (B.T @ B).tocsr()  # G[j, k] ≠ 0: columns j and k share a row
    indptr, indices = G.indptr, G.indices
    colors = np.full(n, -1, dtype=np.int64)
    for j in range(n):
        taken = set(colors[indices[indptr[j]:indptr[j + 1]]].tolist())
        c = 0
        while c in taken:
            c += 1
        colors[j] = c
    return colors


class SparseJacobian:
    """The Jacobian on a fixed pattern from one product per colour.

    Autograd (the default): rows that share no column are coloured alike and one batched
    vector–Jacobian product per row colour (``uᵀJ``, a vmap over reverse passes) gives them all;
    ``jac_mode="finite_difference"``: columns that share no row are coloured alike and one forward
    difference per column colour gives them (no autograd graph).
    """

    def __init__(self, P, jac_mode: str):
        self.P = P
        self.finite_difference = jac_mode == "finite_difference"
        self.rows = P.indices  # every stored entry (row i, column j), column by column
        self.cols = np.repeat(np.arange(P.shape[1]), np.diff(P.indptr))
        if self.finite_difference:
            self.colors = color_columns(P)
            self.entry_color, self.entry_index = self.colors[self.cols], self.rows
        else:
            self.colors = color_columns(P.T.tocsc())  # row colours
            self.entry_color, self.entry_index = self.colors[self.rows], self.cols
        self.n_colors = int(self.colors.max()) + 1 if P.shape[1] else 0
        self.diag = diagonal_positions(P)  # the pattern holds the diagonal (sparsity_pattern adds it)

    def __call__(self, rhs, t: float, y: torch.Tensor):
        """``(J as scipy CSC float64, f(t, y))``."""
        import scipy.sparse as sp

        shape = y.shape
        y0 = y.detach().reshape(-1)
        n = y0.numel()
        seeds = torch.zeros(self.n_colors, n, dtype=y0.dtype, device=y0.device)
        seeds[torch.from_numpy(self.colors), torch.arange(n)] = 1.0
        scale = 1.0
        if self.finite_difference:
            from ._linalg import _fd_steps  # (imported here: _linalg imports this module)

            with torch.no_grad():
                d = _fd_steps(y0)  # the dense finite-difference Jacobian's increments
                f0 = rhs(t, y0.view(shape)).reshape(-1)
                prods = torch.stack([rhs(t, (y0 + s * d).view(shape)).reshape(-1) - f0 for s in seeds])
            scale = d.cpu().numpy()[self.cols]
        else:
            from ._linalg import autograd_on, grad_leaf

            with autograd_on():
                yy = grad_leaf(y0)
                out = rhs(t, yy.view(shape)).reshape(-1)
                if out.requires_grad:
                    (prods,) = torch.autograd.grad(out, yy, seeds, is_grads_batched=True, allow_unused=True)
                else:
                    prods = None
            f0 = out.detach()
            if prods is None:
                prods = torch.zeros_like(seeds)
        vals = prods.detach().to(torch.float64).cpu().numpy()[self.entry_color, self.entry_index] / scale
        J = sp.csc_matrix((vals, self.P.indices, self.P.indptr), shape=self.P.shape)
        return J, f0.view(shape)


def to_csc(J, n: int, owner: str):
    """A user ``jac(t, y)`` result as a float64 CSC matrix (scipy sparse, a dense or a sparse tensor)."""
    sp = _scipy_sparse(owner)

    if isinstance(J, torch.Tensor):
        if J.is_sparse or J.layout != torch.strided:
            J = J.to_sparse_coo().coalesce()
            idx = J.indices().cpu().numpy()
            J = sp.coo_matrix((J.values().detach().to(torch.float64).cpu().numpy(), (idx[0], idx[1])), shape=tuple(J.shape))
        else:
            J = J.detach().to(torch.float64).cpu().numpy()
    if not (sp.issparse(J) or isinstance(J, np.ndarray)):
        raise TypeError(f"{owner}: jac(t, y) returned {type(J).__name__}; with linsolve='sparse' it must return a "
                        "scipy sparse matrix or a tensor")
    J = sp.csc_matrix(J, dtype=np.float64)
    if J.shape != (n, n):
        raise ValueError(f"{owner}: jac(t, y) returned shape {J.shape}, expected ({n}, {n})")
    if not J.has_canonical_format:  # sorted, no duplicates: diagonal_positions relies on it
        J = J.copy()  # (never reorder the caller's matrix in place)
        J.sum_duplicates()
    return J


def diagonal_positions(J):
    """Where the diagonal entries sit in a CSC matrix's ``data`` (one per column, sorted indices),
    or ``None`` when some column has none (then ``I − gJ`` changes the pattern)."""
    n = J.shape[0]
    cols = np.repeat(np.arange(n), np.diff(J.indptr))
    pos = np.flatnonzero(J.indices == cols)
    return pos if pos.size == n else None


def factor(J, g: float, diag=None):
    """SuperLU of ``I − g·J``; ``diag`` (from :func:`diagonal_positions`) forms ``W`` on ``J``'s own
    pattern without a sparse addition."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    if diag is None:
        W = (sp.identity(J.shape[0], format="csc") - g * J).tocsc()
    else:
        data = J.data * (-g)
        data[diag] += 1.0
        W = sp.csc_matrix((data, J.indices, J.indptr), shape=J.shape)
    return splu(W)


def sparse_solve(b: torch.Tensor, lu, trans: str = "N") -> torch.Tensor:
    """``W⁻¹ b`` (``trans="T"``: ``W⁻ᵀ b``) with a SuperLU factorisation, no autograd."""
    x = lu.solve(b.detach().to(torch.float64).cpu().numpy(), trans=trans)
    return torch.from_numpy(x).to(dtype=b.dtype, device=b.device)


class SparseSolve(torch.autograd.Function):
    """``x = W⁻¹ b`` with a SuperLU factorisation; the backward pass solves with ``Wᵀ``."""

    @staticmethod
    def forward(ctx, b, lu):
        ctx.lu = lu
        return sparse_solve(b, lu)

    @staticmethod
    def backward(ctx, g):
        return sparse_solve(g, ctx.lu, trans="T"), None
