"""``pyneuralode repro NAME [--quick] [--epochs N] [--device cpu|cuda] [--out DIR] [--seed S]``.

Each NAME maps to the module ``pyneuralode.repro.<NAME with - replaced by _>``, which defines
``run(opts) -> dict`` (``opts``: argparse Namespace with ``quick``, ``epochs`` (None = the
module's default), ``device``, ``out`` (a created ``pathlib.Path``), ``seed``) and optionally
``add_arguments(parser)`` for extra flags. ``run`` writes ``out/metrics.json`` (via
``_common.write_metrics``) and its plots; the CLI prints the metrics.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "REPRO_NAMES"]

REPRO_NAMES = {
    "odenet-mnist": "ODE-Net on MNIST (Table 1 row, paper §7)",
    "table1-mnist": "Table 1: ResNet vs RK-Net vs ODE-Net (and no ODE block) on MNIST",
    "cnf-2d": "continuous normalizing flows on 2-D toy data vs a planar flow (paper §4)",
    "latent-spiral": "latent ODE vs RNN extrapolation RMSE on irregular spirals (Table 2)",
    "nfe-vs-tol": "NFE against tolerance, time against NFE, NFE over training (Figure 3)",
    "deq-2x": "deep equilibrium model learning y = 2x via a neural-ODE steady state",
    "deq-mnist": "deep equilibrium model on MNIST",
    "cdeq-mnist": (
        "continuous DEQs on MNIST: vanilla, Jacobian reg., Skip DEQ, Skip-Reg DEQ (Pal et al. 2022)"
    ),
}


def _module_name(name: str) -> str:
    return "pyneuralode.repro." + name.replace("-", "_")


def _listing() -> str:
    return "\n".join(f"  {n:<14} {d}" for n, d in REPRO_NAMES.items())


def _base_parser(prog: str, add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        add_help=add_help,
        description="Reproduce an experiment of the Neural ODE paper with pyneuralode.",
    )
    p.add_argument("name", nargs="?", help="which reproduction (see --list)")
    p.add_argument("--list", action="store_true", help="list the reproductions and exit")
    p.add_argument(
        "--quick", action="store_true", help="a tiny version that runs in seconds (for tests)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs/iterations (default: the module's)",
    )
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="torch device (default cpu)"
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/NAME)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def main(argv=None) -> int:
    """The ``pyneuralode`` console script; output piped into ``head`` ends quietly."""
    try:
        rc = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return rc
    except BrokenPipeError:
        # The reader went away (`pyneuralode repro --list | head`): silence the final flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="pyneuralode", description="pyneuralode command line")
    top.add_argument("command", choices=("repro",), help="'repro': run a reproduction of the paper")
    top.add_argument("--version", action="store_true", help="print the version and exit")
    if argv and argv[0] == "--version":
        from .._version import __version__

        print(f"pyneuralode {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] != "repro":
        top.error(f"unknown command {argv[0]!r}; try 'pyneuralode repro --list'")
    rest = argv[1:]
    parser = _base_parser("pyneuralode repro")
    pre, _ = _base_parser("pyneuralode repro", add_help=False).parse_known_args(rest)
    if pre.name is None and any(a in ("-h", "--help") for a in rest):
        parser.print_help()
        print("\nReproductions:\n" + _listing())
        return 0
    if pre.list:
        print("Reproductions:\n" + _listing())
        return 0
    if pre.name is None:
        parser.error("missing NAME; available:\n" + _listing())
    if pre.name not in REPRO_NAMES:
        parser.error(f"unknown reproduction {pre.name!r}; available:\n" + _listing())
    try:
        module = importlib.import_module(_module_name(pre.name))
    except ModuleNotFoundError as exc:
        if exc.name == _module_name(pre.name):
            print(
                f"pyneuralode repro: {pre.name!r} is listed but its module {exc.name} is not "
                "installed yet",
                file=sys.stderr,
            )
            return 2
        raise
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    opts = parser.parse_args(rest)
    if opts.epochs is not None and opts.epochs < 1:
        parser.error(f"--epochs: expected a positive int, got {opts.epochs}")
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    opts.out = Path(opts.out if opts.out is not None else Path("runs") / pre.name)
    opts.out.mkdir(parents=True, exist_ok=True)
    from ._common import begin_run, run_info, write_metrics

    path = opts.out / "metrics.json"
    path.unlink(missing_ok=True)  # a previous run's file must not pass for this one's
    begin_run(seed=opts.seed, argv=["pyneuralode", *argv])
    metrics = module.run(opts)
    if path.exists():  # written before the plots: bring the wall time up to the end of the run
        written = json.loads(path.read_text())
        written["wall_time_s"] = run_info()["wall_time_s"]
        path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    elif isinstance(metrics, dict):
        write_metrics(opts.out, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    print(f"wrote {opts.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
