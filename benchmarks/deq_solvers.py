"""Forward solvers for a DEQ fixed point: evaluations of f and wall time to reach a tolerance.

The MNIST DEQ block of the Julia blog, ``f(z, x) = W₂ tanh(W₁ (z + x))`` (100 → 500 → 100, torch's
default init, spectral radius of ∂f/∂z scaled to ``--rho``), a batch of 128 random injections,
float32. For each tolerance (abstol = reltol) and solver: mean evaluations of ``f``, wall time per
solve, and whether it converged, plus the backward linear-solve iterations (VJPs) of each
SteadyStateAdjoint linsolve at the DynamicSS fixed point.

    python benchmarks/deq_solvers.py [--rho 0.9] [--repeats 3]   # writes
    benchmarks/results/deq_solvers.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import pyneuralode as pn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(100, 500)
        self.l2 = nn.Linear(500, 100)

    def forward(self, z, x):
        return self.l2(torch.tanh(self.l1(z + x)))


def spectral_radius(f, z, x, iters=50):
    z = z.detach().requires_grad_()
    fz = f(z, x)
    v = torch.randn_like(z)
    for _ in range(iters):
        v = torch.autograd.grad(fz, z, v, retain_graph=True)[0]
        n = v.norm(dim=1, keepdim=True)
        v = v / n
    return float(n.max())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rho", type=float, default=0.9, help="target spectral radius of ∂f/∂z at z = 0"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "deq_solvers.md"))
    a = p.parse_args()
    torch.manual_seed(0)
    f = Block()
    x = torch.randn(128, 100)
    r0 = spectral_radius(f, torch.zeros_like(x), x)
    with torch.no_grad():
        f.l2.weight.mul_(a.rho / r0)
    rho = spectral_radius(f, torch.zeros_like(x), x)
    solvers = {
        "DynamicSS(Tsit5)": lambda: pn.DynamicSS(pn.Tsit5(), max_steps=2000),
        "Anderson(m=5)": lambda: pn.Anderson(m=5, max_iters=500),
        "Broyden": lambda: pn.Broyden(max_iters=500),
        "FixedPointIteration": lambda: pn.FixedPointIteration(max_iters=2000),
    }
    rows = []
    for tol in (1e-1, 1e-2, 1e-3, 1e-4):
        for name, mk in solvers.items():
            nfe, secs, ok = 0, 0.0, True
            for _ in range(a.repeats):
                with torch.no_grad():
                    t = time.perf_counter()
                    _, info = pn.steady_state(
                        f,
                        torch.zeros_like(x),
                        (x,),
                        mk(),
                        abstol=tol,
                        reltol=tol,
                        batch_dim=0,
                        throw=False,
                        return_info=True,
                    )
                    secs += time.perf_counter() - t
                nfe += info.nfe
                ok = ok and info.converged
            rows.append((tol, name, nfe / a.repeats, 1e3 * secs / a.repeats, ok))
    # backward: linear-solve iterations at a tight fixed point
    xg = x.clone().requires_grad_()
    bwd = []
    for ls in ("gmres", "fixed_point", "anderson"):
        z = pn.steady_state(
            f,
            torch.zeros_like(x),
            (xg,),
            pn.Anderson(max_iters=500),
            abstol=1e-5,
            reltol=0,
            batch_dim=0,
            sensealg=pn.SteadyStateAdjoint(ls, max_iters=500),
        )
        t = time.perf_counter()
        (z.sin().sum()).backward()
        bwd.append(
            (
                ls,
                pn.last_stats.bwd_iterations,
                1e3 * (time.perf_counter() - t),
                str(pn.last_stats.bwd_retcode),
            )
        )
    lines = [
        f"Fixed point of the blog's MNIST DEQ block (float32, batch 128, ρ(∂f/∂z) ≈ {rho:.2f}); "
        f"`python benchmarks/deq_solvers.py --rho {a.rho}`, mean of {a.repeats}.",
        "",
        "| tol | solver | f-evals | ms / solve | converged |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t:g} | {n} | {e:.0f} | {s:.1f} | {'yes' if o else 'no'} |" for t, n, e, s, o in rows
    ]
    lines += [
        "",
        "Backward (SteadyStateAdjoint, default rtol = √eps(float32)):",
        "",
        "| linsolve | VJPs | ms | retcode |",
        "|---|---|---|---|",
    ]
    lines += [f"| {ls} | {it} | {ms:.1f} | {rc} |" for ls, it, ms, rc in bwd]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
