"""Helpers shared by the reproduction modules: metrics file, seeding, progress bars, figures."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

from .._progress import progress

__all__ = [
    "write_metrics",
    "seed_everything",
    "progress",
    "savefig",
    "begin_run",
    "run_info",
    "can_plot",
    "write_metrics_beside",
]

# What the CLI (or an example) records at the start of a run; write_metrics adds it to the metrics.
_RUN: dict = {}


def begin_run(seed=None, argv=None) -> None:
    """Start the clock and remember the command line and seed for :func:`run_info`."""
    _RUN.clear()
    _RUN.update(
        start=time.perf_counter(),
        seed=seed,
        argv=["python", *sys.argv] if argv is None else list(argv),
    )


def _git_commit():
    """The commit of the checkout pyneuralode is imported from (``None`` for an installed wheel)."""
    here = Path(__file__).resolve().parents[2]
    if not (here / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no __version__: recorded as missing
        return None


def run_info() -> dict:
    """Flat provenance keys: package versions, command line, seed, git commit, wall time so far."""
    import platform

    from .._version import __version__

    info = {
        "pyneuralode_version": __version__,
        "python_version": platform.python_version(),
        "torch_version": _version("torch"),
        "numpy_version": _version("numpy"),
        "scipy_version": _version("scipy"),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }
    if _RUN:
        info["command"] = " ".join(_RUN["argv"])
        info["seed"] = _RUN["seed"]
        info["wall_time_s"] = round(time.perf_counter() - _RUN["start"], 3)
    return info


def _plain(v):
    try:
        import torch

        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str)):
        try:
            v = v.item()
        except (TypeError, ValueError):
            pass
    return v


def write_metrics(out, metrics: dict, filename: str = "metrics.json") -> Path:
    """Write ``out/metrics.json`` (flat keys; tensors and numpy scalars become numbers; NaN/Inf
    become null).

    The provenance keys of :func:`run_info` are added (a metric of the same name wins). Call it
    before plotting, so a failed plot never loses a run.
    """
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics: expected a dict of flat keys, got {type(metrics).__name__}")
    flat = {}
    for k, v in {**run_info(), **metrics}.items():
        if isinstance(v, dict):
            raise ValueError(
                f"metrics[{k!r}]: nested dicts are not allowed; use flat keys such as '{k}_sub'"
            )
        v = _plain(v)
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        flat[str(k)] = v
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    return path


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def write_metrics_beside(figure, metrics: dict) -> Path:
    """:func:`write_metrics` for an example: ``NAME_metrics.json`` beside its figure
    ``NAME.png``."""
    figure = Path(figure)
    return write_metrics(figure.parent, metrics, filename=f"{figure.stem}_metrics.json")


def can_plot() -> bool:
    """True when matplotlib is importable; otherwise prints one line saying the plots are
    skipped."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install 'pyneuralode[examples]')")
        return False
    return True


def savefig(fig, path) -> Path:
    """Save a matplotlib figure (Agg) to ``path`` and close it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend (for modules that plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
