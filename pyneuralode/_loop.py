"""The integrate loop: the only code that steps.

It asks the solver for attempted steps, accepts or rejects them with the error norm and the
controller, saves the output times (by the step's dense output; output times never force
steps), keeps dense segments when asked, and ends every failure with a return code. Every loop
is bounded by ``max_steps``.

Two drivers share the solvers' ``step``: :func:`integrate` (one time and step size for the whole
state, controlled on the host in Python floats) and :func:`integrate_per_sample` (a time, step
size, error norm and decision per row of a batch, held in tensors on the state's device with one
host synchronisation per step, or for CPU tensors decided by one compiled kernel,
:mod:`._per_sample_host`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _per_sample_host
from ._solution import DenseSegment, ReturnCode
from .controllers import PIController, initial_step, rms_norm_and_abs
from .solvers._ops import abs_host, host_tolerance, rms_norm_small, small_norm_kind

_EPS = 2.220446049250313e-16


@dataclass
class LoopOptions:
    """Numerical options of one integration (already validated)."""

    rtol: Any = 1e-6
    atol: Any = 1e-9
    dt: float | None = None
    adaptive: bool = True
    max_steps: int = 100_000
    dense: bool = True
    progress: bool = False
    #: step-size controller (``PIController``, ``PredictiveController``); ``None`` = the solver's
    #: ``default_controller()``
    controller: Any | None = None
    dtmin: float | None = None
    dtmax: float | None = None
    #: torchdiffeq's ``min_step``: adaptive steps are at least this long, and a step this short is
    #: accepted whatever its error (not a failure floor like ``dtmin``). ``None`` = no such bound.
    min_step: float | None = None
    #: error norm ``norm(err, y0, y1, rtol, atol) -> 0-d tensor``; ``None`` = Hairer's RMS norm
    #: (``controllers.error_norm``). Used e.g. by the adjoint seminorm (Kidger, Chen, Lyons 2021).
    norm: Callable | None = None
    #: ``terminate(t, y, cache) -> bool`` called after every accepted step (``cache`` is the
    #: solver's, e.g. ``f(t, y)`` for explicit RK); ``True`` ends the integration with
    #: ``ReturnCode.Terminated`` (SciML's terminating callback; used by ``pn.DynamicSS``). ``None``
    #: = never.
    terminate: Callable | None = None
    #: ``event(seg, t, t_new, y_new) -> Optional[float]`` called for every accepted step before its
    #: outputs are saved; a time in ``(t, t_new]`` ends the integration there (outputs after it are
    #: not saved, ``y_final`` is the dense output at that time, ``ReturnCode.Terminated``).
    event: Callable | None = None
    #: step exactly to these times (``grid[0]`` = the start, ``grid[-1]`` = the end; diffrax's
    #: ``StepTo``), ignoring the error estimate; used to replay a forward pass's accepted steps
    #: when an adjoint re-solves from a checkpoint. ``None`` = adaptive or fixed ``dt`` steps.
    grid: list[float] | None = None
    #: keep the times of the accepted steps in ``LoopResult.step_ts``
    record_steps: bool = False
    #: ``on_accept(t, y)`` called after every accepted step with the new time and state (e.g. to
    #: keep checkpoints); ``None`` = nothing
    on_accept: Callable | None = None
    #: resume a solve (per-sample stepping hands its last running row over): the explicit RK
    #: method's derivative at the start, and the dtmin floor of the whole span (``None``: computed)
    f0: torch.Tensor | None = None
    dt_floor: float | None = None


@dataclass
class LoopResult:
    ys: list[torch.Tensor]
    retcode: ReturnCode
    t_reached: float
    segments: list[DenseSegment] | None
    y_final: torch.Tensor
    message: str = ""
    event_t: float | None = None
    step_ts: list[float] | None = None


def _progress_bar(enabled: bool, t0: float, t1: float):
    if not enabled:
        return None
    from ._progress import progress  # tqdm on a terminal, a few summary lines in logs

    return progress(
        total=1000,
        desc=f"solve t∈[{t0:g}, {t1:g}]",
        leave=False,
        bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
    )


def _stuck_hint(solver, y: torch.Tensor) -> str:
    """What to try when the step size collapses; never the solver already in use."""
    if y.dtype in (torch.float16, torch.bfloat16):
        return (
            f"; {y.dtype} resolves too few digits for these tolerances: use float32/float64 "
            f"(y0.float()) or loosen rtol/atol"
        )
    if getattr(solver, "implicit", False):
        return (
            "; the tolerances may be too tight for the dtype, or the solution may blow up "
            "or be non-smooth there (check f near that time)"
        )
    return (
        "; the problem may be stiff (try an implicit solver such as pn.Rodas5P() or "
        "pn.KenCarp4()) or the tolerances too tight for the dtype"
    )


def _f_nonfinite(rhs: Callable, t: float, y: torch.Tensor, t_next: float) -> bool:
    """Whether f returns NaN/Inf at the current state, at its time or at the end of the longest
    step tried (a Newton iteration that met NaN there fails without saying why)."""
    with torch.no_grad():
        return any(not bool(torch.isfinite(rhs(tt, y)).all()) for tt in (t, t_next))


def _increment_lost(
    rhs: Callable, t: float, y: torch.Tensor, y1: torch.Tensor, h: float, rtol, atol
) -> bool:
    """float16/bfloat16: the step left y unchanged though h·f(t, y) exceeds the tolerance (the
    update was rounded away, so the solve would return y0 with ``Success``)."""
    if not torch.equal(y1, y):
        return False
    with torch.no_grad():
        inc = (h * rhs(t, y).float()).abs()
        rtol32, atol32 = (torch.as_tensor(tol, dtype=torch.float32) for tol in (rtol, atol))
        scale = atol32 + rtol32 * y.abs().float()
        return bool((inc > scale).any())


def integrate(
    rhs: Callable, y0: torch.Tensor, t_out: list[float], solver, opts: LoopOptions, stats: dict
) -> LoopResult:
    """Integrate ``dy/dt = rhs(t, y)`` from ``t_out[0]`` through every time in ``t_out``.

    ``rhs(t, y)`` takes a Python float ``t``. Returns the states at the output times reached, the
    dense segments (if ``opts.dense``), a return code and the time reached.
    """
    n_out = len(t_out)
    t = t_out[0]
    y = y0
    ys = [y0]
    segments: list[DenseSegment] | None = [] if opts.dense else None
    if n_out == 1:
        return LoopResult(ys, ReturnCode.Success, t, segments, y0)
    t_end = t_out[-1]
    direction = 1.0 if t_end > t else -1.0
    span = abs(t_end - t)
    cache = (
        opts.f0
        if opts.f0 is not None
        else solver.init(rhs, t, y, stats, rtol=opts.rtol, atol=opts.atol)
    )
    grid = opts.grid
    gk = 0  # index of the current grid time
    adaptive = opts.adaptive and grid is None
    ctrl = opts.controller if opts.controller is not None else solver.default_controller()
    rtol, atol = opts.rtol, opts.atol
    if adaptive:
        q = min(solver.order, solver.error_order) + 1
        if opts.dt is not None:
            dt = abs(opts.dt)
        else:
            f0 = cache if isinstance(cache, torch.Tensor) else rhs(t, y)
            dt = initial_step(
                rhs,
                t,
                y,
                f0,
                direction,
                getattr(solver, "start_order", solver.order),
                rtol,
                atol,
                stats,
            )
            dt = min(dt, span)
    elif grid is not None:
        if len(grid) < 2 or grid[0] != t or grid[-1] != t_end:
            raise ValueError(
                "internal: a step grid must run from the first to the last output time"
            )
        dt = abs(grid[1] - grid[0])
    else:
        dt = abs(opts.dt)
    step_ts: list[float] | None = [] if opts.record_steps else None
    dtmax = abs(opts.dtmax) if opts.dtmax is not None else span
    # near t = 0: a relative floor on the span's scale
    dt_floor = max(_EPS * span, 1e-300) if opts.dt_floor is None else opts.dt_floor
    dt = min(dt, dtmax)
    min_step = abs(opts.min_step) if opts.min_step and adaptive else 0.0
    dt = max(dt, min_step)
    # Error norm: the default (Hairer's RMS norm) takes a fast path that reuses |y| from the
    # previous step and never records a graph; a custom ``opts.norm`` gets (err, y0, y1, rtol,
    # atol).
    norm = opts.norm
    grad_mode = torch.is_grad_enabled()
    inv_sqrt_n = 1.0 / math.sqrt(max(y.numel(), 1))
    ay = None
    small_norm = None  # tiny CPU states: the norm on the host ("list": Python floats, "numpy")
    if adaptive and norm is None:
        small_norm = small_norm_kind(y, rtol, atol)
        if small_norm is not None:
            ay = abs_host(y, small_norm)
            rtol, atol = host_tolerance(rtol), host_tolerance(atol)
        else:
            with torch.no_grad():
                ay = y.abs()
    ay1 = None
    err_prev = 1.0
    h_accepted = None  # |h| of the last accepted step (the predictive controller's step ratio)
    accepted_last = True
    last_nonfinite = False
    solve_failed = False  # the last attempt's implicit solve failed (ok=False)
    dt_far = 0.0  # the longest step whose implicit solve failed since the last accepted step
    low_precision = y.dtype in (torch.float16, torch.bfloat16)
    next_out = 1
    attempts = 0
    retcode = ReturnCode.Success
    message = ""
    bar = _progress_bar(opts.progress, t, t_end)
    stats.setdefault("naccept", 0)
    stats.setdefault("nreject", 0)
    try:
        while next_out < n_out:
            remaining = abs(t_end - t)
            if grid is not None:
                dt = abs(grid[gk + 1] - t)
            # The default floor follows the current time (a step must change t in floating point,
            # as in scipy and OrdinaryDiffEq), not the span: stiff problems on long spans need tiny
            # first steps.
            dtmin = opts.dtmin if opts.dtmin is not None else 4 * _EPS * max(abs(t), dt_floor)
            if dt < dtmin:
                if not last_nonfinite and solve_failed:
                    # failed implicit solves carry no state: ask f whether it returns NaN/Inf here
                    last_nonfinite = _f_nonfinite(rhs, t, y, t + direction * dt_far)
                retcode = ReturnCode.Unstable if last_nonfinite else ReturnCode.DtLessThanMin
                if last_nonfinite:
                    hint = (
                        "; the state, its error estimate or f(t, y) became NaN/Inf (check f "
                        "for NaN/Inf, e.g. a division by zero, a log/sqrt of a negative "
                        "number or an overflow)"
                    )
                elif solve_failed:
                    hint = (
                        "; the implicit (Newton) solves kept failing: check the Jacobian "
                        "(jac=...) and f near that time, or loosen the tolerances"
                    )
                else:
                    hint = _stuck_hint(solver, y)
                message = (
                    f"the step size fell to {dt:.3g} (below dtmin={dtmin:.3g}) at t={t:.6g}{hint}"
                )
                break
            attempts += 1
            if attempts > max(opts.max_steps, 0):
                retcode = ReturnCode.MaxIters
                message = (
                    f"reached max_steps={opts.max_steps} at t={t:.6g}; raise max_steps or loosen "
                    "the tolerances"
                )
                break
            # Adaptive: stretch a step by up to 0.1% rather than leave a sliver; fixed steps:
            # accumulated rounding in t must not leave a sliver of a last step.
            if grid is not None:
                last_step = gk + 2 == len(grid)
            else:
                last_step = dt > 0.999 * remaining if adaptive else remaining <= dt * (1 + 1e-8)
            h = direction * (remaining if last_step else dt)
            res = solver.step(rhs, t, y, h, cache)
            solve_failed = not res.ok
            if solve_failed:
                dt_far = max(dt_far, abs(h))
            if not res.ok:
                stats["nreject"] += 1
                if not adaptive:
                    retcode = ReturnCode.ConvergenceFailure
                    message = (
                        f"the implicit solve of a fixed step failed at t={t:.6g}; use a smaller "
                        "dt or adaptive=True"
                    )
                    break
                # a failed implicit solve halves the step (RADAU5, OrdinaryDiffEq, scipy BDF)
                dt *= 0.5
                accepted_last = False
                if res.cache_on_reject is not None:
                    cache = res.cache_on_reject
                continue
            if adaptive:
                if small_norm is not None:
                    errn, ay1 = rms_norm_small(
                        small_norm, res.error, ay, res.y1, rtol, atol, inv_sqrt_n
                    )
                elif norm is None:
                    if grad_mode:
                        with torch.no_grad():
                            errn, ay1 = rms_norm_and_abs(
                                res.error, ay, res.y1, rtol, atol, inv_sqrt_n
                            )
                    else:
                        errn, ay1 = rms_norm_and_abs(res.error, ay, res.y1, rtol, atol, inv_sqrt_n)
                else:
                    errn = norm(res.error, y, res.y1, rtol, atol).item()
                finite = math.isfinite(errn)
                q_step = q if res.order is None else res.order + 1
                if not finite or (errn > 1.0 and not abs(h) <= min_step):  # NaN: never accepted
                    stats["nreject"] += 1
                    last_nonfinite = not finite
                    fac = ctrl.factor(errn if finite else math.inf, err_prev, q_step, accepted_last)
                    if res.reject_safety is not None:
                        fac = max(getattr(ctrl, "factor_min", 0.0), fac * res.reject_safety)
                    dt = max(abs(h) * fac, min_step)
                    accepted_last = False
                    if res.cache_on_reject is not None:
                        cache = res.cache_on_reject
                    continue
                last_nonfinite = False
                if res.dt_factor is None:
                    fac = ctrl.factor(
                        errn,
                        err_prev,
                        q_step,
                        accepted_last,
                        None if h_accepted is None else abs(h) / h_accepted,
                    )
                else:
                    fac = res.dt_factor
                err_prev = max(errn, 1e-4)
                h_accepted = abs(h)
                accepted_last = True
            t_new = t_end if last_step else (t + h if grid is None else grid[gk + 1])
            if t_new == t:
                retcode = ReturnCode.DtLessThanMin
                message = f"the step size {abs(h):.3g} is below the float resolution of t={t:.17g}"
                break
            if low_precision and _increment_lost(rhs, t, y, res.y1, h, opts.rtol, opts.atol):
                retcode = ReturnCode.DtLessThanMin
                eps = torch.finfo(y.dtype).eps
                message = (
                    f"a step of {abs(h):.3g} at t={t:.6g} left the state unchanged in "
                    f"{y.dtype}: its change is below the dtype's resolution "
                    f"(eps={eps:.3g}), so the solution would stall; use float32/float64 "
                    f"(y0.float()) or loosen rtol/atol"
                )
                break
            seg = DenseSegment(t, h, res.dense, solver.interpolant)
            if segments is not None:
                segments.append(seg)
            t_event = opts.event(seg, t, t_new, res.y1) if opts.event is not None else None
            t_stop = t_new if t_event is None else t_event
            saved_before = next_out
            while next_out < n_out and direction * (t_out[next_out] - t_stop) <= 0:
                to = t_out[next_out]
                ys.append(res.y1 if to == t_new else seg.evaluate((to - t) / h))
                next_out += 1
            if t_event is not None:
                stats["naccept"] += 1
                y_event = res.y1 if t_event == t_new else seg.evaluate((t_event - t) / h)
                return LoopResult(
                    ys,
                    ReturnCode.Terminated,
                    t_event,
                    segments,
                    y_event,
                    f"the event fired at t={t_event:.9g}",
                    event_t=t_event,
                )
            if not adaptive and next_out != saved_before and not torch.isfinite(ys[-1]).all():
                retcode = ReturnCode.Unstable
                message = (
                    f"the state became NaN/Inf by t={t_new:.6g}; use a smaller dt or an adaptive "
                    "solver"
                )
                t, y = t_new, res.y1
                break
            stats["naccept"] += 1
            dt_far = 0.0
            t, y, cache = t_new, res.y1, res.cache
            gk += 1
            if step_ts is not None:
                step_ts.append(t)
            if opts.on_accept is not None:
                opts.on_accept(t, y)
            if ay1 is not None:
                ay, ay1 = ay1, None
            if opts.terminate is not None and next_out < n_out and opts.terminate(t, y, cache):
                retcode = ReturnCode.Terminated
                message = f"terminated by the callback at t={t:.6g}"
                break
            if adaptive:
                dt = max(min(abs(h) * fac, dtmax), min_step) if not last_step else dt
            if bar is not None:
                bar.n = int(1000 * min(1.0, abs(t - t_out[0]) / span))
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    if retcode == ReturnCode.Success and not adaptive and not torch.isfinite(y).all():
        retcode = ReturnCode.Unstable
        message = "the state became NaN/Inf; use a smaller dt or an adaptive solver"
    return LoopResult(ys, retcode, t, segments, y, message, step_ts=step_ts)


# ------------------------------------------------------------------------------------------------
# Per-sample stepping: every row of a batch its own time, step, error norm, decision and end


@dataclass
class PerSampleResult:
    """What :func:`integrate_per_sample` returns; per-sample fields are tensors of shape (B,)."""

    ys: torch.Tensor  #: (T, B, ...) states at each row's own output times (NaN past a failure)
    codes: torch.Tensor  #: int64 codes into ``PER_SAMPLE_CODES``
    t_reached: torch.Tensor  #: float64, the time each row reached
    stats: dict  #: nfe, naccept, nreject per row; ncalls, nrows (rows f evaluated), nsteps


#: the return codes of :func:`integrate_per_sample`, by code
PER_SAMPLE_CODES = (
    ReturnCode.Success,
    ReturnCode.MaxIters,
    ReturnCode.DtLessThanMin,
    ReturnCode.Unstable,
)


def _row_rms(x: torch.Tensor) -> torch.Tensor:
    """Hairer's RMS norm of each row of ``x`` (B, ...) → (B,)."""
    flat = x.reshape(x.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1) / math.sqrt(max(flat.shape[1], 1))


def _row_error_norm(err, ay, y1, rtol, atol):
    """``|y1|`` and each row's norm of ``err / (atol + rtol·max(|y0|, |y1|))`` (``ay`` = |y0|;
    Hairer's RMS when √n is folded into the tolerances), float64 (B,)."""
    ay1 = y1.abs()
    r = err / torch.maximum(ay, ay1).mul_(rtol).add_(atol)
    errn = torch.linalg.vector_norm(r if r.dim() == 2 else r.reshape(r.shape[0], -1), dim=1)
    return ay1, errn if errn.dtype == torch.float64 else errn.to(torch.float64)


def _running_rows(running: torch.Tensor, n_run: int) -> torch.Tensor:
    """The indices of the ``n_run`` running rows. Their count is the step's synchronised number,
    so on a GPU ``nonzero_static`` finds them without a second host synchronisation."""
    try:
        return torch.nonzero_static(running, size=n_run).squeeze(1)
    except (AttributeError, RuntimeError):  # torch or the device without nonzero_static
        return running.nonzero().squeeze(1)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast over the rows of ``like`` (B, ...)."""
    return v.view(v.shape[0], *([1] * (like.dim() - 1)))


def _initial_step_rows(rhs, t0, y0, f0, direction, order, rtol, atol):
    """:func:`controllers.initial_step` row by row (one evaluation of the batch)."""
    with torch.no_grad():
        scale = atol + rtol * y0.abs()
        d0, d1 = _row_rms(y0 / scale).double(), _row_rms(f0 / scale).double()
        small = (d0 < 1e-5) | (d1 < 1e-5) | ~torch.isfinite(d0 + d1)
        h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        y1 = y0 + _rows((direction * h0).to(y0.dtype), y0) * f0
        f1 = rhs(t0 + direction * h0, y1)
        d2 = _row_rms((f1 - f0) / scale).double() / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(
            dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax) ** (1.0 / (order + 1))
        )
        return torch.where(torch.isfinite(d2), torch.minimum(100 * h0, h1), h0)


class _StepField:
    """The field of one per-sample step in the step's own variable s ∈ [0, 1]:
    ``dy_b/ds = h_b · f(t_b + s·h_b, y_b)``, so the solver takes one shared step of size 1 while
    every row advances by its own ``h_b`` (stages, error estimate and dense output all scale).
    Keeps the unscaled derivative of its last call: the explicit RK engine's last evaluation is
    ``f(t + h, y1)``, the next step's first stage. ``calls`` counts the calls of f.
    ``nodes``: {s: i} for the method's stage nodes; their times ``t + s·h`` are formed in one
    operation (row i of ``times``), other s one by one."""

    __slots__ = ("calls", "h", "hy", "last", "nodes", "rhs", "t", "times")

    def __init__(self, rhs, t, h, hy, nodes=None, node_values=None):
        self.rhs, self.t, self.h, self.hy = rhs, t, h, hy
        self.calls = 0
        self.last = None
        self.nodes = nodes
        self.times = None if nodes is None else torch.addr(t, node_values, h)

    def time(self, s):
        i = None if self.nodes is None else self.nodes.get(s)
        if i is not None:
            return self.times[i]
        return torch.add(self.t, self.h, alpha=s) if s else self.t

    def __call__(self, s, y):
        raw = self.rhs(self.time(s), y)
        self.calls += 1
        self.last = raw
        return self.hy * raw


def integrate_per_sample(
    rhs: Callable,
    y0: torch.Tensor,
    t_out: torch.Tensor,
    solver,
    opts: LoopOptions,
    compact: bool = False,
) -> PerSampleResult:
    """Integrate a batch ``y0`` (B, ...) with per-row step control, saving row ``b`` at the
    times ``t_out[b]`` (``t_out`` (B, T) float64, rows strictly monotonic in one direction).

    ``rhs(t, y)`` takes ``t`` as a (B',) tensor and the (B', ...) rows being stepped. Each row
    has its own time, step size, error norm, accept/reject decision, controller state, attempt
    count (``max_steps`` per row) and return code; a finished or failed row stops. ``compact``:
    the stepped rows are only the running ones (``rhs`` must treat rows independently); else
    every row is evaluated and a finished row takes steps of size 0. One host synchronisation
    per step (how many rows still run, whether one failed, how many outputs a row passed), none
    inside the stages. The step itself is the solver's (an explicit RK method or a batched
    Rosenbrock method, see :class:`_StepField`). When one row is left it may continue in
    :func:`integrate` (host-side decisions; see :func:`_finish_row`), alone in compact mode, with
    the whole batch, the stopped rows frozen, otherwise.

    The decisions are a few element-wise operations on (B,) tensors per step: a GPU runs them
    without waiting; on a CPU each would cost a torch dispatch, so there (explicit methods, the PI
    and predictive controllers, numba installed) one compiled kernel makes them over numpy arrays
    sharing the loop's memory (:mod:`._per_sample_host`, ``hs``). In the tensor decisions the
    bookkeeping that can be derived is:
    a running row has run every step so far (rows only stop), so its attempt count is the step
    count (kept per row only when it stops) and its evaluations are the step's calls of f times
    its attempts (corrected on the steps whose call count differs); a row that stopped gets
    ``t_end = t``, which makes its later steps size 0 without a mask.
    """
    B, T = t_out.shape
    dev = y0.device
    f64 = {"dtype": torch.float64, "device": dev}
    ctrl = opts.controller if opts.controller is not None else solver.default_controller()
    # the integral controller (PI with beta2 = 0) needs neither the last error nor the last step
    history = not (type(ctrl) is PIController and not ctrl.beta2)
    q = min(solver.order, solver.error_order) + 1
    rtol, atol = opts.rtol, opts.atol
    direction = 1.0 if T < 2 or bool((t_out[:, 1] > t_out[:, 0]).all()) else -1.0
    t = t_out[:, 0].clone()
    t_end = t_out[:, -1].clone()
    span = (t_end - t).abs()
    key = direction * t_out  # increasing in every row
    # per-row results over the whole batch; the working tensors below hold the stepped rows
    # (``idx``: their original rows; None while every row is stepped, always so without compact)
    out = torch.full((T + 1, *y0.shape), math.nan, dtype=y0.dtype, device=dev)
    out[0] = y0
    codes_g = torch.zeros(B, dtype=torch.int64, device=dev)
    t_reached_g = t.clone()
    nfe_g, nacc_g, att_g = (torch.zeros(B, dtype=torch.int64, device=dev) for _ in range(3))
    counters = {"ncalls": 0, "nrows": 0, "nsteps": 0}

    def call(tt, yy):
        counters["ncalls"] += 1
        counters["nrows"] += yy.shape[0]
        return rhs(tt, yy)

    def result():
        return PerSampleResult(
            out[:T], codes_g, t_reached_g, _stats(nfe_g, nacc_g, att_g - nacc_g, counters)
        )

    if T < 2:  # only the start: nothing to step
        return result()
    fraw = call(t, y0)
    running = span > 0  # every row: its times are strictly monotonic
    nfe_g += running
    if opts.dt is not None:
        dt = torch.full((B,), abs(opts.dt), **f64)
    else:
        dt = _initial_step_rows(
            call, t, y0, fraw, direction, getattr(solver, "start_order", solver.order), rtol, atol
        )
        nfe_g += running
    dtmax = torch.full_like(span, opts.dtmax) if opts.dtmax is not None else span.clone()
    dt = torch.minimum(torch.minimum(dt, span), dtmax)
    # the default dtmin follows the current time, as in the scalar loop
    dt_floor = torch.clamp(_EPS * span, min=1e-300)
    y = y0
    idx = None
    with torch.no_grad():
        ay = y.abs()
    # Hairer's RMS over a row's n elements: √n goes into the tolerances once
    sqrt_n = math.sqrt(max(y[0].numel(), 1))
    rtol_n, atol_n = rtol * sqrt_n, atol * sqrt_n
    # the loop's constants as 0-d tensors: a Python number costs a conversion in every operation
    one, stretch, eps4 = (torch.tensor(v, **f64) for v in (1.0, 0.999, 4 * _EPS))
    rtol_n, atol_n = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=y.dtype, device=dev)
        for x in (rtol_n, atol_n)
    )
    dtmin_user = None if opts.dtmin is None else torch.tensor(opts.dtmin, **f64)
    code_of = {c: torch.tensor(c, device=dev) for c in (1, 2, 3)}  # MaxIters, DtLessThanMin, ...
    rshape = (-1,) + (1,) * (y.dim() - 1)  # a (B,) tensor over the rows of y
    # times never negative (forward from t ≥ 0, the usual case): |t| = t in the default dtmin
    t_nonneg = direction > 0 and bool((t >= 0).all())
    grad = torch.is_grad_enabled()
    err_prev = torch.ones(B, **f64)
    h_acc = torch.full((B,), math.nan, **f64)  # the last accepted |h| (NaN: none yet)
    accepted_last = torch.ones(B, dtype=torch.bool, device=dev)
    # per-row counts; attempts only written when a row stops, nfe beyond calls_step × attempts
    attempts, nacc, nfe = att_g.clone(), nacc_g.clone(), nfe_g.clone()
    next_out = torch.ones(B, dtype=torch.int64, device=dev)
    codes = torch.zeros(B, dtype=torch.int64, device=dev)
    max_steps = max(opts.max_steps, 0)
    only_end = T == 2  # the one output after the start is every row's end: no search
    explicit = not getattr(solver, "implicit", False)
    from .solvers._esdirk import ESDIRK

    newton = isinstance(solver, ESDIRK)  # a Newton iteration per row (_per_sample_implicit)
    icache = None
    autonomous = getattr(solver, "autonomous", None)
    lin_stats: dict = {}
    rcache = None
    rows, key_rows = torch.arange(B, device=dev), key
    n_run = int(running.sum())
    k = 0  # steps taken: every running row's attempt count
    # the last running row continues in the scalar loop, which steps with host-side decisions
    # (the explicit RK methods and the integral controller, whose state is the step size alone
    # once a step was accepted; scalar tolerances): alone in compact mode; in mask mode with the
    # whole batch, the stopped rows frozen (see _finish_row)
    from .solvers._erk import ExplicitRK

    handoff = (
        isinstance(solver, ExplicitRK)
        and not history
        and not isinstance(rtol, torch.Tensor)
        and not isinstance(atol, torch.Tensor)
    )
    calls_step = None  # the calls of f of a step (the first step's)
    # the stage times of an explicit RK step (nodes in (0, 1]) in one operation per step
    nodes = node_values = None
    if explicit and isinstance(solver, ExplicitRK):
        cs = sorted({float(c) for c in solver.tableau.c if c} | {1.0})
        nodes = {c: i for i, c in enumerate(cs)}
        node_values = torch.tensor(cs, **f64)

    # CPU tensors: the decisions in one compiled kernel over numpy arrays (_per_sample_host)
    hs = None
    if explicit and _per_sample_host.applies(solver, ctrl, rtol, atol, y0):
        hs = _per_sample_host.HostRows(
            {"t": t, "t_end": t_end, "dt": dt, "dtmax": dtmax, "dt_floor": dt_floor, "nfe": nfe},
            y0,
            ctrl=ctrl,
            q=q,
            direction=direction,
            rtol=float(rtol),
            atol=float(atol),
            dtmin=opts.dtmin,
            t_nonneg=t_nonneg,
            only_end=only_end,
            history=history,
            max_steps=max_steps,
            compact=compact,
        )
        key_np = np.ascontiguousarray(key.numpy())

    def flush():  # the working rows' results into the batch's (a running row's: overwritten)
        if hs is not None:  # the host state is the whole batch's
            srcs, idx_ = hs.results(calls_step), None
        else:
            srcs, idx_ = (t, codes, nfe + attempts * calls_step, nacc, attempts), idx
        for dst, src in zip((t_reached_g, codes_g, nfe_g, nacc_g, att_g), srcs):
            if idx_ is None:
                dst.copy_(src)
            else:
                dst.index_copy_(0, idx_, src)

    while True:
        if hs is not None:
            hs.prepare()
            # f may keep its t, and autograd keeps hy: copies, not the kernel's memory
            t, h, hy = hs.t.clone(), hs.h, hs.hy.clone() if grad else hs.hy
        else:
            if direction > 0:
                remaining = t_end - t
            else:
                remaining = t - t_end
            last = dt > remaining * stretch  # stretch a step by up to 0.1% rather than a sliver
            habs = torch.where(last, remaining, dt)  # a stopped row: t_end = t, so a step of 0
            h = habs if direction > 0 else habs.neg()
            hy = (h if h.dtype == y.dtype else h.to(y.dtype)).view(rshape)
        field = _StepField(rhs, t, h, hy, nodes, node_values)
        if explicit:  # the derivative at the step's start is the last step's end (FSAL)
            res = solver.step(field, 0.0, y, 1.0, hy * fraw)
            f1raw = field.last
        elif newton:  # ESDIRK: per-row Jacobians, LUs and Newton iterations
            if icache is None:
                from ._per_sample_implicit import RowESDIRK

                icache = RowESDIRK(solver, call, t, y, rtol, atol, lin_stats, running)
            res = icache.step(t, h, y, fraw, running)
            f1raw = res.f1raw
            nfe += res.nfe_rows
        else:  # Rosenbrock: J (one per row with batched=True) of this step's field, f, ∂f/∂s
            if rcache is None:  # the W operator and stage arithmetic, kept while the rows are
                rcache = solver.init(field, 0.0, y, lin_stats)
                rcache.autonomous = autonomous
            else:  # the same operator, re-pointed at this step's field
                rcache.ls.rhs, rcache.f0 = field, None
            res = solver.step(field, 0.0, y, 1.0, rcache)
            autonomous = rcache.autonomous  # detected once, in the first step
            f1raw = fraw
        k += 1
        counters["nsteps"] = k
        stepped_calls = field.calls
        if calls_step is None:
            calls_step = stepped_calls
        elif stepped_calls != calls_step:
            if hs is None:
                nfe.add_(running, alpha=stepped_calls - calls_step)
            else:
                hs.add_nfe(stepped_calls - calls_step, hs.work[hs.running_rows()])
        if hs is not None:
            n_prev = n_run
            (n_run, n_fail, n_out_max, n_inner_max), selected = hs.decide(
                y, res.y1, res.error, fraw, f1raw, key_np, k
            )
            if selected is not None:
                y, fraw = selected
            else:  # autograd keeps the condition, which the kernel rewrites: a copy
                av = hs.accept_rows.clone() if grad else hs.accept_rows
                y = torch.where(av, res.y1, y)
                fraw = torch.where(av, f1raw, fraw)
            if only_end and n_prev - n_run > n_fail:  # rows finished: their one output, y1
                out.index_put_((torch.where(hs.done, code_of[1], T), rows), res.y1)
            if n_out_max:  # the output code's views (the kernel advanced the rows' next output)
                t_prev, next_out, n_cross, n_inner = t, hs.next_out, hs.n_cross, hs.n_inner
                stepped, key_rows = hs.stepped, hs.key_rows(key)
        else:
            if grad:  # the decisions need no graph (entering no_grad costs, so only when needed)
                with torch.no_grad():
                    ay1, errn = _row_error_norm(res.error, ay, res.y1, rtol_n, atol_n)
            else:
                ay1, errn = _row_error_norm(res.error, ay, res.y1, rtol_n, atol_n)
            accept = (errn <= one) & running  # NaN/Inf fail the test
            if newton:
                accept = accept & res.ok
            if history:
                fac = ctrl.factor_batch(errn, err_prev, q, accepted_last, habs / h_acc)
                err_prev = torch.where(accept, errn.clamp(min=1e-4), err_prev)
                h_acc = torch.where(accept, habs, h_acc)
            else:
                fac = ctrl.factor_batch(errn, None, q, accepted_last)
            # a rejection shrinks the step (fac < 1), so dtmax binds only after an acceptance
            if newton:  # a row whose Newton failed halves its step (as the scalar loop)
                dt = torch.where(res.ok, torch.minimum(habs * fac, dtmax), dt * 0.5)
            else:
                dt = torch.minimum(habs * fac, dtmax)
            accepted_last = accept  # a stopped row's value is never read
            t_new = torch.where(last, t_end, field.time(1.0))  # t + h
            stuck = None
            if opts.dtmin is not None:  # a user's dtmin may allow steps below t's resolution
                stuck = accept & (t_new == t)
                accept = accept & ~stuck
            nacc.add_(accept)
            t_prev = t
            t = torch.where(accept, t_new, t)
            done = accept & last
            cont = running ^ done  # done ⊆ running
            if dtmin_user is None:
                small = dt < torch.maximum(t if t_nonneg else t.abs(), dt_floor).mul_(eps4)
            else:
                small = dt < dtmin_user
            fail = cont if k >= max_steps else cont & small
            if stuck is not None:
                fail = fail | stuck
            stepped, running = running, cont ^ fail  # fail ⊆ cont
            # outputs this step passed: row b saves t_out[b, next_out[b] : next_out[b] + n_cross[b]]
            if only_end:  # the one sync: how many rows go on and how many failed, in one number
                n_cross = None
                sync = torch.add(running.count_nonzero(), fail.count_nonzero(), alpha=1 << 32)
            else:
                kt = (direction * t_new).unsqueeze(1)
                n_cross = (torch.searchsorted(key_rows, kt, right=True).squeeze(1) - next_out).mul_(
                    accept
                )
                n_inner = (torch.searchsorted(key_rows, kt).squeeze(1) - next_out).mul_(accept)
                sync = torch.stack(
                    [running.count_nonzero(), fail.count_nonzero(), n_cross.max(), n_inner.max()]
                )
            av = accept.view(rshape)
            y = torch.where(av, res.y1, y)
            fraw = torch.where(av, f1raw, fraw)
            ay = torch.where(av, ay1, ay)
            n_prev = n_run
            if only_end:
                n_fail, n_run = divmod(sync.item(), 1 << 32)  # the one sync
                n_out_max = n_inner_max = 0
            else:
                n_run, n_fail, n_out_max, n_inner_max = sync.tolist()  # the one sync
            if n_run < n_prev:  # rows stopped: their attempts, and no more steps for them
                attempts.masked_fill_(stepped ^ running, k)
                if only_end and n_prev - n_run > n_fail:  # rows finished: their one output, y1
                    out.index_put_((torch.where(done, code_of[1], T), rows), res.y1)
            if n_fail:  # DtLessThanMin (Unstable when the last error was NaN/Inf), then MaxIters
                code = torch.where(
                    small, torch.where(torch.isfinite(errn), code_of[2], code_of[3]), code_of[1]
                )
                if stuck is not None:
                    code = torch.where(stuck, code_of[2], code)
                codes += code * fail
                t_end = torch.where(fail, t, t_end)
        for j in range(n_out_max):
            kj = next_out + j
            m = j < n_cross
            if j < n_inner_max:  # some row has an output inside its step: the dense output
                calls = field.calls
                tq = key_rows.gather(1, kj.clamp(max=T - 1).unsqueeze(1)).squeeze(1) * direction
                theta = torch.where(m, (tq - t_prev) / torch.where(m, h, 1.0), 0.0)
                yq = _interpolate_rows(solver, res.dense, theta.to(y.dtype), explicit or newton)
                yq = torch.where(_rows(j >= n_inner, yq), res.y1, yq)  # at the end: y1 itself
                if field.calls != calls:  # Vern7/DP8: the dense stages, on every stepped row
                    if hs is None:
                        nfe.add_(stepped, alpha=field.calls - calls)
                    else:
                        hs.add_nfe(field.calls - calls, hs.work[hs.stepped.numpy()])
            else:
                yq = res.y1
            out.index_put_((torch.where(m, kj, T), rows), yq)
        if n_out_max and hs is None:
            next_out = next_out + n_cross
        counters["ncalls"] += field.calls
        counters["nrows"] += field.calls * y.shape[0]
        if n_run == 0:
            break
        if compact and n_run < y.shape[0] and hs is not None:
            y, fraw = hs.compact(y, fraw, n_run)
            rows = hs.rows
        elif compact and n_run < y.shape[0]:
            flush()
            rcache = None  # sized for the rows
            keep = _running_rows(running, n_run)
            icache = icache.select(keep) if icache is not None else None
            idx = keep if idx is None else idx[keep]
            rows, key_rows = idx, key[idx]
            y, fraw, ay, accepted_last, running = (
                x[keep] for x in (y, fraw, ay, accepted_last, running)
            )
            # the (B,) tensors by dtype in one selection each
            t, t_end, dt, dtmax, dt_floor, err_prev, h_acc = torch.stack(
                [t, t_end, dt, dtmax, dt_floor, err_prev, h_acc]
            )[:, keep].unbind()
            attempts, nacc, nfe, next_out, codes = torch.stack(
                [attempts, nacc, nfe, next_out, codes]
            )[:, keep].unbind()
            # tensor tolerances come shaped like the state (B, ...)
            rtol_n, atol_n = (
                x[keep] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                for x in (rtol_n, atol_n)
            )
        if handoff and n_run == 1:  # the row's state, from the host arrays or the tensors
            if hs is not None:
                r = 0 if y.shape[0] == 1 else int(hs.running_rows()[0])  # among the stepped rows
                t_h, dt_h, acc_h, nxt, dtmax_h, floor_h = hs.row_state(r)
                t_rest = key_np[int(hs.work[r]), nxt:]
                t_rows = hs.times()
            else:
                r = 0 if y.shape[0] == 1 else int(running.nonzero())  # the row (once per solve)
                t_h, dt_h, acc_h, nxt, dtmax_h, floor_h = torch.stack(
                    [t, dt, accepted_last.to(t.dtype), next_out.to(t.dtype), dtmax, dt_floor]
                )[:, r].tolist()
                nxt = int(nxt)
                t_rest, t_rows = key_rows[r, nxt:], t
            if acc_h:  # after a rejection the controller's state is more than the step size
                k_sub = _finish_row(
                    rhs,
                    y,
                    fraw,
                    [t_h] + (t_rest * direction).tolist(),
                    solver,
                    opts,
                    ctrl,
                    dt_h,
                    dtmax_h,
                    floor_h,
                    max_steps - k,
                    out,
                    nxt,
                    rows[r],
                    None if y.shape[0] == 1 else (r, t_rows),
                )
                if hs is not None:
                    hs.finish_row(r, k_sub, k, calls_step)
                else:
                    t = t.clone()
                    t[r] = k_sub["t"]
                    codes[r] = k_sub["code"]
                    nacc[r] += k_sub["naccept"]
                    attempts[r] = k + k_sub["attempts"]
                    nfe[r] += k_sub["calls"] - k_sub["attempts"] * calls_step
                counters["ncalls"] += k_sub["calls"]
                counters["nrows"] += k_sub["calls"] * y.shape[0]
                counters["nsteps"] = k + k_sub["attempts"]
                break
    flush()
    counters.update(
        {k: v for k, v in lin_stats.items() if k in ("njac", "nlu", "nsolve", "nnewton")}
    )
    return result()


def _finish_row(
    rhs, y, f0, t_rest, solver, opts, ctrl, dt, dtmax, dt_floor, max_steps, out, nxt, row, in_batch
) -> dict:
    """Continue one row of a per-sample solve in :func:`integrate` from the time ``t_rest[0]``
    through its remaining output times ``t_rest[1:]`` with the row's step size, derivative
    (``f0``, unscaled), dtmin floor, dtmax and remaining ``max_steps``; writes the outputs into
    ``out[nxt:, row]``.

    ``in_batch`` None: ``y`` (1, ...) is the row. Else ``(r, t_rows)`` (mask mode): ``y`` is the
    whole batch and ``r`` the row, f keeps seeing every row, the stopped ones at their own times
    ``t_rows`` with their derivative zeroed (they stay put, as with the steps of size 0 of the
    per-sample loop), and the error norm is the row's alone (the one its independent solve takes).
    """
    calls = 0
    f64 = {"dtype": torch.float64, "device": y.device}
    norm = None
    if in_batch is None:

        def rhs1(s, yy):
            nonlocal calls
            calls += 1
            return rhs(torch.full((1,), s, **f64), yy)

    else:
        r, t_rows = in_batch
        run = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        run[r] = True
        keep = run.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
        f0 = f0 * keep

        def rhs1(s, yy):
            nonlocal calls
            calls += 1
            return rhs(t_rows.masked_fill(run, s), yy) * keep

        kind = small_norm_kind(y[r], opts.rtol, opts.atol)
        inv_sqrt_n = 1.0 / math.sqrt(max(y[r].numel(), 1))
        rtol_h, atol_h = host_tolerance(opts.rtol), host_tolerance(opts.atol)

        def norm(err, y0, y1, rtol, atol):
            # the scalar loop's norm of the row alone (host-side for tiny rows, as its own solve)
            if kind is not None:
                e, _ = rms_norm_small(
                    kind, err[r], abs_host(y0[r], kind), y1[r], rtol_h, atol_h, inv_sqrt_n
                )
            else:
                with torch.no_grad():
                    e, _ = rms_norm_and_abs(err[r], y0[r].abs(), y1[r], rtol, atol, inv_sqrt_n)
            return np.float64(e)  # the loop takes .item()

    sub = LoopOptions(
        rtol=opts.rtol,
        atol=opts.atol,
        dt=dt,
        adaptive=True,
        max_steps=max_steps,
        dense=False,
        controller=ctrl,
        dtmin=opts.dtmin,
        dtmax=dtmax,
        f0=f0,
        dt_floor=dt_floor,
        norm=norm,
    )
    stats: dict = {}
    res = integrate(rhs1, y, t_rest, solver, sub, stats)
    if len(res.ys) > 1:
        ys = torch.stack(res.ys[1:])
        out[nxt : nxt + len(res.ys) - 1, row] = ys[:, 0] if in_batch is None else ys[:, in_batch[0]]
    return {
        "t": res.t_reached,
        "code": PER_SAMPLE_CODES.index(res.retcode),
        "calls": calls,
        "naccept": stats["naccept"],
        "attempts": stats["naccept"] + stats["nreject"],
    }


def _stats(nfe, naccept, nreject, counters) -> dict:
    return {"nfe": nfe, "naccept": naccept, "nreject": nreject, **counters}


def _interpolate_rows(solver, dense, theta: torch.Tensor, explicit: bool) -> torch.Tensor:
    """The step's dense output at a different θ in every row (θ (B,))."""
    from .solvers._erk import _ExtraStageDense

    if isinstance(dense, _ExtraStageDense):
        dense = dense.data()
    if explicit and len(dense) == 4:  # y0 + Σ_i b_i(θ) k_i, b_i(θ) = Σ_p B[i,p] θ^(p+1); dt=1
        y0, K, W, dt = dense
        Bm = W.tensor
        powers = torch.stack([theta ** (p + 1) for p in range(Bm.shape[1])])  # (P, B)
        w = (Bm @ powers) * dt  # (s, B)
        n = y0.shape[0]
        return y0 + torch.einsum("sb,sbn->bn", w, K.view(K.shape[0], n, -1)).view_as(y0)
    return solver.interpolant(dense, _rows(theta, dense[0]))
