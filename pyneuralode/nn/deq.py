"""Deep equilibrium layer: the output is the fixed point ``z* = f(z*, x)`` (Bai, Kolter, Koltun 2019)."""
from __future__ import annotations

import random
from typing import Optional

import torch
from torch import nn

__all__ = ["DEQ"]

_BACKENDS = ("torch", "julia")
_INITS = ("zeros", "f")


class DEQ(nn.Module):
    """``forward(x, z0=None)`` returns ``z*`` with ``z* = f_module(z*, x)``.

    The blog's neural-ODE view: ``z*`` is the steady state of ``dz/dt = f(z, x) − z``
    (``solver=pn.DynamicSS(pn.Tsit5())``, the default); root finders ``pn.Anderson()``,
    ``pn.Broyden()``, ``pn.FixedPointIteration()`` find the same point. Gradients:
    ``sensealg=pn.SteadyStateAdjoint()`` (implicit, default) or ``pn.PhantomGradient(k)``;
    both from :mod:`pyneuralode.sensitivity.implicit`, as for :func:`pn.steady_state`.

    ``f_module(z, x)`` is an ``nn.Module`` (input injection is up to it, e.g. ``net(z + x)``).
    ``z0``: initial guess; default ``init="zeros"`` (zeros shaped like ``x``) or ``init="f"``
    (``f(0, x)``, the blog's ``z = NN(x)``); pass ``z0`` when the state is not shaped like ``x``.
    The leading dimension is a batch (``batch_dim=0``; ``None`` treats the state as one problem).
    ``throw``: raise :class:`pn.SteadyStateError` when the forward solve fails (default) or go on
    with the best iterate. ``jac_reg_weight > 0``: in training mode, with probability
    ``jac_reg_freq`` per forward, ``self.jac_loss`` is ``weight · pn.jacobian_regularization(...)``
    at ``z*`` (else 0): add it to the loss (Bai, Koltun, Kolter 2021).
    ``self.last_stats`` is the :class:`pn.SteadyStateInfo` of the last forward (backward costs
    are added to it when ``.backward()`` runs). ``backend="julia"`` solves with
    SteadyStateDiffEq.jl through ``pyneuralode.julia._backend.steady_state`` (optional; only
    ``DynamicSS`` + ``SteadyStateAdjoint``); ``last_stats`` is then that backend's stats dict.
    """

    def __init__(self, f_module: nn.Module, solver=None, sensealg=None, *, abstol: float = 1e-6,
                 reltol: float = 1e-6, backend: str = "torch", init: str = "zeros", batch_dim: Optional[int] = 0,
                 throw: bool = True, jac_reg_weight: float = 0.0, jac_reg_freq: float = 1.0):
        super().__init__()
        from ..steady._steady import _resolve_sensealg, _tol, resolve_solver

        if not callable(f_module):
            raise TypeError(f"f_module: expected an nn.Module (or callable) f(z, x), got {type(f_module).__name__}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; use 'torch' (native, the default) or 'julia'")
        if init not in _INITS:
            raise ValueError(f"init: unknown {init!r}; use 'zeros' or 'f' (z0 = f(0, x))")
        if batch_dim not in (0, None):
            raise ValueError(f"batch_dim: use 0 (leading batch dimension) or None, got {batch_dim!r}")
        if not isinstance(jac_reg_weight, (int, float)) or jac_reg_weight < 0:
            raise ValueError(f"jac_reg_weight: must be a non-negative number, got {jac_reg_weight!r}")
        if not isinstance(jac_reg_freq, (int, float)) or not (0 <= jac_reg_freq <= 1):
            raise ValueError(f"jac_reg_freq: must be a probability in [0, 1], got {jac_reg_freq!r}")
        self.f = f_module
        self.solver = resolve_solver(solver)
        self.sensealg = _resolve_sensealg(sensealg)
        self.abstol, self.reltol = _tol("abstol", abstol), _tol("reltol", reltol)
        self.backend = backend
        self.init = init
        self.batch_dim = batch_dim
        self.throw = throw
        self.jac_reg_weight = float(jac_reg_weight)
        self.jac_reg_freq = float(jac_reg_freq)
        self.last_stats = None
        self.jac_loss = torch.zeros(())

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        if self.init == "f":
            with torch.no_grad():
                z = self.f(z, x)
        return z

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if z0 is None:
            z0 = self.initial_state(x)
        if self.backend == "julia":
            z, self.last_stats = _julia_steady_state(self.f, z0, (x,), self.solver, self.sensealg, self.abstol, self.reltol)
        else:
            from ..steady._steady import steady_state

            z, info = steady_state(
                self.f, z0, (x,), self.solver, abstol=self.abstol, reltol=self.reltol, sensealg=self.sensealg,
                throw=self.throw, return_info=True, batch_dim=self.batch_dim if z0.ndim > 0 else None,
            )
            self.last_stats = info
        if self.jac_reg_weight > 0 and self.training and torch.is_grad_enabled() and random.random() < self.jac_reg_freq:
            from ..sensitivity.implicit import jacobian_regularization

            self.jac_loss = self.jac_reg_weight * jacobian_regularization(lambda z: self.f(z, x), z.detach())
        else:
            self.jac_loss = torch.zeros((), dtype=z.dtype, device=z.device)
        return z

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, sensealg={self.sensealg!r}, abstol={self.abstol:g}, reltol={self.reltol:g}, backend={self.backend!r}"


def _julia_steady_state(f_module, z0, args, solver, sensealg, abstol, reltol):
    """Hand the steady-state problem to the Julia backend (``pyneuralode.julia._backend.steady_state``)."""
    try:
        from ..julia import _backend
    except ImportError as exc:
        raise ImportError(
            "backend='julia': the Julia backend is not available (" + str(exc) + "). Install it with "
            "`pip install -e '.[julia]'` in a pyneuralode checkout (juliacall), then run `python -m pyneuralode.julia doctor`; "
            "or use backend='torch' (the native engine, the default)."
        ) from exc
    fn = getattr(_backend, "steady_state", None)
    if fn is None:
        raise NotImplementedError(
            "backend='julia': this version of pyneuralode.julia has no steady_state(); use backend='torch'"
        )
    z = fn(f_module, z0, args, solver, sensealg, abstol, reltol)
    return z, getattr(_backend, "last_stats", None)  # the backend's own stats (a dict)
