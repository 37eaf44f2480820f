"""Jacobians of the right-hand side: dense, batched, finite differences, jacrev/jacfwd, and sparse
(on a known pattern, from one product per colour).

* dense: the flattened state's N×N Jacobian. ``jac_mode="autograd"`` evaluates ``f(t, y)`` once
  with ``y`` tracked and pulls back all N rows in one batched backward pass (a vmap over
  vector–Jacobian products) and returns ``f(t, y)`` too; ``"jacrev"``/``"jacfwd"`` use
  :mod:`torch.func`; ``"finite_difference"`` takes N forward differences (no autograd graph).
* batched: state ``(B, n)`` with ``f`` acting on each row; one n×n Jacobian per row, never the
  (B·n)² matrix.
* sparse: semi-discretised PDEs and reaction networks have Jacobians with a few nonzeros per row.
  Given their pattern (``jac_sparsity``, as scipy's ``solve_ivp`` and OrdinaryDiffEq's
  ``jac_prototype`` take it), the Jacobian is formed from one product per *colour* — a group of
  rows (or columns) that share no column (row) (Curtis, Powell & Reid 1974; greedy colouring).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class autograd_on:
    """Autograd on for an internal derivative (a Jacobian), also inside ``torch.no_grad()`` and
    ``torch.inference_mode()``; ``enable_grad`` alone does nothing under inference mode, where the
    Jacobian would silently come out zero."""

    __slots__ = ("_ctx",)

    def __enter__(self):
        self._ctx = (
            (torch.inference_mode(False), torch.enable_grad())
            if torch.is_inference_mode_enabled()
            else (torch.enable_grad(),)
        )
        for c in self._ctx:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._ctx):
            c.__exit__(*exc)
        return False


def grad_leaf(y: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``y`` that requires grad (an inference tensor is cloned: it cannot require
    grad)."""
    y = y.detach()
    return (y.clone() if y.is_inference() else y).requires_grad_(True)


def dense_jacobian(
    rhs: Callable, t: float, y: torch.Tensor, jac_mode: str = "autograd", create_graph: bool = False
):
    """``(J, f)``: the N×N Jacobian of the flattened ``rhs(t, ·)`` at ``y`` and, when free, ``f(t,
    y)`` (else ``None``)."""
    if jac_mode == "finite_difference":
        return fd_jacobian(rhs, t, y, create_graph)
    shape = y.shape
    N = y.numel()
    if jac_mode == "autograd":
        with autograd_on():
            yy = y if (create_graph and y.requires_grad) else grad_leaf(y)
            out = rhs(t, yy)
            if not out.requires_grad:  # f does not depend on y at all
                J = torch.zeros(N, N, dtype=y.dtype, device=y.device)
            else:
                eye = torch.eye(N, dtype=y.dtype, device=y.device).view(N, *shape)
                (J,) = torch.autograd.grad(
                    out,
                    yy,
                    eye,
                    is_grads_batched=True,
                    create_graph=create_graph,
                    allow_unused=True,
                )
                J = (
                    torch.zeros(N, N, dtype=y.dtype, device=y.device)
                    if J is None
                    else J.reshape(N, N)
                )
        if not create_graph:
            out, J = out.detach(), J.detach()
        return J, out

    def fun(v):
        return rhs(t, v.view(shape)).reshape(-1)

    jf = torch.func.jacrev(fun) if jac_mode == "jacrev" else torch.func.jacfwd(fun)
    if create_graph:
        J = jf(y.reshape(-1))
    else:
        with torch.no_grad():
            J = jf(y.detach().reshape(-1))
    return J, None


def fd_steps(y: torch.Tensor) -> torch.Tensor:
    """Forward-difference increments sqrt(eps · max(1e-5, |y_k|)) (Hairer & Wanner's RADAU5), exact
    in binary."""
    eps = torch.finfo(y.dtype).eps
    d = (eps * y.detach().abs().clamp_min(1e-5)).sqrt()
    return (y.detach() + d) - y.detach()  # the increment actually representable at y


def fd_jacobian(rhs: Callable, t: float, y: torch.Tensor, create_graph: bool = False):
    """``(J, f)`` by forward differences: N extra evaluations of f (``nfe``), accurate to about
    sqrt(eps).

    OrdinaryDiffEq's ``autodiff=AutoFiniteDiff()`` and scipy's default for Radau/BDF: for tiny
    systems it is the cheapest Jacobian (no autograd graph); its error, ~1e-8 relative in float64,
    enters the step like a W-method's approximate Jacobian and is far below usual tolerances.
    """
    shape = y.shape
    N = y.numel()
    yin = y if create_graph else y.detach()
    f0 = rhs(t, yin)
    yf, f0f = yin.reshape(-1), f0.reshape(-1)
    d = fd_steps(yf)
    eye = torch.eye(N, dtype=y.dtype, device=y.device)
    cols = []
    for k, dk in enumerate(d.tolist()):
        fk = rhs(t, torch.add(yf, eye[k], alpha=dk).view(shape)).reshape(-1)
        cols.append(torch.sub(fk, f0f).div_(dk) if not create_graph else (fk - f0f) / dk)
    J = torch.stack(cols, 1)
    return J, f0


def batched_fd_jacobian(rhs: Callable, t: float, y: torch.Tensor, create_graph: bool = False):
    """``(J, f)`` for ``(B, n)`` independent systems by forward differences: n extra evaluations of
    the batch."""
    B, n = y.shape
    yin = y if create_graph else y.detach()
    f0 = rhs(t, yin)
    d = fd_steps(yin)
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    cols = []
    for k in range(n):
        dk = d[:, k : k + 1]
        cols.append((rhs(t, yin + dk * eye[k]) - f0) / dk)
    return torch.stack(cols, 2), f0  # J[b, i, k] = ∂f_i/∂y_k


def batched_jacobian(
    rhs: Callable, t: float, y: torch.Tensor, jac_mode: str = "autograd", create_graph: bool = False
):
    """``(J, f)`` for a batch of independent systems: ``y`` is ``(B, n)``, ``f`` acts on each row; J
    is ``(B, n, n)``."""
    if jac_mode == "finite_difference":
        return batched_fd_jacobian(rhs, t, y, create_graph)
    B, n = y.shape
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    tangents = eye.unsqueeze(1).expand(n, B, n)  # tangents[k] = e_k in every row
    if jac_mode == "jacfwd":

        def fun(v):
            return rhs(t, v)

        def col(v):
            return torch.func.jvp(fun, (yb,), (v,))[1]

        if create_graph:
            yb = y
            cols = torch.func.vmap(col)(tangents)
        else:
            with torch.no_grad():
                yb = y.detach()
                cols = torch.func.vmap(col)(tangents)
        return cols.permute(1, 2, 0), None  # cols[k, b, i] = J_b[i, k]
    # reverse mode: rows of each J_b from one batched backward pass
    with autograd_on():
        yy = y if (create_graph and y.requires_grad) else grad_leaf(y)
        out = rhs(t, yy)
        if not out.requires_grad:
            J = torch.zeros(B, n, n, dtype=y.dtype, device=y.device)
        else:
            (g,) = torch.autograd.grad(
                out,
                yy,
                tangents,
                is_grads_batched=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            J = (
                torch.zeros(B, n, n, dtype=y.dtype, device=y.device)
                if g is None
                else g.permute(1, 0, 2)
            )  # g[k, b, :] = J_b[k, :]
    if not create_graph:
        out, J = out.detach(), J.detach()
    return J, out


def scipy_sparse(owner: str):
    try:
        import scipy.sparse as sp
        import scipy.sparse.linalg  # noqa: F401  (SuperLU)
    except ImportError:
        raise ImportError(
            f"{owner}: linsolve='sparse' factors with scipy's SuperLU; install scipy "
            "(pip install scipy) or use linsolve='lu'/'gmres'"
        ) from None
    return sp


def sparsity_pattern(jac_sparsity, n: int, owner: str):
    """``jac_sparsity`` (a scipy sparse matrix, a numpy array or a tensor, nonzero = may be nonzero)
    as a CSC pattern of ones with the diagonal included (W = I − g·J has it)."""
    sp = scipy_sparse(owner)

    if isinstance(jac_sparsity, torch.Tensor):
        jac_sparsity = jac_sparsity.to_dense() if jac_sparsity.is_sparse else jac_sparsity
        jac_sparsity = jac_sparsity.detach().cpu().numpy()
    try:
        P = sp.csc_matrix(jac_sparsity, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{owner}: jac_sparsity must be an N×N scipy sparse matrix, array or tensor; {e}"
        ) from None
    if P.shape != (n, n):
        raise ValueError(
            f"{owner}: jac_sparsity has shape {P.shape}, but the (flattened) state has {n} "
            "components; "
            f"it must be ({n}, {n})"
        )
    P = (P != 0).astype(np.float64) + sp.identity(n, format="csc")
    P = (P != 0).astype(np.float64).tocsc()
    P.sort_indices()
    return P


def color_columns(P) -> np.ndarray:
    """Greedy colouring: columns of one colour share no row, so one product ``J v`` recovers them
    all.

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
        taken = set(colors[indices[indptr[j] : indptr[j + 1]]].tolist())
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
        self.diag = diagonal_positions(
            P
        )  # the pattern holds the diagonal (sparsity_pattern adds it)

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
            with torch.no_grad():
                d = fd_steps(y0)  # the dense finite-difference Jacobian's increments
                f0 = rhs(t, y0.view(shape)).reshape(-1)
                prods = torch.stack(
                    [rhs(t, (y0 + s * d).view(shape)).reshape(-1) - f0 for s in seeds]
                )
            scale = d.cpu().numpy()[self.cols]
        else:
            with autograd_on():
                yy = grad_leaf(y0)
                out = rhs(t, yy.view(shape)).reshape(-1)
                if out.requires_grad:
                    (prods,) = torch.autograd.grad(
                        out, yy, seeds, is_grads_batched=True, allow_unused=True
                    )
                else:
                    prods = None
            f0 = out.detach()
            if prods is None:
                prods = torch.zeros_like(seeds)
        vals = (
            prods.detach().to(torch.float64).cpu().numpy()[self.entry_color, self.entry_index]
            / scale
        )
        J = sp.csc_matrix((vals, self.P.indices, self.P.indptr), shape=self.P.shape)
        return J, f0.view(shape)


def to_csc(J, n: int, owner: str):
    """A user ``jac(t, y)`` result as a float64 CSC matrix (scipy sparse, a dense or a sparse
    tensor)."""
    sp = scipy_sparse(owner)

    if isinstance(J, torch.Tensor):
        if J.is_sparse or J.layout != torch.strided:
            J = J.to_sparse_coo().coalesce()
            idx = J.indices().cpu().numpy()
            J = sp.coo_matrix(
                (J.values().detach().to(torch.float64).cpu().numpy(), (idx[0], idx[1])),
                shape=tuple(J.shape),
            )
        else:
            J = J.detach().to(torch.float64).cpu().numpy()
    if not (sp.issparse(J) or isinstance(J, np.ndarray)):
        raise TypeError(
            f"{owner}: jac(t, y) returned {type(J).__name__}; with linsolve='sparse' it must "
            "return a "
            "scipy sparse matrix or a tensor"
        )
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
