"""Sensitivity algorithms: how gradients cross the integrate loop (SciMLSensitivity names)."""
from . import backsolve, direct, implicit, interpolating, quadrature
from ._base import AbstractSensitivity
from .backsolve import *  # noqa: F401,F403
from .direct import DirectAdjoint
from .implicit import *  # noqa: F401,F403
from .interpolating import *  # noqa: F401,F403
from .quadrature import *  # noqa: F401,F403

__all__ = [
    "AbstractSensitivity",
    "DirectAdjoint",
    *backsolve.__all__,
    *interpolating.__all__,
    *quadrature.__all__,
    *implicit.__all__,
]
