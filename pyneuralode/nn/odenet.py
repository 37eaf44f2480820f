"""ODE-Net for MNIST and its Table 1 baselines (Chen et al., NeurIPS 2018, §7 / Table 1).

The architecture follows torchdiffeq's ``examples/odenet_mnist.py`` ("conv" downsampling):

* downsampling: Conv(1→64, 3×3) → GN → ReLU → Conv(64→64, 4×4, s2, p1) → GN → ReLU →
  Conv(64→64, 4×4, s2, p1), giving a 64×6×6 feature map;
* features, by ``variant``:

  - ``"odenet"``: one :class:`ODEBlock` integrating :class:`ODENetFunc` (GN → ReLU →
    time-concatenated 3×3 conv → GN → ReLU → time-concatenated conv → GN) over ``t ∈ [0, 1]`` with
    an
    adaptive solver (Dopri5, ``rtol = atol = 1e-3`` as in the paper) — 208,266 parameters;
  - ``"rknet"``: the same block, but a fixed-step RK4 differentiated through its operations
    (:class:`~pyneuralode.DirectAdjoint`) — 208,266 parameters;
  - ``"resnet"``: 6 pre-activation residual blocks (He et al. 2016) — 576,778 parameters;
  - ``"none"``: no feature block at all (ablation) — 132,874 parameters;
* head: GN → ReLU → global average pool → Linear(64→10).

``model.nfe_forward`` is the number of ODE-function evaluations of the last forward pass;
``model.nfe_backward`` the number made since then (by the backward pass of an adjoint method;
0 with ``DirectAdjoint``, which backpropagates through the stored steps instead).
"""

from __future__ import annotations

import torch
from torch import nn

from .._arguments import check_tolerance
from .._solve import solve
from ..sensitivity import DirectAdjoint
from ..sensitivity._resolve import resolve_sensealg
from ..solvers import RK4, Dopri5
from ..solvers._resolve import resolve_solver

__all__ = ["MNISTNet", "ODEBlock", "ODENetFunc", "PreActResBlock", "MNIST_VARIANTS"]

MNIST_VARIANTS = ("odenet", "rknet", "resnet", "none")


def _norm(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, dim), dim)


class _ConcatConv2d(nn.Module):
    """A conv whose input gets the time ``t`` as an extra constant channel."""

    def __init__(
        self, dim_in: int, dim_out: int, ksize: int = 3, stride: int = 1, padding: int = 1
    ):
        super().__init__()
        self.layer = nn.Conv2d(
            dim_in + 1, dim_out, kernel_size=ksize, stride=stride, padding=padding
        )

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1]) * t.to(x.dtype)
        return self.layer(torch.cat([tt, x], 1))


class ODENetFunc(nn.Module):
    """The ODE-Net vector field ``f(t, h)`` on ``[B, dim, H, W]`` feature maps; counts its calls in
    ``nfe``."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm1 = _norm(dim)
        self.conv1 = _ConcatConv2d(dim, dim)
        self.norm2 = _norm(dim)
        self.conv2 = _ConcatConv2d(dim, dim)
        self.norm3 = _norm(dim)
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        out = self.conv1(t, torch.relu(self.norm1(x)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class ODEBlock(nn.Module):
    """Map ``h(0) ↦ h(T)`` by solving ``dh/dt = func(t, h)`` over ``t = (0, T)`` with
    :func:`pyneuralode.solve`.

    ``solver`` (default ``pn.Dopri5()``, as torchdiffeq's example), ``rtol``/``atol`` (paper:
    1e-3 for classification), ``sensealg`` (object or ``"direct"``/``"backsolve"``/
    ``"interpolating"``/``"quadrature"``; default DirectAdjoint). Fixed steps: ``adaptive=False,
    dt=h``.
    """

    def __init__(
        self,
        func: nn.Module,
        t_end: float = 1.0,
        solver=None,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        sensealg=None,
        adaptive: bool = True,
        dt=None,
        max_steps: int = 10_000,
    ):
        super().__init__()
        if not hasattr(func, "nfe"):
            raise TypeError(
                "func: expected a module with an `nfe` call counter, such as ODENetFunc"
            )
        self.func = func
        self.solver = resolve_solver(solver, Dopri5)
        self.rtol, self.atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
        self.sensealg = resolve_sensealg(sensealg)
        self.adaptive, self.dt, self.max_steps = adaptive, dt, max_steps
        self.register_buffer("t", torch.tensor([0.0, float(t_end)]), persistent=False)
        self.nfe_forward = 0
        self.last_stats: dict = {}

    @property
    def nfe_backward(self) -> int:
        """Function evaluations since the last forward pass finished (those of its backward
        pass)."""
        return self.func.nfe

    def forward(self, x):
        self.func.nfe = 0
        sol = solve(
            self.func,
            x,
            self.t.to(x.dtype),
            self.solver,
            rtol=self.rtol,
            atol=self.atol,
            adaptive=self.adaptive,
            dt=self.dt,
            sensealg=self.sensealg,
            dense=False,
            max_steps=self.max_steps,
        )
        self.nfe_forward = self.func.nfe
        self.last_stats = dict(sol.stats)
        self.func.nfe = 0
        return sol.ys[-1]


class PreActResBlock(nn.Module):
    """Pre-activation residual block (He et al., ECCV 2016): GN → ReLU → conv3×3 → GN → ReLU →
    conv3×3, plus identity."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm1 = _norm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)
        self.norm2 = _norm(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.norm1(x)))
        out = self.conv2(torch.relu(self.norm2(out)))
        return out + x


class MNISTNet(nn.Module):
    """The Table 1 MNIST classifiers: ``variant`` in ``"odenet"``, ``"rknet"``, ``"resnet"``,
    ``"none"``.

    ``solver``/``rtol``/``atol``/``sensealg`` configure the ODE-Net block (defaults: Dopri5,
    1e-3, 1e-3, DirectAdjoint); RK-Net uses RK4 with ``rk_steps`` fixed steps over ``[0, 1]``,
    backpropagated directly. Input ``[B, 1, 28, 28]``, output logits ``[B, 10]``.
    """

    def __init__(
        self,
        variant: str = "odenet",
        *,
        solver=None,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        sensealg=None,
        rk_steps: int = 4,
        dim: int = 64,
        num_classes: int = 10,
    ):
        super().__init__()
        if variant not in MNIST_VARIANTS:
            raise ValueError(f"variant: expected one of {MNIST_VARIANTS}, got {variant!r}")
        if not isinstance(rk_steps, int) or rk_steps < 1:
            raise ValueError(f"rk_steps: expected a positive int, got {rk_steps!r}")
        self.variant = variant
        self.downsampling = nn.Sequential(
            nn.Conv2d(1, dim, 3, 1),
            _norm(dim),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 4, 2, 1),
            _norm(dim),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 4, 2, 1),
        )
        if variant == "odenet":
            self.features = ODEBlock(
                ODENetFunc(dim), solver=solver, rtol=rtol, atol=atol, sensealg=sensealg
            )
        elif variant == "rknet":
            self.features = ODEBlock(
                ODENetFunc(dim),
                solver=RK4(),
                adaptive=False,
                dt=1.0 / rk_steps,
                sensealg=DirectAdjoint(),
            )
        elif variant == "resnet":
            self.features = nn.Sequential(*[PreActResBlock(dim) for _ in range(6)])
        else:
            self.features = nn.Identity()
        self.head = nn.Sequential(
            _norm(dim),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(dim, num_classes),
        )

    @property
    def is_ode(self) -> bool:
        return isinstance(self.features, ODEBlock)

    @property
    def nfe_forward(self):
        """ODE-function evaluations of the last forward pass (``None`` for ``resnet``/``none``)."""
        return self.features.nfe_forward if self.is_ode else None

    @property
    def nfe_backward(self):
        """ODE-function evaluations since the last forward pass (its backward; ``None`` without an
        ODE block)."""
        return self.features.nfe_backward if self.is_ode else None

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"x: expected images shaped [B, 1, H, W], got {tuple(x.shape)}")
        return self.head(self.features(self.downsampling(x)))
