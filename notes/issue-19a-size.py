"""First-call cost of compiled forward sensitivities by size (issue 19, part A).

    PYNEURALODE_CACHE_DIR=$(mktemp -d) PYTHONPATH=$PWD python notes/issue-19a-size.py N_STATES N_P
    METHOD

f = A y − 0.1 y³ + Σp²·tanh y with y0 and p requiring grad: m = N_STATES + N_P sensitivity columns.
Prints the trace time of the augmented system, its generated lines and the first call's CPU time.
"""

import sys
import time

import torch

import pyneuralode as pn
import pyneuralode.compiled._trace as tr

F64 = dict(dtype=torch.float64)
n, mp, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
A = torch.randn(n, n, **F64, generator=torch.Generator().manual_seed(0)) * 0.3 - 2 * torch.eye(
    n, **F64
)
p = torch.full((mp,), 0.1, **F64, requires_grad=True)


def f(t, y, p):
    return A @ y - 0.1 * y**3 + (p * p).sum() * torch.tanh(y)


orig = tr.trace_rhs


def timed(*a, **k):
    t0 = time.process_time()
    r = orig(*a, **k)
    print("trace+translate CPU", time.process_time() - t0, "lines", r[0].count("\n"), flush=True)
    return r


tr.trace_rhs = timed
y0 = torch.ones(n, **F64, requires_grad=True)
t0c, t0w = time.process_time(), time.time()
s = pn.solve(f, y0, torch.tensor([0.0, 1.0], **F64), getattr(pn, method)(), args=(p,), compile=True)
print(
    "n",
    n,
    "m",
    n + mp,
    "N",
    n * (1 + n + mp),
    "first call CPU",
    time.process_time() - t0c,
    "wall",
    time.time() - t0w,
    s.stats,
)
