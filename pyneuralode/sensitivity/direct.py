"""Backpropagation through the solver's operations (discretise-then-optimise), optionally
checkpointed."""

from __future__ import annotations

import dataclasses

import torch

from .._loop import integrate
from ._backward_setup import check_pass, merge_stats
from ._base import AbstractAdjoint
from ._passes import Forward, ThinnedCheckpoints, plain_forward, replay_grid
from ._vjp import flat_cat

__all__ = ["DirectAdjoint"]


class DirectAdjoint(AbstractAdjoint):
    """Differentiate the computed solution exactly with torch autograd through every step.

    Exact gradient of the discrete solution (including step-size control, which is treated as
    constant). The default ``sensealg``. (SciMLSensitivity: the role of ``ReverseDiffAdjoint``/
    ``ZygoteAdjoint``.)

    ``checkpoints=None`` (default): autograd keeps the graph of every step; memory grows linearly
    with the steps; double backward works.

    ``checkpoints=M``: the forward pass runs without a graph and keeps at most ``M`` states at
    evenly thinned accepted steps (every k-th, k doubling whenever M would be exceeded) plus the
    accepted step times. The backward pass replays one segment between kept states at a time, on
    the forward's own step times (so the very same steps), with autograd, and backpropagates
    through it. Same gradient as the default to rounding; memory: ``M`` states plus the graph of
    about ``2·steps/M`` steps — ``M ≈ sqrt(2·steps)`` balances the two; cost: one extra forward
    solve (with graph). As with the continuous adjoints, gradients reach ``y0``, ``t``, tensors in
    ``args``, ``solve(..., adjoint_params=...)`` (default: the parameters of the modules f reaches);
    another tensor f reaches that requires grad raises ``ValueError``. First derivatives only;
    no dense output by default (``dense=True`` keeps
    it, without a graph: ``sol(tq)`` then carries no gradient). The checkpoint-and-recompute idea of
    diffrax's ``RecursiveCheckpointAdjoint``, with two levels instead of a binomial schedule.
    """

    @property
    def name(self) -> str:  # type: ignore[override]
        return (
            "DirectAdjoint"
            if self.checkpoints is None
            else f"DirectAdjoint(checkpoints={self.checkpoints})"
        )

    @property
    def keeps_dense(self) -> bool:  # type: ignore[override]
        return (
            self.checkpoints is None
        )  # checkpointed: dense output would grow with the steps (dense=True keeps it)

    def __init__(self, checkpoints: int | None = None):
        if checkpoints is not None and (
            not isinstance(checkpoints, int) or isinstance(checkpoints, bool) or checkpoints < 2
        ):
            raise ValueError(
                "DirectAdjoint(checkpoints=...): expected None (keep the whole graph) or an int "
                f">= 2, got {checkpoints!r}"
            )
        super().__init__()
        self.checkpoints = checkpoints

    def run(self, problem, y0, solver, opts, stats):
        if self.checkpoints is None:  # the whole graph: autograd differentiates every step
            return plain_forward(problem, y0, solver, opts, stats)
        if getattr(solver, "multistep", False):
            raise ValueError(
                f"DirectAdjoint(checkpoints={self.checkpoints}): {type(solver).__name__} is a "
                "multistep method whose history a stored state cannot restore, so a replayed "
                "segment would not be the computed solution; use DirectAdjoint() or "
                "InterpolatingAdjoint() with it"
            )
        return super().run(problem, y0, solver, opts, stats)

    # -- checkpointed: forward without a graph, keeping thinned states -----------------------------
    def _forward(self, problem, y0, solver, opts, stats):
        kept = _ThinnedStates(self.checkpoints, problem.t_list[0], y0)
        loop = integrate(
            problem.rhs(stats),
            y0,
            problem.t_list,
            solver,
            dataclasses.replace(opts, record_steps=True, on_accept=kept.add),
            stats,
        )
        return Forward(
            torch.stack(loop.ys),
            dataclasses.replace(loop, step_ts=None),
            ThinnedCheckpoints(kept.entries, loop.step_ts),
        )

    # -- checkpointed: replay each segment with autograd, last to first
    # -----------------------------
    def _backward(self, p, ys, grad_ys, m):
        problem, targets = p.problem, p.targets
        ng = targets.n
        entries, step_ts = p.saved.entries, p.saved.step_ts
        times = problem.t_list[: ys.shape[0]]
        direction = 1.0 if times[-1] > times[0] else -1.0
        bounds = [t for _, t, _ in entries]
        states = [y for _, _, y in entries]
        if step_ts and step_ts[-1] != bounds[-1]:
            bounds.append(step_ts[-1])  # the last segment ends where the forward ended
        # the segments to replay: up to the one that holds the last output with a cotangent
        last = next(j for j in range(1, len(bounds)) if direction * (bounds[j] - times[m]) >= 0)
        args, leaves = targets.leaf_args(problem)
        wrt = targets.params + leaves
        bstats: dict = {}
        rhs = problem.rhs(bstats, key="nfe_recompute", args=args)
        base = dataclasses.replace(
            p.opts, dense=False, progress=False, record_steps=False, on_accept=None
        )
        a: torch.Tensor | None = None  # cotangent of the state at the current segment's end
        g = ys.new_zeros(ng) if ng else None
        try:
            for j in range(last, 0, -1):
                ta, tb = bounds[j - 1], bounds[j]
                inside: list[int] = [
                    i
                    for i in range(1, m + 1)
                    if direction * (times[i] - ta) > 0 and direction * (times[i] - tb) < 0
                ]
                at_end = [i for i in range(1, m + 1) if times[i] == tb]
                t_out = [ta] + [times[i] for i in inside] + [tb]
                rstats: dict = {}
                with torch.enable_grad():
                    ya = states[j - 1].detach().requires_grad_(True)
                    loop = integrate(
                        rhs,
                        ya,
                        t_out,
                        p.solver,
                        dataclasses.replace(base, grid=replay_grid(step_ts, ta, tb)),
                        rstats,
                    )
                    check_pass(
                        loop,
                        f"DirectAdjoint(checkpoints={self.checkpoints}): replaying the steps "
                        f"on [{min(ta, tb):g}, {max(ta, tb):g}]",
                        ok=len(loop.ys) == len(t_out),
                    )
                    outs = [loop.ys[1 + k] for k in range(len(inside))]
                    cots = [grad_ys[i] for i in inside]
                    cot_end = a
                    for i in at_end:
                        cot_end = grad_ys[i] if cot_end is None else cot_end + grad_ys[i]
                    if cot_end is not None:
                        outs.append(loop.ys[-1])
                        cots.append(cot_end)
                    grads = torch.autograd.grad(
                        outs,
                        [ya] + wrt,
                        grad_outputs=cots,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                del loop, outs
                a = grads[0]
                if ng:
                    g += flat_cat(grads[1:]).to(g.dtype)
        finally:
            merge_stats(p.stats, bstats)
        return a + grad_ys[0], g


class _ThinnedStates:
    """At most ``limit`` (step index, t, y) entries at every k-th accepted step, k doubling as
    needed.

    Entry 0 is the initial state. When an addition would exceed ``limit`` the stride doubles and
    the entries off the new stride are dropped, so ``limit/2 < len ≤ limit`` once thinning starts.
    """

    def __init__(self, limit: int, t0: float, y0: torch.Tensor):
        self.limit = limit
        self.stride = 1
        self.n = 0
        self.entries = [(0, t0, y0)]

    def add(self, t: float, y: torch.Tensor) -> None:
        self.n += 1
        if self.n % self.stride:
            return
        self.entries.append((self.n, t, y))
        if len(self.entries) > self.limit:
            self.stride *= 2
            self.entries = [e for e in self.entries if e[0] % self.stride == 0]
