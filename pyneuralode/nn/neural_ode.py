"""``NeuralODE``: an ``nn.Module`` mapping ``y0`` to the solution of ``dy/dt = f_θ(t, y)`` (Chen et
al., NeurIPS 2018)."""

from __future__ import annotations

import torch
from torch import nn

from .._per_sample import check_per_sample
from .._solve import solve
from ..sensitivity import DirectAdjoint
from ..sensitivity._resolve import resolve_sensealg
from ..solvers import Dopri5
from ..solvers._resolve import resolve_solver

__all__ = ["NeuralODE"]


#: torch's messages for operands whose shapes do not fit (a state of the wrong width)
_SHAPE_ERRORS = (
    "shapes cannot be multiplied",
    "size mismatch",
    "must match the size",
    "Expected size",
    "expected input",
    "does not match",
    "Given groups",
)


class _Counted(nn.Module):
    """Wraps the vector field: counts forward calls and, when asked, the VJPs through its
    outputs."""

    def __init__(self, vf):
        super().__init__()
        self.vf = vf
        self.calls = 0
        self.vjps = 0
        self.hook = False

    def _bump(self, grad):
        self.vjps += 1
        return grad

    def forward(self, t, y, *args):
        self.calls += 1
        if self.calls == 1:  # the first call of a solve: a shape mismatch with y0 shows here
            try:
                out = self.vf(t, y, *args)
            except RuntimeError as e:
                if not any(k in str(e) for k in _SHAPE_ERRORS):
                    raise
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(
                    f"y0: the vector field cannot take a state shaped {shape} ({e}); give y0 the "
                    "width vector_field expects (e.g. (batch, dim) for a ConcatMLP(dim))"
                ) from e
        else:
            out = self.vf(t, y, *args)
        if self.hook and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._bump)
        return out


class NeuralODE(nn.Module):
    """``y0 ↦ y(t_end)`` (or the trajectory at ``t``) for ``dy/dt = vector_field(t, y)``.

    ``vector_field``: an ``nn.Module`` (its parameters are trained) called as ``f(t, y)``, e.g.
    :class:`~pyneuralode.ConcatMLP`. ``t``: the output times (1-D, monotonic; default ``[0, 1]``).
    ``solver`` (default ``Dopri5``; object or name), ``sensealg`` (default DirectAdjoint; object or
    ``"backsolve"``/``"interpolating"``/``"quadrature"``), ``rtol``/``atol``, fixed steps with
    ``adaptive=False, dt=h``. ``forward(y0, t=None)`` returns the final state, or with
    ``return_trajectory=True`` the states at every time of ``t`` shaped ``(len(t), *y0.shape)``.
    ``per_sample=True`` (or ``"compact"``) steps every sample of the batch on its own
    (``pn.solve``'s ``per_sample``; explicit RK solvers, DirectAdjoint).
    ``compile=True`` runs the solves on the compiled path (``solve(..., compile=True)``, needs
    numba; gradients by compiled forward sensitivities, ``sensealg`` is not used).

    After a call, ``nfe_forward`` is the forward pass's number of ``f`` evaluations; after its
    backward, ``nfe_backward`` is the backward pass's: ``nfe_adjoint`` of the solution stats for the
    continuous adjoints, ``nfe_recompute`` (the replayed steps) for
    ``DirectAdjoint(checkpoints=M)``,
    and for ``DirectAdjoint()`` the number of ``f`` evaluations that were backpropagated through
    (vector–Jacobian products, counted by a gradient hook).
    ``last_stats`` holds the solution's stats dict (updated by the backward pass).
    """

    def __init__(
        self,
        vector_field,
        t=(0.0, 1.0),
        solver=None,
        sensealg=None,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        return_trajectory: bool = False,
        adaptive: bool = True,
        dt=None,
        max_steps: int = 100_000,
        per_sample=False,
        compile: bool = False,
    ):
        super().__init__()
        if not callable(vector_field):
            raise TypeError(
                "vector_field: expected a callable f(t, y) (an nn.Module to train), got "
                f"{type(vector_field).__name__}"
            )
        if not isinstance(compile, bool):
            raise TypeError(f"compile: expected True or False, got {compile!r}")
        if not isinstance(return_trajectory, bool):
            raise TypeError(f"return_trajectory: expected True or False, got {return_trajectory!r}")
        self.func = _Counted(vector_field)
        t = (
            torch.as_tensor(t, dtype=torch.float64)
            if not isinstance(t, torch.Tensor)
            else t.detach().clone()
        )
        if t.ndim != 1 or t.numel() < 2:
            raise ValueError(
                "t: expected a 1-D sequence of at least two times, e.g. (0.0, 1.0); got shape "
                f"{tuple(t.shape)}"
            )
        self.register_buffer("t", t, persistent=False)
        self.solver = resolve_solver(solver, Dopri5)
        self.sensealg = resolve_sensealg(sensealg)
        self.rtol, self.atol = rtol, atol
        self.return_trajectory = return_trajectory
        self.adaptive, self.dt, self.max_steps = adaptive, dt, max_steps
        check_per_sample(per_sample)  # per-sample stepping of the batch (pn.solve's per_sample)
        self.per_sample = per_sample
        self.compile = compile  # solve(..., compile=True), gradients by forward sensitivities
        self.last_stats: dict = {}
        # the whole-graph DirectAdjoint: backward evaluations are counted by a gradient hook
        self._direct = (
            isinstance(self.sensealg, DirectAdjoint) and self.sensealg.checkpoints is None
        )

    @property
    def vector_field(self):
        return self.func.vf

    @property
    def nfe_forward(self) -> int:
        """``f`` evaluations of the last forward solve."""
        # per_sample: the calls of f (its stats' nfe counts per sample)
        return int(self.last_stats.get("ncalls", self.last_stats.get("nfe", 0)))

    @property
    def nfe_backward(self) -> int:
        """``f``-related evaluations of the backward pass of the last call (0 before backward)."""
        if self._direct:
            return self.func.vjps
        # continuous adjoints: the adjoint right-hand sides; checkpointed DirectAdjoint: the
        # replayed steps
        return int(self.last_stats.get("nfe_adjoint", self.last_stats.get("nfe_recompute", 0)))

    def forward(self, y0, t=None):
        t = self.t if t is None else t
        if isinstance(t, torch.Tensor) and isinstance(y0, torch.Tensor) and t.is_floating_point():
            t = t.to(device=y0.device, dtype=y0.dtype) if not t.requires_grad else t
        self.func.calls, self.func.vjps = 0, 0
        self.func.hook = self._direct and torch.is_grad_enabled()
        how = dict(compile=True) if self.compile else dict(sensealg=self.sensealg)
        sol = solve(
            self.func,
            y0,
            t,
            self.solver,
            rtol=self.rtol,
            atol=self.atol,
            adaptive=self.adaptive,
            dt=self.dt,
            max_steps=self.max_steps,
            per_sample=self.per_sample,
            **how,
        )
        self.func.hook = False
        self.last_stats = sol.stats
        return (
            sol.ys
            if self.return_trajectory
            else (sol.ys[-1] if not isinstance(sol.ys, tuple) else tuple(c[-1] for c in sol.ys))
        )
