"""Test problems several test files share (each a plain torch field ``f(t, y, p)``)."""

from __future__ import annotations

import torch


def lotka_volterra(t, y, p):
    return torch.stack([p[0] * y[0] - p[1] * y[0] * y[1], -p[2] * y[1] + p[3] * y[0] * y[1]])


def robertson(t, y, k):
    return torch.stack(
        [
            -k[0] * y[0] + k[2] * y[1] * y[2],
            k[0] * y[0] - k[1] * y[1] ** 2 - k[2] * y[1] * y[2],
            k[1] * y[1] ** 2,
        ]
    )
