"""The native engine against torchdiffeq, torchode and scipy: NFE, wall time, solver overhead.

(a) A batched MLP neural ODE (batch 256, state 16, hidden 64, tanh, t ∈ [0, 1],
    rtol = atol = 1e-6) in float32 and float64: NFE, forward time (no grad) and forward+backward
    time with plain backprop through the solver (our ``DirectAdjoint``, torchdiffeq's ``odeint``,
    torchode's ``AutoDiffAdjoint``).
(b) Lotka–Volterra (2 states, t ∈ [0, 10], rtol = 1e-6, atol = 1e-9, float64): time per solve,
    also against scipy ``solve_ivp`` (RK45, DOP853).

Every library gets the same module (same weights), the same tolerances, the same dtype and
(apart from scipy) the same initial step-size heuristic (Hairer's). Timings are medians over
round-robin repeats on one thread, reported as ratios to torchdiffeq's dopri5 (the machines are
noisy; ratios are what carries over). NFE are counted in separate, untimed runs with a counting
wrapper around ``f``; the solver overhead (time outside ``f``) comes from one more untimed run
with a timing wrapper around ``f``. The error column is the max-abs error of y(T) against a
float64 reference (torchdiffeq ``dopri8`` / scipy ``DOP853`` at rtol = atol = 1e-12), so that
"faster" never means "less accurate" unnoticed.

    python benchmarks/engine_vs_peers.py            # full run (about 1-2 minutes on 1 free core)
    python benchmarks/engine_vs_peers.py --quick    # smoke version (seconds)

Writes ``benchmarks/results/engine_vs_peers.md`` and ``.json`` (``--quick``: ``*_quick.*``
unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pyneuralode as pn  # noqa: E402

# (a)
BATCH, DIM, HIDDEN, T1_A = 256, 16, 64, 1.0
RTOL_A = ATOL_A = 1e-6
WEIGHT_GAIN = (
    3.0  # default-initialised weights × this: non-trivial dynamics (≈ 10-20 steps on [0, 1])
)
# (b)
LV = (1.5, 1.0, 3.0, 1.0)  # a, b, c, d: x' = a x - b x y, y' = -c y + d x y
T1_B = 10.0
RTOL_B, ATOL_B = 1e-6, 1e-9

REF = "torchdiffeq dopri5"
PI_CONTROL = (
    pn.PIController()
)  # SciML's PI gains (beta1=0.7, beta2=0.4); the default for explicit solvers is integral control
PI_TSIT5, PI_DOPRI5 = "pyneuralode Tsit5, SciML PI*", "pyneuralode Dopri5, SciML PI*"


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------
def make_mlp(dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(WEIGHT_GAIN)
    return net.to(dtype)


class MLPField(nn.Module):
    """f(t, y) = MLP(y); the same module object (same weights) is handed to every library."""

    def __init__(self, dtype):
        super().__init__()
        self.net = make_mlp(dtype)

    def forward(self, t, y):
        return self.net(y)


class LotkaVolterra(nn.Module):
    """x' = a x - b x y, y' = -c y + d x y written as y ⊙ (p + q ⊙ flip(y)): four tensor ops."""

    def __init__(self, shape=(2,)):
        super().__init__()
        a, b, c, d = LV
        self.register_buffer("p", torch.tensor([a, -c], dtype=torch.float64).reshape(shape))
        self.register_buffer("q", torch.tensor([-b, d], dtype=torch.float64).reshape(shape))

    def forward(self, t, y):
        return y * torch.addcmul(self.p, self.q, y.flip(-1))


def lv_numpy(t, y):
    a, b, c, d = LV
    x, z = y
    return np.array([a * x - b * x * z, -c * z + d * x * z])


class Counted:
    """Wraps f: counts calls and (optionally) the time spent inside f."""

    def __init__(self, f, timed=False):
        self.f, self.timed, self.n, self.seconds = f, timed, 0, 0.0

    def __call__(self, t, y, *args):
        self.n += 1
        if not self.timed:
            return self.f(t, y, *args)
        t0 = time.perf_counter()
        out = self.f(t, y, *args)
        self.seconds += time.perf_counter() - t0
        return out


# ---------------------------------------------------------------------------------------------
# the solvers: each entry maps (f, y0, t) -> y(T)
# ---------------------------------------------------------------------------------------------
def torch_methods(rtol, atol, batch_for_torchode):
    out = {}
    try:
        import torchdiffeq

        out[REF] = lambda f, y0, t: torchdiffeq.odeint(
            f, y0, t, method="dopri5", rtol=rtol, atol=atol
        )[-1]
    except ImportError:
        pass
    out["pyneuralode Tsit5"] = lambda f, y0, t: pn.solve(
        f, y0, t, pn.Tsit5(), rtol=rtol, atol=atol
    ).ys[-1]
    out["pyneuralode Dopri5"] = lambda f, y0, t: pn.solve(
        f, y0, t, pn.Dopri5(), rtol=rtol, atol=atol
    ).ys[-1]
    # The default for explicit solvers is integral control, err^(-1/5) (torchdiffeq's, diffrax's,
    # scipy's). The same solvers with SciML's PI gains: more cautious, so more accurate at a
    # tolerance.
    out[PI_TSIT5] = lambda f, y0, t: pn.solve(
        f, y0, t, pn.Tsit5(), rtol=rtol, atol=atol, controller=PI_CONTROL
    ).ys[-1]
    out[PI_DOPRI5] = lambda f, y0, t: pn.solve(
        f, y0, t, pn.Dopri5(), rtol=rtol, atol=atol, controller=PI_CONTROL
    ).ys[-1]
    try:
        import torchode as to

        def torchode_tsit5(f, y0, t):
            # torchode wants (batch, features) states and per-sample times; it adapts each sample's
            # step.
            y = y0 if batch_for_torchode else y0.unsqueeze(0)
            term = to.ODETerm(f)
            adj = to.AutoDiffAdjoint(
                to.Tsit5(term=term), to.IntegralController(atol=atol, rtol=rtol, term=term)
            )
            sol = adj.solve(
                to.InitialValueProblem(y0=y, t_eval=t.to(y.dtype).expand(y.shape[0], -1))
            )
            yT = sol.ys[:, -1]
            return yT if batch_for_torchode else yT[0]

        out["torchode tsit5"] = torchode_tsit5
    except ImportError:
        pass
    return out


def scipy_methods():
    try:
        from scipy.integrate import solve_ivp
    except ImportError:
        return {}

    def make(method):
        def run(f, y0, t):
            r = solve_ivp(
                f, (float(t[0]), float(t[-1])), y0, method=method, rtol=RTOL_B, atol=ATOL_B
            )
            return r.y[:, -1]

        return run

    return {"scipy RK45": make("RK45"), "scipy DOP853": make("DOP853")}


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------
def round_robin(fns: dict, repeat: int, inner: int = 1) -> dict:
    """Median seconds per call of each fn, timed ``repeat`` times in interleaved order."""
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for r in range(repeat):
        gc.collect()
        keys = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for k in keys:
            fn = fns[k]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def overhead_share(run, f, y0, t, reps=7):
    """Share of a no-grad forward solve spent outside f (solver overhead): median over ``reps``
    solves."""
    shares = []
    for _ in range(reps):
        cf = Counted(f, timed=True)
        with torch.no_grad():
            t0 = time.perf_counter()
            run(cf, y0, t)
            total = time.perf_counter() - t0
        shares.append((total - cf.seconds) / total)
    return statistics.median(shares)


# ---------------------------------------------------------------------------------------------
# (a) batched MLP neural ODE
# ---------------------------------------------------------------------------------------------
def bench_mlp(dtype, repeat):
    f = MLPField(dtype)
    y0 = torch.randn(
        BATCH, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).to(dtype)
    t = torch.tensor([0.0, T1_A], dtype=dtype)
    methods = torch_methods(RTOL_A, ATOL_A, batch_for_torchode=True)

    # reference y(T): float64, rtol = atol = 1e-12
    f64 = MLPField(torch.float64)
    with torch.no_grad():
        try:
            import torchdiffeq

            yref = torchdiffeq.odeint(
                f64, y0.double(), t.double(), method="dopri8", rtol=1e-12, atol=1e-12
            )[-1]
        except ImportError:
            yref = pn.solve(f64, y0.double(), t.double(), pn.DP8(), rtol=1e-12, atol=1e-12).ys[-1]

    rows = {}
    for k, run in methods.items():
        cf = Counted(f)
        with torch.no_grad():
            yT = run(cf, y0, t)
        nfe = cf.n
        err = (yT.double() - yref).abs().max().item()
        rows[k] = dict(nfe=nfe, err=err, overhead=overhead_share(run, f, y0, t))

    def fwd(run):
        def go():
            with torch.no_grad():
                run(f, y0, t)

        return go

    def fwd_bwd(run):
        def go():
            f.zero_grad(set_to_none=True)
            yy = y0.detach().requires_grad_(True)
            run(f, yy, t).square().mean().backward()

        return go

    # gradients agree?
    grads = {}
    for k, run in methods.items():
        fwd_bwd(run)()
        grads[k] = torch.cat([p.grad.reshape(-1) for p in f.parameters()]).double()
    tf = round_robin({k: fwd(r) for k, r in methods.items()}, repeat)
    tb = round_robin({k: fwd_bwd(r) for k, r in methods.items()}, repeat)
    g_ref = grads.get(REF)
    for k in methods:
        rows[k]["fwd_s"] = tf[k]
        rows[k]["fwdbwd_s"] = tb[k]
        rows[k]["grad_rel_diff"] = (
            ((grads[k] - g_ref).norm() / g_ref.norm()).item() if g_ref is not None else float("nan")
        )
    return rows


# ---------------------------------------------------------------------------------------------
# (b) Lotka–Volterra
# ---------------------------------------------------------------------------------------------
def bench_lv(repeat, inner):
    f = LotkaVolterra()
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    t = torch.tensor([0.0, T1_B], dtype=torch.float64)
    y0np, tnp = y0.numpy().copy(), t.numpy().copy()
    from scipy.integrate import solve_ivp

    yref = solve_ivp(lv_numpy, (0.0, T1_B), y0np, method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]

    tm = torch_methods(RTOL_B, ATOL_B, batch_for_torchode=False)
    # torchode wants a (batch, 2) state: give it a module whose buffers broadcast the same way
    f_batched = LotkaVolterra(shape=(1, 2))
    sm = scipy_methods()
    calls = {}
    rows = {}
    for k, run in tm.items():
        ff = f_batched if k.startswith("torchode") else f
        calls[k] = lambda run=run, ff=ff: run(ff, y0, t)
        cf = Counted(ff)
        with torch.no_grad():
            yT = run(cf, y0, t)
        rows[k] = dict(
            nfe=cf.n,
            err=float(np.abs(yT.numpy() - yref).max()),
            overhead=overhead_share(run, ff, y0, t),
        )
    for k, run in sm.items():
        calls[k] = lambda run=run: run(lv_numpy, y0np, tnp)
        cf = Counted(lv_numpy)
        yT = run(cf, y0np, tnp)
        rows[k] = dict(
            nfe=cf.n,
            err=float(np.abs(yT - yref).max()),
            overhead=overhead_share(run, lv_numpy, y0np, tnp),
        )

    def no_grad(fn):
        def go():
            with torch.no_grad():
                fn()

        return go

    ts = round_robin({k: no_grad(c) for k, c in calls.items()}, repeat, inner)
    for k in calls:
        rows[k]["solve_s"] = ts[k]
    return rows


# ---------------------------------------------------------------------------------------------
# (c) NFE at equal accuracy: a tolerance sweep (no timing)
# ---------------------------------------------------------------------------------------------
def bench_accuracy(rtols):
    """NFE and max error of y(T) over ``rtols`` (float64) for (a) (atol = rtol) and (b) (atol =
    1e-9)."""
    from scipy.integrate import solve_ivp

    fm = MLPField(torch.float64)
    ym = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tm = torch.tensor([0.0, T1_A], dtype=torch.float64)
    flv = LotkaVolterra()
    ylv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    tlv = torch.tensor([0.0, T1_B], dtype=torch.float64)
    with torch.no_grad():
        try:
            import torchdiffeq

            refm = torchdiffeq.odeint(fm, ym, tm, method="dopri8", rtol=1e-12, atol=1e-12)[-1]
        except ImportError:
            refm = pn.solve(fm, ym, tm, pn.DP8(), rtol=1e-12, atol=1e-12).ys[-1]
    reflv = torch.from_numpy(
        solve_ivp(lv_numpy, (0.0, T1_B), ylv.numpy(), method="DOP853", rtol=1e-13, atol=1e-13).y[
            :, -1
        ]
    )
    out = {}
    for name, f, y0, t, ref, atol_of in (
        ("(a) MLP, float64, atol = rtol", fm, ym, tm, refm, lambda r: r),
        ("(b) Lotka–Volterra, atol = 1e-9", flv, ylv, tlv, reflv, lambda r: ATOL_B),
    ):
        rows = {}
        for rtol in rtols:
            for k, run in torch_methods(rtol, atol_of(rtol), batch_for_torchode=True).items():
                if k.startswith("torchode"):
                    continue
                cf = Counted(f)
                with torch.no_grad():
                    yT = run(cf, y0, t)
                rows.setdefault(k, []).append((rtol, cf.n, (yT - ref).abs().max().item()))
        out[name] = rows
    return out


def table_c(results) -> list:
    lines = []
    for name, rows in results.items():
        rtols = [r for r, _, _ in next(iter(rows.values()))]
        lines += [
            f"**{name}** — NFE (max error of y(T))",
            "",
            "| method | " + " | ".join(f"rtol {r:g}" for r in rtols) + " |",
            "|---|" + "---:|" * len(rtols),
        ]
        for k, cells in rows.items():
            lines.append(f"| {k} | " + " | ".join(f"{n} ({e:.1e})" for _, n, e in cells) + " |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _ratio(x, ref):
    return x / ref if ref and math.isfinite(ref) else float("nan")


def table_a(results) -> list:
    lines = [
        "| dtype | method | NFE | forward ms | ÷ torchdiffeq | fwd+bwd ms | ÷ torchdiffeq | "
        "overhead (outside f) | max err y(T) | grad rel. diff vs torchdiffeq |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dt_name, rows in results.items():
        ref = rows.get(REF, {})
        for k, r in rows.items():
            lines.append(
                f"| {dt_name} | {k} | {r['nfe']} | {1e3 * r['fwd_s']:.2f} | "
                f"{_ratio(r['fwd_s'], ref.get('fwd_s')):.2f} | "
                f"{1e3 * r['fwdbwd_s']:.2f} | {_ratio(r['fwdbwd_s'], ref.get('fwdbwd_s')):.2f} | "
                f"{100 * r['overhead']:.0f}% | {r['err']:.1e} | {r['grad_rel_diff']:.1e} |"
            )
    return lines


def table_b(rows) -> list:
    ref = rows.get(REF, {})
    lines = [
        "| method | NFE | ms per solve | ÷ torchdiffeq | overhead (outside f) | max err y(T) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, r in rows.items():
        lines.append(
            f"| {k} | {r['nfe']} | {1e3 * r['solve_s']:.3f} | "
            f"{_ratio(r['solve_s'], ref.get('solve_s')):.2f} | "
            f"{100 * r['overhead']:.0f}% | {r['err']:.1e} |"
        )
    return lines


def versions() -> str:
    v = [f"torch {torch.__version__}"]
    for mod in ("torchdiffeq", "torchode", "scipy"):
        try:
            v.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            v.append(f"{mod} (not installed)")
    return ", ".join(v) + f"; Python {platform.python_version()}, {platform.machine()}, 1 thread"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke version: few repeats (seconds)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed repeats per configuration (default 21; --quick 2)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the .md/.json results (default benchmarks/results)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    repeat = args.repeat or (2 if args.quick else 21)
    inner = 1 if args.quick else 5

    t_start = time.perf_counter()
    res_a = {}
    for dtype, name in ((torch.float32, "float32"), (torch.float64, "float64")):
        res_a[name] = bench_mlp(dtype, repeat)
        print(f"(a) {name} done", file=sys.stderr)
    res_b = bench_lv(repeat, inner)
    print("(b) done", file=sys.stderr)
    res_c = bench_accuracy([1e-5, 1e-6] if args.quick else [1e-4, 1e-5, 1e-6, 1e-7, 1e-8])
    elapsed = time.perf_counter() - t_start

    cmd = "python benchmarks/engine_vs_peers.py" + (" --quick" if args.quick else "")
    text = "\n".join(
        [
            "# The native engine against torchdiffeq, torchode and scipy",
            "",
            f"Command: `{cmd}` ({versions()}; {elapsed:.0f} s). Times are medians over {repeat} "
            "round-robin repeats;"
            " ratios are to torchdiffeq's dopri5 (< 1 is faster).",
            "",
            f"## (a) Batched MLP neural ODE: batch {BATCH}, state {DIM}, hidden {HIDDEN} (tanh), "
            f"t ∈ [0, {T1_A:g}], rtol = atol = {RTOL_A:g}",
            "",
            "Forward: no-grad solve. Fwd+bwd: solve + `loss = mean(y(T)²)` + `backward()` through "
            "the solver"
            " (pyneuralode `DirectAdjoint`, torchdiffeq `odeint`, torchode `AutoDiffAdjoint`)."
            " Overhead: share of a no-grad solve spent outside f (median of 7 solves with a timer "
            "around f)."
            " The fwd+bwd times include f's own backward, so NFE weigh most there. torchode "
            "adapts every sample's step separately"
            " (its design), so its NFE count calls of f on the whole batch.",
            "",
            *table_a(res_a),
            "",
            f"## (b) Lotka–Volterra: 2 states, t ∈ [0, {T1_B:g}], rtol = {RTOL_B:g}, atol = "
            f"{ATOL_B:g}, float64",
            "",
            *table_b(res_b),
            "",
            "## (c) NFE at equal accuracy: a tolerance sweep (float64, untimed)",
            "",
            "Equal tolerances do not mean equal accuracy: different methods have different error "
            "estimates,"
            " and SciML's PI controller takes smaller steps than the integral controller and "
            "lands well below the"
            " tolerance. Compare NFE at equal error by reading across the rows.",
            "",
            *table_c(res_c),
            "\\* `controller=pn.PIController()`: SciML's PI gains (beta1=0.7, beta2=0.4). The "
            "default for explicit"
            " solvers is integral control with exponent 1/5 (`PIController(beta1=1, beta2=0)`), "
            "torchdiffeq's controller.",
            "",
        ]
    )
    print(text)
    out = args.out or (HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    stem = "engine_vs_peers" + ("_quick" if args.quick and args.out is None else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "command": cmd,
                "versions": versions(),
                "repeat": repeat,
                "mlp": res_a,
                "lotka_volterra": res_b,
                "accuracy_sweep": res_c,
            },
            indent=1,
        )
    )
    return res_a, res_b, res_c


if __name__ == "__main__":
    main()
