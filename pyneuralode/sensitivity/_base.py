"""The sensitivity-algorithm protocol: each one decides how gradients cross the integrate loop.

``run(problem, y0, solver, opts, stats) -> (ys, loop)`` integrates ``problem`` from ``y0`` (the
internal state tensor, possibly carrying a graph) through ``problem.t_list`` and returns the
stacked states at the output times reached, shaped ``(k, *y0.shape)``, and the
:class:`~pyneuralode._loop.LoopResult`. Gradients must reach ``y0``, the tensors in
``problem.args`` and ``problem.adjoint_params`` (default: the parameters of the modules f reaches,
found by :mod:`._captured`). Gradients with respect to the output times are
added by ``solve`` itself for every algorithm (``dL/dt_i = ⟨∂L/∂y_i, f(t_i, y_i)⟩``), so an
algorithm never sees them.

Each algorithm may carry its own backward ``solver``, ``rtol`` and ``atol`` (``None`` = the
forward ones). ``keeps_dense`` says whether the forward pass keeps dense output by default.
"""
from __future__ import annotations

from typing import Any, Optional


class AbstractSensitivity:
    """Base class; subclasses implement :meth:`run`. SciMLSensitivity names are used throughout."""

    name: str = "AbstractSensitivity"
    keeps_dense: bool = True

    def __init__(self, solver: Any = None, rtol: Optional[float] = None, atol: Optional[float] = None):
        self.solver = solver
        self.rtol = rtol
        self.atol = atol

    def run(self, problem, y0, solver, opts, stats):
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({fields})"
