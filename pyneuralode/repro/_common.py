"""Helpers shared by the reproduction modules: metrics file, seeding, progress bars, figures."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

__all__ = ["write_metrics", "seed_everything", "progress", "savefig"]


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


def write_metrics(out, metrics: dict) -> Path:
    """Write ``out/metrics.json`` (flat keys; tensors and numpy scalars become numbers; NaN/Inf become null)."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics: expected a dict of flat keys, got {type(metrics).__name__}")
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            raise ValueError(f"metrics[{k!r}]: nested dicts are not allowed; use flat keys such as '{k}_sub'")
        v = _plain(v)
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        flat[str(k)] = v
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    path.write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    return path


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def progress(iterable=None, **kw):
    """A tqdm progress bar (``tqdm.auto``), e.g. ``for it in progress(range(n), desc="train")``."""
    from tqdm.auto import tqdm

    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


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
