"""Terminal events: stop a solve where ``g(t, y)`` crosses zero, with a differentiable event time.

``pn.solve(f, y0, t, event=g)`` checks the sign of ``g`` after every accepted step; on a sign
change it locates the root on the step's dense output (Illinois regula falsi, to float
resolution in t), saves the outputs up to the event and ends with ``retcode == "Terminated"``,
``sol.event_t`` and ``sol.event_y``. Gradients reach the event time through the implicit function
theorem, dt*/dθ = −(∂g/∂θ) / (dg/dt along the trajectory), applied as one zero-valued Newton
correction around the located root (the approach of torchdiffeq's ``odeint_event``; Chen, Amos &
Nickel, "Learning neural event functions for ordinary differential equations", ICLR 2021).

This module holds the mechanics (the loop's hook and the differentiable event); ``solve`` uses
them, and torchdiffeq's interface (``odeint(..., event_fn=...)``, :func:`pyneuralode.odeint_event`)
builds on ``solve``, so nothing here imports either.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

__all__: list = []

_MAX_ROOT_ITERS = 200


class EventLocator:
    """The loop's ``event`` hook: sign change of ``g`` over an accepted step, root on its dense
    output."""

    def __init__(self, g: Callable, problem):
        self.g = g
        self.problem = problem
        self.g_prev: float | None = None

    def value(self, t: float, y: torch.Tensor) -> float:
        out = self.g(self.problem.time(t), self.problem.unpack(y))
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if out.numel() != 1:
            raise ValueError(
                f"event: g(t, y) must return a scalar (one number), got shape {tuple(out.shape)}; "
                "reduce it, e.g. return y[..., 0].min()"
            )
        v = float(out.detach())
        if not math.isfinite(v):
            raise ValueError(
                f"event: g(t, y) returned {v} at t={t:.6g}; it must be finite along the trajectory"
            )
        return v

    def __call__(self, seg, t: float, t_new: float, y_new: torch.Tensor) -> float | None:
        with torch.no_grad():
            if (
                self.g_prev is None
            ):  # g at the start; 0 means "on the surface: wait until g leaves zero"
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
        """θ ∈ (0, 1] with g(t + θ dt, y(θ)) = 0 by the Illinois method (bracketing,
        superlinear)."""
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

    ``t* = t0 − (g(t0, y(t0)) − detach(·)) / (dg/dt)`` and ``y* = y(t0) + f(t0, y(t0))·(t* − t0)``,
    both
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
        warnings.warn(
            "event: g crosses zero tangentially (dg/dt = 0 at the event); the event time gets no "
            "gradient",
            RuntimeWarning,
            stacklevel=3,
        )
        return tt, y_event
    te = tt - ((gval - gval.detach()) / dgdt).to(tt.dtype)
    ye = y_event + fe * (te - tt).to(fe.dtype)
    return te, ye
