"""One generic engine for explicit Runge–Kutta methods, driven by a :class:`ButcherTableau`.

Stage combinations are single fused ``addmv`` calls on a stage matrix (no Python loop of scaled
adds); FSAL methods reuse their last stage; the derivative at the step's end is kept as the next
step's first stage, so non-FSAL methods pay no extra evaluation for Hermite dense output.
"""
from __future__ import annotations

import numpy as np
import torch

from ._base import AbstractSolver, StepResult, hermite_interpolant
from ._tableau import ButcherTableau


class _Coefficients:
    """Tableau tensors for one dtype/device, cached on the solver."""

    __slots__ = ("a_rows", "b", "e", "e2", "c", "B", "powers", "extra")

    def __init__(self, tab: ButcherTableau, dtype, device):
        kw = dict(dtype=dtype, device=device)
        self.a_rows = [torch.tensor(tab.a[i], **kw) for i in range(tab.stages)]
        self.b = torch.tensor(tab.b, **kw)
        self.e = None if tab.b_error is None else torch.tensor(tab.b_error, **kw)
        self.c = [float(x) for x in tab.c]
        self.B = None if tab.dense is None else torch.tensor(tab.dense, **kw)
        # DOP853-style second estimate (combined with ``e`` in ``_combined_error``).
        self.e2 = None if tab.b_error2 is None else torch.tensor(tab.b_error2, **kw)
        # Extra dense-output stages: (row over all earlier stages, node, is-the-end-point-derivative).
        self.extra = None
        if tab.extra_stages:
            s = tab.stages
            self.extra = []
            for j in range(tab.extra_stages):
                row = tab.a_extra[j, : s + j]
                # A stage at c = 1 with the weights b is f(t0 + h, y1): the step already has it.
                is_f1 = (
                    not tab.fsal and tab.c_extra[j] == 1.0 and np.allclose(row[:s], tab.b, atol=1e-14, rtol=0)
                    and not np.any(row[s:])
                )
                self.extra.append((torch.tensor(row, **kw), float(tab.c_extra[j]), is_f1))


def _polynomial_interpolant(dense, theta):
    """y(θ) = y0 + dt Σ_i b_i(θ) k_i with b_i(θ) = Σ_p B[i,p] θ^(p+1) (the method's continuous extension)."""
    y0, K, B, dt = dense
    P = B.shape[1]
    if isinstance(theta, torch.Tensor):
        th = theta.to(B.dtype)
        powers = torch.stack([th ** (p + 1) for p in range(P)])
    else:
        powers = torch.tensor([theta ** (p + 1) for p in range(P)], dtype=B.dtype, device=B.device)
    w = (B @ powers) * dt
    return torch.addmv(y0.reshape(-1), K.T, w).view_as(y0)


class _ExtraStageDense:
    """Dense output of a step whose continuous extension needs extra stages (Vern7, DP8).

    The extra stages are evaluated on the first interpolation of the step only (lazily, as
    OrdinaryDiffEq.jl does), then kept; steps never interpolated cost nothing extra. Their
    evaluations count in the solve's ``nfe``.
    """

    __slots__ = ("rhs", "t0", "y0", "K", "f1", "dt", "co", "_data")

    def __init__(self, rhs, t0, y0, K, f1, dt, co):
        self.rhs, self.t0, self.y0, self.K, self.f1, self.dt, self.co = rhs, t0, y0, K, f1, dt, co
        self._data = None

    def data(self):
        if self._data is None:
            y0, dt = self.y0, self.dt
            shape = y0.shape
            y0f = y0.reshape(-1)
            ks = list(self.K.unbind(0))
            for row, c, is_f1 in self.co.extra:
                if is_f1:
                    ks.append(self.f1.reshape(-1))
                    continue
                yi = torch.addmv(y0f, torch.stack(ks, 1), row * dt)
                ks.append(self.rhs(self.t0 + c * dt, yi.view(shape)).reshape(-1))
            self._data = (y0, torch.stack(ks, 0), self.co.B, dt)
            self.rhs = self.K = self.f1 = None  # drop what the stages no longer need
        return self._data


def _combined_error(K, e5, e3, dt, shape):
    """DOP853's combined estimate, per component: err5 · |err5| / sqrt(err5² + 0.01 err3²).

    Hairer's DOP853 combines the 5th- and 3rd-order estimates in the norm; applied component by
    component (as scipy's ``DOP853._estimate_error``) it keeps per-component tolerances and any
    error norm working. It behaves like O(h⁸) for small h.
    """
    err5 = torch.mv(K.T, e5 * dt)
    err3 = torch.mv(K.T, e3 * dt)
    denom = torch.sqrt(err5 * err5 + 0.01 * (err3 * err3))
    tiny = torch.finfo(err5.dtype).tiny
    return (err5 * err5.abs() / denom.clamp_min(tiny)).view(shape)


class ExplicitRK(AbstractSolver):
    """Generic explicit Runge–Kutta method; subclasses set ``tableau`` (and ``name``)."""

    tableau: ButcherTableau

    def __init__(self):
        self._coef_cache: dict = {}

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))

    @property
    def order(self):  # type: ignore[override]
        return self.tableau.order

    @property
    def error_order(self):  # type: ignore[override]
        return self.tableau.error_order if self.tableau.b_error is not None else None

    def _coef(self, y):
        key = (y.dtype, y.device)
        co = self._coef_cache.get(key)
        if co is None:
            co = self._coef_cache[key] = _Coefficients(self.tableau, y.dtype, y.device)
        return co

    def init(self, rhs, t0, y0, stats):
        return rhs(t0, y0)

    def step(self, rhs, t0, y0, dt, f0):
        tab = self.tableau
        co = self._coef(y0)
        s = tab.stages
        shape = y0.shape
        y0f = y0.reshape(-1)
        K = torch.empty((s, y0f.numel()), dtype=y0.dtype, device=y0.device) if not torch.is_grad_enabled() else None
        if K is None:
            # Under autograd build the stage matrix from fresh tensors (no in-place writes in the graph).
            ks = [f0.reshape(-1)]
            for i in range(1, s):
                if tab.fsal and i == s - 1:
                    break
                yi = torch.addmv(y0f, torch.stack(ks, 1), co.a_rows[i][:i] * dt)
                ks.append(rhs(t0 + co.c[i] * dt, yi.view(shape)).reshape(-1))
            if tab.fsal:
                y1f = torch.addmv(y0f, torch.stack(ks, 1), co.b[: s - 1] * dt)
                y1 = y1f.view(shape)
                f1 = rhs(t0 + dt, y1)
                ks.append(f1.reshape(-1))
                K = torch.stack(ks, 0)
            else:
                K = torch.stack(ks, 0)
                y1 = torch.addmv(y0f, K.T, co.b * dt).view(shape)
                f1 = rhs(t0 + dt, y1)
        else:
            KT = K.T
            K[0] = f0.reshape(-1)
            for i in range(1, s):
                if tab.fsal and i == s - 1:
                    break
                yi = torch.addmv(y0f, KT[:, :i], co.a_rows[i][:i], alpha=dt)
                K[i] = rhs(t0 + co.c[i] * dt, yi.view(shape)).reshape(-1)
            if tab.fsal:
                y1 = torch.addmv(y0f, KT[:, : s - 1], co.b[: s - 1], alpha=dt).view(shape)
                f1 = rhs(t0 + dt, y1)
                K[s - 1] = f1.reshape(-1)
            else:
                y1 = torch.addmv(y0f, KT, co.b, alpha=dt).view(shape)
                f1 = rhs(t0 + dt, y1)
        err = None
        if co.e is not None:
            if co.e2 is None:
                err = torch.mv(K.T, co.e * dt).view(shape)
            else:
                err = _combined_error(K, co.e, co.e2, dt, shape)
        if co.extra is not None:
            dense = _ExtraStageDense(rhs, t0, y0, K, f1, dt, co)
        elif co.B is not None:
            dense = (y0, K, co.B, dt)
        else:
            dense = (y0, y1, f0, f1, dt)
        return StepResult(y1=y1, error=err, cache=f1, dense=dense)

    def interpolant(self, dense, theta):  # type: ignore[override]
        if isinstance(dense, _ExtraStageDense):
            return _polynomial_interpolant(dense.data(), theta)
        if len(dense) == 4:
            return _polynomial_interpolant(dense, theta)
        return hermite_interpolant(dense, theta)
