"""One generic engine for Rosenbrock (linearly implicit) methods, driven by a :class:`RosenbrockTableau`.

Methods are stored in Hairer & Wanner's transformed form (*Solving ODEs II*, IV.7, eq. 7.25), the
form OrdinaryDiffEq.jl's ``RodasTableau`` uses::

    (I/(hγ) − J) U_i = f(t0 + c_i h, y0 + Σ_j A_ij U_j) + Σ_j (C_ij/h) U_j + h d_i ∂f/∂t
    y1 = y0 + Σ_j m_j U_j,     error = Σ_j e_j U_j

One Jacobian and one LU of ``W = I − hγJ`` per step (``nlu``), one solve per stage (``nsolve``).
``J`` is formed at the start of every step (a Rosenbrock method needs the current Jacobian); a
rejected step keeps it and only refactors ``W`` for the smaller step. ``∂f/∂t`` is a forward
difference (one evaluation per step) unless the problem is autonomous, which is detected once (two
probes of f inside the first step, ``autonomous=None``) or declared (``autonomous=True/False``).

The step has three implementations of the same arithmetic, chosen per call: torch (autograd, GPU,
batched, GMRES and sparse solves, larger states); numpy, for dense states of up to 16 elements on
the CPU without autograd (torch's per-call cost dominates there); and, for float64 states of 1–3
components, straight-line Python float code generated from the tableau
(:mod:`._rosenbrock_unrolled`). The tests compare the host steps with the torch step to rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ._base import AbstractSolver, StepResult, TableauSolver, options_repr, tableau_tensors
from .linear import HOST_DTYPES, LinearOptions, bump, w_operator
from ._rosenbrock_unrolled import MAX_COMPONENTS, unrolled_kernel

_SQRT_EPS = math.sqrt(2.220446049250313e-16)


@dataclass(frozen=True)
class RosenbrockTableau:
    """Coefficients of a Rosenbrock method in the transformed (``A``, ``C``, ``γ``) form.

    ``A``, ``C``: strictly lower-triangular s×s; ``gamma``: the diagonal γ; ``c``: stage times;
    ``d``: time-derivative weights γ_i; ``m``/``e``: weights of the solution and of the error
    estimate on the stages; ``H`` (optional, q×s): the dense-output rows (OrdinaryDiffEq's
    ``H``: ``k_j = Σ_i H_ji U_i`` for the stiff-aware interpolant).

    Construction checks the structure and consistency: back-transforms to the classical form
    (Γ = (I/γ − C)⁻¹, α = AΓ, b = mΓ), checks that α's row sums are ``c`` and Γ's row sums are ``d``,
    and the Rosenbrock order conditions (Hairer & Wanner IV.7, Table 7.1) up to order 4 for the
    solution (order ``order``) and the embedded solution ``(m − e)Γ`` (order ``error_order``).
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
    H: Optional[np.ndarray] = None
    tol: float = 1e-9

    def __post_init__(self):
        A, C, c, d, m, e = (np.asarray(x, dtype=np.float64) for x in (self.A, self.C, self.c, self.d, self.m, self.e))
        for k, v in zip("ACcdme", (A, C, c, d, m, e)):
            object.__setattr__(self, k, v)
        s = len(m)
        if A.shape != (s, s) or C.shape != (s, s) or c.shape != (s,) or d.shape != (s,) or e.shape != (s,):
            raise ValueError(f"inconsistent Rosenbrock tableau shapes A{A.shape} C{C.shape} c{c.shape} d{d.shape} m{m.shape} e{e.shape}")
        if np.any(np.triu(A) != 0) or np.any(np.triu(C) != 0):
            raise ValueError("Rosenbrock tableau: A and C must be strictly lower triangular")
        if self.H is not None:
            H = np.asarray(self.H, dtype=np.float64)
            object.__setattr__(self, "H", H)
            if H.ndim != 2 or H.shape[1] != s:
                raise ValueError(f"Rosenbrock tableau: H must have {s} columns, got shape {H.shape}")
        g = self.gamma
        Gamma = np.linalg.inv(np.eye(s) / g - C)
        alpha = A @ Gamma
        if not np.allclose(alpha.sum(1), c, atol=self.tol * 10, rtol=0):
            raise ValueError(f"Rosenbrock tableau: stage times c {c} differ from the row sums of α {alpha.sum(1)}")
        if not np.allclose(Gamma.sum(1), d, atol=self.tol * 10, rtol=0):
            raise ValueError(f"Rosenbrock tableau: d {d} differs from the row sums of Γ {Gamma.sum(1)}")
        b = m @ Gamma
        bhat = (m - e) @ Gamma
        for which, w, p in (("solution", b, self.order), ("embedded solution", bhat, self.error_order)):
            for name, (lhs, rhs) in rosenbrock_order_conditions(alpha, Gamma, w, g, min(p, 4)).items():
                if abs(lhs - rhs) > 1e-7:
                    raise ValueError(f"Rosenbrock tableau: {which} fails order condition {name}: {lhs} != {rhs}")

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
    __slots__ = ("ls", "f0", "dT", "autonomous", "stats", "t", "f_next", "np_coef", "kernel")

    def __init__(self, ls, stats, autonomous, np_coef=None, kernel=None):
        self.ls = ls
        self.stats = stats
        self.autonomous = autonomous
        self.np_coef = np_coef  # the tableau as numpy arrays (the numpy step of tiny CPU systems)
        self.kernel = kernel  # the unrolled float kernel (float64 states of 1–3 components)
        self.f0 = None
        self.dT = None
        self.t = None
        self.f_next = None

    def advanced(self, f_next=None):
        new = _RosenbrockCache(self.ls, self.stats, self.autonomous, self.np_coef, self.kernel)
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
    """Base of the Rosenbrock methods: options shared by all of them, the cache and the Jacobian step.

    Options: ``jac`` (None: automatic via torch; or ``jac(t, y) -> J``), ``batched`` (state
    ``(B, n)``, f acting per row: one n×n Jacobian and LU per row), ``linsolve`` (``"lu"``,
    matrix-free ``"gmres"``, or ``"sparse"``: SuperLU on a Jacobian with the pattern ``jac_sparsity``,
    formed from one Jacobian–vector product per column colour), ``jac_mode`` (``"autograd"``, ``"jacrev"``, ``"jacfwd"``, ``"finite_difference"``),
    ``autonomous`` (None: detect once by probing f at two times inside the first step; True/False:
    declare), ``differentiable_jac`` (differentiate J
    under autograd: exact gradients of the discrete solution; default True).
    """

    implicit = True

    def __init__(self, jac=None, batched: bool = False, linsolve: str = "lu", jac_mode: str = "autograd",
                 autonomous: Optional[bool] = None, differentiable_jac: bool = True,
                 gmres_tol: float = 1e-10, gmres_maxiter: int = 200, gmres_restart: int = 30, jac_sparsity=None):
        LinearOptions(type(self).__name__, jac, batched, linsolve, jac_mode, gmres_tol, gmres_maxiter, gmres_restart,
                      jac_sparsity).store_on(self)
        if autonomous is not None and not isinstance(autonomous, bool):
            raise TypeError(f"{type(self).__name__}: autonomous must be None (detect), True or False, got {autonomous!r}")
        self.autonomous = autonomous
        self.differentiable_jac = bool(differentiable_jac)

    def default_controller(self):
        """Gustafsson's predictive controller (:class:`~pyneuralode.PredictiveController`), the default
        of Hairer's RODAS: at equal accuracy Rodas5P and Rodas4 take 12–13% fewer steps than with
        the PI controller on Van der Pol (μ = 1000) and 5% fewer on Robertson."""
        from ..controllers import PredictiveController

        return PredictiveController()

    def __repr__(self):
        defaults = LinearOptions.defaults(gmres_tol=1e-10, autonomous=None, differentiable_jac=True)
        return options_repr(self, defaults)

    def init(self, rhs, t0, y0, stats, rtol=None, atol=None):
        for k in ("njac", "nlu", "nsolve"):
            stats.setdefault(k, 0)
        ls = w_operator(LinearOptions.of(self), rhs, y0, stats, differentiable_jac=self.differentiable_jac)
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


class _Coef:
    __slots__ = ("A", "C", "m", "e", "H", "c", "d", "gamma")

    def __init__(self, tab: RosenbrockTableau, dtype, device):
        kw = dict(dtype=dtype, device=device)
        self.A = [torch.tensor(tab.A[i, :i], **kw) for i in range(tab.stages)]
        self.C = [torch.tensor(tab.C[i, :i], **kw) for i in range(tab.stages)]
        self.m = torch.tensor(tab.m, **kw)
        self.e = torch.tensor(tab.e, **kw)
        self.H = None if tab.H is None else torch.tensor(tab.H, **kw)
        self.c = [float(x) for x in tab.c]
        self.d = [float(x) for x in tab.d]
        self.gamma = float(tab.gamma)


class _CoefNumpy:
    """The tableau as numpy arrays in the state's dtype (the numpy step of tiny CPU systems).

    The stage matrix of a step is extended by two rows, ``y0`` and ``h²·∂f/∂t``, so that one
    product ``AC[i] @ K`` gives both the stage point ``u_i = y0 + Σ_j a_ij U_j`` and the stage's
    right-hand-side term ``Σ_j c_ij U_j / h + h d_i ∂f/∂t`` (the second row is scaled by 1/h once
    per step), and one product ``MEH @ K`` gives ``y1``, the error estimate and the dense-output
    coefficients.
    """

    __slots__ = ("AC", "MEH", "c", "d", "gamma", "has_H", "npd", "row_scale")

    def __init__(self, tab: RosenbrockTableau, dtype, device):
        npd = torch.empty((), dtype=dtype).numpy().dtype
        s = tab.stages
        AC = np.zeros((s, 2, s + 2))
        for i in range(s):
            AC[i, 0, :i] = tab.A[i, :i]
            AC[i, 0, s] = 1.0  # + y0
            AC[i, 1, :i] = tab.C[i, :i]
            AC[i, 1, s + 1] = tab.d[i]  # · h²∂f/∂t, scaled by 1/h with the row
        self.AC = AC.astype(npd)
        rows = [np.concatenate([tab.m, [1.0, 0.0]]), np.concatenate([tab.e, [0.0, 0.0]])]
        self.has_H = tab.H is not None
        if self.has_H:
            rows += [np.concatenate([hr, [0.0, 0.0]]) for hr in tab.H]
        self.MEH = np.ascontiguousarray(np.stack(rows), dtype=npd)
        self.c = [float(x) for x in tab.c]
        self.d = [float(x) for x in tab.d]
        self.gamma = float(tab.gamma)
        self.npd = npd
        self.row_scale = np.ones((2, 1), dtype=npd)  # per step: (1, 1/h) down the two rows of AC


def _as_tensor64(values):
    """A float64 CPU tensor of a tuple of floats (through numpy: ~1 µs against ~3 for ``torch.tensor``)."""
    return torch.from_numpy(np.array(values, dtype=np.float64))


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

    def step(self, rhs, t0, y0, h, cache):
        if not torch.is_grad_enabled() and cache.ls.host_capable and y0.dtype in HOST_DTYPES:
            if y0.dtype == torch.float64 and y0.numel() <= MAX_COMPONENTS:
                return self._step_unrolled(rhs, t0, y0, h, cache)
            return self._step_numpy(rhs, t0, y0, h, cache)
        tab = self.tableau
        co = tableau_tensors(tab, y0, _Coef)
        ls = cache.ls
        f0, dT = self._prepare(rhs, t0, y0, h, cache)
        g = h * co.gamma
        ls.factor(g)
        shape = y0.shape
        y0f = y0.reshape(-1)
        s = tab.stages
        inv_h = 1.0 / h
        grad = torch.is_grad_enabled()
        Ks = []
        KT = None
        if not grad:
            K = torch.empty((s, y0f.numel()), dtype=y0.dtype, device=y0.device)
            KT = K.T
        flat = y0.ndim == 1
        batched = ls.batched
        dTf = None if dT is None else dT.reshape(-1)
        for i in range(s):
            if i == 0:
                r = f0.reshape(-1)
            else:
                if grad:
                    Kst = torch.stack(Ks, 1)
                    ui = y0f + Kst @ co.A[i]
                    fi = rhs(t0 + co.c[i] * h, ui if flat else ui.view(shape))
                    r = (fi if flat else fi.reshape(-1)) + (Kst @ co.C[i]) * inv_h
                else:
                    ui = torch.addmv(y0f, KT[:, :i], co.A[i])
                    fi = rhs(t0 + co.c[i] * h, ui if flat else ui.view(shape))
                    r = torch.addmv(fi if flat else fi.reshape(-1), KT[:, :i], co.C[i], alpha=inv_h)
            if dTf is not None and co.d[i] != 0.0:
                r = torch.add(r, dTf, alpha=h * co.d[i])
            b = r if not batched else r.view(shape)  # batched LU solves want (B, n)
            if grad:
                Ks.append(ls.solve(b, scale=g).reshape(-1))
            else:
                ls.solve(b, scale=g, out=K[i])
        if grad:
            K = torch.stack(Ks, 0)
            KT = K.T
        y1 = (y0f + KT @ co.m).view(shape)
        err = (KT @ co.e).view(shape)
        if co.H is not None:
            kk = (co.H @ K).view(co.H.shape[0], *shape)
            dense = (y0, y1, kk)
        else:
            dense = (y0, y1, torch.stack([torch.zeros_like(y0)]))
        return StepResult(y1=y1, error=err, cache=cache.advanced(), dense=dense, cache_on_reject=cache)

    def _step_numpy(self, rhs, t0, y0, h, cache):
        """The same step for a tiny dense state on the CPU without autograd: the stage arithmetic
        and the inverse in numpy (zero-copy views of the tensors; f still gets and returns tensors).

        Per stage: one 2×(s+2) by (s+2)×n product (stage point and right-hand-side term together,
        see :class:`_CoefNumpy`), f, one addition and one product with ``(I/(hγ) − J)⁻¹``. The
        results are the torch path's to rounding (``tests/test_stiff.py`` compares them).
        """
        tab = self.tableau
        co = cache.np_coef  # kept for the solve: the per-dtype lookup costs ~1 µs a step
        if co is None:
            co = cache.np_coef = tableau_tensors(tab, y0, _CoefNumpy)
        ls = cache.ls
        f0, dT = self._prepare(rhs, t0, y0, h, cache)
        M = ls.scaled_inverse_numpy(h * co.gamma)  # U_i = (I/(hγ) − J)⁻¹ r_i
        shape = y0.shape
        flat = y0.ndim == 1  # 1-D states skip every view/reshape (each costs ~1–3 µs)
        s = tab.stages
        n = M.shape[0]
        K = np.zeros((s + 2, n), dtype=co.npd)  # rows: U_0..U_{s-1}, y0, h²∂f/∂t
        K[s] = (y0 if flat else y0.reshape(-1)).numpy()
        dTn = None
        if dT is not None:
            dTn = dT.reshape(-1).numpy()
            np.multiply(dTn, h * h, out=K[s + 1])
        row_scale = co.row_scale.copy()
        row_scale[1] = 1.0 / h
        AC = co.AC * row_scale  # the second row of every stage ÷ h
        c = co.c
        from_numpy = torch.from_numpy
        with np.errstate(all="ignore"):  # overflow or NaN shows up in the error norm: the step is rejected
            r = (f0 if flat else f0.reshape(-1)).numpy()
            if dTn is not None and co.d[0] != 0.0:
                r = r + (h * co.d[0]) * dTn
            np.dot(M, r, out=K[0])
            for i in range(1, s):
                v = AC[i] @ K  # [u_i; Σ c_ij U_j / h + h d_i ∂f/∂t]
                ui = from_numpy(v[0])
                fi = rhs(t0 + c[i] * h, ui if flat else ui.view(shape))
                np.add(v[1], (fi if flat else fi.reshape(-1)).numpy(), out=v[1])
                np.dot(M, v[1], out=K[i])
            out = co.MEH @ K  # [y1; error; dense coefficients]
        bump(cache.stats, "nsolve", s)
        y1t, errt = from_numpy(out[0]), from_numpy(out[1])
        kk = from_numpy(out[2:]) if co.has_H else None
        if not flat:
            y1t, errt = y1t.view(shape), errt.view(shape)
            kk = kk.view(out.shape[0] - 2, *shape) if kk is not None else None
        dense = (y0, y1t, kk if kk is not None else torch.zeros_like(y0).unsqueeze(0))
        return StepResult(y1=y1t, error=errt, cache=cache.advanced(), dense=dense,
                          cache_on_reject=cache)

    def _step_unrolled(self, rhs, t0, y0, h, cache):
        """The same step for a float64 state of 1–3 components on the CPU without autograd: the
        stages as straight-line Python float code (:mod:`._rosenbrock_unrolled`), ~2 µs a stage
        against ~5 in numpy; f still gets and returns tensors."""
        ls = cache.ls
        f0, dT = self._prepare(rhs, t0, y0, h, cache)
        flat = y0.ndim == 1
        kern = cache.kernel  # kept for the solve (the state's size, shape and autonomy do not change)
        if kern is None:
            kern = cache.kernel = unrolled_kernel(self.tableau, y0.numel(), dT is not None, flat,
                                                  getattr(self, "name", type(self).__name__))
        M = ls.scaled_inverse_list(h * self.tableau.gamma)
        y = (y0 if flat else y0.reshape(-1)).tolist()
        out = kern(rhs, t0, h, y, (f0 if flat else f0.reshape(-1)).tolist(),
                   None if dT is None else dT.reshape(-1).tolist(), M, _as_tensor64, y0.shape)
        bump(cache.stats, "nsolve", self.tableau.stages)
        rows = np.array(out, dtype=np.float64).reshape(-1, *y0.shape)  # [y1; error; dense rows]
        from_numpy = torch.from_numpy
        y1 = from_numpy(rows[0, ...])  # `...` keeps a 0-d state an array
        kk = from_numpy(rows[2:]) if self.tableau.H is not None else torch.zeros_like(y0).unsqueeze(0)
        return StepResult(y1=y1, error=from_numpy(rows[1, ...]), cache=cache.advanced(), dense=(y0, y1, kk),
                          cache_on_reject=cache)

    def interpolant(self, dense, theta):  # type: ignore[override]
        return rodas_interpolant(dense, theta)

