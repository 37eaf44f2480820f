"""Solve a captured SteadyStateAdjoint system (I − J)ᵀ g = v with three GMRES versions.

Capture: run the cdeq-mnist repro with a hook on SteadyStateAdjoint.solve_adjoint that, on a
non-finite result, saves JT (B×n×n, column k = JT(e_k)) and v to a .pt file (see
notes/issue-18-note.md, Session 4). Usage:

    PYTHONPATH=$PWD python notes/issue-18-nan-compare.py SYSTEM.pt OLDPKG_ROOT

OLDPKG_ROOT: a scratch copy of main (``git -C /work/main archive HEAD | tar -x -C DIR``); the
a8cbd50 GMRES is read with ``git show a8cbd50:pyneuralode/sensitivity/implicit.py``.
"""

import importlib.util
import math
import subprocess
import sys
import types

import torch


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(path, oldpkg):
    d = torch.load(path)
    JT, v, B = d["JT"], d["v"], d["batch"]
    A64 = torch.eye(JT.shape[1], dtype=torch.float64) - JT.double()
    exact = torch.linalg.solve(A64, v.reshape(B, -1).double())
    rtol = math.sqrt(torch.finfo(v.dtype).eps)

    def mv(g):
        gg = g.reshape(B, -1)
        return (gg - torch.einsum("bij,bj->bi", JT, gg)).reshape(g.shape)

    def report(name, x, converged, its, res):
        x = x.reshape(B, -1)
        bad = (~torch.isfinite(x).all(1)).nonzero().flatten().tolist()
        rel = ((x.double() - exact).norm(dim=1) / exact.norm(dim=1)).nan_to_num(math.inf)
        print(
            f"{name:28s} converged={converged!s:5s} its={its:3d} residual={res:.3g} "
            f"non-finite samples={bad} max rel. error (finite samples)="
            f"{float(rel[torch.isfinite(rel)].max()):.2g}"
        )

    vs = v.reshape(B, -1)
    tiny = [i for i in range(B) if float(vs[i].norm()) == 0.0 and bool(vs[i].any())]
    print(
        f"{B} systems of size {JT.shape[1]} ({v.dtype}); samples whose float32 ‖v‖ underflows "
        f"to 0 with v ≠ 0: {tiny} (max|v| {[float(vs[i].abs().max()) for i in tiny]})"
    )
    new = importlib.import_module("pyneuralode.solvers.linear.gmres")
    r = new.gmres(mv, v, rtol=rtol, restart=50, maxiter=200, batch=B)
    report("this branch", r.x, r.converged, r.iterations, r.residual)
    main_g = load_module("main_gmres", f"{oldpkg}/pyneuralode/solvers/linear/gmres.py")
    r = main_g.gmres(mv, v, rtol=rtol, restart=50, maxiter=200, batch=B)
    report("main (shared GMRES)", r.x, r.converged, r.iterations, r.residual)
    src = subprocess.run(
        ["git", "show", "a8cbd50:pyneuralode/sensitivity/implicit.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    start = src.index("def gmres(")
    end = src.index("\ndef ", start + 10)
    old = types.ModuleType("old_gmres")
    exec(
        "import math\nfrom typing import Callable, Optional\nimport torch\n" + src[start:end],
        old.__dict__,
    )
    x, its, res, ok = old.gmres(mv, v, tol=0.0, rtol=rtol, restart=50, max_iters=200, batch=B)
    report("a8cbd50 (implicit.py GMRES)", x, ok, its, res)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
