"""The sensitivity contracts: how gradients cross a solve (SciMLSensitivity names throughout).

Two families, two bases:

* :class:`AbstractSensitivity` — gradients through one ODE solve (``pn.solve``, ``odeint``,
  ``NeuralODE``). ``run(problem, y0, solver, opts, stats) -> (ys, loop)`` integrates ``problem``
  from ``y0`` (the internal state tensor, possibly carrying a graph) through ``problem.t_list``
  and returns the stacked states at the output times reached, shaped ``(k, *y0.shape)``, and the
  :class:`~pyneuralode._loop.LoopResult`. Gradients must reach ``y0``, the tensors in
  ``problem.args`` and ``problem.adjoint_params`` (default: the parameters of the modules f
  reaches, found by :mod:`._captured`). Gradients with respect to the output times are added by
  ``solve`` itself for every algorithm (``dL/dt_i = ⟨∂L/∂y_i, f(t_i, y_i)⟩``).

  :class:`AbstractAdjoint` is the two-pass kind: ``run`` is the autograd ``Function`` of
  :mod:`._adjoint`, whose forward calls :meth:`AbstractAdjoint._forward` (the loop without a
  graph, keeping a typed saved state) and whose backward calls
  :meth:`AbstractAdjoint._backward`. :class:`AbstractContinuousAdjoint` adds the backward
  ``solver``/``rtol``/``atol`` of the continuous adjoints (``None`` = the forward ones).

* :class:`AbstractImplicitGradient` — gradients of a steady state ``z* = f(z*, x)``
  (``pn.steady_state``, ``pn.DEQ``): ``attach(f, z_star, args, info) -> z`` returns a tensor
  with the value of ``z_star`` whose backward applies the method.

``keeps_dense`` says whether the forward pass keeps dense output by default.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._adjoint import run_adjoint
from ._passes import Forward, Pass
from ._validation import check_common


class _Named:
    name: str = ""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({fields})"


class AbstractSensitivity(_Named, abc.ABC):
    """How gradients cross one ODE solve: subclasses implement :meth:`run`."""

    name: str = "AbstractSensitivity"
    keeps_dense: bool = True

    def __init__(self, solver: Any = None, rtol: float | None = None, atol: float | None = None):
        self.solver = solver
        self.rtol = rtol
        self.atol = atol

    @abc.abstractmethod
    def run(self, problem, y0: torch.Tensor, solver, opts, stats: dict):
        """Integrate and return ``(ys, loop)``; gradients reach ``y0`` and the problem's targets."""


class AbstractAdjoint(AbstractSensitivity):
    """A forward pass without a graph and a backward pass of its own, joined by one autograd
    Function.

    ``_forward`` runs the loop and returns a :class:`~._passes.Forward` whose ``saved`` is a
    typed record (:class:`~._passes.DenseTrajectory`, :class:`~._passes.Checkpoints`, ...);
    ``_backward`` gets it back in a :class:`~._passes.Pass` with the output cotangents, of which
    the one at index ``m`` is the last non-zero (``m >= 1``: the Function answers ``m <= 0``
    itself), and returns ``(dL/dy0, dL/dtargets flattened or None)``.
    """

    def run(self, problem, y0, solver, opts, stats):
        return run_adjoint(self, problem, y0, solver, opts, stats)

    @abc.abstractmethod
    def _forward(self, problem, y0: torch.Tensor, solver, opts, stats: dict) -> Forward:
        """The forward pass without a graph, keeping what :meth:`_backward` needs."""

    @abc.abstractmethod
    def _backward(
        self, p: Pass, ys: torch.Tensor, grad_ys: torch.Tensor, m: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dL/dy0, flat dL/dtargets or None)`` from the cotangents ``grad_ys`` of the outputs."""


class AbstractContinuousAdjoint(AbstractAdjoint):
    """A continuous adjoint: the backward ODE has its own ``solver``, ``rtol`` and ``atol``
    (``None`` = the forward ones), checked here."""

    def __init__(self, solver: Any = None, rtol: float | None = None, atol: float | None = None):
        solver, rtol, atol = check_common(type(self).__name__, solver, rtol, atol)
        super().__init__(solver, rtol, atol)


class AbstractImplicitGradient(_Named, abc.ABC):
    """How gradients cross a steady-state / fixed-point solve ``z* = f(z*, *args)``.

    ``attach`` is called with grad enabled after the forward solve (which ran without a graph)
    and returns a tensor with the value of ``z_star`` whose backward applies the method; it
    records its costs in ``info`` (a :class:`~pyneuralode.SteadyStateInfo`, or ``None``).
    """

    name: str = "AbstractImplicitGradient"
    keeps_dense: bool = False

    @abc.abstractmethod
    def attach(self, f: Callable, z_star: torch.Tensor, args: Sequence, info) -> torch.Tensor:
        """``z`` equal to ``z_star`` whose gradient is this method's."""
