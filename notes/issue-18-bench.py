"""Time Rodas5P, KenCarp4, QNDF on Robertson / Van der Pol (no_grad) and QNDF sparse on Brusselator
N=500. Prints JSON {config: (best CPU seconds of R in-process repeats, steps)}; CPU time because the
machine is shared. Run with PYTHONPATH=<tree>."""

import json
import os
import sys
import time

import torch

import pyneuralode as pn

torch.set_num_threads(1)
root = os.environ["PYTHONPATH"]
sys.path.insert(0, root + "/benchmarks")
import stiff as S  # noqa: E402 - needs the sys.path set-up above
import stiff_large as L  # noqa: E402 - needs the sys.path set-up above

R = int(sys.argv[1]) if len(sys.argv) > 1 else 3
out = {}
for prob in ("robertson", "vanderpol"):  # warm-up (first calls into torch), not timed
    p = S.PROBLEMS[prob]
    for name in ("Rodas5P", "KenCarp4", "QNDF"):
        with torch.no_grad():
            pn.solve(
                S.torch_rhs(prob),
                torch.tensor(p["y0"], dtype=torch.float64),
                [0.0, 1.0],
                getattr(pn, name)(),
                rtol=1e-6,
                atol=1e-6 * p["atol_factor"],
            )
for prob in ("robertson", "vanderpol"):
    p = S.PROBLEMS[prob]
    f = S.torch_rhs(prob)
    for name in ("Rodas5P", "KenCarp4", "QNDF"):
        best = 1e9
        for _ in range(R):
            t0 = time.process_time()
            with torch.no_grad():
                sol = pn.solve(
                    f,
                    torch.tensor(p["y0"], dtype=torch.float64),
                    [0.0, p["T"]],
                    getattr(pn, name)(),
                    rtol=1e-6,
                    atol=1e-6 * p["atol_factor"],
                    max_steps=10**6,
                )
            best = min(best, time.process_time() - t0)
        out[f"{name}/{prob}"] = (best, sol.stats["naccept"] + sol.stats["nreject"])
N = 500
fb, P = L.torch_rhs(N), L.sparsity(N)
y0 = torch.tensor(L.y0_of(N), dtype=torch.float64)
best = 1e9
for _ in range(max(1, R - 1)):
    t0 = time.process_time()
    with torch.no_grad():
        sol = pn.solve(
            fb, y0, [0.0, 10.0], pn.QNDF(linsolve="sparse", jac_sparsity=P), rtol=1e-6, atol=1e-6
        )
    best = min(best, time.process_time() - t0)
out["QNDF-sparse/bruss1000"] = (best, sol.stats["naccept"] + sol.stats["nreject"])
print(json.dumps(out))
