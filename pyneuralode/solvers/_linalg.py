"""Linear algebra for the implicit solvers: Jacobians from torch, W = I − g·J factorisations, GMRES, Newton.

One object, :class:`LinearSolver`, owns how a method gets its Jacobian and solves with
``W = I − g·J`` (``g = h·γ``):

* ``mode="dense"``: the flattened state's N×N Jacobian. The default way (``jac_mode="autograd"``)
  evaluates ``f(t, y)`` once with ``y`` tracked and pulls back all N rows in one batched backward
  pass (``torch.autograd.grad(..., is_grads_batched=True)``, a vmap over vector–Jacobian
  products); it returns ``f(t, y)`` as well, so a Rosenbrock step gets its first stage for free.
  ``jac_mode="jacrev"``/``"jacfwd"`` use :func:`torch.func.jacrev`/:func:`torch.func.jacfwd`;
  ``jac_mode="finite_difference"`` takes N forward differences (N extra evaluations of f, no
  autograd graph; the cheapest for tiny systems, accurate to about sqrt(eps)).
* ``mode="batched"``: state shape ``(B, n)`` with ``f`` acting on each row independently (declared
  by the user); one n×n Jacobian per row from n batched vector–Jacobian (or, ``jacfwd``,
  Jacobian–vector) products with the same unit vector in every row, and a batched LU — never the
  (B·n)² matrix.
* ``mode="user"``: a user function ``jac(t, y)`` returning the N×N (or, batched, B×n×n) matrix.
* ``linsolve="gmres"``: matrix-free; ``W v = v − g·J v`` with ``J v`` from :func:`torch.func.jvp`
  at the linearisation point, solved by restarted GMRES (no matrix is ever formed).

Statistics go into the solve's ``stats`` dict: ``njac`` (Jacobians formed, or linearisation
points set for GMRES), ``nlu`` (factorisations), ``nsolve`` (linear solves), and for Newton
``nnewton`` (iterations) and ``nconvfail`` (convergence failures).

Gradients: under autograd (``DirectAdjoint``) the LU factorisation and solves are differentiated by
torch. ``differentiable_jac=True`` builds J with ``create_graph=True`` so its dependence on ``y``
and the parameters is differentiated too (exact gradient of a Rosenbrock step); the ESDIRK engine
uses a detached J, which only affects the convergence speed of Newton, not its fixed point.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from .._problem import time_tensor
from . import _sparse

_JAC_MODES = ("autograd", "jacrev", "jacfwd", "finite_difference")
#: dense systems up to this size solve with an explicit inverse of W (a mat-vec per stage)
_SMALL = 16
_LINSOLVES = ("lu", "gmres", "sparse")
#: state dtypes the numpy (host) steps of CPU states without autograd take
HOST_DTYPES = (torch.float32, torch.float64)


class autograd_on:
    """Autograd on for an internal derivative (a Jacobian), also inside ``torch.no_grad()`` and
    ``torch.inference_mode()``; ``enable_grad`` alone does nothing under inference mode, where the
    Jacobian would silently come out zero."""

    __slots__ = ("_ctx",)

    def __enter__(self):
        self._ctx = (torch.inference_mode(False), torch.enable_grad()) if torch.is_inference_mode_enabled() \
            else (torch.enable_grad(),)
        for c in self._ctx:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._ctx):
            c.__exit__(*exc)
        return False


def grad_leaf(y: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``y`` that requires grad (an inference tensor is cloned: it cannot require grad)."""
    y = y.detach()
    return (y.clone() if y.is_inference() else y).requires_grad_(True)


def check_linear_options(owner: str, jac, batched, linsolve, jac_mode, gmres_tol, gmres_maxiter, gmres_restart,
                         jac_sparsity=None):
    """Validate the shared options of the implicit solvers (messages name the argument and the fix)."""
    if linsolve == "sparse":
        if jac_sparsity is None and jac is None:
            raise ValueError(f"{owner}: linsolve='sparse' needs jac_sparsity (the N×N pattern of the Jacobian's nonzeros) "
                             "or a jac(t, y) that returns a sparse matrix")
        if batched:
            raise ValueError(f"{owner}: linsolve='sparse' and batched=True do not combine; batched systems already "
                             "factor one small block per row (use linsolve='lu')")
    elif jac_sparsity is not None:
        raise ValueError(f"{owner}: jac_sparsity is used by linsolve='sparse'; pass linsolve='sparse' or drop jac_sparsity")
    if jac is not None and not callable(jac):
        raise TypeError(f"{owner}: jac must be None or a callable jac(t, y) -> Jacobian matrix, got {type(jac).__name__}")
    if not isinstance(batched, bool):
        raise TypeError(f"{owner}: batched must be True or False, got {batched!r}")
    if linsolve not in _LINSOLVES:
        raise ValueError(f"{owner}: linsolve must be one of {_LINSOLVES}, got {linsolve!r}")
    if jac_mode not in _JAC_MODES:
        raise ValueError(f"{owner}: jac_mode must be one of {_JAC_MODES}, got {jac_mode!r}")
    if linsolve == "gmres" and jac is not None:
        raise ValueError(f"{owner}: linsolve='gmres' is matrix-free and ignores jac; pass jac=None or linsolve='lu'")
    if not (isinstance(gmres_tol, (int, float)) and 0 < gmres_tol < 1):
        raise ValueError(f"{owner}: gmres_tol must be a number in (0, 1), got {gmres_tol!r}")
    for nm, v in (("gmres_maxiter", gmres_maxiter), ("gmres_restart", gmres_restart)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{owner}: {nm} must be a positive int, got {v!r}")


def set_linear_options(solver, jac, batched, linsolve, jac_mode, gmres_tol, gmres_maxiter, gmres_restart, jac_sparsity):
    """Validate and store the linear-algebra options every implicit solver shares."""
    check_linear_options(type(solver).__name__, jac, batched, linsolve, jac_mode, gmres_tol, gmres_maxiter,
                         gmres_restart, jac_sparsity)
    solver.jac, solver.batched, solver.linsolve, solver.jac_mode = jac, batched, linsolve, jac_mode
    solver.gmres_tol, solver.gmres_maxiter, solver.gmres_restart = gmres_tol, gmres_maxiter, gmres_restart
    solver.jac_sparsity = jac_sparsity


def linear_solver_for(solver, rhs, y0: torch.Tensor, stats: dict, differentiable_jac: bool) -> "LinearSolver":
    """The :class:`LinearSolver` built from a solver's stored options (see :func:`set_linear_options`)."""
    return LinearSolver(rhs, y0, stats, jac=solver.jac, batched=solver.batched, linsolve=solver.linsolve,
                        jac_mode=solver.jac_mode, differentiable_jac=differentiable_jac, gmres_tol=solver.gmres_tol,
                        gmres_maxiter=solver.gmres_maxiter, gmres_restart=solver.gmres_restart,
                        owner=type(solver).__name__, jac_sparsity=solver.jac_sparsity)


def _bump(stats: dict, key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + n


# ----------------------------------------------------------------------------------------------
# Jacobians


def dense_jacobian(rhs: Callable, t: float, y: torch.Tensor, jac_mode: str = "autograd", create_graph: bool = False):
    """``(J, f)``: the N×N Jacobian of the flattened ``rhs(t, ·)`` at ``y`` and, when free, ``f(t, y)`` (else ``None``)."""
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
                (J,) = torch.autograd.grad(out, yy, eye, is_grads_batched=True, create_graph=create_graph, allow_unused=True)
                J = torch.zeros(N, N, dtype=y.dtype, device=y.device) if J is None else J.reshape(N, N)
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


def _fd_steps(y: torch.Tensor) -> torch.Tensor:
    """Forward-difference increments sqrt(eps · max(1e-5, |y_k|)) (Hairer & Wanner's RADAU5), exact in binary."""
    eps = torch.finfo(y.dtype).eps
    d = (eps * y.detach().abs().clamp_min(1e-5)).sqrt()
    return (y.detach() + d) - y.detach()  # the increment actually representable at y


def fd_jacobian(rhs: Callable, t: float, y: torch.Tensor, create_graph: bool = False):
    """``(J, f)`` by forward differences: N extra evaluations of f (``nfe``), accurate to about sqrt(eps).

    OrdinaryDiffEq's ``autodiff=AutoFiniteDiff()`` and scipy's default for Radau/BDF: for tiny
    systems it is the cheapest Jacobian (no autograd graph); its error, ~1e-8 relative in float64,
    enters the step like a W-method's approximate Jacobian and is far below usual tolerances.
    """
    shape = y.shape
    N = y.numel()
    yin = y if create_graph else y.detach()
    f0 = rhs(t, yin)
    yf, f0f = yin.reshape(-1), f0.reshape(-1)
    d = _fd_steps(yf)
    eye = torch.eye(N, dtype=y.dtype, device=y.device)
    cols = []
    for k, dk in enumerate(d.tolist()):
        fk = rhs(t, torch.add(yf, eye[k], alpha=dk).view(shape)).reshape(-1)
        cols.append(torch.sub(fk, f0f).div_(dk) if not create_graph else (fk - f0f) / dk)
    J = torch.stack(cols, 1)
    return J, f0


def batched_fd_jacobian(rhs: Callable, t: float, y: torch.Tensor, create_graph: bool = False):
    """``(J, f)`` for ``(B, n)`` independent systems by forward differences: n extra evaluations of the batch."""
    B, n = y.shape
    yin = y if create_graph else y.detach()
    f0 = rhs(t, yin)
    d = _fd_steps(yin)
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    cols = []
    for k in range(n):
        dk = d[:, k : k + 1]
        cols.append((rhs(t, yin + dk * eye[k]) - f0) / dk)
    return torch.stack(cols, 2), f0  # J[b, i, k] = ∂f_i/∂y_k


def batched_jacobian(rhs: Callable, t: float, y: torch.Tensor, jac_mode: str = "autograd", create_graph: bool = False):
    """``(J, f)`` for a batch of independent systems: ``y`` is ``(B, n)``, ``f`` acts on each row; J is ``(B, n, n)``."""
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
            (g,) = torch.autograd.grad(out, yy, tangents, is_grads_batched=True, create_graph=create_graph, allow_unused=True)
            J = torch.zeros(B, n, n, dtype=y.dtype, device=y.device) if g is None else g.permute(1, 0, 2)  # g[k, b, :] = J_b[k, :]
    if not create_graph:
        out, J = out.detach(), J.detach()
    return J, out


# ----------------------------------------------------------------------------------------------
# GMRES


def gmres(matvec: Callable, b: torch.Tensor, x0: Optional[torch.Tensor] = None, tol: float = 1e-8,
          restart: int = 30, maxiter: int = 200):
    """Restarted GMRES (Saad & Schultz 1986) with modified Gram–Schmidt on flat vectors.

    Solves ``matvec(x) = b`` to ``‖b − A x‖ ≤ tol·‖b‖``; returns ``(x, converged, iterations)``.
    The residual is tracked with Givens rotations on Python floats; the small least-squares
    problem is solved once per cycle with tensors, so the result is differentiable under autograd.
    """
    bn = float(torch.linalg.vector_norm(b.detach()))
    if bn == 0.0:
        return torch.zeros_like(b), True, 0
    target = tol * bn
    x = torch.zeros_like(b) if x0 is None else x0
    its = 0
    m = min(restart, b.numel())
    while True:
        r = b - matvec(x) if (x0 is not None or its > 0) else b
        beta = torch.linalg.vector_norm(r)
        res = float(beta)
        if res <= target or its >= maxiter:
            return x, res <= target, its
        V = [r / beta]
        cols = []  # Hessenberg columns (tensors)
        cs, sn = [], []
        g = [res]  # rotated right-hand side (floats)
        for k in range(m):
            w = matvec(V[k])
            h = []
            for j in range(k + 1):
                hij = torch.dot(w, V[j])
                w = w - hij * V[j]
                h.append(hij)
            hk1 = torch.linalg.vector_norm(w)
            h.append(hk1)
            cols.append(h)
            its += 1
            # apply the previous rotations to the new column (floats), then a new one
            hf = [float(v) for v in h]
            for j in range(k):
                t0 = cs[j] * hf[j] + sn[j] * hf[j + 1]
                hf[j + 1] = -sn[j] * hf[j] + cs[j] * hf[j + 1]
                hf[j] = t0
            den = (hf[k] ** 2 + hf[k + 1] ** 2) ** 0.5
            c_, s_ = (1.0, 0.0) if den == 0 else (hf[k] / den, hf[k + 1] / den)
            cs.append(c_)
            sn.append(s_)
            g.append(-s_ * g[k])
            g[k] = c_ * g[k]
            res = abs(g[k + 1])
            breakdown = float(hk1) <= 1e-14 * bn
            if res <= target or breakdown or its >= maxiter:
                break
            V.append(w / hk1)
        k1 = len(cols)
        H = torch.zeros(k1 + 1, k1, dtype=b.dtype, device=b.device)
        Hc = [torch.stack(col + [torch.zeros((), dtype=b.dtype, device=b.device)] * (k1 - len(col) + 1)) for col in cols]
        H = torch.stack(Hc, 1)
        e1 = torch.zeros(k1 + 1, 1, dtype=b.dtype, device=b.device)
        e1 = e1 + torch.nn.functional.pad(beta.reshape(1, 1), (0, 0, 0, k1))
        yk = torch.linalg.lstsq(H, e1).solution[:, 0]
        x = x + torch.stack(V[:k1], 1) @ yk
        if res <= target or breakdown:
            return x, True, its


# ----------------------------------------------------------------------------------------------
# The W = I − g·J operator


def _closed_form_inverse(J, s: float):
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
    (a, b, c), (d, e, f), (g, h, i) = ([(s if r == k else 0.0) - J[r][k] for k in range(3)] for r in range(3))
    A, B, C = e * i - f * h, f * g - d * i, d * h - e * g
    det = a * A + b * B + c * C
    if det == 0.0 or not math.isfinite(det):
        return [[math.nan] * 3 for _ in range(3)]
    r = 1.0 / det
    return [[A * r, (c * h - b * i) * r, (b * f - c * e) * r],
            [B * r, (a * i - c * g) * r, (c * d - a * f) * r],
            [C * r, (b * g - a * h) * r, (a * e - b * d) * r]]


class LinearSolver:
    """Jacobian + factorisation of ``W = I − g·J`` for one solve (lives in a solver's cache).

    ``set_point(t, y)`` forms J at ``(t, y)`` (returns ``f(t, y)`` when it came for free);
    ``factor(g)`` factors ``W`` for ``g = h·γ`` (a no-op when ``g`` is unchanged);
    ``solve(b)`` returns ``W⁻¹ b`` for ``b`` shaped like the state.
    """

    def __init__(self, rhs, y0: torch.Tensor, stats: dict, *, jac=None, batched=False, linsolve="lu",
                 jac_mode="autograd", differentiable_jac=False, gmres_tol=1e-8, gmres_maxiter=200, gmres_restart=30,
                 owner="solver", jac_sparsity=None):
        if batched and y0.ndim != 2:
            raise ValueError(f"{owner}: batched=True needs a state of shape (B, n) with f acting on each row; got shape {tuple(y0.shape)}")
        self.sparse_mode = linsolve == "sparse"
        self.sparse_jac = None
        self.J_diag = None  # positions of J's diagonal in its CSC data (linsolve="sparse")
        if self.sparse_mode:
            if y0.device.type != "cpu":
                raise ValueError(f"{owner}: linsolve='sparse' factors with scipy's SuperLU on the CPU; the state is on "
                                 f"{y0.device}. Use linsolve='lu' or 'gmres' there")
            if jac is None:
                self.sparse_jac = _sparse.SparseJacobian(_sparse.sparsity_pattern(jac_sparsity, y0.numel(), owner), jac_mode)
        self.rhs = rhs
        self.stats = stats
        self.jac = jac
        self.batched = batched
        self.gmres_mode = linsolve == "gmres"
        self.jac_mode = jac_mode
        self.differentiable_jac = differentiable_jac
        self.gmres_tol, self.gmres_maxiter, self.gmres_restart = gmres_tol, gmres_maxiter, gmres_restart
        self.owner = owner
        #: a tiny dense system on the CPU: steps without autograd may do their linear algebra in numpy
        self.numpy_capable = (linsolve == "lu" and not batched and y0.numel() <= _SMALL
                              and y0.device.type == "cpu")
        self.J = None
        self.point = None  # (t, y) of the current J
        self.g = None
        self.lu = None
        self.scaled = None  # (scale, scale · W⁻¹) for tiny dense systems
        self.fresh = False  # J was formed at the current step's start
        self.param_grad = None
        self.np_inv = None  # (g, (I/g − J)⁻¹ as a numpy array) for the numpy step of tiny CPU systems
        self.list_inv = None  # (g, the same as nested lists of floats) for the unrolled step of 1–3 components
        self.jac_shape = None  # the shape a user jac must return (set on its first call)
        self.time = time_tensor(y0.dtype, y0.device)  # t as the 0-d tensor a user jac receives

    def copy(self) -> "LinearSolver":
        new = LinearSolver.__new__(LinearSolver)
        new.__dict__.update(self.__dict__)
        return new

    def set_point(self, t: float, y: torch.Tensor):
        """Form the Jacobian at ``(t, y)``; returns ``f(t, y)`` if it was evaluated on the way, else ``None``."""
        _bump(self.stats, "njac")
        create = self.differentiable_jac and torch.is_grad_enabled()
        if create and not y.requires_grad:
            if self.param_grad is None:  # once per solve: does f depend on tensors that require grad?
                with torch.enable_grad():
                    self.param_grad = bool(self.rhs(t, y.detach()).requires_grad)
            create = self.param_grad
        f = None
        if self.gmres_mode:
            self.J = None
            self.point = (t, y if create else y.detach())
        elif self.sparse_mode:  # a scipy CSC matrix, never differentiated
            if create:
                raise ValueError(
                    f"{self.owner}(linsolve='sparse'): the sparse Jacobian cannot be differentiated, and an exact "
                    "gradient through a Rosenbrock step needs its derivative. Pass differentiable_jac=False (the "
                    "gradient then holds J fixed), or use an ESDIRK method or QNDF, or a continuous adjoint "
                    "(sensealg=pn.InterpolatingAdjoint())"
                )
            if self.jac is not None:
                tt = self.time(t)
                self.J = _sparse.to_csc(self.jac(tt, y.detach()), y.numel(), self.owner)
                self.J_diag = _sparse.diagonal_positions(self.J)
            else:
                self.J, f = self.sparse_jac(self.rhs, t, y)
                self.J_diag = self.sparse_jac.diag
                if torch.is_grad_enabled():
                    f = None  # under autograd the caller evaluates f with its graph
            self.point = (t, y)
        elif self.jac is not None:
            J = self.jac(self.time(t), y)
            if not isinstance(J, torch.Tensor):
                raise TypeError(f"{self.owner}: jac(t, y) returned {type(J).__name__}; it must return a tensor")
            want = self.jac_shape
            if want is None:
                N = y.numel()
                want = self.jac_shape = torch.Size((y.shape[0], y.shape[1], y.shape[1]) if self.batched else (N, N))
            if J.shape != want:
                raise ValueError(f"{self.owner}: jac(t, y) returned shape {tuple(J.shape)}, expected {tuple(want)} "
                                 f"({'one n×n matrix per row' if self.batched else 'the Jacobian of the flattened state'})")
            if J.dtype != y.dtype:
                J = J.to(y.dtype)
            self.J = J if create or not J.requires_grad else J.detach()
            self.point = (t, y)
        else:
            if self.batched:
                J, f = batched_jacobian(self.rhs, t, y, self.jac_mode, create)
            else:
                J, f = dense_jacobian(self.rhs, t, y, self.jac_mode, create)
            self.J = J
            self.point = (t, y)
        self.g = None
        self.lu = None
        self.np_inv = None
        self.list_inv = None
        self.fresh = True
        return f

    def scaled_inverse_numpy(self, g: float) -> np.ndarray:
        """``(I/g − J)⁻¹ = g (I − gJ)⁻¹`` as a numpy array, formed once per Jacobian and ``g`` (counts ``nlu``).

        Tiny dense CPU systems without autograd: a numpy inverse of a 3×3 matrix takes a few
        microseconds where torch's takes ~20, and 1×1–3×3 systems take the closed form (cofactors
        over the determinant) in Python floats, cheaper still; a singular matrix gives NaN (the
        step is rejected).
        """
        cached = self.np_inv
        if cached is not None and cached[0] == g:
            return cached[1]
        _bump(self.stats, "nlu")
        n = self.J.shape[0]
        if n <= 3:
            M = np.array(_closed_form_inverse(self.J.tolist(), 1.0 / g),
                         dtype=np.float64 if self.J.dtype == torch.float64 else np.float32)
        else:
            J = self.J.detach().numpy()
            try:
                M = np.linalg.inv(np.eye(n, dtype=J.dtype) / g - J)
            except np.linalg.LinAlgError:
                M = np.full((n, n), np.nan, dtype=J.dtype)
        self.np_inv = (g, M)
        return M

    def scaled_inverse_list(self, g: float):
        """``(I/g − J)⁻¹`` as nested lists of Python floats for a 1×1–3×3 ``J`` (closed form, counts
        ``nlu``; NaN where singular): the unrolled Rosenbrock kernel's ``M``."""
        cached = self.list_inv
        if cached is not None and cached[0] == g:
            return cached[1]
        _bump(self.stats, "nlu")
        M = _closed_form_inverse(self.J.tolist(), 1.0 / g)
        self.list_inv = (g, M)
        return M

    def numpy_solver(self, g: float, shape) -> Callable[[np.ndarray], np.ndarray]:
        """``b ↦ W⁻¹ b`` on flat numpy arrays for ``W = I − g·J`` (CPU, no autograd; counts ``nsolve``).

        SuperLU directly for ``linsolve="sparse"``, the numpy inverse for tiny dense systems
        (:meth:`scaled_inverse_numpy`), else the dense LU through zero-copy tensors.
        """
        stats = self.stats
        if self.sparse_mode:
            self.factor(g)
            lu = self.lu[1]

            def solve(b):
                stats["nsolve"] = stats.get("nsolve", 0) + 1
                return lu.solve(b) if b.dtype == np.float64 else lu.solve(b.astype(np.float64)).astype(b.dtype)
        elif self.numpy_capable:
            Winv = self.scaled_inverse_numpy(g) * (1.0 / g)  # (I/g − J)⁻¹ / g = (I − gJ)⁻¹

            def solve(b):
                stats["nsolve"] = stats.get("nsolve", 0) + 1
                return Winv @ b
        else:
            self.factor(g)

            def solve(b):
                return self.solve(torch.from_numpy(b).view(shape)).reshape(-1).numpy()
        return solve

    def factor(self, g: float) -> None:
        if self.g == g and (self.lu is not None or self.gmres_mode):
            return
        self.g = g
        if self.gmres_mode:
            return
        _bump(self.stats, "nlu")
        if self.sparse_mode:
            self.lu = ("sparse", _sparse.factor(self.J, g, self.J_diag))
            return
        J = self.J
        n = J.shape[-1]
        eye = torch.eye(n, dtype=J.dtype, device=J.device)
        W = eye - g * J
        if not self.batched and n <= _SMALL:
            # tiny dense systems: an explicit inverse makes every stage solve one mat-vec
            self.lu = ("inv", torch.linalg.inv_ex(W)[0])
            self.scaled = None
            return
        LU, piv, info = torch.linalg.lu_factor_ex(W)
        self.lu = (LU, piv)

    def solve(self, b: torch.Tensor, scale: float = 1.0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W⁻¹ (scale · b)`` for ``b`` shaped like the state or flat (``W = I − g J`` at the last ``factor(g)``).

        ``out`` (no-grad use): a flat tensor the result is written into. Tiny dense systems keep
        ``scale · W⁻¹`` for the last ``scale``, so a Rosenbrock stage solve is one mat-vec.
        """
        _bump(self.stats, "nsolve")
        shape = b.shape
        if self.gmres_mode:
            x = self._gmres_solve(b if scale == 1.0 else scale * b).view(shape)
        elif self.sparse_mode:
            bf = (b if scale == 1.0 else scale * b).reshape(-1)
            solve = _sparse.SparseSolve.apply if bf.requires_grad else _sparse.sparse_solve
            x = solve(bf, self.lu[1]).view(shape)
        else:
            LU, piv = self.lu
            if LU == "inv":
                if scale != 1.0:
                    if self.scaled is None or self.scaled[0] != scale:
                        self.scaled = (scale, piv * scale)
                    piv = self.scaled[1]
                if b.ndim == 1:
                    return torch.mv(piv, b, out=out) if out is not None else torch.mv(piv, b)
                x = torch.mv(piv, b.reshape(-1)).view(shape)
            elif self.batched:
                x = torch.linalg.lu_solve(LU, piv, (b if scale == 1.0 else scale * b).unsqueeze(-1)).squeeze(-1)
            else:
                x = torch.linalg.lu_solve(LU, piv, (b if scale == 1.0 else scale * b).reshape(-1, 1)).view(shape)
        if out is not None:
            return out.copy_(x.reshape(-1))
        return x

    def _gmres_solve(self, b: torch.Tensor) -> torch.Tensor:
        t, y = self.point
        shape = y.shape
        g = self.g
        rhs = self.rhs

        def fun(v):
            return rhs(t, v.view(shape)).reshape(-1)

        yf = y.reshape(-1)

        def matvec(v):
            jv = torch.func.jvp(fun, (yf,), (v,))[1]
            return v - g * jv

        x, ok, its = gmres(matvec, b.reshape(-1), tol=self.gmres_tol, restart=self.gmres_restart, maxiter=self.gmres_maxiter)
        _bump(self.stats, "ngmres", its)
        if not ok:
            _bump(self.stats, "ngmresfail")
        self.last_ok = ok
        return x

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` at the current point (matrix product, or a forward-mode derivative when matrix-free)."""
        if self.gmres_mode:
            t, y = self.point
            shape = y.shape
            rhs = self.rhs
            return torch.func.jvp(lambda u: rhs(t, u), (y,), (v.view(shape),))[1]
        if self.sparse_mode:
            jv = self.J @ v.detach().reshape(-1).to(torch.float64).cpu().numpy()
            return torch.from_numpy(jv).to(dtype=v.dtype, device=v.device).view(v.shape)
        if self.batched:
            return torch.bmm(self.J, v.unsqueeze(-1)).squeeze(-1)
        return torch.mv(self.J, v.reshape(-1)).view(v.shape)


def newton_tolerance(kappa: float, rtol, dtype: torch.dtype) -> float:
    """The Newton stopping tolerance κ (on the tolerance-scaled norm), floored at ``10·eps/rtol``
    (Hairer & Wanner's RADAU5: ``FNEWT ≥ 10·UROUND/RTOL``): below it a correction is rounding noise,
    the contraction rate θ reads ≈ 1, and the iteration would be called divergent. Matters in
    float32 (rtol 1e-4: 0.012 > κ = 0.01); in float64 the floor is far below κ."""
    r = float(rtol.min()) if isinstance(rtol, torch.Tensor) else float(rtol)
    if not r > 0:
        return kappa
    return max(kappa, 10.0 * torch.finfo(dtype).eps / r)


def newton_setup(solver, rhs, t0: float, y0: torch.Tensor, stats: dict):
    """``(LinearSolver, f(t0, y0))`` for a Newton-based method (ESDIRK, QNDF): the Jacobian formed at
    ``(t0, y0)`` and held fixed (not differentiated); zeroed Newton counters in ``stats``."""
    for k in ("njac", "nlu", "nsolve", "nnewton", "nconvfail"):
        stats.setdefault(k, 0)
    ls = linear_solver_for(solver, rhs, y0, stats, differentiable_jac=False)
    f0 = ls.set_point(t0, y0)
    if f0 is None or torch.is_grad_enabled():
        f0 = rhs(t0, y0)  # (under autograd: keep the graph to y0 and the parameters)
    return ls, f0


def host_weighted_rms(x: np.ndarray, scale, inv_sqrt_n: float) -> float:
    """:func:`weighted_rms` on flat numpy arrays (``inv_sqrt_n = 1/√n``): the numpy steps' Newton
    norm and QNDF's order-selection norms."""
    r = x / scale
    return math.sqrt(float(np.vdot(r, r))) * inv_sqrt_n


def numpy_newton_ops(rhs: Callable, t: float, scale: np.ndarray, shape):
    """``(f_of, norm)`` on flat numpy arrays for the Newton iterations of the numpy steps (ESDIRK
    stages, QNDF steps): ``f(t, ·)`` (f gets and returns tensors, zero-copy) and the
    tolerance-scaled RMS norm; the numpy counterpart of :func:`newton_ops` (the linear solve is
    :meth:`LinearSolver.numpy_solver`). A 1-D state skips the view and reshape (with a
    ``torch.Size`` they cost ~4 µs a call, as much as a small f)."""
    from_numpy = torch.from_numpy
    if len(shape) == 1:
        def f_of(v):
            return rhs(t, from_numpy(v)).numpy()
    else:
        shape = tuple(shape)  # a tuple of ints: view() parses it ~1.5 µs faster than a torch.Size

        def f_of(v):
            return rhs(t, from_numpy(v).view(shape)).reshape(-1).numpy()
    inv_sqrt_n = 1.0 / math.sqrt(max(math.prod(shape), 1))

    def norm(dz):  # host_weighted_rms written out: one frame less on every Newton iteration
        r = dz / scale
        return math.sqrt(float(np.vdot(r, r))) * inv_sqrt_n

    return f_of, norm


def weighted_rms(x: torch.Tensor, scale) -> float:
    """RMS norm of ``x / scale`` as a Python float (the Newton convergence norm)."""
    with torch.no_grad():
        r = x.detach() / scale
        return float(torch.linalg.vector_norm(r)) / math.sqrt(max(r.numel(), 1))


def newton_ops(rhs: Callable, t: float, ls: "LinearSolver", scale: torch.Tensor, shape):
    """``(f_of, solve, norm)`` on flat tensors for a simplified Newton iteration at time ``t`` (ESDIRK
    stages, QNDF steps): ``f(t, ·)``, ``W⁻¹ b`` (``None`` when GMRES did not converge) and the
    tolerance-scaled RMS norm."""
    scale = scale.reshape(-1)
    flat = len(shape) == 1
    shape = tuple(shape)  # view() parses a tuple of ints ~1.5 µs faster than a torch.Size

    def f_of(v):
        return rhs(t, v) if flat else rhs(t, v.view(shape)).reshape(-1)

    def solve(b):
        x = ls.solve(b if flat else b.view(shape))
        x = x if flat else x.reshape(-1)
        return None if ls.gmres_mode and not getattr(ls, "last_ok", True) else x

    def norm(dx):
        return weighted_rms(dx, scale)

    return f_of, solve, norm
