"""Time-dependent building blocks for vector fields ``f(t, y)``.

Every block is an ``nn.Module`` called as ``block(t, y)`` with ``t`` a 0-d tensor (or float) and
``y`` batched. Time enters as an extra input channel (``ConcatLinear``, ``ConcatConv2d``; Chen et
al. 2018, torchdiffeq's examples) or as a gate and shift of the output (``ConcatSquashLinear``;
Grathwohl et al., FFJORD, ICLR 2019).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConcatLinear", "ConcatSquashLinear", "ConcatMLP", "ConcatConv2d", "ConvODEFunc"]

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
}


def _time_rows(t, y: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor broadcasting against ``y``'s leading dimensions: a scalar, or one time
    per sample (``t`` shaped ``(B,)`` for ``y`` shaped ``(B, ...)``, from ``per_sample=True``)."""
    t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
    if t.numel() == 1:
        return t.reshape(())
    if t.ndim == 1 and y.ndim >= 2 and t.shape[0] == y.shape[0]:
        return t.view(-1, *([1] * (y.ndim - 1)))
    raise ValueError(
        f"t: expected a scalar time (or one per sample, shape ({y.shape[0]},)), "
        f"got shape {tuple(t.shape)}"
    )


def _time_column(t, y: torch.Tensor) -> torch.Tensor:
    return _time_rows(t, y).expand(*y.shape[:-1], 1)


class ConcatLinear(nn.Module):
    """``Linear([y, t])``: an affine layer with the time as an extra input feature."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layer = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t, y):
        return self.layer(torch.cat([y, _time_column(t, y)], -1))


class ConcatSquashLinear(nn.Module):
    """``Linear(y) * sigmoid(W_g t + b_g) + W_b t`` (FFJORD's ``concatsquash`` layer)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t, y):
        tt = _time_rows(t, y)
        tt = tt.reshape(1, 1) if tt.ndim == 0 else tt.reshape(*tt.shape[:-1], 1)
        return self.layer(y) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class ConcatMLP(nn.Module):
    """An MLP vector field ``f(t, y)`` on ``[..., dim]`` with time-dependent layers.

    ``hidden``: widths of the hidden layers (e.g. ``(64, 64)``); ``layer``: ``"concat"``
    (time as an input feature of every layer), ``"concatsquash"`` (FFJORD) or ``"ignore"``
    (an autonomous MLP); ``activation``: ``tanh``/``relu``/``elu``/``softplus``/``silu``.
    ``input_fn`` optionally transforms ``y`` first (e.g. ``lambda y: y**3`` for the spiral demo).
    """

    def __init__(
        self,
        dim: int,
        hidden=(64, 64),
        layer: str = "concat",
        activation: str = "tanh",
        input_fn=None,
    ):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden: expected positive ints, got {hidden!r}")
        kinds = {"concat": ConcatLinear, "concatsquash": ConcatSquashLinear, "ignore": None}
        if layer not in kinds:
            raise ValueError(f"layer: expected one of {sorted(kinds)}, got {layer!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        dims = (dim, *hidden, dim)
        self.time_dependent = layer != "ignore"
        self.layers = nn.ModuleList(
            (kinds[layer](a, b) if self.time_dependent else nn.Linear(a, b))
            for a, b in zip(dims[:-1], dims[1:])
        )
        self.act = _ACTIVATIONS[activation]()
        self.input_fn = input_fn

    def forward(self, t, y):
        h = self.input_fn(y) if self.input_fn is not None else y
        for i, lay in enumerate(self.layers):
            h = lay(t, h) if self.time_dependent else lay(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class ConcatConv2d(nn.Module):
    """A 2-D convolution whose input gets the time ``t`` as an extra constant channel
    (torchdiffeq)."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        ksize: int = 3,
        stride: int = 1,
        padding: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.layer = nn.Conv2d(
            dim_in + 1, dim_out, kernel_size=ksize, stride=stride, padding=padding, bias=bias
        )

    def forward(self, t, x):
        if x.ndim != 4:
            raise ValueError(f"x: expected feature maps shaped [B, C, H, W], got {tuple(x.shape)}")
        tt = _time_rows(t, x).expand(x.shape[0], 1, *x.shape[2:])
        return self.layer(torch.cat([tt, x], 1))


class ConvODEFunc(nn.Module):
    """Conv vector field of ODE-Net (GN → ReLU → ConcatConv → GN → ReLU → ConcatConv → GN) on ``[B,
    dim, H, W]``."""

    def __init__(self, dim: int = 64, groups: int = 32):
        super().__init__()
        g = min(groups, dim)
        self.norm1, self.conv1 = nn.GroupNorm(g, dim), ConcatConv2d(dim, dim)
        self.norm2, self.conv2 = nn.GroupNorm(g, dim), ConcatConv2d(dim, dim)
        self.norm3 = nn.GroupNorm(g, dim)

    def forward(self, t, x):
        out = self.conv1(t, torch.relu(self.norm1(x)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)
