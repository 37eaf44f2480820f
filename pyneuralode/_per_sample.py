"""Per-sample output times: ``t`` shaped ``(B, T)`` for a batch ``y0`` shaped ``(B, ...)``.

The batch is solved once on the union of all times (output times never force steps, so the union
costs interpolations, not steps), then each sample's states are gathered at its own times:
``ys[j, b]`` is sample ``b`` at ``t[b, j]``. All rows start at the same time (the batch shares its
initial time); torchdiffeq users otherwise build this union by hand (torchdiffeq #43, #122).
"""
from __future__ import annotations

import torch


def is_per_sample(y0, t) -> bool:
    return (isinstance(t, torch.Tensor) and t.ndim == 2 and isinstance(y0, torch.Tensor) and y0.ndim >= 1
            and t.shape[0] == y0.shape[0] and t.shape[0] > 0)


def union_times(t: torch.Tensor):
    """Validate per-sample times; return ``(union, index)`` with ``union[index[b, j]] == t[b, j]``."""
    if t.requires_grad:
        raise ValueError("t: gradients with respect to per-sample output times are not supported; pass t.detach() "
                         "(or a 1-D t shared by the batch)")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.shape[1] == 0:
        raise ValueError("t: per-sample times (B, T) need T >= 1")
    if not torch.isfinite(t).all():
        raise ValueError("t: contains NaN or Inf; every output time must be finite")
    if not torch.equal(t[:, 0], t[:1, 0].expand(t.shape[0])):
        raise ValueError("t: per-sample times (B, T) must all start at the same time t[:, 0] (the batch shares its "
                         "initial time); solve groups with different start times separately")
    direction = 1.0
    if t.shape[1] > 1:
        d = t[:, 1:] - t[:, :-1]
        inc, dec = (d > 0).all(1), (d < 0).all(1)
        bad = ~(inc | dec)
        if bad.any():
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"t: row {b} of the per-sample times is not strictly monotonic; every row must be strictly "
                             f"increasing (or every row strictly decreasing for backward integration)")
        if not (inc.all() or dec.all()):
            raise ValueError("t: the rows of the per-sample times run in different directions; all must increase or all decrease")
        direction = 1.0 if inc.all() else -1.0
    union, inverse = torch.unique(t, sorted=True, return_inverse=True)
    if direction < 0:
        union = union.flip(0)
        inverse = union.numel() - 1 - inverse
    return union, inverse


def gather(ys_union: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(U, B, ...)`` states on the union → ``(T, B, ...)`` states at each sample's own times (NaN past a failure)."""
    B, T = index.shape
    k = ys_union.shape[0]
    idx = index.to(ys_union.device)
    valid = idx < k
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    cols = torch.arange(B, device=ys_union.device).unsqueeze(1).expand(B, T)
    out = ys_union[safe, cols]  # (B, T, ...)
    if not bool(valid.all()):
        mask = valid.reshape(B, T, *([1] * (out.ndim - 2)))
        out = torch.where(mask, out, torch.full_like(out, float("nan")))
    return out.transpose(0, 1)
