"""Solvers: tableaus as data, one generic engine per family.

Each solver module lists its public classes in ``__all__``; every :class:`AbstractSolver`
subclass found there is registered for string lookup under its lower-case class name, its SciML
``name`` and its ``aliases``.
"""

from . import bdf, esdirk, explicit, rosenbrock
from ._base import AbstractSolver, StepResult
from ._tableau import ButcherTableau
from .bdf import *
from .esdirk import *
from .explicit import *
from .rosenbrock import *

__all__ = [
    "AbstractSolver",
    "StepResult",
    "ButcherTableau",
    *explicit.__all__,
    *rosenbrock.__all__,
    *esdirk.__all__,
    *bdf.__all__,
]

#: Every registered solver class by lower-case name (class name, SciML name, aliases).
REGISTRY: dict = {}


def register(cls):
    """Register a solver class for string lookup (``solve(..., "tsit5")``,
    ``odeint(method=...)``)."""
    for n in (cls.__name__, getattr(cls, "name", cls.__name__), *getattr(cls, "aliases", ())):
        REGISTRY[n.lower()] = cls
    return cls


for _mod in (explicit, rosenbrock, esdirk, bdf):
    for _n in _mod.__all__:
        _c = getattr(_mod, _n)
        if isinstance(_c, type) and issubclass(_c, AbstractSolver):
            register(_c)


def lookup(name: str):
    """The solver class registered under ``name`` (case-insensitive); a clear error lists the valid
    names."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        valid = ", ".join(sorted(REGISTRY))
        raise ValueError(
            f"solver/method: unknown name {name!r}; valid names are: {valid}"
        ) from None
