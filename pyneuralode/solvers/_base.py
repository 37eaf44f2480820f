"""The solver protocol: what the integrate loop asks of every method.

A solver is a small object (its tableau, options) with three methods:

* ``init(rhs, t0, y0, stats, rtol, atol) -> cache`` — called once before the first step (e.g.
  evaluates ``f(t0, y0)`` for FSAL methods, or sets up a Jacobian cache for implicit ones, which
  scale their Newton tolerances by ``rtol``/``atol``; explicit methods ignore them).
* ``step(rhs, t0, y0, dt, cache) -> StepResult`` — one attempted step from ``(t0, y0)`` of size
  ``dt`` (negative for backward time); never decides acceptance: the loop does that.
* ``interpolant`` (a plain function) and ``StepResult.dense`` give the dense output of the step.

``rhs(t, y)`` is the right-hand side with arguments bound; ``t`` is a 0-d tensor, ``y`` has the
shape of the internal state. States are handled as tensors of any shape; stage arithmetic works
on ``y.reshape(-1)`` views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepResult:
    """What one attempted step returns to the loop.

    y1: the proposed new state.
    error: local error estimate shaped like ``y1`` (``None`` for methods without one).
    cache: solver cache to carry forward if the step is accepted.
    dense: data for ``interpolant(dense, theta)`` on the step.
    ok: ``False`` when the step failed outright (e.g. Newton divergence); the loop then shrinks dt.
    cache_on_reject: cache to keep if the step is rejected (``None`` keeps the old one).
    order: the order of this step's error estimate when it varies from step to step (variable-order
        multistep methods); the loop's controller then uses it instead of the solver's ``order``.
    dt_factor: the next step size ÷ this one that the method itself proposes if the step is accepted
        (multistep order selection); ``None`` leaves it to the loop's controller.
    reject_safety: a factor (≤ 1) on the controller's step factor if the step fails the error test
        (QNDF: scipy BDF's ``(2m+1)/(2m+n)`` for n of at most m Newton iterations); ``None``: 1.
    """

    y1: torch.Tensor
    error: torch.Tensor | None
    cache: Any
    dense: Any
    ok: bool = True
    cache_on_reject: Any = None
    order: int | None = None
    dt_factor: float | None = None
    reject_safety: float | None = None


class AbstractSolver:
    """Base class of every solver.

    Class attributes: ``name`` (the SciML name, e.g. ``"Tsit5"``; used by the Julia backend),
    ``order`` (order of the propagated solution), ``error_order`` (order of the embedded method,
    ``None`` when the method has no error estimate and can only take fixed steps),
    ``implicit`` (True for methods that solve linear/nonlinear systems).
    """

    name: str = "AbstractSolver"
    order: int = 0
    error_order: int | None = None
    implicit: bool = False
    #: True for methods whose step depends on a history kept in the cache (QNDF): a state alone
    #: cannot restart them where they were, so checkpoint re-solves do not replay their steps.
    #: Such a method may also set ``start_order`` (the order of its first step, for the initial step
    #: size).
    multistep: bool = False

    def default_controller(self):
        """The step-size controller used when ``solve`` gets none.

        Explicit methods: the integral controller (``PIController(beta1=1, beta2=0)``), the default
        of torchdiffeq, diffrax and scipy, so that equal tolerances give equal steps for equal
        methods. Implicit methods (``implicit = True``): SciML's PI gains (smoother step sequences,
        fewer Jacobians).
        """
        from ..controllers import PIController

        return PIController(beta1=1.0, beta2=0.0) if not self.implicit else PIController()

    @property
    def adaptive_capable(self) -> bool:
        return self.error_order is not None

    def init(
        self, rhs: Callable, t0: float, y0: torch.Tensor, stats: dict, rtol=None, atol=None
    ) -> Any:
        raise NotImplementedError

    def step(self, rhs: Callable, t0: float, y0: torch.Tensor, dt: float, cache: Any) -> StepResult:
        raise NotImplementedError

    def interpolant(self, dense: Any, theta) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        if type(self) is not type(other) or self.__dict__.keys() != other.__dict__.keys():
            return False
        return all(_same(v, other.__dict__[k]) for k, v in self.__dict__.items())

    def __hash__(self) -> int:
        return hash(type(self))


class TableauSolver(AbstractSolver):
    """A method defined by ``tableau``: its ``order`` and ``error_order`` are the tableau's."""

    tableau: Any

    @property
    def order(self):  # type: ignore[override]
        return self.tableau.order

    @property
    def error_order(self):  # type: ignore[override]
        return self.tableau.error_order


def options_repr(solver, defaults: dict) -> str:
    """``Name(opt=value, ...)`` listing only the options that differ from ``defaults``."""
    shown = ", ".join(
        f"{k}={v!r}"
        for k, v in vars(solver).items()
        if not k.startswith("_") and not _same(defaults.get(k, object()), v)
    )
    return f"{type(solver).__name__}({shown})"


def _same(a, b) -> bool:
    """Option equality that also works for arrays, tensors and sparse matrices (equal only if
    identical)."""
    if a is b:
        return True
    if (
        getattr(a, "shape", ()) != () or getattr(b, "shape", ()) != ()
    ):  # arrays, tensors, sparse matrices
        return False
    try:
        return bool(a == b)
    except (
        ValueError,
        RuntimeError,
        TypeError,
    ):  # element-wise comparisons have no single truth value
        return False


_TABLEAU_TENSORS: dict = {}


def tableau_tensors(tab, y: torch.Tensor, build: Callable):
    """``build(tab, dtype, device)`` for ``y``'s dtype and device, built once per tableau and
    cached."""
    key = (id(tab), build, y.dtype, y.device)
    co = _TABLEAU_TENSORS.get(key)
    if co is None:
        # normal tensors even if first built under inference mode (they are reused under autograd)
        with torch.inference_mode(False):
            co = _TABLEAU_TENSORS[key] = build(tab, y.dtype, y.device)
    return co


def hermite_interpolant(dense, theta):
    """Cubic Hermite interpolation on a step from ``(y0, y1, f0, f1, dt)``; order 3, C¹ across
    steps."""
    y0, y1, f0, f1, dt = dense
    th = theta
    h00 = (1 + 2 * th) * (1 - th) ** 2
    h10 = th * (1 - th) ** 2
    h01 = th * th * (3 - 2 * th)
    h11 = th * th * (th - 1)
    return h00 * y0 + h01 * y1 + dt * (h10 * f0 + h11 * f1)
