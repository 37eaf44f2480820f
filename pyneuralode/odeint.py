"""A drop-in for torchdiffeq's ``odeint(func, y0, t, rtol, atol, method, options)``."""
from __future__ import annotations

from ._solve import solve
from .solvers import lookup

_FIXED_GRID = {"euler", "midpoint", "rk4", "heun", "heun2", "explicit_adams", "implicit_adams"}


def odeint(func, y0, t, rtol=1e-7, atol=1e-9, method: str | None = None, options: dict | None = None, **kwargs):
    """Solve ``dy/dt = func(t, y)`` and return the states at ``t`` (``sol.ys``), like torchdiffeq.

    ``method`` takes torchdiffeq's names (``"dopri5"`` — the default there and here ``"tsit5"``
    unless given — ``"rk4"``, ``"euler"``, ``"midpoint"``, ``"bosh3"``, ...) or any solver name
    of this library. ``options``: ``step_size`` for fixed-grid methods (default: step on the grid
    ``t``, as torchdiffeq does), ``first_step``, ``max_num_steps``, and torchdiffeq's step-size
    controller settings ``safety`` (0.9), ``ifactor`` (10) and ``dfactor`` (0.2) for adaptive
    methods (integral control, as in torchdiffeq). Extra keyword arguments go to
    :func:`pyneuralode.solve` (e.g. ``sensealg``).
    """
    options = dict(options or {})
    # odeint returns only the states at t: keeping the dense output would grow memory with the steps
    kwargs.setdefault("dense", False)
    name = (method or "tsit5").lower()
    solver = lookup(name)()
    step_size = options.pop("step_size", None)
    first_step = options.pop("first_step", None)
    max_steps = options.pop("max_num_steps", kwargs.pop("max_steps", 100_000))
    control = {k: options.pop(k) for k in ("safety", "ifactor", "dfactor") if k in options}
    if options:
        raise ValueError(f"options: unsupported keys {sorted(options)}; supported: step_size, first_step, max_num_steps, "
                         f"safety, ifactor, dfactor")
    if control:
        kwargs["controller"] = _controller(**control)
    if not solver.adaptive_capable or (name in _FIXED_GRID and step_size is not None) or name in ("euler", "rk4"):
        adaptive = False
        if step_size is None:
            return _grid_solve(func, y0, t, solver, rtol, atol, max_steps, kwargs)
        dt = step_size
    else:
        adaptive = True
        dt = first_step
    return solve(func, y0, t, solver, rtol=rtol, atol=atol, dt=dt, adaptive=adaptive, max_steps=max_steps, **kwargs).ys


def _controller(safety=0.9, ifactor=10.0, dfactor=0.2):
    """torchdiffeq's adaptive-step options as an integral :class:`PIController`."""
    from .controllers import PIController

    vals = {}
    for key, v in (("safety", safety), ("ifactor", ifactor), ("dfactor", dfactor)):
        try:
            vals[key] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"options[{key!r}]: expected a number, got {type(v).__name__}") from None
    if not 0 < vals["safety"] <= 1:
        raise ValueError(f"options['safety']: must be in (0, 1], got {safety}")
    if not 0 < vals["dfactor"] < 1 < vals["ifactor"]:
        raise ValueError(f"options: need 0 < dfactor < 1 < ifactor, got dfactor={dfactor}, ifactor={ifactor}")
    return PIController(beta1=1.0, beta2=0.0, safety=vals["safety"], factor_min=vals["dfactor"], factor_max=vals["ifactor"])


def _grid_solve(func, y0, t, solver, rtol, atol, max_steps, kwargs):
    """torchdiffeq's fixed-grid default: one step between consecutive output times."""
    import torch

    tt = torch.as_tensor(t)
    if tt.ndim != 1 or tt.numel() < 2:
        return solve(func, y0, t, solver, adaptive=False, dt=1.0, **kwargs).ys
    d = (tt[1:] - tt[:-1]).abs()
    if not torch.allclose(d, d[0].expand_as(d), rtol=1e-6, atol=0):
        # Non-uniform grid: step between output points one interval at a time.
        pieces = []
        state = y0
        is_tuple = isinstance(y0, (tuple, list))
        for i in range(tt.numel() - 1):
            ys = solve(func, state, tt[i : i + 2], solver, adaptive=False, dt=float(d[i]), max_steps=max_steps, **kwargs).ys
            state = tuple(c[-1] for c in ys) if is_tuple else ys[-1]
            pieces.append(ys if i == 0 else (tuple(c[1:] for c in ys) if is_tuple else ys[1:]))
        if is_tuple:
            return tuple(torch.cat([p[j] for p in pieces]) for j in range(len(y0)))
        return torch.cat(pieces)
    return solve(func, y0, t, solver, adaptive=False, dt=float(d[0]), max_steps=max_steps, **kwargs).ys
