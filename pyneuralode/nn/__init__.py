"""Neural-network layers built on the solvers: NeuralODE, CNF, LatentODE, ODE-Net blocks, DEQ."""
from . import blocks, cnf, deq, latent, neural_ode, odenet
from .blocks import *  # noqa: F401,F403
from .cnf import *  # noqa: F401,F403
from .deq import *  # noqa: F401,F403
from .latent import *  # noqa: F401,F403
from .neural_ode import *  # noqa: F401,F403
from .odenet import *  # noqa: F401,F403

__all__ = [*neural_ode.__all__, *blocks.__all__, *cnf.__all__, *latent.__all__, *odenet.__all__, *deq.__all__]
