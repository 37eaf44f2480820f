"""torchdiffeq's ``odeint_adjoint``: the backsolve adjoint on torchdiffeq's interface.

The forward pass is :func:`pyneuralode.odeint` without a graph. The backward pass integrates the
augmented state ``(vjp_t, y, a, *vjp_params)`` from each output time back to the previous one with
:func:`pyneuralode.odeint` itself — ``adjoint_method`` (any torchdiffeq method: adaptive,
fixed-grid, implicit, Adams, ``scipy_solver``), ``adjoint_rtol``/``adjoint_atol``,
``adjoint_options`` (default: the forward ``options`` without ``norm``) — so every step of it runs
through the integrate loop, and ``func`` sees what torchdiffeq's adjoint shows it: the adjoint
callbacks (``callback_step_adjoint``, ``callback_accept_step_adjoint``,
``callback_reject_step_adjoint``, called with the augmented state), ``perturb``, ``step_t`` and
``jump_t``, a ``grid_constructor`` called with the reversed interval, and the adjoint norm over
``(t, y, a, *params)`` (``adjoint_options["norm"]``: a callable, ``"seminorm"`` or the default
mixed norm). At each output time the state is reset to the stored forward value and the adjoint
jumps by that time's cotangent (Chen et al. 2018, torchdiffeq's algorithm).
:class:`pyneuralode.BacksolveAdjoint` is the same adjoint on :func:`pyneuralode.solve`'s interface.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .odeint import _combine_event, _Func, _odeint, _reroute_event

__all__ = ["odeint_adjoint"]

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
_ADJOINT_CALLBACKS = tuple(c + "_adjoint" for c in _CALLBACKS)


def _rms_norm(x):
    return x.abs().pow(2).mean().sqrt()


def _mixed_norm(parts):
    if len(parts) == 0:
        return 0.0
    return max(_rms_norm(p) for p in parts)


def _flat_to_shape(x, length, shapes):
    out, i = [], 0
    for shp in shapes:
        n = math.prod(shp)
        out.append(x[..., i : i + n].view((*length, *shp)))
        i += n
    return tuple(out)


class _FlatFunc(nn.Module):
    """A tuple-state ``func`` on the flat state (torchdiffeq's ``_TupleFunc``); the forward
    callbacks see the user's tuple, the adjoint ones the augmented state as is."""

    def __init__(self, func, shapes):
        super().__init__()
        object.__setattr__(self, "base", func)
        self.shapes = shapes
        for name in _CALLBACKS:
            cb = getattr(func, name, None)
            if cb is not None:

                def flat_cb(t0, y0, dt, _cb=cb):
                    return _cb(t0, _flat_to_shape(y0, (), shapes), dt)

                object.__setattr__(self, name, flat_cb)
        for name in _ADJOINT_CALLBACKS:
            cb = getattr(func, name, None)
            if cb is not None:
                object.__setattr__(self, name, cb)

    def forward(self, t, y):
        out = self.base(t, _flat_to_shape(y, (), self.shapes))
        return torch.cat([o.reshape(-1) for o in out])


_DOUBLE_BACKWARD = (
    "differentiating twice through odeint_adjoint is not supported: its backward pass runs "
    "without a graph, so a second derivative would be wrong; use pn.odeint (it differentiates "
    "the solver's steps) for higher-order derivatives"
)


class _AdjointMethod(torch.autograd.Function):
    """Forward: ``odeint`` without a graph; backward: the augmented system solved backwards.

    ``ctx.adjoint_options`` is read when the backward pass runs (torchdiffeq's tests swap its
    ``norm`` in between)."""

    @staticmethod
    def forward(
        ctx,
        shapes,
        func,
        y0,
        t,
        rtol,
        atol,
        method,
        options,
        event_fn,
        adjoint_rtol,
        adjoint_atol,
        adjoint_method,
        adjoint_options,
        t_requires_grad,
        *adjoint_params,
    ):
        ctx.func = func
        ctx.adjoint_rtol, ctx.adjoint_atol = adjoint_rtol, adjoint_atol
        ctx.adjoint_method, ctx.adjoint_options = adjoint_method, adjoint_options
        ctx.t_requires_grad = t_requires_grad
        ctx.event_mode = event_fn is not None
        ctx.inputs = (y0, *adjoint_params)  # anchors of the second-derivative error only
        with torch.no_grad():
            ans = _odeint(func, y0, t, rtol, atol, method, options, event_fn, {})
            if event_fn is None:
                ctx.save_for_backward(t, ans, *adjoint_params)
            else:
                event_t, y = ans
                ctx.save_for_backward(t, y, event_t, *adjoint_params)
        return ans

    @staticmethod
    def backward(ctx, *grad_y):
        grad_ys = grad_y
        with torch.no_grad():
            func = ctx.func
            t_requires_grad = ctx.t_requires_grad
            if ctx.event_mode:  # as if integrating to the event time (no gradient through it)
                t, y, event_t, *adjoint_params = ctx.saved_tensors
                t_user = t
                t = torch.cat([t[0].reshape(-1), event_t.reshape(-1).to(t.dtype)])
                grad_y = grad_y[1]
            else:
                t, y, *adjoint_params = ctx.saved_tensors
                grad_y = grad_y[0]
            adjoint_params = tuple(adjoint_params)
            fw = _Func(func)  # t in the state's dtype, as the forward pass gave it
            aug_state = [torch.zeros((), dtype=y.dtype, device=y.device), y[-1], grad_y[-1]]
            aug_state.extend(torch.zeros_like(p) for p in adjoint_params)

            def augmented_dynamics(t, y_aug):
                y, adj_y = y_aug[1], y_aug[2]
                with torch.enable_grad():
                    t_ = t.detach()
                    t = t_.requires_grad_(True)
                    y = y.detach().requires_grad_(True)
                    func_eval = fw(t if t_requires_grad else t_, y)
                    if func_eval.requires_grad:
                        vjp_t, vjp_y, *vjp_params = torch.autograd.grad(
                            func_eval, (t, y) + adjoint_params, -adj_y, allow_unused=True
                        )
                    else:  # f reads neither t, y nor a parameter: all products are zero
                        vjp_t, vjp_y, vjp_params = None, None, [None] * len(adjoint_params)
                vjp_t = torch.zeros_like(t) if vjp_t is None else vjp_t.to(t.dtype)
                vjp_y = torch.zeros_like(y) if vjp_y is None else vjp_y
                vjp_params = [
                    torch.zeros_like(p) if v is None else v
                    for p, v in zip(adjoint_params, vjp_params)
                ]
                return (vjp_t.reshape(()), func_eval.detach(), vjp_y, *vjp_params)

            for name, adjoint_name in zip(_CALLBACKS, _ADJOINT_CALLBACKS):
                cb = getattr(func, adjoint_name, None)
                if cb is not None:
                    setattr(augmented_dynamics, name, cb)

            time_vjps = (
                torch.empty(len(t), dtype=t.dtype, device=t.device) if t_requires_grad else None
            )
            for i in range(len(t) - 1, 0, -1):
                if t_requires_grad:  # moving the output time t_i moves y(t_i) by f(t_i, y_i)
                    f_i = fw(t[i], y[i])
                    dl_dt = f_i.reshape(-1).dot(grad_y[i].reshape(-1))
                    aug_state[0] = aug_state[0] - dl_dt
                    time_vjps[i] = dl_dt
                aug = _odeint(
                    augmented_dynamics,
                    tuple(aug_state),
                    t[i - 1 : i + 1].flip(0),
                    ctx.adjoint_rtol,
                    ctx.adjoint_atol,
                    ctx.adjoint_method,
                    ctx.adjoint_options,
                    None,
                    {},
                )
                aug_state = [a[1] for a in aug]
                aug_state[1] = y[i - 1]  # the stored forward state, not the backsolved one
                aug_state[2] = aug_state[2] + grad_y[i - 1]
            if t_requires_grad:
                time_vjps[0] = aug_state[0]
                if ctx.event_mode:  # only the start time gets a gradient in event mode
                    time_vjps = torch.cat([time_vjps[0].reshape(-1), torch.zeros_like(t_user[1:])])
            adj_y = aug_state[2]
            adj_params = aug_state[3:]
        outs = [adj_y, time_vjps, *adj_params]
        if torch.is_grad_enabled():  # create_graph=True: the first derivative, never a second
            from .sensitivity._adjoint import _FirstOrderOnly

            depends = [v for v in (*ctx.inputs, *grad_ys) if v is not None and v.requires_grad]
            if depends:
                outs = [
                    None if v is None else _FirstOrderOnly.apply(_DOUBLE_BACKWARD, v, *depends)
                    for v in outs
                ]
        return (None, None, outs[0], outs[1], *([None] * 10), *outs[2:])


def _adjoint_norm(adjoint_options: dict, shapes, state_norm):
    """torchdiffeq's adjoint norm: the default mixed norm over ``(t, y, a, *params)``, its seminorm
    (``"seminorm"``: the parameter channels left out), or the user's (given the tuple parts)."""

    def default_adjoint_norm(parts):
        t, y, adj_y, *adj_params = parts
        return max(t.abs(), state_norm(y), state_norm(adj_y), _mixed_norm(adj_params))

    norm = adjoint_options.get("norm")
    if norm is None:
        adjoint_options["norm"] = default_adjoint_norm
    elif isinstance(norm, str) and norm == "seminorm":

        def adjoint_seminorm(parts):
            t, y, adj_y, *_ = parts
            return max(t.abs(), state_norm(y), state_norm(adj_y))

        adjoint_options["norm"] = adjoint_seminorm
    elif isinstance(norm, str) or not callable(norm):
        raise ValueError(
            f"adjoint_options['norm']: expected 'seminorm' or a function of the tuple "
            f"(t, y, adj_y, *adj_params), got {norm!r}"
        )
    elif shapes is not None:  # hand the user's norm the tuple state's components

        def user_norm(parts):
            t, y, adj_y, *adj_params = parts
            y = _flat_to_shape(y, (), shapes)
            adj_y = _flat_to_shape(adj_y, (), shapes)
            return norm((t, *y, *adj_y, *adj_params))

        adjoint_options["norm"] = user_norm


def odeint_adjoint(
    func,
    y0,
    t,
    *,
    rtol=1e-7,
    atol=1e-9,
    method=None,
    options=None,
    event_fn=None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method=None,
    adjoint_options=None,
    adjoint_params=None,
):
    """torchdiffeq's ``odeint_adjoint``: :func:`pyneuralode.odeint` whose gradients come from the
    backsolve adjoint, solved backwards with ``adjoint_method`` (default: ``method``) through
    :func:`pyneuralode.odeint`, so memory does not grow with the steps.

    ``func`` must be an ``nn.Module`` unless ``adjoint_params`` (the tensors gradients reach;
    tensors ``func`` closes over included; ``()`` for none) is given. ``adjoint_rtol``/
    ``adjoint_atol`` default to ``rtol``/``atol``; ``adjoint_options`` to ``options`` without
    ``norm`` (it must be given when ``adjoint_method`` differs and ``options`` is given);
    ``adjoint_options["norm"]`` is ``"seminorm"`` (the parameter gradients left out of the
    backward step-size control) or a function of ``(t, y, adj_y, *adj_params)``. ``func``'s
    ``callback_*_adjoint`` hooks are called on the backward steps. With ``event_fn`` returns
    ``(event_t, states)`` and the event time's gradient (implicit function theorem).
    """
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError(
            "func must be an instance of nn.Module to specify the adjoint parameters; "
            "alternatively "
            "they can be specified explicitly via the `adjoint_params` argument. If there are no "
            "parameters then it is allowable to set `adjoint_params=()`."
        )
    if not callable(func):
        raise TypeError(f"func: must be callable as func(t, y), got {type(func).__name__}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options: expected a dict, got {type(options).__name__}")
    if adjoint_options is not None and not isinstance(adjoint_options, dict):
        raise TypeError(f"adjoint_options: expected a dict, got {type(adjoint_options).__name__}")
    if adjoint_rtol is None:
        adjoint_rtol = rtol
    if adjoint_atol is None:
        adjoint_atol = atol
    if adjoint_method is None:
        adjoint_method = method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "If `adjoint_method != method` then we cannot infer `adjoint_options` from `options`. "
            "So as `options` has been passed then `adjoint_options` must be passed as well."
        )
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    else:
        adjoint_options = dict(adjoint_options)
    if adjoint_params is None:
        adjoint_params = tuple(func.parameters())
    else:
        adjoint_params = tuple(adjoint_params)
    for i, p in enumerate(adjoint_params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params[{i}]: expected a torch.Tensor, got {type(p).__name__}")
    n_all = len(adjoint_params)
    adjoint_params = tuple(p for p in adjoint_params if p.requires_grad)
    if len(adjoint_params) != n_all and callable(adjoint_options.get("norm")):
        warnings.warn(
            "An adjoint parameter was passed without requiring gradient. For efficiency this will "
            "be excluded from the adjoint pass, and will not appear as a tensor in the adjoint "
            "norm.",
            stacklevel=2,
        )
    options = dict(options or {})
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    shapes = None
    user_event_fn = event_fn
    if isinstance(y0, (tuple, list)):
        shapes = [c.shape for c in y0]
        func = _FlatFunc(func, shapes)
        y0 = torch.cat([c.reshape(-1) for c in y0])
        rtol, atol, adjoint_rtol, adjoint_atol = (
            _flat_tol(name, tol, shapes)
            for name, tol in (
                ("rtol", rtol),
                ("atol", atol),
                ("adjoint_rtol", adjoint_rtol),
                ("adjoint_atol", adjoint_atol),
            )
        )
        user_norm = options.get("norm", _mixed_norm)

        def state_norm(x):
            return user_norm(_flat_to_shape(x, (), shapes))

        options["norm"] = state_norm
        if event_fn is not None:

            def flat_event_fn(tt, yy, _g=user_event_fn):
                return _g(tt, _flat_to_shape(yy, (), shapes))

            event_fn = flat_event_fn
    else:
        state_norm = options.get("norm", _rms_norm)
    _adjoint_norm(adjoint_options, shapes, state_norm)
    ans = _AdjointMethod.apply(
        shapes,
        func,
        y0,
        t,
        rtol,
        atol,
        method,
        options,
        event_fn,
        adjoint_rtol,
        adjoint_atol,
        adjoint_method,
        adjoint_options,
        t.requires_grad,
        *adjoint_params,
    )
    if event_fn is None:
        solution = ans
    else:
        event_t, solution = ans
        g = _combine_event(event_fn, t[0].to(y0.dtype), y0)
        event_t, solution = _reroute_event(_Func(func), g, event_t, solution)
    if shapes is not None:
        solution = _flat_to_shape(solution, (len(solution),), shapes)
    return solution if event_fn is None else (event_t, solution)


def _flat_tol(name, tol, shapes):
    """A per-component tolerance of a tuple state as one flat tensor (a scalar stays a scalar)."""
    if not isinstance(tol, (tuple, list)):
        return tol
    if len(tol) != len(shapes):
        raise ValueError(
            f"{name}: a tuple of tolerances needs one per state component ({len(shapes)})"
        )
    return torch.cat(
        [
            torch.as_tensor(v, dtype=torch.float64).expand(shp).reshape(-1)
            for v, shp in zip(tol, shapes)
        ]
    )
