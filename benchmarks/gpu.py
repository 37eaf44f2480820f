"""Per-sample stepping (issue 22) against shared steps, torchdiffeq and torchode; CUDA when present.

Problems (float64 on the CPU, float32 on CUDA; Dopri5 everywhere, rtol = 1e-6, atol = 1e-8,
the integral controller, Hairer's initial step):

(a) Van der Pol, batch 256, μ spread over [0.1, 10], y0 = (2, 0), t ∈ [0, 10];
(b) Van der Pol, batch 256, μ ∈ [0.1, 2] with one outlier μ = 100 (stiff-ish), t ∈ [0, 10];
(c) an MLP field (16 → 64 → 64 → 16, tanh) with a per-sample speed s ∈ [0.1, 10] (log-spread):
    dx/dt = s · MLP(x), batch 4096, t ∈ [0, 1]: a field whose rows cost real work.

μ and s are carried in the state (a zero derivative), so every row is independent and
``per_sample="compact"`` applies. Methods: ``pn.solve`` with shared steps, ``per_sample=True``
(mask: every row evaluated, finished rows take steps of 0) and ``per_sample="compact"`` (only the
running rows evaluated); torchdiffeq ``dopri5`` (shared steps); torchode ``Dopri5`` with
``AutoDiffAdjoint`` (per-sample steps, every row evaluated). On the CPU the two per-sample modes
are timed twice: with the decisions of every step in one compiled kernel (the CPU default with
numba installed, ``pyneuralode/_per_sample_host.py``) and with the tensor decisions (what CUDA runs,
and the CPU without numba). Columns: per-sample evaluations summed over the batch (= what 256
independent solves take, checked on (a) and (b) by solving them one by one),
rows evaluated (what the batch actually computed), batched steps (loop iterations), wall and
process CPU time (best of ``--repeats``, forward without gradients), and the loop time (wall and
CPU) per batched step. The targets table compares per-sample evaluations with independent solves and
wall time with the shared-step solve and torchode, in the same run.

    python benchmarks/gpu.py             # full run (a few minutes on one core; less on a GPU)
    python benchmarks/gpu.py --quick     # smoke version (small batches, short spans)
    python benchmarks/gpu.py --floor     # plus mask mode's steps without the loop's decisions

``--floor`` adds a row per problem: the same number of batched steps of the solver's step on the
per-sample field (f on every row, stage times, per-row scaling) with none of the loop's decisions
(error norm, controller, accept, bookkeeping, the sync): what per-sample stepping cannot go below
on these steps; its ratio to torchode bounds what faster decisions could reach.

Writes ``benchmarks/results/gpu.md`` (``--quick``: ``gpu_quick.md``, or ``--out``).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pyneuralode as pn  # noqa: E402

RTOL, ATOL = 1e-6, 1e-8
TENSOR_MASK = "pyneuralode per_sample=True (mask), tensor decisions"
TENSOR_COMPACT = "pyneuralode per_sample='compact', tensor decisions"


def vdp(t, y):
    x, v, mu = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([v, mu * (1 - x * x) * v - x, torch.zeros_like(x)], -1)


def vdp_batch(mu, dtype, device):
    y = torch.zeros(mu.numel(), 3, dtype=dtype, device=device)
    y[:, 0] = 2.0
    y[:, 2] = mu.to(dtype)
    return y


class SpeedMLP(nn.Module):
    """dx/dt = s · MLP(x) with the per-sample speed s in the last column of the state."""

    def __init__(self, dim=16, hidden=64):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, dim),
        )

    def forward(self, t, y):
        x, s = y[..., :-1], y[..., -1:]
        return torch.cat([s * self.net(x), torch.zeros_like(s)], -1)


class Counted:
    """Counts calls and rows of f (the peers' evaluations)."""

    def __init__(self, f):
        self.f, self.calls, self.rows = f, 0, 0

    def __call__(self, t, y):
        self.calls += 1
        self.rows += y.shape[0]
        return self.f(t, y)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run, device, repeats):
    best_wall = best_cpu = math.inf
    out = None
    for _ in range(repeats):
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = run()
        sync(device)
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return out, best_wall, best_cpu


def methods(f, y0, t1, device):
    """name -> run() returning (sum of per-sample evaluations, rows evaluated, batched steps)."""
    B = y0.shape[0]
    t = torch.tensor([0.0, t1], dtype=y0.dtype, device=device)
    out = {}

    def ours(per_sample):
        def run():
            with torch.no_grad():
                sol = pn.solve(f, y0, t, pn.Dopri5(), rtol=RTOL, atol=ATOL, per_sample=per_sample)
            if per_sample is False:
                n = sol.stats["nfe"]
                return B * n, B * n, sol.stats["naccept"] + sol.stats["nreject"]
            return int(sol.stats["nfe"].sum()), sol.stats["nrows"], sol.stats["nsteps"]

        return run

    out["pyneuralode shared steps"] = ours(False)
    out["pyneuralode per_sample=True (mask)"] = ours(True)
    out["pyneuralode per_sample='compact'"] = ours("compact")
    if device.type == "cpu":  # the tensor decisions CUDA runs (and the CPU without numba)
        from pyneuralode import _per_sample_host

        def tensor_decisions(mode):
            run = ours(mode)

            def run_tensor():
                enabled, _per_sample_host.ENABLED = _per_sample_host.ENABLED, False
                try:
                    return run()
                finally:
                    _per_sample_host.ENABLED = enabled

            return run_tensor

        out[TENSOR_MASK] = tensor_decisions(True)
        out[TENSOR_COMPACT] = tensor_decisions("compact")
    try:
        import torchdiffeq

        def tde():
            g = Counted(f)
            with torch.no_grad():
                torchdiffeq.odeint(g, y0, t, rtol=RTOL, atol=ATOL, method="dopri5")
            return B * g.calls, g.rows, (g.calls - 2) // 6

        out["torchdiffeq dopri5"] = tde
    except ImportError:
        pass
    try:
        import torchode as to

        def tode():
            term = to.ODETerm(f)
            adj = to.AutoDiffAdjoint(
                to.Dopri5(term=term), to.IntegralController(atol=ATOL, rtol=RTOL, term=term)
            )
            with torch.no_grad():
                sol = adj.solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(B, 2)))
            st = sol.stats
            return int(st["n_f_evals"].sum()), None, int(st["n_steps"].max())

        out["torchode Dopri5"] = tode
    except ImportError:
        pass
    return out


def step_floor(f, y0, t1, steps, device, repeats):
    """Wall and CPU time of ``steps`` per-sample steps of the whole batch without the loop's
    decisions: the solver's step on the rescaled field (``_loop._StepField``: the stage times and
    the per-row scaling, f on every row), chained by FSAL with a fixed step. What mask mode
    cannot go below on these steps, however cheap its decisions."""
    from pyneuralode._loop import _StepField

    solver = pn.Dopri5()
    B = y0.shape[0]
    t = torch.zeros(B, dtype=torch.float64, device=device)
    h = torch.full((B,), t1 / steps, dtype=torch.float64, device=device)
    hy = h.to(y0.dtype).view(-1, *([1] * (y0.dim() - 1)))
    cs = sorted({float(c) for c in solver.tableau.c if c} | {1.0})
    nodes, node_values = {c: i for i, c in enumerate(cs)}, torch.tensor(cs, dtype=torch.float64)
    node_values = node_values.to(device)

    def run():
        with torch.no_grad():
            y, fraw = y0, f(t, y0)
            for _ in range(steps):
                field = _StepField(f, t, h, hy, nodes, node_values)
                y = solver.step(field, 0.0, y, 1.0, hy * fraw).y1
                fraw = field.last
        return y

    run()
    _, wall, cpu = timed(run, device, repeats)
    return wall, cpu


def independent_evaluations(f, y0, t1, limit):
    """Evaluations of solving the first ``limit`` samples one by one (and the batch's estimate)."""
    t = torch.tensor([0.0, t1], dtype=y0.dtype, device=y0.device)
    n = min(limit, y0.shape[0])
    with torch.no_grad():
        nfe = [
            pn.solve(f, y0[b : b + 1], t, pn.Dopri5(), rtol=RTOL, atol=ATOL).stats["nfe"]
            for b in range(n)
        ]
    return sum(nfe), n


def run_problem(name, f, y0, t1, device, repeats, check_independent, floor=False):
    rows = []
    for label, run in methods(f, y0, t1, device).items():
        run()  # warm-up (allocator, lazy imports)
        (evals, nrows, steps), wall, cpu = timed(run, device, repeats)
        rows.append(
            {
                "problem": name,
                "method": label,
                "evals": int(evals),
                "rows": None if nrows is None else int(nrows),
                "steps": int(steps),
                "wall": wall,
                "cpu": cpu,
                "per_step_ms": 1e3 * wall / max(int(steps), 1),
                "cpu_per_step_ms": 1e3 * cpu / max(int(steps), 1),
            }
        )
    if floor:
        mask = next(r for r in rows if r["method"].endswith("(mask)"))
        wall, cpu = step_floor(f, y0, t1, mask["steps"], device, repeats)
        rows.append(
            {
                "problem": name,
                "method": "step alone (mask mode's steps, no decisions)",
                "evals": mask["evals"],
                "rows": mask["rows"],
                "steps": mask["steps"],
                "wall": wall,
                "cpu": cpu,
                "per_step_ms": 1e3 * wall / max(mask["steps"], 1),
                "cpu_per_step_ms": 1e3 * cpu / max(mask["steps"], 1),
            }
        )
    indep = None
    if check_independent:
        indep, n = independent_evaluations(f, y0, t1, check_independent)
        per_sample = next(r for r in rows if r["method"].endswith("(mask)"))
        # the same first n samples of the per-sample solve
        t = torch.tensor([0.0, t1], dtype=y0.dtype, device=device)
        with torch.no_grad():
            sub = pn.solve(f, y0[:n], t, pn.Dopri5(), rtol=RTOL, atol=ATOL, per_sample=True)
        indep = (indep, int(sub.stats["nfe"].sum()), n, per_sample["evals"])
    return rows, indep


def fmt(x, nd=3):
    return "–" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batches and spans (seconds)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="Van der Pol batch of (a) and (b) (default 256; --quick: 32)",
    )
    ap.add_argument(
        "--t-vdp", type=float, default=None, help="Van der Pol end time (default 10; --quick: 3)"
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also time mask mode's steps without the loop's decisions (the floor)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    q = args.quick
    repeats = args.repeats or (1 if q else 3)
    B, B_mlp = (32, 256) if q else (256, 4096)
    t_vdp, t_mlp = (3.0, 0.5) if q else (10.0, 1.0)
    B = args.batch or B
    t_vdp = args.t_vdp or t_vdp
    mu_a = torch.linspace(0.1, 10.0, B)
    mu_b = torch.linspace(0.1, 2.0, B)
    mu_b[B // 2] = 100.0
    g = torch.Generator().manual_seed(0)
    speeds = torch.exp(torch.empty(B_mlp).uniform_(math.log(0.1), math.log(10.0), generator=g))
    mlp = SpeedMLP().to(device=device, dtype=dtype)
    x0 = torch.randn(B_mlp, 16, generator=g).to(device=device, dtype=dtype)
    y_mlp = torch.cat([x0, speeds.to(device=device, dtype=dtype)[:, None]], 1)
    problems = [
        (
            f"(a) Van der Pol, batch {B}, μ ∈ [0.1, 10]",
            vdp,
            vdp_batch(mu_a, dtype, device),
            t_vdp,
            8 if q else B,
        ),
        (
            f"(b) Van der Pol, batch {B}, μ ∈ [0.1, 2] + one μ = 100",
            vdp,
            vdp_batch(mu_b, dtype, device),
            t_vdp,
            8 if q else B,
        ),
        (f"(c) MLP field × speed ∈ [0.1, 10], batch {B_mlp}", mlp, y_mlp, t_mlp, 0),
    ]
    all_rows, checks = [], {}
    for name, f, y0, t1, check in problems:
        print(f"{name} ...", flush=True)
        rows, indep = run_problem(name, f, y0, t1, device, repeats, check, args.floor)
        all_rows += rows
        if indep is not None:
            checks[name] = indep
    lines = [
        f"# Per-sample stepping: {device.type} ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {dtype}, {torch.get_num_threads()} threads)",
        "",
        f"`python benchmarks/gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"Dopri5, rtol={RTOL}, "
        f"atol={ATOL}; forward without gradients; best of {repeats}.",
        "",
        "| problem | method | evaluations (Σ samples) | rows evaluated | batched steps "
        "| wall (s) | CPU (s) | loop time per step (ms) | CPU per step (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in all_rows:
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['evals']} | {fmt(r['rows'])} | "
            f"{r['steps']} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['per_step_ms']:.3f} | "
            f"{r['cpu_per_step_ms']:.3f} |"
        )
    lines += [
        "",
        "## Targets (issue 22), same run",
        "",
        "| problem | evaluations ÷ independent solves | wall (CPU) ÷ shared-step solve "
        "| wall (CPU) ÷ torchode | (mode) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, *_ in problems:
        rs = {r["method"]: r for r in all_rows if r["problem"] == name}
        shared = rs["pyneuralode shared steps"]
        tode = rs.get("torchode Dopri5")
        modes = ["pyneuralode per_sample=True (mask)", "pyneuralode per_sample='compact'"]
        modes += [m for m in (TENSOR_MASK, TENSOR_COMPACT) if m in rs]
        floor_label = "step alone (mask mode's steps, no decisions)"
        if floor_label in rs:
            modes.append(floor_label)
        for mode in modes:
            r = rs[mode]
            ratio_e = "–"
            if name in checks and mode.startswith("pyneuralode"):
                indep, sub, n, _ = checks[name]
                ratio_e = f"{sub / indep:.3f} (first {n} samples solved one by one)"
            vs_tode = (
                "–"
                if tode is None
                else (f"{r['wall'] / tode['wall']:.2f} ({r['cpu'] / tode['cpu']:.2f})")
            )
            lines.append(
                f"| {name} | {ratio_e} | {r['wall'] / shared['wall']:.2f} "
                f"({r['cpu'] / shared['cpu']:.2f}) | {vs_tode} | "
                f"{mode.split(' ', 1)[1] if mode.startswith('pyneuralode') else mode} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / ("gpu_quick.md" if q else "gpu.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
