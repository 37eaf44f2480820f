"""``make_options``: the integrate loop's options from ``solve``'s keywords, each validated (the
one place ``dt``, ``max_steps``, ``dtmin``/``dtmax``, the controller and the yes/no flags are
checked, for ``solve`` and per-sample stepping alike)."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import numpy as np
import torch

from ._loop import LoopOptions


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
        raise TypeError(
            f"{name}: expected a positive int, got {value!r} ({type(value).__name__})"
        ) from None
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
        raise TypeError(
            f"{name}: expected a number (a step size) or None, got {type(value).__name__}"
        ) from None
    if math.isnan(v) or v < 0 or (v == 0 and not allow_zero) or (math.isinf(v) and name == "dtmin"):
        need = (
            "a finite number >= 0 (0: no floor but the float resolution of t)"
            if allow_zero
            else "a positive number (inf: no limit)"
        )
        raise ValueError(f"{name}: must be {need}, got {value!r}; pass None for the default")
    return abs(v)


def make_options(
    solver,
    *,
    rtol,
    atol,
    dt,
    adaptive,
    max_steps,
    dense,
    progress,
    controller,
    dtmin,
    dtmax,
    y0: torch.Tensor | None = None,
) -> LoopOptions:
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
        raise ValueError(
            "dt: fixed-step integration (adaptive=False) needs a step size; pass dt=..., e.g. "
            "dt=0.01"
        )
    max_steps = _check_count("max_steps", max_steps)
    dtmin = _check_step_bound("dtmin", dtmin, allow_zero=True)
    dtmax = _check_step_bound("dtmax", dtmax, allow_zero=False)
    if dtmin is not None and dtmax is not None and dtmin > dtmax:
        raise ValueError(
            f"dtmin, dtmax: dtmin={dtmin:g} exceeds dtmax={dtmax:g}; dtmin must be <= dtmax"
        )
    if controller is not None and not (
        callable(getattr(controller, "factor", None)) and hasattr(controller, "factor_min")
    ):
        raise TypeError(
            f"controller: expected a step-size controller such as pn.PIController() "
            f"or pn.PredictiveController() (or None for the solver's default), "
            f"got {controller!r}"
        )
    if adaptive or getattr(solver, "implicit", False):
        _check_tolerance_pair(rtol, atol)
    if y0 is not None:
        _check_state_dtype(solver, y0)
    return LoopOptions(
        rtol=rtol,
        atol=atol,
        dt=dt,
        adaptive=adaptive,
        max_steps=max_steps,
        dense=dense,
        progress=progress,
        controller=controller,
        dtmin=dtmin,
        dtmax=dtmax,
    )


def _check_tolerance_pair(rtol, atol):
    """The error test needs a positive tolerance in every component (rtol = atol = 0 divides
    by 0)."""

    def zero(tol):
        if isinstance(tol, torch.Tensor):
            return tol == 0
        return torch.tensor(tol == 0)

    if isinstance(rtol, torch.Tensor) or isinstance(atol, torch.Tensor):
        both_zero = bool((zero(rtol) & zero(atol)).any())
    else:  # two numbers: no tensors needed
        both_zero = bool(rtol == 0) and bool(atol == 0)
    if both_zero:
        raise ValueError(
            "rtol, atol: both are 0 (in some component), so no error is acceptable; "
            "give a positive rtol (e.g. 1e-6) or atol (e.g. 1e-9)"
        )


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_state_dtype(solver, y0: torch.Tensor):
    if y0.dtype in _LOW_PRECISION and getattr(solver, "implicit", False):
        raise TypeError(
            f"y0: dtype {y0.dtype} is not supported by the implicit solver "
            f"{type(solver).__name__} (torch's linear algebra needs float32 or "
            f"float64); convert the state with y0.float() and cast the result back, "
            f"or use an explicit solver such as pn.Tsit5()"
        )


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The user's step-size settings as given to an entry point (``dt``, ``adaptive``,
    ``max_steps``, ``controller``, ``dtmin``, ``dtmax``), carried as one value to the code that
    builds the loop's options; :func:`options_for` validates them."""

    dt: Any = None
    adaptive: Any = True
    max_steps: Any = 100_000
    controller: Any = None
    dtmin: Any = None
    dtmax: Any = None


def options_for(
    problem, solver, steps: StepSettings, *, dense=False, progress=False
) -> LoopOptions:
    """:func:`make_options` with the problem's validated tolerances and state."""
    return make_options(
        solver,
        rtol=problem.rtol,
        atol=problem.atol,
        y0=problem.y0,
        dense=dense,
        progress=progress,
        **vars(steps),
    )
