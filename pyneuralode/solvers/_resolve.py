"""The one solver resolver: ``None``, a registry name or an instance → a solver instance."""

from __future__ import annotations

from .._arguments import refuse_class
from . import lookup
from ._base import AbstractSolver


def resolve_solver(
    solver,
    default: type[AbstractSolver] | None = None,
    *,
    arg: str = "solver",
    none_means: str = "",
) -> AbstractSolver:
    """A solver instance from ``solver``.

    ``None`` gives ``default()`` (``None`` is returned when ``default`` is ``None``: "the forward
    solver"); a name is looked up in the registry (``"tsit5"`` → ``Tsit5()``, a fresh instance);
    an instance is returned as is. A class or anything else raises ``TypeError`` naming ``arg``.
    """
    if solver is None:
        return None if default is None else default()
    if isinstance(solver, str):
        return lookup(solver)()
    refuse_class(arg, solver)
    if not isinstance(solver, AbstractSolver):
        also = f" (or None for {none_means})" if none_means else ""
        raise TypeError(
            f"{arg}: expected a solver such as pn.Tsit5() or a name such as 'tsit5'{also}, got "
            f"{type(solver).__name__}"
        )
    return solver
