"""``solve``: validate, pick the backend and the sensitivity algorithm, hand over, package the
result."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from ._loop import LoopOptions, integrate
from ._loop_options import StepSettings, check_flag, options_for
from ._per_sample import check_per_sample, gather, is_per_sample, solve_per_sample, union_times
from ._problem import ODEProblem
from ._solution import ReturnCode, Solution, SolveError
from ._time import start_time
from .controllers import PIController, PredictiveController
from .events import EventLocator, differentiable_event
from .sensitivity import AbstractSensitivity, DirectAdjoint
from .sensitivity._resolve import resolve_sensealg
from .solvers import AbstractSolver, Tsit5
from .solvers._resolve import resolve_solver

BACKENDS = ("torch", "julia")


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
    sensealg: AbstractSensitivity | str | None = None,
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
    per_sample: bool | str = False,
) -> Solution:
    """Solve ``dy/dt = f(t, y, *args)`` from ``y0`` at ``t[0]`` and save at every time in ``t``.

    ``y0`` a floating tensor of any shape, or a tuple of tensors; ``t`` a strictly monotonic 1-D
    tensor or sequence (decreasing for backward integration). ``solver`` defaults to
    :class:`Tsit5`. ``rtol``/``atol`` are scalars or tensors broadcastable to the state.
    Fixed steps: ``adaptive=False, dt=h``. ``sensealg`` picks how gradients cross the solve
    (default :class:`DirectAdjoint`; an object, or a name: ``"direct"``, ``"backsolve"``,
    ``"adjoint"``, ``"interpolating"``, ``"quadrature"``). ``dense`` keeps the dense output for
    ``sol(tq)`` (default: yes, except for the memory-saving
    ``BacksolveAdjoint``/``InterpolatingAdjoint``). ``controller`` (a :class:`PIController` or
    :class:`PredictiveController`) defaults to the solver's ``default_controller()``: integral
    control for explicit methods (torchdiffeq's, diffrax's), Gustafsson's predictive control for
    Rosenbrock methods (Hairer's RODAS), SciML's PI gains for the other implicit ones. ``event=g``
    (``g(t, y)`` → scalar tensor) ends the solve where ``g`` crosses zero: outputs after that time
    are not saved, ``retcode`` is ``"Terminated"``, and ``sol.event_t``/``sol.event_y``
    (differentiable, :mod:`pyneuralode.events`) give the event. With a continuous adjoint (or
    ``DirectAdjoint(checkpoints=...)``) the event is located by a first, gradient-free run of the
    loop and the adjoint solve then runs to that time (``stats["nfe_event_search"]`` counts the
    first run).

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
    RK, Rosenbrock, ESDIRK and QNDF methods; gradients (when y0, t, args or tensors f uses require
    grad) by compiled forward sensitivities up to ~100 states + parameters, by a compiled
    interpolating adjoint above that or for ``t`` (``sensealg=pn.DirectAdjoint()`` /
    ``pn.InterpolatingAdjoint()`` choose); with a ``batched=True`` solver the rows of y0 are
    independent systems, each with its own steps (:func:`pyneuralode.compiled.solve_ensemble`);
    no events.

    ``per_sample=True`` (``y0`` shaped ``(B, ...)``, ``t`` shaped ``(T,)`` or ``(B, T)``, rows may
    start at different times): every sample takes its own adaptive steps, with its own step size,
    error norm, controller state and return code; returns a :class:`PerSampleSolution` (``ys``
    ``(T, B, ...)``, ``retcode`` per sample, ``stats`` tensors of shape ``(B,)``). ``f`` gets ``t``
    as a ``(B,)`` tensor. ``"compact"`` evaluates only the running samples (``f`` must treat rows
    independently); ``True`` (``"mask"``) evaluates the whole batch. Explicit RK methods, and the
    Rodas and ESDIRK methods with ``batched=True`` (one Jacobian per sample; ESDIRK: a Newton
    iteration per sample); gradients by ``DirectAdjoint`` or, for times shared by the batch,
    ``BacksolveAdjoint``, ``InterpolatingAdjoint`` or ``QuadratureAdjoint`` (one joint backward
    pass for the batch).
    """
    # validate
    throw = check_flag("throw", throw)
    dense = check_flag("dense", dense, allow_none=True)
    compile = check_flag("compile", compile)
    steps = StepSettings(dt, adaptive, max_steps, controller, dtmin, dtmax)
    per_sample_mode = check_per_sample(per_sample)
    if per_sample_mode is not None:
        refuse_unsupported(
            compile=compile,
            event=event,
            sensealg=None,
            backend=backend,
            per_sample=False,
            explicit_sensealg=False,
            adjoint_params=adjoint_params,
            norm=norm,
            progress=progress,
            per_sample_stepping=True,
        )
        return solve_per_sample(
            f,
            y0,
            t,
            resolve_solver(solver, Tsit5),
            mode=per_sample_mode,
            rtol=rtol,
            atol=atol,
            steps=steps,
            args=args,
            sensealg=sensealg,
            throw=throw,
            dense=dense,
            adjoint_params=adjoint_params,
        )
    union_grid = is_per_sample(y0, t)
    if backend not in BACKENDS:
        raise ValueError(
            f"backend: unknown backend {backend!r}; use 'torch' (native, the default) or 'julia'"
        )
    if norm is not None and not callable(norm):
        raise TypeError(
            f"norm: expected a function norm(err, y0, y1, rtol, atol) -> float tensor "
            f"(or None for the RMS norm), got {type(norm).__name__}"
        )
    if event is not None and not callable(event):
        raise TypeError(
            f"event: expected a function g(t, y) -> scalar tensor, got {type(event).__name__}"
        )
    # resolve
    sensealg_given = sensealg is not None
    solver = resolve_solver(solver, Tsit5)
    sensealg = resolve_sensealg(sensealg)
    refuse_unsupported(
        compile=compile,
        event=event,
        sensealg=sensealg,
        backend=backend,
        per_sample=union_grid,
        explicit_sensealg=sensealg_given,
        adjoint_params=adjoint_params,
        norm=norm,
        progress=progress,
    )
    t_out = t
    index = None
    if union_grid:  # one solve on the union of the rows' times; each row gathered afterwards
        t, index = union_times(t)
    problem = ODEProblem(f, y0, t, args=args, rtol=rtol, atol=atol, adjoint_params=adjoint_params)
    if dense is None:
        dense = sensealg.keeps_dense
    opts = options_for(problem, solver, steps, dense=dense, progress=progress)
    opts.norm = norm  # e.g. torchdiffeq's norm(tensor), adapted by pn.odeint
    # run
    if compile:
        from .compiled import solve_compiled

        return solve_compiled(
            problem, solver, opts, throw=throw, sensealg=sensealg if sensealg_given else None
        )
    if backend == "julia":
        from .julia import _backend

        sol = _backend.solve(problem, solver, sensealg, opts, throw=throw)
    elif event is not None and not (
        isinstance(sensealg, DirectAdjoint) and sensealg.checkpoints is None
    ):

        def with_times(times):
            return ODEProblem(
                f, y0, times, args=args, rtol=rtol, atol=atol, adjoint_params=adjoint_params
            )

        sol = _run_event_adjoint(problem, with_times, solver, sensealg, opts, event, throw)
    else:
        sol = _run(problem, solver, sensealg, opts, throw, event)
    # package
    if index is not None:
        sol = Solution(
            ts=t_out,
            ys=gather(sol.ys, index),
            retcode=sol.retcode,
            stats=sol.stats,
            segments=sol._segments,
            t_reached=sol.t_reached,
            solver=sol.solver,
        )
    return sol


def refuse_unsupported(
    *,
    compile: bool,
    event,
    sensealg,
    backend: str,
    per_sample: bool,
    explicit_sensealg: bool,
    adjoint_params,
    norm,
    progress,
    per_sample_stepping: bool = False,
) -> None:
    """The one place where ``solve`` refuses a combination of features it does not support
    (``per_sample``: per-sample output times; ``per_sample_stepping``: ``per_sample=True``)."""
    if per_sample_stepping and (
        compile or event is not None or backend != "torch" or norm is not None or progress
    ):
        raise ValueError(
            "per_sample: compile=True, event, backend='julia', norm and progress "
            "are not supported with per-sample stepping; drop them or per_sample"
        )
    # (a sensealg with compile=True: pyneuralode.compiled._dispatch.check_sensealg)
    if compile and (
        event is not None
        or adjoint_params is not None
        or norm is not None
        or backend != "torch"
        or progress
        or per_sample
    ):
        raise ValueError(
            "compile=True: events, adjoint_params, norm, backend='julia', progress "
            "and per-sample output times are not supported on the compiled path yet; "
            "pass compile=False"
        )
    if event is None:
        return
    if per_sample:
        raise ValueError(
            "event: not supported together with per-sample output times t of shape (B, T)"
        )
    if backend != "torch":
        raise ValueError(
            "event: events run on the native engine only; drop backend='julia' or the event"
        )


def _run(
    problem: ODEProblem, solver, sensealg, opts: LoopOptions, throw: bool, event=None
) -> Solution:
    """One run of the loop through ``sensealg`` (ending at ``event``'s first zero, if given),
    packaged."""
    stats: dict = {"nfe": 0, "naccept": 0, "nreject": 0}
    if problem.y0.numel() == 0:
        return _empty_state_solution(problem, solver, opts, stats)
    if event is not None:
        opts.event = EventLocator(event, problem)
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
            fk = torch.stack(
                [problem.call(tk[i].detach(), ys[i + 1].detach()) for i in range(k - 1)]
            ).detach()
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
    if event is not None and loop.event_t is not None:
        te, ye = differentiable_event(event, problem, loop.event_t, loop.y_final)
        sol.event_t, sol.event_y = te, problem.unpack(ye)
    if not loop.retcode.successful and throw:
        raise SolveError(
            f"solve failed with retcode {loop.retcode.value}: {loop.message} (pass throw=False to "
            "get the partial solution)",
            loop.retcode,
            loop.t_reached,
            sol,
        )
    return sol


def _run_event_adjoint(
    problem: ODEProblem, with_times, solver, sensealg, opts: LoopOptions, event, throw: bool
):
    """An event with a two-pass sensealg (continuous adjoint, checkpointed DirectAdjoint): locate it
    with a gradient-free run of the loop, then run ``sensealg`` up to the event time and make that
    time differentiable as in the direct case."""
    search: dict = {"nfe": 0, "naccept": 0, "nreject": 0}
    t_e = None
    if problem.y0.numel() > 0:
        with torch.no_grad():
            probe_opts = dataclasses.replace(opts, dense=False, event=EventLocator(event, problem))
            t_e = integrate(
                problem.rhs(search), problem.y0.detach(), problem.t_list, solver, probe_opts, search
            ).event_t
    if t_e is None:  # no crossing (or a failure, which the solve below meets and reports itself)
        sol = _run(problem, solver, sensealg, opts, throw)
        sol.stats["nfe_event_search"] = search["nfe"]
        return sol
    ts = problem.t
    direction = 1.0 if (ts.numel() < 2 or float(ts[-1]) > float(ts[0])) else -1.0
    k = int(((ts.detach() - t_e) * direction <= 0).sum())  # outputs up to the event
    at_event = k > 0 and float(ts[k - 1]) == t_e
    t2 = ts[:k] if at_event else torch.cat([ts[:k], ts.new_tensor([t_e])])
    sol = _run(with_times(t2), solver, sensealg, opts, throw)
    sol.stats["nfe_event_search"] = search["nfe"]
    if not sol.retcode.successful:  # throw=False: the partial solution, without an event
        return sol
    y_e = tuple(c[-1] for c in sol.ys) if problem.is_tuple else sol.ys[-1]
    te, ye = differentiable_event(event, problem, t_e, problem.pack(y_e))
    out_ys = (
        sol.ys if at_event else (tuple(c[:k] for c in sol.ys) if problem.is_tuple else sol.ys[:k])
    )
    res = Solution(
        ts=ts[:k],
        ys=out_ys,
        retcode=ReturnCode.Terminated,
        stats=sol.stats,
        segments=sol._segments,
        unflatten=problem.unpack if problem.is_tuple else None,
        t_reached=t_e,
        solver=solver,
    )
    res.event_t, res.event_y = te, problem.unpack(ye)
    return res


def _empty_state_solution(problem: ODEProblem, solver, opts: LoopOptions, stats: dict) -> Solution:
    """A state with no components does not change: every output is y0 (no solver step is needed)."""
    from ._solution import DenseSegment

    n = len(problem.t_list)
    ys = problem.y0.unsqueeze(0).expand(n, *problem.y0.shape).clone()
    t0, t1 = problem.t_list[0], problem.t_list[-1]
    segments = None
    if opts.dense:
        segments = [DenseSegment(t0, t1 - t0, problem.y0, _constant)] if n > 1 else []
    return Solution(
        ts=problem.t,
        ys=problem.unpack(ys),
        retcode="Success",
        stats=stats,
        segments=segments,
        unflatten=problem.unpack if problem.is_tuple else None,
        t_reached=t1,
        solver=solver,
    )


def _constant(y, theta):
    return y


def event_solve(
    func, y0, t0, g: Callable, reverse: bool, solver, rtol, atol, kw: dict, sensealg, extra: dict
):
    """Integrate from ``t0`` until ``g(t, y)`` crosses zero: ``(event_t, states at [t0, event_t])``,
    both differentiable (the engine of torchdiffeq's ``odeint(..., event_fn=...)``)."""
    t0 = start_time(t0, y0)
    horizon = 1e12 * (-1.0 if reverse else 1.0)
    t0 = t0.reshape(())
    t = torch.stack([t0, t0.detach() + horizon]).to(
        t0.dtype if t0.is_floating_point() else torch.float64
    )
    kw = {**kw, **extra}
    # the horizon is only a bound: the smallest step must not scale with it (float resolution of t
    # and max_steps still end a stuck solve)
    kw.setdefault("dtmin", 0.0)
    kw.setdefault("dense", False)  # never exposed here: O(1) memory in the steps
    kw.setdefault("max_steps", 100_000)
    if sensealg is not None:  # odeint_adjoint's interface: gradients reach func's adjoint_params
        kw["sensealg"] = sensealg
        kw.setdefault("adjoint_params", list(func.parameters()))
    sol = solve(func, y0, t, solver, rtol=rtol, atol=atol, event=g, **kw)
    if sol.event_t is None:
        raise RuntimeError(
            f"odeint_event: event_fn never crossed zero before t = {float(t[-1]):.3g} "
            f"(the solve ended with {sol.retcode}); check the event function's sign"
        )
    if isinstance(sol.event_y, tuple):
        ys = tuple(torch.stack([c[0], e]) for c, e in zip(sol.ys, sol.event_y))
    else:
        ys = torch.stack([sol.ys[0], sol.event_y])
    return sol.event_t, ys
