"""Where the time of one small compiled solve goes (session 4 of issue 19): Lotka–Volterra,
Tsit5, rtol 1e-6, 11 outputs (92 steps), grad mode off. Wall µs, best of 400 calls each, parts
timed separately.

    PYTHONPATH=$PWD nice -n 10 python notes/issue-19-call-overhead.py
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from compiled import lv  # noqa: E402

import pyneuralode as pn  # noqa: E402
from pyneuralode import _solve  # noqa: E402
from pyneuralode._problem import ODEProblem  # noqa: E402
from pyneuralode.compiled import _driver  # noqa: E402

torch.set_num_threads(1)
torch.set_grad_enabled(False)
F = dict(dtype=torch.float64)
p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F)
y0 = torch.tensor([1.0, 1.0], **F)
t = torch.linspace(0, 10, 11, **F)
s = pn.Tsit5()


def best(fn, n=400):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e6


def full():
    return pn.solve(lv, y0, t, s, compile=True, args=(p,), rtol=1e-6, atol=1e-9)


full()
prob = ODEProblem(lv, y0, t, args=(p,), rtol=1e-6, atol=1e-9)
steps = _solve.StepSettings(None, True, 100000, None, None, None)
opts = _solve.options_for(prob, s, steps, dense=True, progress=False)
built, _ = _driver._problem_module(prob, "erk", prob.args)
mod, _ = _driver._method_module(s, "erk")
ua = [np.ascontiguousarray(p.numpy())]
y0n = y0.numpy()
tol = _driver._tol_array(1e-6, 2), _driver._tol_array(1e-9, 2)
ca = _driver.loop_arguments(prob, s, opts, "erk", built, mod, y0n, *tol, ua)
ep = _driver.entry_point(mod.solve)
out = ep(*ca)
ca_one = list(ca)
ca_one[0] = np.array([0.0, 1e-9])  # one step: the call's own cost
rows = [
    ("pn.solve(..., compile=True), the whole call", best(full)),
    ("  ODEProblem(...) (input validation)", best(lambda: ODEProblem(lv, y0, t, args=(p,)))),
    (
        "  options_for(...) (option validation)",
        best(lambda: _solve.options_for(prob, s, steps, dense=True, progress=False)),
    ),
    (
        "  compiled.solve_compiled(problem, ...) (driver + numba call)",
        best(lambda: _driver.solve_plain(prob, s, opts, "erk", throw=True)),
    ),
    (
        "    loop_arguments(...)",
        best(lambda: _driver.loop_arguments(prob, s, opts, "erk", built, mod, y0n, *tol, ua)),
    ),
    ("    the numba call (92 steps)", best(lambda: ep(*ca))),
    ("    the numba call, 1 step", best(lambda: ep(*ca_one))),
    (
        "    package(...) (the Solution)",
        best(lambda: _driver.package(prob, s, opts, "erk", mod, ca, out, {}, True)),
    ),
]
for name, us in rows:
    print(f"{name:64s} {us:7.1f} µs")
