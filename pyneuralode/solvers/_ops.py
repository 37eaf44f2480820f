"""The stage-arithmetic seam: which arrays a step's stage combinations run on, chosen once per solve.

* :class:`TorchOps` — torch tensors: autograd, any device, every W operator. Without autograd
  the stage matrix is preallocated and filled in place (``addmv``/``out=``); under autograd the
  stages are stacked instead (in-place writes would break the graph).
* :class:`HostOps` — numpy arrays sharing memory with the tensors (zero-copy): tiny dense CPU
  states without autograd, where torch's per-call cost dominates a step; f still gets and
  returns tensors. Needs a W operator with a host inverse (:class:`~.linear.SmallInverse`).

:func:`stage_ops` picks one in a solver's ``init``; a step is then written once against it (the
Rosenbrock stage loop: inside ``guard``, ``start``, then per stage ``stage_point``/``stage_rhs``/
``stage_solve``, then ``finish``). The two give the same results to rounding.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ._base import tableau_tensors
from .linear import HOST_DTYPES, bump


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

    __slots__ = ("tab", "W", "c", "d", "y0", "shape", "flat", "co", "g", "h", "inv_h", "dT", "K", "KT", "Ks",
                 "Kst", "inplace")
    _nothing = contextlib.nullcontext()

    def guard(self):
        """The context a step's stage loop runs in (torch needs none)."""
        return self._nothing

    def __init__(self, tab, W):
        self.tab, self.W = tab, W
        self.c = tuple(float(x) for x in tab.c)
        self.d = tuple(float(x) for x in tab.d)

    def start(self, y0, f0, dT, h):
        """Begin a step from ``(y0, f0 = f(t0, y0))`` with ``dT = ∂f/∂t`` (or None) and size ``h``;
        factors ``W = I − hγJ``. Returns the first stage's right-hand side."""
        tab = self.tab
        self.co = tableau_tensors(tab, y0, _TorchCoef)
        self.g = g = h * float(tab.gamma)
        self.W.factor(g)
        self.y0, self.shape, self.flat = y0, y0.shape, y0.ndim == 1
        self.h, self.inv_h = h, 1.0 / h
        self.dT = None if dT is None else dT.reshape(-1)
        self.inplace = not torch.is_grad_enabled()
        if self.inplace:
            self.K = torch.empty((tab.stages, y0.numel()), dtype=y0.dtype, device=y0.device)
            self.KT = self.K.T
        else:
            self.Ks = []
        return self._with_dT(f0.reshape(-1), 0)

    def _with_dT(self, r, i):
        d = self.d[i]
        if self.dT is not None and d != 0.0:
            r = torch.add(r, self.dT, alpha=self.h * d)
        return r

    def stage_point(self, i):
        """``u_i = y0 + Σ_j a_ij U_j`` shaped like the state."""
        y0f = self.y0.reshape(-1)
        if self.inplace:
            ui = torch.addmv(y0f, self.KT[:, :i], self.co.A[i])
        else:
            self.Kst = torch.stack(self.Ks, 1)
            ui = y0f + self.Kst @ self.co.A[i]
        return ui if self.flat else ui.view(self.shape)

    def stage_rhs(self, i, fi):
        """``f(u_i) + Σ_j c_ij U_j / h + h d_i ∂f/∂t`` (flat) from ``fi = f(t0 + c_i h, u_i)``."""
        fi = fi if self.flat else fi.reshape(-1)
        if self.inplace:
            r = torch.addmv(fi, self.KT[:, :i], self.co.C[i], alpha=self.inv_h)
        else:
            r = fi + (self.Kst @ self.co.C[i]) * self.inv_h
        return self._with_dT(r, i)

    def stage_solve(self, i, r):
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


class HostOps:
    """Stage arithmetic on numpy arrays for tiny dense CPU states without autograd (see the module
    docstring): per stage one 2×(s+2) by (s+2)×n product (stage point and right-hand-side term
    together, see :class:`_HostCoef`), f, one addition and one product with ``(I/(hγ) − J)⁻¹``."""

    host = True

    __slots__ = ("tab", "W", "c", "co", "y0", "shape", "flat", "K", "M", "AC", "v")

    def __init__(self, tab, W):
        self.tab, self.W = tab, W
        self.c = tuple(float(x) for x in tab.c)
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
        self.y0, self.shape, self.flat = y0, y0.shape, y0.ndim == 1
        flat = self.flat
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
        return r

    def stage_point(self, i):
        v = self.v = self.AC[i] @ self.K  # [u_i; Σ c_ij U_j / h + h d_i ∂f/∂t]
        ui = torch.from_numpy(v[0])
        return ui if self.flat else ui.view(self.shape)

    def stage_rhs(self, i, fi):
        v1 = self.v[1]
        np.add(v1, (fi if self.flat else fi.reshape(-1)).numpy(), out=v1)
        return v1

    def stage_solve(self, i, r):
        np.dot(self.M, r, out=self.K[i])

    def finish(self):
        out = self.co.MEH @ self.K  # [y1; error; dense coefficients]
        bump(self.W.stats, "nsolve", self.tab.stages)
        from_numpy = torch.from_numpy
        y1, err = from_numpy(out[0]), from_numpy(out[1])
        kk = from_numpy(out[2:]) if self.co.has_H else None
        y0, shape = self.y0, self.shape
        if not self.flat:
            y1, err = y1.view(shape), err.view(shape)
            kk = kk.view(out.shape[0] - 2, *shape) if kk is not None else None
        self.v = None
        return y1, err, (y0, y1, kk if kk is not None else torch.zeros_like(y0).unsqueeze(0))


def stage_ops(tab, W, y0: torch.Tensor):
    """:class:`HostOps` for a tiny dense CPU state without autograd whose W has a host inverse,
    else :class:`TorchOps` (called once per solve, in ``init``)."""
    if not torch.is_grad_enabled() and W.host_capable and y0.dtype in HOST_DTYPES:
        return HostOps(tab, W)
    return TorchOps(tab, W)
