"""torchdiffeq's interface: ``odeint``, ``odeint_adjoint`` (and ``odeint_event`` in :mod:`.events`).

A torchdiffeq script runs after changing its import to ``from pyneuralode import odeint,
odeint_adjoint, odeint_event``: torchdiffeq's method names, options, defaults (``dopri5``,
``rtol=1e-7``, ``atol=1e-9``), tuple states, events, callbacks and time dtype. Adaptive methods run
through :func:`pyneuralode.solve`; torchdiffeq's fixed-grid methods step the grid (``t``, or the one
``step_size``/``grid_constructor`` gives) through the same integrate loop, and the outputs at ``t``
are interpolated on that grid (``interp="linear"`` or ``"cubic"``), so they are differentiable with
respect to ``t`` as torchdiffeq's are. ``scipy_solver`` wraps :func:`scipy.integrate.solve_ivp`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ._loop import LoopOptions, integrate
from ._problem import ODEProblem
from ._solution import SolveError
from ._solve import solve
from .solvers import lookup

__all__ = ["odeint", "SOLVERS"]  # odeint_adjoint: pyneuralode._odeint_adjoint

#: torchdiffeq's adaptive methods → pyneuralode solvers
ADAPTIVE = {
    "dopri8": "dp8",
    "dopri5": "dp5",
    "tsit5": "tsit5",
    "bosh3": "bs3",
    "fehlberg2": "fehlberg2",
    "adaptive_heun": "heun",
}
#: torchdiffeq's fixed-grid explicit Runge–Kutta methods (its ``rk4`` is Kutta's 3/8 rule)
FIXED_RK = {
    "euler": "euler",
    "midpoint": "midpoint",
    "heun2": "heun",
    "heun3": "heun3",
    "rk4": "rk438",
}
ADAMS = {"explicit_adams": False, "implicit_adams": True, "fixed_adams": True}
IMPLICIT = (
    "implicit_euler",
    "implicit_midpoint",
    "trapezoid",
    "radauIIA3",
    "gl4",
    "radauIIA5",
    "gl6",
    "sdirk2",
    "trbdf2",
)
#: every torchdiffeq method name
SOLVERS = (*ADAPTIVE, *FIXED_RK, *ADAMS, *IMPLICIT, "scipy_solver")

_ADAPTIVE_OPTS = {
    "first_step",
    "safety",
    "ifactor",
    "dfactor",
    "max_num_steps",
    "step_t",
    "jump_t",
    "norm",
    "dtype",
    "min_step",
    "max_step",
}
_FIXED_OPTS = {"step_size", "grid_constructor", "interp", "perturb", "norm"}
_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


def _family(method: str) -> str:
    if method in ADAPTIVE:
        return "adaptive"
    if method in FIXED_RK:
        return "fixed"
    if method in ADAMS:
        return "adams"
    if method in IMPLICIT:
        return "implicit"
    if method == "scipy_solver":
        return "scipy"
    solver = lookup(method)  # a pyneuralode name (raises with the valid names)
    return "adaptive" if solver().adaptive_capable else "fixed"


def _valid_options(family: str) -> set:
    return {
        "adaptive": _ADAPTIVE_OPTS,
        "fixed": _FIXED_OPTS,
        "adams": _FIXED_OPTS | {"max_iters", "max_order"},
        "implicit": _FIXED_OPTS | {"max_iters"},
        "scipy": {"solver", "min_step", "max_step", "norm", "grid_points", "eps"},
    }[family]


class _Func(nn.Module):
    """``func`` as torchdiffeq calls it: ``t`` in the state's real dtype; ``parameters()`` are
    ``func``'s (what a ``sensealg`` passed to ``odeint`` differentiates)."""

    def __init__(self, func: Callable):
        super().__init__()
        object.__setattr__(self, "base", func)
        params = list(func.parameters()) if isinstance(func, nn.Module) else []
        object.__setattr__(self, "_params", params)

    def parameters(self, recurse: bool = True):
        return iter(self._params)

    @property
    def compile_key(self):  # compile=True: one compiled module per user func, not per call
        return self.base

    def forward(self, t, y):
        ref = y[0] if isinstance(y, (tuple, list)) else y
        if isinstance(t, torch.Tensor) and ref.is_floating_point() and t.dtype != ref.dtype:
            t = t.to(ref.dtype)
        return self.base(t, y)


def _torchdiffeq_norm(user_norm, shapes):
    """torchdiffeq's ``norm(error / (atol + rtol·max(|y0|, |y1|)))`` as the loop's error norm."""

    def norm(err, y0, y1, rtol, atol):
        ratio = err / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))
        if shapes is not None:
            parts, i = [], 0
            for shp in shapes:
                n = math.prod(shp)
                parts.append(ratio[i : i + n].reshape(shp))
                i += n
            ratio = tuple(parts)
        return torch.as_tensor(user_norm(ratio), dtype=err.dtype)

    return norm


def _mixed_norm(parts):
    """torchdiffeq's default norm of a tuple state: the largest RMS over its components."""
    if len(parts) == 0:
        return 0.0
    return max(p.abs().pow(2).mean().sqrt() for p in parts)


def _with_callbacks(solver, func, time, unpack):
    """The solver with torchdiffeq's hooks: ``callback_step`` before every attempted step and
    ``callback_accept_step``/``callback_reject_step`` once its fate is known (a step that is
    followed by another from the same time was rejected)."""
    base = type(solver)
    cb = {k: getattr(func, k, None) for k in _CALLBACKS}

    class WithCallbacks(base):
        _pending = None

        def _settle(self, accepted: bool):
            if self._pending is not None:
                c = cb["callback_accept_step" if accepted else "callback_reject_step"]
                if c is not None:
                    c(*self._pending)
                self._pending = None

        def init(self, *a, **kw):
            self._pending = None
            return base.init(self, *a, **kw)

        def step(self, rhs, t0, y0, dt, cache):
            if self._pending is not None:
                self._settle(accepted=float(self._pending[0]) != t0)
            args = (time(t0), unpack(y0), time(dt))
            if cb["callback_step"] is not None:
                cb["callback_step"](*args)
            self._pending = args
            return base.step(self, rhs, t0, y0, dt, cache)

        def finish(self):
            self._settle(accepted=True)

    WithCallbacks.__name__ = base.__name__
    new = WithCallbacks.__new__(WithCallbacks)
    new.__dict__.update(solver.__dict__)
    return new


def odeint(
    func,
    y0,
    t,
    *,
    rtol=1e-7,
    atol=1e-9,
    method: str | None = None,
    options: dict | None = None,
    event_fn: Callable | None = None,
    **kwargs,
):
    """torchdiffeq's ``odeint``: the states at the times ``t`` (``(len(t), *y0.shape)``, or a
    tuple).

    ``method`` (default ``"dopri5"``) is any torchdiffeq name (:data:`SOLVERS`) or a pyneuralode
    solver name; ``options`` as torchdiffeq's (an option the method does not take gives
    torchdiffeq's "Unexpected arguments" warning). With ``event_fn`` (``t`` of length 2; only
    ``t[0]`` is used) returns ``(event_t, states at [t0, event_t])``. Extra keyword arguments go to
    :func:`pyneuralode.solve` for the adaptive methods (e.g. ``sensealg``).
    """
    return _odeint(func, y0, t, rtol, atol, method, options, event_fn, kwargs)


def _odeint(func, y0, t, rtol, atol, method, options, event_fn, kwargs):
    if not callable(func):
        raise TypeError(f"func: must be callable as func(t, y), got {type(func).__name__}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options: expected a dict, got {type(options).__name__}")
    options = dict(options or {})
    if method is None:
        method = "dopri5"
    if not isinstance(method, str):
        raise TypeError(
            f"method: expected a method name such as 'dopri5', got {type(method).__name__}"
        )
    family = _family(method)
    unused = {k: v for k, v in options.items() if k not in _valid_options(family)}
    if unused:
        warnings.warn(f"{method}: Unexpected arguments {unused}", stacklevel=3)
        for k in unused:
            options.pop(k)
    cbs = {k for k in _CALLBACKS if getattr(func, k, None) is not None}
    allowed = (
        set(_CALLBACKS)
        if family == "adaptive"
        else ({"callback_step"} if family != "scipy" else set())
    )
    if cbs - allowed:
        warnings.warn(f"Solver '{method}' does not support callbacks {cbs - allowed}", stacklevel=3)
    fw = _Func(func)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    if event_fn is not None:
        return _odeint_with_event(fw, y0, t, rtol, atol, method, family, options, event_fn, kwargs)
    if family == "scipy":
        return _scipy_solve(fw, y0, t, rtol, atol, options)
    if family == "adaptive":
        return _adaptive(fw, func, y0, t, rtol, atol, method, options, kwargs)
    if kwargs:
        raise TypeError(
            f"odeint: unexpected keyword arguments {sorted(kwargs)} for the fixed-grid method "
            f"{method!r}"
        )
    return _fixed_grid(fw, func, y0, t, rtol, atol, method, family, options)


# ---------------------------------------------------------------------------------------------
# adaptive methods


def _adaptive(fw, func, y0, t, rtol, atol, method, options, kwargs):
    solver = lookup(ADAPTIVE.get(method, method))()
    kw = dict(kwargs)
    first_step = options.pop("first_step", None)
    max_steps = options.pop("max_num_steps", kw.pop("max_steps", 2**31 - 1))
    control = {k: options.pop(k) for k in ("safety", "ifactor", "dfactor") if k in options}
    if control:
        kw["controller"] = _controller(**control)
    options.pop("dtype", None)  # times are float64 Python numbers inside the loop already
    min_step = options.pop("min_step", 0)
    try:
        min_step = float(min_step if min_step is not None else 0)
    except (TypeError, ValueError):
        raise TypeError(
            f"options['min_step']: expected a number, got {type(min_step).__name__}"
        ) from None
    if not math.isfinite(min_step) or min_step < 0:
        raise ValueError(f"options['min_step']: must be a finite number >= 0, got {min_step}")
    max_step = options.pop("max_step", None)
    if max_step is not None and math.isfinite(float(max_step)):
        kw["dtmax"] = float(max_step)
    shapes = [c.shape for c in y0] if isinstance(y0, (tuple, list)) else None
    user_norm = options.pop("norm", None)
    if user_norm is not None or shapes is not None:
        kw["norm"] = _torchdiffeq_norm(user_norm or _mixed_norm, shapes)
    breaks = []
    for key, jump in (("step_t", False), ("jump_t", True)):
        v = options.pop(key, None)
        if v is not None:
            vals = torch.as_tensor(v).detach().reshape(-1).tolist()
            breaks += [(float(x), jump) for x in vals]
    kw.setdefault("dense", False)
    has_cb = any(getattr(func, k, None) is not None for k in _CALLBACKS)
    ts = t
    t_list = [float(x) for x in ts.detach().reshape(-1).tolist()]
    if len(t_list) > 1:
        lo, hi = min(t_list[0], t_list[-1]), max(t_list[0], t_list[-1])
        breaks = sorted(
            {b for b in breaks if lo < b[0] < hi},
            key=lambda b: b[0] * (1 if t_list[-1] > t_list[0] else -1),
        )
    else:
        breaks = []

    def run(fn, y_start, tt):
        s = solver
        if has_cb or min_step > 0:
            prob = ODEProblem(fn, y_start, tt, rtol=rtol, atol=atol)
        if has_cb:
            s = _with_callbacks(s, func, prob.time, prob.unpack)
        if min_step > 0:
            ys = _run_with_min_step(prob, s, first_step, max_steps, min_step, kw)
        else:
            ys = solve(
                fn, y_start, tt, s, rtol=rtol, atol=atol, dt=first_step, max_steps=max_steps, **kw
            ).ys
        if has_cb:
            s.finish()
        return ys

    if not breaks:
        return run(fw, y0, ts)
    # step_t / jump_t: end a step exactly there (the solve is continued from that time); at a jump
    # f is evaluated on the far side (torchdiffeq's perturb), so the discontinuity is never
    # straddled.
    is_tuple = isinstance(y0, (tuple, list))
    out, state, start = [], y0, ts[0:1]
    idx = 0
    fwd = t_list[-1] > t_list[0]
    seg_start_jump = False
    for b, jump in breaks + [(None, False)]:
        if b is None:
            inner = ts[idx + 1 :]
            tt = torch.cat([start, inner])
        else:
            n_in = sum(1 for x in t_list[idx + 1 :] if (x <= b if fwd else x >= b))
            inner = ts[idx + 1 : idx + 1 + n_in]
            at_b = n_in > 0 and t_list[idx + n_in] == b
            end = inner[-1:] if at_b else torch.tensor([b], dtype=ts.dtype, device=ts.device)
            tt = torch.cat([start, inner if at_b else torch.cat([inner, end])])
        fn = _Nudged(fw, float(tt[0]) if seg_start_jump else None, b if jump else None, fwd)
        ys = run(fn, state, tt)
        n_keep = (len(inner)) if b is None else n_in
        piece = tuple(c[1 : 1 + n_keep] for c in ys) if is_tuple else ys[1 : 1 + n_keep]
        if not out:
            piece = (
                tuple(torch.cat([c[:1], p]) for c, p in zip(ys, piece))
                if is_tuple
                else torch.cat([ys[:1], piece])
            )
        out.append(piece)
        if b is None:
            break
        state = tuple(c[-1] for c in ys) if is_tuple else ys[-1]
        start = tt[-1:]
        idx += n_in
        seg_start_jump = jump
    if is_tuple:
        return tuple(torch.cat([p[j] for p in out]) for j in range(len(y0)))
    return torch.cat(out)


def _run_with_min_step(problem, solver, first_step, max_steps, min_step, kw):
    """The loop with torchdiffeq's ``min_step`` (steps at least that long, accepted whatever their
    error); gradients by differentiating the steps (the loop records its graph)."""
    if kw.get("sensealg") is not None or set(kw) - {"dense", "dtmax", "norm", "controller"}:
        raise ValueError(
            "options['min_step'] > 0: not available with solve's other keyword arguments "
            f"({sorted(k for k in kw if k != 'dense')}); drop min_step or those arguments"
        )
    opts = LoopOptions(
        rtol=problem.rtol,
        atol=problem.atol,
        dt=None if first_step is None else float(first_step),
        max_steps=int(max_steps),
        dense=False,
        controller=kw.get("controller"),
        dtmax=kw.get("dtmax"),
        norm=kw.get("norm"),
        min_step=min_step,
    )
    stats: dict = {}
    loop = integrate(problem.rhs(stats), problem.y0, problem.t_list, solver, opts, stats)
    if not loop.retcode.successful:
        raise SolveError(
            f"odeint failed with retcode {loop.retcode.value}: {loop.message}",
            loop.retcode,
            loop.t_reached,
            None,
        )
    return problem.unpack(torch.stack(loop.ys))


class _Nudged(nn.Module):
    """f evaluated at ``nextafter`` of a jump time, on the side of the interval being integrated."""

    def __init__(self, fw, start_jump, end_jump, fwd):
        super().__init__()
        object.__setattr__(self, "fw", fw)
        self.start_jump, self.end_jump, self.fwd = start_jump, end_jump, fwd

    def parameters(self, recurse: bool = True):
        return self.fw.parameters()

    def forward(self, t, y):
        if self.start_jump is not None or self.end_jump is not None:
            tv = float(t)
            sign = 1.0 if self.fwd else -1.0
            if tv == self.start_jump:
                t = t + (torch.nextafter(t.detach(), t.detach() + sign) - t.detach())
            elif tv == self.end_jump:
                t = t + (torch.nextafter(t.detach(), t.detach() - sign) - t.detach())
        return self.fw(t, y)


def _controller(safety=0.9, ifactor=10.0, dfactor=0.2):
    """torchdiffeq's adaptive-step options as an integral :class:`PIController`."""
    from .controllers import PIController

    vals = {}
    for key, v in (("safety", safety), ("ifactor", ifactor), ("dfactor", dfactor)):
        try:
            vals[key] = float(v)
        except (TypeError, ValueError):
            raise TypeError(
                f"options[{key!r}]: expected a number, got {type(v).__name__}"
            ) from None
    if not 0 < vals["safety"] <= 1:
        raise ValueError(f"options['safety']: must be in (0, 1], got {safety}")
    if not 0 < vals["dfactor"] < 1 < vals["ifactor"]:
        raise ValueError(
            f"options: need 0 < dfactor < 1 < ifactor, got dfactor={dfactor}, ifactor={ifactor}"
        )
    return PIController(
        beta1=1.0,
        beta2=0.0,
        safety=vals["safety"],
        factor_min=vals["dfactor"],
        factor_max=vals["ifactor"],
    )


# ---------------------------------------------------------------------------------------------
# fixed-grid methods


def _grid(fw, y0, t, options):
    step_size = options.pop("step_size", None)
    gc = options.pop("grid_constructor", None)
    if step_size is not None and gc is not None:
        raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
    if step_size is not None:
        try:
            h = float(step_size)
        except (TypeError, ValueError):
            raise TypeError(
                f"options['step_size']: expected a positive number, got {type(step_size).__name__}"
            ) from None
        if not math.isfinite(h) or h <= 0:
            raise ValueError(
                f"options['step_size']: must be a finite positive number, got {step_size}"
            )
        span = t[-1] - t[0]
        sign = 1.0 if float(span) >= 0 else -1.0
        niters = math.ceil(abs(float(span)) / h + 1)
        g = torch.arange(0, niters, dtype=t.dtype, device=t.device) * (sign * h) + t[0]
        return torch.cat([g[:-1], t[-1:]])
    if gc is not None:
        g = gc(fw, y0, t)
        if not isinstance(g, torch.Tensor) or g.ndim != 1 or g.numel() < 1:
            raise ValueError("options['grid_constructor']: must return a 1-D tensor of grid times")
        if float(g[0]) != float(t[0]) or float(g[-1]) != float(t[-1]):
            raise ValueError(
                "options['grid_constructor']: the grid must start at t[0] and end at t[-1]"
            )
        return g.to(t.dtype)
    return t


def _fixed_grid(fw, func, y0, t, rtol, atol, method, family, options):
    interp = options.pop("interp", "linear")
    if interp not in ("linear", "cubic"):
        raise ValueError(
            f"options['interp']: unknown interpolation {interp!r}; use 'linear' or 'cubic'"
        )
    perturb = options.pop("perturb", False)
    options.pop("norm", None)
    problem = ODEProblem(fw, y0, t)
    grid = _grid(fw, y0, problem.t, options)
    if grid.numel() > 1:
        d = grid[1:] - grid[:-1]
        fwd = float(problem.t[-1]) >= float(problem.t[0])
        if not ((d > 0).all() if fwd else (d < 0).all()):
            raise ValueError("the step grid must be strictly monotonic in the direction of t")
    stats = {"nfe": 0}
    solver = _grid_solver(problem, func, grid, rtol, atol, method, family, options, perturb, stats)
    if problem.t.numel() == 1:
        return problem.unpack(problem.y0.unsqueeze(0))
    K = grid.numel() - 1
    idx = [float(i) for i in range(K + 1)]
    opts = LoopOptions(adaptive=False, grid=idx, dense=False, max_steps=K + 1)
    loop = integrate(None, problem.y0, idx, solver, opts, stats)
    if not loop.retcode.successful:
        raise SolveError(
            f"odeint({method!r}) failed with retcode {loop.retcode.value}: {loop.message}",
            loop.retcode,
            loop.t_reached,
            None,
        )
    Y = torch.stack(loop.ys)
    out = _interpolate(problem, grid, Y, problem.t, interp)
    return problem.unpack(out)


def _grid_solver(problem, func, grid, rtol, atol, method, family, options, perturb, stats):
    """The fixed-grid solver of ``method`` on the grid tensor ``grid`` (its steps read their times
    from it), with torchdiffeq's ``callback_step`` on the user's state."""
    from .solvers.fixed_grid import IMPLICIT_TABLEAUS, GridAdams, GridImplicitRK, GridRK

    def f(tt, y):
        return problem.call(tt, y)

    cb = getattr(func, "callback_step", None)
    if cb is not None and problem.is_tuple:
        cb0 = cb

        def cb(t0, y0_, dt):
            return cb0(t0, problem.unpack(y0_), dt)

    common = dict(stats=stats, perturb=perturb, callback_step=cb)
    if family == "fixed":
        return GridRK(lookup(FIXED_RK.get(method, method)).tableau, f, grid, **common)
    if family == "implicit":
        return GridImplicitRK(
            IMPLICIT_TABLEAUS[method], f, grid, max_iters=options.pop("max_iters", 100), **common
        )
    return GridAdams(
        f,
        grid,
        implicit=ADAMS[method],
        rtol=rtol,
        atol=atol,
        max_iters=options.pop("max_iters", 4),
        max_order=options.pop("max_order", 12),
        **common,
    )


def _interpolate(problem, grid, Y, t, interp):
    """The states at ``t`` from those at the grid points (torchdiffeq's linear or cubic Hermite)."""
    g = [float(x) for x in grid.detach().tolist()]
    tl = [float(x) for x in t.detach().tolist()]
    fwd = g[-1] >= g[0]
    out = [Y[0]]
    j = 0
    fcache = {}
    for i in range(1, len(tl)):
        while j < len(g) - 2 and ((g[j + 1] < tl[i]) if fwd else (g[j + 1] > tl[i])):
            j += 1
        t0, t1 = grid[j], grid[j + 1]
        if tl[i] == g[j + 1]:
            out.append(Y[j + 1])
            continue
        if tl[i] == g[j]:
            out.append(Y[j])
            continue
        s = ((t[i] - t0) / (t1 - t0)).to(Y.dtype)
        if interp == "linear":
            out.append(Y[j] + s * (Y[j + 1] - Y[j]))
        else:
            for m in (j, j + 1):
                if m not in fcache:
                    fcache[m] = problem.call(grid[m].to(Y.dtype), Y[m])
            h = (t1 - t0).to(Y.dtype)
            h00 = (1 + 2 * s) * (1 - s) * (1 - s)
            h10 = s * (1 - s) * (1 - s)
            h01 = s * s * (3 - 2 * s)
            h11 = s * s * (s - 1)
            out.append(h00 * Y[j] + h10 * h * fcache[j] + h01 * Y[j + 1] + h11 * h * fcache[j + 1])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# scipy_solver


def _scipy_solve(fw, y0, t, rtol, atol, options):
    import numpy as np
    from scipy.integrate import solve_ivp

    problem = ODEProblem(fw, y0, t)
    y = problem.y0
    if problem.t.numel() == 1:
        return problem.unpack(y.unsqueeze(0))
    method = options.pop("solver", "LSODA")
    kw = {}
    if "min_step" in options and method == "LSODA":
        kw["min_step"] = float(options["min_step"])
    if "max_step" in options:
        kw["max_step"] = float(options["max_step"])
    dtype, device = y.dtype, y.device

    def f_np(tt, yy):
        with torch.no_grad():
            out = problem.call(
                torch.tensor(float(tt), dtype=dtype, device=device),
                torch.as_tensor(yy, dtype=dtype, device=device).reshape(y.shape),
            )
        return out.detach().cpu().numpy().astype(np.float64).reshape(-1)

    tl = problem.t.detach().cpu().numpy().astype(np.float64)
    rt = (
        float(rtol)
        if not isinstance(rtol, torch.Tensor) or rtol.numel() == 1
        else rtol.cpu().numpy()
    )
    at = (
        float(atol)
        if not isinstance(atol, torch.Tensor) or atol.numel() == 1
        else atol.cpu().numpy()
    )
    sol = solve_ivp(
        f_np,
        (tl[0], tl[-1]),
        y.detach().cpu().numpy().astype(np.float64).reshape(-1),
        method=method,
        t_eval=tl,
        rtol=rt,
        atol=at,
        **kw,
    )
    if not sol.success:
        raise RuntimeError(f"scipy_solver ({method}) failed: {sol.message}")
    out = torch.as_tensor(sol.y.T, dtype=dtype, device=device).reshape(len(tl), *y.shape)
    return problem.unpack(out)


# ---------------------------------------------------------------------------------------------
# events


def _combine_event(event_fn, t0, y0):
    """A vector ``event_fn`` as one scalar: the first component to cross zero (torchdiffeq's)."""
    with torch.no_grad():
        v0 = event_fn(t0, y0)
        v0 = torch.as_tensor(v0)
        if v0.numel() == 1:
            return event_fn
        signs = torch.sign(v0)

    def combined(t, y):
        return (torch.as_tensor(event_fn(t, y)) * signs).min()

    return combined


#: torchdiffeq's bound on the steps of a fixed-grid solve until an event
_MAX_EVENT_STEPS = 20000


def _fixed_grid_event(fw, func, y0, t, rtol, atol, method, family, options, g):
    """A fixed-grid method stepping ``step_size`` until ``g`` changes sign (torchdiffeq's
    ``integrate_until_event``): the event by bisection to ``atol`` on the step's linear or cubic
    interpolant; ``(event_t, states at [t0, event_t])`` with the event time's gradient."""
    step = options.pop("step_size", None)
    if step is None:
        raise ValueError(
            "Event handling for fixed step solvers currently requires `step_size` to be provided "
            "in options."
        )
    h = float(step)
    if not math.isfinite(h) or h <= 0:
        raise ValueError(f"options['step_size']: must be a finite positive number, got {step}")
    interp = options.pop("interp", "linear")
    if interp not in ("linear", "cubic"):
        raise ValueError(
            f"options['interp']: unknown interpolation {interp!r}; use 'linear' or 'cubic'"
        )
    perturb = options.pop("perturb", False)
    options.pop("grid_constructor", None)
    options.pop("norm", None)
    problem = ODEProblem(fw, y0, t)
    y = problem.y0
    sign = 1.0 if float(problem.t[1]) >= float(problem.t[0]) else -1.0
    t0 = problem.t[0].to(y.dtype)
    n = _MAX_EVENT_STEPS
    # t1 = t0 + dt, one addition after the other in the state's dtype as torchdiffeq's event loop
    # (its rounding decides where a marginally stable method such as explicit_adams drifts to)
    import numpy as np

    npd = np.float64 if y.dtype == torch.float64 else np.float32
    acc = np.full(n + 1, sign * h, dtype=npd)
    acc[0] = float(t0)
    acc = np.add.accumulate(acc, dtype=npd)
    grid = t0 - t0.detach() + torch.from_numpy(acc).to(device=y.device)
    stats = {"nfe": 0}
    solver = _grid_solver(problem, func, grid, rtol, atol, method, family, options, perturb, stats)
    solver.constant_h = sign * h

    def gval(tt, yy):
        return torch.sign(torch.as_tensor(g(tt, problem.unpack(yy))))

    with torch.no_grad():
        sign0 = gval(t0, y)
    found = {}

    def hook(seg, s, s_new, y_new):
        k = round(s)
        ta, tb = grid[k], grid[k + 1]
        with torch.no_grad():
            if bool(gval(tb, y_new) == sign0):
                return None
        ya = seg.data[0]
        if interp == "linear":

            def at(tt):
                return ya + (tt - ta) / (tb - ta) * (y_new - ya)

        else:
            fa, fb = problem.call(ta, ya), problem.call(tb, y_new)

            def at(tt):
                r = (tt - ta) / (tb - ta)
                dt = tb - ta
                return (
                    (1 + 2 * r) * (1 - r) * (1 - r) * ya
                    + r * (1 - r) * (1 - r) * dt * fa
                    + r * r * (3 - 2 * r) * y_new
                    + r * r * (r - 1) * dt * fb
                )

        with torch.no_grad():  # torchdiffeq's find_event: bisection to atol
            lo, hi = ta.detach(), tb.detach()
            tol = float(atol) if not isinstance(atol, torch.Tensor) else float(atol.min())
            iters = (
                math.ceil(math.log(abs(float(hi - lo)) / tol) / math.log(2.0)) if tol > 0 else 60
            )
            for _ in range(max(iters, 0)):
                mid = (lo + hi) / 2
                same = bool(gval(mid, at(mid)) == sign0)
                lo, hi = (mid, hi) if same else (lo, mid)
            t_event = (lo + hi) / 2
        found["t"], found["y"] = t_event, at(t_event)
        return k + float((t_event - ta) / (tb - ta))

    opts = LoopOptions(
        adaptive=False,
        grid=[float(i) for i in range(n + 1)],
        dense=False,
        max_steps=n + 1,
        event=hook,
    )
    loop = integrate(None, y, [0.0, float(n)], solver, opts, stats)
    if "t" not in found:
        if not loop.retcode.successful:
            raise SolveError(
                f"odeint({method!r}, event_fn=...) failed with retcode {loop.retcode.value}: "
                f"{loop.message}",
                loop.retcode,
                loop.t_reached,
                None,
            )
        raise RuntimeError(f"Reached maximum number of iterations {n}.")
    event_t = found["t"].to(t.dtype)
    ys = torch.stack([y, found["y"]])
    event_t, ys = _reroute_event(
        problem.call, lambda tt, yy: g(tt, problem.unpack(yy)), event_t, ys
    )
    return event_t, problem.unpack(ys)


def _odeint_with_event(fw, y0, t, rtol, atol, method, family, options, event_fn, kwargs):
    if t.numel() != 2:
        raise ValueError(
            f"We require len(t) == 2 when in event handling mode, but got len(t)={t.numel()}."
        )
    from ._solve import event_solve

    ref = y0[0] if isinstance(y0, (tuple, list)) else y0
    ev = _combine_event(event_fn, t[0].to(ref.dtype), y0)
    reverse = float(t[1]) < float(t[0])
    if family in ("fixed", "implicit", "adams"):
        return _fixed_grid_event(fw, fw.base, y0, t, rtol, atol, method, family, options, ev)
    if family != "adaptive":
        raise ValueError(
            f"event_fn: events with method {method!r} are not supported (as in torchdiffeq); use "
            f"an adaptive method (e.g. 'dopri5') or a fixed-grid one with "
            f"options=dict(step_size=...)"
        )
    kw = {}
    if "first_step" in options:
        kw["dt"] = options.pop("first_step")
    if "max_num_steps" in options:
        kw["max_steps"] = options.pop("max_num_steps")
    control = {k: options.pop(k) for k in ("safety", "ifactor", "dfactor") if k in options}
    if control:
        kw["controller"] = _controller(**control)
    if options.get("max_step") is not None and math.isfinite(float(options["max_step"])):
        kw["dtmax"] = float(options["max_step"])
    if float(options.get("min_step") or 0) > 0:
        raise ValueError(
            "options['min_step'] > 0 with event_fn: not supported; drop min_step for the event "
            "solve"
        )
    solver = lookup(ADAPTIVE.get(method, method))()
    sensealg = kwargs.pop("sensealg", None)
    return event_solve(fw, y0, t[0], ev, reverse, solver, rtol, atol, kw, sensealg, kwargs)


def _reroute_event(fw, event_fn, event_t, ys):
    """The event time's gradient by the implicit function theorem (values unchanged; torchdiffeq's
    ``ImplicitFnGradientRerouting``): ``dt*/dθ = −(∂g/∂θ)/(dg/dt)``, and ``y(t*)`` moves with it.
    ``fw(t, y)`` and ``event_fn(t, y)`` take the flat state."""
    if not torch.is_grad_enabled():
        return event_t, ys
    y_e = ys[-1]
    with torch.enable_grad():
        te = event_t.detach().clone().requires_grad_(True)
        ye = y_e.detach().clone().requires_grad_(True)
        f_val = fw(te, ye).detach()
        c = torch.as_tensor(event_fn(te, ye))
        if not c.requires_grad:
            return event_t, ys
        par_dt, dstate = torch.autograd.grad(c.sum(), (te, ye), allow_unused=True)
    par_dt = torch.zeros_like(te) if par_dt is None else par_dt
    dstate = torch.zeros_like(ye) if dstate is None else dstate
    dcdt = (par_dt + (dstate * f_val).sum()).detach()
    if float(dcdt) == 0.0:
        return event_t, ys
    g_val = torch.as_tensor(event_fn(event_t.detach(), y_e)).sum()
    te_new = event_t.detach() - ((g_val - g_val.detach()) / dcdt).to(event_t.dtype)
    y_new = y_e + f_val * (te_new - event_t.detach()).to(f_val.dtype)
    return te_new, torch.cat([ys[:-1], y_new[None]])
