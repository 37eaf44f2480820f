"""The stage-arithmetic seam: which arrays a step's stage combinations run on, chosen once per
solve.

* :class:`TorchOps` — torch tensors: autograd, any device, every W operator. Without autograd
  the stage matrix is preallocated and filled in place (``addmv``/``out=``); under autograd the
  stages are stacked instead (in-place writes would break the graph).
* :class:`HostOps` — numpy arrays sharing memory with the tensors (zero-copy): tiny dense CPU
  states without autograd, where torch's per-call cost dominates a step; f still gets and
  returns tensors. Needs a W operator with a host inverse (:class:`~.linear.SmallInverse`).

:func:`stage_ops` picks one in a solver's ``init``; a step is then written once against it (the
Rosenbrock stage loop: inside ``guard``, ``start`` (the first stage), then ``stage`` once per
further stage, then ``finish``; the ESDIRK step: stage stores, predictors, Newton functions and
linear solves on flat arrays). The two give the same results to rounding.

The integrate loop's error norm of tiny CPU states runs on the host too (:func:`small_norm_kind`,
:func:`rms_norm_small`, with the tolerances as :func:`host_tolerance` gives them).
"""

from __future__ import annotations

import contextlib
import math
from operator import mul

import numpy as np
import torch

from ._base import tableau_tensors
from ._newton import (
    host_newton_fns,
    host_weighted_rms,
    torch_linear_solver,
    torch_newton_fns,
    weighted_rms,
)
from .linear import HOST_DTYPES, bump

#: float64 states up to this many components take :class:`FloatOps` in the Rosenbrock stage loop
#: (the closed-form inverse of W covers 1–3)
FLOAT_OPS_MAX = 3


# -- the host error norm of the integrate loop (tiny CPU states) --------------------------------
#: states up to this many real components on the CPU take a host-side error norm (there torch's
#: per-call dispatch costs more than the arithmetic): Python floats up to ``SMALL_NORM_LIST``
#: components with scalar tolerances, numpy up to ``SMALL_NORM``
SMALL_NORM = 64
SMALL_NORM_LIST = 8


def small_norm_kind(y: torch.Tensor, rtol, atol):
    """``"list"``, ``"numpy"`` or ``None``: which host-side error norm the loop may use for this
    state."""
    if (
        y.device.type != "cpu"
        or y.numel() > SMALL_NORM
        or y.dtype not in (torch.float32, torch.float64)
    ):
        return None
    tensors = [x for x in (rtol, atol) if isinstance(x, torch.Tensor)]
    if any(x.device.type != "cpu" for x in tensors):
        return None
    return "list" if not tensors and y.numel() <= SMALL_NORM_LIST else "numpy"


def host_tolerance(tol):
    """A tolerance as :func:`rms_norm_small` takes it: a float, or a numpy array over the
    flattened state."""
    if not isinstance(tol, torch.Tensor):
        return tol
    return float(tol) if tol.numel() == 1 else tol.detach().reshape(-1).numpy()


def abs_host(y: torch.Tensor, kind: str):
    """``|y|`` as :func:`rms_norm_small` keeps it (a list of floats or a numpy array)."""
    a = y.detach().reshape(-1)
    return [abs(v) for v in a.tolist()] if kind == "list" else np.abs(a.numpy())


def rms_norm_small(
    kind: str, err: torch.Tensor, ay0, y1: torch.Tensor, rtol, atol, inv_sqrt_n: float
):
    """:func:`~pyneuralode.controllers.rms_norm_and_abs` on the host for tiny CPU states:
    ``(norm as a float, |y1|)``.

    ``kind="list"``: Python floats (scalar ``rtol``/``atol``); ``"numpy"``: ``rtol``/``atol`` floats
    or numpy arrays broadcasting against the flattened state. A zero scale or an overflow gives
    ``inf``/NaN, which the loop rejects as non-finite.
    """
    if kind == "list":
        s = 0.0
        ay1 = []
        try:
            for a, b, e in zip(
                ay0,
                (y1 if y1.ndim == 1 else y1.reshape(-1)).tolist(),
                (err if err.ndim == 1 else err.reshape(-1)).tolist(),
            ):
                b = abs(b)
                ay1.append(b)
                r = e / (atol + rtol * (a if a > b else b))
                s += r * r
        except (ZeroDivisionError, OverflowError):
            return math.inf, ay1
        return math.sqrt(s) * inv_sqrt_n, ay1
    ay1 = np.abs(y1.detach().reshape(-1).numpy())
    with np.errstate(all="ignore"):
        scale = np.maximum(ay0, ay1)
        scale *= rtol
        scale += atol
        r = err.detach().reshape(-1).numpy() / scale
        return math.sqrt(float(np.vdot(r, r))) * inv_sqrt_n, ay1


class _TorchCoef:
    """A Rosenbrock tableau as tensors in the state's dtype and device."""

    __slots__ = ("A", "C", "m", "e", "H")

    def __init__(self, tab, dtype, device):
        kw = dict(dtype=dtype, device=device)
        self.A = [torch.tensor(tab.A[i, :i], **kw) for i in range(tab.stages)]
        self.C = [torch.tensor(tab.C[i, :i], **kw) for i in range(tab.stages)]
        self.m = torch.tensor(tab.m, **kw)
        self.e = torch.tensor(tab.e, **kw)
        self.H = None if tab.H is None else torch.tensor(tab.H, **kw)


class _HostCoef:
    """A Rosenbrock tableau as numpy arrays in the state's dtype.

    The stage matrix of a step is extended by two rows, ``y0`` and ``h²·∂f/∂t``, so that one
    product ``AC[i] @ K`` gives both the stage point ``u_i = y0 + Σ_j a_ij U_j`` and the stage's
    right-hand-side term ``Σ_j c_ij U_j / h + h d_i ∂f/∂t`` (the second row is scaled by 1/h once
    per step), and one product ``MEH @ K`` gives ``y1``, the error estimate and the dense-output
    coefficients.
    """

    __slots__ = ("AC", "MEH", "has_H", "npd", "row_scale")

    def __init__(self, tab, dtype, device):
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
        self.npd = npd
        self.row_scale = np.ones((2, 1), dtype=npd)  # per step: (1, 1/h) down the two rows of AC


class TorchOps:
    """Stage arithmetic on torch tensors (see the module docstring)."""

    host = False

    __slots__ = (
        "tab",
        "W",
        "c",
        "d",
        "y0",
        "shape",
        "is_flat",
        "co",
        "g",
        "h",
        "inv_h",
        "dT",
        "K",
        "KT",
        "Ks",
        "Kst",
        "inplace",
    )
    _nothing = contextlib.nullcontext()

    def guard(self):
        """The context a step's stage loop runs in (torch needs none)."""
        return self._nothing

    def __init__(self, tab, W):
        self.tab, self.W = tab, W
        self.c = () if tab is None else tuple(float(x) for x in tab.c)
        self.d = tuple(float(x) for x in getattr(tab, "d", ()))  # (Rosenbrock only)

    def start(self, y0, f0, dT, h):
        """Begin a step from ``(y0, f0 = f(t0, y0))`` with ``dT = ∂f/∂t`` (or None) and size ``h``:
        factors ``W = I − hγJ``, solves the first stage and returns the second stage's point."""
        tab = self.tab
        self.co = tableau_tensors(tab, y0, _TorchCoef)
        self.g = g = h * float(tab.gamma)
        self.W.factor(g)
        self.y0, self.shape, self.is_flat = y0, y0.shape, y0.ndim == 1
        self.h, self.inv_h = h, 1.0 / h
        self.dT = None if dT is None else dT.reshape(-1)
        self.inplace = not torch.is_grad_enabled()
        if self.inplace:
            self.K = torch.empty((tab.stages, y0.numel()), dtype=y0.dtype, device=y0.device)
            self.KT = self.K.T
        else:
            self.Ks = []
        self._solve(0, self._with_dT(f0.reshape(-1), 0))
        return self._point(1)

    def stage(self, i, fi):
        """Stage ``i`` from ``fi = f(t0 + c_i h, u_i)``:
        ``U_i = (I/(hγ) − J)⁻¹ (fi + Σ_j c_ij U_j / h + h d_i ∂f/∂t)``; returns the next stage's
        point (None after the last stage)."""
        fi = fi if self.is_flat else fi.reshape(-1)
        if self.inplace:
            r = torch.addmv(fi, self.KT[:, :i], self.co.C[i], alpha=self.inv_h)
        else:
            r = fi + (self.Kst @ self.co.C[i]) * self.inv_h
        self._solve(i, self._with_dT(r, i))
        return self._point(i + 1) if i + 1 < len(self.c) else None

    def _with_dT(self, r, i):
        d = self.d[i]
        if self.dT is not None and d != 0.0:
            r = torch.add(r, self.dT, alpha=self.h * d)
        return r

    def _point(self, i):
        """``u_i = y0 + Σ_j a_ij U_j`` shaped like the state."""
        y0f = self.y0.reshape(-1)
        if self.inplace:
            ui = torch.addmv(y0f, self.KT[:, :i], self.co.A[i])
        else:
            self.Kst = torch.stack(self.Ks, 1)
            ui = y0f + self.Kst @ self.co.A[i]
        return ui if self.is_flat else ui.view(self.shape)

    def _solve(self, i, r):
        """``U_i = (I/(hγ) − J)⁻¹ r = W⁻¹ (hγ r)``."""
        W = self.W
        b = r if not W.batched else r.view(self.shape)  # batched LU solves want (B, n)
        if self.inplace:
            W.solve(b, scale=self.g, out=self.K[i])
        else:
            self.Ks.append(W.solve(b, scale=self.g).reshape(-1))

    def finish(self):
        """``(y1, error, dense)`` of the step."""
        co, shape, y0 = self.co, self.shape, self.y0
        if self.inplace:
            K, KT = self.K, self.KT
        else:
            K = torch.stack(self.Ks, 0)
            KT = K.T
        y1 = (y0.reshape(-1) + KT @ co.m).view(shape)
        err = (KT @ co.e).view(shape)
        if co.H is not None:
            kk = (co.H @ K).view(co.H.shape[0], *shape)
        else:
            kk = torch.stack([torch.zeros_like(y0)])
        self.Ks = self.Kst = None
        return y1, err, (y0, y1, kk)

    # -- Newton-based steps (ESDIRK): flat arrays of this arithmetic's type
    # --------------------------
    @staticmethod
    def flat(x):
        """A state-shaped tensor as a flat array of this arithmetic."""
        return x.reshape(-1)

    @staticmethod
    def state(x, shape):
        """A flat array as a state-shaped tensor."""
        return x.view(shape)

    @staticmethod
    def error_scale(y0, rtol, atol):
        """``atol + rtol·|y0|`` (flat), the Newton norm's scale."""
        with torch.no_grad():
            return (atol + rtol * y0.detach().abs()).reshape(-1)

    @staticmethod
    def newton_fns(rhs, t, scale, shape):
        """``(f(t, ·), norm)`` on flat arrays for a Newton iteration at time ``t``."""
        return torch_newton_fns(rhs, t, scale, shape)

    @staticmethod
    def linear_solver(W, g, shape):
        """``b ↦ W⁻¹ b`` on flat arrays for ``W = I − g·J`` (``None`` when GMRES did not
        converge)."""
        W.factor(g)
        return torch_linear_solver(W, shape)

    @staticmethod
    def stage_store(first, s):
        """A store of ``s`` flat stage vectors holding ``first``."""
        return [first]

    @staticmethod
    def predict(K, i, y0f, a, pred, h, hg):
        """``ψ_i = y0 + h Σ_j a_ij k_j`` and the Newton guess ``ψ_i + hγ Σ_j pred_ij k_j``."""
        Kst = torch.stack(K, 1)
        psi = y0f + Kst @ (a * h)
        return psi, psi + hg * (Kst @ pred)

    @staticmethod
    def store(K, i, v):
        K.append(v)

    @staticmethod
    def stages_done(K):
        """The filled store as ``(n×s stage matrix, s×n stage rows)``."""
        Kc = torch.stack(K, 1)
        return Kc, Kc.T

    @staticmethod
    def weighted(Kc, w, h):
        """``h Σ_j w_j k_j`` (flat)."""
        return Kc @ (w * h)

    @staticmethod
    def rows(Kr):
        return Kr

    @staticmethod
    def smooth(W, err, shape, solve):
        """``W⁻¹ err`` (flat), kept even when GMRES did not converge (an error estimate, not a
        stage)."""
        return W.solve(err.view(shape)).reshape(-1)

    # -- QNDF: the difference table
    # -----------------------------------------------------------------
    @staticmethod
    def table(D):
        """The difference table (rows: ∇^j y) as an array of this arithmetic."""
        return torch.from_numpy(D) if isinstance(D, np.ndarray) else D

    @staticmethod
    def first_table(D, h):
        return torch.stack([D[0], D[1] * h])

    @staticmethod
    def rescale_table(D, k, R):
        """``D`` with its first ``k+1`` rows re-expressed by the numpy matrix ``R``."""
        return torch.cat(
            [torch.as_tensor(R, dtype=D.dtype, device=D.device) @ D[: k + 1], D[k + 1 :]]
        )

    @staticmethod
    def row_combination(w, rows):
        """``Σ_j w_j rows_j`` for float64 numpy weights ``w``."""
        return torch.as_tensor(w, dtype=rows.dtype, device=rows.device) @ rows

    @staticmethod
    def zeros_like(x):
        return torch.zeros_like(x)

    @staticmethod
    def update_table(D, d, k):
        """The new difference table: D'[k+2] = d − D[k+1], D'[k+1] = d, D'[i] = D[i] + D'[i+1]."""
        rows = list(D.unbind(0))
        while len(rows) < k + 3:
            rows.append(torch.zeros_like(d))
        rows[k + 2] = d - rows[k + 1]
        rows[k + 1] = d
        for i in range(k, -1, -1):
            rows[i] = rows[i] + rows[i + 1]
        return torch.stack(rows)

    @staticmethod
    def rms(v, scale):
        """The scaled RMS norm as a float."""
        return weighted_rms(v, scale)


class HostOps:
    """Stage arithmetic on numpy arrays for tiny dense CPU states without autograd (see the module
    docstring): per stage one 2×(s+2) by (s+2)×n product (stage point and right-hand-side term
    together, see :class:`_HostCoef`), f, one addition and one product with ``(I/(hγ) − J)⁻¹``."""

    host = True

    __slots__ = ("tab", "W", "c", "co", "y0", "shape", "is_flat", "K", "M", "AC", "v")

    def __init__(self, tab, W):
        self.tab, self.W = tab, W
        self.c = () if tab is None else tuple(float(x) for x in tab.c)
        self.co = None

    @staticmethod
    def guard():
        """Overflow or NaN shows up in the error norm (the step is rejected), not as a warning."""
        return np.errstate(all="ignore")

    def start(self, y0, f0, dT, h):
        tab = self.tab
        co = self.co
        if co is None:  # kept for the solve: the per-dtype lookup costs a dict access a step
            co = self.co = tableau_tensors(tab, y0, _HostCoef)
        self.M = M = self.W.scaled_inverse_numpy(h * float(tab.gamma))  # U_i = (I/(hγ) − J)⁻¹ r_i
        self.y0, self.shape, self.is_flat = y0, y0.shape, y0.ndim == 1
        flat = self.is_flat
        s = tab.stages
        K = self.K = np.zeros((s + 2, M.shape[0]), dtype=co.npd)  # rows: U_0..U_{s-1}, y0, h²∂f/∂t
        K[s] = (y0 if flat else y0.reshape(-1)).numpy()
        r = (f0 if flat else f0.reshape(-1)).numpy()
        if dT is not None:
            dTn = dT.reshape(-1).numpy()
            np.multiply(dTn, h * h, out=K[s + 1])
            d0 = float(tab.d[0])
            if d0 != 0.0:
                r = r + (h * d0) * dTn
        row_scale = co.row_scale.copy()
        row_scale[1] = 1.0 / h
        self.AC = co.AC * row_scale  # the second row of every stage ÷ h
        np.dot(M, r, out=K[0])
        return self._point(1)

    def stage(self, i, fi):
        v1 = self.v[1]  # Σ_j c_ij U_j / h + h d_i ∂f/∂t, formed with the stage point
        np.add(v1, (fi if self.is_flat else fi.reshape(-1)).numpy(), out=v1)
        np.dot(self.M, v1, out=self.K[i])
        return self._point(i + 1) if i + 1 < len(self.c) else None

    def _point(self, i):
        v = self.v = self.AC[i] @ self.K  # [u_i; Σ_j c_ij U_j / h + h d_i ∂f/∂t]
        ui = torch.from_numpy(v[0])
        return ui if self.is_flat else ui.view(self.shape)

    def finish(self):
        out = self.co.MEH @ self.K  # [y1; error; dense coefficients]
        bump(self.W.stats, "nsolve", self.tab.stages)
        from_numpy = torch.from_numpy
        y1, err = from_numpy(out[0]), from_numpy(out[1])
        kk = from_numpy(out[2:]) if self.co.has_H else None
        y0, shape = self.y0, self.shape
        if not self.is_flat:
            y1, err = y1.view(shape), err.view(shape)
            kk = kk.view(out.shape[0] - 2, *shape) if kk is not None else None
        self.v = None
        return y1, err, (y0, y1, kk if kk is not None else torch.zeros_like(y0).unsqueeze(0))

    # -- Newton-based steps (ESDIRK)
    # ------------------------------------------------------------------
    @staticmethod
    def flat(x):
        return x.detach().reshape(-1).numpy()

    @staticmethod
    def state(x, shape):
        return torch.from_numpy(x.reshape(shape))  # numpy reshapes cost less than tensor views

    @staticmethod
    def error_scale(y0, rtol, atol):
        y = y0 if isinstance(y0, np.ndarray) else y0.detach().reshape(-1).numpy()
        return host_tolerance(atol) + host_tolerance(rtol) * np.abs(y)

    @staticmethod
    def newton_fns(rhs, t, scale, shape):
        return host_newton_fns(rhs, t, scale, shape)

    @staticmethod
    def linear_solver(W, g, shape):
        return W.host_solver(g, shape)

    @staticmethod
    def stage_store(first, s):
        K = np.empty((s, first.size), dtype=first.dtype)
        K[0] = first
        return K

    @staticmethod
    def predict(K, i, y0f, a, pred, h, hg):
        psi = y0f + h * (a @ K[:i])
        return psi, psi + hg * (pred @ K[:i])

    @staticmethod
    def store(K, i, v):
        K[i] = v

    @staticmethod
    def stages_done(K):
        return K, K

    @staticmethod
    def weighted(K, w, h):
        return h * (w @ K)

    @staticmethod
    def rows(Kr):
        return torch.from_numpy(Kr)

    @staticmethod
    def smooth(W, err, shape, solve):
        return solve(err)

    # -- QNDF: the difference table
    # -----------------------------------------------------------------
    @staticmethod
    def table(D):
        return D.detach().numpy() if isinstance(D, torch.Tensor) else D

    @staticmethod
    def first_table(D, h):
        return np.stack([D[0], D[1] * h])

    @staticmethod
    def rescale_table(D, k, R):
        return np.concatenate([R.astype(D.dtype) @ D[: k + 1], D[k + 1 :]])

    @staticmethod
    def row_combination(w, rows):
        return w.astype(rows.dtype) @ rows

    @staticmethod
    def zeros_like(x):
        return np.zeros_like(x)

    @staticmethod
    def update_table(D, d, k):
        D_new = np.zeros((max(D.shape[0], k + 3), D.shape[1]), dtype=D.dtype)
        D_new[: D.shape[0]] = D
        D_new[k + 2] = d - D_new[k + 1]
        D_new[k + 1] = d
        for i in range(k, -1, -1):
            D_new[i] += D_new[i + 1]
        return D_new

    @staticmethod
    def rms(v, scale):
        return host_weighted_rms(v, scale, 1.0 / math.sqrt(max(v.size, 1)))


class FloatOps:
    """The Rosenbrock stage arithmetic on Python floats, for float64 CPU states of 1–3 components
    without autograd: there a numpy call costs more than the arithmetic it does, and a stage is a
    few dozen float operations (``(I/(hγ) − J)⁻¹`` comes in closed form as nested lists, see
    :meth:`~.linear.SmallInverse.scaled_inverse_list`). f still gets and returns tensors. The
    stages are kept by component (``cols[k][j]`` = component k of ``U_j``), so each stage
    combination is one ``sum(map(mul, coefficients, column))``; the step's end (``y1``, error,
    dense rows) is one numpy product."""

    host = True

    __slots__ = (
        "W",
        "c",
        "gamma",
        "A",
        "C",
        "d",
        "MEH",
        "H",
        "y",
        "shape",
        "is_flat",
        "M",
        "cols",
        "inv_h",
        "hdT",
        "y0",
        "s",
    )

    def __init__(self, tab, W):
        self.W = W
        self.c = tuple(float(x) for x in tab.c)
        self.gamma = float(tab.gamma)
        s = tab.stages
        self.A = [[float(x) for x in tab.A[i, :i]] for i in range(s)]
        self.C = [[float(x) for x in tab.C[i, :i]] for i in range(s)]
        self.d = [float(x) for x in tab.d]
        self.H = tab.H
        rows = [tab.m, tab.e] + ([] if tab.H is None else list(tab.H))
        self.MEH = np.ascontiguousarray(np.stack(rows), dtype=np.float64)
        self.s = s

    _nothing = contextlib.nullcontext()

    def guard(self):
        """Float multiplication and addition overflow to inf and give NaN without raising (the
        error norm then rejects the step)."""
        return self._nothing

    def start(self, y0, f0, dT, h):
        self.M = M = self.W.scaled_inverse_list(h * self.gamma)
        self.y0, self.shape, self.is_flat = y0, y0.shape, y0.ndim == 1
        flat = self.is_flat
        self.y = (y0 if flat else y0.reshape(-1)).tolist()
        r = (f0 if flat else f0.reshape(-1)).tolist()
        self.inv_h = 1.0 / h
        self.hdT = None if dT is None else [h * x for x in dT.reshape(-1).tolist()]
        if self.hdT is not None and self.d[0] != 0.0:
            r = [rk + self.d[0] * x for rk, x in zip(r, self.hdT)]
        self.cols = [[sum(map(mul, Mk, r))] for Mk in M]
        return self._point(1)

    def stage(self, i, fi):
        cols, ci, inv_h = self.cols, self.C[i], self.inv_h
        F = (fi if self.is_flat else fi.reshape(-1)).tolist()
        r = [Fk + inv_h * sum(map(mul, ci, col)) for Fk, col in zip(F, cols)]
        di = self.d[i]
        if self.hdT is not None and di != 0.0:
            r = [rk + di * x for rk, x in zip(r, self.hdT)]
        if i + 1 == self.s:
            for col, Mk in zip(cols, self.M):
                col.append(sum(map(mul, Mk, r)))
            return None
        a, u = self.A[i + 1], []  # solve and the next stage's point in one sweep
        for yk, col, Mk in zip(self.y, cols, self.M):
            col.append(sum(map(mul, Mk, r)))
            u.append(yk + sum(map(mul, a, col)))
        u = torch.from_numpy(np.array(u))
        return u if self.is_flat else u.view(self.shape)

    def _point(self, i):
        ai = self.A[i]
        u = torch.from_numpy(
            np.array([yk + sum(map(mul, ai, col)) for yk, col in zip(self.y, self.cols)])
        )
        return u if self.is_flat else u.view(self.shape)

    def finish(self):
        # [y1 − y0; error; dense rows] = MEH · U in one product (the stages by row)
        out = self.MEH @ np.array(self.cols).T
        np.add(out[0], self.y, out=out[0])
        out = out.reshape(out.shape[0], *self.shape)
        bump(self.W.stats, "nsolve", self.s)
        from_numpy, y0 = torch.from_numpy, self.y0
        y1 = from_numpy(out[0, ...])  # `...` keeps a 0-d state an array
        kk = from_numpy(out[2:]) if self.H is not None else torch.zeros_like(y0).unsqueeze(0)
        self.cols = None
        return y1, from_numpy(out[1, ...]), (y0, y1, kk)


def stage_ops(tab, W, y0: torch.Tensor, host_inverse: bool = True):
    """:class:`HostOps` for a CPU state without autograd (``host_inverse``: and a W with a host
    inverse, the tiny dense systems of the Rosenbrock stage loop, which take :class:`FloatOps`
    for float64 states of 1–3 components; else any W but GMRES), else :class:`TorchOps` (called
    once per solve, in ``init``)."""
    if (
        not torch.is_grad_enabled()
        and y0.dtype in HOST_DTYPES
        and y0.device.type == "cpu"
        and (W.host_capable if host_inverse else not W.matrix_free)
    ):
        if host_inverse and y0.dtype == torch.float64 and y0.numel() <= FLOAT_OPS_MAX:
            return FloatOps(tab, W)
        return HostOps(tab, W)
    return TorchOps(tab, W)
