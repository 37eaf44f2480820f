"""cdeq-mnist repro with per-epoch adjoint statistics (hook on SteadyStateAdjoint.solve_adjoint).

Usage: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python notes/issue-18-adjoint-stats.py repro cdeq-mnist ...
(T18_NB = batches per epoch, default 1875 for 60k images at batch 32)."""

import math
import sys
import time

import torch

import pyneuralode.sensitivity.implicit as imp

NB = int(__import__("os").environ.get("T18_NB", "1875"))
orig = imp.SteadyStateAdjoint.solve_adjoint
st = {"n": 0, "its": [], "nonok": 0, "nonfin": 0, "nfe": [], "res": []}


def patched(self, JT, v, info=None, batch=1):
    out = orig(self, JT, v, info, batch)
    g, iters, resid, ok = out
    st["n"] += 1
    st["its"].append(iters)
    st["res"].append(resid)
    st["nonok"] += 0 if ok else 1
    st["nonfin"] += 0 if bool(torch.isfinite(g).all()) and math.isfinite(resid) else 1
    st["nfe"].append(getattr(info, "nfe", float("nan")))
    if st["n"] % NB == 0:
        its = st["its"]
        print(
            f"[epoch {st['n'] // NB}] bwd its mean {sum(its) / len(its):.1f} max {max(its)} "
            f"nonconverged {st['nonok']} nonfinite {st['nonfin']} fwd nfe mean "
            f"{sum(st['nfe']) / len(st['nfe']):.1f} max resid {max(st['res']):.3g} "
            f"cpu {time.process_time():.0f}s wall {time.perf_counter():.0f}s",
            flush=True,
        )
        st.update(its=[], nonok=0, nonfin=0, nfe=[], res=[])
    return out


imp.SteadyStateAdjoint.solve_adjoint = patched
from pyneuralode.repro.cli import main  # noqa: E402 - after the hook is installed

sys.exit(main(sys.argv[1:]))
