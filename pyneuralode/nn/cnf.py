"""Continuous normalizing flows (Chen et al. 2018 §4; FFJORD, Grathwohl et al. 2019; RNODE, Finlay
et al. 2020).

A CNF maps data ``x = z(0)`` to a base sample ``z(T)`` through ``dz/dt = f(t, z)`` and tracks the
log-density with the instantaneous change of variables ``d log p(z(t))/dt = −Tr(∂f/∂z)``:

    log p_x(x) = log p_base(z(T)) + ∫₀ᵀ Tr(∂f/∂z(t)) dt.

The trace is exact (one vector–Jacobian product per dimension; for small ``dim``) or
Hutchinson's estimate ``εᵀ(∂f/∂z)ε`` with Rademacher or Gaussian ``ε`` drawn once per solve and
held fixed over it (FFJORD). RNODE's kinetic energy ``∫‖f‖²dt`` and Jacobian Frobenius norm
``∫‖∂f/∂z‖²_F dt`` (exact rows, or ``‖εᵀ∂f/∂z‖²`` with the Hutchinson noise) are integrated as
extra state channels and added to :meth:`CNF.loss`.

``PlanarFlow`` (Rezende & Mohamed 2015) is the discrete baseline of the paper's Figure 4/5.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._solve import solve
from ..sensitivity._resolve import resolve_sensealg
from ..solvers import Dopri5
from ..solvers._resolve import resolve_solver
from ..solvers.linear import autograd_on, grad_leaf

__all__ = ["CNF", "PlanarFlow", "HyperPlanarField"]

_LOG2PI = math.log(2 * math.pi)


def _gaussian_logp(z: torch.Tensor, std: float) -> torch.Tensor:
    d = z.shape[-1]
    return -0.5 * (z / std).pow(2).sum(-1) - d * (math.log(std) + 0.5 * _LOG2PI)


def _finite(name: str, value, what: str, positive: bool = False) -> float:
    """``value`` as a float, finite and ``> 0`` (``positive``) or ``>= 0``; else a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: {what} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        need = "a finite number > 0" if positive else "a finite number >= 0 (0 turns it off)"
        raise ValueError(f"{name}: {what} must be {need}, got {value!r}")
    return v


def _check_data(x, dim: int) -> None:
    """Data for a flow: a finite floating tensor shaped [batch, dim] (errors name ``x``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor shaped [batch, {dim}], got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x: expected a tensor shaped [batch, {dim}], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"x: dtype {x.dtype} is not floating point; convert it, e.g. x.float() or x.double()"
        )
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or Inf; every data point must be finite")


class HyperPlanarField(nn.Module):
    """The paper's CNF dynamics: ``f(t, z) = Σₘ uₘ(t) tanh(wₘ(t)ᵀz + bₘ(t))`` with a gate,
    parameters from a hypernetwork of ``t``.

    ``width`` planar units (M in the paper), hypernetwork hidden size ``hidden`` (torchdiffeq's
    ``cnf.py``: 64 and 32).
    """

    def __init__(self, dim: int = 2, width: int = 64, hidden: int = 32):
        super().__init__()
        self.dim, self.width = dim, width
        self.net = nn.Sequential(
            nn.Linear(1, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 3 * width * dim + width),
        )

    def forward(self, t, z):
        p = self.net(torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(1, 1)).reshape(-1)
        n = self.width * self.dim
        W = p[:n].reshape(self.width, self.dim)
        U = p[n : 2 * n].reshape(self.width, self.dim)
        G = p[2 * n : 3 * n].reshape(self.width, self.dim)
        B = p[3 * n :]
        U = U * torch.sigmoid(G)
        h = torch.tanh(z @ W.T + B)  # [batch, width]
        return h @ U / self.width


class _Dynamics(nn.Module):
    """The augmented dynamics; an ``nn.Module`` owning the vector field so that adjoints find its
    parameters."""

    def __init__(self, vector_field, dim: int):
        super().__init__()
        self.vf = vector_field
        self.dim = dim
        self.mode = "exact"
        self.eps = None
        self.regs = False

    def forward(self, t, state):
        z = state[0]
        build = torch.is_grad_enabled()
        # The trace needs autograd even under torch.no_grad() or torch.inference_mode() (then
        # without a graph to keep); inference tensors cannot enter autograd, so they are cloned out
        # of it first.
        with autograd_on():
            if not z.requires_grad:
                z = grad_leaf(z)
            if isinstance(t, torch.Tensor) and t.is_inference():
                t = t.clone()
            f = self.vf(t, z)
            jac_sq = None
            if self.mode == "exact":
                tr = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
                rows = []
                for i in range(self.dim):
                    row = torch.autograd.grad(
                        f[:, i].sum(), z, create_graph=build, retain_graph=True
                    )[0]
                    tr = tr + row[:, i]
                    rows.append(row)
                if self.regs:
                    jac_sq = sum(r.pow(2).sum(-1) for r in rows)
            else:
                e = self.eps
                if e.is_inference():
                    e = e.clone()
                ej = torch.autograd.grad(f, z, e, create_graph=build, retain_graph=True)[0]
                tr = (ej * e).sum(-1)
                if self.regs:
                    jac_sq = ej.pow(2).sum(-1)
        out = [f, tr]
        if self.regs:
            out += [f.pow(2).sum(-1), jac_sq]
        if not build:
            out = [o.detach() for o in out]
        return tuple(out)


class CNF(nn.Module):
    """A continuous normalizing flow on ``R^dim`` with a Gaussian base ``N(0, base_std² I)``.

    ``vector_field(t, z)`` on ``[batch, dim]`` (default: FFJORD's ``concatsquash`` MLP
    ``dim→64→64→dim``, tanh); ``T`` the integration time (``train_T=True`` learns it);
    ``trace``: ``"exact"`` or ``"hutchinson"``; ``noise``: ``"rademacher"`` or ``"gaussian"``;
    ``kinetic``/``jacobian``: RNODE weights (0 = not integrated). ``solver`` (default Dopri5),
    ``rtol``/``atol`` (paper: 1e-5 for density estimation), ``sensealg`` as in :class:`NeuralODE`.

    ``log_prob(x)`` → ``[batch]``; ``loss(x)`` = ``−mean log p + kinetic·K + jacobian·J``;
    ``sample(n)`` → ``[n, dim]``. ``nfe_forward`` and ``last_reg`` (``{"kinetic", "jacobian"}``,
    batch means of the integrals) describe the last call.
    """

    def __init__(
        self,
        dim: int,
        vector_field=None,
        T: float = 0.5,
        trace: str = "exact",
        noise: str = "rademacher",
        solver=None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        sensealg=None,
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        base_std: float = 1.0,
        train_T: bool = False,
        adaptive: bool = True,
        dt=None,
    ):
        super().__init__()
        from .blocks import ConcatMLP

        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace: expected 'exact' or 'hutchinson', got {trace!r}")
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise: expected 'rademacher' or 'gaussian', got {noise!r}")
        T = _finite("T", T, "the integration time", positive=True)
        kinetic = _finite("kinetic", kinetic, "the kinetic-energy penalty weight")
        jacobian = _finite("jacobian", jacobian, "the Jacobian-norm penalty weight")
        base_std = _finite("base_std", base_std, "the base's standard deviation", positive=True)
        self.dim = dim
        vf = (
            vector_field
            if vector_field is not None
            else ConcatMLP(dim, (64, 64), layer="concatsquash")
        )
        self.dynamics = _Dynamics(vf, dim)
        self.sqrt_T = nn.Parameter(torch.tensor(math.sqrt(T)), requires_grad=bool(train_T))
        self.trace, self.noise = trace, noise
        self.solver = resolve_solver(solver, Dopri5)
        self.sensealg = resolve_sensealg(sensealg)
        self.rtol, self.atol = rtol, atol
        self.kinetic, self.jacobian = float(kinetic), float(jacobian)
        self.base_std = float(base_std)
        self.adaptive, self.dt = adaptive, dt
        self.nfe_forward = 0
        self.last_reg: dict = {}

    @property
    def vector_field(self):
        return self.dynamics.vf

    @property
    def T(self) -> torch.Tensor:
        return self.sqrt_T**2

    def _draw_noise(self, z):
        if self.noise == "rademacher":
            return torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2 - 1
        return torch.randn_like(z)

    def transform(self, x: torch.Tensor, trace: str | None = None):
        """Push data ``x`` to the base: returns ``(z(T), ∫Tr dt, kinetic [batch], jacobian
        [batch])`` (the last two ``None`` unless regularised)."""
        _check_data(x, self.dim)
        if not torch.isfinite(self.T).all() or not float(self.T) > 0:
            raise ValueError(
                f"T: the (learned) integration time is {float(self.T)!r}; it must be finite and > 0"
            )
        mode = self.trace if trace is None else trace
        if mode not in ("exact", "hutchinson"):
            raise ValueError(f"trace: expected 'exact' or 'hutchinson', got {mode!r}")
        dyn = self.dynamics
        dyn.mode = mode
        dyn.regs = self._regs = (self.kinetic > 0 or self.jacobian > 0) and torch.is_grad_enabled()
        dyn.eps = self._draw_noise(x) if mode == "hutchinson" else None
        zero = x.new_zeros(x.shape[0])
        y0 = (x, zero, zero, zero) if self._regs else (x, zero)
        T = self.T.to(x.dtype)
        t = (
            torch.stack([torch.zeros_like(T), T])
            if self.sqrt_T.requires_grad
            else torch.tensor([0.0, float(T)], dtype=x.dtype)
        )
        sol = solve(
            dyn,
            y0,
            t,
            self.solver,
            rtol=self.rtol,
            atol=self.atol,
            sensealg=self.sensealg,
            adaptive=self.adaptive,
            dt=self.dt,
            args=(),
        )
        self.nfe_forward = int(sol.stats["nfe"])
        self.last_stats = sol.stats
        final = [c[-1] for c in sol.ys]
        if self._regs:
            return final[0], final[1], final[2], final[3]
        return final[0], final[1], None, None

    def log_prob(self, x: torch.Tensor, trace: str | None = None) -> torch.Tensor:
        """``log p(x)`` per sample, ``[batch]`` (``trace`` overrides the model's estimator, e.g.
        ``"exact"`` at test time)."""
        z, logdet, kin, jac = self.transform(x, trace)
        self.last_reg = {}
        if kin is not None:
            self.last_reg = {"kinetic": kin.mean(), "jacobian": jac.mean()}
        return _gaussian_logp(z, self.base_std) + logdet

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Training loss: ``−mean log p(x)`` plus the RNODE penalties when their weights are
        positive."""
        loss = -self.log_prob(x).mean()
        if self.last_reg:
            loss = (
                loss
                + self.kinetic * self.last_reg["kinetic"]
                + self.jacobian * self.last_reg["jacobian"]
            )
        return loss

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``[n, dim]``: base draws integrated from ``T`` back to 0 (no gradients)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        p = next(self.parameters())
        z = (
            torch.randn(n, self.dim, generator=generator, dtype=p.dtype).to(p.device)
            * self.base_std
        )
        with torch.no_grad():
            t = torch.tensor([float(self.T), 0.0], dtype=p.dtype)
            sol = solve(
                lambda t_, y: self.vector_field(t_, y),
                z,
                t,
                self.solver,
                rtol=self.rtol,
                atol=self.atol,
                adaptive=self.adaptive,
                dt=-abs(self.dt) if self.dt else None,
            )
        return sol.ys[-1]

    def forward(self, x):
        return self.log_prob(x)


class PlanarFlow(nn.Module):
    """``K`` stacked planar layers ``z + u·tanh(wᵀz + b)`` (Rezende & Mohamed, ICML 2015) with a
    Gaussian base.

    ``u`` is reparameterised so that ``wᵀu ≥ −1`` (invertibility). ``log_prob(x)`` needs the
    inverse, which planar flows lack in closed form, so — as in the paper's maximum-likelihood
    comparison — the flow is used in the normalising direction: ``z = g(x)`` with ``g`` the stack
    applied to data, ``log p(x) = log p_base(z) + Σ log|1 + ψᵀu|``; ``sample`` inverts each layer
    by a 1-D root solve (bisection along ``w``).
    """

    def __init__(self, dim: int, K: int, base_std: float = 1.0):
        super().__init__()
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"K: expected a positive int, got {K!r}")
        self.dim, self.K = dim, K
        self.base_std = _finite(
            "base_std", base_std, "the base's standard deviation", positive=True
        )
        self.w = nn.Parameter(0.5 * torch.randn(K, dim))
        self.u = nn.Parameter(0.01 * torch.randn(K, dim))
        self.b = nn.Parameter(torch.zeros(K))

    def _u_hat(self, k=None):
        """The constrained ``û`` (all layers ``[K, dim]``, or layer ``k``): ``wᵀû ≥ −1``."""
        w, u = (self.w, self.u) if k is None else (self.w[k : k + 1], self.u[k : k + 1])
        wu = (w * u).sum(-1, keepdim=True)
        uh = u + (-1 + torch.nn.functional.softplus(wu) - wu) * w / (
            w.pow(2).sum(-1, keepdim=True) + 1e-12
        )
        return uh if k is None else uh[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_data(x, self.dim)
        z, logdet = x, x.new_zeros(x.shape[0])
        U = self._u_hat()
        wu = (self.w * U).sum(-1)
        for k in range(self.K):
            h = torch.tanh(z @ self.w[k] + self.b[k])
            # det(I + u ψᵀ) = 1 + (1 − h²) wᵀu
            logdet = logdet + torch.log((1 + (1 - h.pow(2)) * wu[k]).abs() + 1e-12)
            z = z + h.unsqueeze(-1) * U[k]
        return _gaussian_logp(z, self.base_std) + logdet

    def loss(self, x):
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, iters: int = 60
    ) -> torch.Tensor:
        """Invert the stack layer by layer: for ``y = z + u tanh(wᵀz+b)`` solve the scalar ``α =
        wᵀz`` by bisection."""
        p = self.w
        y = (
            torch.randn(n, self.dim, generator=generator, dtype=p.dtype).to(p.device)
            * self.base_std
        )
        for k in reversed(range(self.K)):
            u, w, b = self._u_hat(k), self.w[k], self.b[k]
            wy, wu = y @ w, (w * u).sum()
            # wᵀy = α + wᵀu tanh(α + b), monotone in α since wᵀu ≥ −1
            lo, hi = wy - wu.abs() - 1, wy + wu.abs() + 1
            for _ in range(iters):
                mid = (lo + hi) / 2
                val = mid + wu * torch.tanh(mid + b) - wy
                lo = torch.where(val < 0, mid, lo)
                hi = torch.where(val < 0, hi, mid)
            alpha = (lo + hi) / 2
            y = y - torch.tanh(alpha + b).unsqueeze(-1) * u
        return y

    def forward(self, x):
        return self.log_prob(x)
