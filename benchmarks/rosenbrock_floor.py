"""How far the library's Rosenbrock path is from a bare-bones loop (the engine-overhead floor).

The bare loop is Rodas5P written out in ~50 lines: the same tableau, its stages on Python floats
(no arrays, W⁻¹ in closed form), the same predictive step-size
controller and error norm, and the same torch right-hand side and Jacobian (vectorised f and
analytic jac of ``benchmarks/stiff.py``), but no validation, statistics, dense output, events or
output times. Both solve Van der Pol (μ = 1000, t = 3000) under ``torch.no_grad()`` on 1 thread,
alternately, best of ``--repeat`` runs each; the table gives time per step and the library ÷ bare
ratio. Also: the time per call of f and jac alone, which bounds any engine from below.

    python benchmarks/rosenbrock_floor.py            # rtol 1e-5, 1e-6, 1e-7; 7 repeats
    python benchmarks/rosenbrock_floor.py --quick    # rtol 1e-4; 2 repeats (seconds)

Writes ``benchmarks/results/rosenbrock_floor.md`` (``rosenbrock_floor_quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stiff as S  # noqa: E402  (the problems, references and torch right-hand sides)

import pyneuralode as pn  # noqa: E402
from pyneuralode.solvers.linear import closed_form_inverse  # noqa: E402


def rosenbrock_stages(tab, rhs, t, h, y, fy, M, tt):
    """One Rodas step on lists of floats: ``(y1, error)``; ``M = (I/(hγ) − J)⁻¹`` (autonomous f)."""
    n, s = len(y), tab.stages
    A, C, c, m, e = tab.A.tolist(), tab.C.tolist(), tab.c.tolist(), tab.m.tolist(), tab.e.tolist()
    U = []
    for i in range(s):
        if i == 0:
            r = fy
        else:
            u = [y[k] + sum(A[i][j] * U[j][k] for j in range(i)) for k in range(n)]
            F = rhs(t + c[i] * h, tt(u)).tolist()
            r = [F[k] + sum(C[i][j] * U[j][k] for j in range(i)) / h for k in range(n)]
        U.append([sum(M[k][q] * r[q] for q in range(n)) for k in range(n)])
    y1 = [y[k] + sum(m[j] * U[j][k] for j in range(s)) for k in range(n)]
    return y1, [sum(e[j] * U[j][k] for j in range(s)) for k in range(n)]


def bare_rodas5p(f, jac, y0, T, rtol, atol):
    """Rodas5P with the predictive controller in the plainest loop; returns (y(T), accepted,
    rejected).

    The stages on Python floats (:func:`rosenbrock_stages`), W⁻¹ in closed form."""
    tab = pn.Rodas5P().tableau
    q, ctrl = min(tab.order, tab.error_order) + 1, pn.PredictiveController()
    from_numpy = torch.from_numpy

    def tt(x):
        return from_numpy(np.array(x))

    def rhs(t, y):
        return f(tt(t), y)

    y, t = [float(v) for v in y0], 0.0
    n = len(y)
    # a small first step (the library picks Hairer's initial step; the controller takes over at
    # once)
    h = 1e-6
    naccept = nreject = 0
    err_prev, h_accepted, accepted_last = 1.0, None, True
    fy, J = f(tt(t), tt(y)).tolist(), jac(tt(t), tt(y)).tolist()
    while t < T:
        last = h >= 0.999 * (T - t)
        if last:
            h = T - t
        M = closed_form_inverse(J, 1.0 / (h * tab.gamma))
        y1, e = rosenbrock_stages(tab, rhs, t, h, y, fy, M, tt)
        err = math.sqrt(
            sum((ek / (atol + rtol * max(abs(a), abs(b)))) ** 2 for ek, a, b in zip(e, y, y1)) / n
        )
        if not err <= 1.0:
            nreject += 1
            h *= ctrl.factor(err if math.isfinite(err) else math.inf, err_prev, q, accepted_last)
            accepted_last = False
            continue
        fac = ctrl.factor(
            err, err_prev, q, accepted_last, None if h_accepted is None else h / h_accepted
        )
        err_prev, h_accepted, accepted_last = max(err, 1e-4), h, True
        t = T if last else t + h
        y = list(y1)
        naccept += 1
        yt = tt(y)
        fy, J = f(tt(t), yt).tolist(), jac(tt(t), yt).tolist()
        h *= fac
    return np.array(y), naccept, nreject


def library_rodas5p(f, jac, y0, T, rtol, atol):
    with torch.no_grad():
        sol = pn.solve(
            f,
            torch.tensor(y0, dtype=torch.float64),
            torch.tensor([0.0, T], dtype=torch.float64),
            pn.Rodas5P(jac=jac),
            rtol=rtol,
            atol=atol,
            max_steps=10**6,
        )
    return sol.ys[-1].numpy(), sol.stats["naccept"], sol.stats["nreject"]


def per_call_us(fn, *args, n=20000):
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="rtol 1e-4 only, 2 repeats")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rtols = [1e-4] if args.quick else [1e-5, 1e-6, 1e-7]
    repeat = args.repeat or (2 if args.quick else 7)
    p = S.PROBLEMS["vanderpol"]
    f, jac = S.torch_rhs("vanderpol", True), S.torch_jac("vanderpol", True)
    runs = {"bare loop": bare_rodas5p, "pn.Rodas5P": library_rodas5p}
    rows = []
    for rtol in rtols:
        best, out = {}, {}
        for _ in range(repeat):  # alternate: both see the same machine load
            for name, fn in runs.items():
                t0 = time.perf_counter()
                y, na, nr = fn(f, jac, p["y0"], p["T"], rtol, rtol)
                sec = time.perf_counter() - t0
                best[name] = min(best.get(name, math.inf), sec)
                out[name] = (S.rel_err(y, p["ref"]), na, nr)
        for name in runs:
            err, na, nr = out[name]
            rows.append(
                (
                    rtol,
                    name,
                    err,
                    na,
                    nr,
                    best[name],
                    best[name] / (na + nr) * 1e6,
                    best[name] / best["bare loop"],
                )
            )
            print(
                f"rtol {rtol:.0e} {name:11s} err {err:.1e} steps {na}+{nr} "
                f"{best[name] * 1e3:7.1f} ms",
                flush=True,
            )
    y = torch.tensor(p["y0"], dtype=torch.float64)
    t = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        f_us, jac_us = per_call_us(f, t, y), per_call_us(jac, t, y)
    with torch.inference_mode():
        yi, ti = y.clone(), t.clone()
        f_us_inf, jac_us_inf = per_call_us(f, ti, yi), per_call_us(jac, ti, yi)
    lines = [
        "# The Rosenbrock path against a bare-bones loop (engine-overhead floor)",
        "",
        f"Command: `python benchmarks/rosenbrock_floor.py{' --quick' if args.quick else ''}` "
        f"(torch {torch.__version__}, "
        f"1 thread, best of {repeat} alternating runs). Van der Pol, μ = 1000, t = 3000, atol = "
        "rtol; the "
        "vectorised torch f and analytic jac of `benchmarks/stiff.py`. The bare loop: the same "
        "tableau, stages "
        "on Python floats, W⁻¹ (closed form), predictive controller and error norm, nothing else.",
        "",
        "| rtol | solver | error | steps (accepted + rejected) | time | µs per step | ÷ bare loop "
        "|",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for rtol, name, err, na, nr, sec, us, ratio in rows:
        lines.append(
            f"| {rtol:.0e} | {name} | {err:.1e} | {na} + {nr} | {sec * 1e3:.1f} ms | {us:.0f} | "
            f"{ratio:.2f} |"
        )
    lines += [
        "",
        f"f alone: {f_us:.1f} µs per call; jac alone: {jac_us:.1f} µs per call. A Rodas5P step "
        "makes 8 f "
        f"calls and one jac call: {8 * f_us + jac_us:.0f} µs per step before any engine work. "
        "Under `torch.inference_mode()` (torch's context for pure inference; both loops above "
        "run under "
        f"`torch.no_grad()`): f {f_us_inf:.1f} µs, jac {jac_us_inf:.1f} µs, "
        f"{8 * f_us_inf + jac_us_inf:.0f} µs per step.",
    ]
    path = HERE / "results" / ("rosenbrock_floor_quick.md" if args.quick else "rosenbrock_floor.md")
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
