"""Validation of the constructor arguments shared by the continuous adjoints."""

from __future__ import annotations

from .._arguments import check_tolerance
from ..solvers._resolve import resolve_solver


def check_checkpointing(cls_name: str, checkpointing, n_checkpoints) -> None:
    """Validate the ``checkpointing``/``n_checkpoints`` pair shared by the interpolating and
    quadrature adjoints."""
    if not isinstance(checkpointing, bool):
        raise TypeError(
            f"{cls_name}(checkpointing=...): expected True or False, got {checkpointing!r}"
        )
    if n_checkpoints is not None:
        if (
            not isinstance(n_checkpoints, int)
            or isinstance(n_checkpoints, bool)
            or n_checkpoints < 0
        ):
            raise ValueError(
                f"{cls_name}(n_checkpoints=...): expected a non-negative int or None, got "
                f"{n_checkpoints!r}"
            )
        if not checkpointing:
            raise ValueError(
                f"{cls_name}: n_checkpoints needs checkpointing=True (checkpointing=False keeps "
                "the whole dense output instead)"
            )


def check_common(cls_name: str, solver, rtol, atol):
    """The backward ``solver`` (an instance, a name or None = the forward one) and tolerances."""
    solver = resolve_solver(
        solver, None, arg=f"{cls_name}(solver=...)", none_means="the forward solver"
    )
    rtol = check_tolerance(f"{cls_name}(rtol=...)", rtol, none="the forward rtol")
    atol = check_tolerance(f"{cls_name}(atol=...)", atol, none="the forward atol")
    return solver, rtol, atol
