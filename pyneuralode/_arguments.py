"""Checks of arguments shared by the entry points: tolerances (the one validator of ``rtol``/
``atol`` for solves, adjoints and steady states) and a class passed where an instance is meant."""

from __future__ import annotations

import math

import numpy as np


def check_tolerance(name: str, value, *, none: str | None = None, other: str = "") -> float | None:
    """``value`` as a finite non-negative float.

    ``name`` labels the argument in the error (e.g. ``"rtol"`` or
    ``"InterpolatingAdjoint(rtol=...)"``); ``none``, if given, says what ``None`` means, and
    ``None`` is then accepted and returned; ``other`` names further accepted forms for the message
    (a tensor tolerance, checked by the caller). A bool or a string is refused (``float("1e-6")``
    and ``float(True)`` would pass silently).
    """
    if value is None and none is not None:
        return None
    forms = ["a float"] + ([other] if other else []) + ([f"None ({none})"] if none else [])
    accepted = ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else forms[0]
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name}: expected {accepted}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected {accepted}, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: must be a finite non-negative number, got {value!r}")
    return v


def tolerance_pair(
    rtol, atol, *, reltol=None, abstol=None, default_rtol: float, default_atol: float
):
    """``(rtol, atol)`` checked, with SciML's ``reltol``/``abstol`` accepted as aliases.

    ``rtol``/``atol`` are the native names; a tolerance given under both names raises
    ``ValueError``; one given under neither takes its default.
    """
    out = []
    for name, value, alias, alias_value, default in (
        ("rtol", rtol, "reltol", reltol, default_rtol),
        ("atol", atol, "abstol", abstol, default_atol),
    ):
        if alias_value is not None:
            if value is not None:
                raise ValueError(
                    f"{name}, {alias}: the same tolerance under two names; pass only "
                    f"{name}={value!r} ({alias} is its SciML alias)"
                )
            name, value = alias, alias_value
        out.append(default if value is None else check_tolerance(name, value))
    return out[0], out[1]


def refuse_class(arg: str, value) -> None:
    """Raise ``TypeError`` if ``value`` is a class (``solver=pn.Tsit5`` for ``pn.Tsit5()``)."""
    if isinstance(value, type):
        raise TypeError(
            f"{arg}: got the class {value.__name__}; pass an instance, e.g. pn.{value.__name__}()"
        )
