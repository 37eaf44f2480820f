"""Backpropagation through the solver's operations (discretise-then-optimise)."""
from __future__ import annotations

import torch

from .._loop import integrate
from ._base import AbstractSensitivity


class DirectAdjoint(AbstractSensitivity):
    """Differentiate the computed solution exactly with torch autograd through every step.

    Exact gradient of the discrete solution (including step-size control, which is treated as
    constant); memory grows linearly with the number of steps. Supports double backward.
    The default ``sensealg``. (SciMLSensitivity: the role of ``ReverseDiffAdjoint``/``ZygoteAdjoint``.)
    """

    name = "DirectAdjoint"

    def __init__(self):
        super().__init__()

    def run(self, problem, y0, solver, opts, stats):
        loop = integrate(problem.rhs(stats), y0, problem.t_list, solver, opts, stats)
        return torch.stack(loop.ys), loop
