"""The integrate loop: the only code that steps.

It asks the solver for attempted steps, accepts or rejects them with the error norm and the
controller, saves the output times (by the step's dense output; output times never force
steps), keeps dense segments when asked, and ends every failure with a return code. Every loop
is bounded by ``max_steps``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from ._solution import DenseSegment, ReturnCode
from .controllers import (abs_host, host_tolerance, initial_step, rms_norm_and_abs, rms_norm_small,
                          small_norm_kind)

_EPS = 2.220446049250313e-16


@dataclass
class LoopOptions:
    """Numerical options of one integration (already validated)."""

    rtol: Any = 1e-6
    atol: Any = 1e-9
    dt: Optional[float] = None
    adaptive: bool = True
    max_steps: int = 100_000
    dense: bool = True
    progress: bool = False
    #: step-size controller (``PIController``, ``PredictiveController``); ``None`` = the solver's ``default_controller()``
    controller: Optional[Any] = None
    dtmin: Optional[float] = None
    dtmax: Optional[float] = None
    #: torchdiffeq's ``min_step``: adaptive steps are at least this long, and a step this short is
    #: accepted whatever its error (not a failure floor like ``dtmin``). ``None`` = no such bound.
    min_step: Optional[float] = None
    #: error norm ``norm(err, y0, y1, rtol, atol) -> 0-d tensor``; ``None`` = Hairer's RMS norm
    #: (``controllers.error_norm``). Used e.g. by the adjoint seminorm (Kidger, Chen, Lyons 2021).
    norm: Optional[Callable] = None
    #: ``terminate(t, y, cache) -> bool`` called after every accepted step (``cache`` is the solver's,
    #: e.g. ``f(t, y)`` for explicit RK); ``True`` ends the integration with ``ReturnCode.Terminated``
    #: (SciML's terminating callback; used by ``pn.DynamicSS``). ``None`` = never.
    terminate: Optional[Callable] = None
    #: ``event(seg, t, t_new, y_new) -> Optional[float]`` called for every accepted step before its
    #: outputs are saved; a time in ``(t, t_new]`` ends the integration there (outputs after it are
    #: not saved, ``y_final`` is the dense output at that time, ``ReturnCode.Terminated``).
    event: Optional[Callable] = None
    #: step exactly to these times (``grid[0]`` = the start, ``grid[-1]`` = the end; diffrax's
    #: ``StepTo``), ignoring the error estimate; used to replay a forward pass's accepted steps
    #: when an adjoint re-solves from a checkpoint. ``None`` = adaptive or fixed ``dt`` steps.
    grid: Optional[List[float]] = None
    #: keep the times of the accepted steps in ``LoopResult.step_ts``
    record_steps: bool = False
    #: ``on_accept(t, y)`` called after every accepted step with the new time and state (e.g. to
    #: keep checkpoints); ``None`` = nothing
    on_accept: Optional[Callable] = None


@dataclass
class LoopResult:
    ys: List[torch.Tensor]
    retcode: ReturnCode
    t_reached: float
    segments: Optional[List[DenseSegment]]
    y_final: torch.Tensor
    message: str = ""
    event_t: Optional[float] = None
    step_ts: Optional[List[float]] = None


def _progress_bar(enabled: bool, t0: float, t1: float):
    if not enabled:
        return None
    from ._progress import progress  # tqdm on a terminal, a few summary lines in logs

    return progress(total=1000, desc=f"solve t∈[{t0:g}, {t1:g}]", leave=False,
                    bar_format="{l_bar}{bar}| {elapsed}<{remaining}")


def _stuck_hint(solver, y: torch.Tensor) -> str:
    """What to try when the step size collapses; never the solver already in use."""
    if y.dtype in (torch.float16, torch.bfloat16):
        return (f"; {y.dtype} resolves too few digits for these tolerances: use float32/float64 "
                f"(y0.float()) or loosen rtol/atol")
    if getattr(solver, "implicit", False):
        return ("; the tolerances may be too tight for the dtype, or the solution may blow up "
                "or be non-smooth there (check f near that time)")
    return ("; the problem may be stiff (try an implicit solver such as pn.Rodas5P() or "
            "pn.KenCarp4()) or the tolerances too tight for the dtype")


def _f_nonfinite(rhs: Callable, t: float, y: torch.Tensor, t_next: float) -> bool:
    """Whether f returns NaN/Inf at the current state, at its time or at the end of the longest
    step tried (a Newton iteration that met NaN there fails without saying why)."""
    with torch.no_grad():
        return any(not bool(torch.isfinite(rhs(tt, y)).all()) for tt in (t, t_next))


def _increment_lost(rhs: Callable, t: float, y: torch.Tensor, y1: torch.Tensor, h: float,
                    rtol, atol) -> bool:
    """float16/bfloat16: the step left y unchanged though h·f(t, y) exceeds the tolerance (the
    update was rounded away, so the solve would return y0 with ``Success``)."""
    if not torch.equal(y1, y):
        return False
    with torch.no_grad():
        inc = (h * rhs(t, y).float()).abs()
        rtol32, atol32 = (torch.as_tensor(tol, dtype=torch.float32) for tol in (rtol, atol))
        scale = atol32 + rtol32 * y.abs().float()
        return bool((inc > scale).any())


def integrate(rhs: Callable, y0: torch.Tensor, t_out: List[float], solver, opts: LoopOptions, stats: dict) -> LoopResult:
    """Integrate ``dy/dt = rhs(t, y)`` from ``t_out[0]`` through every time in ``t_out``.

    ``rhs(t, y)`` takes a Python float ``t``. Returns the states at the output times reached, the
    dense segments (if ``opts.dense``), a return code and the time reached.
    """
    n_out = len(t_out)
    t = t_out[0]
    y = y0
    ys = [y0]
    segments: Optional[List[DenseSegment]] = [] if opts.dense else None
    if n_out == 1:
        return LoopResult(ys, ReturnCode.Success, t, segments, y0)
    t_end = t_out[-1]
    direction = 1.0 if t_end > t else -1.0
    span = abs(t_end - t)
    cache = solver.init(rhs, t, y, stats, rtol=opts.rtol, atol=opts.atol)
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
            dt = initial_step(rhs, t, y, f0, direction, getattr(solver, "start_order", solver.order), rtol, atol, stats)
            dt = min(dt, span)
    elif grid is not None:
        if len(grid) < 2 or grid[0] != t or grid[-1] != t_end:
            raise ValueError("internal: a step grid must run from the first to the last output time")
        dt = abs(grid[1] - grid[0])
    else:
        dt = abs(opts.dt)
    step_ts: Optional[List[float]] = [] if opts.record_steps else None
    dtmax = abs(opts.dtmax) if opts.dtmax is not None else span
    dt_floor = max(_EPS * span, 1e-300)  # near t = 0: a relative floor on the span's scale
    dt = min(dt, dtmax)
    min_step = abs(opts.min_step) if opts.min_step and adaptive else 0.0
    dt = max(dt, min_step)
    # Error norm: the default (Hairer's RMS norm) takes a fast path that reuses |y| from the
    # previous step and never records a graph; a custom ``opts.norm`` gets (err, y0, y1, rtol, atol).
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
                    hint = ("; the state, its error estimate or f(t, y) became NaN/Inf (check f "
                            "for NaN/Inf, e.g. a division by zero, a log/sqrt of a negative "
                            "number or an overflow)")
                elif solve_failed:
                    hint = ("; the implicit (Newton) solves kept failing: check the Jacobian "
                            "(jac=...) and f near that time, or loosen the tolerances")
                else:
                    hint = _stuck_hint(solver, y)
                message = (f"the step size fell to {dt:.3g} (below dtmin={dtmin:.3g}) "
                           f"at t={t:.6g}{hint}")
                break
            attempts += 1
            if attempts > max(opts.max_steps, 0):
                retcode = ReturnCode.MaxIters
                message = f"reached max_steps={opts.max_steps} at t={t:.6g}; raise max_steps or loosen the tolerances"
                break
            # Adaptive: stretch a step by up to 0.1% rather than leave a sliver; fixed steps: accumulated
            # rounding in t must not leave a sliver of a last step.
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
                    message = f"the implicit solve of a fixed step failed at t={t:.6g}; use a smaller dt or adaptive=True"
                    break
                dt *= 0.5  # a failed implicit solve halves the step (RADAU5, OrdinaryDiffEq, scipy BDF)
                accepted_last = False
                if res.cache_on_reject is not None:
                    cache = res.cache_on_reject
                continue
            if adaptive:
                if small_norm is not None:
                    errn, ay1 = rms_norm_small(small_norm, res.error, ay, res.y1, rtol, atol, inv_sqrt_n)
                elif norm is None:
                    if grad_mode:
                        with torch.no_grad():
                            errn, ay1 = rms_norm_and_abs(res.error, ay, res.y1, rtol, atol, inv_sqrt_n)
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
                    fac = ctrl.factor(errn, err_prev, q_step, accepted_last,
                                      None if h_accepted is None else abs(h) / h_accepted)
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
                message = (f"a step of {abs(h):.3g} at t={t:.6g} left the state unchanged in "
                           f"{y.dtype}: its change is below the dtype's resolution "
                           f"(eps={eps:.3g}), so the solution would stall; use float32/float64 "
                           f"(y0.float()) or loosen rtol/atol")
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
                return LoopResult(ys, ReturnCode.Terminated, t_event, segments, y_event,
                                  f"the event fired at t={t_event:.9g}", event_t=t_event)
            if not adaptive and next_out != saved_before and not torch.isfinite(ys[-1]).all():
                retcode = ReturnCode.Unstable
                message = f"the state became NaN/Inf by t={t_new:.6g}; use a smaller dt or an adaptive solver"
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
