"""The linear-algebra options every implicit solver shares, validated once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

JAC_MODES = ("autograd", "jacrev", "jacfwd", "finite_difference")
LINSOLVES = ("lu", "gmres", "sparse")


@dataclass(frozen=True, eq=False)
class LinearOptions:
    """How an implicit solver gets its Jacobian and solves with ``W = I − g·J``.

    ``owner`` names the solver in error messages. Construction checks every option and names the
    argument and the fix in its message.
    """

    owner: str
    jac: Callable | None = None
    batched: bool = False
    linsolve: str = "lu"
    jac_mode: str = "autograd"
    gmres_tol: float = 1e-8
    gmres_maxiter: int = 200
    gmres_restart: int = 30
    jac_sparsity: Any = None

    def __post_init__(self):
        owner = self.owner
        if self.linsolve == "sparse":
            if self.jac_sparsity is None and self.jac is None:
                raise ValueError(
                    f"{owner}: linsolve='sparse' needs jac_sparsity (the N×N pattern of the "
                    "Jacobian's nonzeros) or a jac(t, y) that returns a sparse matrix"
                )
            if self.batched:
                raise ValueError(
                    f"{owner}: linsolve='sparse' and batched=True do not combine; batched systems "
                    "already factor one small block per row (use linsolve='lu')"
                )
        elif self.jac_sparsity is not None:
            raise ValueError(
                f"{owner}: jac_sparsity is used by linsolve='sparse'; pass linsolve='sparse' or "
                "drop jac_sparsity"
            )
        if self.jac is not None and not callable(self.jac):
            raise TypeError(
                f"{owner}: jac must be None or a callable jac(t, y) -> Jacobian matrix, got "
                f"{type(self.jac).__name__}"
            )
        if not isinstance(self.batched, bool):
            raise TypeError(f"{owner}: batched must be True or False, got {self.batched!r}")
        if self.linsolve not in LINSOLVES:
            raise ValueError(f"{owner}: linsolve must be one of {LINSOLVES}, got {self.linsolve!r}")
        if self.jac_mode not in JAC_MODES:
            raise ValueError(f"{owner}: jac_mode must be one of {JAC_MODES}, got {self.jac_mode!r}")
        if self.linsolve == "gmres" and self.jac is not None:
            raise ValueError(
                f"{owner}: linsolve='gmres' is matrix-free and ignores jac; pass jac=None or "
                "linsolve='lu'"
            )
        tol = self.gmres_tol
        if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and 0 < tol < 1):
            raise ValueError(f"{owner}: gmres_tol must be a number in (0, 1), got {tol!r}")
        for nm in ("gmres_maxiter", "gmres_restart"):
            v = getattr(self, nm)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{owner}: {nm} must be a positive int, got {v!r}")

    @classmethod
    def names(cls):
        """The option names a solver takes (all fields but ``owner``)."""
        return tuple(f.name for f in fields(cls) if f.name != "owner")

    @classmethod
    def defaults(cls, **overrides) -> dict:
        """``{option: default}`` (for a solver's ``repr``), with a solver's own defaults in
        ``overrides``."""
        d = {f.name: f.default for f in fields(cls) if f.name != "owner"}
        d.update(overrides)
        return d

    def store_on(self, solver) -> None:
        """Set the options as attributes of ``solver`` (its public options, its ``repr`` and
        ``==``)."""
        for nm in self.names():
            setattr(solver, nm, getattr(self, nm))

    @classmethod
    def of(cls, solver) -> LinearOptions:
        """The options stored on ``solver`` by :meth:`store_on`."""
        return cls(type(solver).__name__, **{nm: getattr(solver, nm) for nm in cls.names()})
