"""Gradients of steady states / fixed points ``z* = f(z*, x; θ)``: implicit and phantom.

The implicit function theorem gives, for a loss ``L(z*)``,
``∂L/∂(x, θ) = gᵀ ∂f/∂(x, θ)`` with ``(I − ∂f/∂z)ᵀ g = ∂L/∂z*`` at ``z*``. The linear system is
solved matrix-free with vector–Jacobian products of one saved evaluation ``f(z*)``: no forward
iterate is stored. This module is the single implementation used by
:func:`pyneuralode.steady_state` and :class:`pyneuralode.DEQ`.

Each gradient method is an :class:`~._base.AbstractImplicitGradient`: ``attach(f, z_star, args,
info) -> z`` (called with grad enabled after the forward solve, under which ``z_star`` was computed
without a graph) returns a tensor with the value of ``z_star`` whose backward applies the method;
it records its costs in ``info``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from .._arguments import check_tolerance
from .._solution import ReturnCode
from ..solvers.linear.gmres import gmres
from ._base import AbstractImplicitGradient

__all__ = ["SteadyStateAdjoint", "PhantomGradient", "jacobian_regularization"]

_LINSOLVES = ("gmres", "fixed_point", "anderson")


class SteadyStateAdjoint(AbstractImplicitGradient):
    """Implicit (steady-state adjoint) gradient of ``z* = f(z*, *args)``.

    Solves ``(I − ∂f/∂z)ᵀ g = ∂L/∂z*`` matrix-free with VJPs of one saved evaluation of ``f`` at
    ``z*``, then one more VJP gives the gradients of ``args`` tensors and of every parameter
    ``f`` uses (module parameters or closed-over tensors). Memory: one evaluation graph,
    independent of the forward iteration count. ``linsolve``:

    * ``"gmres"`` (default): restarted GMRES(``restart``), one Krylov space per sample when the
      state is batched (``batch_dim=0``; the DEQ layer); needs only that ``I − ∂f/∂z`` is
      non-singular;
    * ``"fixed_point"``: ``g ← ∂L/∂z* + (∂f/∂z)ᵀ g``; converges iff ρ(∂f/∂z) < 1 (locuslab/deq's
      backward hook);
    * ``"anderson"``: Anderson acceleration (memory ``m``) of that iteration.

    Stops when ``‖(I − Jᵀ) g − ∂L/∂z*‖₂ <= max(atol, rtol·‖∂L/∂z*‖₂)`` (per sample for GMRES;
    default ``rtol = √eps`` of the dtype, as LinearSolve.jl: 3.5e-4 in float32, 1.5e-8 in float64)
    or after ``max_iters`` VJPs; then warns (``throw=False``, the default: training goes on with the
    inexact gradient) or raises ``RuntimeError`` (``throw=True``). A solve that overflows (a
    non-finite sample, or a non-finite residual: ``I − ∂f/∂z`` singular at ``z*``, or a diverging
    ``"fixed_point"`` iteration) never passes NaN or garbage on: with ``throw=False`` it warns and
    those samples (all, for a non-finite residual) take the Jacobian-free gradient
    ``g = ∂L/∂z*`` (as ``PhantomGradient(k=1, damping=1)``; ``bwd_retcode`` ``Unstable``).
    Costs land in
    ``info``/``pn.last_stats``: ``bwd_iterations`` (VJPs in linear solves), ``bwd_residual``,
    ``bwd_retcode``. First derivatives only: a second derivative (``create_graph=True`` then
    differentiating again) raises ``RuntimeError``. SciMLSensitivity:
    ``SteadyStateAdjoint(linsolve=KrylovJL_GMRES())``.
    """

    name = "SteadyStateAdjoint"

    def __init__(
        self,
        linsolve: str = "gmres",
        *,
        rtol: float | None = None,
        atol: float = 0.0,
        max_iters: int = 200,
        restart: int = 50,
        m: int = 5,
        throw: bool = False,
    ):
        if linsolve not in _LINSOLVES:
            raise ValueError(
                f"linsolve: unknown {linsolve!r}; use one of "
                f"{', '.join(repr(s) for s in _LINSOLVES)}"
            )
        rtol = check_tolerance("rtol", rtol, none="√eps of the dtype")
        atol = check_tolerance("atol", atol)
        for nm, v in (("max_iters", max_iters), ("restart", restart), ("m", m)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm}: expected a positive int, got {v!r}")
        self.rtol = rtol
        self.atol = atol
        self.linsolve = linsolve
        self.max_iters = max_iters
        self.restart = restart
        self.m = m
        self.throw = bool(throw)

    def attach(self, f: Callable, z_star: torch.Tensor, args: Sequence, info) -> torch.Tensor:
        z_ = z_star.detach().requires_grad_(True)
        with torch.enable_grad():
            fz = f(z_, *args)
        if info is not None:
            info.nfe_grad += 1
        if not fz.requires_grad or not _depends_on_other_than(fz, z_):
            return z_star.detach()
        holder = _Saved(fz, z_, self, info)
        return _Implicit.apply(fz, z_star.detach(), holder)

    def solve_adjoint(self, JT: Callable, v: torch.Tensor, info=None, batch: int = 1):
        """Solve ``g − JT(g) = v``; returns ``(g, iterations, residual, converged)``."""
        rtol = math.sqrt(torch.finfo(v.dtype).eps) if self.rtol is None else self.rtol
        if not bool(v.any()):
            return torch.zeros_like(v), 0, 0.0, True
        vnorm = float(v.double().norm())  # float64: a float32 norm of tiny entries underflows to 0
        tol = max(self.atol, rtol * vnorm)
        if self.linsolve == "gmres":  # per-sample Krylov spaces when batched
            res = gmres(
                lambda g: g - JT(g),
                v,
                rtol=rtol,
                atol=self.atol,
                restart=self.restart,
                maxiter=self.max_iters,
                batch=batch,
            )
            return res.x, res.iterations, res.residual, res.converged
        if self.linsolve == "fixed_point":
            g = v.clone()
            r = math.inf
            for it in range(1, self.max_iters + 1):
                g_new = v + JT(g)
                r = float((g_new - g).norm())  # = ‖v − (I − Jᵀ) g‖ at the previous iterate
                g = g_new
                if r <= tol or not math.isfinite(r):
                    return g, it, r, r <= tol
            return g, self.max_iters, r, False
        from ..steady.solvers import Anderson

        class _I:  # minimal info for the Anderson core
            nfe = 0
            iterations = 0
            residual = math.inf
            retcode = None
            message = ""

        rec = _I()

        def check(g, phi_g):
            r = float((phi_g - g).norm())
            return r <= tol, r

        g = Anderson(m=self.m, max_iters=self.max_iters).solve(
            lambda g: v + JT(g), v.clone(), check, rec, batch
        )
        return g, rec.nfe, rec.residual, bool(rec.retcode is not None and rec.retcode.successful)


def _depends_on_other_than(out: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether the graph of ``out`` reaches a leaf requiring grad other than ``z``."""
    seen = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and var is not z:
            return True
        stack.extend(nf for nf, _ in node.next_functions)
    return False


class _Saved:
    __slots__ = ("fz", "z", "alg", "info")

    def __init__(self, fz, z, alg, info):
        self.fz, self.z, self.alg, self.info = fz, z, alg, info


class _Implicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fz, z_star, holder):
        ctx.holder = holder
        return z_star.clone()

    @staticmethod
    def backward(ctx, v):
        h = ctx.holder
        fz, z_, alg, info = h.fz, h.z, h.alg, h.info
        with torch.enable_grad():

            def JT(g):
                out = torch.autograd.grad(fz, z_, g, retain_graph=True, allow_unused=True)[0]
                return torch.zeros_like(g) if out is None else out

            batch = getattr(info, "batch", 1) if info is not None else 1
            g, iters, resid, ok = alg.solve_adjoint(JT, v.detach(), info, batch)
        # an overflow: a non-finite sample, or a non-finite residual (a diverged iteration whose
        # iterate may still be finite, e.g. 1e154 once its norm overflowed): which sample is
        # unknown then, so all take the fallback
        finite = torch.isfinite(g.reshape(batch, -1)).all(1) & math.isfinite(resid)
        n_bad = int((~finite).sum())
        if info is not None:
            info.record_backward(iters, resid, ok and n_bad == 0)
            if n_bad:
                info.bwd_retcode = ReturnCode.Unstable
        if n_bad:
            msg = (
                f"SteadyStateAdjoint({alg.linsolve!r}): the linear solve overflowed (a non-finite "
                f"result for {n_bad} of {batch} sample(s), residual {resid:.3g}): I − ∂f/∂z is "
                "singular at z* or its iteration diverges"
            )
            if alg.throw:
                raise RuntimeError(
                    msg + ". Tighten the forward tolerances, regularise the Jacobian "
                    "(pn.jacobian_regularization) or use sensealg=pn.PhantomGradient()"
                )
            # the Jacobian-free gradient (g = ∂L/∂z*, PhantomGradient(k=1, damping=1)) for them
            g = torch.where(finite[:, None], g.reshape(batch, -1), v.reshape(batch, -1))
            g = g.reshape(v.shape)
            warnings.warn(
                msg + "; those samples use the Jacobian-free gradient (g = ∂L/∂z*, as "
                "PhantomGradient(k=1, damping=1)). Tighten the forward tolerances, regularise "
                "the Jacobian (pn.jacobian_regularization) or use sensealg=pn.PhantomGradient()",
                RuntimeWarning,
                stacklevel=2,
            )
        elif not ok:
            msg = (
                f"SteadyStateAdjoint({alg.linsolve!r}) did not converge in {alg.max_iters} "
                "iterations "
                f"(residual {resid:.3g}); the gradient is inexact. Tighten the forward tolerances, "
                "raise max_iters, use linsolve='gmres', or regularise the Jacobian "
                "(pn.jacobian_regularization)"
            )
            if alg.throw:
                raise RuntimeError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if torch.is_grad_enabled():  # create_graph=True: first derivatives only (_DOUBLE_BACKWARD)
            from ._adjoint import _FirstOrderOnly

            depends = [fz] + ([v] if v.requires_grad else [])
            g = _FirstOrderOnly.apply(_DOUBLE_BACKWARD, g.detach(), *depends)
        return g, None, None


#: g (the adjoint solution) comes from a linear solve without a graph, and the gradient of the
#: parameters it feeds is taken at the fixed point as a constant: every second-order term through
#: z*(θ) and g(θ) would be missing (d²z*/dw² = 3.556 instead of 8.296 for w²z + x)
_DOUBLE_BACKWARD = (
    "differentiating twice through SteadyStateAdjoint (the implicit gradient of a steady state "
    "or DEQ) is not supported: its backward pass solves a linear system without a graph, so a "
    "second derivative would be wrong. For higher-order derivatives use "
    "sensealg=pn.PhantomGradient(k) (differentiable unrolled steps, an approximation), or "
    "differentiate an unrolled fixed-point iteration"
)


class PhantomGradient(AbstractImplicitGradient):
    """Inexact "phantom" gradient: ``k`` damped unrolled steps ``z ← (1−λ) z + λ f(z)`` from ``z*``.

    Backpropagates through those ``k`` steps only (memory ``k`` evaluation graphs, ``k`` VJPs);
    the returned value is the ``k``-th step (as in TorchDEQ), so it differs from ``z*`` by at
    most the forward residual. Reference: Geng et al. (NeurIPS 2021), "On training implicit
    models"; TorchDEQ's default (``grad=1``).
    """

    name = "PhantomGradient"

    def __init__(self, k: int = 5, damping: float = 0.5):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int (number of unrolled steps), got {k!r}")
        if not isinstance(damping, (int, float)) or not (0 < damping <= 1):
            raise ValueError(f"damping: must be in (0, 1], got {damping!r}")
        self.k = k
        self.damping = float(damping)

    def attach(self, f, z_star, args, info):
        z = z_star.detach()
        lam = self.damping
        with torch.enable_grad():
            for _ in range(self.k):
                fz = f(z, *args)
                z = fz if lam == 1.0 else (1 - lam) * z + lam * fz
        if info is not None:
            info.nfe_grad += self.k
            info.bwd_iterations += self.k
            info.nbackward += 1
        return z


def jacobian_regularization(
    f: Callable,
    z: torch.Tensor,
    args: Sequence = (),
    *,
    n_samples: int = 1,
    normalize: bool = True,
    create_graph: bool = True,
) -> torch.Tensor:
    """Hutchinson estimate of ``‖∂f/∂z‖²_F`` at ``z`` (Bai, Koltun, Kolter, ICML 2021).

    ``E_v ‖vᵀ ∂f/∂z‖²`` with ``v ~ N(0, I)``, averaged over ``n_samples`` probes; divided by the
    number of state elements when ``normalize`` (as in locuslab/deq's ``jac_loss_estimate``).
    Differentiable w.r.t. the parameters of ``f`` (``create_graph=True``): add ``weight · this``
    to the training loss to keep the fixed-point map well conditioned (fewer solver iterations).
    ``z`` is detached: the estimate is taken *at* the given point (usually ``z*``).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples: expected a positive int, got {n_samples!r}")
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(
            "z: expected a floating-point tensor (the point where the Jacobian is taken)"
        )
    z_ = z.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = f(z_, *args)
        total = fz.new_zeros(())
        for i in range(n_samples):
            v = torch.randn_like(fz)
            vJ = torch.autograd.grad(
                fz,
                z_,
                v,
                retain_graph=i < n_samples - 1 or create_graph,
                create_graph=create_graph,
                allow_unused=True,
            )[0]
            if vJ is not None:
                total = total + vJ.pow(2).sum()
    est = total / n_samples
    return est / z.numel() if normalize else est
