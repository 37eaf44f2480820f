"""Times as the tensors f and a user Jacobian receive.

Solvers and the problem both need this (a solver builds the times of its stage and Jacobian calls),
so it lives below both: solvers import it instead of importing upward from ``_problem``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def time_tensor(dtype: torch.dtype, device) -> Callable[[float], torch.Tensor]:
    """``t ↦`` a 0-d tensor of ``t`` (what f and jac receive). On the CPU through a numpy scalar,
    which costs less than ``torch.scalar_tensor`` (f is called several times per step)."""
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        npd = np.float64 if dtype == torch.float64 else np.float32
        from_numpy, array = torch.from_numpy, np.array
        return lambda t: from_numpy(array(t, dtype=npd))
    return lambda t: torch.scalar_tensor(t, dtype=dtype, device=device)


def start_time(t0, y0) -> torch.Tensor:
    """``t0`` of an event solve as a one-element tensor: a Python number takes the state's float
    dtype (float64 for a non-float state), like the output times of ``solve``."""
    ref = y0[0] if isinstance(y0, (tuple, list)) else y0
    if not isinstance(t0, torch.Tensor):
        floating = isinstance(ref, torch.Tensor) and ref.is_floating_point()
        t0 = torch.as_tensor(t0, dtype=ref.dtype if floating else torch.float64)
    if t0.numel() != 1:
        raise ValueError(f"t0: expected a scalar start time, got shape {tuple(t0.shape)}")
    return t0
