"""``solve(..., compile=True)``: validate, trace, build (or fetch) the compiled module, run,
package."""

from __future__ import annotations

import time

import numpy as np
import torch

from .._problem import ODEProblem
from .._solution import ReturnCode, Solution, SolveError
from ..controllers import PIController, PredictiveController
from ..solvers._erk import ExplicitRK
from ..solvers._rosenbrock import GenericRosenbrock
from . import _codegen, _trace

_MESSAGES = {
    "MaxIters": "reached max_steps={max_steps} at t={t:.6g}; raise max_steps or loosen the "
    "tolerances",
    "DtLessThanMin": "the step size fell below dtmin at t={t:.6g}; the problem may be stiff "
    "(try an implicit solver "
    "such as Rodas5P) or the tolerances too tight for float64",
    "Unstable": "the state or its error became NaN/Inf at t={t:.6g}",
}

#: (f, solver type, state layout, args layout) -> traced and compiled pieces, kept for the process
_BUILT: dict = {}


class CompiledSolution(Solution):
    """A :class:`Solution` of the compiled path: the saved states, no dense output object."""

    def __call__(self, tq):
        raise ValueError(
            "sol(tq): the compiled path (compile=True) keeps only the states at the output times; "
            "pass the times you need in t, or solve with compile=False to evaluate the dense output"
        )


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _method_kind(solver):
    if isinstance(solver, GenericRosenbrock):
        return "rosenbrock"
    if isinstance(solver, ExplicitRK):
        return "erk"
    raise ValueError(
        "solver: compile=True supports the explicit Runge–Kutta methods (e.g. pn.Tsit5(), "
        "pn.Dopri5(), pn.Vern7(), pn.DP8()) and the Rosenbrock methods pn.Rodas4() and "
        f"pn.Rodas5P(), got {type(solver).__name__}; "
        f"pass compile=False for the other methods"
    )


def _check_rosenbrock_options(solver, allow_batched: bool = False):
    defaults = dict(jac=None, batched=False, linsolve="lu", jac_sparsity=None)
    if allow_batched:
        del defaults["batched"]
    for k, v in defaults.items():
        if getattr(solver, k, v) is not v and getattr(solver, k, v) != v:
            raise ValueError(
                f"solver: compile=True uses the traced exact Jacobian and a dense LU; the option "
                f"{type(solver).__name__}({k}=...) is not supported there; pass compile=False"
            )


def _layout_key(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.dtype)
    return ("V", repr(a))


def _controller_params(ctrl):
    if isinstance(ctrl, PredictiveController):
        return True, 0.0, 0.0, float(ctrl.safety), float(ctrl.factor_min), float(ctrl.factor_max)
    if isinstance(ctrl, PIController):
        return (
            False,
            float(ctrl.beta1),
            float(ctrl.beta2),
            float(ctrl.safety),
            float(ctrl.factor_min),
            float(ctrl.factor_max),
        )
    raise TypeError(
        f"controller: compile=True takes a pn.PIController or pn.PredictiveController, got "
        f"{type(ctrl).__name__}"
    )


def _tol_array(tol, n):
    if isinstance(tol, torch.Tensor):
        return np.ascontiguousarray(
            np.broadcast_to(tol.detach().double().reshape(-1).numpy(), (n,)), dtype=np.float64
        )
    return np.full(n, float(tol))


def _build(problem, solver, kind, args):
    n = problem.y0.numel()
    shape0 = problem.y0.shape
    key = (
        problem.f,
        type(solver),
        tuple(shape0),
        problem.is_tuple,
        tuple(map(tuple, problem.shapes or [])),
        tuple(_layout_key(a) for a in args),
    )

    def call(t, y, a):
        return problem.call(t, y.reshape(shape0), a)

    return build(key, call, n, args, kind, solver)


def build(key, call, n: int, args, kind: str, solver, tracer=None):
    """Trace ``call(t, y_flat, args)`` (``n`` components), generate and load the module of
    ``solver``'s step and loop; kept in the process under ``key``. Also used by the forward
    sensitivities (:mod:`._sensitivity`, an augmented ``call``) and the ensembles."""
    hit = _BUILT.get(key)
    if hit is not None:
        return hit
    rhs_src, kf, kj, uses_t, n_args = _trace.trace_rhs(
        call, n, args, jacobian=(kind == "rosenbrock"), **({"tracer": tracer} if tracer else {})
    )
    anames = [f"a{i}" for i in range(n_args)]
    sig_names = anames + [f"KF{i}" for i in range(len(kf))] + [f"KJ{i}" for i in range(len(kj))]
    sig = "".join(f", {x}" for x in sig_names)
    fa = "".join(f", {x}" for x in anames + [f"KF{i}" for i in range(len(kf))])
    ja = "".join(f", {x}" for x in anames + [f"KJ{i}" for i in range(len(kj))])
    if kind == "erk":
        tab = solver.tableau
        method_src, nfe_step, _ = _codegen.erk_source(tab, sig, fa)
        loop_src = _codegen.loop_source("erk", sig, fa, ja, tab.stages + tab.extra_stages, nfe_step)
    else:
        tab = solver.tableau
        method_src, rows = _codegen.rosenbrock_source(tab, sig, fa)
        loop_src = _codegen.loop_source("rosenbrock", sig, fa, ja, tab.stages, tab.stages - 1, rows)
    src = _codegen.module_source(rhs_src, method_src, loop_src)
    mod = _codegen.load_module(src)
    built = {"mod": mod, "kf": kf, "kj": kj, "uses_t": uses_t, "source": src}
    _BUILT[key] = built
    return built


def loop_arguments(built, solver, opts, t, y0, rtol, atol, user_arrays) -> tuple:
    """The arguments of the generated ``solve(...)``: output times, flat ``y0``, tolerance
    arrays, the loop's options, then the user's tensor arguments and the traced constants (flat
    float64 arrays)."""
    ctrl = opts.controller if opts.controller is not None else solver.default_controller()
    pred, beta1, beta2, safety, fmin, fmax = _controller_params(ctrl)
    adaptive, dt, dtmin, dtmax = opts.adaptive, opts.dt, opts.dtmin, opts.dtmax
    consts = [
        np.ascontiguousarray(c.detach().double().cpu().reshape(-1).numpy())
        for c in built["kf"] + built["kj"]
    ]
    q = (
        min(solver.order, solver.error_order) + 1
        if solver.error_order is not None
        else solver.order + 1
    )
    return (
        np.ascontiguousarray(t.detach().double().cpu().numpy()),
        np.ascontiguousarray(y0, dtype=np.float64),
        rtol,
        atol,
        bool(adaptive),
        float(dt) if dt is not None else 0.0,
        float(dt) if (adaptive and dt is not None) else -1.0,
        abs(float(dtmax)) if dtmax else -1.0,
        float(dtmin) if dtmin is not None else -1.0,
        int(opts.max_steps),
        pred,
        beta1,
        beta2,
        safety,
        fmin,
        fmax,
        float(q),
        float(getattr(solver, "start_order", solver.order)),
        bool(built["uses_t"]),
        *user_arrays,
        *consts,
    )


def run(built, call_args, stats: dict, fn: str = "solve"):
    """Call the module's ``fn`` (compiling it on the first call in the process, timed into
    ``stats["compile_s"]``)."""
    f = getattr(built["mod"], fn)
    if not built.get(f"compiled_{fn}"):
        import numba

        t0 = time.perf_counter()
        f.compile(tuple(numba.typeof(a) for a in call_args))
        stats["compile_s"] = time.perf_counter() - t0  # compile, or load from the disk cache
        built[f"compiled_{fn}"] = True
    return f(*call_args)


def solve_compiled(problem: ODEProblem, solver, opts, *, throw: bool):
    """The whole solve as one numba call (see :func:`pyneuralode.solve`, ``compile=True``).

    ``problem`` and ``opts`` come validated from :func:`pyneuralode.solve`."""
    if not numba_available():
        raise ImportError(
            "compile=True needs numba: pip install 'pyneuralode[compiled]' (or pip install numba), "
            "or pass compile=False"
        )
    kind = _method_kind(solver)
    if kind == "rosenbrock" and getattr(solver, "batched", False):
        from ._ensemble import run_ensemble  # rows as independent systems (see _ensemble)

        return run_ensemble(problem, solver, opts, throw=throw)
    if kind == "rosenbrock":
        _check_rosenbrock_options(solver)
    if problem.y0.dtype != torch.float64:
        raise TypeError(
            f"y0: compile=True runs in float64, got {problem.y0.dtype}; pass y0.double() "
            "(and float64 parameters), or compile=False"
        )
    if problem.y0.device.type != "cpu":
        raise ValueError(
            f"y0: compile=True runs on the CPU, got a tensor on {problem.y0.device}; "
            "pass compile=False"
        )
    from . import _sensitivity

    if _sensitivity.needs_gradient(problem):
        return _sensitivity.solve_sensitivities(problem, solver, opts, kind, throw=throw)
    built = _build(problem, solver, kind, problem.args)
    n = problem.y0.numel()
    user_arrays = [
        np.ascontiguousarray(a.detach().double().reshape(-1).numpy())
        for a in problem.args
        if isinstance(a, torch.Tensor)
    ]
    call_args = loop_arguments(
        built,
        solver,
        opts,
        problem.t,
        problem.y0.detach().reshape(-1).numpy(),
        _tol_array(problem.rtol, n),
        _tol_array(problem.atol, n),
        user_arrays,
    )
    stats: dict = {}
    ys, k, rc, t_reached, st = run(built, call_args, stats)
    stats.update(nfe=int(st[0]), naccept=int(st[1]), nreject=int(st[2]))
    if kind == "rosenbrock":
        stats.update(njac=int(st[3]), nlu=int(st[4]), nsolve=int(st[5]))
    return package(problem, solver, opts, torch.from_numpy(ys[:k]), rc, t_reached, stats, throw)


def package(problem, solver, opts, ys_flat, rc: int, t_reached, stats: dict, throw: bool):
    """The :class:`CompiledSolution` of the saved flat states ``ys_flat`` (k, n); raises
    :class:`SolveError` on failure with ``throw=True``."""
    k = ys_flat.shape[0]
    retcode = ReturnCode(_codegen.RETCODES[rc])
    ys_t = ys_flat.reshape(k, *problem.y0.shape)
    ts = problem.t
    sol = CompiledSolution(
        ts=ts[:k] if k < ts.shape[0] else ts,
        ys=problem.unpack(ys_t),
        retcode=retcode,
        stats=stats,
        segments=None,
        unflatten=problem.unpack if problem.is_tuple else None,
        t_reached=float(t_reached),
        solver=solver,
    )
    if not retcode.successful and throw:
        msg = _MESSAGES[retcode.value].format(max_steps=opts.max_steps, t=float(t_reached))
        raise SolveError(
            f"solve failed with retcode {retcode.value}: {msg} (pass throw=False to get the "
            "partial "
            "solution)",
            retcode,
            float(t_reached),
            sol,
        )
    return sol
