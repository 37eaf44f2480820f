"""The same neural ODE solved by the native torch engine and, when Julia is available, by
DifferentialEquations.jl / SciMLSensitivity through ``backend="julia"``.

    python examples/julia_backend.py

Without Julia it runs the native backend and prints how to install the Julia one.
"""

import argparse
import time

import torch
from torch import nn

import pyneuralode as pn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    f = pn.julia.Autonomous(net)  # an MLP the Julia backend translates to native Julia code
    y0 = torch.tensor([[2.0, 0.0], [-1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 11, dtype=torch.float64)
    results = {}
    for backend in ("torch", "julia"):
        for label, vf in (("native MLP", f), ("callback", lambda t, y: net(y))):
            if backend == "torch" and label == "callback":
                continue
            try:
                t0 = time.perf_counter()
                sol = pn.solve(
                    vf,
                    y0,
                    t,
                    solver=pn.Tsit5(),
                    rtol=1e-8,
                    atol=1e-10,
                    backend=backend,
                    sensealg=pn.InterpolatingAdjoint(),
                )
                loss = (sol.ys[-1] ** 2).sum()
                grads = torch.autograd.grad(loss, [y0, *net.parameters()])
                dt = time.perf_counter() - t0
            except pn.julia.JuliaNotAvailableError as e:
                print(f"backend='julia' is not available here:\n  {e}")
                break
            name = (
                backend if backend == "torch" else f"julia ({label}, path={sol.stats.get('path')})"
            )
            results[name] = (loss.item(), grads[0])
            print(
                f"{name:<40} loss={loss.item():.10f}  dL/dy0[0]={grads[0][0].tolist()}  "
                f"nfe={sol.stats['nfe']}  {dt:.2f}s"
                + (" (the first Julia call includes compilation)" if backend == "julia" else "")
            )
    if len(results) > 1:
        ref_loss, ref_g = results["torch"]
        for name, (loss_v, g) in results.items():
            print(
                f"{name:<40} |Δloss|={abs(loss_v - ref_loss):.2e}  max|Δ "
                f"dL/dy0|={(g - ref_g).abs().max().item():.2e}"
            )


if __name__ == "__main__":
    main()
