"""The one sensealg resolver and its name table, for ODE solves and for steady states alike."""

from __future__ import annotations

from .._arguments import refuse_class
from ._base import AbstractImplicitGradient, AbstractSensitivity
from .backsolve import BacksolveAdjoint
from .direct import DirectAdjoint
from .implicit import PhantomGradient, SteadyStateAdjoint
from .interpolating import InterpolatingAdjoint
from .quadrature import QuadratureAdjoint

#: short names accepted wherever a sensealg is (``pn.solve``, ``NeuralODE``, ``CNF``, ...):
#: each gives the algorithm with its default options
SENSEALG_NAMES = {
    "direct": DirectAdjoint,
    "backsolve": BacksolveAdjoint,
    "adjoint": BacksolveAdjoint,  # torchdiffeq's odeint_adjoint
    "interpolating": InterpolatingAdjoint,
    "quadrature": QuadratureAdjoint,
}
#: the same for steady states (``pn.steady_state``, ``pn.DEQ``)
IMPLICIT_NAMES = {"implicit": SteadyStateAdjoint, "phantom": PhantomGradient}

_ODE_HINT = "pn.InterpolatingAdjoint()"
_STEADY_HINT = "pn.SteadyStateAdjoint() (implicit, exact) or pn.PhantomGradient(k) (inexact)"


def resolve_sensealg(sensealg, *, steady: bool = False, arg: str = "sensealg"):
    """An algorithm instance from ``sensealg``: ``None`` (the default: :class:`DirectAdjoint` for
    an ODE solve, :class:`SteadyStateAdjoint` for a steady state), a name of
    :data:`SENSEALG_NAMES` (resp. :data:`IMPLICIT_NAMES`), or an instance of the right family.
    """
    base, names, hint = (
        (AbstractImplicitGradient, IMPLICIT_NAMES, _STEADY_HINT)
        if steady
        else (AbstractSensitivity, SENSEALG_NAMES, _ODE_HINT)
    )
    if sensealg is None:
        return SteadyStateAdjoint() if steady else DirectAdjoint()
    if isinstance(sensealg, str):
        cls = names.get(sensealg.lower())
        if cls is None:
            raise ValueError(
                f"{arg}: unknown name {sensealg!r}; use one of {sorted(names)} or an object such "
                f"as {hint}"
            )
        return cls()
    refuse_class(arg, sensealg)
    if isinstance(sensealg, base):
        return sensealg
    if isinstance(sensealg, AbstractImplicitGradient):
        raise TypeError(
            f"{arg}: {type(sensealg).__name__} differentiates steady states; use it with "
            f"pn.steady_state(...) or pn.DEQ(...), not an ODE solve (there use e.g. {_ODE_HINT})"
        )
    if isinstance(sensealg, AbstractSensitivity):
        raise TypeError(
            f"{arg}: {type(sensealg).__name__} differentiates ODE solves and cannot differentiate "
            f"a steady state; use {_STEADY_HINT}"
        )
    raise TypeError(
        f"{arg}: expected an object such as {hint} or one of {sorted(names)}, got "
        f"{type(sensealg).__name__}"
    )
