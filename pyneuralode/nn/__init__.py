"""Neural-network layers built on the solvers: NeuralODE, CNF, LatentODE, ODE-Net blocks, DEQ."""

from . import blocks, cnf, deq, latent, neural_ode, odenet
from .blocks import *
from .cnf import *
from .deq import *
from .latent import *
from .neural_ode import *
from .odenet import *

__all__ = [
    *neural_ode.__all__,
    *blocks.__all__,
    *cnf.__all__,
    *latent.__all__,
    *odenet.__all__,
    *deq.__all__,
]
