"""Gradient error of every sensealg against a float64 reference, as a function of the tolerance.

Float64 MLP neural ODEs, loss on five saved times; the reference is DirectAdjoint at
rtol=atol=1e-12 (exact differentiation of a solution that is itself accurate to ~1e-12; central
finite differences agree with it to ~1e-9, see tests/test_adjoints.py). Reported: the relative
error ‖g − g_ref‖/‖g_ref‖ of the gradient with respect to (y0, all parameters) and the number of
f evaluations of the backward pass. Two problems: a smooth MLP field, and a dissipative one
(f = MLP − 50·y), where backsolving the state backwards (unstable direction) costs extra steps.

    python benchmarks/adjoint_accuracy.py            # tolerances 1e-3 … 1e-10
    python benchmarks/adjoint_accuracy.py --quick    # 1e-3, 1e-6, 1e-9

Writes benchmarks/results/adjoint_accuracy.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pyneuralode as pn  # noqa: E402

DT = torch.float64


class Field(nn.Module):
    def __init__(self, damping=0.0, dim=2, hidden=32):
        super().__init__()
        torch.manual_seed(0)
        self.damping = damping
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(DT)

    def forward(self, t, y):
        return self.net(y) - self.damping * y


METHODS = {
    "DirectAdjoint": lambda: pn.DirectAdjoint(),
    "BacksolveAdjoint": lambda: pn.BacksolveAdjoint(),
    "BacksolveAdjoint(seminorm)": lambda: pn.BacksolveAdjoint(seminorm=True),
    "InterpolatingAdjoint": lambda: pn.InterpolatingAdjoint(),
    "InterpolatingAdjoint(checkpointing=False)": lambda: pn.InterpolatingAdjoint(
        checkpointing=False
    ),
    "QuadratureAdjoint (Gauss–Legendre)": lambda: pn.QuadratureAdjoint(),
    "QuadratureAdjoint (Gauss–Kronrod)": lambda: pn.QuadratureAdjoint("gauss-kronrod"),
    "QuadratureAdjoint(checkpointing)": lambda: pn.QuadratureAdjoint(checkpointing=True),
}


def gradient(f, y0, t, sensealg, tol, solver):
    f.zero_grad(set_to_none=True)
    y0 = y0.detach().requires_grad_(True)
    sol = pn.solve(f, y0, t, solver, rtol=tol, atol=tol, sensealg=sensealg, max_steps=200_000)
    loss = (sol.ys**2).sum() + sol.ys[-1].sum()
    loss.backward()
    g = torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])
    return g, sol.stats.get("nfe_adjoint", 0) + sol.stats.get("nfe_recompute", 0) + sol.stats.get(
        "nfe_quadrature", 0
    )


def table(name, damping, T, tols):
    f = Field(damping)
    y0 = torch.randn(16, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.0, T, 5, dtype=DT)
    solver = pn.Tsit5()
    ref, _ = gradient(f, y0, t, pn.DirectAdjoint(), 1e-12, solver)
    err, nfe = {}, {}
    for m, make in METHODS.items():
        for tol in tols:
            try:
                g, n = gradient(f, y0, t, make(), tol, solver)
                err[(m, tol)] = f"{((g - ref).norm() / ref.norm()).item():.1e}"
                nfe[(m, tol)] = str(n)
            except pn.SolveError as e:
                err[(m, tol)] = nfe[(m, tol)] = f"fails ({e.retcode.value})"
        print(f"  {name}: {m} done", file=sys.stderr)
    head = "| method | " + " | ".join(f"tol {tol:.0e}" for tol in tols) + " |"
    sep = "|---|" + "---:|" * len(tols)
    lines = [
        f"### {name}: f = MLP(y){f' − {damping:g}·y' if damping else ''}, t ∈ [0, {T:g}] (5 saved "
        "times), batch 16, Tsit5, rtol = atol = tol",
        "",
        "Relative gradient error:",
        "",
        head,
        sep,
    ]
    lines += [f"| {m} | " + " | ".join(err[(m, tol)] for tol in tols) + " |" for m in METHODS]
    lines += [
        "",
        "Backward f evaluations (adjoint RHS + checkpoint re-solves + quadrature nodes):",
        "",
        head,
        sep,
    ]
    lines += [
        f"| {m} | " + " | ".join(nfe[(m, tol)] for tol in tols) + " |"
        for m in METHODS
        if m != "DirectAdjoint"
    ]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three tolerances")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tols = [1e-3, 1e-6, 1e-9] if args.quick else [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]
    lines = (
        table("Smooth MLP field", 0.0, 2.0, tols)
        + [""]
        + table("Dissipative field", 50.0, 2.0, tols)
    )
    text = "\n".join(lines) + "\n"
    print(text)
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    cmd = "python benchmarks/adjoint_accuracy.py" + (" --quick" if args.quick else "")
    (res / ("adjoint_accuracy_quick.md" if args.quick else "adjoint_accuracy.md")).write_text(
        f"# Adjoint accuracy\n\nCommand: `{cmd}`\n\n{text}"
    )


if __name__ == "__main__":
    main()
