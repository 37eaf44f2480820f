"""Empirical convergence of every explicit method against an exact solution (float64).

Fixed steps: the fitted slope of log(error) against log(dt) must match the method's order
(within 0.3 for orders ≤ 4; within 0.5 for the high orders, whose step ranges are limited by
round-off below and by the pre-asymptotic regime above — Tsit5 in particular has tiny principal
error coefficients). Adaptive: the error tracks the tolerance from rtol = 1e-3 to 1e-10.
"""

import math

import numpy as np
import pytest
import torch

import pyneuralode as pn
from pyneuralode.solvers import explicit

T_END = 2.0
EXACT = math.exp(math.sin(T_END))


def f(t, y):  # y' = y cos t, y(0) = 1  ⇒  y = exp(sin t)
    return y * torch.cos(t)


Y0 = torch.tensor([1.0], dtype=torch.float64)
TS = torch.tensor([0.0, T_END], dtype=torch.float64)

# Numbers of fixed steps on [0, 2]: errors stay between ~1e-2 and ~1e-12 (above round-off).
STEPS = {
    "Euler": [50, 100, 200, 400],
    "Midpoint": [20, 40, 80, 160],
    "Heun": [20, 40, 80, 160],
    "RK4": [10, 20, 40, 80],
    "BS3": [10, 20, 40, 80],
    "Dopri5": [20, 28, 40, 56],
    "Tsit5": [28, 40, 56, 80],
    "Vern7": [8, 11, 16, 22],
    "DP8": [3, 4, 5, 6],
    "Heun3": [40, 80, 160, 320],  # pre-asymptotic below 40 steps on this problem
    "RK438": [10, 20, 40, 80],
    "Fehlberg2": [20, 40, 80, 160],
}


def test_every_explicit_method_has_a_convergence_case():
    assert set(STEPS) == set(explicit.__all__)


@pytest.mark.parametrize("name", list(STEPS))
def test_fixed_step_convergence_order(name):
    cls = getattr(pn, name)
    ns = STEPS[name]
    errs = []
    for n in ns:
        sol = pn.solve(f, Y0, TS, cls(), dt=T_END / n, adaptive=False)
        assert sol.retcode == "Success"
        assert sol.stats["naccept"] == n
        errs.append(abs(sol.ys[-1, 0].item() - EXACT))
    assert min(errs) > 1e-14, f"{name}: errors reach round-off {errs}; use larger steps"
    slope = np.polyfit(np.log(T_END / np.array(ns)), np.log(errs), 1)[0]
    order = cls().order
    tol = 0.3 if order <= 4 else 0.5
    assert abs(slope - order) < tol, (
        f"{name}: fitted order {slope:.2f}, expected {order} (errors {errs})"
    )


def test_fixed_step_nfe_counts():
    """Stages per step: s (FSAL reuses the last one; non-FSAL keeps f(t1, y1) for the next step)."""
    n = 10
    for cls, per_step in [
        (pn.Euler, 1),
        (pn.RK4, 4),
        (pn.BS3, 3),
        (pn.Dopri5, 6),
        (pn.Tsit5, 6),
        (pn.Vern7, 10),
        (pn.DP8, 12),
    ]:
        sol = pn.solve(f, Y0, TS, cls(), dt=T_END / n, adaptive=False)
        assert sol.stats["nfe"] == 1 + n * per_step, cls.__name__


ADAPTIVE_RTOLS = {
    "Midpoint": [1e-3, 1e-4, 1e-5, 1e-6],
    "Heun": [1e-3, 1e-4, 1e-5, 1e-6],
    "BS3": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8],
    "Dopri5": [10.0**-k for k in range(3, 11)],
    "Tsit5": [10.0**-k for k in range(3, 11)],
    "Vern7": [10.0**-k for k in range(3, 11)],
    "DP8": [10.0**-k for k in range(3, 11)],
}


@pytest.mark.parametrize("name", list(ADAPTIVE_RTOLS))
def test_adaptive_error_tracks_tolerance(name):
    cls = getattr(pn, name)
    rtols = ADAPTIVE_RTOLS[name]
    errs, nfes = [], []
    for r in rtols:
        sol = pn.solve(f, Y0, TS, cls(), rtol=r, atol=r)
        assert sol.retcode == "Success"
        errs.append(abs(sol.ys[-1, 0].item() - EXACT))
        nfes.append(sol.stats["nfe"])
    for r, e in zip(rtols, errs):
        assert e < 10 * r, f"{name}: error {e:.2e} at rtol={r:.0e}"
    # Roughly proportional: the fitted slope of log(err) vs log(rtol) is near 1 ...
    slope = np.polyfit(np.log(rtols), np.log(errs), 1)[0]
    assert 0.6 < slope < 1.3, f"{name}: error ∝ rtol^{slope:.2f} ({errs})"
    # ... a 100× tighter tolerance always gives a smaller error, and costs more evaluations.
    assert all(errs[i + 2] < errs[i] for i in range(len(errs) - 2)), errs
    assert all(b >= a for a, b in zip(nfes, nfes[1:])), nfes
    assert nfes[-1] > nfes[0]


def test_high_order_methods_are_cheaper_at_tight_tolerance():
    nfe = {}
    for cls in (pn.BS3, pn.Tsit5, pn.DP8):
        nfe[cls.__name__] = pn.solve(f, Y0, TS, cls(), rtol=1e-10, atol=1e-10).stats["nfe"]
    assert nfe["DP8"] < nfe["Tsit5"] < nfe["BS3"], nfe
