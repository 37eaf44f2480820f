"""Explicit Runge–Kutta methods: coefficients plus a short class each.

Adding a method = a tableau (data) + a ~10-line class; the generic engine in ``_erk.py`` steps
it. Names follow OrdinaryDiffEq.jl so the Julia backend maps one to one.
"""
from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from ._erk import ExplicitRK
from ._tableau import ButcherTableau, lower

__all__ = ["Euler", "Midpoint", "Heun", "RK4", "BS3", "Dopri5", "Tsit5"]

# --------------------------------------------------------------------------------------------
# Low order


class Euler(ExplicitRK):
    """Forward Euler. Order 1, fixed step only (no error estimate). Euler (1768)."""

    name = "Euler"
    tableau = ButcherTableau(a=np.zeros((1, 1)), b=[1.0], c=[0.0], order=1)


class Midpoint(ExplicitRK):
    """Explicit midpoint rule. Order 2 with an embedded Euler estimate (adaptive 2(1)); Hermite dense output."""

    name = "Midpoint"
    tableau = ButcherTableau(
        a=lower([[0.5]]), b=[0.0, 1.0], c=[0.0, 0.5], order=2, b_error=[-1.0, 1.0], error_order=1
    )


class Heun(ExplicitRK):
    """Heun's method (explicit trapezoidal rule). Order 2 with an embedded Euler estimate; Hermite dense output."""

    name = "Heun"
    aliases = ("heun2", "heun_euler")
    tableau = ButcherTableau(
        a=lower([[1.0]]), b=[0.5, 0.5], c=[0.0, 1.0], order=2, b_error=[-0.5, 0.5], error_order=1
    )


class RK4(ExplicitRK):
    """The classical fourth-order Runge–Kutta method. Order 4, fixed step only; Hermite dense output. Kutta (1901)."""

    name = "RK4"
    tableau = ButcherTableau(
        a=lower([[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]]),
        b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
        c=[0.0, 0.5, 0.5, 1.0],
        order=4,
    )


_bs3_b = np.array([2 / 9, 1 / 3, 4 / 9, 0.0])
_bs3_bhat = np.array([7 / 24, 1 / 4, 1 / 3, 1 / 8])


class BS3(ExplicitRK):
    """Bogacki–Shampine 3(2), FSAL; Hermite (cubic) dense output. Bogacki & Shampine (1989)."""

    name = "BS3"
    aliases = ("bosh3",)
    tableau = ButcherTableau(
        a=lower([[0.5], [0.0, 0.75], [2 / 9, 1 / 3, 4 / 9]]),
        b=_bs3_b,
        c=[0.0, 0.5, 0.75, 1.0],
        order=3,
        b_error=_bs3_b - _bs3_bhat,
        error_order=2,
        fsal=True,
    )


# --------------------------------------------------------------------------------------------
# Dormand–Prince 5(4)

_dp5_a = lower(
    [
        [1 / 5],
        [3 / 40, 9 / 40],
        [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
    ]
)
_dp5_b = np.array([35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0])
_dp5_bhat = np.array([5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])
# Hairer's dense output (CONTD5): y(θ) = y0 + θ r2 + θ(1-θ) r3 + θ²(1-θ) r4 + θ²(1-θ)² r5 (times h·k).
_dp5_d = np.array(
    [
        -12715105075 / 11282082432,
        0,
        87487479700 / 32700410799,
        -10690763975 / 1880347072,
        701980252875 / 199316789632,
        -1453857185 / 822651844,
        69997945 / 29380423,
    ]
)


def _dp5_dense() -> np.ndarray:
    e1, e7 = np.eye(7)[0], np.eye(7)[6]
    r2, r3, r4, r5 = _dp5_b, e1 - _dp5_b, 2 * _dp5_b - e1 - e7, _dp5_d
    polys = [
        P.polymul([0, 1], [1]),
        P.polymul([0, 1], [1, -1]),
        P.polymul([0, 0, 1], [1, -1]),
        P.polymul([0, 0, 1], P.polymul([1, -1], [1, -1])),
    ]
    B = np.zeros((7, 4))
    for r, poly in zip((r2, r3, r4, r5), polys):
        poly = np.pad(poly, (0, 5 - len(poly)))
        B += np.outer(r, poly[1:5])
    return B


class Dopri5(ExplicitRK):
    """Dormand–Prince 5(4), FSAL, with Hairer's fourth-order continuous extension.

    Dormand & Prince (1980); dense output from Hairer, Nørsett & Wanner, *Solving ODEs I*, II.6.
    """

    name = "DP5"
    aliases = ("dopri5",)
    tableau = ButcherTableau(
        a=_dp5_a, b=_dp5_b, c=[0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1], order=5,
        b_error=_dp5_b - _dp5_bhat, error_order=4, dense=_dp5_dense(), fsal=True,
    )


# --------------------------------------------------------------------------------------------
# Tsitouras 5(4)

_ts5_c = [0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1]
_ts5_a = lower(
    [
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.897153057105493, -6.359448489975075, 4.3622954328695815],
        [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
        [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383],
        [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774],
    ]
)
_ts5_b = np.append(_ts5_a[6, :6], 0.0)
_ts5_btilde = np.array(
    [
        -0.00178001105222577714,
        -0.0008164344596567469,
        0.007880878010261995,
        -0.1447110071732629,
        0.5823571654525552,
        -0.45808210592918697,
        0.015151515151515152,
    ]
)


def _ts5_dense() -> np.ndarray:
    """Tsitouras' free fourth-order interpolant b_i(θ) (Tsitouras 2011, as in OrdinaryDiffEq.jl)."""
    r = [
        -1.0530884977290216 * P.polymul(P.polymul([0, 1], [-1.3299890189751412, 1]), [0.7139816917074209, -1.4364028541716351, 1]),
        0.1017 * P.polymul([0, 0, 1], [1.2949852507374631, -2.1966568338249754, 1]),
        2.490627285651252793 * P.polymul([0, 0, 1], [1.57803468208092486, -2.38535645472061657, 1]),
        -16.54810288924490272 * P.polymul(P.polymul([-1.21712927295533244, 1], [-0.61620406037800089, 1]), [0, 0, 1]),
        47.37952196281928122 * P.polymul(P.polymul([-1.203071208372362603, 1], [-0.658047292653547382, 1]), [0, 0, 1]),
        -34.87065786149660974 * P.polymul(P.polymul([-1.2, 1], [-0.666666666666666667, 1]), [0, 0, 1]),
        2.5 * P.polymul(P.polymul([-1, 1], [-0.6, 1]), [0, 0, 1]),
    ]
    B = np.zeros((7, 4))
    for i, poly in enumerate(r):
        poly = np.pad(poly, (0, 5 - len(poly)))
        B[i] = poly[1:5]
    return B


class Tsit5(ExplicitRK):
    """Tsitouras 5(4), FSAL, with its own fourth-order free interpolant. The default solver.

    Ch. Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the first column simplifying
    assumption", Comput. Math. Appl. 62 (2011).
    """

    name = "Tsit5"
    tableau = ButcherTableau(
        a=_ts5_a, b=_ts5_b, c=_ts5_c, order=5, b_error=_ts5_btilde, error_order=4,
        dense=_ts5_dense(), fsal=True, tol=1e-10,
    )
