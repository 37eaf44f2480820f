"""Forward passes that keep what an interpolating backward pass needs, and its intervals.

A forward pass keeps either the whole dense output or checkpoints (the output times plus evenly
spaced times, with the accepted step times); :func:`backward_intervals` walks the intervals back,
reading the dense output or re-solving one checkpoint interval at a time.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, NamedTuple

import numpy as np
import torch

from .._loop import LoopOptions, LoopResult, integrate
from ._backward_setup import check_pass
from ._vjp import Targets

# ---------------------------------------------------------------------------------------------
# What a forward pass keeps for its backward pass (one typed record per kind)


@dataclasses.dataclass
class DenseTrajectory:
    """The whole dense output of the forward pass."""

    segments: list


@dataclasses.dataclass
class Checkpoints:
    """States at the checkpoint ``times`` (output times merged with evenly spaced ones), the output
    index at each checkpoint (``None`` for a pure checkpoint) and the accepted step times."""

    times: list[float]
    states: list[torch.Tensor]
    output_of: list[int | None]
    step_ts: list[float] | None  #: None: a per-sample forward (no shared steps to replay)


@dataclasses.dataclass
class StepBounds:
    """The forward's first time and accepted step times (each backward interval starts with the
    forward step that covers its end)."""

    bounds: list[float]


@dataclasses.dataclass
class ThinnedCheckpoints:
    """``(step index, t, y)`` at every k-th accepted step and all accepted step times (the replay
    grid of checkpointed ``DirectAdjoint``)."""

    entries: list[tuple[int, float, torch.Tensor]]
    step_ts: list[float]


Saved = DenseTrajectory | Checkpoints | StepBounds | ThinnedCheckpoints


class Forward(NamedTuple):
    """What ``_forward`` returns: the output states, the loop result handed to the user, the
    record."""

    ys: torch.Tensor
    loop: LoopResult
    saved: Saved


@dataclasses.dataclass
class Pass:
    """What the backward pass needs from the forward pass."""

    problem: Any
    solver: Any
    opts: LoopOptions
    stats: dict
    targets: Targets
    saved: Saved


def plain_forward(problem, y0, solver, opts, stats):
    """The forward pass without a graph when nothing needs a gradient: ``(ys, loop)``."""
    loop = integrate(problem.rhs(stats), y0, problem.t_list, solver, opts, stats)
    return torch.stack(loop.ys), loop


class DenseLookup:
    """``y(t)`` from a list of dense segments (forward or backward in time)."""

    def __init__(self, segments):
        if not segments:
            raise RuntimeError("internal: dense lookup over an empty trajectory")
        self.segments = segments
        self.direction = 1.0 if segments[0].dt > 0 else -1.0
        self.keys = [s.t0 * self.direction for s in segments]

    def __call__(self, t: float) -> torch.Tensor:
        k = bisect.bisect_right(self.keys, t * self.direction) - 1
        k = min(max(k, 0), len(self.segments) - 1)
        s = self.segments[k]
        return s.evaluate((t - s.t0) / s.dt)


def checkpoint_times(t_list: list[float], n_checkpoints: int | None):
    """Output times merged with ``n_checkpoints`` evenly spaced times; the merged index of each
    output time."""
    n = n_checkpoints or 0
    if n == 0 or len(t_list) < 2:
        return list(t_list), list(range(len(t_list)))
    t0, t1 = t_list[0], t_list[-1]
    tol = 1e-9 * abs(t1 - t0)
    extra = [float(x) for x in np.linspace(t0, t1, n + 2)[1:-1]]
    extra = [x for x in extra if min(abs(x - s) for s in t_list) > tol]
    direction = 1.0 if t1 > t0 else -1.0
    merged = sorted(set(t_list) | set(extra), key=lambda x: direction * x)
    pos = {x: j for j, x in enumerate(merged)}
    return merged, [pos[x] for x in t_list]


def forward_dense(problem, y0, solver, opts, stats):
    """Forward pass keeping the whole dense output (returned to the user only if ``opts.dense``)."""
    loop = integrate(
        problem.rhs(stats), y0, problem.t_list, solver, dataclasses.replace(opts, dense=True), stats
    )
    out = loop if opts.dense else dataclasses.replace(loop, segments=None)
    return Forward(torch.stack(loop.ys), out, DenseTrajectory(loop.segments))


def forward_checkpointed(problem, y0, solver, opts, stats, n_checkpoints):
    """Forward pass keeping the states at the checkpoints (output times + ``n_checkpoints`` evenly
    spaced).

    It also keeps the accepted step times (floats: the backward re-solves replay them). When the
    user asked for dense output (``opts.dense``), the whole of it is kept anyway and the backward
    pass reads it instead of re-solving.
    """
    merged, out_index = checkpoint_times(problem.t_list, n_checkpoints)
    loop = integrate(
        problem.rhs(stats), y0, merged, solver, dataclasses.replace(opts, record_steps=True), stats
    )
    kk = len(loop.ys)
    ys = [loop.ys[j] for j in out_index if j < kk]
    out = dataclasses.replace(loop, ys=ys, step_ts=None)
    if opts.dense:
        return Forward(torch.stack(ys), out, DenseTrajectory(loop.segments))
    output_of: list[int | None] = [None] * kk
    for i, j in enumerate(out_index):
        if j < kk:
            output_of[j] = i
    return Forward(
        torch.stack(ys), out, Checkpoints(merged[:kk], list(loop.ys), output_of, loop.step_ts)
    )


def replay_grid(step_ts: list[float], t0: float, t1: float) -> list[float]:
    """The forward pass's accepted step times inside (t0, t1), framed by t0 and t1.

    Re-solving a checkpoint interval on this grid replays the forward's accepted steps: no error
    estimates, no rejections, no starting-step heuristic. Times within 1e-12 of the interval's span
    of an end are dropped (no sliver steps).
    """
    direction = 1.0 if t1 > t0 else -1.0
    margin = 1e-12 * abs(t1 - t0)

    def key(s):  # increasing along step_ts
        return direction * s

    i = bisect.bisect_right(step_ts, direction * t0 + margin, key=key)
    j = bisect.bisect_left(step_ts, direction * t1 - margin, key=key)
    return [t0] + step_ts[i:j] + [t1]


def step_covering(starts_ends: list[float], t: float) -> float | None:
    """Length of the forward step ``[s_k, s_k+1]`` (from the sorted-in-direction step times) that
    ends at or covers ``t``."""
    if len(starts_ends) < 2:
        return None
    direction = 1.0 if starts_ends[-1] > starts_ends[0] else -1.0
    k = bisect.bisect_left(starts_ends, direction * t, key=lambda s: direction * s)
    k = min(max(k, 1), len(starts_ends) - 1)
    return abs(starts_ends[k] - starts_ends[k - 1])


def backward_intervals(p: Pass, m: int, bstats: dict, who: str):
    """Yield ``(t_hi, t_lo, lookup, out_lo, h_first)`` from output ``m`` back to the first time.

    ``lookup`` gives the forward state over [t_lo, t_hi] (the stored dense output, or a re-solve
    from the checkpoint at ``t_lo`` that replays the forward's accepted steps — adaptive for a
    multistep solver — counted as ``nfe_recompute``); ``out_lo`` is the output index at ``t_lo``
    (its cotangent is added there)
    or ``None`` for a pure checkpoint; ``h_first`` is the length of the forward step that covers
    ``t_hi``: the backward pass starts with it instead of a starting-step heuristic (which costs
    two adjoint evaluations).
    """
    problem = p.problem
    saved = p.saved
    if isinstance(saved, DenseTrajectory):
        segs = saved.segments
        lookup = DenseLookup(segs)
        bounds = [s.t0 for s in segs] + [segs[-1].t0 + segs[-1].dt] if segs else []
        times = problem.t_list
        for i in range(m, 0, -1):
            yield times[i], times[i - 1], lookup, i - 1, step_covering(bounds, times[i])
        return
    times, states, output_of, step_ts = saved.times, saved.states, saved.output_of, saved.step_ts
    bounds = [times[0]] + list(step_ts or ())
    # A multistep method restarts from a checkpoint without its history, so it cannot replay the
    # forward's steps (they were taken at a higher order): it re-solves adaptively, to the
    # tolerance; so does a per-sample forward (no shared steps: ``step_ts`` is None).
    replay = step_ts is not None and not getattr(p.solver, "multistep", False)
    for j in range(output_of.index(m), 0, -1):
        rstats: dict = {}
        grid = replay_grid(step_ts, times[j - 1], times[j]) if replay else None
        fopts = dataclasses.replace(p.opts, dense=True, progress=False, grid=grid)
        floop = integrate(
            problem.rhs(bstats, key="nfe_recompute"),
            states[j - 1],
            [times[j - 1], times[j]],
            p.solver,
            fopts,
            rstats,
        )
        check_pass(floop, f"{who}: re-solving the state from the checkpoint at t={times[j - 1]:g}")
        lookup = DenseLookup(floop.segments)
        del floop
        yield times[j], times[j - 1], lookup, output_of[j - 1], step_covering(bounds, times[j])
        del lookup  # this interval's dense output is freed before the next re-solve
