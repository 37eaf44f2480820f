"""torchdiffeq's fixed-grid methods as solvers of the integrate loop.

The loop steps these solvers on the grid *index* ``s = 0, 1, …, K`` (``LoopOptions.grid``); each
step ``k`` reads its times from the differentiable grid tensor ``t_grid[k]``, ``t_grid[k+1]``, so
the outputs are differentiable with respect to the grid (hence to ``t``): the gradient with respect
to ``t`` is the derivative of the computed output, as in torchdiffeq. Three families:

* :class:`GridRK` — an explicit tableau of :mod:`pyneuralode.solvers.explicit` (euler, midpoint,
  heun2, heun3, rk4);
* :class:`GridImplicitRK` — an implicit tableau (below, order conditions checked at import) with
  simplified Newton iterations on the stage increments (implicit_euler, …, gl6, trbdf2);
* :class:`GridAdams` — Adams–Bashforth(–Moulton) of variable order up to ``max_order - 1``,
  started with the 3/8 rule (explicit_adams, implicit_adams), as torchdiffeq's.

``f(t, y)`` takes a 0-d time tensor and the flat state. ``perturb=True`` evaluates f at the start of
a step just after ``t0`` and at its end just before ``t1`` (``torch.nextafter``), so that a
discontinuity on a grid point is seen from the step's side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ._base import AbstractSolver, StepResult
from ._tableau import ButcherTableau
from .explicit import RK438

_s2, _s3, _s6, _s15 = math.sqrt(2), math.sqrt(3), math.sqrt(6), math.sqrt(15)
_g = 1 - _s2 / 2

#: torchdiffeq's fixed-grid implicit methods (full Butcher tableaus; orders checked at import).
IMPLICIT_TABLEAUS = {
    "implicit_euler": ButcherTableau(a=[[1.0]], b=[1.0], c=[1.0], order=1),
    "implicit_midpoint": ButcherTableau(a=[[0.5]], b=[1.0], c=[0.5], order=2),
    "trapezoid": ButcherTableau(a=[[0.0, 0.0], [0.5, 0.5]], b=[0.5, 0.5], c=[0.0, 1.0], order=2),
    "radauIIA3": ButcherTableau(
        a=[[5 / 12, -1 / 12], [3 / 4, 1 / 4]], b=[3 / 4, 1 / 4], c=[1 / 3, 1.0], order=3
    ),
    "radauIIA5": ButcherTableau(
        a=[
            [11 / 45 - 7 * _s6 / 360, 37 / 225 - 169 * _s6 / 1800, -2 / 225 + _s6 / 75],
            [37 / 225 + 169 * _s6 / 1800, 11 / 45 + 7 * _s6 / 360, -2 / 225 - _s6 / 75],
            [4 / 9 - _s6 / 36, 4 / 9 + _s6 / 36, 1 / 9],
        ],
        b=[4 / 9 - _s6 / 36, 4 / 9 + _s6 / 36, 1 / 9],
        c=[2 / 5 - _s6 / 10, 2 / 5 + _s6 / 10, 1.0],
        order=5,
    ),
    "gl4": ButcherTableau(
        a=[[1 / 4, 1 / 4 - _s3 / 6], [1 / 4 + _s3 / 6, 1 / 4]],
        b=[0.5, 0.5],
        c=[0.5 - _s3 / 6, 0.5 + _s3 / 6],
        order=4,
    ),
    "gl6": ButcherTableau(
        a=[
            [5 / 36, 2 / 9 - _s15 / 15, 5 / 36 - _s15 / 30],
            [5 / 36 + _s15 / 24, 2 / 9, 5 / 36 - _s15 / 24],
            [5 / 36 + _s15 / 30, 2 / 9 + _s15 / 15, 5 / 36],
        ],
        b=[5 / 18, 4 / 9, 5 / 18],
        c=[0.5 - _s15 / 10, 0.5, 0.5 + _s15 / 10],
        order=6,
    ),
    "sdirk2": ButcherTableau(a=[[_g, 0.0], [1 - _g, _g]], b=[1 - _g, _g], c=[_g, 1.0], order=2),
    "trbdf2": ButcherTableau(
        a=[[0.0, 0.0, 0.0], [_g, _g, 0.0], [_s2 / 4, _s2 / 4, _g]],
        b=[_s2 / 4, _s2 / 4, _g],
        c=[0.0, 2 * _g, 1.0],
        order=2,
    ),
}


def _nudge(t: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
    """``nextafter(t, toward)`` with the gradient of ``t`` (torchdiffeq's ``Perturb``)."""
    with torch.no_grad():
        tn = torch.nextafter(t, toward)
    return t + (tn - t).detach()


class _GridBase(AbstractSolver):
    """Shared plumbing: the step's times from the grid tensor, perturb, callback_step, the f
    count."""

    name = "FixedGrid"
    order = 1
    error_order = None

    def __init__(
        self,
        f: Callable,
        t_grid: torch.Tensor,
        stats: dict,
        perturb: bool = False,
        callback_step: Callable | None = None,
    ):
        self.f, self.t_grid, self.stats, self.perturb = f, t_grid, stats, bool(perturb)
        self.callback_step = callback_step
        self.f_end = (
            None  # f(t1, y1) of the last step when the step has it for free (cubic interpolation)
        )
        #: a constant step (a Python float) used instead of ``t_grid[k+1] - t_grid[k]``:
        #: torchdiffeq's event loop steps by ``step_size`` itself
        self.constant_h: float | None = None

    def default_controller(self):
        return None

    def call(self, t, y, end: int = 0, toward=None):
        """f(t, y); ``end`` = -1 at a step's start, +1 at its end (perturbed toward the step's
        inside)."""
        self.stats["nfe"] = self.stats.get("nfe", 0) + 1
        if self.perturb and end != 0:
            t = _nudge(t, toward)
        return self.f(t, y)

    def times(self, s0: float):
        k = int(round(s0))
        t0, t1 = self.t_grid[k], self.t_grid[k + 1]
        return k, t0, t1, (t1 - t0) if self.constant_h is None else self.constant_h

    def init(self, rhs, t0, y0, stats, rtol=None, atol=None):
        return None

    @staticmethod
    def interpolant(dense, theta):  # outputs are the grid points themselves; kept for completeness
        y0, y1 = dense
        return y0 + theta * (y1 - y0)


class GridRK(_GridBase):
    """An explicit tableau on the grid: stage 0 at ``t0`` (perturbed forward), a stage at ``c = 1``
    at ``t1``."""

    def __init__(self, tableau: ButcherTableau, *a, **kw):
        super().__init__(*a, **kw)
        self.tab = tableau
        self.order = tableau.order

    def step(self, rhs, s0, y0, ds, cache):
        k, t0, t1, h = self.times(s0)
        if self.callback_step is not None:
            self.callback_step(t0, y0, h)
        if self.tab is RK438.tableau:
            y1, f0 = rk438_step(self, t0, t1, h, y0)
        else:
            y1, f0 = rk_step(self, self.tab, t0, t1, h, y0)
        return StepResult(y1=y1, error=None, cache=f0, dense=(y0, y1))


def rk_step(g: _GridBase, tab: ButcherTableau, t0, t1, h, y0, f0=None):
    """One explicit Runge–Kutta step ``y0 → y1`` over ``[t0, t1]``; returns ``(y1, f(t0, y0))``."""
    a, b, c = tab.a, tab.b, tab.c
    if f0 is None:
        f0 = g.call(t0, y0, -1, t1)
    ks = [f0]
    for i in range(1, tab.stages):
        yi = y0
        for j in range(i):
            if a[i, j] != 0:
                yi = yi + (float(a[i, j]) * h) * ks[j]
        if c[i] == 1.0:
            ks.append(g.call(t1, yi, 1, t0))
        else:
            ks.append(g.call(t0 + float(c[i]) * h, yi))
    y1 = y0
    for j in range(tab.stages):
        if b[j] != 0:
            y1 = y1 + (float(b[j]) * h) * ks[j]
    return y1, f0


def rk438_step(g: _GridBase, t0, t1, h, y0, f0=None):
    """Kutta's 3/8 rule in torchdiffeq's arithmetic (``rk4_alt_step_func``, the same rounding:
    torchdiffeq's ``rk4`` and the start of its Adams methods give identical results)."""
    if f0 is None:
        f0 = g.call(t0, y0, -1, t1)
    k1 = f0
    k2 = g.call(t0 + h * _ONE_THIRD, y0 + h * k1 * _ONE_THIRD)
    k3 = g.call(t0 + h * _TWO_THIRDS, y0 + h * (k2 - k1 * _ONE_THIRD))
    k4 = g.call(t1, y0 + h * (k1 - k2 + k3), 1, t0)
    return y0 + (k1 + 3 * (k2 + k3) + k4) * h * 0.125, f0


_ONE_THIRD, _TWO_THIRDS = 1 / 3, 2 / 3


class GridImplicitRK(_GridBase):
    """An implicit tableau on the grid, stages ``Z = h (A ⊗ I) F(y0 + Z)`` by simplified Newton.

    The Jacobian ``∂f/∂y`` at ``(t0, y0)`` is formed once per step by autograd (no graph kept);
    iterations stop when the increment's RMS falls below ``tol`` relative to ``1 + |y0|``
    (``1e-8`` in float64, ``1e-6`` in float32, torchdiffeq's) or after ``max_iters`` (with
    torchdiffeq's warning). The iterations run in the caller's grad mode, so gradients follow them.
    """

    implicit = False  # the loop's plain ``init`` signature; tolerances are not used

    def __init__(self, tableau: ButcherTableau, *a, max_iters: int = 100, **kw):
        super().__init__(*a, **kw)
        self.tab = tableau
        self.order = tableau.order
        self.max_iters = int(max_iters)

    def _jacobian(self, t0, y0):
        with torch.enable_grad():
            y = y0.detach().requires_grad_(True)
            out = self.f(t0.detach(), y)
            self.stats["nfe"] = self.stats.get("nfe", 0) + 1
            if not out.requires_grad:
                return torch.zeros(y.numel(), y.numel(), dtype=y.dtype, device=y.device)
            rows = [
                torch.autograd.grad(out.reshape(-1)[i], y, retain_graph=True, allow_unused=True)[0]
                for i in range(out.numel())
            ]
        return torch.stack(
            [torch.zeros_like(y).reshape(-1) if r is None else r.reshape(-1) for r in rows]
        ).detach()

    def step(self, rhs, s0, y0, ds, cache):
        k, t0, t1, h = self.times(s0)
        if self.callback_step is not None:
            self.callback_step(t0, y0, h)
        tab = self.tab
        s, n = tab.stages, y0.numel()
        dtype = y0.dtype
        A = torch.as_tensor(tab.a, dtype=dtype, device=y0.device)
        J = self._jacobian(_nudge(t0, t1) if self.perturb else t0, y0)
        hd = float(h)
        M = torch.eye(s * n, dtype=dtype, device=y0.device) - hd * torch.kron(A, J)
        try:
            lu = torch.linalg.lu_factor(M)
        except RuntimeError:
            lu = None
        tol = 1e-8 if dtype == torch.float64 else 1e-6
        scale = 1.0 + float(y0.detach().abs().max()) if n else 1.0
        ts = []
        for i in range(s):
            ci = float(tab.c[i])
            ts.append(
                (t0, -1, t1) if ci == 0.0 else (t1, 1, t0) if ci == 1.0 else (t0 + ci * h, 0, None)
            )
        explicit_first = ts[0][1] == -1 and not np.any(tab.a[0])
        f_first = self.call(ts[0][0], y0, -1, t1) if explicit_first else None
        yf = y0.reshape(-1)
        Z = torch.zeros(s, n, dtype=dtype, device=y0.device)

        def stages(Z):
            F = []
            for i, (ti, end, toward) in enumerate(ts):
                if i == 0 and explicit_first:
                    F.append(f_first.reshape(-1))
                else:
                    F.append(self.call(ti, (yf + Z[i]).view_as(y0), end, toward).reshape(-1))
            return torch.stack(F)

        converged = False
        F = stages(Z)
        for _ in range(self.max_iters):
            G = Z - h * (A @ F)
            if lu is None:
                break
            dZ = torch.linalg.lu_solve(*lu, -G.reshape(-1, 1)).view(s, n)
            Z = Z + dZ
            F = stages(Z)
            if float(dZ.detach().pow(2).mean().sqrt()) < tol * scale:
                converged = True
                break
        if not converged:
            warnings.warn(
                "Functional iteration did not converge. Solution may be incorrect.",
                RuntimeWarning,
                stacklevel=2,
            )
        b = torch.as_tensor(tab.b, dtype=dtype, device=y0.device)
        y1 = (yf + h * (b @ F)).view_as(y0)
        f0 = F[0].view_as(y0) if ts[0][1] == -1 else None
        return StepResult(y1=y1, error=None, cache=f0, dense=(y0, y1))


def _adams_coefficients(m: int, implicit: bool) -> np.ndarray:
    """Weights β_j of ``y1 = y0 + h Σ β_j f_{1-j}`` (implicit) or ``f_{-j}`` (explicit) for ``m``
    points, integrated exactly in rationals and rounded once (torchdiffeq's tables to the bit)."""
    from fractions import Fraction

    nodes = list(range(1, 1 - m, -1)) if implicit else list(range(0, -m, -1))
    out = np.zeros(m)
    for j in range(m):
        poly = [Fraction(1)]  # coefficients, lowest degree first
        for i, x in enumerate(nodes):
            if i == j:
                continue
            d = Fraction(nodes[j] - x)
            new = [Fraction(0)] * (len(poly) + 1)
            for k, c in enumerate(poly):  # poly · (s − x) / d
                new[k + 1] += c / d
                new[k] -= c * x / d
            poly = new
        out[j] = float(sum(c / (k + 1) for k, c in enumerate(poly)))  # ∫_0^1
    return out


def _dot(weights, fs):
    return sum(w * f for w, f in zip(weights, fs))


class GridAdams(_GridBase):
    """Adams–Bashforth (``implicit=False``) or Adams–Bashforth–Moulton PEC(E)… (``implicit=True``)
    on the grid, torchdiffeq's ``explicit_adams``/``implicit_adams``: the order grows with the
    history up to ``max_order - 1`` (the first steps use the 3/8 rule); the corrector is iterated at
    most ``max_iters`` times until the change is within ``rtol``/``atol`` (max norm)."""

    def __init__(
        self,
        *a,
        implicit: bool = True,
        rtol=1e-3,
        atol=1e-4,
        max_iters: int = 4,
        max_order: int = 12,
        **kw,
    ):
        super().__init__(*a, **kw)
        if not isinstance(max_order, int) or max_order > 12:
            raise ValueError(
                f"options['max_order']: must be an int of at most 12, got {max_order!r}"
            )
        if max_order < 4:
            warnings.warn("max_order is below 4, so the solver reduces to `rk4`.", stacklevel=2)
        self.corrector, self.rtol, self.atol = implicit, rtol, atol
        self.max_iters, self.max_order = int(max_iters), max_order
        self.order = 4
        self.history: list = []
        self.bashforth = [None] + [_adams_coefficients(m, False) for m in range(1, 13)]
        self.moulton = [None] + [_adams_coefficients(m, True) for m in range(1, 14)]

    def init(self, rhs, t0, y0, stats, rtol=None, atol=None):
        self.history = []
        return None

    def step(self, rhs, s0, y0, ds, cache):
        k, t0, t1, h = self.times(s0)
        if self.callback_step is not None:
            self.callback_step(t0, y0, h)
        f0 = self.call(t0, y0, -1, t1)
        hist = self.history
        hist.insert(0, f0)
        del hist[max(self.max_order - 1, 1) :]
        order = min(len(hist), self.max_order - 1)
        if order < 3:
            y1, _ = rk438_step(self, t0, t1, h, y0, f0=f0)
            return StepResult(y1=y1, error=None, cache=None, dense=(y0, y1))
        # torchdiffeq's arithmetic: float64 weights times f (a 0-d state is summed in float64)
        beta = torch.as_tensor(self.bashforth[order], device=y0.device)
        dy = _dot(h * beta, hist).type_as(y0)
        if self.corrector:
            mc = torch.as_tensor(self.moulton[order + 1], device=y0.device)
            delta = (h * _dot(mc[1:], hist)).type_as(y0)
            converged = False
            for _ in range(self.max_iters):
                dy_old = dy
                f = self.call(t1, y0 + dy, 1, t0)
                dy = (h * mc[0] * f).type_as(y0) + delta
                with torch.no_grad():
                    tol = self.atol + self.rtol * torch.maximum(dy_old.abs(), dy.abs())
                    converged = bool(((dy_old - dy).abs() / tol).max() < 1) if dy.numel() else True
                if converged:
                    break
            if not converged:
                warnings.warn(
                    "Functional iteration did not converge. Solution may be incorrect.",
                    stacklevel=2,
                )
                hist.pop()
        y1 = y0 + dy
        return StepResult(y1=y1, error=None, cache=None, dense=(y0, y1))
