"""Compute the stored high-accuracy references of the stiff-solver tests (run once; output
committed).

    python benchmarks/make_stiff_references.py   # writes tests/data/stiff_references.json

scipy ``solve_ivp(method="Radau")`` at rtol = 1e-12 (Robertson: atol = 1e-20 on the tiny y2;
Van der Pol: atol = 1e-12). Output times are hit by Radau's dense output. ``ivp_testset``: the
IVP Test Set's published end values of HIRES, OREGO, ROBER and VDPOL, with Radau's beside them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import scipy
from scipy.integrate import solve_ivp

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "stiff_references.json"


def robertson(t, y, k1=0.04, k2=3e7, k3=1e4):
    y1, y2, y3 = y
    return [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2]


def robertson_jac(t, y, k1=0.04, k2=3e7, k3=1e4):
    y1, y2, y3 = y
    return [
        [-k1, k3 * y3, k3 * y2],
        [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2],
        [0.0, 2 * k2 * y2, 0.0],
    ]


MU = 1000.0


def vdp(t, y):
    return [y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]]


def vdp_jac(t, y):
    return [[0.0, 1.0], [-2 * MU * y[0] * y[1] - 1.0, MU * (1 - y[0] ** 2)]]


def hires(t, y):
    y1, y2, y3, y4, y5, y6, y7, y8 = y
    r = 280.0 * y6 * y8
    return [
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        r - 1.81 * y7,
        -r + 1.81 * y7,
    ]


def orego(t, y):
    y1, y2, y3 = y
    return [
        77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
        (y3 - (1 + y1) * y2) / 77.27,
        0.161 * (y1 - y3),
    ]


def vdpol(t, y):  # the test set's scaled form: eps = 1e-6 (mu = 1e3 in time t/mu)
    return [y[1], ((1 - y[0] ** 2) * y[1] - y[0]) / 1e-6]


# The IVP Test Set's published reference solutions at the end time (Mazzia & Magherini, "Test Set
# for Initial Value Problem Solvers", release 2.4, Univ. Bari; problems HIRES, OREGO, ROBER, VDPOL).
IVP_TESTSET = {
    "hires": (
        hires,
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057],
        321.8122,
        1e-14,
        [
            0.7371312573325668e-3,
            0.1442485726316185e-3,
            0.5888729740967575e-4,
            0.1175651343283149e-2,
            0.2386356198831331e-2,
            0.6238968252742796e-2,
            0.2849998395185769e-2,
            0.2850001604814231e-2,
        ],
    ),
    "orego": (
        orego,
        [1.0, 2.0, 3.0],
        360.0,
        1e-12,
        [0.1000814870318523e1, 0.1228178521549917e4, 0.1320554942846706e3],
    ),
    "rober": (
        robertson,
        [1.0, 0.0, 0.0],
        1e11,
        1e-22,
        [0.2083340149701255e-7, 0.8333360770334713e-13, 0.9999999791665050],
    ),
    "vdpol": (vdpol, [2.0, 0.0], 2.0, 1e-12, [0.1706167732170483e1, -0.8928097010247975]),
}


def ivp_testset():
    """The published values, each with scipy Radau at rtol 1e-12 beside it (the test checks that
    they agree)."""
    out = {}
    for name, (f, y0, t_end, atol, y_end) in IVP_TESTSET.items():
        t0 = time.time()
        s = solve_ivp(f, (0.0, t_end), y0, method="Radau", rtol=1e-12, atol=atol)
        assert s.success, (name, s.message)
        out[name] = {
            "y0": y0,
            "t_end": t_end,
            "y_end": y_end,
            "radau_1e-12": s.y[:, -1].tolist(),
            "radau_atol": atol,
            "seconds": round(time.time() - t0, 2),
        }
        print(name, out[name]["seconds"], "s")
    return out


def main():
    refs = {"generator": "scipy.integrate.solve_ivp Radau", "scipy": scipy.__version__}
    t = [0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
    t0 = time.time()
    s = solve_ivp(
        robertson,
        (0.0, t[-1]),
        [1.0, 0.0, 0.0],
        method="Radau",
        rtol=1e-12,
        atol=1e-20,
        jac=robertson_jac,
        t_eval=t,
    )
    assert s.success, s.message
    refs["robertson"] = {
        "k": [0.04, 3e7, 1e4],
        "y0": [1.0, 0.0, 0.0],
        "t": t,
        "y": s.y.T.tolist(),
        "rtol": 1e-12,
        "atol": 1e-20,
        "nsteps": int(s.t.size),
        "seconds": round(time.time() - t0, 2),
    }
    t = [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0]
    t0 = time.time()
    s = solve_ivp(
        vdp, (0.0, t[-1]), [2.0, 0.0], method="Radau", rtol=1e-12, atol=1e-12, jac=vdp_jac, t_eval=t
    )
    assert s.success, s.message
    refs["vanderpol"] = {
        "mu": MU,
        "y0": [2.0, 0.0],
        "t": t,
        "y": s.y.T.tolist(),
        "rtol": 1e-12,
        "atol": 1e-12,
        "seconds": round(time.time() - t0, 2),
    }
    refs["ivp_testset"] = ivp_testset()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(refs, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
