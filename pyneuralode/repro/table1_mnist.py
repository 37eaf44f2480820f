"""``pyneuralode repro table1-mnist``: the paper's Table 1 side by side, plus the no-ODE-block
ablation.

Trains four MNIST classifiers with the same recipe (``--schedule fast``: Adam 3e-3 + cosine, batch
32, 1 epoch by default; ``--schedule paper`` for the 160-epoch SGD schedule on a GPU) and reports,
per model:

* test error, parameters;
* memory: bytes saved for the backward pass of one training batch (``saved_mb_*``, measured with
  ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded; this is the O(L) vs O(1)
  column of Table 1) and, on CUDA, the peak allocated memory of one training step
  (``cuda_peak_mb_*``); the process's max RSS is reported once (``max_rss_mb``);
* forward and backward NFE (ODE function evaluations per batch; backward NFE is 0 when the solver
  is backpropagated directly, as in RK-Net);
* seconds per training batch.

Models: ``resnet`` (6 pre-activation residual blocks), ``rknet`` (RK4, ``--rk-steps`` fixed steps,
backpropagated directly), ``odenet`` (Dopri5, tol 1e-3, gradients by ``--odenet-sensealg``, default
the backsolve adjoint as in the paper), ``none`` (the downsampling stack and head only). Writes
``metrics.json``, ``table1.md`` and ``table1.png``.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import odenet_mnist as om
from ._common import can_plot, pyplot, savefig, seed_everything, write_metrics

NAME = "table1-mnist"
VARIANTS = ("resnet", "rknet", "odenet", "none")
LABELS = {
    "resnet": "ResNet (6 blocks)",
    "rknet": "RK-Net (RK4)",
    "odenet": "ODE-Net",
    "none": "no ODE block (ablation)",
}
PAPER = {
    "resnet": ("0.41%", "0.60 M", "O(L)"),
    "rknet": ("0.47%", "0.22 M", "O(L̃)"),
    "odenet": ("0.42%", "0.22 M", "O(1)"),
    "none": ("–", "–", "–"),
}


def add_arguments(parser) -> None:
    om.add_arguments(parser)
    g = parser.add_argument_group("table1-mnist")
    g.add_argument(
        "--models",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    g.add_argument(
        "--rk-steps",
        type=int,
        default=None,
        help="fixed RK4 steps of RK-Net over [0, 1] (default 4)",
    )
    g.add_argument(
        "--odenet-sensealg",
        default=None,
        choices=("direct", "backsolve", "interpolating", "quadrature"),
        help="gradient method of the ODE-Net row (default backsolve, the paper's adjoint)",
    )


def saved_tensor_bytes(model, x, y) -> int:
    """Bytes of distinct tensors autograd saves for backward in one training step (parameters
    excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse/meta tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _models(opts):
    names = [
        m.strip()
        for m in str(getattr(opts, "models", None) or ",".join(VARIANTS)).split(",")
        if m.strip()
    ]
    bad = [m for m in names if m not in VARIANTS]
    if bad or not names:
        raise ValueError(f"--models: unknown {bad or names}; choose from {', '.join(VARIANTS)}")
    return names


def markdown_table(rows: dict) -> str:
    lines = [
        "| Model | Test error | Params | Saved for backward (MB/batch) | NFE fwd | NFE bwd | "
        "s/batch | Paper: error, params, memory |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v, r in rows.items():
        nf = "–" if r["nfe_forward"] is None else f"{r['nfe_forward']:.1f}"
        nb = "–" if r["nfe_backward"] is None else f"{r['nfe_backward']:.1f}"
        lines.append(
            f"| {LABELS[v]} | {100 * r['test_error']:.2f}% | {r['params']:,} | "
            f"{r['saved_mb']:.1f} | {nf} | {nb} | "
            f"{r['seconds_per_batch']:.3f} | {', '.join(PAPER[v])} |"
        )
    return "\n".join(lines) + "\n"


def run(opts) -> dict:
    """Train and compare the Table 1 models; write ``metrics.json``, ``table1.md``,
    ``table1.png``."""
    from ..nn.odenet import MNISTNet

    out = Path(om._opt(opts, "out", Path("runs") / NAME))
    out.mkdir(parents=True, exist_ok=True)
    seed = int(om._opt(opts, "seed", 0))
    names = _models(opts)
    rk_steps = int(om._opt(opts, "rk_steps", 4))
    tol = float(om._opt(opts, "tol", 1e-3))
    sensealg = om._opt(opts, "odenet_sensealg", "backsolve")
    dist = om.Dist(om.pick_device(opts))
    try:
        seed_everything(seed)
        data, source = om.get_data(opts)
        cfg = om.make_schedule(opts, data["train"][0].shape[0])
        rows, metrics = {}, {}
        for v in names:
            seed_everything(seed)
            kw = (
                {"rk_steps": rk_steps}
                if v == "rknet"
                else {"rtol": tol, "atol": tol, "sensealg": sensealg}
                if v == "odenet"
                else {}
            )
            model = MNISTNet(v, **kw).to(dist.device)
            # clone: a slice would keep (and be counted as) the whole training tensor's storage
            xb = data["train"][0][:128].clone().to(dist.device)
            yb = data["train"][1][:128].clone().to(dist.device)
            saved = saved_tensor_bytes(model, xb, yb)
            cuda_peak = None
            if dist.device.type == "cuda":
                torch.cuda.synchronize(dist.device)
                torch.cuda.reset_peak_memory_stats(dist.device)
                base = torch.cuda.memory_allocated(dist.device)
                F.cross_entropy(model(xb), yb).backward()
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize(dist.device)
                cuda_peak = (torch.cuda.max_memory_allocated(dist.device) - base) / 2**20
            seed_everything(seed)
            hist = om.fit(
                model,
                data,
                cfg,
                dist,
                max_batches=getattr(opts, "max_batches", None),
                seed=seed,
                show_progress=not getattr(opts, "no_progress", False),
            )
            acc, nfe_test = om.evaluate(model, *data["test"], dist)
            r = {
                "test_error": 1.0 - acc,
                "test_accuracy": acc,
                "params": sum(p.numel() for p in model.parameters()),
                "saved_mb": saved / 2**20,
                "cuda_peak_mb": cuda_peak,
                "nfe_forward": hist["nfe_forward_mean"],
                "nfe_backward": hist["nfe_backward_mean"],
                "nfe_forward_test": nfe_test,
                "train_seconds": hist["train_seconds"],
                "seconds_per_batch": hist["train_seconds"] / max(1, hist["steps"]),
            }
            rows[v] = r
            for k, val in r.items():
                metrics[f"{k}_{v}"] = val
        metrics.update(
            {
                "max_rss_mb": _max_rss_mb(),
                "data": source,
                "n_train": int(data["train"][0].shape[0]),
                "n_test": int(data["test"][0].shape[0]),
                "epochs": cfg["epochs"],
                "schedule": cfg["schedule"],
                "lr": cfg["lr"],
                "batch_size": cfg["batch_size"],
                "tol": tol,
                "rk_steps": rk_steps,
                "odenet_sensealg": str(sensealg),
                "device": str(dist.device),
                "world_size": dist.world,
                "quick": bool(getattr(opts, "quick", False)),
            }
        )
        if dist.main:
            write_metrics(out, metrics)
            header = (
                f"Table 1 on {source} ({metrics['n_train']} training images, {cfg['epochs']} "
                "epoch(s), "
                f"schedule {cfg['schedule']}, batch {cfg['batch_size']}, device {dist.device}); "
                f"memory = bytes autograd saves for one batch of 128.\n\n"
            )
            (out / "table1.md").write_text(header + markdown_table(rows))
        if dist.main and can_plot():
            plt = pyplot()
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
            labels = [LABELS[v].split(" (")[0] for v in rows]
            axes[0].bar(labels, [100 * r["test_error"] for r in rows.values()])
            axes[0].set(ylabel="test error (%)")
            axes[1].bar(labels, [r["saved_mb"] for r in rows.values()])
            axes[1].set(ylabel="saved for backward (MB / batch)")
            for ax in axes:
                ax.tick_params(axis="x", rotation=20)
            fig.tight_layout()
            savefig(fig, out / "table1.png")
        dist.barrier()
        return metrics
    finally:
        dist.close()


if __name__ == "__main__":  # same as `pyneuralode repro table1-mnist ...`
    from .cli import main

    raise SystemExit(main(["repro", NAME, *sys.argv[1:]]))
