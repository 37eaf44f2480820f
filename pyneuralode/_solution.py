"""Solution objects, return codes, statistics and the solve error."""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable
from typing import Any

import torch


class ReturnCode(str, enum.Enum):
    """Why a solve ended; a ``str`` that compares equal to its name (SciMLBase's ReturnCode)."""

    Success = "Success"
    MaxIters = "MaxIters"
    DtLessThanMin = "DtLessThanMin"
    Unstable = "Unstable"
    ConvergenceFailure = "ConvergenceFailure"
    Terminated = "Terminated"
    Failure = "Failure"

    def __str__(self) -> str:  # "Success", not "ReturnCode.Success"
        return self.value

    def __bool__(self) -> bool:
        return True

    @property
    def successful(self) -> bool:
        return self in (ReturnCode.Success, ReturnCode.Terminated)


class SolveError(RuntimeError):
    """Raised by ``solve(..., throw=True)`` when integration fails; carries ``retcode`` and the time
    ``t`` reached."""

    def __init__(
        self, message: str, retcode: ReturnCode, t: float, solution: Solution | None = None
    ):
        super().__init__(message)
        self.retcode = retcode
        self.t = t
        self.solution = solution


class DenseSegment:
    """Dense output of one accepted step on [t0, t0 + dt]: ``evaluate(theta)`` with theta in [0,
    1]."""

    __slots__ = ("t0", "dt", "data", "interpolant")

    def __init__(
        self,
        t0: float,
        dt: float,
        data: Any,
        interpolant: Callable[[Any, torch.Tensor | float], torch.Tensor],
    ):
        self.t0 = t0
        self.dt = dt
        self.data = data
        self.interpolant = interpolant

    def evaluate(self, theta):
        return self.interpolant(self.data, theta)


class Solution:
    """Result of :func:`pyneuralode.solve`.

    Attributes
    ----------
    ts : the output times (as given).
    ys : states at ``ts``, shaped ``(len(ts), *y0.shape)`` (a tuple of such for tuple states).
    retcode : :class:`ReturnCode` (compares equal to ``"Success"`` etc.).
    stats : dict with at least ``nfe``, ``naccept``, ``nreject``; backward passes add
    ``nfe_adjoint`` etc. ``sol(tq)`` evaluates the dense output (when the solve kept it,
    ``dense=True``).
    """

    def __init__(
        self, ts, ys, retcode, stats, segments=None, unflatten=None, t_reached=None, solver=None
    ):
        self.ts = ts
        self.ys = ys
        self.retcode = ReturnCode(retcode)
        self.stats = stats
        self._segments: list[DenseSegment] | None = segments
        self._unflatten = unflatten
        self.t_reached = t_reached
        self.solver = solver
        self.event_t = (
            None  # with solve(..., event=g): the event time (a 0-d tensor) and the state there
        )
        self.event_y = None

    @property
    def successful(self) -> bool:
        return self.retcode.successful

    def __call__(self, tq):
        if self._segments is None:
            raise ValueError(
                "sol(tq): this solution kept no dense output; call solve(..., dense=True) to "
                "evaluate between output times"
            )
        if not self._segments:
            raise ValueError(
                "sol(tq): the solve took no steps, there is no dense output to evaluate"
            )
        tq_t = torch.as_tensor(tq, dtype=torch.float64).reshape(-1)
        if tq_t.numel() == 0:
            raise ValueError("sol(tq): tq is empty")
        if not torch.isfinite(tq_t).all():
            raise ValueError("sol(tq): tq contains NaN or Inf")
        starts = [s.t0 for s in self._segments]
        first, last = self._segments[0], self._segments[-1]
        # the span ends where the solve ended (an event may stop it inside its last step)
        lo_t, hi_t = first.t0, (self.t_reached if self.t_reached is not None else last.t0 + last.dt)
        direction = 1.0 if last.dt >= 0 else -1.0
        lo, hi = min(lo_t, hi_t), max(lo_t, hi_t)
        span = hi - lo
        out = []
        for i, tv in enumerate(tq_t.tolist()):
            if tv < lo - 1e-12 * max(1.0, span) or tv > hi + 1e-12 * max(1.0, span):
                raise ValueError(
                    f"sol(tq): tq[{i}]={tv} lies outside the solved span [{lo}, {hi}]; evaluate "
                    "only inside it"
                )
            if direction > 0:
                k = max(0, bisect.bisect_right(starts, tv) - 1)
            else:
                neg = [-s for s in starts]
                k = max(0, bisect.bisect_right(neg, -tv) - 1)
            seg = self._segments[k]
            theta = (tv - seg.t0) / seg.dt if seg.dt != 0 else 0.0
            if isinstance(tq, torch.Tensor) and tq.requires_grad:
                theta = (tq.reshape(-1)[i] - seg.t0) / seg.dt
            out.append(seg.evaluate(theta))
        y = torch.stack(out)
        if self._unflatten is not None:
            y = self._unflatten(y)
        return y

    def __repr__(self) -> str:
        return (
            f"Solution(retcode={self.retcode.value}, n_times={len(self.ts)}, "
            f"stats={dict(self.stats)})"
        )


class PerSampleSolution(Solution):
    """The result of a per-sample solve, ``solve(..., per_sample=True)``: every sample stepped on
    its own.

    ``ys`` (T, B, ...): ``ys[j, b]`` is sample ``b`` at its ``j``-th output time (NaN past a
    failure); ``retcode``: a tuple with one :class:`ReturnCode` per sample; ``t_reached`` a (B,)
    tensor; ``stats``: ``nfe``, ``naccept``, ``nreject`` as (B,) int64 tensors (``nfe`` counts the
    evaluations made while the sample was running), ``ncalls`` the calls of ``f``, ``nrows`` the
    rows they evaluated and ``nsteps`` the batched steps (loop iterations). ``successful``: every
    sample succeeded; ``successful_mask``: per sample.
    """

    def __init__(self, ts, ys, retcodes, stats, t_reached=None, solver=None):
        super().__init__(ts, ys, ReturnCode.Success, stats, None, None, t_reached, solver)
        self.retcode = tuple(ReturnCode(r) for r in retcodes)  # type: ignore[assignment]

    @property
    def successful(self) -> bool:
        return all(r.successful for r in self.retcode)

    @property
    def successful_mask(self) -> torch.Tensor:
        return torch.tensor([r.successful for r in self.retcode])

    def __call__(self, tq):
        raise ValueError(
            "sol(tq): a per-sample solve (per_sample=True) keeps no dense output; "
            "give the times each sample needs as t of shape (B, T)"
        )

    def __repr__(self) -> str:
        ok = sum(r.successful for r in self.retcode)
        return (
            f"PerSampleSolution(successful={ok}/{len(self.retcode)}, "
            f"n_times={self.ys.shape[0]}, nfe={int(self.stats['nfe'].sum())})"
        )
