"""Compute the stored high-accuracy references of the stiff-solver tests (run once; output committed).

    python benchmarks/make_stiff_references.py   # writes tests/data/stiff_references.json

scipy ``solve_ivp(method="Radau")`` at rtol = 1e-12 (Robertson: atol = 1e-20 on the tiny y2;
Van der Pol: atol = 1e-12). Output times are hit by Radau's dense output.
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
    return [[-k1, k3 * y3, k3 * y2], [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2], [0.0, 2 * k2 * y2, 0.0]]


MU = 1000.0


def vdp(t, y):
    return [y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]]


def vdp_jac(t, y):
    return [[0.0, 1.0], [-2 * MU * y[0] * y[1] - 1.0, MU * (1 - y[0] ** 2)]]


def main():
    refs = {"generator": "scipy.integrate.solve_ivp Radau", "scipy": scipy.__version__}
    t = [0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
    t0 = time.time()
    s = solve_ivp(robertson, (0.0, t[-1]), [1.0, 0.0, 0.0], method="Radau", rtol=1e-12, atol=1e-20, jac=robertson_jac, t_eval=t)
    assert s.success, s.message
    refs["robertson"] = {"k": [0.04, 3e7, 1e4], "y0": [1.0, 0.0, 0.0], "t": t, "y": s.y.T.tolist(), "rtol": 1e-12, "atol": 1e-20,
                         "nsteps": int(s.t.size), "seconds": round(time.time() - t0, 2)}
    t = [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0]
    t0 = time.time()
    s = solve_ivp(vdp, (0.0, t[-1]), [2.0, 0.0], method="Radau", rtol=1e-12, atol=1e-12, jac=vdp_jac, t_eval=t)
    assert s.success, s.message
    refs["vanderpol"] = {"mu": MU, "y0": [2.0, 0.0], "t": t, "y": s.y.T.tolist(), "rtol": 1e-12, "atol": 1e-12,
                         "seconds": round(time.time() - t0, 2)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(refs, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
