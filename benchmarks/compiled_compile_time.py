"""Compile time of the compiled path (``solve(..., compile=True)``), in process CPU seconds.

Three cases, each in fresh processes sharing one new numba cache directory:

1. cold: nothing on disk: the first solve compiles the method module (once per method and machine)
   and the problem module (once per f);
2. new f: the method modules are on disk, f is new (numba's runtime already set up by a solve whose
   modules are on disk);
3. warm: everything on disk.

    python benchmarks/compiled_compile_time.py [Tsit5 Rodas5P KenCarp4 QNDF]

The explicit methods solve Lotka–Volterra, the implicit ones Robertson (f and its Jacobian).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def child(variant: float, warm: bool, methods):
    import torch

    torch.set_num_threads(1)
    import numba  # noqa: F401  (its import is not part of the figures)

    import pyneuralode as pn

    F = dict(dtype=torch.float64)

    def lv(t, y, p):  # variant: a term that makes each case's f new to the cache
        return torch.stack(
            [p[0] * y[0] - p[1] * y[0] * y[1], -p[2] * y[1] + p[3] * y[0] * y[1] + variant * y[0]]
        )

    def rober(t, y, k):
        return torch.stack(
            [
                -k[0] * y[0] + k[2] * y[1] * y[2],
                k[0] * y[0] - k[1] * y[1] ** 2 - k[2] * y[1] * y[2],
                k[1] * y[1] ** 2 + variant * y[0],
            ]
        )

    p = (torch.tensor([1.5, 1.0, 3.0, 1.0], **F),)
    k = (torch.tensor([0.04, 3e7, 1e4], **F),)
    if warm:  # set up numba's runtime with modules already on disk
        pn.solve(
            lambda t, y, p: lv(t, y, p) * 0 + lv(t, y, p),
            torch.ones(2, **F),
            torch.tensor([0.0, 1.0], **F),
            pn.Tsit5(),
            args=p,
            compile=True,
        )
    for m in methods:
        explicit = m in ("Tsit5", "Dopri5", "Vern7", "DP8", "BS3")
        f, y0, t_end, args = (lv, [1.0, 1.0], 10.0, p) if explicit else (rober, [1.0, 0, 0], 1e5, k)
        c0 = time.process_time()
        pn.solve(
            f,
            torch.tensor(y0, **F),
            torch.tensor([0.0, t_end], **F),
            getattr(pn, m)(),
            args=args,
            rtol=1e-6,
            atol=1e-9,
            compile=True,
        )
        print(f"{m}: {time.process_time() - c0:.2f}", flush=True)


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:])
    methods = sys.argv[1:] or ["Tsit5", "Rodas5P", "KenCarp4", "QNDF"]
    env = dict(
        os.environ, PYNEURALODE_CACHE_DIR=tempfile.mkdtemp(prefix="pn_cc_"), OMP_NUM_THREADS="1"
    )
    for label, variant, warm in (("cold", 0.0, False), ("new f", 1e-9, True), ("warm", 1e-9, True)):
        out = subprocess.run(
            [sys.executable, __file__, "--child", repr(variant), str(int(warm)), *methods],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(f"{label}: " + ", ".join(out.split("\n")[:-1]) + " (CPU s)", flush=True)


if __name__ == "__main__":
    main()
