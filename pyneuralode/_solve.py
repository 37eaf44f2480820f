"""``solve``: validate, pick the backend and the sensitivity algorithm, hand over, package the result."""
from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import numpy as np
import torch

from ._loop import LoopOptions
from ._problem import ODEProblem
from ._solution import Solution, SolveError
from ._per_sample import gather, is_per_sample, union_times
from .controllers import PIController, PredictiveController
from .sensitivity import AbstractSensitivity, DirectAdjoint
from .solvers import AbstractSolver, Tsit5, lookup

BACKENDS = ("torch", "julia")


def _resolve_solver(solver) -> AbstractSolver:
    if solver is None:
        return Tsit5()
    if isinstance(solver, str):
        return lookup(solver)()
    if isinstance(solver, type) and issubclass(solver, AbstractSolver):
        raise TypeError(f"solver: got the class {solver.__name__}; pass an instance, e.g. solver=pn.{solver.__name__}()")
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solver: expected a solver such as pn.Tsit5() or a name such as 'tsit5', got {type(solver).__name__}")
    return solver


def _resolve_sensealg(sensealg) -> AbstractSensitivity:
    if sensealg is None:
        return DirectAdjoint()
    if isinstance(sensealg, type) and issubclass(sensealg, AbstractSensitivity):
        raise TypeError(f"sensealg: got the class {sensealg.__name__}; pass an instance, e.g. sensealg=pn.{sensealg.__name__}()")
    if not isinstance(sensealg, AbstractSensitivity):
        raise TypeError(f"sensealg: expected e.g. pn.DirectAdjoint() or pn.InterpolatingAdjoint(), got {type(sensealg).__name__}")
    return sensealg


def check_flag(name: str, value, allow_none: bool = False):
    """A yes/no option: ``True``/``False`` (or a numpy bool); never a string that reads as True."""
    if allow_none and value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    hint = " (or None for the default)" if allow_none else ""
    raise TypeError(f"{name}: expected True or False{hint}, got {value!r} ({type(value).__name__})")


def _check_count(name: str, value) -> int:
    """A positive integer; numpy integers are accepted."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected a positive int, got {value!r} "
                        f"({type(value).__name__})") from None
    if v <= 0:
        raise ValueError(f"{name}: must be a positive int, got {v}")
    return v


def _check_step_bound(name: str, value, allow_zero: bool):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str):
        raise TypeError(f"{name}: expected a number (a step size) or None, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number (a step size) or None, "
                        f"got {type(value).__name__}") from None
    if math.isnan(v) or v < 0 or (v == 0 and not allow_zero) or (math.isinf(v) and name == "dtmin"):
        need = ("a finite number >= 0 (0: no floor but the float resolution of t)" if allow_zero
                else "a positive number (inf: no limit)")
        raise ValueError(f"{name}: must be {need}, got {value!r}; pass None for the default")
    return abs(v)


def make_options(solver, *, rtol, atol, dt, adaptive, max_steps, dense, progress, controller,
                 dtmin, dtmax, y0: torch.Tensor | None = None) -> LoopOptions:
    adaptive = check_flag("adaptive", adaptive)
    progress = check_flag("progress", progress)
    dense = check_flag("dense", dense)
    if adaptive and not solver.adaptive_capable:
        raise ValueError(
            f"solver: {type(solver).__name__} has no error estimate, so it cannot adapt its steps; "
            f"pass adaptive=False and a step dt=..., or use an adaptive solver such as pn.Tsit5()"
        )
    if dt is not None:
        if isinstance(dt, str):
            raise TypeError(f"dt: expected a positive number, got {dt!r}")
        try:
            dt = float(dt)
        except (TypeError, ValueError):
            raise TypeError(f"dt: expected a positive number, got {type(dt).__name__}") from None
        if not math.isfinite(dt) or dt == 0:
            raise ValueError(f"dt: must be a finite non-zero step size, got {dt}")
        dt = abs(dt)
    if not adaptive and dt is None:
        raise ValueError("dt: fixed-step integration (adaptive=False) needs a step size; pass dt=..., e.g. dt=0.01")
    max_steps = _check_count("max_steps", max_steps)
    dtmin = _check_step_bound("dtmin", dtmin, allow_zero=True)
    dtmax = _check_step_bound("dtmax", dtmax, allow_zero=False)
    if dtmin is not None and dtmax is not None and dtmin > dtmax:
        raise ValueError(f"dtmin, dtmax: dtmin={dtmin:g} exceeds dtmax={dtmax:g}; "
                         f"dtmin must be <= dtmax")
    if controller is not None and not (callable(getattr(controller, "factor", None))
                                       and hasattr(controller, "factor_min")):
        raise TypeError(f"controller: expected a step-size controller such as pn.PIController() "
                        f"or pn.PredictiveController() (or None for the solver's default), "
                        f"got {controller!r}")
    if adaptive or getattr(solver, "implicit", False):
        _check_tolerance_pair(rtol, atol)
    if y0 is not None:
        _check_state_dtype(solver, y0)
    return LoopOptions(
        rtol=rtol, atol=atol, dt=dt, adaptive=adaptive, max_steps=max_steps, dense=dense,
        progress=progress, controller=controller, dtmin=dtmin, dtmax=dtmax,
    )


def _check_tolerance_pair(rtol, atol):
    """The error test needs a positive tolerance in every component (rtol = atol = 0 divides
    by 0)."""
    def zero(tol):
        if isinstance(tol, torch.Tensor):
            return tol == 0
        return torch.tensor(tol == 0)

    if bool((zero(rtol) & zero(atol)).any()):
        raise ValueError("rtol, atol: both are 0 (in some component), so no error is acceptable; "
                         "give a positive rtol (e.g. 1e-6) or atol (e.g. 1e-9)")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_state_dtype(solver, y0: torch.Tensor):
    if y0.dtype in _LOW_PRECISION and getattr(solver, "implicit", False):
        raise TypeError(f"y0: dtype {y0.dtype} is not supported by the implicit solver "
                        f"{type(solver).__name__} (torch's linear algebra needs float32 or "
                        f"float64); convert the state with y0.float() and cast the result back, "
                        f"or use an explicit solver such as pn.Tsit5()")


def solve(
    f: Callable,
    y0,
    t,
    solver: AbstractSolver | str | None = None,
    *,
    rtol=1e-6,
    atol=1e-9,
    dt=None,
    adaptive: bool = True,
    max_steps: int = 100_000,
    args: Sequence = (),
    sensealg: AbstractSensitivity | None = None,
    backend: str = "torch",
    progress: bool = False,
    throw: bool = True,
    dense: bool | None = None,
    controller: PIController | PredictiveController | None = None,
    dtmin: float | None = None,
    dtmax: float | None = None,
    event: Callable | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
    compile: bool = False,
    norm: Callable | None = None,
) -> Solution:
    """Solve ``dy/dt = f(t, y, *args)`` from ``y0`` at ``t[0]`` and save at every time in ``t``.

    ``y0`` a floating tensor of any shape, or a tuple of tensors; ``t`` a strictly monotonic 1-D
    tensor or sequence (decreasing for backward integration). ``solver`` defaults to
    :class:`Tsit5`. ``rtol``/``atol`` are scalars or tensors broadcastable to the state.
    Fixed steps: ``adaptive=False, dt=h``. ``sensealg`` picks how gradients cross the solve
    (default :class:`DirectAdjoint`). ``dense`` keeps the dense output for ``sol(tq)`` (default:
    yes, except for the memory-saving ``BacksolveAdjoint``/``InterpolatingAdjoint``).
    ``controller`` (a :class:`PIController` or :class:`PredictiveController`) defaults to the solver's
    ``default_controller()``: integral control for explicit methods (torchdiffeq's, diffrax's), Gustafsson's
    predictive control for Rosenbrock methods (Hairer's RODAS), SciML's PI gains for the other implicit ones.
    ``event=g`` (``g(t, y)`` → scalar tensor) ends the solve where ``g`` crosses zero: outputs after
    that time are not saved, ``retcode`` is ``"Terminated"``, and ``sol.event_t``/``sol.event_y``
    (differentiable, :mod:`pyneuralode.events`) give the event. With a continuous adjoint the event is
    located by a first, gradient-free solve and the adjoint solve then runs to that time.

    ``adjoint_params``: the tensors f uses that the continuous adjoints and
    ``DirectAdjoint(checkpoints=...)`` differentiate besides ``y0``, ``t`` and ``args`` (as
    torchdiffeq's); default: the parameters of every ``nn.Module`` f reaches. A tensor f uses
    that requires grad and would get no gradient raises ``ValueError``. ``DirectAdjoint()``
    differentiates through the graph and reaches every tensor anyway.

    Per-sample output times: ``t`` shaped ``(B, T)`` for ``y0`` shaped ``(B, ...)`` (rows sharing
    their first time) gives ``ys`` shaped ``(T, B, ...)`` with ``ys[j, b]`` at ``t[b, j]``.

    Returns a :class:`Solution` with ``ys`` shaped ``(len(t), *y0.shape)``. On failure raises
    :class:`SolveError` (``throw=True``) or returns the partial solution with its ``retcode``.

    ``compile=True`` (needs numba, ``pip install 'pyneuralode[compiled]'``) traces f once and runs
    the whole solve as native code (:mod:`pyneuralode.compiled`): small CPU systems, the explicit
    RK, Rosenbrock, ESDIRK and QNDF methods; gradients by compiled forward sensitivities (when y0,
    args or tensors f uses require grad); with a ``batched=True`` solver the rows of y0 are
    independent systems, each with its own steps (:func:`pyneuralode.compiled.solve_ensemble`);
    no events.
    """
    throw = check_flag("throw", throw)
    dense = check_flag("dense", dense, allow_none=True)
    compile = check_flag("compile", compile)
    if compile and (event is not None or sensealg is not None or adjoint_params is not None
                    or norm is not None or backend != "torch" or progress or is_per_sample(y0, t)):
        raise ValueError("compile=True: events, sensealg, adjoint_params, norm, backend='julia', progress "
                         "and per-sample output times are not supported on the compiled path yet; "
                         "pass compile=False")
    if is_per_sample(y0, t):
        if event is not None:
            raise ValueError("event: not supported together with per-sample output times t of shape (B, T)")
        union, index = union_times(t)
        sol = solve(f, y0, union, solver, rtol=rtol, atol=atol, dt=dt, adaptive=adaptive, max_steps=max_steps, args=args,
                    sensealg=sensealg, backend=backend, progress=progress, throw=throw, dense=dense, controller=controller,
                    dtmin=dtmin, dtmax=dtmax, adjoint_params=adjoint_params)
        return Solution(ts=t, ys=gather(sol.ys, index), retcode=sol.retcode, stats=sol.stats, segments=sol._segments,
                        t_reached=sol.t_reached, solver=sol.solver)
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; use 'torch' (native, the default) or 'julia'")
    solver = _resolve_solver(solver)
    sensealg = _resolve_sensealg(sensealg)
    problem = ODEProblem(f, y0, t, args=args, rtol=rtol, atol=atol, adjoint_params=adjoint_params)
    if dense is None:
        dense = sensealg.keeps_dense
    opts = make_options(
        solver, rtol=problem.rtol, atol=problem.atol, dt=dt, adaptive=adaptive, max_steps=max_steps,
        dense=dense, progress=progress, controller=controller, dtmin=dtmin, dtmax=dtmax,
        y0=problem.y0,
    )
    if norm is not None and not callable(norm):
        raise TypeError(f"norm: expected a function norm(err, y0, y1, rtol, atol) -> float tensor "
                        f"(or None for the RMS norm), got {type(norm).__name__}")
    opts.norm = norm  # e.g. torchdiffeq's norm(tensor), adapted by pn.odeint
    if compile:
        from .compiled import solve_compiled

        return solve_compiled(problem, solver, opts, throw=throw)
    locator = None
    if event is not None:
        from .events import EventLocator
        from .sensitivity import DirectAdjoint

        if not callable(event):
            raise TypeError(f"event: expected a function g(t, y) -> scalar tensor, got {type(event).__name__}")
        if backend != "torch":
            raise ValueError("event: events run on the native engine only; drop backend='julia' or the event")
        if isinstance(sensealg, DirectAdjoint) and sensealg.checkpoints is not None:
            raise ValueError("event: DirectAdjoint(checkpoints=...) does not support events; use DirectAdjoint() "
                             "(the whole graph) or a continuous adjoint such as pn.InterpolatingAdjoint()")
        if not isinstance(sensealg, DirectAdjoint):
            from .events import solve_with_event_adjoint

            return solve_with_event_adjoint(
                f, y0, problem, solver, sensealg, event,
                dict(rtol=rtol, atol=atol, dt=dt, adaptive=adaptive, max_steps=max_steps, args=args, progress=progress,
                     throw=throw, dense=dense, controller=controller, dtmin=dtmin, dtmax=dtmax,
                     adjoint_params=adjoint_params, norm=norm))
        locator = EventLocator(event, problem)
        opts.event = locator
    if backend == "julia":
        from .julia import _backend

        return _backend.solve(problem, solver, sensealg, opts, throw=throw)

    stats: dict = {"nfe": 0, "naccept": 0, "nreject": 0}
    if problem.y0.numel() == 0:
        return _empty_state_solution(problem, solver, opts, stats)
    ts = problem.t
    time_grad = ts.requires_grad and torch.is_grad_enabled()
    y0_in = problem.y0
    if time_grad:
        # dΦ/dt0 = -(∂Φ/∂y0) f(t0, y0): shift y0 by a zero-valued term whose gradient carries that.
        f0 = problem.call(ts[0], problem.y0).detach()
        y0_in = problem.y0 - (ts[0] - ts[0].detach()).to(problem.y0.dtype) * f0
    ys, loop = sensealg.run(problem, y0_in, solver, opts, stats)
    k = ys.shape[0]
    if time_grad and k > 0:
        parts = [problem.y0.unsqueeze(0)]
        if k > 1:
            tk = ts[1:k]
            fk = torch.stack([problem.call(tk[i].detach(), ys[i + 1].detach()) for i in range(k - 1)]).detach()
            dt_shift = (tk - tk.detach()).to(ys.dtype).reshape(-1, *([1] * (ys.ndim - 1)))
            parts.append(ys[1:] + dt_shift * fk)
        ys = torch.cat(parts)
    sol = Solution(
        ts=ts[:k] if k < ts.shape[0] else ts,
        ys=problem.unpack(ys),
        retcode=loop.retcode,
        stats=stats,
        segments=loop.segments,
        unflatten=problem.unpack if problem.is_tuple else None,
        t_reached=loop.t_reached,
        solver=solver,
    )
    if locator is not None and loop.event_t is not None:
        from .events import differentiable_event

        te, ye = differentiable_event(event, problem, loop.event_t, loop.y_final)
        sol.event_t, sol.event_y = te, problem.unpack(ye)
    if not loop.retcode.successful and throw:
        raise SolveError(f"solve failed with retcode {loop.retcode.value}: {loop.message} (pass throw=False to get the partial solution)", loop.retcode, loop.t_reached, sol)
    return sol


def _empty_state_solution(problem: ODEProblem, solver, opts: LoopOptions, stats: dict) -> Solution:
    """A state with no components does not change: every output is y0 (no solver step is needed)."""
    from ._solution import DenseSegment

    n = len(problem.t_list)
    ys = problem.y0.unsqueeze(0).expand(n, *problem.y0.shape).clone()
    t0, t1 = problem.t_list[0], problem.t_list[-1]
    segments = None
    if opts.dense:
        segments = [DenseSegment(t0, t1 - t0, problem.y0, _constant)] if n > 1 else []
    return Solution(ts=problem.t, ys=problem.unpack(ys), retcode="Success", stats=stats,
                    segments=segments, unflatten=problem.unpack if problem.is_tuple else None,
                    t_reached=t1, solver=solver)


def _constant(y, theta):
    return y
