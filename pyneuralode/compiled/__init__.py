"""The compiled path for small systems: ``pn.solve(f, y0, t, solver, compile=True)``.

f is traced once to an aten graph (:mod:`._trace`) and translated to scalar code, a small problem
module that numba compiles once per f; the method's step (generated from its tableau), the error
norm, the step-size controller, the loop and the dense output form a method module compiled once
per method and machine, which takes f (and its Jacobian) as first-class functions
(:mod:`._codegen`), so that a whole solve runs as one native call. Gradients: forward
sensitivities for small problems (:mod:`._sensitivity`), an interpolating adjoint for many
parameters or the output times (:mod:`._adjoint`). Needs the optional dependency
numba (``pip install 'pyneuralode[compiled]'``).
"""

from ._dispatch import solve_compiled
from ._driver import CompiledSolution, numba_available
from ._ensemble import EnsembleSolution, solve_ensemble
from ._trace import UnsupportedOpError

__all__ = [
    "CompiledSolution",
    "EnsembleSolution",
    "UnsupportedOpError",
    "numba_available",
    "solve_compiled",
    "solve_ensemble",
]
