"""A large stiff system: where the variable-order QNDF pays.

The 1-D Brusselator reaction–diffusion system of Hairer & Wanner (*Solving ODEs II*, IV.1,
"BRUSS"): u' = 1 + u²v − 4u + α u_xx, v' = 3u − u²v + α v_xx, α = 1/50, N interior grid points
on (0, 1) with u = 1, v = 3 at both ends, u(x, 0) = 1 + sin(2πx), v(x, 0) = 3, t ∈ [0, 10].
The state has 2N components; diffusion makes it stiff (eigenvalues down to about −4α(N+1)²).

Every native solver gets its Jacobian from torch (autograd) and the same rtol/atol: dense (the
default) and, in the ``linsolve='sparse'`` rows, on the Jacobian's sparsity pattern (one batched
vector–Jacobian product per row colour, SuperLU factorisations); scipy's BDF and Radau get the same
pattern (``jac_sparsity``), as a scipy user would give it. Errors are the largest relative error at
t = 10 against scipy Radau at rtol 1e-10. Solves run under ``torch.no_grad()``; the rows marked
``inference_mode`` under ``torch.inference_mode()``. One process, 1 thread, each configuration timed
``--repeat`` times (minimum).

    python benchmarks/stiff_large.py            # N = 500 (1000 states), rtol 1e-6
    python benchmarks/stiff_large.py --quick    # N = 100, one repeat (seconds)

Writes benchmarks/results/stiff_large.md (``stiff_large_quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import pyneuralode as pn

HERE = Path(__file__).resolve().parent
ALPHA = 1.0 / 50.0
T_END = 10.0


def torch_rhs(N):
    c = ALPHA * (N + 1) ** 2

    def f(t, y):
        u, v = y[:N], y[N:]
        up = torch.cat([u.new_ones(1), u, u.new_ones(1)])
        vp = torch.cat([v.new_full((1,), 3.0), v, v.new_full((1,), 3.0)])
        uuv = u * u * v
        du = 1.0 + uuv - 4.0 * u + c * (up[:-2] - 2.0 * u + up[2:])
        dv = 3.0 * u - uuv + c * (vp[:-2] - 2.0 * v + vp[2:])
        return torch.cat([du, dv])

    return f


def numpy_rhs(N):
    c = ALPHA * (N + 1) ** 2

    def f(t, y):
        u, v = y[:N], y[N:]
        up = np.concatenate([[1.0], u, [1.0]])
        vp = np.concatenate([[3.0], v, [3.0]])
        uuv = u * u * v
        return np.concatenate(
            [
                1.0 + uuv - 4.0 * u + c * (up[:-2] - 2.0 * u + up[2:]),
                3.0 * u - uuv + c * (vp[:-2] - 2.0 * v + vp[2:]),
            ]
        )

    return f


def sparsity(N):
    from scipy.sparse import bmat, diags

    tri = diags([1.0, 1.0, 1.0], [-1, 0, 1], shape=(N, N))
    dia = diags([1.0], [0], shape=(N, N))
    return bmat([[tri, dia], [dia, tri]]).tocsc()


def y0_of(N):
    x = np.arange(1, N + 1) / (N + 1)
    return np.concatenate([1.0 + np.sin(2 * np.pi * x), np.full(N, 3.0)])


def _grad_context(context):
    return {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]()


def run_native(solver, N, rtol, atol, context="no_grad"):
    f = torch_rhs(N)
    y0 = torch.tensor(y0_of(N), dtype=torch.float64)
    t0 = time.perf_counter()
    with _grad_context(context):
        sol = pn.solve(f, y0, [0.0, T_END], solver, rtol=rtol, atol=atol, max_steps=10**6)
    return time.perf_counter() - t0, sol.ys[-1].numpy(), dict(sol.stats)


def run_scipy(method, N, rtol, atol):
    from scipy.integrate import solve_ivp

    t0 = time.perf_counter()
    s = solve_ivp(
        numpy_rhs(N),
        (0.0, T_END),
        y0_of(N),
        method=method,
        rtol=rtol,
        atol=atol,
        jac_sparsity=sparsity(N),
    )
    sec = time.perf_counter() - t0
    if not s.success:
        raise RuntimeError(s.message)
    return (
        sec,
        s.y[:, -1],
        {"naccept": s.t.size - 1, "nfe": int(s.nfev), "njac": int(s.njev), "nlu": int(s.nlu)},
    )


def run_scipy_torch_f(method, N, rtol, atol, context="no_grad"):
    """scipy with the native rows' torch f wrapped for numpy (the same f cost as pn's)."""
    from scipy.integrate import solve_ivp

    f = torch_rhs(N)

    def fun(t, y):
        return f(torch.scalar_tensor(t, dtype=torch.float64), torch.from_numpy(y)).numpy()

    t0 = time.perf_counter()
    with _grad_context(context):
        s = solve_ivp(
            fun,
            (0.0, T_END),
            y0_of(N),
            method=method,
            rtol=rtol,
            atol=atol,
            jac_sparsity=sparsity(N),
        )
    sec = time.perf_counter() - t0
    if not s.success:
        raise RuntimeError(s.message)
    return (
        sec,
        s.y[:, -1],
        {"naccept": s.t.size - 1, "nfe": int(s.nfev), "njac": int(s.njev), "nlu": int(s.nlu)},
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 100, one repeat")
    ap.add_argument("--N", type=int, default=None)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    N = args.N or (100 if args.quick else 500)
    repeat = args.repeat or (1 if args.quick else 3)
    rtol = args.rtol
    atol = rtol * 1e-2
    from scipy.integrate import solve_ivp

    ref = solve_ivp(
        numpy_rhs(N),
        (0.0, T_END),
        y0_of(N),
        method="Radau",
        rtol=1e-10,
        atol=1e-12,
        jac_sparsity=sparsity(N),
    ).y[:, -1]
    P = sparsity(N)  # the native sparse rows get the same pattern as scipy
    configs = [
        ("pn.QNDF", lambda: run_native(pn.QNDF(), N, rtol, atol)),
        ("pn.QNDF (rtol ÷ 10)", lambda: run_native(pn.QNDF(), N, rtol / 10, atol / 10)),
        ("pn.Rodas5P", lambda: run_native(pn.Rodas5P(), N, rtol, atol)),
        ("pn.KenCarp4", lambda: run_native(pn.KenCarp4(), N, rtol, atol)),
        ("pn.Kvaerno5", lambda: run_native(pn.Kvaerno5(), N, rtol, atol)),
        (
            "pn.QNDF, linsolve='sparse'",
            lambda: run_native(pn.QNDF(linsolve="sparse", jac_sparsity=P), N, rtol, atol),
        ),
        (
            "pn.QNDF, linsolve='sparse' (rtol ÷ 10)",
            lambda: run_native(pn.QNDF(linsolve="sparse", jac_sparsity=P), N, rtol / 10, atol / 10),
        ),
        (
            "pn.QNDF, linsolve='sparse', inference_mode",
            lambda: run_native(
                pn.QNDF(linsolve="sparse", jac_sparsity=P), N, rtol, atol, "inference_mode"
            ),
        ),
        (
            "pn.KenCarp4, linsolve='sparse'",
            lambda: run_native(pn.KenCarp4(linsolve="sparse", jac_sparsity=P), N, rtol, atol),
        ),
        (
            "pn.Rodas5P, linsolve='sparse'",
            lambda: run_native(pn.Rodas5P(linsolve="sparse", jac_sparsity=P), N, rtol, atol),
        ),
        ("scipy BDF (jac_sparsity)", lambda: run_scipy("BDF", N, rtol, atol)),
        ("scipy Radau (jac_sparsity)", lambda: run_scipy("Radau", N, rtol, atol)),
        ("scipy BDF (jac_sparsity, pn's torch f)", lambda: run_scipy_torch_f("BDF", N, rtol, atol)),
        (
            "scipy BDF (jac_sparsity, pn's torch f, inference_mode)",
            lambda: run_scipy_torch_f("BDF", N, rtol, atol, "inference_mode"),
        ),
    ]
    for _name, run in configs:  # warm-up (first-call costs of torch.func and scipy), not timed
        run()
    rows = {}
    for _r in range(repeat):  # round robin: background load hits every configuration alike
        for name, run in configs:
            sec, y, st = run()
            err = float(np.max(np.abs(y - ref) / np.abs(ref)))
            if name not in rows or sec < rows[name][0]:
                rows[name] = (sec, err, st)
            print(f"{name:28s} {sec * 1e3:9.1f} ms  err {err:.1e}  {st}", flush=True)
    base = rows["pn.QNDF"][0]
    lines = [
        "# A large stiff system: 1-D Brusselator",
        "",
        f"Command: `python benchmarks/stiff_large.py{' --quick' if args.quick else ''}` (torch "
        f"{torch.__version__}, 1 thread, "
        f"minimum of {repeat} round-robin repeat(s) after one untimed warm-up)",
        "",
        f"N = {N} grid points ({2 * N} states), t ∈ [0, {T_END:g}], rtol = {rtol:g}, atol = "
        f"{atol:g} (one QNDF row at a tenth of both); error = largest "
        "relative error at t = 10 against scipy Radau at rtol 1e-10. Native solvers: autograd "
        "Jacobians, dense "
        "(the default) or, with `linsolve='sparse'`, on the sparsity pattern (coloured products, "
        "SuperLU); "
        "scipy: `jac_sparsity` (sparse finite-difference Jacobian and sparse LU), with its numpy "
        "f, and in one row with the "
        "native rows' torch f wrapped for numpy (the same f cost as pn's). Solves run under "
        "`torch.no_grad()`, those marked "
        "`inference_mode` under `torch.inference_mode()` (torch's context for pure inference).",
        "",
        "| solver | time (ms) | ÷ QNDF | error | steps (accepted) | f evaluations | Jacobians | "
        "factorisations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (sec, err, st) in rows.items():
        lines.append(
            f"| {name} | {sec * 1e3:.0f} | {sec / base:.2f} | {err:.1e} | {st.get('naccept')} | "
            f"{st.get('nfe')} | "
            f"{st.get('njac')} | {st.get('nlu')} |"
        )
    out = HERE / "results" / ("stiff_large_quick.md" if args.quick else "stiff_large.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
