"""In-process A/B of the stiff benchmark configurations: the old package (a copy of OLD_TREE's
pyneuralode imported as `pno`) and this tree's, alternating solve by solve in one process (same
load on both), process CPU time. Usage (from the repository root):
    cp -r /tmp/old18/pyneuralode /tmp/oldpkg/pno
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python notes/issue-18-bench-ab.py /tmp/oldpkg [reps]"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import pno
import stiff as S

import pyneuralode as pn

torch.set_num_threads(1)
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
print(
    f"{'config':22s} {'steps':>11s} {'old best':>9s} {'new best':>9s} {'ratio':>6s}  per-rep ratios"
)
for prob in ("robertson", "vanderpol"):
    p = S.PROBLEMS[prob]
    f = S.torch_rhs(prob)
    for name in ("Rodas5P", "Rodas4", "KenCarp4", "QNDF"):
        t = {"old": [], "new": []}
        steps = {}
        for rep in range(reps + 1):  # the first round warms up
            for tag, mod in (("old", pno), ("new", pn)):
                y0 = torch.tensor(p["y0"], dtype=torch.float64)
                c0 = time.process_time()
                with torch.no_grad():
                    sol = mod.solve(
                        f,
                        y0,
                        [0.0, p["T"]],
                        getattr(mod, name)(),
                        rtol=1e-6,
                        atol=1e-6 * p["atol_factor"],
                        max_steps=10**6,
                    )
                if rep:
                    t[tag].append(time.process_time() - c0)
                steps[tag] = sol.stats["naccept"] + sol.stats["nreject"]
        r = [b / a for a, b in zip(t["old"], t["new"])]
        print(
            f"{name + '/' + prob:22s} {steps['old']:>5d}/{steps['new']:<5d} {min(t['old']):9.3f} "
            f"{min(t['new']):9.3f} {min(t['new']) / min(t['old']):6.3f}  "
            + " ".join(f"{x:.2f}" for x in r)
            + f"  (median {statistics.median(r):.3f})"
        )
