"""Restarted GMRES on flat vectors (the matrix-free ``linsolve="gmres"`` of the implicit solvers)."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def gmres(
    matvec: Callable,
    b: torch.Tensor,
    x0: Optional[torch.Tensor] = None,
    tol: float = 1e-8,
    restart: int = 30,
    maxiter: int = 200,
):
    """Restarted GMRES (Saad & Schultz 1986) with modified Gram–Schmidt on flat vectors.

    Solves ``matvec(x) = b`` to ``‖b − A x‖ ≤ tol·‖b‖``; returns ``(x, converged, iterations)``.
    The residual is tracked with Givens rotations on Python floats; the small least-squares
    problem is solved once per cycle with tensors, so the result is differentiable under autograd.
    """
    bn = float(torch.linalg.vector_norm(b.detach()))
    if bn == 0.0:
        return torch.zeros_like(b), True, 0
    target = tol * bn
    x = torch.zeros_like(b) if x0 is None else x0
    its = 0
    m = min(restart, b.numel())
    while True:
        r = b - matvec(x) if (x0 is not None or its > 0) else b
        beta = torch.linalg.vector_norm(r)
        res = float(beta)
        if res <= target or its >= maxiter:
            return x, res <= target, its
        V = [r / beta]
        cols = []  # Hessenberg columns (tensors)
        cs, sn = [], []
        g = [res]  # rotated right-hand side (floats)
        for k in range(m):
            w = matvec(V[k])
            h = []
            for j in range(k + 1):
                hij = torch.dot(w, V[j])
                w = w - hij * V[j]
                h.append(hij)
            hk1 = torch.linalg.vector_norm(w)
            h.append(hk1)
            cols.append(h)
            its += 1
            # apply the previous rotations to the new column (floats), then a new one
            hf = [float(v) for v in h]
            for j in range(k):
                t0 = cs[j] * hf[j] + sn[j] * hf[j + 1]
                hf[j + 1] = -sn[j] * hf[j] + cs[j] * hf[j + 1]
                hf[j] = t0
            den = (hf[k] ** 2 + hf[k + 1] ** 2) ** 0.5
            c_, s_ = (1.0, 0.0) if den == 0 else (hf[k] / den, hf[k + 1] / den)
            cs.append(c_)
            sn.append(s_)
            g.append(-s_ * g[k])
            g[k] = c_ * g[k]
            res = abs(g[k + 1])
            breakdown = float(hk1) <= 1e-14 * bn
            if res <= target or breakdown or its >= maxiter:
                break
            V.append(w / hk1)
        k1 = len(cols)
        H = torch.zeros(k1 + 1, k1, dtype=b.dtype, device=b.device)
        Hc = [
            torch.stack(
                col + [torch.zeros((), dtype=b.dtype, device=b.device)] * (k1 - len(col) + 1)
            )
            for col in cols
        ]
        H = torch.stack(Hc, 1)
        e1 = torch.zeros(k1 + 1, 1, dtype=b.dtype, device=b.device)
        e1 = e1 + torch.nn.functional.pad(beta.reshape(1, 1), (0, 0, 0, k1))
        yk = torch.linalg.lstsq(H, e1).solution[:, 0]
        x = x + torch.stack(V[:k1], 1) @ yk
        if res <= target or breakdown:
            return x, True, its
