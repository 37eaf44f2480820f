"""``solve(..., compile=True)``: which compiled route a validated problem takes — an ensemble
(``batched=True`` implicit solver), forward sensitivities (a gradient is needed) or the plain
compiled solve."""

from __future__ import annotations

from .._problem import ODEProblem
from . import _driver, _ensemble, _sensitivity


def solve_compiled(problem: ODEProblem, solver, opts, *, throw: bool):
    """The whole solve as native code (see :func:`pyneuralode.solve`, ``compile=True``).

    ``problem`` and ``opts`` come validated from :func:`pyneuralode.solve`."""
    if not _driver.numba_available():
        raise ImportError(
            "compile=True needs numba: pip install 'pyneuralode[compiled]' (or pip install numba), "
            "or pass compile=False"
        )
    kind = _driver._method_kind(solver)
    if kind != "erk" and getattr(solver, "batched", False):
        # the rows of y0 as independent systems, each with its own steps
        return _ensemble.run_ensemble(problem, solver, opts, throw=throw)
    _driver.check_single_system(problem, solver, kind)
    if _sensitivity.needs_gradient(problem):
        return _sensitivity.solve_sensitivities(problem, solver, opts, kind, throw=throw)
    return _driver.solve_plain(problem, solver, opts, kind, throw=throw)
