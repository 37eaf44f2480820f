"""Mapping of pyneuralode's solver/sensealg objects and loop options to the Julia factories.

Solvers and sensitivity algorithms are matched by their SciML ``name`` (or class name), so this
module does not depend on their implementation. The tables must equal the keys of the factories in
``julia/PyNeuralODEBridge.jl`` (``EXPLICIT``, ``IMPLICIT``, ``make_sensealg``); a test checks it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: SciML names of OrdinaryDiffEq algorithms the bridge builds (``make_solver``).
EXPLICIT_SOLVERS = ("Euler", "Midpoint", "Heun", "RK4", "BS3", "DP5", "Tsit5", "Vern7", "Vern9")
IMPLICIT_SOLVERS = (
    "Rosenbrock23",
    "Rodas4",
    "Rodas5P",
    "ImplicitEuler",
    "TRBDF2",
    "Kvaerno3",
    "Kvaerno5",
    "KenCarp4",
    "FBDF",
    "QNDF",
)
#: SciMLSensitivity algorithms the bridge builds (``make_sensealg``).
JULIA_SENSEALGS = (
    "InterpolatingAdjoint",
    "BacksolveAdjoint",
    "QuadratureAdjoint",
    "GaussAdjoint",
    "SteadyStateAdjoint",
)


def _name(obj) -> str:
    return getattr(obj, "name", None) or type(obj).__name__


def solver_name(solver) -> str:
    """SciML name of ``solver`` for ``make_solver``; a clear error when Julia has no counterpart."""
    if isinstance(solver, str):
        name = solver
    else:
        name = _name(solver)
    for known in EXPLICIT_SOLVERS + IMPLICIT_SOLVERS:
        if name.lower() == known.lower() or type(solver).__name__.lower() == known.lower():
            return known
    raise ValueError(
        f"solver: {name} has no OrdinaryDiffEq counterpart in backend='julia'; use one of "
        f"{', '.join(EXPLICIT_SOLVERS + IMPLICIT_SOLVERS)} (or backend='torch')"
    )


def is_implicit(name: str) -> bool:
    return name in IMPLICIT_SOLVERS


def sensealg_kwargs(sensealg) -> dict[str, Any]:
    """Keyword arguments for the Julia ``forward`` that pick the SciMLSensitivity algorithm.

    ``DirectAdjoint`` (the default) maps to ``InterpolatingAdjoint(checkpointing=true)``:
    SciMLSensitivity's discrete adjoints push tracked numbers through ``f``, which cannot work
    with a Python function. Backward ``solver``/``rtol``/``atol`` overrides are refused:
    SciMLSensitivity's ``solve`` rrule reuses the forward algorithm and tolerances.
    """
    cls = type(sensealg).__name__ if sensealg is not None else "DirectAdjoint"
    name = getattr(sensealg, "name", cls) if sensealg is not None else cls
    if sensealg is not None and getattr(sensealg, "solver", None) is not None:
        raise ValueError(
            f"sensealg: {name}(solver=...) is not supported with backend='julia' "
            "(SciMLSensitivity integrates the "
            f"adjoint with the forward solver); drop the solver argument"
        )
    quad = (
        name == "QuadratureAdjoint"
        and getattr(sensealg, "quadrature", "gauss-legendre") == "gauss-kronrod"
    )
    if (
        sensealg is not None
        and not quad
        and (
            getattr(sensealg, "rtol", None) is not None
            or getattr(sensealg, "atol", None) is not None
        )
    ):
        raise ValueError(
            f"sensealg: {name}(rtol=..., atol=...) is not supported with backend='julia' "
            "(SciMLSensitivity's solve rrule "
            f"uses the forward tolerances for the adjoint); drop them or use backend='torch'"
        )
    if name in ("DirectAdjoint", "InterpolatingAdjoint"):
        return {
            "sensealg": "InterpolatingAdjoint",
            "checkpointing": bool(getattr(sensealg, "checkpointing", True)),
        }
    if name == "BacksolveAdjoint":
        return {"sensealg": "BacksolveAdjoint", "checkpointing": True}
    if name == "QuadratureAdjoint":
        if quad:
            kw = {"sensealg": "QuadratureAdjoint", "checkpointing": False}
            if getattr(sensealg, "rtol", None) is not None:
                kw["quad_reltol"] = float(sensealg.rtol)
            if getattr(sensealg, "atol", None) is not None:
                kw["quad_abstol"] = float(sensealg.atol)
            return kw
        return {
            "sensealg": "GaussAdjoint",
            "checkpointing": bool(getattr(sensealg, "checkpointing", False)),
        }
    if name in ("GaussAdjoint",):
        return {
            "sensealg": "GaussAdjoint",
            "checkpointing": bool(getattr(sensealg, "checkpointing", False)),
        }
    if name == "SteadyStateAdjoint":
        raise ValueError(
            "sensealg: SteadyStateAdjoint is for steady states (pn.steady_state / pn.DEQ), not "
            "for pn.solve"
        )
    raise ValueError(
        f"sensealg: {name} has no SciMLSensitivity counterpart in backend='julia'; use "
        "pn.InterpolatingAdjoint(), "
        f"pn.BacksolveAdjoint() or pn.QuadratureAdjoint() (or backend='torch')"
    )


def _tol(v):
    if isinstance(v, torch.Tensor):
        return np.ascontiguousarray(v.detach().reshape(-1).cpu().numpy())
    return float(v)


def solve_kwargs(opts) -> dict[str, Any]:
    """``LoopOptions`` → keyword arguments of OrdinaryDiffEq's ``solve`` (as the bridge names
    them)."""
    from ..controllers import PIController

    ctrl = getattr(opts, "controller", None)
    if ctrl is not None and ctrl != PIController():
        raise ValueError(
            "controller: custom step-size controllers are not passed to backend='julia' "
            "(OrdinaryDiffEq picks its own "
            "default controller per algorithm); drop controller=... or use backend='torch'"
        )
    kw: dict[str, Any] = {
        "abstol": _tol(opts.atol),
        "reltol": _tol(opts.rtol),
        "adaptive": bool(opts.adaptive),
        "maxiters": int(opts.max_steps),
    }
    if opts.dt is not None:
        kw["dt"] = float(opts.dt)
    if opts.dtmin is not None:
        kw["dtmin"] = float(opts.dtmin)
    if opts.dtmax is not None:
        kw["dtmax"] = float(opts.dtmax)
    return kw
