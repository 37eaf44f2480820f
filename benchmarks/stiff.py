"""Stiff work–precision benchmark: native pyneuralode stiff solvers vs scipy, diffrax and
torchdiffeq.

    python benchmarks/stiff.py           # full run (rtol 1e-4..1e-8), a few minutes
    python benchmarks/stiff.py --quick   # rtol 1e-4, 1e-6; one repeat

Problems: Robertson (t = 1e5, atol = 1e-4·rtol) and Van der Pol with μ = 1000 (t = 3000,
atol = rtol). Error: the largest relative error over the components at the final time against
the stored scipy Radau reference at rtol 1e-12 (``tests/data/stiff_references.json``). Time:
wall time of one solve, the best of up to 3 repeats, on 1 thread (``torch.set_num_threads(1)``).
Native solvers run under ``torch.no_grad()`` (a forward solve, like scipy's); the rows marked
``inference_mode`` run under ``torch.inference_mode()``, torch's context for pure inference, where
each call of a torch f or jac costs less (no autograd bookkeeping at all). scipy Radau/BDF/LSODA
are given the analytic Jacobian (their strongest configuration; Radau with its default
finite-difference Jacobian is listed too). diffrax runs JAX on CPU in float64, jit-compiled once
per solver and problem with rtol/atol as traced arguments; compile time is excluded. torchdiffeq
dopri5 (explicit) runs in a child process with a wall-time limit; we record how far it got.

Writes ``benchmarks/results/stiff.md`` and ``docs/stiff_work_precision.png`` (``--quick``:
``stiff_quick.md`` and ``stiff_work_precision_quick.png``, not tracked); prints the table.
``--replot`` redraws the figure from the saved table without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFS = json.loads((ROOT / "tests" / "data" / "stiff_references.json").read_text())
K = REFS["robertson"]["k"]
MU = REFS["vanderpol"]["mu"]

PROBLEMS = {
    "robertson": dict(
        title="Robertson (t = 1e5)",
        y0=REFS["robertson"]["y0"],
        T=REFS["robertson"]["t"][-1],
        ref=REFS["robertson"]["y"][-1],
        atol_factor=1e-4,
    ),
    "vanderpol": dict(
        title="Van der Pol, μ = 1000 (t = 3000)",
        y0=REFS["vanderpol"]["y0"],
        T=REFS["vanderpol"]["t"][-1],
        ref=REFS["vanderpol"]["y"][-1],
        atol_factor=1.0,
    ),
}


# ------------------------------------------------------------------------------------------------
# right-hand sides


def rober_np(t, y):
    k1, k2, k3 = K
    y1, y2, y3 = y
    return np.array([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2])


def rober_jac_np(t, y):
    k1, k2, k3 = K
    y1, y2, y3 = y
    return np.array(
        [[-k1, k3 * y3, k3 * y2], [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2], [0.0, 2 * k2 * y2, 0.0]]
    )


def vdp_np(t, y):
    return np.array([y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]])


def vdp_jac_np(t, y):
    return np.array([[0.0, 1.0], [-2 * MU * y[0] * y[1] - 1.0, MU * (1 - y[0] ** 2)]])


def torch_rhs(name, vectorised=False):
    """f as torch code. ``vectorised=False``: scalar expressions stacked (as the numpy versions);
    ``vectorised=True``: the same function in a few whole-vector torch ops (~2× cheaper per call,
    torch's per-op dispatch cost dominating a 3-component state)."""
    import torch

    if vectorised:
        return _torch_rhs_vectorised(name)
    if name == "robertson":
        k1, k2, k3 = K

        def f(t, y):
            y1, y2, y3 = y[0], y[1], y[2]
            return torch.stack(
                [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2]
            )
    else:

        def f(t, y):
            return torch.stack([y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]])

    return f


def _torch_rhs_vectorised(name):
    import torch

    if name == "robertson":
        k1, k2, k3 = K
        # f = M · [y1, y2·y3, y2²]
        M = torch.tensor([[-k1, k3, 0.0], [k1, -k3, -k2], [0.0, 0.0, k2]], dtype=torch.float64)

        def f(t, y):
            y2 = y[1:2]
            return M @ torch.cat([y[:1], y2 * y[2:], y2 * y2])
    else:

        def f(t, y):
            x, v = y.unbind()
            return torch.stack([v, torch.addcmul(-x, v, 1 - x * x, value=MU)])

    return f


def _torch_jac_vectorised(name):
    import torch

    if name == "robertson":
        k1, k2, k3 = K
        M = torch.tensor([[-k1, k3, 0.0], [k1, -k3, -k2], [0.0, 0.0, k2]], dtype=torch.float64)
        # J = M · ∂[y1, y2·y3, y2²]/∂y = A0 + y2·A2 + y3·A3
        E0 = torch.zeros(3, 3, dtype=torch.float64)
        E0[0, 0] = 1.0
        E2 = torch.zeros(3, 3, dtype=torch.float64)
        E2[1, 2], E2[2, 1] = 1.0, 2.0
        E3 = torch.zeros(3, 3, dtype=torch.float64)
        E3[1, 1] = 1.0
        A0 = (M @ E0).reshape(1, 9)
        A23 = torch.stack([M @ E2, M @ E3]).reshape(2, 9)

        def jac(t, y):
            return torch.addmm(A0, y[1:].reshape(1, 2), A23).view(3, 3)
    else:
        top = torch.tensor([[0.0, 1.0]], dtype=torch.float64)

        def jac(t, y):
            x, v = y.unbind()
            return torch.cat(
                [top, torch.stack([-2 * MU * x * v - 1.0, MU * (1 - x * x)]).unsqueeze(0)]
            )

    return jac


def torch_jac(name, vectorised=False):
    """The analytic Jacobian as a torch function (what scipy Radau/BDF/LSODA are given too)."""
    import torch

    if vectorised:
        return _torch_jac_vectorised(name)
    if name == "robertson":
        k1, k2, k3 = K

        def jac(t, y):
            y1, y2, y3 = y.unbind()
            z = torch.zeros_like(y1)
            return torch.stack(
                [
                    torch.stack([-k1 + z, k3 * y3, k3 * y2]),
                    torch.stack([k1 + z, -k3 * y3 - 2 * k2 * y2, -k3 * y2]),
                    torch.stack([z, 2 * k2 * y2, z]),
                ]
            )
    else:

        def jac(t, y):
            x, v = y.unbind()
            return torch.stack(
                [
                    torch.stack([torch.zeros_like(x), torch.ones_like(x)]),
                    torch.stack([-2 * MU * x * v - 1.0, MU * (1 - x * x)]),
                ]
            )

    return jac


def rel_err(y, ref):
    y, ref = np.asarray(y, dtype=float), np.asarray(ref, dtype=float)
    return float(np.max(np.abs(y - ref) / np.abs(ref)))


# ------------------------------------------------------------------------------------------------
# runners: each returns (seconds, final state, steps) or raises


def _grad_context(context):
    import torch

    return {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]()


def run_native(
    solver_name,
    prob,
    rtol,
    analytic_jac=False,
    vectorised=False,
    jac_mode="autograd",
    context="no_grad",
):
    import torch

    import pyneuralode as pn

    p = PROBLEMS[prob]
    f = torch_rhs(prob, vectorised)
    y0 = torch.tensor(p["y0"], dtype=torch.float64)
    t = torch.tensor([0.0, p["T"]], dtype=torch.float64)
    solver = getattr(pn, solver_name)(
        jac=torch_jac(prob, vectorised) if analytic_jac else None, jac_mode=jac_mode
    )

    t0 = time.perf_counter()
    with _grad_context(context):
        sol = pn.solve(f, y0, t, solver, rtol=rtol, atol=rtol * p["atol_factor"], max_steps=10**6)
    sec = time.perf_counter() - t0
    st = sol.stats
    return sec, sol.ys[-1].numpy(), st["naccept"] + st["nreject"], st


def run_scipy(method, prob, rtol, analytic_jac=True):
    from scipy.integrate import solve_ivp

    p = PROBLEMS[prob]
    f = rober_np if prob == "robertson" else vdp_np
    jac = (rober_jac_np if prob == "robertson" else vdp_jac_np) if analytic_jac else None

    kw = {"jac": jac} if jac is not None else {}
    t0 = time.perf_counter()
    s = solve_ivp(
        f, (0.0, p["T"]), p["y0"], method=method, rtol=rtol, atol=rtol * p["atol_factor"], **kw
    )
    sec = time.perf_counter() - t0
    if not s.success:
        raise RuntimeError(s.message)
    return (
        sec,
        s.y[:, -1],
        s.t.size - 1,
        {"nfev": int(s.nfev), "njev": int(s.njev), "nlu": int(s.nlu)},
    )


def run_scipy_torch_f(method, prob, rtol, context="no_grad"):
    """scipy with the native rows' own right-hand side: the vectorised torch f and analytic jac,
    wrapped for numpy (what a torch user who hands their f to scipy runs; same f cost as pn's)."""
    import torch
    from scipy.integrate import solve_ivp

    p = PROBLEMS[prob]
    f, jac = torch_rhs(prob, True), torch_jac(prob, True)
    tt = lambda t: torch.scalar_tensor(t, dtype=torch.float64)

    def fun(t, y):
        return f(tt(t), torch.from_numpy(y)).numpy()

    def jfun(t, y):
        return jac(tt(t), torch.from_numpy(y)).numpy()

    t0 = time.perf_counter()
    with _grad_context(context):
        s = solve_ivp(
            fun,
            (0.0, p["T"]),
            p["y0"],
            method=method,
            rtol=rtol,
            atol=rtol * p["atol_factor"],
            jac=jfun,
        )
    sec = time.perf_counter() - t0
    if not s.success:
        raise RuntimeError(s.message)
    return (
        sec,
        s.y[:, -1],
        s.t.size - 1,
        {"nfev": int(s.nfev), "njev": int(s.njev), "nlu": int(s.nlu)},
    )


_DIFFRAX = {}
_COMPILED = set()


def _diffrax_solver(solver_name, prob):
    key = (solver_name, prob)
    if key in _DIFFRAX:
        return _DIFFRAX[key]
    import jax

    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp

    p = PROBLEMS[prob]
    if prob == "robertson":
        k1, k2, k3 = K

        def vf(t, y, args):
            y1, y2, y3 = y
            return jnp.stack(
                [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2]
            )
    else:

        def vf(t, y, args):
            return jnp.stack([y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]])

    term = diffrax.ODETerm(vf)
    solver = getattr(diffrax, solver_name)()
    if solver_name.startswith("KenCarp"):  # an IMEX method: treat the whole vector field implicitly
        term = diffrax.MultiTerm(diffrax.ODETerm(lambda t, y, args: jnp.zeros_like(y)), term)
    y0 = jnp.asarray(p["y0"], dtype=jnp.float64)

    @jax.jit
    def solve(rtol, atol):
        ctrl = diffrax.PIDController(rtol=rtol, atol=atol)
        sol = diffrax.diffeqsolve(
            term,
            solver,
            t0=0.0,
            t1=p["T"],
            dt0=None,
            y0=y0,
            stepsize_controller=ctrl,
            max_steps=10**6,
            saveat=diffrax.SaveAt(t1=True),
        )
        return sol.ys[-1], sol.stats["num_steps"], sol.stats["num_rejected_steps"]

    _DIFFRAX[key] = solve
    return solve


def run_diffrax(solver_name, prob, rtol):
    import jax
    import jax.numpy as jnp

    solve = _diffrax_solver(solver_name, prob)
    p = PROBLEMS[prob]
    r, a = jnp.asarray(rtol), jnp.asarray(rtol * p["atol_factor"])
    if (solver_name, prob, rtol) not in _COMPILED:
        jax.block_until_ready(solve(r, a))  # compile (excluded from the timing)
        _COMPILED.add((solver_name, prob, rtol))
    t0 = time.perf_counter()
    y, nsteps, nrej = jax.block_until_ready(solve(r, a))
    sec = time.perf_counter() - t0
    return sec, np.asarray(y), int(nsteps), {}


def _dopri5_child(prob, rtol, tmax, nfe):
    import torch
    from torchdiffeq import odeint

    torch.set_num_threads(1)
    p = PROBLEMS[prob]
    f0 = torch_rhs(prob)

    def f(t, y):
        nfe.value += 1
        tv = float(t)
        if tv > tmax.value:
            tmax.value = tv
        return f0(t, y)

    odeint(
        f,
        torch.tensor(p["y0"], dtype=torch.float64),
        torch.tensor([0.0, p["T"]], dtype=torch.float64),
        method="dopri5",
        rtol=rtol,
        atol=rtol * p["atol_factor"],
        options=dict(max_num_steps=2**31 - 1),
    )


def run_dopri5_limited(prob, rtol, limit):
    ctx = mp.get_context("fork")
    tmax, nfe = ctx.Value("d", 0.0), ctx.Value("q", 0)
    proc = ctx.Process(target=_dopri5_child, args=(prob, rtol, tmax, nfe))
    t0 = time.perf_counter()
    proc.start()
    proc.join(limit)
    finished = not proc.is_alive()
    if not finished:
        proc.kill()
        proc.join()
    return dict(
        finished=finished and proc.exitcode == 0,
        seconds=time.perf_counter() - t0,
        t_reached=tmax.value,
        nfe=nfe.value,
        T=PROBLEMS[prob]["T"],
    )


# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# many independent small systems: Robertson with B different rate constants (state (B, 3))


def batched_problem(B, seed=0):
    rng = np.random.default_rng(seed)
    Kb = np.array(K)[None, :] * np.exp(rng.uniform(-0.5, 0.5, size=(B, 3)))
    y0 = np.tile(np.array(REFS["robertson"]["y0"]), (B, 1))
    return Kb, y0, 1e3


def batched_scipy(method, Kb, y0, T, rtol, atol):
    from scipy.integrate import solve_ivp
    from scipy.sparse import block_diag

    B = Kb.shape[0]
    k1, k2, k3 = Kb[:, 0], Kb[:, 1], Kb[:, 2]

    def f(t, u):
        y = u.reshape(B, 3)
        y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
        return np.stack(
            [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2], 1
        ).reshape(-1)

    def jac(t, u):
        y = u.reshape(B, 3)
        y2, y3 = y[:, 1], y[:, 2]
        J = np.zeros((B, 3, 3))
        J[:, 0, 0], J[:, 0, 1], J[:, 0, 2] = -k1, k3 * y3, k3 * y2
        J[:, 1, 0], J[:, 1, 1], J[:, 1, 2] = k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2
        J[:, 2, 1] = 2 * k2 * y2
        return block_diag(list(J), format="csc")

    t0 = time.perf_counter()
    s = solve_ivp(f, (0.0, T), y0.reshape(-1), method=method, rtol=rtol, atol=atol, jac=jac)
    sec = time.perf_counter() - t0
    if not s.success:
        raise RuntimeError(s.message)
    return sec, s.y[:, -1].reshape(B, 3), s.t.size - 1


def rober_rows(t, Y, Kt):
    """Robertson for a batch: row b of ``Y`` (B, 3) with the rate constants ``Kt[b]``."""
    import torch

    y1, y2, y3 = Y[:, 0], Y[:, 1], Y[:, 2]
    k1, k2, k3 = Kt[:, 0], Kt[:, 1], Kt[:, 2]
    return torch.stack(
        [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2], 1
    )


def batched_native(solver_name, Kb, y0, T, rtol, atol):
    import torch

    import pyneuralode as pn

    Kt = torch.tensor(Kb)
    f = rober_rows
    solver = getattr(pn, solver_name)(batched=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = pn.solve(
            f, torch.tensor(y0), [0.0, T], solver, rtol=rtol, atol=atol, args=(Kt,), max_steps=10**6
        )
    sec = time.perf_counter() - t0
    return sec, sol.ys[-1].numpy(), sol.stats["naccept"] + sol.stats["nreject"]


def batched_diffrax(solver_name, Kb, y0, T, rtol, atol):
    import jax

    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp

    def vf(t, y, k):
        y1, y2, y3 = y
        return jnp.stack(
            [
                -k[0] * y1 + k[2] * y2 * y3,
                k[0] * y1 - k[2] * y2 * y3 - k[1] * y2 * y2,
                k[1] * y2 * y2,
            ]
        )

    term = diffrax.ODETerm(vf)
    solver = getattr(diffrax, solver_name)()

    @jax.jit
    def solve(k, y):
        sol = diffrax.diffeqsolve(
            term,
            solver,
            t0=0.0,
            t1=T,
            dt0=None,
            y0=y,
            args=k,
            max_steps=10**6,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        )
        return sol.ys[-1], sol.stats["num_steps"]

    vsolve = jax.jit(jax.vmap(solve))
    kj, yj = jnp.asarray(Kb), jnp.asarray(y0)
    jax.block_until_ready(vsolve(kj, yj))  # compile (excluded)
    t0 = time.perf_counter()
    y, n = jax.block_until_ready(vsolve(kj, yj))
    sec = time.perf_counter() - t0
    return sec, np.asarray(y), int(np.max(np.asarray(n)))


def run_batched(B, rtols, diffrax_ok, notes):
    Kb, y0, T = batched_problem(B)
    print(
        f"batched reference (scipy Radau, rtol 1e-11, sparse block Jacobian, B={B}) ...", flush=True
    )
    _, ref, _ = batched_scipy("Radau", Kb, y0, T, 1e-11, 1e-17)
    runs = [
        ("pn.Rodas5P (batched=True)", lambda r, a: batched_native("Rodas5P", Kb, y0, T, r, a)),
        ("pn.KenCarp4 (batched=True)", lambda r, a: batched_native("KenCarp4", Kb, y0, T, r, a)),
        ("scipy Radau (sparse jac)", lambda r, a: batched_scipy("Radau", Kb, y0, T, r, a)),
        ("scipy BDF (sparse jac)", lambda r, a: batched_scipy("BDF", Kb, y0, T, r, a)),
    ]
    if diffrax_ok:
        runs.append(
            ("diffrax Kvaerno5 (vmap)", lambda r, a: batched_diffrax("Kvaerno5", Kb, y0, T, r, a))
        )
    rows = {}
    for rtol in rtols:
        for label, fn in runs:
            try:
                fn(rtol, rtol * 1e-4)  # warm-up
                sec, y, steps = min((fn(rtol, rtol * 1e-4) for _ in range(2)), key=lambda x: x[0])
            except Exception as e:
                notes.append(
                    f"batched {label} rtol={rtol:g}: failed: {type(e).__name__}: "
                    f"{next((ln for ln in str(e).splitlines() if ln.strip()), '')[:160]}"
                )
                continue
            err = float(np.max(np.abs(y - ref) / np.abs(ref)))
            rows.setdefault(label, {})[rtol] = dict(err=err, sec=sec, steps=steps)
            print(
                f"batched B={B} {label:28s} rtol={rtol:.0e} err={err:.2e} time={sec * 1e3:9.1f} "
                f"ms steps={steps}",
                flush=True,
            )
    return dict(B=B, T=T, rows=rows, rtols=rtols)


NATIVE = [
    "Rodas5P",
    "Rodas4",
    "Rosenbrock23",
    "KenCarp4",
    "Kvaerno5",
    "Kvaerno3",
    "TRBDF2",
    "ImplicitEuler",
    "QNDF",
]
NATIVE_ANALYTIC = [
    "Rodas5P",
    "Rodas4",
    "Kvaerno5",
    "QNDF",
]  # with the analytic Jacobian, as scipy gets it
NATIVE_VECTORISED = [
    "Rodas5P",
    "Rodas4",
]  # f and the analytic Jacobian written as whole-vector torch ops
NATIVE_FD = ["Rodas5P", "Rodas4"]  # jac_mode="finite_difference" (as scipy Radau's default)
SCIPY = [("Radau", True), ("Radau", False), ("BDF", True), ("LSODA", True)]
SCIPY_TORCH_F = [
    "Radau"
]  # scipy given the same torch f/jac as the vectorised native rows (the f-cost context)
DIFFRAX = ["Kvaerno5", "KenCarp4"]


def equal_accuracy_ratio(points, base_points):
    """Median over the baseline's points of time(solver at the baseline's error)/time(baseline),
    interpolating the solver's log time–log error curve (only inside its measured error range)."""
    pts = sorted((math.log(e), math.log(s)) for e, s in points if e > 0 and math.isfinite(e))
    if len(pts) < 2:
        return None, 0
    le, ls = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    ratios = []
    for e, s in base_points:
        x = math.log(e)
        if le[0] <= x <= le[-1]:
            ratios.append(math.exp(np.interp(x, le, ls)) / s)
    if not ratios:
        return None, 0
    return float(np.median(ratios)), len(ratios)


def ratios_against(results, base_label, keep):
    """``{(problem, label): (ratio, n)}``: each kept solver's equal-accuracy time ratio to
    ``base_label``."""
    out = {}
    for prob in PROBLEMS:
        base = [(r["err"], r["sec"]) for r in results.get((prob, base_label), [])]
        for (p, label), rows in results.items():
            if p == prob and keep(label):
                out[(prob, label)] = equal_accuracy_ratio(
                    [(r["err"], r["sec"]) for r in rows], base
                )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="rtol 1e-4 and 1e-6 only, one repeat, short dopri5 limit",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=6.0,
        help="stop tightening rtol for a solver once one run takes longer (s)",
    )
    ap.add_argument(
        "--dopri5-limit",
        type=float,
        default=None,
        help="wall-time limit for torchdiffeq dopri5 (s)",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--replot",
        action="store_true",
        help=(
            "only redraw the figure from the saved table (benchmarks/results/stiff.md, or "
            "stiff_quick.md with --quick)"
        ),
    )
    args = ap.parse_args()
    if args.replot:
        table = ROOT / "benchmarks" / "results" / ("stiff_quick.md" if args.quick else "stiff.md")
        plot(
            results_from_table(table.read_text()),
            ROOT
            / "docs"
            / ("stiff_work_precision_quick.png" if args.quick else "stiff_work_precision.png"),
        )
        return
    import torch

    torch.set_num_threads(1)
    rtols = [1e-4, 1e-6] if args.quick else [1e-4, 1e-5, 1e-6, 1e-7, 1e-8]
    repeats = 1 if args.quick else 3
    dopri_limit = args.dopri5_limit or (10.0 if args.quick else 60.0)

    results = {}  # (prob, label) -> list of dict(rtol, err, sec, steps)
    notes = []
    diffrax_ok = True
    try:
        import diffrax  # noqa: F401
        import jax  # noqa: F401
    except Exception as e:
        diffrax_ok = False
        notes.append(f"diffrax not run: {type(e).__name__}: {e}")

    runners = [(f"pn.{n}", lambda prob, rtol, n=n: run_native(n, prob, rtol)) for n in NATIVE]
    runners += [
        (f"pn.{n} (analytic jac)", lambda prob, rtol, n=n: run_native(n, prob, rtol, True))
        for n in NATIVE_ANALYTIC
    ]
    runners += [
        (
            f"pn.{n} (vectorised f, analytic jac)",
            lambda prob, rtol, n=n: run_native(n, prob, rtol, True, True),
        )
        for n in NATIVE_VECTORISED
    ]
    runners += [
        (
            f"pn.{n} (vectorised f, analytic jac, inference_mode)",
            lambda prob, rtol, n=n: run_native(n, prob, rtol, True, True, context="inference_mode"),
        )
        for n in NATIVE_VECTORISED
    ]
    runners += [
        (
            f"pn.{n} (vectorised f, FD jac)",
            lambda prob, rtol, n=n: run_native(n, prob, rtol, False, True, "finite_difference"),
        )
        for n in NATIVE_FD
    ]
    runners += [
        (
            f"scipy {m}" + ("" if aj else " (FD jac)"),
            lambda prob, rtol, m=m, aj=aj: run_scipy(m, prob, rtol, aj),
        )
        for m, aj in SCIPY
    ]
    runners += [
        (
            f"scipy {m} (torch f and jac, as pn's vectorised rows)",
            lambda prob, rtol, m=m: run_scipy_torch_f(m, prob, rtol),
        )
        for m in SCIPY_TORCH_F
    ]
    runners += [
        (
            f"scipy {m} (torch f and jac, as pn's vectorised rows, inference_mode)",
            lambda prob, rtol, m=m: run_scipy_torch_f(m, prob, rtol, "inference_mode"),
        )
        for m in SCIPY_TORCH_F
    ]
    if diffrax_ok:
        runners += [
            (f"diffrax {n}", lambda prob, rtol, n=n: run_diffrax(n, prob, rtol)) for n in DIFFRAX
        ]

    # Interleaved timing: for each problem and rtol, every solver runs once per round (the first
    # round is an untimed warm-up unless a run is slow), so all solvers see the same machine load;
    # the best round counts.
    for prob in PROBLEMS:
        ref = PROBLEMS[prob]["ref"]
        stopped = set()
        for rtol in rtols:
            best = {}
            for rnd in range(repeats + 1):
                for label, fn in runners:
                    if label in stopped or (label in best and best[label].get("final")):
                        continue
                    try:
                        sec, y, steps, extra = fn(prob, rtol)
                    except Exception as e:
                        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")[:160]
                        msg = f"{prob} {label} rtol={rtol:g}: failed: {type(e).__name__}: {first}"
                        notes.append(msg)
                        print(msg, flush=True)
                        stopped.add(label)
                        continue
                    if rnd == 0 and sec < 2.0:
                        continue  # warm-up round
                    b = best.get(label)
                    if b is None or sec < b["sec"]:
                        best[label] = dict(
                            rtol=rtol, err=rel_err(y, ref), sec=sec, steps=steps, final=sec >= 2.0
                        )
            for label, _ in runners:
                if label not in best:
                    continue
                b = best[label]
                results.setdefault((prob, label), []).append(b)
                print(
                    f"{prob:10s} {label:24s} rtol={rtol:.0e} err={b['err']:.2e} "
                    f"time={b['sec'] * 1e3:9.1f} ms steps={b['steps']}",
                    flush=True,
                )
                if b["sec"] > args.budget:
                    stopped.add(label)
                    notes.append(
                        f"{prob} {label}: stopped after rtol={rtol:g} (one solve took "
                        f"{b['sec']:.1f} s > budget {args.budget:g} s)"
                    )

    batched = run_batched(
        200 if args.quick else 1000, [1e-6] if args.quick else [1e-5, 1e-7], diffrax_ok, notes
    )

    dopri = {}
    for prob in PROBLEMS:
        d = run_dopri5_limited(prob, 1e-6, dopri_limit)
        dopri[prob] = d
        print(f"{prob:10s} torchdiffeq dopri5 rtol=1e-6: {d}", flush=True)

    # equal-accuracy ratios vs scipy Radau (analytic Jacobian), and vs scipy Radau given pn's own
    # torch f and jac (the same f cost on both sides) for the vectorised native rows
    ratios = ratios_against(results, "scipy Radau", lambda label: label != "scipy Radau")
    ratios_same_f = ratios_against(
        results,
        "scipy Radau (torch f and jac, as pn's vectorised rows)",
        lambda label: (
            label.startswith("pn.") and "vectorised" in label and "inference_mode" not in label
        ),
    )
    ratios_same_f.update(
        ratios_against(
            results,
            "scipy Radau (torch f and jac, as pn's vectorised rows, inference_mode)",
            lambda label: (
                label.startswith("pn.") and "vectorised" in label and "inference_mode" in label
            ),
        )
    )

    md = render(results, ratios, dopri, notes, rtols, args, dopri_limit, batched, ratios_same_f)
    # a quick run must not overwrite the full results the README quotes
    out = ROOT / "benchmarks" / "results" / ("stiff_quick.md" if args.quick else "stiff.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(md)
    if not args.no_plot:
        plot(
            results,
            ROOT
            / "docs"
            / ("stiff_work_precision_quick.png" if args.quick else "stiff_work_precision.png"),
        )


def _ratio_table(ratios, labels):
    """Markdown rows: one line per solver label, one ratio column per problem ("—" where none)."""
    lines = [
        "| solver | " + " | ".join(PROBLEMS[p]["title"] for p in PROBLEMS) + " |",
        "|---|" + "---|" * len(PROBLEMS),
    ]
    for lab in labels:
        cells = [
            f"{r:.2f}" if (r := ratios.get((p, lab), (None, 0))[0]) is not None else "—"
            for p in PROBLEMS
        ]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines + [""]


def render(
    results, ratios, dopri, notes, rtols, args, dopri_limit, batched=None, ratios_same_f=None
):
    import torch

    lines = ["# Stiff solvers: work–precision", ""]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines.append(
        f"Command: `python benchmarks/stiff.py{' --quick' if args.quick else ''}` — "
        f"{platform.processor() or platform.machine()}, 1 thread, Python "
        f"{platform.python_version()}, "
        f"torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}; load average at the end of "
        f"the run: {load} "
        "(times are the best of up to 3 repeats; other jobs on the machine add noise)."
    )
    lines.append("")
    lines.append(
        "Error = max relative error over the components at the final time vs scipy Radau at rtol "
        "1e-12. "
        "Ratio = wall time at equal accuracy ÷ scipy Radau's (median over Radau's points, log–log "
        "interpolation of each "
        "solver's curve; ≤ 1.0 means no slower than Radau)."
    )
    lines.append("")
    lines.append("## Equal-accuracy time ratio vs scipy Radau (analytic Jacobian)")
    lines.append("")
    labels = sorted(
        {lab for (_, lab) in results if lab != "scipy Radau"},
        key=lambda s: (not s.startswith("pn."), s),
    )
    lines += _ratio_table(ratios, labels)
    if ratios_same_f:
        lines.append("### The same, against scipy Radau given pn's own torch f and jac")
        lines.append("")
        lines.append(
            "scipy Radau calls the vectorised torch f and analytic jac of the pn rows below "
            "through a numpy wrapper, "
            "under the same grad mode (`torch.no_grad()`, or `torch.inference_mode()` for the "
            "rows so marked), "
            "so both sides pay torch's per-call cost for f; the ratio isolates the solvers."
        )
        lines.append("")
        lines += _ratio_table(ratios_same_f, sorted({lab for (_, lab) in ratios_same_f}))
    for p in PROBLEMS:
        lines.append(f"## {PROBLEMS[p]['title']}")
        lines.append("")
        lines.append("| solver | " + " | ".join(f"rtol {r:.0e}" for r in rtols) + " |")
        lines.append("|---|" + "---|" * len(rtols))
        for (pp, lab), rows in results.items():
            if pp != p:
                continue
            byr = {r["rtol"]: r for r in rows}
            cells = []
            for r in rtols:
                x = byr.get(r)
                cells.append(
                    "—" if x is None else f"{x['err']:.1e} / {x['sec'] * 1e3:.0f} ms / {x['steps']}"
                )
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Cells: error / wall time / steps (accepted + rejected).")
        lines.append("")
    if batched and batched["rows"]:
        lines.append(
            f"## {batched['B']} independent Robertson systems (state ({batched['B']}, 3), rate "
            f"constants ×e^U(−0.5, 0.5), t = {batched['T']:g})"
        )
        lines.append("")
        lines.append(
            "Native: one 3×3 Jacobian and LU per system (`batched=True`). scipy: the flattened "
            "system with the analytic "
            "block-diagonal Jacobian as a sparse matrix. diffrax: `jax.vmap` over per-system "
            "solves. "
            "Error vs scipy Radau at rtol 1e-11 on the same system; atol = 1e-4·rtol."
        )
        lines.append("")
        lines.append("| solver | " + " | ".join(f"rtol {r:.0e}" for r in batched["rtols"]) + " |")
        lines.append("|---|" + "---|" * len(batched["rtols"]))
        for lab, byr in batched["rows"].items():
            cells = [
                "—"
                if r not in byr
                else f"{byr[r]['err']:.1e} / {byr[r]['sec'] * 1e3:.0f} ms / {byr[r]['steps']}"
                for r in batched["rtols"]
            ]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("## torchdiffeq dopri5 (explicit), rtol 1e-6, wall-time limit")
    lines.append("")
    lines.append("| problem | finished | wall time | t reached / t end | f evaluations |")
    lines.append("|---|---|---|---|---|")
    for p, d in dopri.items():
        lines.append(
            f"| {PROBLEMS[p]['title']} | "
            f"{'yes' if d['finished'] else f'no (killed at {dopri_limit:g} s)'} | "
            f"{d['seconds']:.1f} s | {d['t_reached']:.4g} / {d['T']:g} | {d['nfe']:,} |"
        )
    lines.append("")
    if notes:
        lines.append("## Notes")
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
        lines.append("")
    return "\n".join(lines)


#: the series the figure draws in colour and names in its legend (the best configuration of each
#: family, the defaults and the peers); the other rows of the table are drawn as thin grey lines
HIGHLIGHT = {
    "pn.Rodas5P (vectorised f, analytic jac)": ("tab:blue", "-o"),
    "pn.Rodas5P (vectorised f, analytic jac, inference_mode)": ("tab:cyan", "-o"),
    "pn.Rodas4 (vectorised f, analytic jac)": ("tab:purple", "-o"),
    "pn.Rodas5P": ("tab:blue", ":o"),
    "pn.KenCarp4": ("tab:orange", "-D"),
    "pn.Kvaerno5": ("tab:brown", "-D"),
    "pn.QNDF": ("tab:olive", "-v"),
    "scipy Radau": ("black", "--s"),
    "scipy Radau (torch f and jac, as pn's vectorised rows)": ("grey", "--s"),
    "scipy BDF": ("tab:pink", "--s"),
    "scipy LSODA": ("tab:gray", "--x"),
    "diffrax Kvaerno5": ("tab:red", "-.^"),
}


def results_from_table(md: str):
    """``{(problem, label): [dict(err, sec)]}`` read back from the per-problem tables of a saved
    ``stiff.md`` (cells ``error / time / steps``), for ``--replot``."""
    titles = {PROBLEMS[p]["title"]: p for p in PROBLEMS}
    results, prob = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            prob = titles.get(line[3:].strip())
            continue
        if prob is None or not line.startswith("| ") or line.startswith("| solver"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows = []
        for cell in cells[1:]:
            parts = [x.strip() for x in cell.split("/")]
            if len(parts) == 3 and parts[1].endswith(" ms"):
                rows.append(dict(err=float(parts[0]), sec=float(parts[1][:-3]) / 1e3))
        if rows:
            results[(prob, cells[0])] = rows
    return results


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(12, 6.2))
    handles = {}
    for ax, p in zip(axes, PROBLEMS):
        for (pp, lab), rows in results.items():
            if pp != p or not rows:
                continue
            xs, ys = [r["sec"] for r in rows], [r["err"] for r in rows]
            if lab in HIGHLIGHT:
                color, style = HIGHLIGHT[lab]
                (h,) = ax.loglog(xs, ys, style, color=color, label=lab, ms=4, lw=1.6, zorder=3)
                handles.setdefault(lab, h)
            else:
                (h,) = ax.loglog(
                    xs,
                    ys,
                    "-",
                    color="0.75",
                    lw=0.8,
                    zorder=1,
                    label="other configurations (see the table)",
                )
                handles.setdefault("other", h)
        ax.set_title(PROBLEMS[p]["title"])
        ax.set_xlabel("wall time of one solve (s), 1 thread")
        ax.set_ylabel("max relative error at the final time")
        ax.grid(True, which="both", alpha=0.3)
    order = [lab for lab in HIGHLIGHT if lab in handles] + (["other"] if "other" in handles else [])
    fig.legend(
        [handles[k] for k in order],
        [handles[k].get_label() for k in order],
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("Stiff work–precision: lower left is better (benchmarks/stiff.py)", fontsize=11)
    fig.tight_layout(rect=(0, 0.17, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
