"""Gauss–Legendre and Gauss–Kronrod rules on [0, 1] for the quadrature adjoint."""

from __future__ import annotations

import numpy as np


def gauss_legendre(n: int):
    """Nodes and weights of the n-point Gauss–Legendre rule on [0, 1] (exact to degree 2n−1)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2]


# Gauss–Kronrod 7–15 (QUADPACK qk15): Kronrod nodes on [0, 1], their weights, and the weights of
# the embedded 7-point Gauss rule (on the odd Kronrod nodes; zero elsewhere).
_XGK = [
    0.991455371120812639206854697526329,
    0.949107912342758524526189684047851,
    0.864864423359769072789712788640926,
    0.741531185599394439863864773280788,
    0.586087235467691130294144845693013,
    0.405845151377397166906606412076961,
    0.207784955007898467600689403773245,
    0.0,
]
_WGK = [
    0.022935322010529224963732008058970,
    0.063092092629978553290700663189204,
    0.104790010322250183839876322541518,
    0.140653259715525918745189590510238,
    0.169004726639267902826583426598550,
    0.190350578064785409913256402421014,
    0.204432940075298892414161999234649,
    0.209482141084727828012999174891714,
]
_WG = [
    0.0,
    0.129484966168869693270611432679082,
    0.0,
    0.279705391489276667901467771423780,
    0.0,
    0.381830050505118944950369775488975,
    0.0,
    0.417959183673469387755102040816327,
]


def gauss_kronrod15():
    """(nodes, Kronrod weights, Gauss-7 weights) on [0, 1]; K15 exact to degree 22, G7 to degree
    13."""
    xs, wk, wg = [], [], []
    for x, a, b in zip(_XGK[:-1], _WGK[:-1], _WG[:-1]):
        for s in (-1.0, 1.0):
            xs.append((1 + s * x) / 2)
            wk.append(a / 2)
            wg.append(b / 2)
    xs.append(0.5)
    wk.append(_WGK[-1] / 2)
    wg.append(_WG[-1] / 2)
    return xs, wk, wg
