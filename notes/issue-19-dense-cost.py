"""The dense store's cost on a long explicit run (session 4 of issue 19): Lotka–Volterra, Tsit5,
rtol 1e-6, 101 outputs to t = 1000 (9101 steps), back-to-back calls (not alternating with other
solvers), process CPU time, best of 20, with the minor page faults per call.

    PYTHONPATH=$PWD nice -n 10 python notes/issue-19-dense-cost.py
"""

import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compiled import lv

import pyneuralode as pn

torch.set_num_threads(1)
torch.set_grad_enabled(False)
F = dict(dtype=torch.float64)
p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F)
y0 = torch.tensor([1.0, 1.0], **F)
t = torch.linspace(0, 1000, 101, **F)
s = pn.Tsit5()


def run(dense):
    return pn.solve(lv, y0, t, s, compile=True, args=(p,), rtol=1e-6, atol=1e-9, dense=dense)


run(True)
run(False)
for dense in (True, False, True, False):
    ts = []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a = time.process_time()
        sol = run(dense)
        ts.append(time.process_time() - a)
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(dense, round(min(ts) * 1e3, 2), "ms", (f1 - f0) / 20, "minor faults/call")
