"""A deep equilibrium model learns y = 2x (the Julia DEQ blog's toy), in a few lines.

z* = NN(z* + x) with NN = Linear(1,5) -> Linear(5,1) (affine); the fixed point is the steady state
of dz/dt = NN(z + x) - z, found by DynamicSS(Tsit5()) at tolerance 1e-2; gradients by the
steady-state adjoint (implicit function theorem, no stored iterations).

    python examples/deq_2x.py            # ~10 s on a laptop CPU
"""

import argparse

import torch
from torch import nn

import pyneuralode as pn


class Injected(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 5), nn.Linear(5, 1))

    def forward(self, z, x):  # the map whose fixed point is the layer's output
        return self.net(z + x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1000, help="training epochs (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error(f"--epochs: expected a positive int, got {a.epochs}")
    epochs = a.epochs
    torch.manual_seed(a.seed)
    deq = pn.DEQ(
        Injected(),
        solver=pn.DynamicSS(pn.Tsit5()),
        sensealg=pn.SteadyStateAdjoint(),
        abstol=1e-2,
        reltol=1e-2,
        init="f",
    )
    X = torch.arange(1.0, 11.0).reshape(10, 1)
    Y = 2 * X
    opt = torch.optim.Adam(deq.parameters(), lr=0.05)
    for epoch in range(epochs):
        opt.zero_grad()
        loss = ((deq(X) - Y) ** 2).sum()
        loss.backward()
        opt.step()
        if epoch % 200 == 0 or epoch == epochs - 1:
            st = deq.last_stats
            print(
                f"epoch {epoch:4d}  loss {loss.item():.3e}  forward NFE {st.nfe}  backward GMRES "
                f"iterations {st.bwd_iterations}"
            )
    with torch.no_grad():
        print(
            f"deq(-5) = {deq(torch.tensor([[-5.0]])).item():.4f}   (target -10; -5 is outside the "
            "training range)"
        )
        # The same fixed point by root finding:
        z = pn.steady_state(
            deq.f,
            torch.zeros(1, 1),
            args=(torch.tensor([[-5.0]]),),
            solver=pn.Anderson(),
            abstol=1e-6,
            reltol=0,
        )
        print(f"Anderson: {z.item():.4f} in {pn.last_stats.nfe} evaluations")


if __name__ == "__main__":
    main()
