"""A bouncing ball with terminal events, and learning through the event times.

    python examples/bouncing_ball.py            # a few seconds; writes bouncing_ball.png
    python examples/bouncing_ball.py --quick    # fewer iterations

The ball falls under gravity; every impact (height = 0, found by ``event=``) reverses and damps
its velocity by the restitution coefficient e. The event times are differentiable
(``sol.event_t``), so plain gradient descent can fit the unknown initial height h and restitution
e to observed impact times — as in torchdiffeq's ``bouncing_ball.py`` (Chen, Amos & Nickel 2021).
"""

from __future__ import annotations

import argparse

import torch

import pyneuralode as pn
from pyneuralode.repro._common import begin_run, can_plot, progress, pyplot, write_metrics_beside

G = 9.81


def fall(t, y):
    return torch.stack([y[1], -G * torch.ones_like(y[0])])


def impact_times(h, e, n_bounces, t0=0.0):
    """Times of the first ``n_bounces`` impacts and the trajectory pieces between them."""
    state = torch.stack([h, torch.zeros_like(h)])
    t_now = torch.as_tensor(t0, dtype=h.dtype)
    times, pieces = [], []
    for _ in range(n_bounces):
        te, ys = pn.odeint_event(
            fall, state, t_now, event_fn=lambda t, y: y[0], rtol=1e-8, atol=1e-10
        )
        ts = torch.linspace(float(t_now.detach()), float(te.detach()), 40, dtype=h.dtype)
        pieces.append((ts, pn.solve(fall, state.detach(), ts, rtol=1e-8, atol=1e-10).ys[:, 0]))
        times.append(te)
        state = torch.stack(
            [torch.zeros_like(h), -e * ys[-1, 1]]
        )  # bounce: reverse and damp the velocity
        t_now = te
    return torch.stack(times), pieces


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="60 iterations instead of 300")
    p.add_argument("--out", default="bouncing_ball.png", help="output PNG (metrics beside it)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    begin_run(seed=a.seed)
    torch.manual_seed(a.seed)
    dt = torch.float64
    true_h, true_e = torch.tensor(8.0, dtype=dt), torch.tensor(0.7, dtype=dt)
    observed, true_pieces = impact_times(true_h, true_e, 4)

    h = torch.tensor(5.0, dtype=dt, requires_grad=True)  # initial guesses
    e = torch.tensor(0.9, dtype=dt, requires_grad=True)
    opt = torch.optim.Adam([h, e], lr=0.1)
    iters = 60 if a.quick else 300
    for _ in progress(range(iters), desc="fit h and e"):
        opt.zero_grad()
        times, _ = impact_times(h, e, 4)
        loss = (times - observed).square().mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            e.clamp_(0.05, 0.99)
            h.clamp_(0.1, 50.0)
    print(
        f"fitted h = {h.item():.4f} (true {true_h.item()}), e = {e.item():.4f} (true "
        f"{true_e.item()}), "
        f"impact-time MSE {loss.item():.2e} after {iters} iterations"
    )
    write_metrics_beside(
        a.out, {"h": h.item(), "e": e.item(), "impact_time_mse": loss.item(), "iterations": iters}
    )
    if not can_plot():
        return
    plt = pyplot()
    _, fit_pieces = impact_times(h.detach(), e.detach(), 4)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (ts, x) in enumerate(true_pieces):
        ax.plot(ts, x, color="0.6", lw=3, label="true" if i == 0 else None)
    for i, (ts, x) in enumerate(fit_pieces):
        ax.plot(ts, x, color="tab:blue", lw=1.5, ls="--", label="fitted" if i == 0 else None)
    ax.plot(observed.numpy(), [0] * len(observed), "kx", label="observed impacts")
    ax.set(
        xlabel="t", ylabel="height", title="bouncing ball: fitting h and e through the event times"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
