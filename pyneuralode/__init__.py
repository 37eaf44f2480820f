"""pyneuralode: neural differential equations for torch.

The native torch engine is the default; ``backend="julia"`` hands the same problem to
DifferentialEquations.jl / SciMLSensitivity (optional, see ``pyneuralode.julia``; importing
pyneuralode never starts Julia and imports nothing heavy beyond torch and numpy).
"""

from . import nn as _nn
from . import sensitivity as _sensitivity
from . import solvers as _solvers
from . import steady as _steady
from ._odeint_adjoint import odeint_adjoint
from ._odeint_event import odeint_event
from ._solution import PerSampleSolution, ReturnCode, Solution, SolveError
from ._solve import solve
from ._version import __version__
from .controllers import PIController, PredictiveController
from .nn import *
from .odeint import odeint
from .sensitivity import *
from .solvers import *
from .steady import *

__all__ = [
    "solve",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "Solution",
    "PerSampleSolution",
    "SolveError",
    "ReturnCode",
    "PIController",
    "PredictiveController",
    *_solvers.__all__,
    *_sensitivity.__all__,
    *_steady.__all__,
    *_nn.__all__,
]


def __getattr__(name):
    # Lazy subpackages: `pn.julia` never starts Julia on import of pyneuralode.
    if name == "last_stats":  # this thread's latest steady_state/DEQ info (thread-local)
        return _steady.last_stats
    if name in ("julia", "data", "repro"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pyneuralode' has no attribute {name!r}")
