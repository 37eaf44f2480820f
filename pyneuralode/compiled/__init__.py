"""The compiled path for small systems: ``pn.solve(f, y0, t, solver, compile=True)``.

f is traced once to an aten graph (:mod:`._trace`) and translated to numpy code that numba
compiles together with the method's step (generated from its tableau), the error norm, the
step-size controller and the loop (:mod:`._codegen`), so that a whole solve runs as one native
call. Needs the optional dependency numba (``pip install 'pyneuralode[compiled]'``).
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
