"""Deep equilibrium layer: the output is the fixed point ``z* = f(z*, x)`` (Bai, Kolter, Koltun
2019)."""

from __future__ import annotations

import random

import torch
from torch import nn

from .._arguments import tolerance_pair
from ..sensitivity._resolve import resolve_sensealg
from ..steady._steady import resolve_solver, steady_state

__all__ = ["DEQ", "SkipDEQ", "SkipRegDEQ"]

_BACKENDS = ("torch", "julia")
#: the layer's default tolerances (looser in atol than ``steady_state``'s 1e-8: a training layer)
RTOL, ATOL = 1e-6, 1e-6
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
    ``rtol``/``atol``: the steady-state tolerances (defaults 1e-6 and 1e-6; SciML's
    ``reltol``/``abstol`` are accepted as aliases). ``throw``: raise :class:`pn.SteadyStateError`
    when the forward solve fails (default) or go on
    with the best iterate. ``jac_reg_weight > 0``: in training mode, with probability
    ``jac_reg_freq`` per forward, ``self.jac_loss`` is ``weight · pn.jacobian_regularization(...)``
    at ``z*`` (else 0): add it to the loss (Bai, Koltun, Kolter 2021).
    Skip initialisation (Pal, Edelman, Rackauckas 2022): ``init`` may be an explicit network
    ``g`` (an ``nn.Module``, ``g(x)`` shaped like the state: Skip DEQ, :class:`SkipDEQ`) or
    ``"f"`` with ``skip_weight > 0`` (``z0 = f(0, x)``: Skip-Reg DEQ, :class:`SkipRegDEQ`). Then
    ``self.skip_loss`` is ``skip_weight · mean(|z0 − z*|)`` with ``z*`` detached (else 0): add it
    to the loss so that ``z0`` learns to predict ``z*`` (gradients reach ``g``, resp. ``f``).
    ``z*`` is the same point for every ``z0``; only the cost of finding it changes.
    ``self.last_stats`` is the :class:`pn.SteadyStateInfo` of the last forward (backward costs
    are added to it when ``.backward()`` runs). ``backend="julia"`` solves with
    SteadyStateDiffEq.jl through ``pyneuralode.julia._backend.steady_state`` (optional; only
    ``DynamicSS`` + ``SteadyStateAdjoint``); ``last_stats`` is then that backend's stats dict.
    """

    def __init__(
        self,
        f_module: nn.Module,
        solver=None,
        sensealg=None,
        *,
        rtol: float | None = None,
        atol: float | None = None,
        backend: str = "torch",
        init="zeros",
        batch_dim: int | None = 0,
        throw: bool = True,
        jac_reg_weight: float = 0.0,
        jac_reg_freq: float = 1.0,
        skip_weight: float = 0.0,
        reltol: float | None = None,
        abstol: float | None = None,
    ):
        super().__init__()
        if not callable(f_module):
            raise TypeError(
                "f_module: expected an nn.Module (or callable) f(z, x), got "
                f"{type(f_module).__name__}"
            )
        if backend not in _BACKENDS:
            raise ValueError(
                f"backend: unknown backend {backend!r}; use 'torch' (native, the default) or "
                "'julia'"
            )
        if isinstance(init, str):
            if init not in _INITS:
                raise ValueError(
                    f"init: unknown {init!r}; use 'zeros', 'f' (z0 = f(0, x)) or an nn.Module g "
                    "with z0 = g(x) (Skip DEQ)"
                )
        elif not isinstance(init, nn.Module):
            raise TypeError(
                "init: expected 'zeros', 'f' or an nn.Module g(x) (Skip DEQ), got "
                f"{type(init).__name__}"
            )
        if (
            isinstance(skip_weight, bool)
            or not isinstance(skip_weight, (int, float))
            or not (0 <= skip_weight < float("inf"))
        ):
            raise ValueError(
                f"skip_weight: must be a finite non-negative number, got {skip_weight!r}"
            )
        if skip_weight > 0 and init == "zeros":
            raise ValueError(
                "skip_weight: the skip loss needs a predicted z0; pass init='f' (Skip-Reg DEQ) or "
                "init=g, an nn.Module with z0 = g(x) (Skip DEQ)"
            )
        if batch_dim not in (0, None):
            raise ValueError(
                f"batch_dim: use 0 (leading batch dimension) or None, got {batch_dim!r}"
            )
        if not isinstance(jac_reg_weight, (int, float)) or jac_reg_weight < 0:
            raise ValueError(
                f"jac_reg_weight: must be a non-negative number, got {jac_reg_weight!r}"
            )
        if not isinstance(jac_reg_freq, (int, float)) or not (0 <= jac_reg_freq <= 1):
            raise ValueError(f"jac_reg_freq: must be a probability in [0, 1], got {jac_reg_freq!r}")
        self.f = f_module
        self.solver = resolve_solver(solver)
        self.sensealg = resolve_sensealg(sensealg, steady=True)
        self.rtol, self.atol = tolerance_pair(
            rtol, atol, reltol=reltol, abstol=abstol, default_rtol=RTOL, default_atol=ATOL
        )
        self.backend = backend
        self.init = init  # a Module is registered as a submodule: its parameters train with the DEQ
        self.batch_dim = batch_dim
        self.throw = throw
        self.jac_reg_weight = float(jac_reg_weight)
        self.jac_reg_freq = float(jac_reg_freq)
        self.skip_weight = float(skip_weight)
        self.last_stats = None
        self.jac_loss = torch.zeros(())
        self.skip_loss = torch.zeros(())

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        """``z0``: zeros, ``f(0, x)`` or ``g(x)``; with a graph only if the skip loss needs one."""
        if isinstance(self.init, nn.Module):
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.skip_weight > 0):
                z = self.init(x)
            if not isinstance(z, torch.Tensor) or not z.is_floating_point():
                got = z.dtype if isinstance(z, torch.Tensor) else type(z).__name__
                raise TypeError(
                    "init: the Skip DEQ network g(x) must return a floating-point tensor (the "
                    f"initial state), got {got}"
                )
            if self.batch_dim == 0 and x.ndim > 0 and (z.ndim == 0 or z.shape[0] != x.shape[0]):
                raise ValueError(
                    f"init: g(x) returned shape {tuple(z.shape)} for x of shape {tuple(x.shape)}; "
                    "with batch_dim=0 it must keep the batch (leading) dimension"
                )
            return z
        z = torch.zeros_like(x)
        if self.init == "f":
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.skip_weight > 0):
                z = self.f(z, x)
        return z

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if z0 is None:
            z0 = self.initial_state(x)
        if self.backend == "julia":
            z, self.last_stats = _julia_steady_state(
                self.f, z0.detach(), (x,), self.solver, self.sensealg, self.atol, self.rtol
            )
        else:
            z, info = steady_state(
                self.f,
                z0.detach(),
                (x,),
                self.solver,
                rtol=self.rtol,
                atol=self.atol,
                sensealg=self.sensealg,
                throw=self.throw,
                return_info=True,
                batch_dim=self.batch_dim if z0.ndim > 0 else None,
            )
            self.last_stats = info
        if (
            self.jac_reg_weight > 0
            and self.training
            and torch.is_grad_enabled()
            and random.random() < self.jac_reg_freq
        ):
            from ..sensitivity.implicit import jacobian_regularization

            self.jac_loss = self.jac_reg_weight * jacobian_regularization(
                lambda z: self.f(z, x), z.detach()
            )
        else:
            self.jac_loss = torch.zeros((), dtype=z.dtype, device=z.device)
        if self.skip_weight > 0:  # z0 learns to predict z*; z* is the target, not trained here
            self.skip_loss = self.skip_weight * (z0 - z.detach()).abs().mean()
        else:
            self.skip_loss = torch.zeros((), dtype=z.dtype, device=z.device)
        return z

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, sensealg={self.sensealg!r}, rtol={self.rtol:g}, "
            f"atol={self.atol:g}, backend={self.backend!r}"
        )

    # SciML's names for the tolerances, kept as aliases
    abstol = property(
        lambda self: self.atol, lambda self, v: setattr(self, "atol", v), doc="``atol``"
    )
    reltol = property(
        lambda self: self.rtol, lambda self, v: setattr(self, "rtol", v), doc="``rtol``"
    )


class SkipDEQ(DEQ):
    """Skip DEQ (Pal, Edelman, Rackauckas 2022): an explicit network ``g(x)`` predicts ``z0``.

    ``DEQ(f_module, ..., init=init_module, skip_weight=skip_weight)``: the steady-state solve
    starts from ``g(x)``, and ``self.skip_loss = skip_weight · mean(|g(x) − z*|)`` (``z*``
    detached) trains ``g``; add it to the loss. ``skip_weight`` defaults to the paper's
    λ_skip = 0.01. DeepEquilibriumNetworks.jl: ``SkipDeepEquilibriumNetwork(model, init, solver)``.
    """

    def __init__(
        self,
        f_module: nn.Module,
        init_module: nn.Module,
        solver=None,
        sensealg=None,
        *,
        skip_weight: float = 0.01,
        **kwargs,
    ):
        if not isinstance(init_module, nn.Module):
            raise TypeError(
                "init_module: expected an nn.Module g(x) predicting z0, got "
                f"{type(init_module).__name__}"
            )
        if "init" in kwargs:
            raise TypeError("init: SkipDEQ sets init=init_module; pass the network as init_module")
        super().__init__(
            f_module, solver, sensealg, init=init_module, skip_weight=skip_weight, **kwargs
        )


class SkipRegDEQ(DEQ):
    """Skip-Reg DEQ (Pal, Edelman, Rackauckas 2022): ``z0 = f(0, x)``, no extra network.

    ``DEQ(f_module, ..., init="f", skip_weight=skip_weight)``: one explicit application of the
    block predicts ``z0``, and ``self.skip_loss = skip_weight · mean(|f(0, x) − z*|)`` (``z*``
    detached) regularises ``f`` towards maps whose first step lands near the fixed point; add it
    to the loss. ``skip_weight`` defaults to the paper's λ_skip = 0.01.
    DeepEquilibriumNetworks.jl: ``SkipDeepEquilibriumNetwork(model, solver)`` (``init=nothing``).
    """

    def __init__(
        self,
        f_module: nn.Module,
        solver=None,
        sensealg=None,
        *,
        skip_weight: float = 0.01,
        **kwargs,
    ):
        if "init" in kwargs:
            raise TypeError(
                "init: SkipRegDEQ always starts from z0 = f(0, x); use pn.DEQ for other inits"
            )
        super().__init__(f_module, solver, sensealg, init="f", skip_weight=skip_weight, **kwargs)


def _julia_steady_state(f_module, z0, args, solver, sensealg, abstol, reltol):
    """Hand the steady-state problem to the Julia backend
    (``pyneuralode.julia._backend.steady_state``)."""
    try:
        from ..julia import _backend
    except ImportError as exc:
        raise ImportError(
            "backend='julia': the Julia backend is not available ("
            + str(exc)
            + "). Install it with "
            "`pip install -e '.[julia]'` in a pyneuralode checkout (juliacall), then run `python "
            "-m pyneuralode.julia doctor`; or use backend='torch' (the native engine, the "
            "default)."
        ) from exc
    fn = getattr(_backend, "steady_state", None)
    if fn is None:
        raise NotImplementedError(
            "backend='julia': this version of pyneuralode.julia has no steady_state(); use "
            "backend='torch'"
        )
    return fn(
        f_module, z0, args, solver, sensealg, abstol, reltol, return_info=True
    )  # z*, the backend's stats dict
