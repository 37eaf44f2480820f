"""In-process A/B of the batched stiff solve (1000 Robertson systems, Rodas5P(batched=True),
rtol 1e-7): the old package (a copy of its pyneuralode imported as `pno`, as for
notes/issue-18-bench-ab.py) against this tree's, alternating, process CPU time, best of 4.
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python notes/issue-18-batched-ab.py /tmp/oldpkg"""

import os
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import pno
import stiff as S

import pyneuralode as pn

torch.set_num_threads(1)
Kb, y0, T = S.batched_problem(1000)
Kt = torch.tensor(Kb)

f = S.rober_rows  # the batched benchmark's f


def run(mod):
    s = mod.Rodas5P(batched=True)
    t0 = time.process_time()
    with torch.no_grad():
        sol = mod.solve(
            f, torch.tensor(y0), [0.0, T], s, rtol=1e-7, atol=1e-11, args=(Kt,), max_steps=10**6
        )
    return time.process_time() - t0, sol.stats["naccept"]


for m in (pno, pn):
    run(m)
res = {"old": [], "new": []}
for _ in range(4):
    for name, m in (("old", pno), ("new", pn)):
        res[name].append(run(m))
print({k: (round(min(x[0] for x in v), 3), v[0][1]) for k, v in res.items()})
