"""Restarted GMRES, batched and differentiable: the one Krylov solver of the package.

Used by the matrix-free ``linsolve="gmres"`` of the implicit ODE solvers (one system, under
autograd when a solve is differentiated through its steps) and by
:class:`~pyneuralode.SteadyStateAdjoint` (one system per sample of a batched state).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch


class GMRESResult(NamedTuple):
    x: torch.Tensor  #: the solution, shaped like ``b``
    converged: bool  #: every system met its tolerance
    iterations: int  #: products with the matrix in Arnoldi steps (restart residuals not counted)
    residual: (
        float  #: the largest residual norm (the Givens estimate, or the true one at a restart)
    )


def gmres(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    rtol: float = 1e-8,
    atol: float = 0.0,
    restart: int = 30,
    maxiter: int = 200,
    x0: torch.Tensor | None = None,
    batch: int = 1,
) -> GMRESResult:
    """Restarted GMRES (Saad & Schultz 1986) for ``matvec(x) = b``, Arnoldi with modified
    Gram–Schmidt.

    ``batch > 1``: the leading dimension of ``b`` holds independent systems that ``matvec`` maps
    block-diagonally; each gets its own Krylov space (one batched product per iteration). System
    ``i`` is solved when ``‖b_i − A x_i‖₂ ≤ max(atol, rtol·‖b_i‖₂)``. The residuals are tracked with
    Givens rotations in float64 on the host (which decides when to stop); the small least-squares
    problem of each cycle is solved with tensors, so ``x`` is differentiable under autograd (with
    respect to ``b`` and whatever ``matvec`` depends on). A system whose Krylov space is exhausted
    (breakdown) stops growing it; it counts as solved only if its residual meets the tolerance
    (the true residual when the least-squares problem was singular).

    Each system is solved scaled by a power of two that brings ``max|b_i|`` to [1, 2) (exact in
    floating point; results change at most by rounding): a right-hand side of tiny (huge)
    entries would otherwise have a float32 norm that underflows to 0 (overflows), and Arnoldi
    would normalise by that. Systems already solved (``b_i = 0``) and broken-down ones get zero
    Krylov directions (never ``0 · direction``, which is NaN for an infinite one). ``converged``
    is never True for a non-finite ``x``; a non-finite product ``matvec(v)`` stops the solve (not
    converged).
    """
    shape = b.shape
    B = batch
    bb = b.reshape(B, -1)
    n = bb.shape[1]
    scale = _power_of_two_scale(bb)
    sc = scale[:, None]
    bb = bb / sc
    scale_np = scale.double().cpu().numpy()
    bnorm = bb.detach().norm(dim=1).double().cpu().numpy()
    target = np.maximum(atol / scale_np, rtol * bnorm)

    def result(x, converged, its, resid):
        return GMRESResult((x * sc).reshape(shape), converged, its, float(np.max(resid * scale_np)))

    if x0 is None:
        x = torch.zeros_like(bb)
        r = bb
    else:
        x = x0.reshape(B, -1) / sc
        r = bb - matvec(x.reshape(shape)).reshape(B, -1)
    tiny = torch.finfo(b.dtype).tiny
    ls_dtype = (
        torch.float64 if b.dtype in (torch.float16, torch.bfloat16, torch.float32) else b.dtype
    )
    m = max(1, min(restart, n))
    its = 0
    while True:
        beta_t = r.norm(dim=1)
        beta = beta_t.detach().double().cpu().numpy()
        if not np.isfinite(beta).all():
            return result(x, False, its, beta)
        done = beta <= target
        if done.all():
            return result(x, True, its, beta)
        if its >= maxiter:
            return result(x, False, its, beta)
        # systems already solved take no correction: their least-squares right-hand side is 0
        alive = torch.from_numpy(~done).to(device=b.device)
        V = [torch.where(alive[:, None], r / beta_t.clamp_min(tiny)[:, None], 0.0)]
        cols = []  # Hessenberg columns (B, k+2), tensors
        cs, sn = np.zeros((B, m)), np.zeros((B, m))
        g = np.zeros((B, m + 1))
        g[:, 0] = np.where(done, 0.0, beta)
        dead = done.copy()  # no further Krylov directions (solved at the start, or broken down)
        singular = np.zeros(B, dtype=bool)
        for k in range(m):
            w = matvec(V[k].reshape(shape)).reshape(B, -1)
            its += 1
            h = []
            for j in range(k + 1):
                hij = (w * V[j]).sum(1)
                w = w - hij[:, None] * V[j]
                h.append(hij)
            hn = w.norm(dim=1)
            h.append(hn)
            col = torch.stack(h, 1)
            hf = col.detach().double().cpu().numpy().copy()
            if not np.isfinite(hf[~dead]).all():  # the operator overflowed: no Krylov step
                return result(x, False, its, np.where(dead, beta, np.inf))
            if dead.any():  # a unit column on a row of its own: the direction gets weight 0
                unit = np.zeros(k + 2)
                unit[k + 1] = 1.0
                col = torch.where(
                    torch.from_numpy(dead).to(b.device)[:, None],
                    torch.from_numpy(unit).to(col),
                    col,
                )
                hf[dead] = unit
            breakdown = ~dead & (hf[:, k + 1] <= 1e-14 * bnorm)
            cols.append(col)
            for j in range(k):  # the earlier rotations, then a new one zeroing row k+1
                t0 = cs[:, j] * hf[:, j] + sn[:, j] * hf[:, j + 1]
                hf[:, j + 1] = -sn[:, j] * hf[:, j] + cs[:, j] * hf[:, j + 1]
                hf[:, j] = t0
            den = np.sqrt(hf[:, k] ** 2 + hf[:, k + 1] ** 2)
            # a (near) zero pivot of the rotated triangle: the least-squares problem is singular
            # and the rotated residual no longer measures the true one
            singular |= den <= 1e-13 * np.sqrt((hf[:, : k + 2] ** 2).sum(1))
            safe = np.where(den == 0.0, 1.0, den)
            cs[:, k] = np.where(den == 0.0, 1.0, hf[:, k] / safe)
            sn[:, k] = np.where(den == 0.0, 0.0, hf[:, k + 1] / safe)
            g[:, k + 1] = -sn[:, k] * g[:, k]
            g[:, k] = cs[:, k] * g[:, k]
            res = np.abs(g[:, k + 1])
            dead |= breakdown
            if ((res <= target) | dead).all() or its >= maxiter:
                break
            keep = torch.from_numpy(~dead).to(device=b.device)[:, None]
            V.append(torch.where(keep, w / hn.clamp_min(tiny)[:, None], 0.0))
        k1 = len(cols)
        H = torch.stack([torch.nn.functional.pad(c, (0, k1 + 1 - c.shape[1])) for c in cols], 2)
        e1 = torch.nn.functional.pad((beta_t * alive.to(beta_t))[:, None], (0, k1))[:, :, None]
        y = torch.linalg.lstsq(H.to(ls_dtype), e1.to(ls_dtype)).solution.to(b.dtype)
        x = x + (torch.stack(V[:k1], 2) @ y)[:, :, 0]
        if (res <= target).all() and not singular.any() and bool(torch.isfinite(x).all()):
            return result(x, True, its, res)
        r = bb - matvec(x.reshape(shape)).reshape(B, -1)


def _power_of_two_scale(bb: torch.Tensor) -> torch.Tensor:
    """Per row, ``2^(e-1)`` with ``max|b_i| = m·2^e``, ``m ∈ [0.5, 1)`` (1 for a zero or
    non-finite row): dividing by it is exact and brings the largest entry to [1, 2)."""
    if bb.shape[1] == 0:  # empty states: nothing to scale
        return torch.ones(bb.shape[0], dtype=bb.dtype, device=bb.device)
    m = bb.detach().abs().amax(dim=1)
    _, e = torch.frexp(m)
    ok = torch.isfinite(m) & (m > 0)
    return torch.where(ok, torch.ldexp(torch.ones_like(m), e - 1), torch.ones_like(m))
