"""``solve(..., compile=True)``: which compiled route a validated problem takes — an ensemble
(``batched=True`` implicit solver), forward sensitivities or the compiled adjoint (a gradient is
needed), or the plain compiled solve; and the one place where the compiled path refuses a
``sensealg``."""

from __future__ import annotations

from .._problem import ODEProblem
from ..sensitivity import DirectAdjoint, InterpolatingAdjoint, QuadratureAdjoint
from . import _adjoint, _driver, _ensemble, _sensitivity

_CHOICES = (
    "sensealg=pn.DirectAdjoint() (compiled forward sensitivities, the default up to "
    f"{_sensitivity.MAX_STATES_AND_PARAMETERS} states + parameters) or "
    "sensealg=pn.InterpolatingAdjoint() / pn.QuadratureAdjoint() (the compiled interpolating "
    "adjoint, the default above)"
)


def check_sensealg(sensealg, solver) -> str | None:
    """``"forward"``, ``"adjoint"`` or ``None`` (not given) for a ``sensealg`` passed with
    ``compile=True``; a clear ``ValueError`` for what the compiled path does not do."""
    if sensealg is None:
        return None
    name = type(sensealg).__name__
    if isinstance(sensealg, DirectAdjoint):
        if sensealg.checkpoints is not None:
            raise ValueError(
                "sensealg: compile=True keeps no autograd graph, so DirectAdjoint(checkpoints=...) "
                f"does not apply; pass {_CHOICES}, or compile=False"
            )
        return "forward"
    if isinstance(sensealg, (InterpolatingAdjoint, QuadratureAdjoint)):
        if getattr(sensealg, "seminorm", False):
            raise ValueError(
                "sensealg: the compiled adjoint has no seminorm (the parameter channels are in "
                "its error norm); pass InterpolatingAdjoint(seminorm=False), or compile=False"
            )
        if sensealg.solver is not None and type(sensealg.solver) is not type(solver):
            raise ValueError(
                f"sensealg: the compiled adjoint integrates backwards with the forward method "
                f"({type(solver).__name__}); drop {name}(solver=...), or pass compile=False"
            )
        return "adjoint"
    raise ValueError(
        f"sensealg: compile=True does not support {name}; pass {_CHOICES}, or compile=False"
    )


def solve_compiled(problem: ODEProblem, solver, opts, *, throw: bool, sensealg=None):
    """The whole solve as native code (see :func:`pyneuralode.solve`, ``compile=True``).

    ``problem`` and ``opts`` come validated from :func:`pyneuralode.solve`; ``sensealg`` is the
    user's, if given."""
    if not _driver.numba_available():
        raise ImportError(
            "compile=True needs numba: pip install 'pyneuralode[compiled]' (or pip install numba), "
            "or pass compile=False"
        )
    kind = _driver._method_kind(solver)
    route = check_sensealg(sensealg, solver)
    if kind != "erk" and getattr(solver, "batched", False):
        if route == "adjoint":
            raise ValueError(
                "sensealg: the compiled ensemble (a batched=True solver) differentiates by "
                "forward sensitivities only; drop sensealg, or pass compile=False"
            )
        # the rows of y0 as independent systems, each with its own steps
        return _ensemble.run_ensemble(problem, solver, opts, throw=throw)
    _driver.check_single_system(problem, solver, kind)
    if not _sensitivity.needs_gradient(problem):
        return _driver.solve_plain(problem, solver, opts, kind, throw=throw)
    if route is None:  # forward sensitivities where they fit, else the adjoint
        n, m = _sensitivity.gradient_size(problem)
        fits = _sensitivity.fits_forward(n, m, kind)
        route = "forward" if fits and not problem.t.requires_grad else "adjoint"
    if route == "adjoint":
        return _adjoint.solve_adjoint(problem, solver, opts, kind, sensealg, throw=throw)
    return _sensitivity.solve_sensitivities(problem, solver, opts, kind, throw=throw)
