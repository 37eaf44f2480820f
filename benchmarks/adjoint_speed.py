"""Forward+backward time (CPU) of every sensealg against torchdiffeq's ``odeint_adjoint``, and the
seminorm.

Batched MLP neural ODEs (float32, Dopri5 in both libraries, the same rtol/atol for the forward and
the backward pass, loss = mean or sum of the squared final state), 1 thread. Each configuration is
timed ``--repeat`` times round-robin (so background load hits all methods alike); the table gives
the minimum. NFE are counted in a separate, untimed run.

    python benchmarks/adjoint_speed.py            # three problems × two losses, 5 repeats
    python benchmarks/adjoint_speed.py --quick    # the plain problem, 3 repeats

Writes benchmarks/results/adjoint_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pyneuralode as pn  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6


class Field(nn.Module):
    """A tanh MLP, optionally plus a rotation (keeps the trajectory moving); counts its
    evaluations."""

    def __init__(self, dim, hidden, rot=2.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        S = torch.randn(dim, dim)
        self.register_buffer("A", rot * (S - S.T) / max(dim, 2) ** 0.5)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, dim),
        )
        self.count = False
        self.nfe = 0

    def forward(self, t, y):
        if self.count:
            self.nfe += 1
        return y @ self.A.T + self.net(y)


PROBLEMS = {
    "plain": dict(batch=256, dim=2, hidden=64, T=3.0, rot=0.0),
    "small": dict(batch=256, dim=2, hidden=64, T=4.0, rot=2.0),
    "wide": dict(batch=128, dim=16, hidden=256, T=2.0, rot=2.0),
}


def methods():
    import torchdiffeq

    def tdq(opts):
        def run(f, y0, t):
            return torchdiffeq.odeint_adjoint(
                f, y0, t, method="dopri5", rtol=RTOL, atol=ATOL, adjoint_options=opts
            )[-1]

        return run

    def ours(sensealg, controller=None):
        def run(f, y0, t):
            return pn.solve(
                f,
                y0,
                t,
                pn.Dopri5(),
                rtol=RTOL,
                atol=ATOL,
                sensealg=sensealg,
                controller=controller,
            ).ys[-1]

        return run

    sciml_pi = (
        pn.PIController()
    )  # SciML's PI gains; the default for explicit solvers is integral control
    return {
        "torchdiffeq odeint_adjoint": tdq(None),
        "torchdiffeq odeint_adjoint (seminorm)": tdq(dict(norm="seminorm")),
        "DirectAdjoint": ours(pn.DirectAdjoint()),
        "DirectAdjoint(checkpoints=16)": ours(pn.DirectAdjoint(checkpoints=16)),
        "BacksolveAdjoint": ours(pn.BacksolveAdjoint()),
        "BacksolveAdjoint(seminorm=True)": ours(pn.BacksolveAdjoint(seminorm=True)),
        "InterpolatingAdjoint": ours(pn.InterpolatingAdjoint()),
        "InterpolatingAdjoint(seminorm=True)": ours(pn.InterpolatingAdjoint(seminorm=True)),
        "QuadratureAdjoint": ours(pn.QuadratureAdjoint()),
        "BacksolveAdjoint, SciML PI*": ours(pn.BacksolveAdjoint(), sciml_pi),
        "BacksolveAdjoint(seminorm=True), SciML PI*": ours(
            pn.BacksolveAdjoint(seminorm=True), sciml_pi
        ),
    }


LOSSES = {"mean": lambda y: y.square().mean(), "sum": lambda y: y.square().sum()}


def fwd_bwd(run, f, y0, t, loss):
    f.zero_grad(set_to_none=True)
    y0 = y0.detach().requires_grad_(True)
    out = run(f, y0, t)
    LOSSES[loss](out).backward()
    return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])


def count_nfe(run, f, y0, t, loss):
    f.count, f.nfe = True, 0
    y0r = y0.detach().requires_grad_(True)
    out = run(f, y0r, t)
    n_fwd = f.nfe
    LOSSES[loss](out).backward()
    n_bwd = f.nfe - n_fwd
    f.count = False
    return n_fwd, n_bwd


def bench_problem(name, cfg, loss, repeat):
    f = Field(cfg["dim"], cfg["hidden"], cfg["rot"])
    y0 = torch.randn(cfg["batch"], cfg["dim"], generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, cfg["T"]])
    ms = methods()
    nfe = {k: count_nfe(run, f, y0, t, loss) for k, run in ms.items()}
    grads = {k: fwd_bwd(run, f, y0, t, loss) for k, run in ms.items()}  # also warms up
    times = {k: [] for k in ms}
    walls = {k: [] for k in ms}
    for _ in range(repeat):
        for k, run in ms.items():
            w0, t0 = time.perf_counter(), time.process_time()
            fwd_bwd(run, f, y0, t, loss)
            times[k].append(time.process_time() - t0)
            walls[k].append(time.perf_counter() - w0)
    ref = grads["DirectAdjoint"]
    n_params = sum(p.numel() for p in f.parameters())
    best = {k: min(v) for k, v in times.items()}
    base, base_sn = (
        best["torchdiffeq odeint_adjoint"],
        best["torchdiffeq odeint_adjoint (seminorm)"],
    )
    lines = [
        f"### Problem `{name}`: f = {'rotation + ' if cfg['rot'] else ''}MLP, batch "
        f"{cfg['batch']}, state {cfg['dim']}, "
        f"hidden {cfg['hidden']}×2 ({n_params} parameters), "
        f"t ∈ [0, {cfg['T']:g}], rtol={RTOL:g}, atol={ATOL:g}, float32, Dopri5, loss = {loss} of "
        "y(T)²",
        "",
        "| method | forward NFE | backward NFE | fwd+bwd CPU ms (min) | wall ms (median) | ÷ "
        "torchdiffeq adjoint | ÷ torchdiffeq adjoint (seminorm) | grad rel. diff vs Direct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in ms:
        d = ((grads[k] - ref).norm() / ref.norm()).item()
        lines.append(
            f"| {k} | {nfe[k][0]} | {nfe[k][1]} | {1e3 * best[k]:.1f} | "
            f"{1e3 * statistics.median(walls[k]):.1f} | "
            f"{best[k] / base:.2f} | {best[k] / base_sn:.2f} | {d:.1e} |"
        )
    sn_lines = []
    for plain, semi in [
        ("BacksolveAdjoint", "BacksolveAdjoint(seminorm=True)"),
        ("InterpolatingAdjoint", "InterpolatingAdjoint(seminorm=True)"),
        ("BacksolveAdjoint, SciML PI*", "BacksolveAdjoint(seminorm=True), SciML PI*"),
        ("torchdiffeq odeint_adjoint", "torchdiffeq odeint_adjoint (seminorm)"),
    ]:
        b0, b1 = nfe[plain][1], nfe[semi][1]
        t0_, t1_ = best[plain], best[semi]
        sn_lines.append(
            f"| {name} | {loss} | {plain} | {b0} | {b1} | {100 * (1 - b1 / b0):.0f}% | "
            f"{1e3 * t0_:.1f} | {1e3 * t1_:.1f} | {100 * (1 - t1_ / t0_):.0f}% |"
        )
    return lines, sn_lines


def _load():
    try:
        return ", ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    except OSError:
        return "n/a"


def seminorm_sweep(tols, losses, probs):
    """Backward NFE with/without seminorm across tolerances (one untimed run each)."""
    lines = [
        "### Seminorm across tolerances (backward NFE, rtol = atol = tol)",
        "",
        "| problem | loss | tol | Backsolve | + seminorm | fewer | Interpolating | + seminorm | "
        "fewer | torchdiffeq | + seminorm | fewer |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    import torchdiffeq

    for name in probs:
        cfg = PROBLEMS[name]
        f = Field(cfg["dim"], cfg["hidden"], cfg["rot"])
        y0 = torch.randn(cfg["batch"], cfg["dim"], generator=torch.Generator().manual_seed(1))
        t = torch.tensor([0.0, cfg["T"]])
        for loss in losses:
            for tol in tols:
                cells = []
                for plain, semi in [
                    (
                        lambda f, y, t, tol=tol: pn.solve(
                            f, y, t, pn.Dopri5(), rtol=tol, atol=tol, sensealg=pn.BacksolveAdjoint()
                        ).ys[-1],
                        lambda f, y, t, tol=tol: pn.solve(
                            f,
                            y,
                            t,
                            pn.Dopri5(),
                            rtol=tol,
                            atol=tol,
                            sensealg=pn.BacksolveAdjoint(seminorm=True),
                        ).ys[-1],
                    ),
                    (
                        lambda f, y, t, tol=tol: pn.solve(
                            f,
                            y,
                            t,
                            pn.Dopri5(),
                            rtol=tol,
                            atol=tol,
                            sensealg=pn.InterpolatingAdjoint(),
                        ).ys[-1],
                        lambda f, y, t, tol=tol: pn.solve(
                            f,
                            y,
                            t,
                            pn.Dopri5(),
                            rtol=tol,
                            atol=tol,
                            sensealg=pn.InterpolatingAdjoint(seminorm=True),
                        ).ys[-1],
                    ),
                    (
                        lambda f, y, t, tol=tol: torchdiffeq.odeint_adjoint(
                            f, y, t, method="dopri5", rtol=tol, atol=tol
                        )[-1],
                        lambda f, y, t, tol=tol: torchdiffeq.odeint_adjoint(
                            f,
                            y,
                            t,
                            method="dopri5",
                            rtol=tol,
                            atol=tol,
                            adjoint_options=dict(norm="seminorm"),
                        )[-1],
                    ),
                ]:
                    b0 = count_nfe(plain, f, y0, t, loss)[1]
                    b1 = count_nfe(semi, f, y0, t, loss)[1]
                    cells += [str(b0), str(b1), f"{100 * (1 - b1 / b0):.0f}%"]
                lines.append(f"| {name} | {loss} | {tol:g} | " + " | ".join(cells) + " |")
    return lines + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the plain problem only, 3 repeats")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeat = args.repeat or (3 if args.quick else 5)
    probs = ["plain"] if args.quick else list(PROBLEMS)
    out, sn = [], []
    sweep = seminorm_sweep(
        [1e-3, 1e-5, 1e-7], list(LOSSES), ["plain"] if args.quick else ["plain", "wide"]
    )
    print("\n".join(sweep), file=sys.stderr)
    for p in probs:
        for loss in LOSSES:
            lines, sn_lines = bench_problem(p, PROBLEMS[p], loss, repeat)
            out += lines + [""]
            sn += sn_lines
            print("\n".join(lines), file=sys.stderr)
    text = "\n".join(
        [
            "## Forward + backward time against torchdiffeq",
            "",
            *out,
            "\\* `controller=pn.PIController()`: SciML's PI gains (beta1=0.7, beta2=0.4), which "
            "grow steps more cautiously "
            "than the default integral control (torchdiffeq's). Times: process CPU time (1 "
            "thread), minimum over "
            f"{repeat} round-robin repeats; CPU time rather than wall time because the benchmark "
            "machine is shared "
            f"(load average during this run: {_load()}); ratios use the CPU times.",
            "",
            "## Seminorm: backward NFE and time",
            "",
            "Backward NFE counts every evaluation of f during the backward pass (adjoint "
            "right-hand sides, "
            "checkpoint re-solves, quadrature nodes).",
            "",
            "| problem | loss | method | backward NFE | with seminorm | fewer NFE | fwd+bwd CPU "
            "ms | with seminorm | less time |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
            *sn,
            "",
            *sweep,
        ]
    )
    print(text)
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    cmd = (
        "python benchmarks/adjoint_speed.py"
        + (" --quick" if args.quick else "")
        + (f" --repeat {args.repeat}" if args.repeat else "")
    )
    import torchdiffeq

    (res / ("adjoint_speed_quick.md" if args.quick else "adjoint_speed.md")).write_text(
        f"# Adjoint speed\n\nCommand: `{cmd}` (torch {torch.__version__}, torchdiffeq "
        f"{torchdiffeq.__version__})\n\n{text}"
    )


if __name__ == "__main__":
    main()
