"""Rosenbrock (linearly implicit) methods: coefficients plus a short class each.

Coefficients are OrdinaryDiffEq.jl's (``lib/OrdinaryDiffEqRosenbrock/src/rosenbrock_tableaus.jl``),
in Hairer & Wanner's transformed form; the generic engine in ``_rosenbrock.py`` steps them and
checks each tableau when it is built. All options (``jac``, ``batched``, ``linsolve``, ...) are
documented on :class:`~pyneuralode.solvers._rosenbrock.RosenbrockSolver`.
"""

from __future__ import annotations

import math

import numpy as np

from ._base import StepResult
from ._rosenbrock import GenericRosenbrock, RosenbrockSolver, RosenbrockTableau

__all__ = ["Rosenbrock23", "Rodas4", "Rodas5P"]


def _lower(rows, s):
    M = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        M[i, : len(row)] = row
    return M


# --------------------------------------------------------------------------------------------
# Rosenbrock23 (Shampine & Reichelt 1997, MATLAB's ode23s)

_R23_D = 1.0 / (2.0 + math.sqrt(2.0))
_R23_E32 = 6.0 + math.sqrt(2.0)


class Rosenbrock23(RosenbrockSolver):
    """Shampine's Rosenbrock–W 2(3) pair (MATLAB ``ode23s``). Order 2, L-stable, with an order-3
    error estimate (one extra evaluation, reused as the next step's first stage) and its own
    quadratic dense output. Good at loose tolerances. Shampine & Reichelt, SIAM J. Sci. Comput.
    18 (1997). (Its third stage reuses earlier f-values, so it has its own step rather than the
    generic tableau engine; it shares the Jacobian, LU and options of the engine.)
    """

    name = "Rosenbrock23"
    aliases = ("ode23s",)
    order = 2
    error_order = 3

    def step(self, rhs, t0, y0, h, cache):
        ls = cache.ls
        f0, dT = self._prepare(rhs, t0, y0, h, cache)
        d = _R23_D
        g = h * d
        ls.factor(g)  # W = I − h d J
        r1 = f0 if dT is None else f0 + g * dT
        k1 = ls.solve(r1)
        f1 = rhs(t0 + 0.5 * h, y0 + (0.5 * h) * k1)
        k2 = ls.solve(f1 - k1) + k1
        y1 = y0 + h * k2
        f2 = rhs(t0 + h, y1)
        r3 = f2 - _R23_E32 * (k2 - f1) - 2.0 * (k1 - f0)
        if dT is not None:
            r3 = r3 + g * dT
        k3 = ls.solve(r3)
        err = (h / 6.0) * (k1 - 2.0 * k2 + k3)
        return StepResult(
            y1=y1,
            error=err,
            cache=cache.advanced(f_next=f2),
            dense=(y0, k1, k2, h),
            cache_on_reject=cache,
        )

    def interpolant(self, dense, theta):  # type: ignore[override]
        y0, k1, k2, h = dense
        d = _R23_D
        c1 = theta * (1 - theta) / (1 - 2 * d)
        c2 = theta * (theta - 2 * d) / (1 - 2 * d)
        return y0 + h * (c1 * k1 + c2 * k2)


# --------------------------------------------------------------------------------------------
# Rodas4 (Hairer & Wanner 1996)

_RODAS4_A = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [1.544, 0, 0, 0, 0, 0],
        [0.9466785280815826, 0.2557011698983284, 0, 0, 0, 0],
        [3.314825187068521, 2.896124015972201, 0.9986419139977817, 0, 0, 0],
        [1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950, 0, 0],
        [1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950, 1, 0],
    ]
)
_RODAS4_C = _lower(
    [
        [-5.6688],
        [-2.430093356833875, -0.2063599157091915],
        [-0.1073529058151375, -9.594562251023355, -20.47028614809616],
        [7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160],
        [
            8.083246795921522,
            -7.981132988064893,
            -31.52159432874371,
            16.31930543123136,
            -6.058818238834054,
        ],
    ],
    6,
)
_RODAS4_H = np.array(
    [
        [
            10.12623508344586,
            -7.487995877610167,
            -34.80091861555747,
            -7.992771707568823,
            1.025137723295662,
            0,
        ],
        [
            -0.6762803392801253,
            6.087714651680015,
            16.43084320892478,
            24.76722511418386,
            -6.594389125716872,
            0,
        ],
    ]
)


def _stiffly_accurate_weights(A):
    s = A.shape[0]
    m = A[s - 1].copy()
    m[s - 1] = 1.0
    e = np.zeros(s)
    e[s - 1] = 1.0
    return m, e


_m4, _e4 = _stiffly_accurate_weights(_RODAS4_A)
_RODAS4 = RosenbrockTableau(
    A=_RODAS4_A,
    C=_RODAS4_C,
    gamma=0.25,
    c=[0, 0.386, 0.21, 0.63, 1, 1],
    d=[0.25, -0.1043, 0.1035, -0.0362, 0, 0],
    m=_m4,
    e=_e4,
    order=4,
    error_order=3,
    H=_RODAS4_H,
)


class Rodas4(GenericRosenbrock):
    """Rodas4: 6-stage Rosenbrock method of order 4 with an embedded order-3 estimate; stiffly
    accurate, L-stable, with a stiff-aware order-3 dense output. Hairer & Wanner, *Solving ODEs II*
    (1996), IV.7.
    """

    name = "Rodas4"
    tableau = _RODAS4


# --------------------------------------------------------------------------------------------
# Rodas5P (Steinebach 2023)

_RODAS5P_GAMMA = 0.21193756319429014
_RODAS5P_A = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [3.0, 0, 0, 0, 0, 0, 0, 0],
        [2.849394379747939, 0.45842242204463923, 0, 0, 0, 0, 0, 0],
        [-6.954028509809101, 2.489845061869568, -10.358996098473584, 0, 0, 0, 0, 0],
        [
            2.8029986275628964,
            0.5072464736228206,
            -0.3988312541770524,
            -0.04721187230404641,
            0,
            0,
            0,
            0,
        ],
        [
            -7.502846399306121,
            2.561846144803919,
            -11.627539656261098,
            -0.18268767659942256,
            0.030198172008377946,
            0,
            0,
            0,
        ],
        [
            -7.502846399306121,
            2.561846144803919,
            -11.627539656261098,
            -0.18268767659942256,
            0.030198172008377946,
            1,
            0,
            0,
        ],
        [
            -7.502846399306121,
            2.561846144803919,
            -11.627539656261098,
            -0.18268767659942256,
            0.030198172008377946,
            1,
            1,
            0,
        ],
    ]
)
_RODAS5P_C = _lower(
    [
        [-14.155112264123755],
        [-17.97296035885952, -2.859693295451294],
        [147.12150275711716, -1.41221402718213, 71.68940251302358],
        [165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306],
        [
            24.854864614690072,
            -3.0009227002832186,
            47.4931110020768,
            5.5814197821558125,
            -0.6610691825249471,
        ],
        [
            30.91273214028599,
            -3.1208243349937974,
            77.79954646070892,
            34.28646028294783,
            -19.097331116725623,
            -28.087943162872662,
        ],
        [
            37.80277123390563,
            -3.2571969029072276,
            112.26918849496327,
            66.9347231244047,
            -40.06618937091002,
            -54.66780262877968,
            -9.48861652309627,
        ],
    ],
    8,
)
_RODAS5P_H = np.array(
    [
        [
            25.948786856663858,
            -2.5579724845846235,
            10.433815404888879,
            -2.3679251022685204,
            0.524948541321073,
            1.1241088310450404,
            0.4272876194431874,
            -0.17202221070155493,
        ],
        [
            -9.91568850695171,
            -0.9689944594115154,
            3.0438037242978453,
            -24.495224566215796,
            20.176138334709044,
            15.98066361424651,
            -6.789040303419874,
            -6.710236069923372,
        ],
        [
            11.419903575922262,
            2.8879645146136994,
            72.92137995996029,
            80.12511834622643,
            -52.072871366152654,
            -59.78993625266729,
            -0.15582684282751913,
            4.883087185713722,
        ],
    ]
)
_m5, _e5 = _stiffly_accurate_weights(_RODAS5P_A)
_RODAS5P = RosenbrockTableau(
    A=_RODAS5P_A,
    C=_RODAS5P_C,
    gamma=_RODAS5P_GAMMA,
    c=[0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716, 0.4288403609558664, 1, 1, 1],
    d=[
        0.21193756319429014,
        -0.42387512638858027,
        -0.3384627126235924,
        1.8046452872882734,
        2.325825639765069,
        0,
        0,
        0,
    ],
    m=_m5,
    e=_e5,
    order=5,
    error_order=4,
    H=_RODAS5P_H,
)


class Rodas5P(GenericRosenbrock):
    """Rodas5P: 8-stage Rosenbrock method of order 5 with an embedded order-4 estimate; stiffly
    accurate, L-stable, with a stiff-aware order-4 dense output (3 extra rows ``H``). The
    recommended default for stiff problems at moderate to tight tolerances. Steinebach, "Improvement
    of Rosenbrock-Wanner method RODASP", in *Progress in Differential-Algebraic Equations II*
    (2020); Rodas5 coefficients: Di Marzo (1993).
    """

    name = "Rodas5P"
    tableau = _RODAS5P
