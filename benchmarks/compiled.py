"""The compiled path (``solve(..., compile=True)``) against the native engine and scipy, side by side.

Lotka–Volterra with Tsit5 and Vern7 (scipy: RK45), Robertson, Van der Pol (μ = 1000), HIRES and
OREGO with Rodas5P, KenCarp4 and Kvaerno5 (scipy: Radau with its finite-difference Jacobian), at
equal tolerances, all on one thread, alternately, best of ``--repeat`` runs. Reports the compile
(or disk-cache load) time of the first call in the process, the time per solve and per accepted
step, the ratios, and the error against a tight reference (scipy Radau / DOP853 at rtol 1e-12;
HIRES and OREGO: the IVP Test Set's published values in ``tests/data/stiff_references.json``).

    python benchmarks/compiled.py            # rtol 1e-6 and 1e-8; 5 repeats
    python benchmarks/compiled.py --quick    # rtol 1e-6; 2 repeats; shorter Van der Pol span
    python benchmarks/compiled.py --fresh    # a new numba cache directory: report the cold compile time

Writes ``benchmarks/results/compiled.md`` (the title says when it was a ``--quick`` run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def lv(t, y, p):
    return torch.stack([p[0] * y[0] - p[1] * y[0] * y[1], -p[2] * y[1] + p[3] * y[0] * y[1]])


def rober(t, y, k):
    return torch.stack(
        [
            -k[0] * y[0] + k[2] * y[1] * y[2],
            k[0] * y[0] - k[1] * y[1] ** 2 - k[2] * y[1] * y[2],
            k[1] * y[1] ** 2,
        ]
    )


def vdp(t, y):
    return torch.stack([y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]])


def hires(t, y):
    y1, y2, y3, y4, y5, y6, y7, y8 = y.unbind(-1)
    r = 280.0 * y6 * y8
    return torch.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            r - 1.81 * y7,
            -r + 1.81 * y7,
        ],
        -1,
    )


def orego(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack(
        [
            77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
            (y3 - (1 + y1) * y2) / 77.27,
            0.161 * (y1 - y3),
        ],
        -1,
    )


def np_hires(t, y):
    y1, y2, y3, y4, y5, y6, y7, y8 = y
    r = 280.0 * y6 * y8
    return [
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        r - 1.81 * y7,
        -r + 1.81 * y7,
    ]


def np_orego(t, y):
    y1, y2, y3 = y
    return [
        77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
        (y3 - (1 + y1) * y2) / 77.27,
        0.161 * (y1 - y3),
    ]


def np_lv(t, y):
    return [1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]]


def np_rober(t, y):
    return [
        -0.04 * y[0] + 1e4 * y[1] * y[2],
        0.04 * y[0] - 3e7 * y[1] ** 2 - 1e4 * y[1] * y[2],
        3e7 * y[1] ** 2,
    ]


def np_vdp(t, y):
    return [y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]]


def best(fn, repeat):
    out, ts = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    a = ap.parse_args()
    if a.fresh:
        os.environ["PYNEURALODE_CACHE_DIR"] = tempfile.mkdtemp(prefix="pn_compiled_")
    torch.set_num_threads(1)
    import pyneuralode as pn
    from scipy.integrate import solve_ivp

    repeat = a.repeat or (2 if a.quick else 5)
    rtols = [1e-6] if a.quick else [1e-6, 1e-8]
    F = dict(dtype=torch.float64)
    vdp_end = 500.0 if a.quick else 3000.0
    STIFF = ("Rodas5P", "KenCarp4", "Kvaerno5")
    refs = json.loads((HERE.parent / "tests" / "data" / "stiff_references.json").read_text())
    IVP = {k: (v["y0"], v["t_end"], v["y_end"]) for k, v in refs["ivp_testset"].items()}
    problems = [
        (
            "Lotka–Volterra",
            lv,
            np_lv,
            [1.0, 1.0],
            10.0,
            (torch.tensor([1.5, 1.0, 3.0, 1.0], **F),),
            ("Tsit5", "Vern7"),
            "RK45",
            None,
        ),
        (
            "Robertson (t=1e5)",
            rober,
            np_rober,
            [1.0, 0.0, 0.0],
            1e5,
            (torch.tensor([0.04, 3e7, 1e4], **F),),
            STIFF,
            "Radau",
            None,
        ),
        (
            f"Van der Pol μ=1e3 (t={vdp_end:g})",
            vdp,
            np_vdp,
            [2.0, 0.0],
            vdp_end,
            (),
            STIFF,
            "Radau",
            None,
        ),
        ("HIRES", hires, np_hires, *IVP["hires"][:2], (), STIFF, "Radau", IVP["hires"][2]),
        ("OREGO", orego, np_orego, *IVP["orego"][:2], (), STIFF, "Radau", IVP["orego"][2]),
    ]
    rows = []
    for name, f, fnp, y0l, t_end, args, methods, sp, ref in problems:
        y0 = torch.tensor(y0l, **F)
        t = torch.tensor([0.0, t_end], **F)
        if ref is None:
            ref = solve_ivp(
                fnp,
                (0, t_end),
                y0l,
                method="Radau" if sp == "Radau" else "DOP853",
                rtol=1e-12,
                atol=1e-14,
            ).y[:, -1]
        ref = np.asarray(ref)
        for rtol, method in [(r, m) for r in rtols for m in methods]:
            kw = dict(args=args, rtol=rtol, atol=rtol * 1e-3)
            solver = getattr(pn, method)()
            sol_c = pn.solve(f, y0, t, solver, compile=True, **kw)  # first call: compile or load
            first = sol_c.stats.get("compile_s", float("nan"))
            with torch.no_grad():
                tc, sol_c = best(
                    lambda f=f, y0=y0, t=t, solver=solver, kw=kw: pn.solve(
                        f, y0, t, solver, compile=True, **kw
                    ),
                    repeat,
                )
                tn, sol_n = best(
                    lambda f=f, y0=y0, t=t, solver=solver, kw=kw: pn.solve(f, y0, t, solver, **kw),
                    repeat,
                )
            ts, sol_s = best(
                lambda fnp=fnp, t_end=t_end, y0l=y0l, sp=sp, rtol=rtol: solve_ivp(
                    fnp, (0, t_end), y0l, method=sp, rtol=rtol, atol=rtol * 1e-3
                ),
                repeat,
            )
            err = lambda y, ref=ref, rtol=rtol: float(
                np.max(np.abs(np.asarray(y) - ref) / (np.abs(ref) + rtol * 1e-3))
            )  # noqa: E731
            rows.append(
                dict(
                    problem=name,
                    method=method,
                    scipy=sp,
                    rtol=rtol,
                    compile_s=first,
                    compiled_s=tc,
                    native_s=tn,
                    scipy_s=ts,
                    steps_c=sol_c.stats["naccept"],
                    steps_n=sol_n.stats["naccept"],
                    steps_s=len(sol_s.t) - 1,
                    err_c=err(sol_c.ys[-1].numpy()),
                    err_n=err(sol_n.ys[-1].numpy()),
                    err_s=err(sol_s.y[:, -1]),
                )
            )
            r = rows[-1]
            print(
                f"{name} {method} rtol={rtol:g}: compiled {tc * 1e3:.2f} ms ({r['steps_c']} steps), native "
                f"{tn * 1e3:.1f} ms, scipy {sp} {ts * 1e3:.1f} ms ({r['steps_s']} steps); first call {first:.2f} s",
                flush=True,
            )
    lines = [
        "# Compiled path vs native engine vs scipy" + (" (--quick)" if a.quick else ""),
        "",
        f"Command: `python benchmarks/compiled.py{' --quick' if a.quick else ''}{' --fresh' if a.fresh else ''}`; "
        f"1 thread, best of {repeat}; atol = rtol·1e-3; error = max relative error at the end against a "
        'scipy reference at rtol 1e-12 (HIRES, OREGO: the IVP Test Set published values). "first call": compile time of the first call in the process (numba; '
        "or the load from the disk cache when the module was compiled before"
        + (", here a fresh cache" if a.fresh else "")
        + ").",
        "",
        "| problem | method (scipy) | rtol | first call s | compiled ms | µs/step | native ms | µs/step | scipy ms |"
        " µs/step | native ÷ compiled | scipy ÷ compiled | steps c/n/s | error c/n/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['method']} ({r['scipy']}) | {r['rtol']:g} | {r['compile_s']:.2f} | "
            f"{r['compiled_s'] * 1e3:.3f} | {r['compiled_s'] / r['steps_c'] * 1e6:.2f} | {r['native_s'] * 1e3:.1f} | "
            f"{r['native_s'] / r['steps_n'] * 1e6:.0f} | {r['scipy_s'] * 1e3:.1f} | {r['scipy_s'] / r['steps_s'] * 1e6:.0f} | "
            f"{r['native_s'] / r['compiled_s']:.0f}× | {r['scipy_s'] / r['compiled_s']:.0f}× | "
            f"{r['steps_c']}/{r['steps_n']}/{r['steps_s']} | {r['err_c']:.1e}/{r['err_n']:.1e}/{r['err_s']:.1e} |"
        )
    out = HERE / "results" / "compiled.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
