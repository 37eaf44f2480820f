"""Terminal events: stop a solve where ``g(t, y)`` crosses zero, with a differentiable event time.

``pn.solve(f, y0, t, event=g)`` checks the sign of ``g`` after every accepted step; on a sign
change it locates the root on the step's dense output (Illinois regula falsi, to float
resolution in t), saves the outputs up to the event and ends with ``retcode == "Terminated"``,
``sol.event_t`` and ``sol.event_y``. Gradients reach the event time through the implicit function
theorem, dt*/dθ = −(∂g/∂θ) / (dg/dt along the trajectory), applied as one zero-valued Newton
correction around the located root (the approach of torchdiffeq's ``odeint_event``; Chen, Amos &
Nickel, "Learning neural event functions for ordinary differential equations", ICLR 2021).
:func:`odeint_event` is torchdiffeq's interface.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch

from ._solution import ReturnCode, Solution

__all__ = ["odeint_event"]

_MAX_ROOT_ITERS = 200


class EventLocator:
    """The loop's ``event`` hook: sign change of ``g`` over an accepted step, root on its dense output."""

    def __init__(self, g: Callable, problem):
        self.g = g
        self.problem = problem
        self.g_prev: Optional[float] = None

    def value(self, t: float, y: torch.Tensor) -> float:
        out = self.g(self.problem.time(t), self.problem.unpack(y))
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if out.numel() != 1:
            raise ValueError(f"event: g(t, y) must return a scalar (one number), got shape {tuple(out.shape)}; "
                             f"reduce it, e.g. return y[..., 0].min()")
        v = float(out.detach())
        if not math.isfinite(v):
            raise ValueError(f"event: g(t, y) returned {v} at t={t:.6g}; it must be finite along the trajectory")
        return v

    def __call__(self, seg, t: float, t_new: float, y_new: torch.Tensor) -> Optional[float]:
        with torch.no_grad():
            if self.g_prev is None:  # g at the start; 0 means "on the surface: wait until g leaves zero"
                self.g_prev = self.value(t, seg.evaluate(0.0))
            g0, g1 = self.g_prev, self.value(t_new, y_new)
            if g0 == 0.0:
                self.g_prev = g1
                return None
            if g1 == 0.0:
                return t_new
            if (g0 > 0) == (g1 > 0):
                self.g_prev = g1
                return None
            return t + seg.dt * self._root(seg, t, g0, g1)

    def _root(self, seg, t: float, g0: float, g1: float) -> float:
        """θ ∈ (0, 1] with g(t + θ dt, y(θ)) = 0 by the Illinois method (bracketing, superlinear)."""
        a, b, ga, gb = 0.0, 1.0, g0, g1
        side = 0
        tol = 4 * torch.finfo(torch.float64).eps * max(1.0, abs(t) / max(abs(seg.dt), 1e-300))
        for _ in range(_MAX_ROOT_ITERS):
            c = (a * gb - b * ga) / (gb - ga)
            if not (a < c < b):
                c = 0.5 * (a + b)
            gc = self.value(t + seg.dt * c, seg.evaluate(c))
            if gc == 0.0:
                return c
            if (gc > 0) == (gb > 0):
                b, gb = c, gc
                if side == -1:
                    ga *= 0.5
                side = -1
            else:
                a, ga = c, gc
                if side == 1:
                    gb *= 0.5
                side = 1
            if b - a <= tol:
                break
        return b


def differentiable_event(g: Callable, problem, t_event: float, y_event: torch.Tensor):
    """``(t*, y*)`` with the implicit-function-theorem gradient; values unchanged.

    ``t* = t0 − (g(t0, y(t0)) − detach(·)) / (dg/dt)`` and ``y* = y(t0) + f(t0, y(t0))·(t* − t0)``, both
    zero-valued corrections whose gradients are −(∂g/∂θ)/(dg/dt) and f·dt*/dθ.
    """
    tt = problem.time(t_event)
    if not torch.is_grad_enabled():
        return tt, y_event
    # carries ∂g/∂θ through y(t0) and through tensors g closes over
    gval = g(tt, problem.unpack(y_event))
    if not isinstance(gval, torch.Tensor):  # a Python float (or numpy number) carries no gradient
        return tt, y_event
    gval = gval.sum()
    if not gval.requires_grad:
        return tt, y_event
    with torch.enable_grad():
        fe = problem.call(tt, y_event.detach()).detach()
        td = tt.clone().requires_grad_(True)
        yd = y_event.detach().requires_grad_(True)
        gd = torch.as_tensor(g(td, problem.unpack(yd)))
        gt, gy = torch.autograd.grad(gd.sum(), [td, yd], allow_unused=True)
    dgdt = (gy * fe).sum() if gy is not None else torch.zeros((), dtype=fe.dtype, device=fe.device)
    if gt is not None:
        dgdt = dgdt + gt.to(dgdt.dtype)
    dgdt = dgdt.detach()
    if float(dgdt) == 0.0:
        warnings.warn("event: g crosses zero tangentially (dg/dt = 0 at the event); the event time gets no gradient",
                      RuntimeWarning, stacklevel=3)
        return tt, y_event
    te = tt - ((gval - gval.detach()) / dgdt).to(tt.dtype)
    ye = y_event + fe * (te - tt).to(fe.dtype)
    return te, ye


def solve_with_event_adjoint(f, y0, problem, solver, sensealg, g: Callable, kw: dict):
    """Events with a continuous adjoint: locate the event without gradients, then solve with ``sensealg``
    to the event time and make that time differentiable as in the direct case."""
    from ._solve import solve

    with torch.no_grad():
        probe = solve(f, y0, problem.t.detach(), solver, event=g, **{**kw, "throw": True, "dense": False})
    if probe.event_t is None:  # no crossing: the ordinary solve
        return solve(f, y0, problem.t, solver, sensealg=sensealg, **kw)
    t_e = float(probe.event_t)
    ts = problem.t
    direction = 1.0 if (ts.numel() < 2 or float(ts[-1]) > float(ts[0])) else -1.0
    k = int(((ts.detach() - t_e) * direction <= 0).sum())  # outputs up to the event
    at_event = k > 0 and float(ts[k - 1]) == t_e
    t2 = ts[:k] if at_event else torch.cat([ts[:k], ts.new_tensor([t_e])])
    sol = solve(f, y0, t2, solver, sensealg=sensealg, **kw)
    y_e = tuple(c[-1] for c in sol.ys) if problem.is_tuple else sol.ys[-1]
    te, ye = differentiable_event(g, problem, t_e, problem.pack(y_e))
    out_ys = sol.ys if at_event else (tuple(c[:k] for c in sol.ys) if problem.is_tuple else sol.ys[:k])
    stats = dict(sol.stats)
    stats["nfe_event_search"] = probe.stats["nfe"]
    res = Solution(ts=ts[:k], ys=out_ys, retcode=ReturnCode.Terminated, stats=stats, segments=sol._segments,
                   t_reached=t_e, solver=solver)
    res.event_t, res.event_y = te, problem.unpack(ye)
    return res


def event_solve(func, y0, t0, g: Callable, reverse: bool, solver, rtol, atol, kw: dict, sensealg, extra: dict):
    """Integrate from ``t0`` until ``g(t, y)`` crosses zero: ``(event_t, states at [t0, event_t])``,
    both differentiable (the engine of torchdiffeq's ``odeint(..., event_fn=...)``)."""
    from ._solve import solve

    ref = y0[0] if isinstance(y0, (tuple, list)) else y0
    if not isinstance(t0, torch.Tensor):  # a Python number: the state's float dtype, like the output times of solve
        t0 = torch.as_tensor(t0, dtype=ref.dtype if isinstance(ref, torch.Tensor) and ref.is_floating_point() else torch.float64)
    if t0.numel() != 1:
        raise ValueError(f"t0: expected a scalar start time, got shape {tuple(t0.shape)}")
    horizon = 1e12 * (-1.0 if reverse else 1.0)
    t0 = t0.reshape(())
    t = torch.stack([t0, t0.detach() + horizon]).to(t0.dtype if t0.is_floating_point() else torch.float64)
    kw = {**kw, **extra}
    # the horizon is only a bound: the smallest step must not scale with it (float resolution of t
    # and max_steps still end a stuck solve)
    kw.setdefault("dtmin", 0.0)
    kw.setdefault("dense", False)  # never exposed here: O(1) memory in the steps
    kw.setdefault("max_steps", 100_000)
    if sensealg is not None:  # odeint_adjoint's interface: gradients reach func's adjoint_params
        kw["sensealg"] = sensealg
        kw.setdefault("adjoint_params", list(func.parameters()))
    sol = solve(func, y0, t, solver, rtol=rtol, atol=atol, event=g, **kw)
    if sol.event_t is None:
        raise RuntimeError(f"odeint_event: event_fn never crossed zero before t = {float(t[-1]):.3g} "
                           f"(the solve ended with {sol.retcode}); check the event function's sign")
    if isinstance(sol.event_y, tuple):
        ys = tuple(torch.stack([c[0], e]) for c, e in zip(sol.ys, sol.event_y))
    else:
        ys = torch.stack([sol.ys[0], sol.event_y])
    return sol.event_t, ys


def odeint_event(func: Callable, y0, t0, *, event_fn: Callable, reverse_time: bool = False, odeint_interface=None,
                 **kwargs):
    """torchdiffeq's ``odeint_event``: integrate from ``t0`` until ``event_fn(t, y)`` crosses zero.

    Returns ``(event_t, ys)`` with ``ys`` the states at ``[t0, event_t]`` (shape ``(2, *y0.shape)``).
    Backwards in time with ``reverse_time``. A vector-valued ``event_fn`` stops where its first
    component crosses zero. ``kwargs`` (``rtol``, ``atol``, ``method``, ``options``, and for
    ``odeint_interface=pn.odeint_adjoint`` its adjoint arguments) go to ``odeint_interface``
    (default :func:`pyneuralode.odeint`). Gradients reach ``event_t`` and the final state.
    """
    from .odeint import odeint

    if odeint_interface is None:
        odeint_interface = odeint
    ref = y0[0] if isinstance(y0, (tuple, list)) else y0
    if not isinstance(t0, torch.Tensor):
        t0 = torch.as_tensor(t0, dtype=ref.dtype if isinstance(ref, torch.Tensor) and ref.is_floating_point() else torch.float64)
    if t0.numel() != 1:
        raise ValueError(f"t0: expected a scalar start time, got shape {tuple(t0.shape)}")
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
