"""Stiff problems of the IVP Test Set (Mazzia & Magherini, Bari) with every stiff solver.

HIRES, OREGO, ROBER (to t = 1e11) and VDPOL (Van der Pol, eps = 1e-6, i.e. mu = 1e3 in scaled
time) at the test set's tolerance scaling (atol = rtol; ROBER: a small atol for y2 ~ 1e-5),
checked against the published reference solutions at the end time (stored in
``tests/data/stiff_references.json`` and cross-checked there against scipy Radau at rtol 1e-12 by
``benchmarks/make_stiff_references.py``). The error is measured in the mixed norm of the
tolerances, max |y - y_ref| / (atol + rtol |y_ref|): a global error a modest multiple of the local
tolerance, not a fixed digit count. The CI runs use tolerances loose enough to stay fast (ROBER to
1e11 at rtol 1e-6 with the higher-order methods); the full table at rtol = 1e-6 is
``python tests/test_ivp_testset.py 1e-6``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyneuralode as pn

F64 = torch.float64
REFS = json.loads((Path(__file__).parent / "data" / "stiff_references.json").read_text())
REFS = REFS["ivp_testset"]

STIFF = [
    pn.Rosenbrock23,
    pn.Rodas4,
    pn.Rodas5P,
    pn.TRBDF2,
    pn.Kvaerno3,
    pn.Kvaerno5,
    pn.KenCarp4,
    pn.QNDF,
]


def hires(t, y):
    y1, y2, y3, y4, y5, y6, y7, y8 = y.unbind(-1)
    r = 280.0 * y6 * y8
    return torch.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            r - 1.81 * y7,
            -r + 1.81 * y7,
        ],
        -1,
    )


def orego(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack(
        [
            77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
            (y3 - (1 + y1) * y2) / 77.27,
            0.161 * (y1 - y3),
        ],
        -1,
    )


def rober(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack(
        [-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2], -1
    )


def vdpol(t, y):
    y1, y2 = y.unbind(-1)
    return torch.stack([y2, ((1 - y1 * y1) * y2 - y1) / 1e-6], -1)


PROBLEMS = {"hires": hires, "orego": orego, "rober": rober, "vdpol": vdpol}


def atol_for(name: str, rtol: float) -> float:
    """The test set's scaling: atol = rtol, except ROBER (y2 ~ 1e-5 needs atol far below it)."""
    return 1e-6 * rtol if name == "rober" else rtol


def run(name: str, S, rtol: float, atol: float | None = None):
    """(error in units of the tolerance, accepted + rejected steps) of one solve to the end time."""
    p = REFS[name]
    atol = atol_for(name, rtol) if atol is None else atol
    with torch.no_grad():
        sol = pn.solve(
            PROBLEMS[name],
            torch.tensor(p["y0"], dtype=F64),
            [0.0, p["t_end"]],
            S(),
            rtol=rtol,
            atol=atol,
            max_steps=200_000,
        )
    ref = np.asarray(p["y_end"])
    err = np.abs(sol.ys[-1].numpy() - ref) / (atol + rtol * np.abs(ref))
    return float(err.max()), sol.stats["naccept"] + sol.stats["nreject"]


def test_references_are_the_published_values_and_radau_agrees():
    for name, p in REFS.items():
        ref, radau = np.asarray(p["y_end"]), np.asarray(p["radau_1e-12"])
        assert np.all(np.abs(radau - ref) <= 1e-8 * np.abs(ref) + 1e-20), (name, radau, ref)


HIGH_ORDER = [pn.Rodas4, pn.Rodas5P, pn.Kvaerno5, pn.KenCarp4, pn.QNDF]


@pytest.mark.parametrize("S", STIFF, ids=lambda S: S.__name__)
def test_rober_to_1e11(S):
    """The reported failure: ``rtol=1e-6, atol=1e-12`` to t = 1e11 (the default dtmin once scaled
    with the span, 4·eps·1e11 ≈ 9e-5, and forbade the first steps). The order-2/3 methods, which
    need thousands of steps there, run at rtol 1e-4 (atol 1e-10) to keep the suite fast; the full
    rtol 1e-6 table is in the module's ``__main__``."""
    rtol = 1e-6 if S in HIGH_ORDER else 1e-4
    err, steps = run("rober", S, rtol)
    assert err <= 20.0, (err, steps)


#: bounds on the global error at the end time in units of the local tolerance, at rtol 1e-3
#: (measured maxima: HIRES ~23 (Rosenbrock23), OREGO ~110 (Rosenbrock23, TRBDF2), VDPOL ~8 (QNDF))
BOUND = {"hires": 100.0, "orego": 400.0, "vdpol": 50.0}


@pytest.mark.parametrize("name", ["hires", "orego", "vdpol"])
@pytest.mark.parametrize("S", STIFF, ids=lambda S: S.__name__)
def test_testset_problem(S, name):
    err, steps = run(name, S, 1e-3)
    assert err <= BOUND[name], (err, steps)


def test_implicit_euler_on_rober_and_hires():
    """First order: ImplicitEuler runs at rtol 1e-3 on ROBER and HIRES only; on OREGO and VDPOL
    it needs thousands of steps and its global error exceeds 50x the tolerance (a documented
    limit)."""
    for name in ("rober", "hires"):
        err, steps = run(name, pn.ImplicitEuler, 1e-3)
        assert err <= 50.0, (name, err, steps)


if __name__ == "__main__":  # the full table: python tests/test_ivp_testset.py [rtol]
    rtol = float(sys.argv[1]) if len(sys.argv) > 1 else 1e-6
    print(f"rtol={rtol:g}; error in units of atol + rtol|y_ref| at the end time")
    for name in PROBLEMS:
        for S in [*STIFF, pn.ImplicitEuler] if rtol >= 1e-4 else STIFF:
            t0 = time.perf_counter()
            try:
                err, steps = run(name, S, rtol)
                secs = time.perf_counter() - t0
                print(
                    f"{name:6s} {S.__name__:13s} err {err:9.3g}  steps {steps:6d}  {secs:6.2f} s",
                    flush=True,
                )
            except pn.SolveError as e:
                print(f"{name:6s} {S.__name__:13s} FAILED {e.retcode}: {str(e)[:120]}", flush=True)
