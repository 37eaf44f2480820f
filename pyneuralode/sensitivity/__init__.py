"""Sensitivity algorithms: how gradients cross the integrate loop (SciMLSensitivity names)."""

from . import backsolve, direct, implicit, interpolating, quadrature
from ._base import (
    AbstractAdjoint,
    AbstractContinuousAdjoint,
    AbstractImplicitGradient,
    AbstractSensitivity,
)
from .backsolve import *
from .direct import DirectAdjoint
from .implicit import *
from .interpolating import *
from .quadrature import *

__all__ = [
    "AbstractSensitivity",
    "AbstractAdjoint",
    "AbstractContinuousAdjoint",
    "AbstractImplicitGradient",
    "DirectAdjoint",
    *backsolve.__all__,
    *interpolating.__all__,
    *quadrature.__all__,
    *implicit.__all__,
]
