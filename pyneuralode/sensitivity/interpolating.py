"""The interpolating (optionally checkpointed) continuous adjoint (SciMLSensitivity's
``InterpolatingAdjoint``)."""

from __future__ import annotations

import torch

from ._backward_setup import backward_setup, merge_stats, run_backward
from ._base import AbstractContinuousAdjoint
from ._passes import backward_intervals, forward_checkpointed, forward_dense
from ._validation import check_checkpointing
from ._vjp import VJP

__all__ = ["InterpolatingAdjoint"]


class InterpolatingAdjoint(AbstractContinuousAdjoint):
    """Continuous adjoint integrated over an interpolation of the forward trajectory.

    Only the adjoint and the parameter gradient ``[a, g]`` are integrated backwards; the state is
    read from dense output instead of being backsolved, so it stays accurate where backsolving the
    state is unstable (stiff or dissipative dynamics).

    ``checkpointing=True`` (default): the forward pass stores the states at the checkpoints only
    — every output time plus ``n_checkpoints`` evenly spaced times — and the backward pass
    re-solves the state forward from the nearest checkpoint with dense output over one checkpoint
    interval at a time, replaying the forward's accepted steps (no error control, no rejections).
    Memory: the checkpoints plus the dense output of one interval (no autograd graph) and one
    float per accepted forward step; cost: one extra forward solve. Each backward interval starts
    with the forward step that covers its end. ``checkpointing=False``: the forward pass keeps its
    whole dense output (memory grows with the steps, state-sized per step) and nothing is
    re-solved. ``seminorm=True`` leaves the parameter channels out of the backward error norm.
    ``solver``, ``rtol``, ``atol`` of the backward pass default to the forward ones. Counts
    ``nfe_adjoint`` (adjoint right-hand sides), ``nfe_recompute`` (checkpoint re-solves),
    ``naccept_adjoint``, ``nreject_adjoint`` in ``sol.stats``. First derivatives only.
    (SciMLSensitivity: ``InterpolatingAdjoint(checkpointing=true)``.)
    """

    name = "InterpolatingAdjoint"
    keeps_dense = False

    def __init__(
        self,
        checkpointing: bool = True,
        n_checkpoints=None,
        solver=None,
        rtol=None,
        atol=None,
        seminorm: bool = False,
    ):
        check_checkpointing("InterpolatingAdjoint", checkpointing, n_checkpoints)
        if not isinstance(seminorm, bool):
            raise TypeError(
                f"InterpolatingAdjoint(seminorm=...): expected True or False, got {seminorm!r}"
            )
        super().__init__(solver, rtol, atol)
        self.checkpointing = checkpointing
        self.n_checkpoints = n_checkpoints
        self.seminorm = seminorm

    # -- forward -----------------------------------------------------------------------------------
    def _forward(self, problem, y0, solver, opts, stats):
        if not self.checkpointing:
            return forward_dense(problem, y0, solver, opts, stats)
        return forward_checkpointed(problem, y0, solver, opts, stats, self.n_checkpoints)

    # -- backward ----------------------------------------------------------------------------------
    def _backward(self, p, ys, grad_ys, m):
        problem, targets = p.problem, p.targets
        shape = ys.shape[1:]
        ny = ys[0].numel()
        ng = targets.n
        bsolver, bopts = backward_setup(
            self, p.solver, p.opts, ys, 1, targets.numels, dense=False, seminorm=self.seminorm
        )
        vjp = VJP(problem, targets)
        bstats: dict = {}
        lookup_box = [None]

        def adj_rhs(t, z):
            bstats["nfe_adjoint"] = bstats.get("nfe_adjoint", 0) + 1
            y = lookup_box[0](t)
            _, vy, vp = vjp(t, y, z[:ny].view(shape))
            return torch.cat([vy.reshape(-1), *[v.reshape(-1) for v in vp]])

        z = torch.cat([grad_ys[m].reshape(-1), ys.new_zeros(ng)])
        try:
            for t_hi, t_lo, lookup, out_lo, h_first in backward_intervals(p, m, bstats, self.name):
                lookup_box[0] = lookup
                z = run_backward(
                    adj_rhs,
                    z,
                    t_hi,
                    t_lo,
                    bsolver,
                    bopts,
                    bstats,
                    self.name,
                    n_state=ny,
                    first_step=h_first,
                ).y_final.clone()
                lookup_box[0] = lookup = None
                if out_lo is not None:
                    z[:ny] += grad_ys[out_lo].reshape(-1)
        finally:
            merge_stats(p.stats, bstats)
        return z[:ny].view(shape), (z[ny:] if ng else None)
