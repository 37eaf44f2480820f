"""Per-sample output times: ``t`` shaped ``(B, T)`` for a batch ``y0`` shaped ``(B, ...)``.

The batch is solved once on the union of all times (output times never force steps, so the union
costs interpolations, not steps), then each sample's states are gathered at its own times:
``ys[j, b]`` is sample ``b`` at ``t[b, j]``. All rows start at the same time (the batch shares its
initial time); torchdiffeq users otherwise build this union by hand (torchdiffeq #43, #122).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch


def is_per_sample(y0, t) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.ndim == 2
        and isinstance(y0, torch.Tensor)
        and y0.ndim >= 1
        and t.shape[0] == y0.shape[0]
        and t.shape[0] > 0
    )


def union_times(t: torch.Tensor):
    """Validate per-sample times; return ``(union, index)`` with ``union[index[b, j]] == t[b,
    j]``."""
    if t.requires_grad:
        raise ValueError(
            "t: gradients with respect to per-sample output times are not supported; pass "
            "t.detach() "
            "(or a 1-D t shared by the batch)"
        )
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.shape[1] == 0:
        raise ValueError("t: per-sample times (B, T) need T >= 1")
    if not torch.isfinite(t).all():
        raise ValueError("t: contains NaN or Inf; every output time must be finite")
    if not torch.equal(t[:, 0], t[:1, 0].expand(t.shape[0])):
        raise ValueError(
            "t: per-sample times (B, T) must all start at the same time t[:, 0] (the batch shares "
            "its "
            "initial time); solve groups with different start times separately"
        )
    direction = 1.0
    if t.shape[1] > 1:
        d = t[:, 1:] - t[:, :-1]
        inc, dec = (d > 0).all(1), (d < 0).all(1)
        bad = ~(inc | dec)
        if bad.any():
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"t: row {b} of the per-sample times is not strictly monotonic; every row must be "
                "strictly "
                f"increasing (or every row strictly decreasing for backward integration)"
            )
        if not (inc.all() or dec.all()):
            raise ValueError(
                "t: the rows of the per-sample times run in different directions; all must "
                "increase or all decrease"
            )
        direction = 1.0 if inc.all() else -1.0
    union, inverse = torch.unique(t, sorted=True, return_inverse=True)
    if direction < 0:
        union = union.flip(0)
        inverse = union.numel() - 1 - inverse
    return union, inverse


def gather(ys_union: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(U, B, ...)`` states on the union → ``(T, B, ...)`` states at each sample's own times (NaN
    past a failure)."""
    B, T = index.shape
    k = ys_union.shape[0]
    idx = index.to(ys_union.device)
    valid = idx < k
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    cols = torch.arange(B, device=ys_union.device).unsqueeze(1).expand(B, T)
    out = ys_union[safe, cols]  # (B, T, ...)
    if not bool(valid.all()):
        mask = valid.reshape(B, T, *([1] * (out.ndim - 2)))
        out = torch.where(mask, out, torch.full_like(out, float("nan")))
    return out.transpose(0, 1)


# ------------------------------------------------------------------------------------------------
# solve(..., per_sample=True): every sample its own steps (the loop: _loop.integrate_per_sample)

PER_SAMPLE_MODES = ("mask", "compact")


def check_per_sample(per_sample):
    """``False``, ``True`` (= ``"mask"``), ``"mask"`` or ``"compact"`` → ``None`` or the mode."""
    if per_sample is False or per_sample is None:
        return None
    if per_sample is True:
        return "mask"
    if isinstance(per_sample, str) and per_sample in PER_SAMPLE_MODES:
        return per_sample
    raise ValueError(
        f"per_sample: expected False, True (= 'mask': f sees the whole batch, "
        f"finished samples take steps of size 0) or 'compact' (f sees only the "
        f"running samples; f must treat rows independently), got {per_sample!r}"
    )


def sample_times(t, y0: torch.Tensor) -> torch.Tensor:
    """Validate ``t`` (T,) or (B, T) for per-sample stepping; return float64 (B, T) times.

    Unlike per-sample output times on a shared step, the rows may start at different times."""
    if isinstance(t, torch.Tensor) and t.requires_grad:
        raise ValueError(
            "t: gradients with respect to the times are not supported with "
            "per_sample=True; pass t.detach()"
        )
    tt = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, torch.Tensor) else t
    B = y0.shape[0]
    if tt.ndim == 1:
        tt = tt.reshape(1, -1).expand(B, -1)
    if tt.ndim != 2 or tt.shape[0] != B:
        raise ValueError(
            f"t: per_sample=True takes times of shape (T,) shared by the batch or "
            f"(B, T) with B = y0.shape[0] = {B}; got shape {tuple(tt.shape)}"
        )
    if tt.shape[1] == 0:
        raise ValueError("t: is empty; give at least the start time of every sample")
    tt = tt.detach().to(device=y0.device, dtype=torch.float64)
    if not bool(torch.isfinite(tt).all()):
        raise ValueError("t: contains NaN or Inf; every output time must be finite")
    if tt.shape[1] > 1:
        d = tt[:, 1:] - tt[:, :-1]
        inc, dec = (d > 0).all(1), (d < 0).all(1)
        bad = ~(inc | dec)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"t: row {b} is not strictly monotonic; every row must be strictly "
                f"increasing (or every row strictly decreasing for backward time)"
            )
        if not (bool(inc.all()) or bool(dec.all())):
            raise ValueError(
                "t: the rows run in different directions; all must increase or all decrease"
            )
    return tt.contiguous()


def solve_per_sample(
    f,
    y0,
    t,
    solver,
    *,
    mode,
    rtol,
    atol,
    steps,
    args,
    sensealg,
    throw,
    dense,
    adjoint_params,
):
    """``solve(..., per_sample=True)`` with a resolved ``solver``: validate, run the per-sample
    loop, package the result."""
    from ._loop import PER_SAMPLE_CODES, integrate_per_sample
    from ._loop_options import options_for
    from ._per_sample_implicit import check_esdirk_per_sample
    from ._problem import ODEProblem
    from ._solution import PerSampleSolution, SolveError
    from .sensitivity import (
        BacksolveAdjoint,
        DirectAdjoint,
        InterpolatingAdjoint,
        QuadratureAdjoint,
    )
    from .solvers._erk import ExplicitRK
    from .solvers._esdirk import ESDIRK
    from .solvers._rosenbrock import GenericRosenbrock

    if not isinstance(y0, torch.Tensor):
        raise TypeError(
            f"y0: per_sample=True takes one tensor shaped (B, ...) (the batch first), "
            f"got {type(y0).__name__}"
        )
    if y0.ndim < 1 or y0.shape[0] == 0:
        raise ValueError(
            f"y0: per_sample=True needs a batch dimension first, y0 of shape (B, ...) "
            f"with B >= 1; got shape {tuple(y0.shape)}"
        )
    rosenbrock = isinstance(solver, GenericRosenbrock)
    esdirk = isinstance(solver, ESDIRK)
    if not (isinstance(solver, ExplicitRK) or rosenbrock or esdirk) or not (
        solver.adaptive_capable
    ):
        multistep = (
            " (variable order per sample is not implemented)"
            if getattr(solver, "multistep", False)
            else ""
        )
        raise ValueError(
            f"solver: per_sample=True steps the adaptive explicit Runge-Kutta methods "
            f"(e.g. pn.Tsit5(), pn.Dopri5(), pn.Vern7(), pn.DP8()), the Rodas "
            f"methods (pn.Rodas5P(batched=True), pn.Rodas4(batched=True)) and the ESDIRK "
            f"methods (e.g. pn.KenCarp4(batched=True), pn.Kvaerno5(batched=True)); got "
            f"{type(solver).__name__}{multistep}; use one of them or drop per_sample"
        )
    if esdirk:
        check_esdirk_per_sample(solver, y0)
    if rosenbrock and not (solver.batched and y0.ndim == 2):
        raise ValueError(
            f"solver: per_sample=True with {type(solver).__name__} needs "
            f"batched=True (one Jacobian per sample) and y0 of shape (B, n); got "
            f"batched={solver.batched}, y0 of shape {tuple(y0.shape)}"
        )
    direct = isinstance(sensealg, DirectAdjoint) and sensealg.checkpoints is None
    joint = isinstance(sensealg, (BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint))
    if sensealg is not None and not (direct or joint):
        raise ValueError(
            f"sensealg: per_sample=True supports DirectAdjoint() (through its steps, "
            f"the default) and the continuous adjoints BacksolveAdjoint(), "
            f"InterpolatingAdjoint() and QuadratureAdjoint() (a joint backward pass); got "
            f"{sensealg!r}; use one of them or drop per_sample"
        )
    if not steps.adaptive:
        raise ValueError(
            "adaptive: per_sample=True is per-sample adaptive stepping; with fixed "
            "steps (adaptive=False) drop per_sample (the batch shares its steps)"
        )
    if dense:
        raise ValueError(
            "dense: per_sample=True keeps no dense output object; give the times "
            "each sample needs as t of shape (B, T)"
        )
    tt = sample_times(t, y0)
    if joint and not bool((tt == tt[:1]).all()):
        raise ValueError(
            f"sensealg: {type(sensealg).__name__} with per_sample=True runs one backward "
            "pass for the whole batch, so every sample needs the same times; give t of "
            "shape (T,), or use DirectAdjoint() for times per sample"
        )
    problem = ODEProblem(
        f, y0, tt[0], args=args, rtol=rtol, atol=atol, adjoint_params=adjoint_params
    )
    opts = options_for(problem, solver, steps)
    time_dtype = t.dtype if isinstance(t, torch.Tensor) and t.is_floating_point() else y0.dtype
    fargs = problem.args
    checked = []

    B = y0.shape[0]
    compact_hint = (
        "with per_sample='compact' f gets only the running samples' rows, so it must "
        "treat rows independently (keep per-sample constants in the state, or use "
        "per_sample=True)"
    )

    def rhs(ts, ys):
        try:
            out = f(ts if ts.dtype == time_dtype else ts.to(time_dtype), ys, *fargs)
        except RuntimeError as e:
            if mode == "compact" and ys.shape[0] < B:
                raise ValueError(
                    f"f(t, y): failed on {ys.shape[0]} of the {B} rows ({e}); {compact_hint}"
                ) from e
            raise
        if not checked or out.shape != ys.shape:
            if (
                checked
                and mode == "compact"
                and isinstance(out, torch.Tensor)
                and out.shape[1:] == ys.shape[1:]
            ):
                raise ValueError(
                    f"f(t, y): returned {out.shape[0]} rows for the {ys.shape[0]} "
                    f"running samples; {compact_hint}"
                )
            problem._check_out(out, ys.shape, "f(t, y)", later=bool(checked))
            checked.append(True)
        return out

    def run(y0_, stats=None, times=tt):
        res = integrate_per_sample(rhs, y0_, times, solver, opts, compact=mode == "compact")
        if stats is not None:
            stats.update(res.stats)
        return res

    if joint and torch.is_grad_enabled():
        from .sensitivity._adjoint import run_adjoint

        # the backward pass calls f with one time for the whole batch: hand it one per row
        # (a partial, not a lambda: the adjoint finds the tensors f reaches through its
        # arguments, and skips the library's own functions)
        problem.f = functools.partial(_time_per_row, f)
        stats: dict = {}
        if sensealg.solver is None and getattr(solver, "batched", False):
            # the backward state is flat ([a, g]): the backward solve takes the unbatched
            # method (the checkpoint re-solves of the batch keep batched=True)
            sensealg = copy.copy(sensealg)
            sensealg.solver = copy.copy(solver)
            sensealg.solver.batched = False
        ys, res = run_adjoint(
            _JointBackward(sensealg, run), problem, problem.y0, solver, opts, stats
        )
        res.ys, res.stats = ys, stats  # the differentiable states; stats gain the backward's
    else:
        res = run(problem.y0)
    codes = [PER_SAMPLE_CODES[c] for c in res.codes.tolist()]
    sol = PerSampleSolution(
        ts=t, ys=res.ys, retcodes=codes, stats=res.stats, t_reached=res.t_reached, solver=solver
    )
    failed = [b for b, c in enumerate(codes) if not c.successful]
    if failed and throw:
        t_r = res.t_reached.tolist()
        first = ", ".join(f"sample {b}: {codes[b].value} at t={t_r[b]:.6g}" for b in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise SolveError(
            f"solve failed for {len(failed)} of {len(codes)} samples ({first}{more}); "
            f"pass throw=False to get the other samples and sol.retcode per sample",
            codes[failed[0]],
            t_r[failed[0]],
            sol,
        )
    return sol


def _time_per_row(f, s, y, *args):
    """``f`` called with one time per row (the backward pass has one time for the batch)."""
    return f(s.expand(y.shape[0]) if s.ndim == 0 else s, y, *args)


class _JointBackward:
    """A continuous adjoint's joint backward pass after per-sample forward steps: the forward is
    :func:`_loop.integrate_per_sample`, the backward the adjoint's own, on the whole batch with
    shared steps (one augmented system; torchode's "joint" adjoint, which its authors measured
    far faster than one adjoint per sample)."""

    def __init__(self, sensealg, run):
        self.sensealg, self.run = sensealg, run
        self.name = sensealg.name

    def _forward(self, problem, y0, solver, opts, stats):
        from .sensitivity import BacksolveAdjoint
        from .sensitivity._passes import Checkpoints, Forward, StepBounds, checkpoint_times

        if isinstance(self.sensealg, BacksolveAdjoint):
            res = self.run(y0, stats)
            # no forward step times: each backward interval starts from its own first step
            return Forward(res.ys, res, StepBounds([problem.t_list[0]]))
        # Interpolating/Quadrature: the rows' steps differ, so no dense output of the batch is
        # kept; the states at the output times (and n_checkpoints evenly spaced times) are the
        # checkpoints, and the backward pass re-solves the batch from them, interval by
        # interval, with shared adaptive steps (step_ts=None: nothing to replay)
        merged, out_index = checkpoint_times(
            problem.t_list, getattr(self.sensealg, "n_checkpoints", None)
        )
        times = torch.tensor(merged, dtype=torch.float64, device=y0.device)
        res = self.run(y0, stats, times.reshape(1, -1).expand(y0.shape[0], -1).contiguous())
        states = list(res.ys.unbind(0))
        output_of: list = [None] * len(merged)
        for i, j in enumerate(out_index):
            output_of[j] = i
        res = dataclasses.replace(res, ys=res.ys[out_index])
        return Forward(res.ys, res, Checkpoints(merged, states, output_of, None))

    def _backward(self, p, ys, grad_ys, m):
        return self.sensealg._backward(p, ys, grad_ys, m)
