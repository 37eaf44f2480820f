"""The autograd ``Function`` shared by the continuous adjoints (Backsolve, Interpolating,
Quadrature).

The adjoint of ``dy/dt = f(t, y, θ)`` with a loss on the states at the output times is

    da/dt = -aᵀ ∂f/∂y,    dg/dt = -aᵀ ∂f/∂θ,

integrated backwards from the last output time with ``a`` jumping by ``∂L/∂y(t_i)`` at every
output time; ``a(t_0) = dL/dy_0`` and ``g(t_0) = dL/dθ`` (Pontryagin; Chen et al. 2018, app. B).

The Function's forward runs the integrate loop without a graph (the algorithm's ``_forward``) and
its backward hands over to the algorithm's ``_backward``. The pieces the algorithms share live
beside it: :mod:`._validation` (constructor arguments), :mod:`._vjp` (gradient targets and the
vector–Jacobian product), :mod:`._backward_setup` (options, tolerances, seminorm and the backward
integration), :mod:`._passes` (forward passes with dense output or checkpoints and the backward
intervals), :mod:`._quadrature_rules` and :mod:`._torch_internals` (the one private torch API).
"""

from __future__ import annotations

import torch

from ._backward_setup import last_nonzero
from ._passes import Pass, plain_forward
from ._vjp import Targets

_DOUBLE_BACKWARD = (
    "differentiating twice through {name} is not supported: its backward pass runs without a "
    "graph, so a second derivative would be wrong; use sensealg=pn.DirectAdjoint() (the whole "
    "graph) for higher-order derivatives (e.g. torch.autograd.grad(..., create_graph=True) twice)"
)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes a first derivative on and raises if it is differentiated again.

    Its inputs are the tensors the derivative depends on (the solve's inputs and the incoming
    cotangent), so every path of a second derivative — ``.backward()`` or ``torch.autograd.grad``
    with any ``inputs`` — runs through this backward and raises instead of returning zero.
    """

    @staticmethod
    def forward(ctx, message, value, *depends_on):
        ctx.message = message
        return value.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box, sensealg, problem, solver, opts, stats, targets, y0, *tensors):
        ys, loop, saved = sensealg._forward(problem, y0.detach(), solver, opts, stats)
        box["loop"] = loop
        ctx.sensealg = sensealg
        ctx.pass_ = Pass(problem, solver, opts, stats, targets, saved)
        ctx.save_for_backward(ys)
        # the inputs only anchor the second-derivative error (their values are never read)
        ctx.inputs = (y0, *tensors)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        sensealg = ctx.sensealg
        double = torch.is_grad_enabled()
        (ys,) = ctx.saved_tensors
        inputs = ctx.inputs
        targets = ctx.pass_.targets
        with torch.no_grad():
            cot = grad_ys.detach()
            m = last_nonzero(cot)
            if m <= 0:  # no cotangent after the first output: nothing to integrate back
                grad_y0 = cot[0] if m == 0 else torch.zeros_like(ys[0])
                grad_flat = ys.new_zeros(targets.n) if targets.n else None
            else:
                grad_y0, grad_flat = sensealg._backward(ctx.pass_, ys, cot, m)
        grads = targets.split(grad_flat) if grad_flat is not None else [None] * len(targets.tensors)
        outs = [grad_y0, *grads]
        if double:  # create_graph=True: the first derivative, but no second one
            depends = [v for v in (*inputs, grad_ys) if v.requires_grad]
            if depends:
                message = _DOUBLE_BACKWARD.format(name=sensealg.name)
                outs = [
                    None if v is None else _FirstOrderOnly.apply(message, v, *depends) for v in outs
                ]
        return (None,) * 7 + tuple(outs)


def run_adjoint(sensealg, problem, y0, solver, opts, stats):
    """``AbstractAdjoint.run``: the plain loop when nothing needs a gradient, else the Function."""
    targets = Targets(problem, sensealg.name) if torch.is_grad_enabled() else None
    if targets is None or not (y0.requires_grad or any(t.requires_grad for t in targets.tensors)):
        with torch.no_grad():
            return plain_forward(problem, y0, solver, opts, stats)
    box: dict = {}
    ys = _AdjointFunction.apply(
        box, sensealg, problem, solver, opts, stats, targets, y0, *targets.tensors
    )
    return ys, box["loop"]
