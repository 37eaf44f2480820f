"""torchdiffeq's ``odeint_event``: integrate from ``t0`` until an event function crosses zero."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._time import start_time
from .odeint import odeint

__all__ = ["odeint_event"]


def odeint_event(
    func: Callable,
    y0,
    t0,
    *,
    event_fn: Callable,
    reverse_time: bool = False,
    odeint_interface=None,
    **kwargs,
):
    """torchdiffeq's ``odeint_event``: integrate from ``t0`` until ``event_fn(t, y)`` crosses zero.

    Returns ``(event_t, ys)`` with ``ys`` the states at ``[t0, event_t]`` (shape ``(2,
    *y0.shape)``).
    Backwards in time with ``reverse_time``. A vector-valued ``event_fn`` stops where its first
    component crosses zero. ``kwargs`` (``rtol``, ``atol``, ``method``, ``options``, and for
    ``odeint_interface=pn.odeint_adjoint`` its adjoint arguments) go to ``odeint_interface``
    (default :func:`pyneuralode.odeint`). Gradients reach ``event_t`` and the final state.
    """
    if odeint_interface is None:
        odeint_interface = odeint
    t0 = start_time(t0, y0)
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
