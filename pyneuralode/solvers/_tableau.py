"""Butcher tableaus as data, checked for consistency when constructed.

The order conditions are generated from rooted trees (Butcher's theory; Hairer, Nørsett &
Wanner, *Solving ODEs I*, II.2), so every order is checked exactly, for the propagated weights,
the embedded weights and the continuous extension alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: a rooted tree as the sorted tuple of its children's trees; the single node is ``()``.
Tree = tuple


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit or diagonally implicit Runge–Kutta method.

    ``a`` is the full s×s matrix (strictly lower triangular for explicit methods), ``b`` the
    weights of the propagated solution, ``b_error`` the weights ``b - b̂`` of the embedded error
    estimate (or ``None``), ``c`` the nodes. ``error_order`` is the order the step-size controller
    assumes for the error estimate (the embedded method's order, unless the estimate is a
    combination, as in DOP853); ``embedded_order`` is the order of ``b - b_error`` (defaults to
    ``error_order``). ``b_error2``/``embedded_order2``: an optional second embedded estimate
    (DOP853's 3rd-order one).

    ``a_extra`` (m×(s+m)) and ``c_extra`` (m) optionally define extra stages used only by the
    dense output (evaluated lazily, when the step is interpolated): stage s+j is
    ``f(t0 + c_extra[j] h, y0 + h Σ_i a_extra[j, i] k_i)`` over the s main stages and the earlier
    extra ones. ``dense`` optionally holds an (s+m)×P matrix B with
    ``b_i(θ) = Σ_p B[i, p] θ^(p+1)``, the method's own continuous extension, of order
    ``dense_order`` when given (then checked).
    ``fsal``: the last stage is evaluated at the new state (first-same-as-last).

    Construction checks row sums (``c_i = Σ_j a_ij``), ``Σ b = 1``, ``Σ b_error = 0``, the
    dense output matching ``b`` at θ = 1, and all the order conditions (rooted trees) of ``b``
    up to ``order``, of the embedded weights up to their orders and of the continuous extension
    up to ``dense_order``; a failure raises ``ValueError`` naming the condition.
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    order: int
    b_error: np.ndarray | None = None
    error_order: int | None = None
    dense: np.ndarray | None = None
    fsal: bool = False
    tol: float = 1e-12
    embedded_order: int | None = None
    b_error2: np.ndarray | None = None
    embedded_order2: int | None = None
    a_extra: np.ndarray | None = None
    c_extra: np.ndarray | None = None
    dense_order: int | None = None

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
        if self.fsal and not (
            np.allclose(a[-1], b, atol=self.tol, rtol=0) and b[-1] == 0 and c[-1] == 1
        ):
            raise ValueError(
                "FSAL tableau: the last row of a must equal b (with b[-1] = 0 and c[-1] = 1)"
            )
        ctol = max(1e-10, self.tol)
        _check_conditions("order condition", order_conditions(a, b, c, self.order), ctol)
        for name, eo in (("b_error", "embedded_order"), ("b_error2", "embedded_order2")):
            e = getattr(self, name)
            if e is None:
                continue
            e = np.asarray(e, dtype=np.float64)
            object.__setattr__(self, name, e)
            if e.shape != (s,) or abs(e.sum()) > self.tol:
                raise ValueError(
                    f"{name}: error weights must have {s} entries summing to 0 (sum={e.sum()})"
                )
            p = getattr(self, eo)
            if p is None and name == "b_error":
                p = self.error_order
            if p:
                _check_conditions(
                    f"embedded ({name}) order condition", order_conditions(a, b - e, c, p), ctol
                )
        m = 0
        if self.a_extra is not None or self.c_extra is not None:
            if self.a_extra is None or self.c_extra is None:
                raise ValueError("extra dense-output stages need both a_extra and c_extra")
            ax = np.atleast_2d(np.asarray(self.a_extra, dtype=np.float64))
            cx = np.atleast_1d(np.asarray(self.c_extra, dtype=np.float64))
            m = len(cx)
            if ax.shape != (m, s + m):
                raise ValueError(
                    f"a_extra must be {m}×{s + m} (extra stages × all stages), got {ax.shape}"
                )
            if np.any(np.triu(ax[:, s:]) != 0):
                raise ValueError(
                    "a_extra: an extra stage may only use the main stages and earlier extra stages"
                )
            if not np.allclose(ax.sum(axis=1), cx, atol=self.tol, rtol=0):
                raise ValueError("a_extra: rows of the extra stages do not sum to c_extra")
            object.__setattr__(self, "a_extra", ax)
            object.__setattr__(self, "c_extra", cx)
        if self.dense is not None:
            B = np.asarray(self.dense, dtype=np.float64)
            object.__setattr__(self, "dense", B)
            b_ext = np.concatenate([b, np.zeros(m)])
            if (
                B.ndim != 2
                or B.shape[0] != s + m
                or not np.allclose(B.sum(axis=1), b_ext, atol=1e-10, rtol=0)
            ):
                raise ValueError("dense output coefficients do not reproduce b at theta = 1")
            if self.dense_order:
                A_ext, c_ext = self.extended()
                _check_conditions(
                    "continuous-extension order condition",
                    dense_order_conditions(A_ext, B, c_ext, self.dense_order),
                    ctol,
                )
        elif self.a_extra is not None:
            raise ValueError("extra stages without dense-output coefficients are never used")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def extra_stages(self) -> int:
        return 0 if self.c_extra is None else len(self.c_extra)

    @property
    def explicit(self) -> bool:
        return bool(np.all(np.triu(self.a) == 0))

    def extended(self) -> tuple[np.ndarray, np.ndarray]:
        """The (s+m)×(s+m) matrix and nodes of the main and extra stages together."""
        s, m = self.stages, self.extra_stages
        A = np.zeros((s + m, s + m))
        A[:s, :s] = self.a
        if m:
            A[s:] = self.a_extra
            return A, np.concatenate([self.c, self.c_extra])
        return A, self.c


def _check_conditions(what: str, conds: dict, tol: float) -> None:
    for cond, (lhs, rhs) in conds.items():
        if np.max(np.abs(np.asarray(lhs) - np.asarray(rhs))) > tol:
            raise ValueError(f"{what} {cond} fails: {lhs} != {rhs}")


# --------------------------------------------------------------------------------------------
# Rooted trees


def _grow(t: Tree):
    """Every tree obtained from ``t`` by attaching one new leaf to one of its nodes."""
    yield tuple(sorted(t + ((),)))
    for i, ch in enumerate(t):
        for g in _grow(ch):
            yield tuple(sorted(t[:i] + (g,) + t[i + 1 :]))


@functools.cache
def trees(n: int) -> tuple[Tree, ...]:
    """All rooted trees with ``n`` nodes (1, 1, 2, 4, 9, 20, 48, 115, ... of them)."""
    if n == 1:
        return ((),)
    return tuple(sorted({g for t in trees(n - 1) for g in _grow(t)}))


def tree_order(t: Tree) -> int:
    return 1 + sum(tree_order(ch) for ch in t)


def tree_gamma(t: Tree) -> int:
    """The density γ(t): the order condition of ``t`` is ``Φ(t) = 1/γ(t)``."""
    g = tree_order(t)
    for ch in t:
        g *= tree_gamma(ch)
    return g


def tree_name(t: Tree) -> str:
    return "τ" if not t else "[" + "".join(tree_name(ch) for ch in t) + "]"


def _stage_weights(t: Tree, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Φ_i(t) per stage: 1 for the single node, Π_children (A Φ(child)) otherwise (A·1 = c)."""
    w = np.ones(len(c))
    for ch in t:
        w = w * (c if not ch else a @ _stage_weights(ch, a, c))
    return w


def order_conditions(a: np.ndarray, b: np.ndarray, c: np.ndarray, p: int) -> dict:
    """The Butcher order conditions up to order ``p`` as ``{tree: (b·Φ(t), 1/γ(t))}``."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a, b, c))
    conds = {}
    for n in range(1, p + 1):
        for t in trees(n):
            conds[tree_name(t)] = (float(b @ _stage_weights(t, a, c)), 1.0 / tree_gamma(t))
    return conds


def dense_order_conditions(a: np.ndarray, B: np.ndarray, c: np.ndarray, q: int) -> dict:
    """Order conditions of a continuous extension ``b_i(θ) = Σ_p B[i, p] θ^(p+1)`` up to order
    ``q``: ``Σ_i b_i(θ) Φ_i(t) = θ^|t| / γ(t)`` for every tree with ``|t| ≤ q``, compared power by
    power."""
    P = B.shape[1]
    conds = {}
    for n in range(1, q + 1):
        for t in trees(n):
            lhs = B.T @ _stage_weights(t, a, c)
            rhs = np.zeros(P)
            if n <= P:
                rhs[n - 1] = 1.0 / tree_gamma(t)
            conds["θ:" + tree_name(t)] = (lhs, rhs)
    return conds


def lower(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Build a strictly lower-triangular s×s matrix from its rows 2..s (row i has i-1 entries)."""
    s = len(rows) + 1
    A = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        A[i, : len(row)] = row
    return A


def sparse_rows(rows: Sequence[dict], s: int) -> np.ndarray:
    """An (len(rows)+1)×s matrix from rows 2.. given as ``{column: value}`` (row 1 is zero)."""
    A = np.zeros((len(rows) + 1, s))
    for i, row in enumerate(rows, start=1):
        for j, v in row.items():
            A[i, j] = v
    return A
