"""One generic engine for Rosenbrock (linearly implicit) methods, driven by a
:class:`RosenbrockTableau`.

Methods are stored in Hairer & Wanner's transformed form (*Solving ODEs II*, IV.7, eq. 7.25), the
form OrdinaryDiffEq.jl's ``RodasTableau`` uses::

    (I/(hγ) − J) U_i = f(t0 + c_i h, y0 + Σ_j A_ij U_j) + Σ_j (C_ij/h) U_j + h d_i ∂f/∂t
    y1 = y0 + Σ_j m_j U_j,     error = Σ_j e_j U_j

One Jacobian and one LU of ``W = I − hγJ`` per step (``nlu``), one solve per stage (``nsolve``).
``J`` is formed at the start of every step (a Rosenbrock method needs the current Jacobian); a
rejected step keeps it and only refactors ``W`` for the smaller step. ``∂f/∂t`` is a forward
difference (one evaluation per step) unless the problem is autonomous, which is detected once (two
probes of f inside the first step, ``autonomous=None``) or declared (``autonomous=True/False``).

The stage loop is written once, against the W operator (:mod:`.linear`) and the stage
arithmetic (:mod:`._ops`) chosen when the solve starts: torch (autograd, GPU, batched, GMRES and
sparse solves, larger states) or numpy (dense states of up to 16 elements on the CPU without
autograd, where torch's per-call cost dominates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._base import AbstractSolver, StepResult, TableauSolver, options_repr
from ._ops import TorchOps, stage_ops
from .linear import LinearOptions, w_operator

_SQRT_EPS = math.sqrt(2.220446049250313e-16)


@dataclass(frozen=True)
class RosenbrockTableau:
    """Coefficients of a Rosenbrock method in the transformed (``A``, ``C``, ``γ``) form.

    ``A``, ``C``: strictly lower-triangular s×s; ``gamma``: the diagonal γ; ``c``: stage times;
    ``d``: time-derivative weights γ_i; ``m``/``e``: weights of the solution and of the error
    estimate on the stages; ``H`` (optional, q×s): the dense-output rows (OrdinaryDiffEq's
    ``H``: ``k_j = Σ_i H_ji U_i`` for the stiff-aware interpolant).

    Construction checks the structure and consistency: back-transforms to the classical form
    (Γ = (I/γ − C)⁻¹, α = AΓ, b = mΓ), checks that α's row sums are ``c`` and Γ's row sums are
    ``d``, and the Rosenbrock order conditions (Hairer & Wanner IV.7, Table 7.1) up to order 4 for
    the solution (order ``order``) and the embedded solution ``(m − e)Γ`` (order ``error_order``).
    """

    A: np.ndarray
    C: np.ndarray
    gamma: float
    c: np.ndarray
    d: np.ndarray
    m: np.ndarray
    e: np.ndarray
    order: int
    error_order: int
    H: np.ndarray | None = None
    tol: float = 1e-9

    def __post_init__(self):
        A, C, c, d, m, e = (
            np.asarray(x, dtype=np.float64)
            for x in (self.A, self.C, self.c, self.d, self.m, self.e)
        )
        for k, v in zip("ACcdme", (A, C, c, d, m, e)):
            object.__setattr__(self, k, v)
        s = len(m)
        if (
            A.shape != (s, s)
            or C.shape != (s, s)
            or c.shape != (s,)
            or d.shape != (s,)
            or e.shape != (s,)
        ):
            raise ValueError(
                f"inconsistent Rosenbrock tableau shapes A{A.shape} C{C.shape} c{c.shape} "
                f"d{d.shape} m{m.shape} e{e.shape}"
            )
        if np.any(np.triu(A) != 0) or np.any(np.triu(C) != 0):
            raise ValueError("Rosenbrock tableau: A and C must be strictly lower triangular")
        if self.H is not None:
            H = np.asarray(self.H, dtype=np.float64)
            object.__setattr__(self, "H", H)
            if H.ndim != 2 or H.shape[1] != s:
                raise ValueError(
                    f"Rosenbrock tableau: H must have {s} columns, got shape {H.shape}"
                )
        g = self.gamma
        Gamma = np.linalg.inv(np.eye(s) / g - C)
        alpha = A @ Gamma
        if not np.allclose(alpha.sum(1), c, atol=self.tol * 10, rtol=0):
            raise ValueError(
                f"Rosenbrock tableau: stage times c {c} differ from the row sums of α "
                f"{alpha.sum(1)}"
            )
        if not np.allclose(Gamma.sum(1), d, atol=self.tol * 10, rtol=0):
            raise ValueError(
                f"Rosenbrock tableau: d {d} differs from the row sums of Γ {Gamma.sum(1)}"
            )
        b = m @ Gamma
        bhat = (m - e) @ Gamma
        for which, w, p in (
            ("solution", b, self.order),
            ("embedded solution", bhat, self.error_order),
        ):
            for name, (lhs, rhs) in rosenbrock_order_conditions(
                alpha, Gamma, w, g, min(p, 4)
            ).items():
                if abs(lhs - rhs) > 1e-7:
                    raise ValueError(
                        f"Rosenbrock tableau: {which} fails order condition {name}: {lhs} != {rhs}"
                    )

    @property
    def stages(self) -> int:
        return len(self.m)


def rosenbrock_order_conditions(alpha, Gamma, b, g, p):
    """Order conditions of a Rosenbrock method with γ_ii = g (Hairer & Wanner IV.7, Table 7.1)."""
    beta = alpha + Gamma
    bl = np.tril(beta, -1)  # β_jk, k < j
    a = alpha.sum(1)  # α_i
    bp = bl.sum(1)  # β'_i
    out = {}
    if p >= 1:
        out["Σb=1"] = (b.sum(), 1.0)
    if p >= 2:
        out["Σbβ'=1/2-γ"] = (b @ bp, 0.5 - g)
    if p >= 3:
        out["Σbα²=1/3"] = (b @ a**2, 1 / 3)
        out["Σbββ'=1/6-γ+γ²"] = (b @ bl @ bp, 1 / 6 - g + g * g)
    if p >= 4:
        out["Σbα³=1/4"] = (b @ a**3, 0.25)
        out["Σbαα β'=1/8-γ/3"] = (b @ (a * (np.tril(alpha, -1) @ bp)), 1 / 8 - g / 3)
        out["Σbβα²=1/12-γ/3"] = (b @ bl @ a**2, 1 / 12 - g / 3)
        out["Σbβββ'=1/24-γ/2+3γ²/2-γ³"] = (b @ bl @ bl @ bp, 1 / 24 - g / 2 + 1.5 * g * g - g**3)
    return out


class _RosenbrockCache:
    __slots__ = ("ls", "f0", "dT", "autonomous", "stats", "t", "f_next", "ops")

    def __init__(self, ls, stats, autonomous, ops=None):
        self.ls = ls
        self.stats = stats
        self.autonomous = autonomous
        self.ops = ops  # the stage arithmetic (generic tableau methods)
        self.f0 = None
        self.dT = None
        self.t = None
        self.f_next = None

    def advanced(self, f_next=None):
        new = _RosenbrockCache(self.ls, self.stats, self.autonomous, self.ops)
        new.f_next = f_next
        return new


def _detect_autonomous(rhs, t0, y0, f0, h):
    """True when f(t, y0) is bitwise unchanged at two probe times inside the first step
    ``[t0, t0 + h]`` (2 evaluations, once per solve)."""
    with torch.no_grad():
        y = y0.detach()
        f0 = f0.detach()
        for frac in (1e-3, 0.37):
            if not torch.equal(rhs(t0 + frac * h, y), f0):
                return False
    return True


class RosenbrockSolver(AbstractSolver):
    """Base of the Rosenbrock methods: options shared by all of them, the cache and the Jacobian
    step.

    Options: ``jac`` (None: automatic via torch; or ``jac(t, y) -> J``), ``batched`` (state
    ``(B, n)``, f acting per row: one n×n Jacobian and LU per row), ``linsolve`` (``"lu"``,
    matrix-free ``"gmres"``, or ``"sparse"``: SuperLU on a Jacobian with the pattern
    ``jac_sparsity``, formed from one Jacobian–vector product per column colour), ``jac_mode``
    (``"autograd"``, ``"jacrev"``, ``"jacfwd"``, ``"finite_difference"``), ``autonomous`` (None:
    detect once by probing f at two times inside the first step; True/False: declare),
    ``differentiable_jac`` (differentiate J under autograd: exact gradients of the discrete
    solution; default True).
    """

    implicit = True

    def __init__(
        self,
        jac=None,
        batched: bool = False,
        linsolve: str = "lu",
        jac_mode: str = "autograd",
        autonomous: bool | None = None,
        differentiable_jac: bool = True,
        gmres_tol: float = 1e-10,
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
        if autonomous is not None and not isinstance(autonomous, bool):
            raise TypeError(
                f"{type(self).__name__}: autonomous must be None (detect), True or False, got "
                f"{autonomous!r}"
            )
        self.autonomous = autonomous
        self.differentiable_jac = bool(differentiable_jac)

    def default_controller(self):
        """Gustafsson's predictive controller (:class:`~pyneuralode.PredictiveController`), the
        default of Hairer's RODAS: at equal accuracy Rodas5P and Rodas4 take 12–13% fewer steps than
        with the PI controller on Van der Pol (μ = 1000) and 5% fewer on Robertson."""
        from ..controllers import PredictiveController

        return PredictiveController()

    def __repr__(self):
        defaults = LinearOptions.defaults(gmres_tol=1e-10, autonomous=None, differentiable_jac=True)
        return options_repr(self, defaults)

    def init(self, rhs, t0, y0, stats, rtol=None, atol=None):
        for k in ("njac", "nlu", "nsolve"):
            stats.setdefault(k, 0)
        ls = w_operator(
            LinearOptions.of(self), rhs, y0, stats, differentiable_jac=self.differentiable_jac
        )
        return _RosenbrockCache(ls, stats, self.autonomous)

    def _prepare(self, rhs, t0, y0, h, cache):
        """J, f0 and ∂f/∂t at (t0, y0), reused on a retry after a rejection."""
        if cache.t != t0 or cache.f0 is None:
            f0 = cache.ls.set_point(t0, y0)
            if f0 is None:
                f0 = cache.f_next if cache.f_next is not None else rhs(t0, y0)
            cache.f0 = f0
            cache.t = t0
            cache.dT = None
            if cache.autonomous is None:  # detected once, inside the first step
                cache.autonomous = _detect_autonomous(rhs, t0, y0, f0, h)
            if not cache.autonomous:
                delta = _SQRT_EPS * max(1.0, abs(t0))
                if h < 0:
                    delta = -delta
                cache.dT = (rhs(t0 + delta, y0) - f0) / delta
        return cache.f0, cache.dT


def rodas_interpolant(dense, theta):
    """Stiff-aware dense output of the Rodas methods (OrdinaryDiffEq's ``rosenbrock_interpolants``).

    ``y(θ) = (1−θ) y0 + θ (y1 + (1−θ)(k1 + θ(k2 + θ k3)))`` with ``k_j = Σ_i H_ji U_i``.
    """
    y0, y1, kk = dense
    th = theta
    inner = kk[-1]
    for j in range(len(kk) - 2, -1, -1):
        inner = kk[j] + th * inner
    return (1 - th) * y0 + th * (y1 + (1 - th) * inner)


class GenericRosenbrock(RosenbrockSolver, TableauSolver):
    """A Rosenbrock method given by ``tableau`` (a :class:`RosenbrockTableau`)."""

    tableau: RosenbrockTableau

    def init(self, rhs, t0, y0, stats, rtol=None, atol=None):
        cache = super().init(rhs, t0, y0, stats, rtol, atol)
        cache.ops = stage_ops(self.tableau, cache.ls, y0)
        return cache

    def step(self, rhs, t0, y0, h, cache):
        """One step: J, f0 and ∂f/∂t at ``(t0, y0)``, then the stages on the solve's stage
        arithmetic."""
        ops = cache.ops
        if (
            ops.host and torch.is_grad_enabled()
        ):  # a solve started without autograd, stepped with it
            ops = TorchOps(self.tableau, cache.ls)
        f0, dT = self._prepare(rhs, t0, y0, h, cache)
        c = ops.c  # the stage times
        with ops.guard():
            u = ops.start(y0, f0, dT, h)  # the first stage; u: the second stage's point
            for i in range(1, len(c)):
                u = ops.stage(i, rhs(t0 + c[i] * h, u))
            y1, err, dense = ops.finish()
        return StepResult(
            y1=y1, error=err, cache=cache.advanced(), dense=dense, cache_on_reject=cache
        )

    def interpolant(self, dense, theta):  # type: ignore[override]
        return rodas_interpolant(dense, theta)
