"""Gradient targets and the vector–Jacobian product of the continuous adjoints.

The targets are the tensors gradients flow to besides ``y0`` (module parameters of ``f`` and
tensors in ``args`` that require grad, flattened into one channel block); one
``torch.autograd.grad`` per adjoint right-hand side evaluation gives the state and the parameter
parts of the product together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._torch_internals import grad_first_order


class Targets:
    """The tensors gradients flow to besides ``y0``: ``adjoint_params`` (default: the parameters of
    the modules f reaches), then ``args`` tensors that require grad. ``who`` names the sensealg in
    the error raised for a tensor f uses that would otherwise get no gradient."""

    def __init__(self, problem, who: str):
        from ._captured import adjoint_targets

        self.params: list[torch.Tensor] = adjoint_targets(problem, who)
        self.arg_index = [
            i for i, a in enumerate(problem.args) if isinstance(a, torch.Tensor) and a.requires_grad
        ]
        self.tensors: list[torch.Tensor] = self.params + [problem.args[i] for i in self.arg_index]
        self.numels = [t.numel() for t in self.tensors]
        self.n = sum(self.numels)

    def leaf_args(self, problem):
        """``args`` with the grad-requiring tensors replaced by detached leaves (the VJP's
        inputs)."""
        args = list(problem.args)
        leaves = []
        for i in self.arg_index:
            leaf = args[i].detach().requires_grad_(True)
            args[i] = leaf
            leaves.append(leaf)
        return tuple(args), leaves

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        if self.n == 0:
            return []
        return [
            c.reshape(t.shape).to(t.dtype) for c, t in zip(flat.split(self.numels), self.tensors)
        ]


# ---------------------------------------------------------------------------------------------
# The vector–Jacobian product


class VJP:
    """``(f(t, y), -aᵀ∂f/∂y, -aᵀ∂f/∂θ)`` with one ``torch.autograd.grad``.

    ``y`` and ``a`` have the internal state's shape. If called in grad mode on inputs that require
    grad (an implicit backward solver differentiating the adjoint right-hand side), the products
    are built with ``create_graph=True`` so that they are differentiable in turn.
    """

    def __init__(self, problem, targets: Targets):
        self.problem = problem
        self.args, leaves = targets.leaf_args(problem)
        self.param_inputs = targets.params + leaves
        self.has_params = targets.n > 0

    def __call__(self, t: float, y: torch.Tensor, a: torch.Tensor, with_params: bool = True):
        problem = self.problem
        create = torch.is_grad_enabled() and (y.requires_grad or a.requires_grad)
        with torch.enable_grad():
            y_in = y if create and y.requires_grad else y.detach().requires_grad_(True)
            fy = problem.call(problem.time(t), y_in, self.args)
            inputs = [y_in] + (self.param_inputs if with_params else [])
            if not fy.requires_grad:  # f depends neither on y nor on a target: zero products
                grads = tuple(torch.zeros_like(x) for x in inputs)
            elif create or fy.shape != a.shape or fy.dtype != a.dtype:
                grads = torch.autograd.grad(
                    fy,
                    inputs,
                    grad_outputs=-a,
                    allow_unused=True,
                    materialize_grads=True,
                    create_graph=create,
                )
            else:
                grads = grad_first_order(fy, inputs, -a)
        if not create:
            fy = fy.detach()
        return fy, grads[0], grads[1:]


def flat_cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].reshape(-1)
