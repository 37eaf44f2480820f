"""Steady states and fixed points: ``steady_state`` with DynamicSS (ODE route) or root finders.

``pn.last_stats`` (also ``pyneuralode.steady.last_stats``) is the :class:`SteadyStateInfo` of
the latest :func:`steady_state` call in the calling thread (including those made by
:class:`pn.DEQ`); per call: ``steady_state(..., return_info=True)`` and ``DEQ.last_stats``.
"""

from . import _steady, solvers
from ._steady import SteadyStateError, SteadyStateInfo, steady_state
from .solvers import AbstractSteadyStateSolver, Anderson, Broyden, DynamicSS, FixedPointIteration

__all__ = [
    "steady_state",
    "SteadyStateInfo",
    "SteadyStateError",
    "DynamicSS",
    "Anderson",
    "Broyden",
    "FixedPointIteration",
    "AbstractSteadyStateSolver",
]


def __getattr__(name):
    # ``last_stats`` is per thread: forward to the steady module's thread-local.
    if name == "last_stats":
        return _steady.last_stats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
