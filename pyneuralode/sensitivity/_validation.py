"""Validation of the constructor arguments shared by the continuous adjoints."""
from __future__ import annotations

import math


def check_checkpointing(cls_name: str, checkpointing, n_checkpoints) -> None:
    """Validate the ``checkpointing``/``n_checkpoints`` pair shared by the interpolating and quadrature adjoints."""
    if not isinstance(checkpointing, bool):
        raise TypeError(f"{cls_name}(checkpointing=...): expected True or False, got {checkpointing!r}")
    if n_checkpoints is not None:
        if not isinstance(n_checkpoints, int) or isinstance(n_checkpoints, bool) or n_checkpoints < 0:
            raise ValueError(f"{cls_name}(n_checkpoints=...): expected a non-negative int or None, got {n_checkpoints!r}")
        if not checkpointing:
            raise ValueError(f"{cls_name}: n_checkpoints needs checkpointing=True (checkpointing=False keeps the whole dense output instead)")


def check_common(cls_name: str, solver, rtol, atol):
    from ..solvers import AbstractSolver, lookup

    if solver is not None:
        if isinstance(solver, str):
            solver = lookup(solver)()
        elif isinstance(solver, type) and issubclass(solver, AbstractSolver):
            raise TypeError(f"{cls_name}(solver=...): got the class {solver.__name__}; pass an instance, e.g. solver=pn.{solver.__name__}()")
        elif not isinstance(solver, AbstractSolver):
            raise TypeError(f"{cls_name}(solver=...): expected a solver such as pn.Tsit5() (or None for the forward solver), got {type(solver).__name__}")
    out = []
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"{cls_name}({name}=...): expected a float or None (None = the forward {name}), got {type(v).__name__}") from None
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{cls_name}({name}=...): must be a finite non-negative number, got {v}")
        out.append(v)
    return solver, out[0], out[1]
