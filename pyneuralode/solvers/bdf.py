"""Variable-order multistep methods for large stiff systems: ``QNDF``.

``QNDF`` is the quasi-constant step size, variable-order (1–5) numerical differentiation formula
method of Shampine & Reichelt (1997), the algorithm of MATLAB's ``ode15s``, scipy's ``BDF`` and
OrdinaryDiffEq's ``QNDF``. The history is a table of backward differences ``D`` (``D[0] = y_n``,
``D[j] = ∇ʲ y_n``) for the current step size; a step-size change re-expresses the table for the
new step (``R U`` of Shampine & Reichelt), so the formula coefficients stay those of constant
steps. Each step is one simplified Newton iteration on ``y − ψ − c f(t, y) = 0`` with
``c = h/α_k``, reusing the Jacobian across steps (a new one only when Newton fails to converge)
and the factorisation of ``I − cJ`` while ``c`` is unchanged: per step typically 1–3 evaluations of
f and no Jacobian. That is what pays on large stiff systems, where a Rosenbrock or ESDIRK step
must form a new Jacobian (or factorisation) every step.

The integrate loop still decides acceptance with the error estimate ``C_{k+1} · d`` (``d`` the
Newton correction, the ``k+1``-th difference); after an accepted step the method proposes the next
step size (kept constant for ``k+1`` steps after a change, then the order among ``k−1, k, k+1``
that allows the largest step), which the loop uses in place of its controller.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ._base import AbstractSolver, StepResult, options_repr
from ._newton import newton_setup, newton_tolerance
from ._ops import TorchOps, stage_ops
from .linear import LinearOptions

__all__ = ["QNDF"]

MAX_ORDER = 5
_NEWTON_MAXITER = 4
_MAX_FACTOR = 10.0

# NDF coefficients (Shampine & Reichelt 1997, table 1): κ_k, γ_k = Σ_{j≤k} 1/j, α_k = (1 − κ_k) γ_k,
# and the error constants κ_k γ_k + 1/(k+1).
_KAPPA = np.array([0.0, -0.1850, -1.0 / 9.0, -0.0823, -0.0415, 0.0])
_GAMMA = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, MAX_ORDER + 1))])
_ALPHA = (1.0 - _KAPPA) * _GAMMA
_ERROR_CONST = _KAPPA * _GAMMA + 1.0 / np.arange(1, MAX_ORDER + 2)


def _R(order: int, fac: float) -> np.ndarray:
    """scipy BDF's ``compute_R``: the difference-rescaling matrix for a step ``fac`` times as
    long."""
    i = np.arange(1, order + 1)[:, None]
    j = np.arange(1, order + 1)
    M = np.zeros((order + 1, order + 1))
    M[1:, 1:] = (i - 1 - fac * j) / i
    M[0] = 1.0
    return np.cumprod(M, axis=0)


@functools.cache
def _U(order: int) -> np.ndarray:
    """``R(1)`` for an order (it depends on the order only: computed once)."""
    U = _R(order, 1.0)
    U.flags.writeable = False
    return U


def _rescale_matrix(order: int, factor: float) -> np.ndarray:
    """``(R(factor) U)ᵀ``: re-expresses the first ``order+1`` differences for a step ``factor``
    times as long."""
    return (_R(order, factor) @ _U(order)).T


class _QNDFCache:
    __slots__ = (
        "ls",
        "ops",
        "D",
        "order",
        "h",
        "n_equal",
        "stats",
        "rtol",
        "atol",
        "jac_current",
        "newton_tol",
    )

    def __init__(self, ls, ops, D, order, h, n_equal, stats, rtol, atol, jac_current, newton_tol):
        self.ls, self.ops, self.D, self.order, self.h, self.n_equal = ls, ops, D, order, h, n_equal
        self.stats, self.rtol, self.atol = stats, rtol, atol
        self.jac_current = jac_current  # J was formed in the current step (no fresher one to try)
        self.newton_tol = newton_tol

    def but(self, **changes) -> _QNDFCache:
        """A copy with some fields changed (caches are never modified in place: a rejected step
        keeps the old one)."""
        new = _QNDFCache.__new__(_QNDFCache)
        for name in self.__slots__:
            setattr(new, name, changes.get(name, getattr(self, name)))
        return new


def _flat_tol(tol, ref: torch.Tensor):
    return (
        tol.reshape(-1).to(dtype=ref.dtype, device=ref.device)
        if isinstance(tol, torch.Tensor)
        else tol
    )


def _next_order(k, e_m, e_k, e_p, safety):
    """Order selection after k+1 equal steps (Shampine & Reichelt; scipy BDF): of orders k−1, k, k+1
    (error norms ``e_m, e_k, e_p``, ``inf`` where not available) the one allowing the longest step;
    returns ``(order, step factor)``."""
    facs = [
        e ** (-1.0 / q) if e > 0 else math.inf for e, q in ((e_m, k), (e_k, k + 1), (e_p, k + 2))
    ]
    best = max(range(3), key=lambda i: facs[i])
    return k + best - 1, min(_MAX_FACTOR, safety * facs[best])


def _newton_with_fresh_jacobian(newton, ls, cache, jac_current, t1, predictor):
    """``newton()`` (factor, then iterate); if it fails with an old Jacobian, form a fresh one at
    the predictor (``predictor()``: a tensor shaped like the state) and try once more. Returns
    ``(newton's result or None when it failed with a fresh Jacobian, jac_current)``."""
    while True:
        result = newton()
        if result[0]:
            return result, jac_current
        cache.stats["nconvfail"] += 1
        if jac_current:
            return None, jac_current
        ls.set_point(t1, predictor())
        jac_current = True


def _newton_failure(y0, cache):
    """The step result of a Newton failure with a fresh Jacobian: the loop shrinks the step."""
    fail = cache.but(jac_current=True)
    return StepResult(y1=y0, error=None, cache=fail, dense=None, ok=False, cache_on_reject=fail)


def _newton_loop(f_of, solve, norm, y_pred, zeros, c, psi, cache):
    """Simplified Newton on ``y − ψ − c f(t1, y) = 0`` from ``y_pred`` with scipy BDF's rate test,
    for tensors or numpy arrays alike: ``f_of(y)``, ``solve(b) = (I − cJ)⁻¹ b`` (``None``: the
    linear solve failed) and ``norm(dy)`` (the scaled RMS norm) work on the flat state.
    Returns ``(converged, iterations, y, d = y − y_pred)``."""
    stats = cache.stats
    y, d = y_pred, zeros
    dy_norm_old = None
    tol = cache.newton_tol
    for it in range(_NEWTON_MAXITER):
        stats["nnewton"] += 1
        dy = solve(c * f_of(y) - psi - d)
        if dy is None:
            return False, it + 1, y, d
        dy_norm = norm(dy)
        if not math.isfinite(dy_norm):
            return False, it + 1, y, d
        rate = None if dy_norm_old is None else (dy_norm / dy_norm_old if dy_norm_old > 0 else 0.0)
        if rate is not None and (
            rate >= 1 or rate ** (_NEWTON_MAXITER - it) / (1 - rate) * dy_norm > tol
        ):
            return False, it + 1, y, d
        y = y + dy
        d = d + dy
        if dy_norm == 0 or (rate is not None and rate / (1 - rate) * dy_norm < tol):
            return True, it + 1, y, d
        dy_norm_old = dy_norm
    return False, _NEWTON_MAXITER, y, d


class QNDF(AbstractSolver):
    """Quasi-constant step size NDF of variable order 1–5 (Shampine & Reichelt 1997; MATLAB ode15s,
    scipy ``BDF``, OrdinaryDiffEq ``QNDF``).

    Orders 1–2 are A-stable, 3–5 A(α)-stable (α ≈ 80°, 66°, 51° with the NDF's κ); the error
    estimate is ``C_{k+1} ∇^{k+1} y``. Jacobians are reused across steps (formed again only when
    Newton fails), so large stiff systems cost a few f evaluations and back-substitutions per step.

    Options as the other implicit solvers: ``jac`` (None: by torch; or ``jac(t, y) -> J``),
    ``batched`` (state ``(B, n)``, f per row: one n×n Jacobian and LU per row), ``linsolve``
    (``"lu"``, matrix-free ``"gmres"``, or ``"sparse"``: SuperLU on a Jacobian with the pattern
    ``jac_sparsity``, for large systems such as discretised PDEs), ``jac_mode`` (``"autograd"``,
    ``"jacrev"``, ``"jacfwd"``, ``"finite_difference"``), ``max_order`` (1–5). Counts ``njac``,
    ``nlu``, ``nsolve``, ``nnewton``, ``nconvfail`` in ``sol.stats``. Gradients (``DirectAdjoint``)
    flow through the Newton iterations with the Jacobian held fixed, as for the ESDIRK methods.
    """

    name = "QNDF"
    implicit = True
    multistep = True  # its state is y plus a history: checkpoint re-solves cannot replay its steps
    order = MAX_ORDER  # the highest order it reaches; it starts at order 1
    error_order = MAX_ORDER
    start_order = 1

    def __init__(
        self,
        jac=None,
        batched: bool = False,
        linsolve: str = "lu",
        jac_mode: str = "autograd",
        max_order: int = MAX_ORDER,
        gmres_tol: float = 1e-6,
        gmres_maxiter: int = 200,
        gmres_restart: int = 30,
        jac_sparsity=None,
    ):
        LinearOptions(
            type(self).__name__,
            jac,
            batched,
            linsolve,
            jac_mode,
            gmres_tol,
            gmres_maxiter,
            gmres_restart,
            jac_sparsity,
        ).store_on(self)
        if (
            not isinstance(max_order, int)
            or isinstance(max_order, bool)
            or not 1 <= max_order <= MAX_ORDER
        ):
            raise ValueError(
                f"{type(self).__name__}: max_order must be an int from 1 to {MAX_ORDER}, got "
                f"{max_order!r}"
            )
        self.max_order = max_order

    def default_controller(self):
        """The integral controller, as scipy BDF and ode15s: after an accepted step QNDF picks the
        order and step itself (every k+1 equal steps); the controller only sizes the retry after an
        error-test rejection, ``0.9·err^(−1/(k+1))``. (SciML's PI gains shrink too little there:
        on Van der Pol (μ = 1000) QNDF took 5–11% more steps with them.)"""
        from ..controllers import PIController

        return PIController(beta1=1.0, beta2=0.0)

    def __repr__(self):
        defaults = LinearOptions.defaults(gmres_tol=1e-6, max_order=MAX_ORDER)
        return options_repr(self, defaults)

    def init(self, rhs, t0, y0, stats, rtol=1e-6, atol=1e-9):
        ls, f0 = newton_setup(self, rhs, t0, y0, stats)
        # Newton tolerance of scipy/ode15s: min(0.03, √rtol), at least 10ε/rtol (ε of the state's
        # dtype).
        rt = float(rtol.max()) if isinstance(rtol, torch.Tensor) else float(rtol)
        newton_tol = newton_tolerance(min(0.03, rt**0.5), rtol, y0.dtype)
        # The table holds y0 and f0 until the first step knows its size: D[1] = h f0.
        D = torch.stack([y0.reshape(-1), f0.reshape(-1)])
        ops = stage_ops(None, ls, y0, host_inverse=False)
        return _QNDFCache(
            ls,
            ops,
            D,
            1,
            None,
            0,
            stats,
            _flat_tol(rtol, y0),
            _flat_tol(atol, y0),
            True,
            newton_tol,
        )

    # -- one step
    # ------------------------------------------------------------------------------------
    def step(self, rhs, t0, y0, h, cache):
        """One step on the solve's stage arithmetic (the table ``D`` is that arithmetic's array)."""
        ops = cache.ops
        if (
            ops.host and torch.is_grad_enabled()
        ):  # a solve started without autograd, stepped with it
            ops = TorchOps(None, cache.ls)
        k = cache.order
        D = ops.table(cache.D)
        n_equal = cache.n_equal
        if cache.h is None:  # first step: D = [y0, h f0]
            D = ops.first_table(D, h)
            n_equal = 0
        elif h != cache.h:
            D = ops.rescale_table(D, k, _rescale_matrix(k, h / cache.h))
            n_equal = 0
        ls = cache.ls
        jac_current = cache.jac_current
        shape = y0.shape
        t1 = t0 + h
        with ops.guard():  # (host: overflow or NaN makes Newton fail: the step is rejected)
            y_pred = D[: k + 1].sum(0)
            scale = ops.error_scale(y_pred, cache.rtol, cache.atol)
            alpha = float(_ALPHA[k])  # (Python floats keep float32 tables in float32)
            psi = ops.row_combination(_GAMMA[1 : k + 1], D[1 : k + 1]) / alpha
            c = h / alpha

            def newton():
                solve = ops.linear_solver(ls, c, shape)
                f_of, norm = ops.newton_fns(rhs, t1, scale, shape)
                return _newton_loop(
                    f_of, solve, norm, y_pred, ops.zeros_like(y_pred), c, psi, cache
                )

            result, jac_current = _newton_with_fresh_jacobian(
                newton, ls, cache, jac_current, t1, lambda: ops.state(y_pred, shape).detach()
            )
            if result is None:
                return _newton_failure(y0, cache)
            _, n_iter, y1, d = result
            err = float(_ERROR_CONST[k]) * d
            D_new = ops.update_table(D, d, k)
            # The step size (and order) the method proposes if the loop accepts this step; the
            # Newton iterations' share of the safety factor also shrinks a retry after an error-test
            # rejection.
            newton_safety = (2 * _NEWTON_MAXITER + 1) / (2 * _NEWTON_MAXITER + n_iter)
            safety = 0.9 * newton_safety
            n_equal += 1
            new_order, factor = k, 1.0
            if n_equal >= k + 1:
                sc = ops.error_scale(y1, cache.rtol, cache.atol)
                e_k = ops.rms(err, sc)
                e_m = ops.rms(float(_ERROR_CONST[k - 1]) * D_new[k], sc) if k > 1 else math.inf
                e_p = (
                    ops.rms(float(_ERROR_CONST[k + 1]) * D_new[k + 2], sc)
                    if k < self.max_order
                    else math.inf
                )
                new_order, factor = _next_order(k, e_m, e_k, e_p, safety)
                n_equal = 0
        new_cache = cache.but(D=D_new, order=new_order, h=h, n_equal=n_equal, jac_current=False)
        on_reject = cache.but(jac_current=jac_current)
        dense = (ops.rows(D_new[: k + 1]), shape)
        return StepResult(
            y1=ops.state(y1, shape),
            error=ops.state(err, shape),
            cache=new_cache,
            dense=dense,
            cache_on_reject=on_reject,
            order=k,
            dt_factor=factor,
            reject_safety=newton_safety,
        )

    def interpolant(self, dense, theta):  # type: ignore[override]
        """The step's interpolating polynomial through ``y_{n+1}, y_n, …`` (degree = the step's
        order).

        At ``t = t_n + θh``: ``y = D[0] + Σ_j D[j] Π_{i<j} (θ − 1 + i)/(i + 1)``.
        """
        Dk, shape = dense
        k = Dk.shape[0] - 1
        if isinstance(theta, torch.Tensor):
            th = theta.to(Dk.dtype)
            w, p = [], 1.0
            for i in range(k):
                p = p * (th - 1 + i) / (i + 1)
                w.append(p)
            w = torch.stack([torch.as_tensor(x, dtype=Dk.dtype, device=Dk.device) for x in w])
        else:
            w = np.cumprod([(theta - 1 + i) / (i + 1) for i in range(k)])
            w = torch.as_tensor(w, dtype=Dk.dtype).to(Dk.device)
        return (Dk[0] + w @ Dk[1:]).view(shape)
