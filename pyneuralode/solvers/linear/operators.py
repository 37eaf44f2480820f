"""The W operator: ``W = I − g·J`` (``g = h·γ``) at one linearisation point, one class per strategy.

Every operator has the same four methods: ``set_point(t, y)`` forms J at ``(t, y)`` (returns
``f(t, y)`` when it came for free), ``factor(g)`` factors ``W`` (a no-op for an unchanged ``g``),
``solve(b)`` returns ``W⁻¹ b`` for ``b`` shaped like the state (or flat), ``jvp(v)`` returns ``J
v``; ``host_solver(g, shape)`` gives the same solve on flat numpy arrays for the host steps.
:func:`w_operator` picks the class once per solve:

* :class:`SmallInverse` — dense systems of up to 16 components: an explicit inverse, so every
  stage solve is one mat-vec (on the CPU also held as a numpy array for the host steps);
* :class:`DenseLU` — the dense LU of the N×N matrix;
* :class:`BatchedLU` — state ``(B, n)``, f acting per row: one n×n LU per row;
* :class:`SparseLU` — SuperLU on a Jacobian with a known pattern (CPU; scipy);
* :class:`MatrixFreeGMRES` — ``W v = v − g·J v`` with ``J v`` from :func:`torch.func.jvp`,
  solved by restarted GMRES; no matrix is ever formed.

Statistics go into the solve's ``stats`` dict: ``njac`` (Jacobians formed, or linearisation
points set for GMRES), ``nlu`` (factorisations), ``nsolve`` (linear solves), ``ngmres``/
``ngmresfail`` (GMRES iterations and failures).

Gradients: under autograd the LU factorisation and solves are differentiated by torch.
``differentiable_jac=True`` builds J with ``create_graph=True`` so its dependence on ``y`` and the
parameters is differentiated too (exact gradient of a Rosenbrock step); the Newton-based methods
use a detached J, which only affects the convergence speed of Newton, not its fixed point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..._time import time_tensor
from .gmres import gmres
from .jacobian import (
    SparseJacobian,
    batched_jacobian,
    dense_jacobian,
    diagonal_positions,
    sparsity_pattern,
    to_csc,
)
from .options import LinearOptions

#: dense systems up to this size solve with an explicit inverse of W (a mat-vec per stage)
SMALL = 16
#: state dtypes the host (numpy) steps of CPU states without autograd take
HOST_DTYPES = (torch.float32, torch.float64)


def bump(stats: dict, key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + n


def closed_form_inverse(J, s: float):
    """``(s·I − J)⁻¹`` for a 1×1, 2×2 or 3×3 ``J`` given as nested lists (cofactors over the
    determinant; NaN where the matrix is singular)."""
    n = len(J)
    if n == 1:
        w = s - J[0][0]
        return [[1.0 / w if w != 0.0 else math.nan]]
    if n == 2:
        a, b, c, d = s - J[0][0], -J[0][1], -J[1][0], s - J[1][1]
        det = a * d - b * c
        if det == 0.0 or not math.isfinite(det):
            return [[math.nan] * 2 for _ in range(2)]
        r = 1.0 / det
        return [[d * r, -b * r], [-c * r, a * r]]
    (a, b, c), (d, e, f), (g, h, i) = (
        [(s if r == k else 0.0) - J[r][k] for k in range(3)] for r in range(3)
    )
    A, B, C = e * i - f * h, f * g - d * i, d * h - e * g
    det = a * A + b * B + c * C
    if det == 0.0 or not math.isfinite(det):
        return [[math.nan] * 3 for _ in range(3)]
    r = 1.0 / det
    return [
        [A * r, (c * h - b * i) * r, (b * f - c * e) * r],
        [B * r, (a * i - c * g) * r, (c * d - a * f) * r],
        [C * r, (b * g - a * h) * r, (a * e - b * d) * r],
    ]


class WOperator:
    """Jacobian and solves with ``W = I − g·J`` for one solve (held by a solver's cache).

    Subclasses implement ``_form`` (J at a point), ``_factor``, ``solve`` and ``jvp``.
    """

    #: the state is ``(B, n)`` with one n×n system per row
    batched = False
    #: no matrix: ``solve`` may fail (``converged`` is then False)
    matrix_free = False
    #: a CPU system small enough for the host steps' numpy inverse (``scaled_inverse_numpy``)
    host_capable = False

    def __init__(
        self,
        opts: LinearOptions,
        rhs: Callable,
        y0: torch.Tensor,
        stats: dict,
        differentiable_jac: bool,
    ):
        self.opts = opts
        self.owner = opts.owner
        self.rhs = rhs
        self.stats = stats
        self.differentiable_jac = differentiable_jac
        self.J = None
        self.point = None  # (t, y) of the current J
        self.g = None  # the g of the current factorisation (None: not factored)
        self.fresh = False  # J was formed at the current step's start
        self.converged = True  # the last solve converged (False only for GMRES)
        self._param_grad = None  # does f depend on tensors that require grad? (found once)

    def copy(self) -> WOperator:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def set_point(self, t: float, y: torch.Tensor):
        """Form the Jacobian at ``(t, y)``; returns ``f(t, y)`` if it was evaluated on the way, else
        ``None``."""
        bump(self.stats, "njac")
        create = self.differentiable_jac and torch.is_grad_enabled()
        if create and not y.requires_grad:
            if self._param_grad is None:  # once per solve
                with torch.enable_grad():
                    self._param_grad = bool(self.rhs(t, y.detach()).requires_grad)
            create = self._param_grad
        f = self._form(t, y, create)
        self.g = None
        self._reset()
        self.fresh = True
        return f

    def factor(self, g: float) -> None:
        """Factor ``W = I − g·J`` (counts ``nlu``); a no-op when ``g`` is unchanged."""
        if self.g == g:
            return
        self.g = g
        self._factor(g)

    def host_solver(self, g: float, shape) -> Callable[[np.ndarray], np.ndarray]:
        """``b ↦ W⁻¹ b`` on flat numpy arrays (CPU, no autograd; counts ``nsolve``); by default
        through zero-copy tensors."""
        self.factor(g)

        def solve(b):
            return self.solve(torch.from_numpy(b).view(shape)).reshape(-1).numpy()

        return solve

    def _reset(self) -> None:
        """Drop what was derived from the previous J."""

    def _form(self, t, y, create):
        raise NotImplementedError

    def _factor(self, g: float) -> None:
        raise NotImplementedError

    def solve(
        self, b: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``W⁻¹ (scale · b)`` for ``b`` shaped like the state or flat; ``out`` (no-grad use): a
        flat tensor the result is written into."""
        raise NotImplementedError

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` at the current point."""
        raise NotImplementedError


class _DenseJacobian(WOperator):
    """A dense (or per-row batched) J from torch or from the user's ``jac(t, y)``."""

    def __init__(self, opts, rhs, y0, stats, differentiable_jac):
        super().__init__(opts, rhs, y0, stats, differentiable_jac)
        self.jac_shape = None  # the shape a user jac must return (set on its first call)
        self.time = time_tensor(y0.dtype, y0.device)  # t as the 0-d tensor a user jac receives

    def _form(self, t, y, create):
        jac = self.opts.jac
        f = None
        if jac is not None:
            J = jac(self.time(t), y)
            if not isinstance(J, torch.Tensor):
                raise TypeError(
                    f"{self.owner}: jac(t, y) returned {type(J).__name__}; it must return a tensor"
                )
            want = self.jac_shape
            if want is None:
                N = y.numel()
                want = self.jac_shape = torch.Size(
                    (y.shape[0], y.shape[1], y.shape[1]) if self.batched else (N, N)
                )
            if J.shape != want:
                what = (
                    "one n×n matrix per row"
                    if self.batched
                    else "the Jacobian of the flattened state"
                )
                raise ValueError(
                    f"{self.owner}: jac(t, y) returned shape {tuple(J.shape)}, expected "
                    f"{tuple(want)} ({what})"
                )
            if J.dtype != y.dtype:
                J = J.to(y.dtype)
            J = J if create or not J.requires_grad else J.detach()
        elif self.batched:
            J, f = batched_jacobian(self.rhs, t, y, self.opts.jac_mode, create)
        else:
            J, f = dense_jacobian(self.rhs, t, y, self.opts.jac_mode, create)
        self.J = J
        self.point = (t, y)
        return f

    def jvp(self, v):
        if self.batched:
            return torch.bmm(self.J, v.unsqueeze(-1)).squeeze(-1)
        return torch.mv(self.J, v.reshape(-1)).view(v.shape)


class SmallInverse(_DenseJacobian):
    """Dense systems of up to :data:`SMALL` components: ``W⁻¹`` formed explicitly, so a stage solve
    is one mat-vec; on the CPU the host steps get it as a numpy array."""

    def __init__(self, opts, rhs, y0, stats, differentiable_jac):
        super().__init__(opts, rhs, y0, stats, differentiable_jac)
        self.host_capable = y0.device.type == "cpu"
        self.inv = None  # W⁻¹ (torch)
        self.scaled = None  # (scale, scale · W⁻¹)
        self.np_inv = None  # (g, (I/g − J)⁻¹ as a numpy array)
        self.list_inv = None  # (g, (I/g − J)⁻¹ as nested lists of floats)

    def _reset(self):
        self.inv = None
        self.np_inv = None
        self.list_inv = None

    def _factor(self, g):
        bump(self.stats, "nlu")
        J = self.J
        W = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device) - g * J
        self.inv = torch.linalg.inv_ex(W)[0]
        self.scaled = None

    def solve(self, b, scale=1.0, out=None):
        bump(self.stats, "nsolve")
        M = self.inv
        if scale != 1.0:
            if self.scaled is None or self.scaled[0] != scale:
                self.scaled = (scale, M * scale)
            M = self.scaled[1]
        if b.ndim == 1:
            return torch.mv(M, b, out=out) if out is not None else torch.mv(M, b)
        x = torch.mv(M, b.reshape(-1))
        return out.copy_(x) if out is not None else x.view(b.shape)

    def scaled_inverse_numpy(self, g: float) -> np.ndarray:
        """``(I/g − J)⁻¹ = g (I − gJ)⁻¹`` as a numpy array, formed once per Jacobian and ``g``
        (counts ``nlu``).

        A numpy inverse of a 3×3 matrix takes a fraction of torch's per-call cost, and 1×1–3×3
        systems take the closed form in Python floats; a singular matrix gives NaN (the step is
        rejected).
        """
        cached = self.np_inv
        if cached is not None and cached[0] == g:
            return cached[1]
        bump(self.stats, "nlu")
        n = self.J.shape[0]
        if n <= 3:
            M = np.array(
                closed_form_inverse(self.J.tolist(), 1.0 / g),
                dtype=np.float64 if self.J.dtype == torch.float64 else np.float32,
            )
        else:
            J = self.J.detach().numpy()
            try:
                M = np.linalg.inv(np.eye(n, dtype=J.dtype) / g - J)
            except np.linalg.LinAlgError:
                M = np.full((n, n), np.nan, dtype=J.dtype)
        self.np_inv = (g, M)
        return M

    def scaled_inverse_list(self, g: float) -> list:
        """``(I/g − J)⁻¹`` in closed form as nested lists of floats, for 1–3 components (counts
        ``nlu`` once per Jacobian and ``g``); NaN where the matrix is singular."""
        cached = self.list_inv
        if cached is not None and cached[0] == g:
            return cached[1]
        bump(self.stats, "nlu")
        M = closed_form_inverse(self.J.tolist(), 1.0 / g)
        self.list_inv = (g, M)
        return M

    def host_solver(self, g, shape):
        if not self.host_capable:
            return super().host_solver(g, shape)
        stats = self.stats
        Winv = self.scaled_inverse_numpy(g) * (1.0 / g)  # (I/g − J)⁻¹ / g = (I − gJ)⁻¹

        def solve(b):
            stats["nsolve"] = stats.get("nsolve", 0) + 1
            return Winv @ b

        return solve


class DenseLU(_DenseJacobian):
    """The LU factorisation of the dense N×N ``W``."""

    def _factor(self, g):
        bump(self.stats, "nlu")
        J = self.J
        W = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device) - g * J
        LU, piv, _ = torch.linalg.lu_factor_ex(W)
        self.lu = (LU, piv)

    def solve(self, b, scale=1.0, out=None):
        bump(self.stats, "nsolve")
        LU, piv = self.lu
        x = torch.linalg.lu_solve(LU, piv, (b if scale == 1.0 else scale * b).reshape(-1, 1)).view(
            b.shape
        )
        return out.copy_(x.reshape(-1)) if out is not None else x


class BatchedLU(DenseLU):
    """State ``(B, n)`` with f acting on each row: one n×n Jacobian and LU per row."""

    batched = True

    def __init__(self, opts, rhs, y0, stats, differentiable_jac):
        if y0.ndim != 2:
            raise ValueError(
                f"{opts.owner}: batched=True needs a state of shape (B, n) with f acting on each "
                "row; "
                f"got shape {tuple(y0.shape)}"
            )
        super().__init__(opts, rhs, y0, stats, differentiable_jac)

    def solve(self, b, scale=1.0, out=None):
        bump(self.stats, "nsolve")
        LU, piv = self.lu
        x = torch.linalg.lu_solve(
            LU, piv, (b if scale == 1.0 else scale * b).unsqueeze(-1)
        ).squeeze(-1)
        return out.copy_(x.reshape(-1)) if out is not None else x


class SparseLU(WOperator):
    """SuperLU of ``W`` with J on a known pattern (a scipy CSC matrix, never differentiated; CPU).

    Under autograd the solves are differentiable with respect to the right-hand side (the
    transpose solve gives the gradient); the Jacobian is held fixed.
    """

    def __init__(self, opts, rhs, y0, stats, differentiable_jac):
        if y0.device.type != "cpu":
            raise ValueError(
                f"{opts.owner}: linsolve='sparse' factors with scipy's SuperLU on the CPU; the "
                "state is "
                f"on {y0.device}. Use linsolve='lu' or 'gmres' there"
            )
        super().__init__(opts, rhs, y0, stats, differentiable_jac)
        self.sparse_jac = None
        if opts.jac is None:
            self.sparse_jac = SparseJacobian(
                sparsity_pattern(opts.jac_sparsity, y0.numel(), opts.owner), opts.jac_mode
            )
        self.J_diag = None  # positions of J's diagonal in its CSC data
        self.time = time_tensor(y0.dtype, y0.device)

    def _form(self, t, y, create):
        if create:
            raise ValueError(
                f"{self.owner}(linsolve='sparse'): the sparse Jacobian cannot be differentiated, "
                "and an exact "
                "gradient through a Rosenbrock step needs its derivative. Pass "
                "differentiable_jac=False (the "
                "gradient then holds J fixed), or use an ESDIRK method or QNDF, or a continuous "
                "adjoint "
                "(sensealg=pn.InterpolatingAdjoint())"
            )
        f = None
        if self.opts.jac is not None:
            self.J = to_csc(self.opts.jac(self.time(t), y.detach()), y.numel(), self.owner)
            self.J_diag = diagonal_positions(self.J)
        else:
            self.J, f = self.sparse_jac(self.rhs, t, y)
            self.J_diag = self.sparse_jac.diag
            if torch.is_grad_enabled():
                f = None  # under autograd the caller evaluates f with its graph
        self.point = (t, y)
        return f

    def _factor(self, g):
        bump(self.stats, "nlu")
        self.lu = sparse_factor(self.J, g, self.J_diag)

    def solve(self, b, scale=1.0, out=None):
        bump(self.stats, "nsolve")
        bf = (b if scale == 1.0 else scale * b).reshape(-1)
        solve = SparseSolve.apply if bf.requires_grad else sparse_solve
        x = solve(bf, self.lu).view(b.shape)
        return out.copy_(x.reshape(-1)) if out is not None else x

    def jvp(self, v):
        jv = self.J @ v.detach().reshape(-1).to(torch.float64).cpu().numpy()
        return torch.from_numpy(jv).to(dtype=v.dtype, device=v.device).view(v.shape)

    def host_solver(self, g, shape):
        self.factor(g)
        lu = self.lu
        stats = self.stats

        def solve(b):
            stats["nsolve"] = stats.get("nsolve", 0) + 1
            return (
                lu.solve(b)
                if b.dtype == np.float64
                else lu.solve(b.astype(np.float64)).astype(b.dtype)
            )

        return solve


class MatrixFreeGMRES(WOperator):
    """``W v = v − g·J v`` with ``J v`` from a forward-mode derivative at the linearisation point,
    solved by restarted GMRES to ``gmres_tol``; ``converged`` says whether the last solve did."""

    matrix_free = True

    def _form(self, t, y, create):
        self.J = None
        self.point = (t, y if create else y.detach())
        return None

    def _factor(self, g):
        pass  # nothing to factor: g enters every product

    def solve(self, b, scale=1.0, out=None):
        bump(self.stats, "nsolve")
        t, y = self.point
        shape = y.shape
        g = self.g
        rhs = self.rhs

        def fun(v):
            return rhs(t, v.view(shape)).reshape(-1)

        yf = y.reshape(-1)

        def matvec(v):
            return v - g * torch.func.jvp(fun, (yf,), (v,))[1]

        opts = self.opts
        bf = (b if scale == 1.0 else scale * b).reshape(-1)
        x, ok, its, _ = gmres(
            matvec, bf, rtol=opts.gmres_tol, restart=opts.gmres_restart, maxiter=opts.gmres_maxiter
        )
        bump(self.stats, "ngmres", its)
        if not ok:
            bump(self.stats, "ngmresfail")
        self.converged = ok
        x = x.view(b.shape)
        return out.copy_(x.reshape(-1)) if out is not None else x

    def jvp(self, v):
        t, y = self.point
        rhs = self.rhs
        return torch.func.jvp(lambda u: rhs(t, u), (y,), (v.view(y.shape),))[1]


def w_operator(
    opts: LinearOptions, rhs: Callable, y0: torch.Tensor, stats: dict, differentiable_jac: bool
) -> WOperator:
    """The :class:`WOperator` for ``opts`` and the state ``y0`` (chosen once per solve)."""
    if opts.linsolve == "gmres":
        cls = MatrixFreeGMRES
    elif opts.linsolve == "sparse":
        cls = SparseLU
    elif opts.batched:
        cls = BatchedLU
    elif y0.numel() <= SMALL:
        cls = SmallInverse
    else:
        cls = DenseLU
    return cls(opts, rhs, y0, stats, differentiable_jac)


def sparse_factor(J, g: float, diag=None):
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
