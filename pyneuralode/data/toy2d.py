"""2-D toy densities for normalizing flows (following FFJORD's ``lib/toy_data.py``; no sklearn).

``sample_toy2d(name, n)`` draws ``n`` points ``[n, 2]`` from ``"moons"`` (two moons),
``"circles"`` (two concentric circles), ``"8gaussians"``, ``"checkerboard"`` or ``"pinwheel"``,
all scaled to roughly ``[-4, 4]²`` as in FFJORD. Angles are drawn uniformly at random (sklearn's
``make_moons``/``make_circles`` place them on a grid), so the samples are i.i.d. from a density.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sample_toy2d", "TOY2D_NAMES"]

TOY2D_NAMES = ("moons", "circles", "8gaussians", "checkerboard", "pinwheel")
_ALIASES = {
    "two_moons": "moons",
    "twomoons": "moons",
    "2moons": "moons",
    "two_circles": "circles",
    "twocircles": "circles",
    "2circles": "circles",
    "eight_gaussians": "8gaussians",
}


def _moons(n, g):
    n_out = n // 2
    n_in = n - n_out
    a_out = math.pi * torch.rand(n_out, generator=g, dtype=torch.float64)
    a_in = math.pi * torch.rand(n_in, generator=g, dtype=torch.float64)
    outer = torch.stack([torch.cos(a_out), torch.sin(a_out)], 1)
    inner = torch.stack([1 - torch.cos(a_in), 1 - torch.sin(a_in) - 0.5], 1)
    x = torch.cat([outer, inner]) + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = x[torch.randperm(n, generator=g)]  # interleave the two moons
    return x * 2 + torch.tensor([-1.0, -0.2], dtype=torch.float64)


def _circles(n, g):
    n_out = n // 2
    r = torch.cat(
        [torch.ones(n_out, dtype=torch.float64), torch.full((n - n_out,), 0.5, dtype=torch.float64)]
    )
    r = r[torch.randperm(n, generator=g)]  # interleave the two circles
    a = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.stack([r * torch.cos(a), r * torch.sin(a)], 1) + 0.08 * torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )
    return 3 * x


def _eight_gaussians(n, g):
    s = 1.0 / math.sqrt(2)
    centers = 4.0 * torch.tensor(
        [(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)], dtype=torch.float64
    )
    idx = torch.randint(0, 8, (n,), generator=g)
    x = 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64) + centers[idx]
    return x / 1.414


def _checkerboard(n, g):
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2_ = (
        torch.rand(n, generator=g, dtype=torch.float64)
        - torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2
    )
    x2 = x2_ + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def _pinwheel(n, g, radial_std=0.3, tangential_std=0.1, num_classes=5, rate=0.25):
    rads = torch.linspace(0, 2 * math.pi, num_classes + 1, dtype=torch.float64)[:-1]
    feats = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [radial_std, tangential_std], dtype=torch.float64
    )
    feats[:, 0] += 1.0
    labels = torch.randint(0, num_classes, (n,), generator=g)
    angles = rads[labels] + rate * torch.exp(feats[:, 0])
    c, s = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # [n, 2, 2]
    return 2 * torch.einsum("ti,tij->tj", feats, rot)


_SAMPLERS = {
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
}


def sample_toy2d(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    dtype=torch.float32,
    seed: int | None = None,
):
    """Draw ``n`` samples ``[n, 2]`` of toy density ``name`` (one of :data:`TOY2D_NAMES`).

    Pass a ``torch.Generator`` or a ``seed`` for reproducible draws (default: the global RNG).
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected one of {TOY2D_NAMES}, got {type(name).__name__}")
    key = name.lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in _SAMPLERS:
        raise ValueError(f"name: unknown toy density {name!r}; choose one of {TOY2D_NAMES}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return _SAMPLERS[key](n, generator).to(dtype)
