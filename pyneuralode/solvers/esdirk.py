"""ESDIRK/SDIRK methods (Newton per stage): coefficients plus a short class each.

Coefficients from the original papers as transcribed in OrdinaryDiffEq.jl
(``lib/OrdinaryDiffEqSDIRK``) and diffrax (``diffrax/_solver/kvaerno3.py``, ``kvaerno5.py``,
``kencarp4.py``); the generic engine in ``_esdirk.py`` steps them, every tableau is checked when
built (:func:`~pyneuralode.solvers._esdirk.esdirk_tableau`). Options (``jac``, ``batched``,
``linsolve``, ...) are documented on :class:`~pyneuralode.solvers._esdirk.ESDIRK`.
"""

from __future__ import annotations

import math

import numpy as np

from ._esdirk import ESDIRK, esdirk_tableau

__all__ = ["ImplicitEuler", "TRBDF2", "Kvaerno3", "Kvaerno5", "KenCarp4"]


class ImplicitEuler(ESDIRK):
    """Backward (implicit) Euler. Order 1, L-stable; error estimate against the trapezoidal rule
    (``h/2 (f1 − f0)``, as OrdinaryDiffEq), Hermite dense output. Written as the 2-stage ESDIRK
    ``[[0, 0], [0, 1]]``."""

    name = "ImplicitEuler"
    aliases = ("backward_euler", "implicit_euler")
    tableau = esdirk_tableau(
        a=[[0.0, 0.0], [0.0, 1.0]],
        b=[0.0, 1.0],
        c=[0.0, 1.0],
        order=1,
        b_embedded=[0.5, 0.5],
        error_order=2,
    )


_SQ2 = math.sqrt(2.0)
_TRBDF2_G = 2.0 - _SQ2
_TRBDF2_D = _TRBDF2_G / 2.0  # 1 − √2/2
_TRBDF2_W = _SQ2 / 4.0


class TRBDF2(ESDIRK):
    """TR-BDF2 (trapezoidal rule then BDF2, γ = 2 − √2) as a 3-stage ESDIRK. Order 2, L-stable,
    stiffly accurate, with an order-3 embedded estimate; Hermite dense output. Bank et al. (1985);
    Hosea & Shampine, Appl. Numer. Math. 20 (1996)."""

    name = "TRBDF2"
    tableau = esdirk_tableau(
        a=[[0.0, 0.0, 0.0], [_TRBDF2_D, _TRBDF2_D, 0.0], [_TRBDF2_W, _TRBDF2_W, _TRBDF2_D]],
        b=[_TRBDF2_W, _TRBDF2_W, _TRBDF2_D],
        c=[0.0, _TRBDF2_G, 1.0],
        order=2,
        b_embedded=[(1 - _TRBDF2_W) / 3, (3 * _TRBDF2_W + 1) / 3, _TRBDF2_D / 3],
        error_order=3,
    )


# Kvaerno (2004), 3/2 pair
_g3 = 0.43586652150
_k3_a31 = (-4 * _g3**2 + 6 * _g3 - 1) / (4 * _g3)
_k3_a32 = (-2 * _g3 + 1) / (4 * _g3)
_k3_a41 = (6 * _g3 - 1) / (12 * _g3)
_k3_a42 = -1 / ((24 * _g3 - 12) * _g3)
_k3_a43 = (-6 * _g3**2 + 6 * _g3 - 1) / (6 * _g3 - 3)


class Kvaerno3(ESDIRK):
    """Kvaerno's ESDIRK 3(2): 4 stages, order 3 with an embedded order-2 estimate; L-stable,
    stiffly accurate; Hermite dense output. Kværnø, BIT 44 (2004)."""

    name = "Kvaerno3"
    tableau = esdirk_tableau(
        a=[
            [0, 0, 0, 0],
            [_g3, _g3, 0, 0],
            [_k3_a31, _k3_a32, _g3, 0],
            [_k3_a41, _k3_a42, _k3_a43, _g3],
        ],
        b=[_k3_a41, _k3_a42, _k3_a43, _g3],
        c=[0.0, 2 * _g3, 1.0, 1.0],
        order=3,
        b_embedded=[_k3_a31, _k3_a32, _g3, 0.0],
        error_order=2,
    )


# Kvaerno (2004), 5/4 pair
_g5 = 0.26
_K5 = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0],
        [_g5, _g5, 0, 0, 0, 0, 0],
        [0.13, 0.84033320996790809, _g5, 0, 0, 0, 0],
        [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, _g5, 0, 0, 0],
        [
            0.16648564323248321,
            0.10450018841591720,
            0.03631482272098715,
            -0.13090704451073998,
            _g5,
            0,
            0,
        ],
        [
            0.13855640231268224,
            0,
            -0.04245337201752043,
            0.02446657898003141,
            0.61943039072480676,
            _g5,
            0,
        ],
        [
            0.13659751177640291,
            0,
            -0.05496908796538376,
            -0.04118626728321046,
            0.62993304899016403,
            0.06962479448202728,
            _g5,
        ],
    ]
)


class Kvaerno5(ESDIRK):
    """Kvaerno's ESDIRK 5(4): 7 stages, order 5 with an embedded order-4 estimate; L-stable,
    stiffly accurate; Hermite dense output. Kværnø, BIT 44 (2004)."""

    name = "Kvaerno5"
    tableau = esdirk_tableau(
        a=_K5,
        b=_K5[6],
        c=_K5.sum(1),
        order=5,
        b_embedded=np.append(_K5[5, :6], 0.0),
        error_order=4,
    )


_kc_g = 0.25
_KC4 = np.zeros((6, 6))
_KC4[1, :2] = [_kc_g, _kc_g]
_KC4[2, :3] = [8611 / 62500, -1743 / 31250, _kc_g]
_KC4[3, :4] = [5012029 / 34652500, -654441 / 2922500, 174375 / 388108, _kc_g]
_KC4[4, :5] = [
    15267082809 / 155376265600,
    -71443401 / 120774400,
    730878875 / 902184768,
    2285395 / 8070912,
    _kc_g,
]
_KC4[5, :6] = [82889 / 524892, 0, 15625 / 83664, 69875 / 102672, -2260 / 8211, _kc_g]
_KC4_BHAT = [
    4586570599 / 29645900160,
    0,
    178811875 / 945068544,
    814220225 / 1159782912,
    -3700637 / 11593932,
    61727 / 225920,
]
# continuous extension (Kennedy & Carpenter 2003; diffrax's KenCarpInterpolation), rows listed with
# the θ³ coefficient first; reversed below to the engine's b_i(θ) = Σ_p B[i, p] θ^(p+1)
_KC4_DENSE_HIGH_FIRST = np.array(
    [
        [6818779379841 / 7100303317025, -54480133 / 30881146, 6943876665148 / 7220017795957],
        [0.0, 0.0, 0.0],
        [2173542590792 / 12501825683035, -11436875 / 14766696, 7640104374378 / 9702883013639],
        [-31592104683404 / 5083833661969, 174696575 / 18121608, -20649996744609 / 7521556579894],
        [61146701046299 / 7138195549469, -12120380 / 966161, 8854892464581 / 2390941311638],
        [-17219254887155 / 4939391667607, 3843 / 706, -11397109935349 / 6675773540249],
    ]
)
_KC4_DENSE = _KC4_DENSE_HIGH_FIRST[:, ::-1].copy()


class KenCarp4(ESDIRK):
    """Kennedy & Carpenter's ARK4(3)6L[2]SA, implicit (ESDIRK) part: 6 stages, order 4 with an
    embedded order-3 estimate; L-stable, stiffly accurate, with the method's own order-3 dense
    output. (Only the implicit tableau is used — the whole right-hand side is treated implicitly;
    no IMEX splitting.) Kennedy & Carpenter, Appl. Numer. Math. 44 (2003)."""

    name = "KenCarp4"
    tableau = esdirk_tableau(
        a=_KC4,
        b=_KC4[5],
        c=[0, 0.5, 83 / 250, 31 / 50, 17 / 20, 1.0],
        order=4,
        b_embedded=_KC4_BHAT,
        error_order=3,
        dense=_KC4_DENSE,
    )
