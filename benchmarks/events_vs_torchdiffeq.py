"""Terminal events: ``pn.odeint_event`` against ``torchdiffeq.odeint_event`` on the same problems.

    python benchmarks/events_vs_torchdiffeq.py           # 21 round-robin repeats
    python benchmarks/events_vs_torchdiffeq.py --quick   # 3 repeats

Problems (float64, rtol 1e-8, atol 1e-10, dopri5 in both libraries, 1 thread):
(a) a falling ball released from height h (event: height = 0; exact t* = sqrt(2h/g));
(b) a batch of 256 damped oscillators driven by a small MLP (event: the mean position crosses −0.5).
Forward: the event solve alone; fwd+bwd: plus ``backward()`` of a loss on the event time and the
final state. Writes ``benchmarks/results/events.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pyneuralode as pn  # noqa: E402

DT = torch.float64
RTOL, ATOL = 1e-8, 1e-10
G = 9.81


def ball_problem():
    h = torch.tensor(10.0, dtype=DT, requires_grad=True)

    def f(t, y):
        return torch.stack([y[1], -G * torch.ones_like(y[0])])

    def make_y0():
        return torch.stack([h, torch.zeros((), dtype=DT)])

    def loss(te, y):
        return te + y[-1].square().sum()

    return dict(
        f=f,
        make_y0=make_y0,
        event=lambda t, y: y[0],
        params=[h],
        loss=loss,
        exact=math.sqrt(2 * 10.0 / G),
        title="(a) falling ball, 2 states",
    )


class Osc(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).to(DT)

    def forward(self, t, y):
        x, v = y[:, :1], y[:, 1:]
        return torch.cat([v, -4.0 * x - 0.3 * v], 1) + 0.1 * self.net(y)


def oscillator_problem():
    f = Osc()
    torch.manual_seed(1)
    base = torch.cat([1.0 + 0.1 * torch.rand(256, 1, dtype=DT), torch.zeros(256, 1, dtype=DT)], 1)

    def loss(te, y):
        return te + y[-1].square().mean()

    return dict(
        f=f,
        make_y0=lambda: base.clone().requires_grad_(True),
        event=lambda t, y: y[:, 0].mean() + 0.5,
        params=list(f.parameters()),
        loss=loss,
        exact=None,
        title="(b) 256 MLP-driven oscillators",
    )


def ours(prob, t0):
    return pn.odeint_event(
        prob["f"],
        prob["make_y0"](),
        t0,
        event_fn=prob["event"],
        method="dopri5",
        rtol=RTOL,
        atol=ATOL,
    )


def theirs(prob, t0):
    import torchdiffeq

    return torchdiffeq.odeint_event(
        prob["f"],
        prob["make_y0"](),
        t0,
        event_fn=prob["event"],
        method="dopri5",
        rtol=RTOL,
        atol=ATOL,
    )


def measure(prob, repeat):
    t0 = torch.tensor(0.0, dtype=DT)
    runs = {"torchdiffeq odeint_event": theirs, "pn.odeint_event": ours}
    fwd = {k: [] for k in runs}
    fb = {k: [] for k in runs}
    out = {}
    for k, run in runs.items():  # warm-up, values and gradients
        te, ys = run(prob, t0)
        grads = torch.autograd.grad(prob["loss"](te, ys), prob["params"])
        out[k] = (float(te.detach()), torch.cat([g.reshape(-1) for g in grads]))
    for _ in range(repeat):
        for k, run in runs.items():
            with torch.no_grad():
                s = time.perf_counter()
                run(prob, t0)
                fwd[k].append(time.perf_counter() - s)
            s = time.perf_counter()
            te, ys = run(prob, t0)
            torch.autograd.grad(prob["loss"](te, ys), prob["params"])
            fb[k].append(time.perf_counter() - s)
    ref_k = "torchdiffeq odeint_event"
    rows = []
    for k in runs:
        f_ms, b_ms = 1e3 * statistics.median(fwd[k]), 1e3 * statistics.median(fb[k])
        te, g = out[k]
        gdiff = float((g - out[ref_k][1]).norm() / out[ref_k][1].norm())
        err = "–" if prob["exact"] is None else f"{abs(te - prob['exact']):.1e}"
        rows.append((k, te, err, f_ms, b_ms, gdiff))
    base_f, base_b = rows[0][3], rows[0][4]
    lines = [
        f"### {prob['title']}",
        "",
        "| method | event time | error vs exact | forward ms | ÷ torchdiffeq | fwd+bwd ms | ÷ "
        "torchdiffeq | grad rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, te, err, f_ms, b_ms, gdiff in rows:
        lines.append(
            f"| {k} | {te:.10f} | {err} | {f_ms:.2f} | {f_ms / base_f:.2f} | {b_ms:.2f} | "
            f"{b_ms / base_b:.2f} | {gdiff:.1e} |"
        )
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "events.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import torchdiffeq

    repeat = 3 if a.quick else 21
    lines = [
        "# Terminal events against torchdiffeq",
        "",
        f"Command: `python benchmarks/events_vs_torchdiffeq.py{' --quick' if a.quick else ''}` "
        f"(torch {torch.__version__}, "
        f"torchdiffeq {getattr(torchdiffeq, '__version__', '?')}; 1 thread; medians of {repeat} "
        "round-robin repeats; "
        f"dopri5, rtol {RTOL:g}, atol {ATOL:g}, float64).",
        "",
    ]
    for prob in (ball_problem(), oscillator_problem()):
        lines += measure(prob, repeat) + [""]
    text = "\n".join(lines)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
