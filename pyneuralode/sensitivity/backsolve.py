"""The backsolve continuous adjoint (Chen, Rubanova, Bettencourt & Duvenaud, NeurIPS 2018)."""

from __future__ import annotations

import dataclasses

import torch

from .._loop import integrate
from ._backward_setup import backward_setup, merge_stats, run_backward
from ._base import AbstractContinuousAdjoint
from ._passes import Forward, StepBounds, step_covering
from ._vjp import VJP

__all__ = ["BacksolveAdjoint"]

_HINT = (
    ". BacksolveAdjoint re-solves the state backwards in time, which is unstable for stiff or "
    "strongly dissipative dynamics; use sensealg=pn.InterpolatingAdjoint() or "
    "pn.QuadratureAdjoint() instead"
)


class BacksolveAdjoint(AbstractContinuousAdjoint):
    """Continuous adjoint that re-solves the state backwards together with the adjoint.

    The augmented system ``[y, a, g]`` (state, adjoint ``a = ∂L/∂y``, parameter gradient) is
    integrated from the last output time back to the first; at every output time the state is
    reset to the stored forward value and ``a`` jumps by that time's cotangent. Memory does not
    grow with the number of steps (the forward pass keeps only the output states). Backsolving the
    state is unstable for stiff or strongly dissipative dynamics: use
    :class:`InterpolatingAdjoint` or :class:`QuadratureAdjoint` there.

    ``seminorm=True`` leaves the parameter-gradient channels out of the backward step-size
    control (Kidger, Chen & Lyons, ICML 2021): same gradient to tolerance, fewer backward steps.
    ``solver``, ``rtol``, ``atol`` of the backward pass default to the forward ones. First
    derivatives only (double backward raises). Counts ``nfe_adjoint``, ``naccept_adjoint``,
    ``nreject_adjoint`` in ``sol.stats``. (SciMLSensitivity: ``BacksolveAdjoint``.)
    """

    name = "BacksolveAdjoint"
    keeps_dense = False

    def __init__(self, seminorm: bool = False, solver=None, rtol=None, atol=None):
        if not isinstance(seminorm, bool):
            raise TypeError(
                f"BacksolveAdjoint(seminorm=...): expected True or False, got {seminorm!r}"
            )
        super().__init__(solver, rtol, atol)
        self.seminorm = seminorm

    # -- forward: the plain loop without a graph; only the output states are kept ----------------
    def _forward(self, problem, y0, solver, opts, stats):
        loop = integrate(
            problem.rhs(stats),
            y0,
            problem.t_list,
            solver,
            dataclasses.replace(opts, record_steps=True),
            stats,
        )
        # keep the accepted step times: each backward interval starts with the forward step that
        # covers its end
        saved = StepBounds([problem.t_list[0]] + (loop.step_ts or []))
        return Forward(torch.stack(loop.ys), dataclasses.replace(loop, step_ts=None), saved)

    # -- backward ----------------------------------------------------------------------------------
    def _backward(self, p, ys, grad_ys, m):
        problem, targets = p.problem, p.targets
        k = ys.shape[0]
        shape = ys.shape[1:]
        ny = ys[0].numel()
        ng = targets.n
        times = problem.t_list[:k]
        bsolver, bopts = backward_setup(
            self, p.solver, p.opts, ys, 2, targets.numels, dense=False, seminorm=self.seminorm
        )
        vjp = VJP(problem, targets)
        bstats: dict = {}

        def aug_rhs(t, z):
            bstats["nfe_adjoint"] = bstats.get("nfe_adjoint", 0) + 1
            y = z[:ny].view(shape)
            a = z[ny : 2 * ny].view(shape)
            fy, vy, vp = vjp(t, y, a)
            return torch.cat([fy.reshape(-1), vy.reshape(-1), *[v.reshape(-1) for v in vp]])

        z = torch.cat([ys[m].reshape(-1), grad_ys[m].reshape(-1), ys.new_zeros(ng)])
        try:
            for i in range(m, 0, -1):
                res = run_backward(
                    aug_rhs,
                    z,
                    times[i],
                    times[i - 1],
                    bsolver,
                    bopts,
                    bstats,
                    self.name,
                    _HINT,
                    n_state=2 * ny,
                    first_step=step_covering(p.saved.bounds, times[i]),
                )
                z = res.y_final.clone()
                z[:ny] = ys[i - 1].reshape(
                    -1
                )  # the stored forward state is more accurate than the backsolved one
                z[ny : 2 * ny] += grad_ys[i - 1].reshape(-1)
        finally:
            merge_stats(p.stats, bstats)
        return z[ny : 2 * ny].view(shape), (z[2 * ny :] if ng else None)
