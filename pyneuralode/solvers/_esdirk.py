"""One generic engine for ESDIRK/SDIRK methods (Newton per stage), driven by a
:class:`ButcherTableau`.

Every method here has an explicit first stage and a constant diagonal γ (ESDIRK; implicit Euler is
written as the 2-stage ESDIRK ``[[0, 0], [0, 1]]``), and is stiffly accurate (``b`` = last row of
``A``), so the last stage's derivative is the next step's first stage (FSAL).

Stage ``i`` solves ``z − ψ_i − hγ f(t0 + c_i h, z) = 0`` (``ψ_i = y0 + h Σ_{j<i} a_ij k_j``) by a
simplified Newton iteration with ``M = I − hγJ`` (Hairer & Wanner, *Solving ODEs II*, IV.8):
convergence rate θ, stop when ``θ/(1−θ)·‖Δz‖ ≤ κ`` in the error norm scaled by rtol/atol,
give up when θ ≥ 1 (divergence) or the predicted iterate cannot reach κ within ``max_iter``.

Jacobian reuse: J is kept across steps and Newton iterations; a new J is formed when Newton
fails with an old J (the step is retried once with it), or when the last step converged slowly
(θ > ``jac_theta``, default 0.05); ``M`` is refactored whenever hγ changes. When Newton fails with a
fresh J the step returns ``ok=False``: the loop halves dt and retries (rejection on Newton
divergence; counted in ``nconvfail``).

The error estimate ``h Σ (b − b̂)_i k_i`` is filtered by ``M⁻¹`` (Shampine's smoothing, as in
OrdinaryDiffEq's ``smooth_est``), which keeps stiff components from inflating it.
"""

from __future__ import annotations

import numpy as np
import torch

from ._base import StepResult, TableauSolver, hermite_interpolant, options_repr, tableau_tensors
from ._erk import DenseWeights, _polynomial_interpolant
from ._newton import newton_setup, newton_tolerance
from ._ops import TorchOps, stage_ops
from ._tableau import ButcherTableau, order_conditions
from .linear import LinearOptions

_EPS = 2.220446049250313e-16


def esdirk_tableau(a, b, c, order, b_embedded, error_order, dense=None) -> ButcherTableau:
    """Build and check an ESDIRK tableau: a :class:`ButcherTableau` (row sums, Σb = 1, order
    conditions for ``b``) plus: explicit first stage, one diagonal value γ on the other stages,
    stiffly accurate ``b``, and the embedded weights ``b_embedded`` satisfying the order conditions
    up to ``error_order``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    bh = np.asarray(b_embedded, dtype=np.float64)
    tab = ButcherTableau(
        a=a, b=b, c=c, order=order, b_error=b - bh, error_order=error_order, dense=dense
    )
    if np.any(np.triu(a, 1) != 0):
        raise ValueError("ESDIRK tableau: A must be lower triangular")
    diag = np.diag(a)
    if diag[0] != 0.0 or not np.allclose(diag[1:], diag[1], atol=1e-15, rtol=0) or diag[1] <= 0:
        raise ValueError(
            "ESDIRK tableau: need an explicit first stage and one positive diagonal value, got "
            f"{diag}"
        )
    if not np.allclose(a[-1], b, atol=1e-12, rtol=0):
        raise ValueError(
            "ESDIRK tableau: the engine needs a stiffly accurate method (b equal to the last row "
            "of A)"
        )
    if (
        tab.dense is not None
    ):  # a continuous extension must reproduce y0 + θh f for f constant: Σ_i b_i(θ) = θ
        col = tab.dense.sum(0)
        if abs(col[0] - 1) > 1e-12 or np.any(np.abs(col[1:]) > 1e-12):
            raise ValueError(
                "ESDIRK tableau: dense-output coefficients must satisfy Σ_i b_i(θ) = θ, got "
                f"column sums {col}"
            )
    for cond, (lhs, rhs) in order_conditions(a, bh, tab.c, min(error_order, 5)).items():
        if abs(lhs - rhs) > 1e-10:
            raise ValueError(
                f"ESDIRK tableau: embedded weights fail order condition {cond}: {lhs} != {rhs}"
            )
    return tab


class _Coef:
    __slots__ = ("a", "b_err", "c", "gamma", "B", "pred")

    def __init__(self, tab: ButcherTableau, dtype, device):
        kw = dict(dtype=dtype, device=device)
        self.a = [torch.tensor(tab.a[i, :i], **kw) for i in range(tab.stages)]
        self.b_err = torch.tensor(tab.b_error, **kw)
        self.c = [float(x) for x in tab.c]
        self.gamma = float(tab.a[1, 1])
        self.B = None if tab.dense is None else DenseWeights(tab.dense, dtype, device)
        self.pred = [None] + [
            torch.tensor(_predictor_weights(tab.c, i), **kw) for i in range(1, tab.stages)
        ]


class _CoefNumpy:
    """The tableau as numpy arrays in the state's dtype (the numpy step of CPU states without
    autograd)."""

    __slots__ = ("a", "b_err", "pred")

    def __init__(self, tab: ButcherTableau, dtype, device):
        npd = torch.empty((), dtype=dtype).numpy().dtype
        self.a = [np.ascontiguousarray(tab.a[i, :i], dtype=npd) for i in range(tab.stages)]
        self.b_err = np.asarray(tab.b_error, dtype=npd)
        self.pred = [None] + [
            _predictor_weights(tab.c, i).astype(npd) for i in range(1, tab.stages)
        ]


def _predictor_weights(c, i):
    """Weights on k_0..k_{i-1} predicting k_i: linear inter/extrapolation in time between the two
    earlier stages whose nodes are nearest to c_i (a stage at the same node is copied)."""
    w = np.zeros(i)
    order = sorted(range(i), key=lambda j: (abs(c[j] - c[i]), -j))
    j1 = order[0]
    j2 = next((j for j in order[1:] if abs(c[j] - c[j1]) > 1e-8), None)
    if j2 is None or abs(c[j1] - c[i]) < 1e-12:
        w[j1] = 1.0
    else:
        lam = (c[i] - c[j1]) / (c[j2] - c[j1])
        w[j1], w[j2] = 1.0 - lam, lam
    return w


class _ESDIRKCache:
    __slots__ = ("ls", "ops", "f0", "stats", "rtol", "atol", "eta", "new_jac", "kappa", "ndz_floor")

    def __init__(
        self, ls, ops, f0, stats, rtol, atol, eta=1.0, new_jac=False, kappa=0.01, ndz_floor=1e-5
    ):
        self.ls, self.ops, self.f0, self.stats, self.rtol, self.atol = (
            ls,
            ops,
            f0,
            stats,
            rtol,
            atol,
        )
        self.eta = eta
        self.new_jac = new_jac
        self.kappa = kappa  # the Newton tolerance on η·‖Δz‖
        self.ndz_floor = ndz_floor  # a correction this small has converged (rounding level)


class ESDIRK(TableauSolver):
    """Generic ESDIRK method; subclasses set ``tableau`` (and ``name``).

    Options: ``jac`` (None: automatic via torch; or ``jac(t, y) -> J``), ``batched`` (state
    ``(B, n)`` with f acting per row: one n×n Jacobian and LU per row), ``linsolve`` (``"lu"``,
    matrix-free Newton–Krylov ``"gmres"``, or ``"sparse"``: SuperLU on a Jacobian with the pattern
    ``jac_sparsity``), ``jac_mode`` (``"autograd"``, ``"jacrev"``, ``"jacfwd"``,
    ``"finite_difference"``), ``max_iter`` (Newton iterations per stage, 10), ``kappa`` (Newton
    tolerance relative to the error tolerance, 0.01), ``jac_theta`` (form a new J after a step whose
    convergence rate exceeded this, 0.05), ``smooth_est`` (filter the error estimate by ``M⁻¹``,
    True). Gradients (``DirectAdjoint``) flow through every Newton iteration; J itself is detached.
    """

    implicit = True
    tableau: ButcherTableau
    hermite: bool = True

    def __init__(
        self,
        jac=None,
        batched: bool = False,
        linsolve: str = "lu",
        jac_mode: str = "autograd",
        max_iter: int = 10,
        kappa: float = 0.01,
        jac_theta: float = 0.05,
        smooth_est: bool = True,
        gmres_tol: float = 1e-6,
        gmres_maxiter: int = 200,
        gmres_restart: int = 30,
        jac_sparsity=None,
    ):
        owner = type(self).__name__
        LinearOptions(
            owner,
            jac,
            batched,
            linsolve,
            jac_mode,
            gmres_tol,
            gmres_maxiter,
            gmres_restart,
            jac_sparsity,
        ).store_on(self)
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"{owner}: max_iter must be a positive int, got {max_iter!r}")
        if not (isinstance(kappa, (int, float)) and 0 < kappa <= 1):
            raise ValueError(f"{owner}: kappa must be in (0, 1], got {kappa!r}")
        if not (isinstance(jac_theta, (int, float)) and 0 < jac_theta < 1):
            raise ValueError(f"{owner}: jac_theta must be in (0, 1), got {jac_theta!r}")
        self.max_iter = max_iter
        self.kappa = float(kappa)
        self.jac_theta = float(jac_theta)
        self.smooth_est = bool(smooth_est)

    def __repr__(self):
        defaults = LinearOptions.defaults(
            gmres_tol=1e-6, max_iter=10, kappa=0.01, jac_theta=0.05, smooth_est=True
        )
        return options_repr(self, defaults)

    def init(self, rhs, t0, y0, stats, rtol=1e-6, atol=1e-9):
        ls, f0 = newton_setup(self, rhs, t0, y0, stats)
        ops = stage_ops(self.tableau, ls, y0, host_inverse=False)
        return _ESDIRKCache(
            ls,
            ops,
            f0,
            stats,
            rtol,
            atol,
            kappa=newton_tolerance(self.kappa, rtol, y0.dtype),
            ndz_floor=newton_tolerance(1e-5, rtol, y0.dtype),
        )

    # -- Newton ------------------------------------------------------------------------------------
    def _newton_loop(self, f_of, solve, norm, psi, z, hg, cache):
        """The simplified Newton iteration on flat tensors or numpy arrays alike (Hairer & Wanner
        IV.8): ``f_of(z)``, ``solve(b) = M⁻¹ b`` (``None``: the linear solve failed),
        ``norm(dz)``."""
        stats = cache.stats
        kappa = cache.kappa
        eta = max(cache.eta, _EPS) ** 0.8
        ndz_prev = None
        theta_max = 0.0
        for it in range(1, self.max_iter + 1):
            stats["nnewton"] += 1
            dz = solve(psi + hg * f_of(z) - z)
            if dz is None:
                return z, False, 1.0
            ndz = norm(dz)
            z = z + dz
            if ndz != ndz:  # NaN
                return z, False, 1.0
            if ndz_prev is not None:
                theta = ndz / ndz_prev if ndz_prev > 0 else 0.0
                theta_max = max(theta_max, theta)
                if theta >= 1.0:
                    return z, False, theta
                eta = theta / (1.0 - theta)
                if (
                    it < self.max_iter
                    and theta ** (self.max_iter - it) / (1.0 - theta) * ndz > kappa
                ):
                    if eta * ndz > kappa:  # cannot converge within max_iter
                        return z, False, theta
            # a correction at the rounding level stops at once: on the next one θ would read ≈ 1
            if (eta * ndz <= kappa and ndz_prev is not None) or ndz <= cache.ndz_floor:
                cache.eta = eta
                return z, True, theta_max
            ndz_prev = ndz
        return z, False, theta_max

    # -- step --------------------------------------------------------------------------------------
    def step(self, rhs, t0, y0, h, cache):
        tab = self.tableau
        co = tableau_tensors(tab, y0, _Coef)
        ls = cache.ls
        if cache.new_jac or ls.J is None and not ls.matrix_free:
            ls.set_point(t0, y0)
            cache.new_jac = False
        elif ls.matrix_free and (ls.point is None or cache.new_jac):
            ls.set_point(t0, y0)
        else:
            ls.fresh = ls.point is not None and ls.point[0] == t0 and ls.point[1] is y0
        ops = cache.ops
        if (
            ops.host and torch.is_grad_enabled()
        ):  # a solve started without autograd, stepped with it
            ops = TorchOps(tab, ls)
        for _attempt in range(2):
            res = self._try_step(rhs, t0, y0, h, cache, co, tab, ops)
            if res is not None:
                return res
            cache.stats["nconvfail"] += 1
            if ls.fresh:
                break
            ls.set_point(t0, y0)  # retry once with a fresh Jacobian at (t0, y0)
        cache.eta = 1.0
        return StepResult(
            y1=y0, error=None, cache=cache, dense=None, ok=False, cache_on_reject=cache
        )

    def _try_step(self, rhs, t0, y0, h, cache, co, tab, ops):
        """The stages on the solve's stage arithmetic ``ops``; ``None`` when Newton failed."""
        cn = tableau_tensors(tab, y0, _CoefNumpy) if ops.host else co
        ls = cache.ls
        hg = h * co.gamma
        shape = y0.shape
        solve = ops.linear_solver(ls, hg, shape)
        y0f = ops.flat(y0)
        scale = ops.error_scale(y0, cache.rtol, cache.atol)
        K = ops.stage_store(ops.flat(cache.f0), tab.stages)
        theta_max = 0.0
        with ops.guard():  # (host: overflow or NaN makes Newton fail: the step is rejected)
            for i in range(1, tab.stages):
                psi, z = ops.predict(K, i, y0f, cn.a[i], cn.pred[i], h, hg)
                f_of, norm = ops.newton_fns(rhs, t0 + co.c[i] * h, scale, shape)
                z, ok, th = self._newton_loop(f_of, solve, norm, psi, z, hg, cache)
                if not ok:
                    return None
                theta_max = max(theta_max, th)
                ops.store(K, i, (z - psi) / hg)
            Kc, Kr = ops.stages_done(K)
            err = ops.weighted(Kc, cn.b_err, h)
            if self.smooth_est:
                err = ops.smooth(ls, err, shape, solve)
        y1 = ops.state(z, shape)  # stiffly accurate: the last stage is the solution
        f1 = ops.state(Kr[-1], shape)
        new_cache = _ESDIRKCache(
            ls,
            cache.ops,
            f1,
            cache.stats,
            cache.rtol,
            cache.atol,
            cache.eta,
            new_jac=theta_max > self.jac_theta,
            kappa=cache.kappa,
            ndz_floor=cache.ndz_floor,
        )
        dense = (y0, ops.rows(Kr), co.B, h) if co.B is not None else (y0, y1, cache.f0, f1, h)
        return StepResult(
            y1=y1, error=ops.state(err, shape), cache=new_cache, dense=dense, cache_on_reject=cache
        )

    def interpolant(self, dense, theta):  # type: ignore[override]
        if len(dense) == 4:
            return _polynomial_interpolant(dense, theta)
        return hermite_interpolant(dense, theta)
