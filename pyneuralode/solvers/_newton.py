"""Simplified Newton iterations of the implicit methods (ESDIRK stages, QNDF steps): the stopping
tolerance, the setup (a Jacobian held fixed), and the ``(f, solve, norm)`` triples on flat tensors
or, for the host steps, flat numpy arrays."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .linear import LinearOptions, WOperator, w_operator


def newton_tolerance(kappa: float, rtol, dtype: torch.dtype) -> float:
    """The Newton stopping tolerance κ (on the tolerance-scaled norm), floored at ``10·eps/rtol``
    (Hairer & Wanner's RADAU5: ``FNEWT ≥ 10·UROUND/RTOL``): below it a correction is rounding noise,
    the contraction rate θ reads ≈ 1, and the iteration would be called divergent. Matters in
    float32 (rtol 1e-4: 0.012 > κ = 0.01); in float64 the floor is far below κ."""
    r = float(rtol.min()) if isinstance(rtol, torch.Tensor) else float(rtol)
    if not r > 0:
        return kappa
    return max(kappa, 10.0 * torch.finfo(dtype).eps / r)


def newton_setup(solver, rhs, t0: float, y0: torch.Tensor, stats: dict):
    """``(WOperator, f(t0, y0))`` for a Newton-based method (ESDIRK, QNDF): the Jacobian formed at
    ``(t0, y0)`` and held fixed (not differentiated); zeroed Newton counters in ``stats``."""
    for k in ("njac", "nlu", "nsolve", "nnewton", "nconvfail"):
        stats.setdefault(k, 0)
    ls = w_operator(LinearOptions.of(solver), rhs, y0, stats, differentiable_jac=False)
    f0 = ls.set_point(t0, y0)
    if f0 is None or torch.is_grad_enabled():
        f0 = rhs(t0, y0)  # (under autograd: keep the graph to y0 and the parameters)
    return ls, f0


def host_weighted_rms(x: np.ndarray, scale, inv_sqrt_n: float) -> float:
    """:func:`weighted_rms` on flat numpy arrays (``inv_sqrt_n = 1/√n``): the host steps' Newton
    norm and QNDF's order-selection norms."""
    r = x / scale
    return math.sqrt(float(np.vdot(r, r))) * inv_sqrt_n


def host_newton_fns(rhs: Callable, t: float, scale: np.ndarray, shape):
    """``(f_of, norm)`` on flat numpy arrays for the Newton iterations of the host steps: ``f(t,
    ·)`` (f gets and returns tensors, zero-copy) and the tolerance-scaled RMS norm; the numpy
    counterpart of :func:`torch_newton_fns` (the linear solve is :meth:`WOperator.host_solver`).
    A 1-D state skips the view and reshape."""
    from_numpy = torch.from_numpy
    if len(shape) == 1:

        def f_of(v):
            return rhs(t, from_numpy(v)).numpy()
    else:
        shape = tuple(shape)  # view() parses a tuple of ints faster than a torch.Size

        def f_of(v):
            return rhs(t, from_numpy(v).view(shape)).reshape(-1).numpy()

    inv_sqrt_n = 1.0 / math.sqrt(max(math.prod(shape), 1))

    def norm(dz):  # host_weighted_rms written out: one frame less on every Newton iteration
        r = dz / scale
        return math.sqrt(float(np.vdot(r, r))) * inv_sqrt_n

    return f_of, norm


def weighted_rms(x: torch.Tensor, scale) -> float:
    """RMS norm of ``x / scale`` as a Python float (the Newton convergence norm)."""
    with torch.no_grad():
        r = x.detach() / scale
        return float(torch.linalg.vector_norm(r)) / math.sqrt(max(r.numel(), 1))


def torch_newton_fns(rhs: Callable, t: float, scale: torch.Tensor, shape):
    """``(f_of, norm)`` on flat tensors for a simplified Newton iteration at time ``t``: ``f(t, ·)``
    and the tolerance-scaled RMS norm."""
    scale = scale.reshape(-1)
    flat = len(shape) == 1
    shape = tuple(shape)  # view() parses a tuple of ints faster than a torch.Size

    def f_of(v):
        return rhs(t, v) if flat else rhs(t, v.view(shape)).reshape(-1)

    def norm(dx):
        return weighted_rms(dx, scale)

    return f_of, norm


def torch_linear_solver(ls: WOperator, shape):
    """``b ↦ W⁻¹ b`` on flat tensors (``None`` when GMRES did not converge)."""
    flat = len(shape) == 1
    shape = tuple(shape)

    def solve(b):
        x = ls.solve(b if flat else b.view(shape))
        x = x if flat else x.reshape(-1)
        return x if ls.converged else None

    return solve


def newton_ops(rhs: Callable, t: float, ls: WOperator, scale: torch.Tensor, shape):
    """``(f_of, solve, norm)`` on flat tensors for a simplified Newton iteration at time ``t``:
    :func:`torch_newton_fns` and :func:`torch_linear_solver`."""
    f_of, norm = torch_newton_fns(rhs, t, scale, shape)
    return f_of, torch_linear_solver(ls, shape), norm
