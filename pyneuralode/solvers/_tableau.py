"""Butcher tableaus as data, checked for consistency when constructed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit or diagonally implicit Runge–Kutta method.

    ``a`` is the full s×s matrix (strictly lower triangular for explicit methods), ``b`` the
    weights of the propagated solution, ``b_error`` the weights ``b - b̂`` of the embedded error
    estimate (or ``None``), ``c`` the nodes. ``dense`` optionally holds an s×P matrix B with
    ``b_i(θ) = Σ_p B[i, p] θ^(p+1)``, the method's own continuous extension.
    ``fsal``: the last stage is evaluated at the new state (first-same-as-last).
    Construction checks row sums (``c_i = Σ_j a_ij``), ``Σ b = 1``, ``Σ b_error = 0``, the
    dense output matching ``b`` at θ = 1, and the classical order conditions up to ``order``
    (for orders ≤ 5; higher orders are checked numerically by the convergence tests).
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    order: int
    b_error: Optional[np.ndarray] = None
    error_order: Optional[int] = None
    dense: Optional[np.ndarray] = None
    fsal: bool = False
    tol: float = 1e-12

    def __post_init__(self):
        a, b, c = (np.asarray(x, dtype=np.float64) for x in (self.a, self.b, self.c))
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "c", c)
        s = len(b)
        if a.shape != (s, s) or c.shape != (s,):
            raise ValueError(f"inconsistent tableau shapes a{a.shape}, b{b.shape}, c{c.shape}")
        if not np.allclose(a.sum(axis=1), c, atol=self.tol, rtol=0):
            bad = np.nonzero(~np.isclose(a.sum(axis=1), c, atol=self.tol, rtol=0))[0]
            raise ValueError(f"tableau rows {bad.tolist()} do not sum to c")
        if abs(b.sum() - 1) > self.tol:
            raise ValueError(f"tableau weights sum to {b.sum()}, not 1")
        if self.b_error is not None:
            e = np.asarray(self.b_error, dtype=np.float64)
            object.__setattr__(self, "b_error", e)
            if e.shape != (s,) or abs(e.sum()) > self.tol:
                raise ValueError(f"error weights must have {s} entries summing to 0 (sum={e.sum()})")
        if self.dense is not None:
            B = np.asarray(self.dense, dtype=np.float64)
            object.__setattr__(self, "dense", B)
            if B.shape[0] != s or not np.allclose(B.sum(axis=1), b, atol=1e-10, rtol=0):
                raise ValueError("dense output coefficients do not reproduce b at theta = 1")
        for cond, (lhs, rhs) in order_conditions(a, b, c, min(self.order, 5)).items():
            if abs(lhs - rhs) > 1e-10:
                raise ValueError(f"order condition {cond} fails: {lhs} != {rhs}")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def explicit(self) -> bool:
        return bool(np.all(np.triu(self.a) == 0))


def order_conditions(a: np.ndarray, b: np.ndarray, c: np.ndarray, p: int) -> dict:
    """The Butcher order conditions up to order ``p`` (≤ 5) as {name: (lhs, rhs)}."""
    conds = {}
    if p >= 1:
        conds["b·1=1"] = (b.sum(), 1.0)
    if p >= 2:
        conds["b·c=1/2"] = (b @ c, 1 / 2)
    if p >= 3:
        conds["b·c²=1/3"] = (b @ c**2, 1 / 3)
        conds["b·Ac=1/6"] = (b @ a @ c, 1 / 6)
    if p >= 4:
        conds["b·c³=1/4"] = (b @ c**3, 1 / 4)
        conds["b·(c*Ac)=1/8"] = (b @ (c * (a @ c)), 1 / 8)
        conds["b·Ac²=1/12"] = (b @ a @ c**2, 1 / 12)
        conds["b·AAc=1/24"] = (b @ a @ a @ c, 1 / 24)
    if p >= 5:
        Ac = a @ c
        conds["b·c⁴=1/5"] = (b @ c**4, 1 / 5)
        conds["b·(c²*Ac)=1/10"] = (b @ (c**2 * Ac), 1 / 10)
        conds["b·(c*Ac²)=1/15"] = (b @ (c * (a @ c**2)), 1 / 15)
        conds["b·(c*AAc)=1/30"] = (b @ (c * (a @ Ac)), 1 / 30)
        conds["b·(Ac)²=1/20"] = (b @ (Ac * Ac), 1 / 20)
        conds["b·Ac³=1/20"] = (b @ a @ c**3, 1 / 20)
        conds["b·A(c*Ac)=1/40"] = (b @ a @ (c * Ac), 1 / 40)
        conds["b·AAc²=1/60"] = (b @ a @ a @ c**2, 1 / 60)
        conds["b·AAAc=1/120"] = (b @ a @ a @ Ac, 1 / 120)
    return conds


def lower(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Build a strictly lower-triangular s×s matrix from its rows 2..s (row i has i-1 entries)."""
    s = len(rows) + 1
    A = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        A[i, : len(row)] = row
    return A
