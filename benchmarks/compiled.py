"""The compiled path (``solve(..., compile=True)``) against the native engine and scipy, side by
side.

Lotka–Volterra with Tsit5 and Vern7 (scipy: RK45), Robertson, Van der Pol (μ = 1000), HIRES and
OREGO with Rodas5P, KenCarp4 and Kvaerno5 (scipy: Radau with its finite-difference Jacobian), at
equal tolerances, all on one thread, alternately, best of ``--repeat`` runs. Reports the compile
(or disk-cache load) time of the first call in the process, the time per solve and per accepted
step, the ratios, and the error against a tight reference (scipy Radau / DOP853 at rtol 1e-12;
HIRES and OREGO: the IVP Test Set's published values in ``tests/data/stiff_references.json``).

    python benchmarks/compiled.py            # rtol 1e-6 and 1e-8; 5 repeats
    python benchmarks/compiled.py --quick    # rtol 1e-6; 2 repeats; shorter Van der Pol span
    python benchmarks/compiled.py --fresh    # a new numba cache directory: report the cold compile
    python benchmarks/compiled.py --only grad,ensemble  # tables: solve, grad, ensemble, step, wp
    python benchmarks/compiled.py --only wp,step  # vs scipy and diffrax (jitted) at equal error

Also: the gradient of a loss w.r.t. Robertson's three rate constants (compiled forward
sensitivities against the native engine's DirectAdjoint, both Rodas5P) and an ensemble of 1000
Robertson systems with different rate constants (``pyneuralode.compiled.solve_ensemble`` against
the native ``Rodas5P(batched=True)``). Times are process CPU time (best of ``--repeat``): on a
shared machine they are fairer than wall time; the ensemble's ``parallel=True`` row also gives the
wall time, since its threads add CPU time.

``wp`` (not in ``--quick`` unless named): a work–precision sweep, rtol 1e-4…1e-8, of Lotka–Volterra
(Tsit5; scipy RK45; diffrax Tsit5) and ROBER to t = 1e11, Van der Pol, HIRES, OREGO (Rodas5P and
Kvaerno5; scipy Radau; diffrax Kvaerno5), with the time ratios at equal error; ``step``: the time
per step of a long Lotka–Volterra run. The diffrax columns need ``pip install diffrax`` (jax, run
in float64 and jitted; never a dependency of pyneuralode) and are skipped, with the reason, without.

Writes ``benchmarks/results/compiled.md`` (the title says when it was a ``--quick`` run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from make_stiff_references import hires as np_hires  # the IVP Test Set's f for scipy
from make_stiff_references import orego as np_orego
from make_stiff_references import robertson as np_robertson
from make_stiff_references import vdp as np_vdp_ref

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


def best_cpu(fn, repeat):
    out, ts = None, []
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        ts.append(time.process_time() - t0)
    return min(ts), out


def alternating_best_cpu(fns, repeat):
    """[(best process CPU time, last result)] of each of ``fns``, run in turn ``repeat`` times."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.process_time()
            outs[i] = fn()
            best[i] = min(best[i], time.process_time() - t0)
    return list(zip(best, outs))


def rober_rows(t, Y, K):
    y1, y2, y3 = Y[:, 0], Y[:, 1], Y[:, 2]
    k1, k2, k3 = K[:, 0], K[:, 1], K[:, 2]
    return torch.stack(
        [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2], 1
    )


def bench_gradient(pn, repeat, quick):
    """d loss / d(k1, k2, k3) of Robertson: compiled forward sensitivities vs DirectAdjoint."""
    F = dict(dtype=torch.float64)
    k0 = torch.tensor([0.04, 3e7, 1e4], **F)
    y0 = torch.tensor([1.0, 0.0, 0.0], **F)
    t = torch.tensor([0.0, 1.0, 10.0, 100.0] + ([] if quick else [1e3, 1e4, 1e5]), **F)
    w = torch.tensor([1.0, 1e4, 1.0], **F)
    # the finite-difference check, at a tight tolerance (central differences, h = 1e-4 k, of the
    # compiled solve against its forward sensitivities, both at rtol 1e-11)
    tight = dict(rtol=1e-11, atol=1e-16)

    def tight_loss(k):
        return (
            w * pn.solve(rober, y0, t, pn.Rodas5P(), compile=True, args=(k,), **tight).ys[1:]
        ).sum()

    kk = k0.clone().requires_grad_(True)
    t0 = time.perf_counter()
    (g_tight,) = torch.autograd.grad(tight_loss(kk), kk)  # the first call: trace and compile
    first = time.perf_counter() - t0
    with torch.no_grad():
        fd = []
        for i in range(3):
            e = torch.zeros(3, **F)
            e[i] = 1e-4 * k0[i]
            fd.append(((tight_loss(k0 + e) - tight_loss(k0 - e)) / (2 * e[i])).item())
    fd = torch.tensor(fd, **F)
    fd_rel = ((g_tight - fd).abs() / fd.abs()).max().item()
    lines = []
    for rtol in [1e-6] if quick else [1e-6, 1e-8]:
        kw = dict(args=None, rtol=rtol, atol=rtol * 1e-4)

        def grad(compile, kw=kw):
            k = k0.clone().requires_grad_(True)
            sol = pn.solve(rober, y0, t, pn.Rodas5P(), compile=compile, **{**kw, "args": (k,)})
            (g,) = torch.autograd.grad((w * sol.ys[1:]).sum(), k)
            return g, sol.stats

        tc, (gc, stc) = best_cpu(lambda: grad(True), repeat)
        tn, (gn, stn) = best_cpu(lambda: grad(False), repeat)

        def rel(a, b):
            return ((a - b).abs() / b.abs()).max().item()

        print(
            f"Robertson gradient rtol={rtol:g}: compiled {tc * 1e3:.2f} ms, DirectAdjoint "
            f"{tn * 1e3:.0f} ms ({tn / tc:.0f}x); first call {first:.1f} s; vs FD at rtol "
            f"1e-11: {fd_rel:.1e}",
            flush=True,
        )
        lines.append(
            f"| {rtol:g} | {tc * 1e3:.2f} | {tn * 1e3:.0f} | {tn / tc:.0f}× | "
            f"{stc['naccept']}/{stn['naccept']} | {rel(gc, gn):.1e} |"
        )
    return [
        "",
        "## Gradient of a loss w.r.t. Robertson's three rate constants (Rodas5P)",
        "",
        f"Loss Σ w·y at t = {', '.join(f'{x:g}' for x in t[1:].tolist())} (w = 1, 1e4, 1), "
        "atol = rtol·1e-4. Compiled: forward sensitivities (`compile=True`, k requires grad); "
        "native: `DirectAdjoint` (the default). CPU ms, best of the repeats. First call (trace "
        f"and compile, or disk-cache load, in this process): {first:.1f} s. FD: central "
        "differences of the "
        "compiled solve with h = 1e-4·k against the compiled gradient, both at rtol 1e-11, "
        f"atol 1e-16: max relative difference {fd_rel:.1e}.",
        "",
        "| rtol | compiled ms | DirectAdjoint ms | speed-up | steps c/n | rel. diff c vs native |",
        "|---|---|---|---|---|---|",
        *lines,
    ]


def bench_ensemble(pn, repeat, quick):
    """1000 Robertson systems (rate constants spread by e^±0.5) to t = 1e3."""
    F = dict(dtype=torch.float64)
    from pyneuralode.compiled import solve_ensemble

    B = 1000
    rng = np.random.default_rng(0)
    K = torch.tensor(np.array([0.04, 3e7, 1e4])[None] * np.exp(rng.uniform(-0.5, 0.5, (B, 3))))
    Y0 = torch.tensor([1.0, 0.0, 0.0], **F).repeat(B, 1)
    t = torch.tensor([0.0, 1e3], **F)
    lines = []
    for rtol in [1e-7] if quick else [1e-5, 1e-7, 1e-9]:
        kw = dict(args=(K,), rtol=rtol, atol=rtol * 1e-4)
        with torch.no_grad():
            t0 = time.perf_counter()
            solve_ensemble(rober_rows, Y0, t, pn.Rodas5P(), **kw)
            first = time.perf_counter() - t0
            row = {}
            for par in (False, True):
                w0 = time.perf_counter()
                tc, sc = best_cpu(
                    lambda par=par, kw=kw: solve_ensemble(
                        rober_rows, Y0, t, pn.Rodas5P(), parallel=par, **kw
                    ),
                    repeat,
                )
                row[par] = (tc, (time.perf_counter() - w0) / repeat)
            tn, sn = best_cpu(
                lambda kw=kw: pn.solve(rober_rows, Y0, t, pn.Rodas5P(batched=True), **kw),
                repeat,
            )
            ref = solve_ensemble(
                rober_rows, Y0, t, pn.Rodas5P(), **{**kw, "rtol": 1e-12, "atol": 1e-16}
            )

        def err(s, ref=ref, atol=kw["atol"]):
            return ((s.ys[-1] - ref.ys[-1]).abs() / (ref.ys[-1].abs() + atol)).max().item()

        ts_, tp = row[False][0], row[True]
        print(
            f"ensemble B={B} rtol={rtol:g}: compiled serial {ts_ * 1e3:.0f} ms CPU, parallel "
            f"{tp[0] * 1e3:.0f} ms CPU ({tp[1] * 1e3:.0f} ms wall), native batched "
            f"{tn * 1e3:.0f} ms ({tn / ts_:.1f}x serial); first call {first:.1f} s",
            flush=True,
        )
        lines.append(
            f"| {rtol:g} | {first:.1f} | {ts_ * 1e3:.0f} | {tp[0] * 1e3:.0f} / {tp[1] * 1e3:.0f} | "
            f"{tn * 1e3:.0f} | {tn / ts_:.1f}× | {sc.stats['naccept'] / B:.0f} / "
            f"{sn.stats['naccept']} | {err(sc):.1e} / {err(sn):.1e} |"
        )
    return [
        "",
        f"## Ensemble of {B} Robertson systems (Rodas5P, t = 1e3)",
        "",
        "Rate constants k·e^u, u uniform in ±0.5 per constant and system; atol = rtol·1e-4. "
        "Compiled: `pyneuralode.compiled.solve_ensemble` (every system its own steps); native: "
        "`pn.solve(..., pn.Rodas5P(batched=True))` (one step sequence for the batch). CPU ms, "
        "best of the repeats (parallel: CPU / wall; numba's threads). Error: max relative error "
        "at t = 1e3 against the compiled ensemble at rtol 1e-12.",
        "",
        "| rtol | first call s | compiled serial ms | compiled parallel ms (CPU / wall) | "
        "native batched ms | native ÷ serial | steps per system c / n | error c / n |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ]


# --- work-precision sweep (``--only wp``): compiled vs scipy vs diffrax (jitted), if installed ---


def load_diffrax():
    """(jax.numpy, diffrax) in float64 on one CPU thread, or (None, reason) when not importable
    (they are benchmark-only: never a dependency of the package or its tests)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "multi_thread_eigen" not in flags:  # one thread, like the other columns
        os.environ["XLA_FLAGS"] = (
            flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    try:
        import diffrax
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        return None, f"jax/diffrax not importable ({e}); pip install diffrax for these columns"
    jax.config.update("jax_enable_x64", True)
    return (jax, jnp, diffrax), None


def diffrax_solver(dfx, fnp, method, t, max_steps):
    """A jitted whole solve of ``fnp`` (the numpy right-hand side, run on jax arrays) with
    diffrax's ``method`` and ``PIDController(rtol, atol)``, saving at ``t``; rtol/atol are traced
    arguments, so one compilation serves every tolerance. Returns run(y0, rtol, atol) -> (ys at
    t[1:], accepted steps, compile seconds of the first call or None)."""
    jax, jnp, diffrax = dfx

    def rhs(t_, y, args):
        return jnp.stack(fnp(t_, y))

    @jax.jit
    def solve(y0, rtol, atol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs),
            getattr(diffrax, method)(),
            t[0],
            t[-1],
            None,
            y0,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(ts=jnp.asarray(t[1:])),
            max_steps=max_steps,
            throw=False,
        )
        return sol.ys, sol.stats["num_accepted_steps"], sol.result == diffrax.RESULTS.successful

    first = []

    def run(y0, rtol, atol):
        t0 = time.process_time()
        ys, n, ok = jax.block_until_ready(solve(jnp.asarray(y0), rtol, atol))
        if not first:
            first.append(time.process_time() - t0)
        return (np.asarray(ys) if bool(ok) else np.full(np.shape(ys), np.nan)), int(n)

    run.first = first
    return run


def ratio_at_equal_error(err_c, t_c, errs, times):
    """time of the other solver at the error ``err_c``, by interpolating its log-time over its
    log-error, divided into ``t_c``; None when ``err_c`` lies outside the other's error range."""
    pts = sorted((e, tt) for e, tt in zip(errs, times) if np.isfinite(e) and e > 0)
    if len(pts) < 2 or not (pts[0][0] <= err_c <= pts[-1][0]):
        return None
    le, lt = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return t_c / float(np.exp(np.interp(np.log(err_c), le, lt)))


def bench_wp(pn, repeat, quick, refs, command):
    """Work–precision: max relative error at the end against a high-accuracy reference vs CPU
    time, over rtol, for the compiled path, scipy and diffrax (jitted)."""
    from scipy.integrate import solve_ivp

    F = dict(dtype=torch.float64)
    dfx, why = load_diffrax()
    if dfx is None:
        print(f"wp: diffrax columns skipped: {why}", flush=True)
    ivp = refs["ivp_testset"]
    vdp_ref = refs["vanderpol"]
    lv_t = np.linspace(0.0, 10.0, 11)
    lv_ref = solve_ivp(
        np_lv, (0, 10.0), [1.0, 1.0], method="DOP853", rtol=1e-13, atol=1e-15, t_eval=lv_t
    ).y[:, -1]
    k = (torch.tensor([0.04, 3e7, 1e4], **F),)
    # (name, torch f, args, numpy f, y0, output times, reference at the end, atol / rtol,
    #  compiled methods, scipy method, diffrax method)
    stiff = ("Rodas5P", "Kvaerno5")
    problems = [
        (
            "Lotka–Volterra (11 outputs)",
            lv,
            (torch.tensor([1.5, 1.0, 3.0, 1.0], **F),),
            np_lv,
            [1.0, 1.0],
            lv_t,
            lv_ref,
            1e-3,
            ("Tsit5",),
            "RK45",
            "Tsit5",
        ),
        (
            "ROBER (t=1e11)",
            rober,
            k,
            np_robertson,
            ivp["rober"]["y0"],
            np.array([0.0, ivp["rober"]["t_end"]]),
            ivp["rober"]["y_end"],
            1e-10,
            stiff,
            "Radau",
            "Kvaerno5",
        ),
        (
            "Van der Pol μ=1e3 (t=3000)",
            vdp,
            (),
            np_vdp_ref,
            vdp_ref["y0"],
            np.array([0.0, vdp_ref["t"][-1]]),
            vdp_ref["y"][-1],
            1e-3,
            stiff,
            "Radau",
            "Kvaerno5",
        ),
        (
            "HIRES",
            hires,
            (),
            np_hires,
            ivp["hires"]["y0"],
            np.array([0.0, ivp["hires"]["t_end"]]),
            ivp["hires"]["y_end"],
            1e-4,
            stiff,
            "Radau",
            "Kvaerno5",
        ),
        (
            "OREGO",
            orego,
            (),
            np_orego,
            ivp["orego"]["y0"],
            np.array([0.0, ivp["orego"]["t_end"]]),
            ivp["orego"]["y_end"],
            1e-3,
            stiff,
            "Radau",
            "Kvaerno5",
        ),
    ]
    rtols = [1e-4, 1e-6] if quick else [1e-4, 1e-5, 1e-6, 1e-7, 1e-8]
    out = [
        "",
        "## Work–precision: compiled path vs scipy vs diffrax (jitted)",
        "",
        f"Command: `{command}`; best of {repeat} runs of process CPU time, the solvers "
        "alternating in every round, one thread each (jax: "
        "`--xla_cpu_multi_thread_eigen=false`), float64. "
        "Error: max relative error over the components at the last time against the reference "
        "(ROBER, HIRES, OREGO: the IVP Test Set's published values; Van der Pol: scipy Radau at "
        "rtol 1e-12; Lotka–Volterra: DOP853 at rtol 1e-13). atol = rtol × the factor in the "
        "heading. scipy: `solve_ivp` with its own finite-difference Jacobian; diffrax: the whole "
        "`diffeqsolve` jitted (rtol/atol traced, one compilation for all tolerances), "
        "`PIDController(rtol, atol)`, `SaveAt(ts=...)` at the same times, Kvaerno5 with its "
        "default root finder; compiled: `pn.solve(..., compile=True)` (Rodas5P/Kvaerno5 with the "
        "traced Jacobian), timed through the full Python call. Steps: accepted steps. "
        "“÷ at equal error”: the compiled Rodas5P (Tsit5) time divided by the other solver's "
        "time interpolated (log–log) to the same error; “—” where the error lies outside the "
        "other's range.",
    ]
    if dfx is None:
        out += ["", f"diffrax columns skipped: {why}."]
    summary = []
    for name, f, args, fnp, y0l, tt, ref, ascale, methods, sp, dm in problems:
        y0 = torch.tensor(y0l, **F)
        t = torch.tensor(tt, **F)
        ref = np.asarray(ref, dtype=float)
        runs = {}
        first = {}
        for m in methods:
            solver = getattr(pn, m)()
            t0 = time.perf_counter()
            with torch.no_grad():
                pn.solve(f, y0, t, solver, compile=True, args=args, rtol=1e-6, atol=1e-9)
            first[m] = time.perf_counter() - t0

            def run_c(rtol, f=f, y0=y0, t=t, solver=solver, args=args, ascale=ascale):
                with torch.no_grad():
                    s = pn.solve(
                        f, y0, t, solver, compile=True, args=args, rtol=rtol, atol=rtol * ascale
                    )
                return s.ys[-1].numpy(), s.stats["naccept"]

            runs[f"{m} (compiled)"] = run_c

        def run_s(rtol, fnp=fnp, tt=tt, y0l=y0l, sp=sp, ascale=ascale, count=False):
            s = solve_ivp(
                fnp,
                (tt[0], tt[-1]),
                y0l,
                method=sp,
                rtol=rtol,
                atol=rtol * ascale,
                t_eval=None if count else tt[1:],
            )
            y = s.y[:, -1] if s.success else np.full(len(y0l), np.nan)
            return y, (len(s.t) - 1 if count else None)  # accepted steps: without t_eval

        runs[f"{sp} (scipy)"] = run_s
        if dfx is not None:
            rd = diffrax_solver(dfx, fnp, dm, tt, 10**6)
            rd(np.asarray(y0l), 1e-6, 1e-6 * ascale)
            first[dm + " (diffrax)"] = rd.first[0]
            runs[f"{dm} (diffrax)"] = lambda rtol, rd=rd, y0l=y0l, ascale=ascale: (
                lambda r: (r[0][-1], r[1])
            )(rd(np.asarray(y0l, dtype=float), rtol, rtol * ascale))
        res = {key: {} for key in runs}
        for rtol in rtols:
            best_t = {key: float("inf") for key in runs}
            for _ in range(repeat):
                for key, fn in runs.items():
                    t0 = time.process_time()
                    y, n = fn(rtol)
                    best_t[key] = min(best_t[key], time.process_time() - t0)
            for key in runs:
                # an untimed run for the result (deterministic) and the step count
                y, n = runs[key](rtol, count=True) if key.endswith("(scipy)") else runs[key](rtol)
                e = float(np.max(np.abs(np.asarray(y) - ref) / np.abs(ref)))
                res[key][rtol] = (best_t[key], n, e)
            print(
                f"wp {name} rtol={rtol:g}: "
                + ", ".join(
                    f"{key} {res[key][rtol][0] * 1e3:.2f} ms {res[key][rtol][1]} steps "
                    f"err {res[key][rtol][2]:.1e}"
                    for key in runs
                ),
                flush=True,
            )
        out += wp_table(name, ascale, rtols, runs, res, first, sp, dm, summary)
    return out + wp_summary(summary)


def bench_per_step(pn, repeat, command):
    """Lotka–Volterra, Tsit5, rtol 1e-6, 101 outputs to t = 1000 (~9000 steps): the time per
    step once the fixed cost of a call is spread thin, compiled vs diffrax vs scipy RK45."""
    from scipy.integrate import solve_ivp

    F = dict(dtype=torch.float64)
    dfx, why = load_diffrax()
    rtol, atol = 1e-6, 1e-9
    tt = np.linspace(0.0, 1000.0, 101)
    t = torch.tensor(tt, **F)
    y0 = torch.tensor([1.0, 1.0], **F)
    p = (torch.tensor([1.5, 1.0, 3.0, 1.0], **F),)
    runs = {}
    for dense in (True, False):

        def run_c(dense=dense):
            with torch.no_grad():
                s = pn.solve(
                    lv,
                    y0,
                    t,
                    pn.Tsit5(),
                    compile=True,
                    args=p,
                    rtol=rtol,
                    atol=atol,
                    dense=dense,
                )
            return s.ys[-1].numpy(), s.stats["naccept"]

        runs["Tsit5 (compiled)" + ("" if dense else ", dense=False")] = run_c
    runs["RK45 (scipy)"] = lambda: (
        None,
        len(solve_ivp(np_lv, (0.0, 1000.0), [1.0, 1.0], rtol=rtol, atol=atol).t) - 1,
    )
    if dfx is not None:
        rd = diffrax_solver(dfx, np_lv, "Tsit5", tt, 10**6)
        runs["Tsit5 (diffrax)"] = lambda: rd(np.array([1.0, 1.0]), rtol, atol)
    for fn in runs.values():
        fn()  # first calls (compile, jit) outside the timing
    timed = dict(zip(runs, alternating_best_cpu(list(runs.values()), repeat)))
    cells = [
        f"| {k} | {tk * 1e3:.2f} | {out[1]} | {tk / out[1] * 1e6:.2f} |"
        for k, (tk, out) in timed.items()
    ]
    for line in cells:
        print("per step:", line, flush=True)
    return [
        "",
        "## Time per step: Lotka–Volterra, Tsit5, rtol 1e-6, atol 1e-9, to t = 1000 (101 outputs)",
        "",
        f"Command: `{command}`; best of {repeat} runs of process CPU time, alternating; the "
        "same solvers as the work–precision tables (diffrax: jitted, `SaveAt(ts=...)`; "
        + ("columns skipped: " + why if dfx is None else "one thread")
        + "). scipy: steps counted without `t_eval`, timed without it.",
        "",
        "| solver | ms | accepted steps | µs per step |",
        "|---|---|---|---|",
        *cells,
    ]


def wp_table(name, ascale, rtols, runs, res, first, sp, dm, summary):
    keys = list(runs)
    lead = keys[0]
    head = (
        "| rtol | "
        + " | ".join(f"{k}: ms / steps / µs per step / error" for k in keys)
        + " | "
        + " | ".join(f"{lead.split()[0]} ÷ {k} at equal error" for k in keys[1:])
        + " |"
    )
    lines = [
        "",
        f"### {name}, atol = rtol × {ascale:g}",
        "",
        "First call (trace + compile, or disk-cache load; diffrax: jit compilation) s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in first.items())
        + ".",
        "",
        head,
        "|" + "---|" * (1 + len(keys) + len(keys) - 1),
    ]
    for rtol in rtols:
        tc, _, ec = res[lead][rtol]
        cells = []
        for k in keys:
            tk, nk, ek = res[k][rtol]
            cells.append(f"{tk * 1e3:.2f} / {nk} / {tk / max(nk, 1) * 1e6:.1f} / {ek:.1e}")
        ratios = []
        for k in keys[1:]:
            r = ratio_at_equal_error(
                ec, tc, [res[k][x][2] for x in rtols], [res[k][x][0] for x in rtols]
            )
            ratios.append("—" if r is None else f"{r:.2g}")
            summary.append((name, k, r, tc / res[k][rtol][0]))
        lines.append(f"| {rtol:g} | " + " | ".join(cells + ratios) + " |")
    for k in keys[1:]:  # the other direction: the compiled time interpolated to k's errors
        for rtol in rtols:
            tk, _, ek = res[k][rtol]
            r = ratio_at_equal_error(
                ek, tk, [res[lead][x][2] for x in rtols], [res[lead][x][0] for x in rtols]
            )
            if r is not None:
                summary.append((name, k, 1.0 / r, None))
    lo, hi = rtols[0], rtols[-1]
    marg = []
    for k in keys:
        (t0, n0, _), (t1, n1, _) = res[k][lo], res[k][hi]
        if n1 > n0:
            marg.append(f"{k} {(t1 - t0) / (n1 - n0) * 1e6:.2f}")
    lines += [
        "",
        f"Marginal µs per accepted step (time difference ÷ step difference between rtol {lo:g} "
        f"and {hi:g}; the fixed cost of a call drops out): " + ", ".join(marg) + ".",
    ]
    return lines


def wp_summary(summary):
    """Per problem and competitor: the range of the time ratios at equal error and equal rtol."""
    lines = [
        "",
        "### Summary: compiled time ÷ the other solver's time",
        "",
        "At equal error: min – max over the points where the error of one lies inside the other's "
        "range (either solver's points, interpolated log–log in the other's curve). At equal "
        "rtol: min – max over the tolerances.",
        "",
        "| problem | vs | at equal error | at equal rtol |",
        "|---|---|---|---|",
    ]
    groups = {}
    for name, k, r, r_rtol in summary:
        groups.setdefault((name, k), []).append((r, r_rtol))
    for (name, k), v in groups.items():
        rr = [r for r, _ in v if r is not None]
        eq = "—" if not rr else f"{min(rr):.2g} – {max(rr):.2g}"
        rt = [x for _, x in v if x is not None]
        lines.append(f"| {name} | {k} | {eq} | {min(rt):.2g} – {max(rt):.2g} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    # the work-precision sweep is long: not in --quick unless asked for
    only = set(
        (a.only or ("solve,grad,ensemble" if a.quick else "solve,grad,ensemble,step,wp")).split(",")
    )
    if a.fresh:
        os.environ["PYNEURALODE_CACHE_DIR"] = tempfile.mkdtemp(prefix="pn_compiled_")
    torch.set_num_threads(1)
    from scipy.integrate import solve_ivp

    import pyneuralode as pn

    repeat = a.repeat or (2 if a.quick else 5)
    command = " ".join(["python benchmarks/compiled.py", *sys.argv[1:]])
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
    for name, f, fnp, y0l, t_end, args, methods, sp, ref in problems if "solve" in only else []:
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
                (tc, sol_c), (tn, sol_n), (ts, sol_s) = alternating_best_cpu(
                    [
                        lambda f=f, y0=y0, t=t, solver=solver, kw=kw: pn.solve(
                            f, y0, t, solver, compile=True, **kw
                        ),
                        lambda f=f, y0=y0, t=t, solver=solver, kw=kw: pn.solve(
                            f, y0, t, solver, **kw
                        ),
                        lambda fnp=fnp, t_end=t_end, y0l=y0l, sp=sp, rtol=rtol: solve_ivp(
                            fnp, (0, t_end), y0l, method=sp, rtol=rtol, atol=rtol * 1e-3
                        ),
                    ],
                    repeat,
                )
            err = lambda y, ref=ref, rtol=rtol: float(
                np.max(np.abs(np.asarray(y) - ref) / (np.abs(ref) + rtol * 1e-3))
            )
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
                f"{name} {method} rtol={rtol:g}: compiled {tc * 1e3:.2f} ms ({r['steps_c']} "
                "steps), native "
                f"{tn * 1e3:.1f} ms, scipy {sp} {ts * 1e3:.1f} ms ({r['steps_s']} steps); first "
                f"call {first:.2f} s",
                flush=True,
            )
    lines = [
        "# Compiled path vs native engine vs scipy" + (" (--quick)" if a.quick else ""),
    ]
    solve_table = [
        "",
        f"Command: `{command}`; 1 thread, process CPU time, best of {repeat} (the three "
        "alternating); atol = rtol·1e-3; error = max relative "
        "error at the end against a "
        'scipy reference at rtol 1e-12 (HIRES, OREGO: the IVP Test Set published values). "first '
        'call": compile time of the first call in the process (numba; '
        "or the load from the disk cache when the module was compiled before"
        + (", here a fresh cache" if a.fresh else "")
        + ").",
        "",
        "| problem | method (scipy) | rtol | first call s | compiled ms | µs/step | native ms | "
        "µs/step | scipy ms |"
        " µs/step | native ÷ compiled | scipy ÷ compiled | steps c/n/s | error c/n/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "solve" in only:
        lines += solve_table
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['method']} ({r['scipy']}) | {r['rtol']:g} | "
            f"{r['compile_s']:.2f} | "
            f"{r['compiled_s'] * 1e3:.3f} | {r['compiled_s'] / r['steps_c'] * 1e6:.2f} | "
            f"{r['native_s'] * 1e3:.1f} | "
            f"{r['native_s'] / r['steps_n'] * 1e6:.0f} | {r['scipy_s'] * 1e3:.1f} | "
            f"{r['scipy_s'] / r['steps_s'] * 1e6:.0f} | "
            f"{r['native_s'] / r['compiled_s']:.0f}× | {r['scipy_s'] / r['compiled_s']:.0f}× | "
            f"{r['steps_c']}/{r['steps_n']}/{r['steps_s']} | "
            f"{r['err_c']:.1e}/{r['err_n']:.1e}/{r['err_s']:.1e} |"
        )
    if "grad" in only:
        lines += bench_gradient(pn, repeat, a.quick)
    if "ensemble" in only:
        lines += bench_ensemble(pn, repeat, a.quick)
    if "step" in only:
        lines += bench_per_step(pn, repeat, command)
    if "wp" in only:
        lines += bench_wp(pn, repeat, a.quick, refs, command)
    out = HERE / "results" / "compiled.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
