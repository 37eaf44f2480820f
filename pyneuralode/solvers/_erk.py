"""One generic engine for explicit Runge–Kutta methods, driven by a :class:`ButcherTableau`.

Stage combinations are single fused ``addmv`` calls on a stage matrix (no Python loop of scaled
adds); FSAL methods reuse their last stage; the derivative at the step's end is kept as the next
step's first stage, so non-FSAL methods pay no extra evaluation for Hermite dense output.
"""

from __future__ import annotations

import numpy as np
import torch

from ._base import StepResult, TableauSolver, hermite_interpolant
from ._tableau import ButcherTableau

_NO_ALPHA: dict = {}

#: States up to this many elements use the zero-padded stage matrix in ``ExplicitRK.step``.
_PAD_MAX = 8192


class _Coefficients:
    """Tableau tensors for one dtype/device, cached on the solver."""

    __slots__ = (
        "a_rows",
        "b",
        "e",
        "e2",
        "c",
        "B",
        "powers",
        "extra",
        "a_pre",
        "b_head",
        "stages",
        "a_row",
        "b_row",
    )

    def __init__(self, tab: ButcherTableau, dtype, device):
        kw = dict(dtype=dtype, device=device)
        self.a_rows = [torch.tensor(tab.a[i], **kw) for i in range(tab.stages)]
        self.b = torch.tensor(tab.b, **kw)
        self.e = None if tab.b_error is None else torch.tensor(tab.b_error, **kw)
        self.c = [float(x) for x in tab.c]
        # Hot-path views, sliced once: stage i combines the first i stages; FSAL's y1 the first s-1.
        self.stages = tab.stages
        self.a_pre = [row[:i] for i, row in enumerate(self.a_rows)]
        self.b_head = self.b[: tab.stages - 1] if tab.fsal else self.b
        # Under autograd the combinations are row-vector × stage-matrix products (see ``step``).
        self.a_row = [a.unsqueeze(0) for a in self.a_pre]
        self.b_row = self.b_head.unsqueeze(0)
        self.B = None if tab.dense is None else DenseWeights(tab.dense, dtype, device)
        # DOP853-style second estimate (combined with ``e`` in ``_combined_error``).
        self.e2 = None if tab.b_error2 is None else torch.tensor(tab.b_error2, **kw)
        # Extra dense-output stages: (row over all earlier stages, node,
        # is-the-end-point-derivative).
        self.extra = None
        if tab.extra_stages:
            s = tab.stages
            self.extra = []
            for j in range(tab.extra_stages):
                row = tab.a_extra[j, : s + j]
                # A stage at c = 1 with the weights b is f(t0 + h, y1): the step already has it.
                is_f1 = (
                    not tab.fsal
                    and tab.c_extra[j] == 1.0
                    and np.allclose(row[:s], tab.b, atol=1e-14, rtol=0)
                    and not np.any(row[s:])
                )
                self.extra.append((torch.tensor(row, **kw), float(tab.c_extra[j]), is_f1))


class DenseWeights:
    """A continuous extension's coefficient matrix ``B`` (stages × degree) as a tensor and as a
    float64 array.

    For a float θ the stage weights ``dt · B [θ, θ², …]`` are formed in numpy (no torch dispatch)
    and handed to one ``addmv``; on the CPU they enter torch without a copy through ``from_numpy``.
    A tensor θ (gradients to the output time) uses the tensor.
    """

    __slots__ = ("tensor", "array", "exponents", "np_dtype", "device")

    def __init__(self, B, dtype, device):
        self.array = np.asarray(B, dtype=np.float64)
        self.tensor = torch.tensor(self.array, dtype=dtype, device=device)
        self.exponents = np.arange(1, self.array.shape[1] + 1, dtype=np.float64)
        cpu = torch.device(device).type == "cpu"
        self.np_dtype = (
            {torch.float32: np.float32, torch.float64: np.float64}.get(dtype) if cpu else None
        )
        self.device = device

    def weights(self, theta: float, dt: float) -> torch.Tensor:
        w = (self.array @ (theta**self.exponents)) * dt
        if self.np_dtype is not None:
            return torch.from_numpy(w.astype(self.np_dtype, copy=False))
        return torch.as_tensor(w, dtype=self.tensor.dtype).to(self.device)


def _polynomial_interpolant(dense, theta):
    """y(θ) = y0 + dt Σ_i b_i(θ) k_i with b_i(θ) = Σ_p B[i,p] θ^(p+1) (the method's continuous
    extension)."""
    y0, K, W, dt = dense
    B = W.tensor
    if isinstance(theta, torch.Tensor) or isinstance(dt, torch.Tensor):
        P = B.shape[1]
        th = theta.to(B.dtype) if isinstance(theta, torch.Tensor) else theta
        powers = torch.stack(
            [torch.as_tensor(th, dtype=B.dtype, device=B.device) ** (p + 1) for p in range(P)]
        )
        w = (B @ powers) * dt
    else:
        w = W.weights(theta, dt)
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


class ExplicitRK(TableauSolver):
    """Generic explicit Runge–Kutta method; subclasses set ``tableau`` (and ``name``)."""

    tableau: ButcherTableau

    def __init__(self):
        self._coef_cache: dict = {}

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))

    @property
    def error_order(self):  # type: ignore[override]
        """The tableau's, or None for a method without an embedded pair (fixed steps only)."""
        return self.tableau.error_order if self.tableau.b_error is not None else None

    def _coef(self, y):
        key = (y.dtype, y.device)
        co = self._coef_cache.get(key)
        if co is None:
            with torch.inference_mode(
                False
            ):  # normal tensors even if first built under inference mode
                co = self._coef_cache[key] = _Coefficients(self.tableau, y.dtype, y.device)
        return co

    def init(self, rhs, t0, y0, stats, rtol=None, atol=None):
        return rhs(t0, y0)

    def step(self, rhs, t0, y0, dt, f0):
        # Hot path: per stage one fused addmv (the stage combination), f, and one copy into the
        # stage matrix; no reshapes for 1-D states; the error estimate is one addmv.
        co = self._coef_cache.get((y0.dtype, y0.device))
        if co is None:
            co = self._coef(y0)
        fsal = self.tableau.fsal
        s = co.stages
        m = s - 1 if fsal else s  # stages from combinations (stage 0 is f0; FSAL's last is f1)
        c, a_pre = co.c, co.a_pre
        shape = tuple(y0.shape)  # view() parses a tuple faster than a torch.Size
        flat = y0.dim() == 1
        y0f = y0 if flat else y0.reshape(-1)
        if not torch.is_grad_enabled():
            n = y0f.shape[0]
            padded = n <= _PAD_MAX
            if padded:
                # Small states: a zeroed stage matrix and full coefficient rows (the rows not yet
                # computed are exact zeros) save a slice per stage; measured faster up to ~8k
                # elements.
                K = torch.zeros((s, n), dtype=y0.dtype, device=y0.device)
                a_use = co.a_rows
            else:
                K = torch.empty((s, n), dtype=y0.dtype, device=y0.device)
                a_use = a_pre
            KT = K.t()
            Ks = K if flat else K.view(s, *shape)
            Ks[0] = f0
            # per-sample steps are of size 1 in their own variable: no alpha to convert
            alpha = _NO_ALPHA if dt == 1.0 else {"alpha": dt}
            for i in range(1, m):
                yi = torch.addmv(y0f, KT if padded else KT[:, :i], a_use[i], **alpha)
                Ks[i] = rhs(t0 + c[i] * dt, yi if flat else yi.view(shape))
            if padded:  # FSAL: the last row is still zero, so the full b works
                y1f = torch.addmv(y0f, KT, co.b, **alpha)
            else:
                y1f = torch.addmv(y0f, KT[:, :m] if fsal else KT, co.b_head, **alpha)
            y1 = y1f if flat else y1f.view(shape)
            f1 = rhs(t0 + dt, y1)
            if fsal:
                Ks[s - 1] = f1
            err = self._error(K, KT, y0f, co, dt, shape, flat)
        else:
            # Under autograd: one fused addmm per combination, y_i = y0 + dt·(a_i K) with K the
            # row-major stack of the shaped stages (no in-place writes in the graph). The row-vector
            # form keeps every backward gradient contiguous: ∂K = dt·a_iᵀ g is a row-major (i, n)
            # matrix whose rows are the stages' gradients, with no transposes or copies.
            n = y0f.shape[0]
            y0r = y0f.view(1, n)
            a_row = co.a_row
            ks = [f0]
            for i in range(1, m):
                yi = torch.addmm(y0r, a_row[i], torch.stack(ks).view(i, n), alpha=dt)
                ks.append(rhs(t0 + c[i] * dt, yi.view(shape)))
            y1 = torch.addmm(y0r, co.b_row, torch.stack(ks).view(m, n), alpha=dt).view(shape)
            f1 = rhs(t0 + dt, y1)
            if fsal:
                ks.append(f1)
            K = torch.stack(ks).view(s, n)
            # The error estimate only feeds step-size control (treated as constant): no graph.
            with torch.no_grad():
                err = self._error(K, K.t(), y0f, co, dt, shape, flat)
        if co.extra is not None:
            dense = _ExtraStageDense(rhs, t0, y0, K, f1, dt, co)
        elif co.B is not None:
            dense = (y0, K, co.B, dt)
        else:
            dense = (y0, y1, f0, f1, dt)
        return StepResult(y1=y1, error=err, cache=f1, dense=dense)

    @staticmethod
    def _error(K, KT, y0f, co, dt, shape, flat):
        if co.e is None:
            return None
        if co.e2 is not None:
            return _combined_error(K, co.e, co.e2, dt, shape)
        err = torch.addmv(
            y0f, KT, co.e, beta=0, alpha=dt
        )  # beta=0: y0f is ignored (dt·Kᵀe in one op)
        return err if flat else err.view(shape)

    def interpolant(self, dense, theta):  # type: ignore[override]
        if isinstance(dense, _ExtraStageDense):
            return _polynomial_interpolant(dense.data(), theta)
        if len(dense) == 4:
            return _polynomial_interpolant(dense, theta)
        return hermite_interpolant(dense, theta)
