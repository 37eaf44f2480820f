"""Fit a neural ODE to a spiral (torchdiffeq's ``ode_demo.py`` setup) and plot it.

True system: dy/dt = (y³) A with A = [[-0.1, 2], [-2, -0.1]] (row vectors), y(0) = [2, 0],
observed at 1000 times in [0, 25]. Model: dy/dt = MLP(y³) (2→50→tanh→2), trained with L1 loss
on minibatches of 20 random windows of 10 steps, RMSprop (lr 1e-3, cosine decay), 1500
iterations. Writes ``spiral.png`` (true vs fitted trajectory, phase portrait, learned field) and
prints the final L1 loss on the whole trajectory.

    python examples/spiral.py            # ~1–2 minutes on 2 cores
    python examples/spiral.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import pyneuralode as pn
from pyneuralode.repro._common import begin_run, can_plot, progress, pyplot, write_metrics_beside


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few iterations only")
    p.add_argument(
        "--iters", type=int, default=None, help="training iterations (default 1500; --quick 30)"
    )
    p.add_argument("--out", default="spiral.png", help="output PNG (default spiral.png)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    iters = a.iters or (30 if a.quick else 1500)
    begin_run(seed=a.seed)
    torch.manual_seed(a.seed)

    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    t = torch.linspace(0.0, 25.0, 1000)
    y0 = torch.tensor([[2.0, 0.0]])
    with torch.no_grad():
        true_y = pn.solve(
            lambda t, y: (y**3) @ A, y0, t, pn.Dopri5(), rtol=1e-7, atol=1e-9
        ).ys  # [1000, 1, 2]

    vf = pn.ConcatMLP(2, (50,), layer="ignore", activation="tanh", input_fn=lambda y: y**3)
    for m in vf.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.1)
            torch.nn.init.zeros_(m.bias)
    batch_time, batch_size = 10, 20
    model = pn.NeuralODE(
        vf, t[:batch_time], solver=pn.Dopri5(), rtol=1e-5, atol=1e-6, return_trajectory=True
    )
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    # cosine decay to 1e-5: without it the whole-trajectory loss keeps jumping between 0.1 and 0.7
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=1e-5)

    def full_loss():
        with torch.no_grad():
            pred = model(y0, t)
        return pred, float((pred - true_y).abs().mean())

    start = time.perf_counter()
    bar = progress(range(1, iters + 1), desc="fit spiral")
    for it in bar:
        idx = torch.randperm(len(t) - batch_time)[:batch_size]
        by0 = true_y[idx, 0]  # [20, 2]
        by = torch.stack([true_y[idx + i, 0] for i in range(batch_time)])  # [10, 20, 2]
        opt.zero_grad()
        pred = model(by0)  # times t[:10]
        loss = (pred - by).abs().mean()
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iters:
            _, fl = full_loss()
            bar.set_postfix(
                batch_loss=f"{loss.item():.4f}", full_loss=f"{fl:.4f}", nfe=model.nfe_forward
            )
    pred, final = full_loss()
    elapsed = time.perf_counter() - start
    out = Path(a.out)
    path = write_metrics_beside(
        out,
        {
            "final_l1_loss": final,
            "iterations": iters,
            "train_seconds": elapsed,
            "nfe_forward": model.nfe_forward,
        },
    )
    print(
        f"final L1 loss on the whole trajectory: {final:.4f} ({iters} iterations, {elapsed:.0f} "
        f"s); wrote {path}"
    )
    if not can_plot():
        return final
    plt = pyplot()

    ty, py = true_y[:, 0].numpy(), pred[:, 0].numpy()
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(t, ty[:, 0], "g-", label="x true")
    ax[0].plot(t, ty[:, 1], "b-", label="y true")
    ax[0].plot(t, py[:, 0], "g--", label="x fitted")
    ax[0].plot(t, py[:, 1], "b--", label="y fitted")
    ax[0].set_xlabel("t")
    ax[0].set_title("trajectories")
    ax[0].legend(fontsize=8)
    ax[1].plot(ty[:, 0], ty[:, 1], "g-", label="true")
    ax[1].plot(py[:, 0], py[:, 1], "b--", label="fitted")
    ax[1].set_title(f"phase portrait (L1 loss {final:.4f})")
    ax[1].legend(fontsize=8)
    ax[1].set_aspect("equal", "datalim")
    g = torch.linspace(-2.0, 2.0, 21)
    Y, X = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    with torch.no_grad():
        d = vf(torch.tensor(0.0), pts)
    d = d / d.norm(dim=1, keepdim=True).clamp(min=1e-9)
    ax[2].quiver(
        X.numpy(),
        Y.numpy(),
        d[:, 0].reshape(21, 21).numpy(),
        d[:, 1].reshape(21, 21).numpy(),
        color="k",
    )
    ax[2].set_title("learned vector field (directions)")
    ax[2].set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return final


if __name__ == "__main__":
    main()
