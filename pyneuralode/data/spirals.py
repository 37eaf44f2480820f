"""Noisy 2-D spirals for the latent-ODE experiment (Chen et al. 2018, §5.1; torchdiffeq
``latent_ode.py``).

Two base curves over ``θ ∈ [start, stop]`` sampled at ``n_total`` equally spaced times:
counter-clockwise ``r = a + bθ`` centred at ``(+5, 0)`` and clockwise ``r = a + 50b/θ'``
(``θ' = stop + 1 − θ``, reversed) centred at ``(−5, 0)``. Each spiral is a window of ``n_window``
consecutive points of one of them (half each direction) starting at a random index, with
Gaussian noise of std ``noise_std`` added. All spirals share the time grid
``ts = θ[:n_window] − θ[0]``.

Table 2 protocol (paper): the first ``n_window // 2`` points are the training window, from which
``n_obs ∈ {30, 50, 100}`` points per spiral are observed (:func:`observation_mask`); the RMSE is
measured on the remaining points, beyond the training window (here against the noise-free curve).
"""

from __future__ import annotations

import math

import torch

__all__ = ["make_spirals", "observation_mask"]


def make_spirals(
    n_spirals: int = 1000,
    n_total: int = 1000,
    n_window: int = 200,
    start: float = 0.0,
    stop: float = 6 * math.pi,
    noise_std: float = 0.3,
    a: float = 0.0,
    b: float = 0.3,
    margin: int = 100,
    seed: int = 0,
    dtype=torch.float32,
) -> dict:
    """Generate the spirals: ``{"ts": [n_window], "clean": [N, n_window, 2], "noisy": [N, n_window,
    2], "clockwise": [N] bool}``.

    Spirals alternate direction (exactly half clockwise). Window starts are uniform in
    ``[margin, n_total − n_window]`` (away from the large-radius start of the clockwise curve,
    as torchdiffeq does).
    """
    for name, v in (("n_spirals", n_spirals), ("n_total", n_total), ("n_window", n_window)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not isinstance(margin, int) or margin < 0 or margin + n_window > n_total:
        raise ValueError(
            f"margin: need 0 <= margin and margin + n_window <= n_total ({margin} + {n_window} > "
            f"{n_total}); lower n_window or margin"
        )
    if noise_std < 0:
        raise ValueError(f"noise_std: must be non-negative, got {noise_std}")
    g = torch.Generator().manual_seed(int(seed))
    th = torch.linspace(start, stop, n_total, dtype=torch.float64)
    r_cc = a + b * th
    cc = torch.stack([r_cc * torch.cos(th) + 5, r_cc * torch.sin(th)], 1)
    th_cw = stop + 1.0 - th
    r_cw = a + b * 50.0 / th_cw
    cw = torch.stack([r_cw * torch.cos(th_cw) - 5, r_cw * torch.sin(th_cw)], 1).flip(0)
    starts = torch.randint(margin, n_total - n_window + 1, (n_spirals,), generator=g)
    clockwise = torch.arange(n_spirals) % 2 == 1
    clockwise = clockwise[torch.randperm(n_spirals, generator=g)]
    clean = torch.stack(
        [(cw if c else cc)[s : s + n_window] for s, c in zip(starts.tolist(), clockwise.tolist())]
    )
    noisy = clean + noise_std * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    ts = th[:n_window] - th[0]
    return {
        "ts": ts.to(dtype),
        "clean": clean.to(dtype),
        "noisy": noisy.to(dtype),
        "clockwise": clockwise,
    }


def observation_mask(n_spirals: int, n_points: int, n_obs: int, seed: int = 0) -> torch.Tensor:
    """A boolean mask ``[n_spirals, n_points]`` with ``n_obs`` randomly chosen points (without
    replacement) per row."""
    if not isinstance(n_obs, int) or not 1 <= n_obs <= n_points:
        raise ValueError(f"n_obs: expected an int in [1, {n_points}], got {n_obs!r}")
    g = torch.Generator().manual_seed(int(seed))
    scores = torch.rand(n_spirals, n_points, generator=g)
    idx = scores.argsort(dim=1)[:, :n_obs]
    mask = torch.zeros(n_spirals, n_points, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask
