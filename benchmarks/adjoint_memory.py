"""Peak memory of forward + backward as the integration interval (and the number of steps) grows
×16.

Every configuration runs in its own subprocess and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after one forward and one backward pass of a
batched MLP neural ODE; a "forward only (no grad)" process gives the floor. The table also shows
what each method keeps for the backward pass (autograd graph tensors for DirectAdjoint; output
states, checkpoints or dense output for the adjoints), counted exactly.

    python benchmarks/adjoint_memory.py            # T = 1, 2, 4, 8, 16
    python benchmarks/adjoint_memory.py --quick    # T = 1, 4, 16, smaller batch

Writes benchmarks/results/adjoint_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

METHODS = {
    "forward only (no grad)": "None",
    "DirectAdjoint": "pn.DirectAdjoint()",
    "DirectAdjoint(checkpoints=16)": "pn.DirectAdjoint(checkpoints=16)",
    "BacksolveAdjoint": "pn.BacksolveAdjoint()",
    "BacksolveAdjoint(seminorm)": "pn.BacksolveAdjoint(seminorm=True)",
    "InterpolatingAdjoint(n_checkpoints=8)": "pn.InterpolatingAdjoint(n_checkpoints=8)",
    "InterpolatingAdjoint(checkpointing=False)": "pn.InterpolatingAdjoint(checkpointing=False)",
    "QuadratureAdjoint": "pn.QuadratureAdjoint()",
    "QuadratureAdjoint(checkpointing, n_checkpoints=8)": (
        "pn.QuadratureAdjoint(checkpointing=True, n_checkpoints=8)"
    ),
}


def _child(method: str, T: float, batch: int, dim: int, hidden: int) -> None:
    import resource

    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    import pyneuralode as pn

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Field(nn.Module):
        """Rotation (skew-symmetric linear part, so the solution keeps oscillating) plus an MLP."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(1)
            S = torch.randn(dim, dim, generator=g)
            self.register_buffer("A", 3.0 * (S - S.T) / dim**0.5)
            self.net = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.Tanh(),
                nn.Linear(hidden, hidden),
                nn.Tanh(),
                nn.Linear(hidden, dim),
            )

        def forward(self, t, y):
            return y @ self.A.T + 0.1 * self.net(y)

    f = Field()
    y0 = torch.randn(batch, dim)
    sensealg = eval(METHODS[method])
    t0 = time.perf_counter()
    stored = 0
    if sensealg is None:
        with torch.no_grad():
            sol = pn.solve(f, y0, [0.0, T], pn.Tsit5(), rtol=1e-6, atol=1e-8, dense=False)
    else:
        sol = pn.solve(f, y0, [0.0, T], pn.Tsit5(), rtol=1e-6, atol=1e-8, sensealg=sensealg)
        stored = _stored_bytes(sol.ys)
        loss = sol.ys[-1].square().mean()
        loss.backward()
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    print(
        json.dumps(
            dict(
                rss_mb=rss_mb,
                stored_mb=stored / 2**20,
                wall=wall,
                **{k: v for k, v in sol.stats.items()},
            )
        ),
        flush=True,
    )
    os._exit(
        0
    )  # skip interpreter teardown (freeing a very deep autograd graph can overflow the C stack)


def _stored_bytes(out) -> int:
    """Bytes of the tensors kept for the backward pass behind ``out`` (graph-saved tensors + adjoint
    data)."""
    import torch

    seen, stack, total, ids = set(), [out.grad_fn], 0, set()

    def add(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.numel())
            if key not in ids:
                ids.add(key)
                total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            for v in x:
                add(v)
        elif hasattr(x, "interpolant") and hasattr(x, "data"):
            add(x.data)

    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                add(getattr(fn, attr))
        if hasattr(fn, "saved_tensors"):
            add(list(fn.saved_tensors))
        if hasattr(fn, "pass_"):
            add(fn.pass_.saved)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer intervals, smaller batch")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args()
    batch = args.batch or (128 if args.quick else 256)
    dim, hidden = 16, 64
    if args.child:
        _child(args.child[0], float(args.child[1]), batch, dim, hidden)
        return
    Ts = [1.0, 4.0, 16.0] if args.quick else [1.0, 2.0, 4.0, 8.0, 16.0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = {}
    for method in METHODS:
        for T in Ts:
            cmd = [sys.executable, __file__, "--child", method, str(T), "--batch", str(batch)]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            rows[(method, T)] = json.loads(out)
            r = rows[(method, T)]
            print(
                f"  {method:45s} T={T:5g} steps={r['naccept']:4d} rss={r['rss_mb']:7.1f} MB "
                f"stored={r['stored_mb']:7.2f} MB",
                file=sys.stderr,
            )

    lines = [
        f"Batched MLP neural ODE (batch {batch}, state {dim}, hidden {hidden}×2, float32, Tsit5, "
        "rtol=1e-6, atol=1e-8), "
        f"loss on y(T); one forward + backward per fresh process, 1 thread.",
        "",
        "Peak RSS in MB (`ru_maxrss`, whole process including torch itself) for each interval "
        "length T:",
        "",
        "| method | "
        + " | ".join(f"T={T:g}" for T in Ts)
        + f" | RSS(T={Ts[-1]:g}) / RSS(T={Ts[0]:g}) |",
        "|---|" + "---:|" * (len(Ts) + 1),
    ]
    for method in METHODS:
        vals = [rows[(method, T)]["rss_mb"] for T in Ts]
        lines.append(
            f"| {method} | "
            + " | ".join(f"{v:.0f}" for v in vals)
            + f" | {vals[-1] / vals[0]:.3f} |"
        )
    lines += [
        "",
        "Accepted forward steps, and MB kept for the backward pass (autograd-saved tensors; for "
        "the adjoints the "
        "output states plus checkpoints or dense output):",
        "",
        "| method | " + " | ".join(f"T={T:g}" for T in Ts) + " |",
        "|---|" + "---:|" * len(Ts),
    ]
    lines.append(
        "| forward steps | "
        + " | ".join(str(rows[("DirectAdjoint", T)]["naccept"]) for T in Ts)
        + " |"
    )
    for method in METHODS:
        if method.startswith("forward only"):
            continue
        lines.append(
            f"| {method} | "
            + " | ".join(f"{rows[(method, T)]['stored_mb']:.2f}" for T in Ts)
            + " |"
        )
    lines += [
        "",
        "Backward NFE (`nfe_adjoint`; for the checkpointed DirectAdjoint the replayed steps' "
        "`nfe_recompute`) at each T:",
        "",
        "| method | " + " | ".join(f"T={T:g}" for T in Ts) + " |",
        "|---|" + "---:|" * len(Ts),
    ]
    for method in METHODS:
        if method in ("forward only (no grad)", "DirectAdjoint"):
            continue
        lines.append(
            f"| {method} | "
            + " | ".join(
                str(rows[(method, T)].get("nfe_adjoint", rows[(method, T)].get("nfe_recompute", 0)))
                for T in Ts
            )
            + " |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    cmdline = "python benchmarks/adjoint_memory.py" + (" --quick" if args.quick else "")
    (res / ("adjoint_memory_quick.md" if args.quick else "adjoint_memory.md")).write_text(
        f"# Adjoint memory\n\nCommand: `{cmdline}`\n\n{text}"
    )


if __name__ == "__main__":
    main()
