"""The Python object Julia calls back into (the callback path of the Julia backend).

``TorchCallbacks`` implements exactly what ``TorchRHS`` in ``julia/PyNeuralODEBridge.jl`` calls:

* ``f(out, u, p, t)``: ``out ← rhs(t, u; p)``;
* ``vjp(du, dp, u, p, t, lam)``: ``du ← (∂f/∂u)ᵀ lam`` and ``dp ← (∂f/∂p)ᵀ lam`` from ONE
  ``torch.func.vjp`` (this is what Zygote's pullback and the adjoint ODEs ask for);
* ``jac(J, u, p, t)``: ``J ← ∂f/∂u`` (``torch.func.jacrev``) for implicit solvers.

``u``, ``p``, ``lam`` arrive as 1-D arrays (juliacall ``ArrayValue``s, zero-copy), outputs are
filled in place. ``p`` is the flat parameter vector of a :class:`ParamLayout`; the model is
evaluated with ``torch.func.functional_call`` so the VJP reaches every parameter. Counters:
``nfe`` (f calls), ``nvjp``, ``njac``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._marshal import ParamLayout, as_tensor, write


class TorchCallbacks:
    """``fn(t, y_flat, params_dict, args) -> dy_flat`` wrapped for Julia."""

    def __init__(self, fn: Callable, layout: ParamLayout, n: int, time: Callable, dtype, device):
        self.fn = fn
        self.layout = layout
        self.n = n
        self.time = time
        self.dtype = dtype
        self.device = device
        self.nfe = 0
        self.nvjp = 0
        self.njac = 0

    def _eval(self, y, pflat, t):
        params, args = self.layout.unflatten(pflat)
        return self.fn(t, y, params, args)

    def _inputs(self, u, p, t):
        y = as_tensor(u, self.dtype, self.device).reshape(-1)
        pflat = as_tensor(p, self.dtype, self.device).reshape(-1)
        return y, pflat, self.time(float(t))

    def f(self, out, u, p, t):
        self.nfe += 1
        y, pflat, tt = self._inputs(u, p, t)
        with torch.no_grad():
            write(out, self._eval(y, pflat, tt).reshape(-1))

    def vjp(self, du, dp, u, p, t, lam):
        self.nvjp += 1
        y, pflat, tt = self._inputs(u, p, t)
        lam_t = as_tensor(lam, self.dtype, self.device).reshape(-1)
        with torch.enable_grad():
            _, pull = torch.func.vjp(lambda y_, p_: self._eval(y_, p_, tt).reshape(-1), y, pflat)
            gy, gp = pull(lam_t)
        write(du, gy)
        write(dp, gp)

    def jac(self, J, u, p, t):
        self.njac += 1
        y, pflat, tt = self._inputs(u, p, t)
        with torch.enable_grad():
            jm = torch.func.jacrev(lambda y_: self._eval(y_, pflat, tt).reshape(-1))(y)
        write(J, jm)


def ode_callbacks(problem, layout: ParamLayout) -> TorchCallbacks:
    """Callbacks for ``pn.solve``'s problem: ``f(t, unpack(y), *args)`` with parameters swapped
    in."""
    f = problem.f
    is_module = isinstance(f, torch.nn.Module)
    shape = problem.y0.shape

    def fn(t, y, params, args):
        yy = problem.unpack(y.reshape(shape))
        if is_module and params:
            out = torch.func.functional_call(f, params, (t, yy, *args))
        else:
            out = f(t, yy, *args)
        return problem.pack(out)

    y0 = problem.y0
    return TorchCallbacks(fn, layout, y0.numel(), problem.time, y0.dtype, y0.device)


def steady_callbacks(f, z0: torch.Tensor, layout: ParamLayout) -> TorchCallbacks:
    """Callbacks for a DEQ: the ODE ``dz/dt = f(z, *args) - z`` whose steady state is the fixed
    point."""
    is_module = isinstance(f, torch.nn.Module)
    shape = z0.shape

    def fn(t, z, params, args):
        zz = z.reshape(shape)
        if is_module and params:
            out = torch.func.functional_call(f, params, (zz, *args))
        else:
            out = f(zz, *args)
        return (out - zz).reshape(-1)

    time = lambda t: torch.full((), t, dtype=z0.dtype, device=z0.device)
    return TorchCallbacks(fn, layout, z0.numel(), time, z0.dtype, z0.device)
