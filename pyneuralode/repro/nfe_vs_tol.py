"""Figure 3 of the Neural ODE paper: statistics of a trained ODE network.

The paper uses its MNIST ODE-Net; to run in minutes on a CPU this uses a small ODE classifier
with the same ingredients: two concentric noisy circles (toy data), the 2-D input zero-augmented
to 5 dimensions (Dupont et al. 2019: nested circles cannot be separated by a 2-D flow),
``NeuralODE`` with a time-dependent MLP 5→64→64→5 (tanh) over ``t ∈ [0, 1]``, linear head;
Dopri5 at ``rtol = atol = 1e-3``, gradients by ``InterpolatingAdjoint`` (the adjoint method);
Adam. Measured:

(a) error at ``t = 1`` against a 1e-10 reference (float64) as the tolerance goes 1e-1 … 1e-8;
(b) forward wall time against forward NFE over that sweep (median of repeats) — correlation and
    the least-squares time per NFE;
(c) backward NFE / forward NFE during training (paper: ≈ 0.5 with LSODE; not expected with Dopri5,
    see torchdiffeq issue #97 — reported, not gated on);
(d) forward NFE over training (first 5 iterations / first 10% vs last 10%).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from ._common import can_plot, progress, pyplot, savefig, seed_everything, write_metrics

TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


def _circles(n, g):
    from pyneuralode.data import sample_toy2d

    x = sample_toy2d("circles", n, generator=g)
    y = (x.norm(dim=1) < 2.25).long()
    return x, y


class _Classifier(torch.nn.Module):
    def __init__(self, aug=3, hidden=64, sensealg="interpolating", tol=1e-3):
        super().__init__()
        import pyneuralode as pn

        self.aug = aug
        vf = pn.ConcatMLP(2 + aug, (hidden, hidden), layer="concat", activation="tanh")
        self.ode = pn.NeuralODE(
            vf, (0.0, 1.0), solver=pn.Dopri5(), sensealg=sensealg, rtol=tol, atol=tol
        )
        self.head = torch.nn.Linear(2 + aug, 2)

    def forward(self, x):
        h = torch.cat([x, x.new_zeros(x.shape[0], self.aug)], 1)
        return self.head(self.ode(h))


def run(opts) -> dict:
    import pyneuralode as pn

    seed_everything(opts.seed)
    dev = torch.device(opts.device)
    quick = opts.quick
    iters = opts.epochs or (4 if quick else 600)
    batch = 64 if quick else 256
    tols = TOLS[::2] if quick else TOLS
    repeats = 1 if quick else 5
    g = torch.Generator().manual_seed(opts.seed)
    model = _Classifier().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    nfe_f, nfe_b, nfe_r, losses = [], [], [], []
    for _ in (bar := progress(range(iters), desc="train ODE classifier", leave=False)):
        x, y = _circles(batch, g)
        x, y = x.to(dev), y.to(dev)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        nf = model.ode.nfe_forward
        loss.backward()
        opt.step()
        nfe_f.append(nf)
        nfe_b.append(model.ode.nfe_backward)
        nfe_r.append(model.ode.last_stats.get("nfe_recompute", 0))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", nfe_f=nf, nfe_b=nfe_b[-1])
    xt, yt = _circles(2000 if not quick else 200, torch.Generator().manual_seed(opts.seed + 1))
    with torch.no_grad():
        acc = float((model(xt.to(dev)).argmax(1).cpu() == yt).float().mean())
    k = max(1, len(nfe_f) // 10)
    metrics = {
        "iterations": iters,
        "test_accuracy": acc,
        "final_loss": statistics.fmean(losses[-k:]),
        "nfe_forward_first5": statistics.fmean(nfe_f[:5]),
        "nfe_forward_start": statistics.fmean(nfe_f[:k]),
        "nfe_forward_end": statistics.fmean(nfe_f[-k:]),
        "nfe_backward_start": statistics.fmean(nfe_b[:k]),
        "nfe_backward_end": statistics.fmean(nfe_b[-k:]),
        "nfe_ratio_backward_forward": statistics.fmean(b / f for b, f in zip(nfe_b, nfe_f)),
        # InterpolatingAdjoint's checkpoint re-solves in the backward pass, not counted in
        # nfe_backward
        "nfe_recompute_mean": statistics.fmean(nfe_r),
        "nfe_ratio_backward_with_recompute_forward": statistics.fmean(
            (b + r) / f for b, r, f in zip(nfe_b, nfe_r, nfe_f)
        ),
    }
    metrics["nfe_growth"] = metrics["nfe_forward_end"] / metrics["nfe_forward_start"]

    # -- tolerance sweep on the trained vector field (float64, no gradients) -----------------------
    vf = model.ode.vector_field.double()
    x, _ = _circles(1024 if not quick else 128, torch.Generator().manual_seed(opts.seed + 2))
    h0 = torch.cat([x.double(), x.new_zeros(x.shape[0], 3).double()], 1).to(dev)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        ref = pn.solve(vf, h0, t, pn.Dopri5(), rtol=1e-10, atol=1e-10).ys[-1]
        nfes, times, errs = [], [], []
        for tol in tols:
            ts_ = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sol = pn.solve(vf, h0, t, pn.Dopri5(), rtol=tol, atol=tol)
                ts_.append(time.perf_counter() - t0)
            nfes.append(sol.stats["nfe"])
            times.append(statistics.median(ts_))
            errs.append(float((sol.ys[-1] - ref).abs().max()))
    for tol, n, tm, e in zip(tols, nfes, times, errs):
        tag = f"{tol:.0e}"
        metrics[f"nfe_tol_{tag}"] = n
        metrics[f"time_ms_tol_{tag}"] = 1e3 * tm
        metrics[f"error_tol_{tag}"] = e
    metrics["nfe_monotone_in_tol"] = all(b >= a for a, b in zip(nfes, nfes[1:]))
    n_mean, t_mean = statistics.fmean(nfes), statistics.fmean(times)
    sxx = sum((n - n_mean) ** 2 for n in nfes)
    sxy = sum((n - n_mean) * (tm - t_mean) for n, tm in zip(nfes, times))
    syy = sum((tm - t_mean) ** 2 for tm in times)
    metrics["corr_time_nfe"] = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
    metrics["ms_per_nfe"] = 1e3 * sxy / sxx if sxx > 0 else float("nan")
    write_metrics(opts.out, metrics)  # before the picture: a failed plot never loses the run
    if not can_plot():
        return metrics

    plt = pyplot()
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    ax[0].semilogy(nfes, errs, "o-")
    for tol, n, e in zip(tols, nfes, errs):
        ax[0].annotate(f"{tol:.0e}", (n, e), fontsize=7)
    ax[0].set_xlabel("forward NFE")
    ax[0].set_ylabel("max error at t=1")
    ax[0].set_title("(a) error vs NFE (labels: tolerance)")
    ax[1].plot(nfes, [1e3 * tm for tm in times], "o-")
    ax[1].set_xlabel("forward NFE")
    ax[1].set_ylabel("forward time [ms]")
    ax[1].set_title(f"(b) time vs NFE (corr {metrics['corr_time_nfe']:.3f})")
    ax[2].scatter(nfe_f, nfe_b, s=4)
    ax[2].set_xlabel("forward NFE")
    ax[2].set_ylabel("backward NFE")
    ax[2].set_title(f"(c) backward/forward = {metrics['nfe_ratio_backward_forward']:.2f}")
    w = max(1, iters // 50)
    smooth = [statistics.fmean(nfe_f[i : i + w]) for i in range(0, len(nfe_f), w)]
    ax[3].plot(range(0, len(nfe_f), w), smooth)
    ax[3].set_xlabel("training iteration")
    ax[3].set_ylabel("forward NFE")
    ax[3].set_title("(d) NFE over training")
    savefig(fig, opts.out / "nfe_vs_tol.png")
    return metrics
