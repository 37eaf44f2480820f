"""``solve(..., compile=True)``: validate, trace, build (or fetch) the compiled module, run,
package."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .._problem import ODEProblem
from .._solution import ReturnCode, Solution, SolveError
from ..controllers import PIController, PredictiveController
from ..solvers._erk import ExplicitRK
from ..solvers._esdirk import ESDIRK
from ..solvers._newton import newton_tolerance
from ..solvers._rosenbrock import GenericRosenbrock
from ..solvers.bdf import QNDF
from . import _codegen, _trace

_MESSAGES = {
    "MaxIters": "reached max_steps={max_steps} at t={t:.6g}; raise max_steps or loosen the "
    "tolerances",
    "DtLessThanMin": "the step size fell below dtmin at t={t:.6g}; the problem may be stiff "
    "(try an implicit solver "
    "such as Rodas5P) or the tolerances too tight for float64",
    "Unstable": "the state or its error became NaN/Inf at t={t:.6g}",
    "ConvergenceFailure": "the implicit solve of a fixed step failed at t={t:.6g}; use a smaller "
    "dt or adaptive=True",
}

#: (f, dtype, state layout, args layout, with Jacobian) -> the traced problem module, kept for the
#: process
_PROBLEMS: dict = {}
_MAX_PROBLEMS = 256
#: solver type -> the method module
_METHODS: dict = {}


class CompiledSolution(Solution):
    """A :class:`Solution` of the compiled path; ``sol(tq)`` evaluates the dense output of the
    compiled run's stored steps (the same interpolants as the native engine), in compiled code."""

    def __init__(self, *a, dense=None, **kw):
        super().__init__(*a, **kw)
        self._dense = dense  # (method module, rhs, pf, segT, segY, segK, segX, y0 template)

    def __call__(self, tq):
        if self._dense is None:
            raise ValueError(
                "sol(tq): this solution kept no dense output; call solve(..., dense=True) to "
                "evaluate between output times"
            )
        mod, rhs, pf, segT, segY, segK, segX, like = self._dense
        m = segT.shape[0]
        if m == 0:
            raise ValueError(
                "sol(tq): the solve took no steps, there is no dense output to evaluate"
            )
        if isinstance(tq, torch.Tensor) and tq.requires_grad:
            raise ValueError(
                "sol(tq): the compiled path (compile=True) does not differentiate the dense "
                "output with respect to tq; pass tq.detach(), or solve with compile=False"
            )
        tq_t = torch.as_tensor(tq, dtype=torch.float64).reshape(-1)
        if tq_t.numel() == 0:
            raise ValueError("sol(tq): tq is empty")
        if not torch.isfinite(tq_t).all():
            raise ValueError("sol(tq): tq contains NaN or Inf")
        tv = tq_t.numpy()
        starts, steps = segT[:, 0], segT[:, 1]
        lo_t, hi_t = starts[0], self.t_reached
        lo, hi = min(lo_t, hi_t), max(lo_t, hi_t)
        span = hi - lo
        bad = (tv < lo - 1e-12 * max(1.0, span)) | (tv > hi + 1e-12 * max(1.0, span))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"sol(tq): tq[{i}]={tv[i]} lies outside the solved span [{lo}, {hi}]; "
                "evaluate only inside it"
            )
        if steps[-1] >= 0:  # the step holding each time (as Solution.__call__)
            k = np.searchsorted(starts, tv, side="right") - 1
        else:
            k = np.searchsorted(-starts, -tv, side="right") - 1
        k = np.ascontiguousarray(np.maximum(k, 0), dtype=np.int64)
        theta = np.ascontiguousarray((tv - starts[k]) / steps[k])
        out = np.zeros((k.shape[0], segY.shape[2]))
        mod.interp(k, theta, segT, segY, segK, segX, rhs, pf, out)
        y = self._states(torch.from_numpy(out)).to(like.dtype).reshape(k.shape[0], *like.shape)
        return self._unflatten(y) if self._unflatten is not None else y

    def _states(self, out: torch.Tensor) -> torch.Tensor:
        """The flat states of the interpolated rows (the forward-sensitivity solution takes its
        first n columns, attached to autograd)."""
        return out


_NUMBA: list = []  # [True] once numba imported (an import that failed is tried again)


def numba_available() -> bool:
    if _NUMBA:
        return True
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    _NUMBA.append(True)
    return True


def _method_kind(solver):
    if isinstance(solver, GenericRosenbrock):
        return "rosenbrock"
    if isinstance(solver, ExplicitRK):
        return "erk"
    if isinstance(solver, ESDIRK):
        return "esdirk"
    if isinstance(solver, QNDF):
        return "qndf"
    raise ValueError(
        "solver: compile=True supports the explicit Runge–Kutta methods (e.g. pn.Tsit5(), "
        "pn.Dopri5(), pn.Vern7(), pn.DP8()), the Rosenbrock methods (pn.Rodas4(), pn.Rodas5P()) "
        "the ESDIRK methods (pn.KenCarp4(), pn.Kvaerno5(), ...) and pn.QNDF(), got "
        f"{type(solver).__name__}; pass compile=False for the other methods"
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


_DEFAULT_CONTROLLERS: dict = {}


def _default_controller_params(solver):
    """:func:`_controller_params` of ``solver.default_controller()``, which depends on the
    method's class only: made once per class."""
    key = (type(solver), solver.implicit)
    hit = _DEFAULT_CONTROLLERS.get(key)
    if hit is None:
        hit = _DEFAULT_CONTROLLERS[key] = _controller_params(solver.default_controller())
    return hit


_RETURN_CODES = {i: ReturnCode(name) for i, name in enumerate(_codegen.RETCODES)}


def _tol_array(tol, n):
    if isinstance(tol, torch.Tensor):
        return np.ascontiguousarray(
            np.broadcast_to(tol.detach().double().reshape(-1).numpy(), (n,)), dtype=np.float64
        )
    out = np.empty(n)
    out.fill(float(tol))
    return out


def host_array(x: torch.Tensor) -> np.ndarray:
    """``x`` as a flat, contiguous float64 numpy array: a view of a contiguous float64 CPU tensor
    (no copy; the compiled loop only reads its inputs), else a converted copy."""
    x = x.detach()
    if x.dtype != torch.float64 or x.device.type != "cpu":
        x = x.double().cpu()
    try:
        a = x.numpy()
    except RuntimeError:  # a tensor with its conjugate or negative bit set
        a = x.resolve_neg().resolve_conj().numpy()
    return np.ascontiguousarray(a.reshape(-1))


def f_key(f):
    """What stands for ``f`` in the caches of traced code: ``f`` itself (``pn.odeint``'s wrapper:
    the user's func) and, for an ``nn.Module``, the storage of each parameter and buffer. The
    traced code holds the tensors f read: one updated in place is read on every call, one
    replaced (``module.w = nn.Parameter(...)``, ``w.data = ...``) is traced again."""
    f = getattr(f, "compile_key", f)
    if isinstance(f, nn.Module):
        return (
            f,
            tuple(p.data_ptr() for p in f.parameters()),
            tuple(b.data_ptr() for b in f.buffers()),
        )
    return f


def _problem_module(problem, kind, args):
    """The traced ``rhs`` (and ``jac``) of ``problem.f`` for this state and argument layout."""
    n = problem.y0.numel()
    shape0 = problem.y0.shape
    jacobian = kind != "erk"
    key = (
        f_key(problem.f),
        problem.y0.dtype,
        tuple(shape0),
        problem.is_tuple,
        tuple(map(tuple, problem.shapes or [])),
        tuple(_layout_key(a) for a in args),
        jacobian,
    )

    def call(t, y, a):
        return problem.call(t, y.reshape(shape0), a)

    return problem_module(key, call, n, args, jacobian, problem.y0.dtype)


def problem_module(key, call, n: int, args, jacobian: bool, dtype, tracer=None):
    """Trace ``call(t, y_flat, args)`` (``n`` components) to the problem module (``rhs``, and
    ``jac`` with ``jacobian``), kept in the process under ``key``; returns ``(built, new)``.
    Also used for the forward-sensitivity system (:mod:`._sensitivity`) and the rows of an
    ensemble (:mod:`._ensemble`)."""
    hit = _PROBLEMS.get(key)
    if hit is not None:
        return hit, False
    if len(_PROBLEMS) >= _MAX_PROBLEMS:  # a new f per call (lambdas) must not grow it forever
        _PROBLEMS.pop(next(iter(_PROBLEMS)))
    rhs_src, kf, kj, uses_t = _trace.trace_rhs(
        call, n, args, jacobian=jacobian, dtype=dtype, **({"tracer": tracer} if tracer else {})
    )
    mod = _codegen.load_module(_codegen.problem_source(rhs_src))
    built = {"mod": mod, "kf": kf, "kj": kj, "uses_t": uses_t}
    _PROBLEMS[key] = built
    return built, True


def _method_module(solver, kind):
    mod = _METHODS.get(type(solver))
    if mod is not None:
        return mod, False
    mod = _METHODS[type(solver)] = _codegen.load_module(
        _codegen.method_source(kind, getattr(solver, "tableau", None))
    )
    return mod, True


_FIRST_CLASS: dict = {}


def _first_class(dispatcher):
    """The compiled ``rhs``/``jac`` as a first-class function object holding its address: numba
    then passes it without looking the compiled version up on every call."""
    wap = _FIRST_CLASS.get(id(dispatcher))
    if wap is None or wap[0] is not dispatcher:
        from numba.core.types.function_type import CompileResultWAP

        (cres,) = dispatcher.overloads.values()  # compiled for RHS_SIG / JAC_SIG only
        wap = _FIRST_CLASS[id(dispatcher)] = (dispatcher, CompileResultWAP(cres))
    return wap[1]


def _flat_params(user_arrays, consts):
    # the constants are read on every call: a traced module parameter updated in place must reach
    # the compiled code
    parts = user_arrays + [c.detach().double().cpu().reshape(-1).numpy() for c in consts]
    if not parts:
        return _NO_PARAMS
    if len(parts) == 1:  # a copy all the same: sol(tq) evaluates f later with these values
        return np.array(parts[0], dtype=np.float64)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float64)


_NO_PARAMS = np.zeros(0)


def check_single_system(problem: ODEProblem, solver, kind: str) -> None:
    """What one compiled system needs: a compilable method's options, a float CPU state."""
    if kind != "erk":
        _check_rosenbrock_options(solver)
    if problem.y0.dtype not in (torch.float64, torch.float32):
        raise TypeError(
            f"y0: compile=True takes float64 or float32 states, got {problem.y0.dtype}; pass "
            "y0.double(), or compile=False"
        )
    if problem.y0.device.type != "cpu":
        raise ValueError(
            f"y0: compile=True runs on the CPU, got a tensor on {problem.y0.device}; "
            "pass compile=False"
        )


def solve_plain(problem: ODEProblem, solver, opts, kind: str, *, throw: bool):
    """One system, no gradient: the whole solve as one numba call."""
    stats: dict = {}
    t_build = time.perf_counter()
    built, new = _problem_module(problem, kind, problem.args)
    mod, new_method = _method_module(solver, kind)
    if new or new_method:  # first solve of this f or method in the process: trace, compile
        # (or load from the disk cache)
        stats["compile_s"] = time.perf_counter() - t_build
    n = problem.y0.numel()
    user_arrays = [host_array(a) for a in problem.args if isinstance(a, torch.Tensor)]
    call_args = loop_arguments(
        problem,
        solver,
        opts,
        kind,
        built,
        mod,
        host_array(problem.y0),
        _tol_array(problem.rtol, n),
        _tol_array(problem.atol, n),
        user_arrays,
    )
    out = entry_point(mod.solve)(*call_args)
    return package(problem, solver, opts, kind, mod, call_args, out, stats, throw)


_ENTRY: dict = {}


def entry_point(dispatcher):
    """The compiled function of a dispatcher with one explicit signature (the method module's
    ``solve``): calling it skips the dispatcher's typing of the arguments."""
    hit = _ENTRY.get(id(dispatcher))
    if hit is None or hit[0] is not dispatcher:
        (cres,) = dispatcher.overloads.values()  # (builds a dict of the signatures: once)
        hit = _ENTRY[id(dispatcher)] = (dispatcher, cres.entry_point)
    return hit[1]


def loop_arguments(problem, solver, opts, kind, built, mod, y0, rtol, atol, user_arrays):
    """The arguments of the method module's ``solve``: output times, flat ``y0``, tolerance
    arrays, the loop's options, the problem module's ``rhs``/``jac`` and their parameter arrays
    (the user's tensor arguments, then the traced constants)."""
    if opts.controller is not None:
        pred, beta1, beta2, safety, fmin, fmax = _controller_params(opts.controller)
    else:
        pred, beta1, beta2, safety, fmin, fmax = _default_controller_params(solver)
    adaptive, dt, dtmin, dtmax = opts.adaptive, opts.dt, opts.dtmin, opts.dtmax
    pf = _flat_params(user_arrays, built["kf"])
    pj = _flat_params(user_arrays, built["kj"])
    q = (
        min(solver.order, solver.error_order) + 1
        if solver.error_order is not None
        else solver.order + 1
    )
    if kind == "esdirk":
        opt = np.array(
            [
                newton_tolerance(solver.kappa, problem.rtol, torch.float64),
                newton_tolerance(1e-5, problem.rtol, torch.float64),
                float(solver.max_iter),
                solver.jac_theta,
                1.0 if solver.smooth_est else 0.0,
            ]
        )
    elif kind == "qndf":  # QNDF.init's Newton tolerance: min(0.03, √rtol), floored
        rt = problem.rtol
        rt = float(rt.max()) if isinstance(rt, torch.Tensor) else float(rt)
        opt = np.array(
            [newton_tolerance(min(0.03, rt**0.5), problem.rtol, torch.float64), solver.max_order]
        )
    else:
        opt = np.zeros(1)
    rhs = _first_class(built["mod"].rhs)
    jac = _first_class(built["mod"].jac if kind != "erk" else mod.nojac)
    return (
        host_array(problem.t),
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
        bool(opts.dense),
        opt,
        rhs,
        jac,
        pf,
        pj,
    )


def stats_of(kind, st, stats: dict) -> dict:
    for name, v in zip(_codegen.STATS, st):
        if name in ("nfe", "naccept", "nreject") or kind != "erk":
            if kind == "rosenbrock" and name in ("nnewton", "nconvfail"):
                continue
            stats[name] = int(v)
    return stats


def package(
    problem,
    solver,
    opts,
    kind,
    mod,
    call_args,
    out,
    stats,
    throw,
    ys_flat=None,
    cls=None,
    attrs=None,
):
    """The :class:`CompiledSolution` of the method module's ``solve`` result ``out`` (``ys_flat``:
    the saved states to use instead of ``out``'s, e.g. attached to autograd; ``cls``/``attrs``:
    a subclass and attributes for it); raises :class:`SolveError` on failure with
    ``throw=True``."""
    ys, k, rc, t_reached, st, segT, segY, segK, segX, m = out
    stats_of(kind, st, stats)
    retcode = _RETURN_CODES[int(rc)]
    if ys_flat is None:
        ys_flat = torch.from_numpy(ys[:k])
        if problem.y0.dtype != ys_flat.dtype:
            ys_flat = ys_flat.to(problem.y0.dtype)
    shape = problem.y0.shape
    ys_t = ys_flat if ys_flat.shape[1:] == shape else ys_flat.reshape(k, *shape)
    ts = problem.t
    rhs, pf = call_args[21], call_args[23]
    dense = (
        (mod, rhs, pf, segT[:m], segY[:m], segK[:m], segX[:m], problem.y0) if opts.dense else None
    )
    sol = (cls or CompiledSolution)(
        ts=ts[:k] if k < ts.shape[0] else ts,
        ys=problem.unpack(ys_t),
        retcode=retcode,
        stats=stats,
        segments=None,
        unflatten=problem.unpack if problem.is_tuple else None,
        t_reached=float(t_reached),
        solver=solver,
        dense=dense,
    )
    for name, v in (attrs or {}).items():
        setattr(sol, name, v)
    if not retcode.successful and throw:
        msg = _MESSAGES[retcode.value].format(max_steps=opts.max_steps, t=float(t_reached))
        raise SolveError(
            f"solve failed with retcode {retcode.value}: {msg} (pass throw=False to get the "
            "partial solution)",
            retcode,
            float(t_reached),
            sol,
        )
    return sol
