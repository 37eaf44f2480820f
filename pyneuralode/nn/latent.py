"""Latent ODEs for irregularly sampled time series (Chen et al. 2018 §5; Rubanova, Chen, Duvenaud
2019).

Data convention: a batch lives on the *union* of its observation times: ``x`` ``[B, T, D]`` at the
increasing times ``t`` ``[T]``, with a boolean ``mask`` ``[B, T]`` saying which of them each
sample observed (build it from per-sample lists with :func:`union_times`). Everything masked out
is ignored exactly: the recognition network skips those steps and the likelihood leaves them out,
so a batch gives the same result as solving each sample on its own times.

* :class:`LatentODE`: recognition network run backwards in time over the observations — an RNN
  fed ``[x, Δt]`` (the paper) or an ODE-RNN (Rubanova 2019: the hidden state follows an ODE
  between observations and a GRU jumps at them) — gives ``q(z₀|x) = N(μ, σ²)``; ``z(t)`` solves
  ``dz/dt = f(z)`` from ``z₀``; a decoder maps ``z(t)`` to the observation mean. The ELBO uses a
  Gaussian likelihood with fixed std ``obs_std`` and the analytic KL to ``N(0, I)``.
* :class:`RNNBaseline`: the paper's RNN baseline (Table 2), trained on Gaussian NLL of the next
  observation, fed ``[x, time gap to the next observation]``; extrapolates autoregressively.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._solve import solve
from ..sensitivity._resolve import resolve_sensealg
from ..solvers import Dopri5
from ..solvers._resolve import resolve_solver

__all__ = ["LatentODE", "RNNBaseline", "union_times"]

_LOG2PI = math.log(2 * math.pi)


def union_times(times: Sequence, values: Sequence):
    """Per-sample observations → ``(t [T], x [B, T, D], mask [B, T])`` on the sorted union of all
    times.

    ``times[i]``: 1-D increasing times of sample ``i``; ``values[i]``: ``[len(times[i]), D]``.
    Unobserved entries of ``x`` are zero.
    """
    if len(times) != len(values) or len(times) == 0:
        raise ValueError(
            f"times, values: expected two equally long non-empty sequences, got {len(times)} and "
            f"{len(values)}"
        )
    ts = [torch.as_tensor(ti) for ti in times]
    vs = [torch.as_tensor(v) for v in values]
    for i, (ti, v) in enumerate(zip(ts, vs)):
        if ti.ndim != 1 or v.ndim != 2 or v.shape[0] != ti.shape[0]:
            raise ValueError(
                f"times[{i}], values[{i}]: expected shapes [n] and [n, D], got {tuple(ti.shape)} "
                f"and {tuple(v.shape)}"
            )
        if ti.numel() > 1 and not (ti[1:] > ti[:-1]).all():
            raise ValueError(f"times[{i}]: must be strictly increasing")
    t = torch.unique(torch.cat(ts))  # sorted
    D = vs[0].shape[1]
    x = vs[0].new_zeros(len(ts), t.numel(), D)
    mask = torch.zeros(len(ts), t.numel(), dtype=torch.bool)
    for i, (ti, v) in enumerate(zip(ts, vs)):
        idx = torch.searchsorted(t, ti)
        x[i, idx] = v
        mask[i, idx] = True
    return t.to(vs[0].dtype), x, mask


def _check_batch(x, t, mask, D):
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[2] != D:
        raise ValueError(
            f"x: expected observations shaped [batch, times, {D}], got "
            f"{getattr(x, 'shape', type(x).__name__)}"
        )
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(
            f"t: expected a 1-D tensor of the {x.shape[1]} union times, got "
            f"{getattr(t, 'shape', type(t).__name__)}"
        )
    if t.numel() > 1 and not (t[1:] > t[:-1]).all():
        raise ValueError(
            "t: the union times must be strictly increasing (use union_times to build them)"
        )
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor) or mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask: expected a boolean tensor shaped {tuple(x.shape[:2])}, got "
            f"{getattr(mask, 'shape', type(mask).__name__)}"
        )
    mask = mask.to(torch.bool)
    if not mask.any(1).all():
        raise ValueError("mask: every sample needs at least one observation")
    return mask


class _MLP(nn.Module):
    def __init__(self, dims, act=nn.ELU):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _LatentField(nn.Module):
    """Autonomous MLP vector field ``f(t, z)`` (counts calls in ``nfe``)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.net = _MLP((dim, *hidden, dim))
        self.nfe = 0

    def forward(self, t, z):
        self.nfe += 1
        return self.net(z)


class LatentODE(nn.Module):
    """Latent ODE with an RNN or ODE-RNN recognition network (paper defaults for the spirals).

    ``obs_dim`` (2), ``latent_dim`` (4), ``rec_hidden`` (25, the recognition RNN), ``ode_hidden``
    (hidden widths of ``f``, ``(20,)``), ``dec_hidden`` (20), ``encoder``: ``"rnn"`` (tanh RNN fed
    ``[x, Δt]``, the paper) or ``"odernn"`` (Rubanova 2019), ``obs_std`` (0.3, fixed likelihood
    std), ``solver``/``rtol``/``atol``/``sensealg`` for the latent solve (and the ODE-RNN's).
    """

    def __init__(
        self,
        obs_dim: int = 2,
        latent_dim: int = 4,
        rec_hidden: int = 25,
        ode_hidden=(20,),
        dec_hidden: int = 20,
        encoder: str = "rnn",
        obs_std: float = 0.3,
        solver=None,
        rtol: float = 1e-4,
        atol: float = 1e-5,
        sensealg=None,
    ):
        super().__init__()
        if encoder not in ("rnn", "odernn"):
            raise ValueError(f"encoder: expected 'rnn' or 'odernn', got {encoder!r}")
        if not obs_std > 0:
            raise ValueError(f"obs_std: must be positive, got {obs_std!r}")
        ode_hidden = (ode_hidden,) if isinstance(ode_hidden, int) else tuple(ode_hidden)
        self.obs_dim, self.latent_dim, self.rec_hidden = obs_dim, latent_dim, rec_hidden
        self.encoder = encoder
        self.obs_std = float(obs_std)
        if encoder == "rnn":
            self.i2h = nn.Linear(obs_dim + 1 + rec_hidden, rec_hidden)
        else:
            self.gru = nn.GRUCell(obs_dim, rec_hidden)
            self.rec_field = _LatentField(rec_hidden, (rec_hidden,))
        self.h2o = nn.Linear(rec_hidden, 2 * latent_dim)
        self.func = _LatentField(latent_dim, ode_hidden)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, dec_hidden), nn.ReLU(), nn.Linear(dec_hidden, obs_dim)
        )
        self.solver = resolve_solver(solver, Dopri5)
        self.sensealg = resolve_sensealg(sensealg)
        self.rtol, self.atol = rtol, atol
        self.nfe_forward = 0

    # -- recognition ------------------------------------------------------------------------------
    def encode(self, x, t, mask=None):
        """``q(z₀|x)``: returns ``(μ, log σ²)`` each ``[B, latent_dim]``, running backwards over the
        observations."""
        mask = _check_batch(x, t, mask, self.obs_dim)
        B, T, _ = x.shape
        h = x.new_zeros(B, self.rec_hidden)
        last = torch.full(
            (B,), float("nan"), dtype=x.dtype, device=x.device
        )  # time of the last processed observation
        started = torch.zeros(B, dtype=torch.bool, device=x.device)
        for k in range(T - 1, -1, -1):
            m = mask[:, k]
            if self.encoder == "odernn" and k < T - 1 and started.any():
                sol = solve(
                    self.rec_field,
                    h,
                    torch.stack([t[k + 1], t[k]]),
                    self.solver,
                    rtol=self.rtol,
                    atol=self.atol,
                    sensealg=self.sensealg,
                )
                h = torch.where(started.unsqueeze(1), sol.ys[-1], h)
            if not m.any():
                continue
            if self.encoder == "rnn":
                dt = torch.where(started, last - t[k], torch.zeros_like(last))
                h_new = torch.tanh(self.i2h(torch.cat([x[:, k], dt.unsqueeze(1), h], 1)))
            else:
                h_new = self.gru(x[:, k], h)
            h = torch.where(m.unsqueeze(1), h_new, h)
            last = torch.where(m, t[k].expand(B), last)
            started = started | m
        out = self.h2o(h)
        return out[:, : self.latent_dim], out[:, self.latent_dim :]

    # -- generation -------------------------------------------------------------------------------
    def decode(self, z0, t):
        """Solve the latent ODE from ``z0`` (at ``t[0]``) at the times ``t`` and decode: ``[B,
        len(t), obs_dim]``."""
        self.func.nfe = 0
        sol = solve(
            self.func, z0, t, self.solver, rtol=self.rtol, atol=self.atol, sensealg=self.sensealg
        )
        self.nfe_forward = self.func.nfe
        return self.decoder(sol.ys).transpose(0, 1)

    def forward(self, x, t, mask=None, sample: bool = True):
        """Encode, draw ``z₀`` (the mean when ``sample=False``), decode at ``t``. Returns ``(x̂, μ,
        log σ²)``."""
        mu, logvar = self.encode(x, t, mask)
        z0 = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        return self.decode(z0, t), mu, logvar

    def elbo(self, x, t, mask=None, sample: bool = True) -> torch.Tensor:
        """Per-sample ELBO ``[B]``: ``Σ_observed log N(x | x̂, obs_std²) − KL(q(z₀|x) ‖ N(0,
        I))``."""
        mask = _check_batch(x, t, mask, self.obs_dim)
        xhat, mu, logvar = self(x, t, mask, sample)
        s = self.obs_std
        ll = -0.5 * ((x - xhat) / s).pow(2) - math.log(s) - 0.5 * _LOG2PI
        ll = (ll.sum(-1) * mask.to(ll.dtype)).sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        return ll - kl

    def loss(self, x, t, mask=None) -> torch.Tensor:
        """``−mean ELBO`` over the batch."""
        return -self.elbo(x, t, mask).mean()

    def predict(self, x, t, mask, t_pred, sample: bool = False):
        """Reconstruct/extrapolate at arbitrary increasing times ``t_pred`` (``>= t[0]``): ``[B,
        len(t_pred), obs_dim]``."""
        mu, logvar = self.encode(x, t, mask)
        z0 = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        t_pred = torch.as_tensor(t_pred, dtype=t.dtype, device=t.device)
        if (
            t_pred.ndim != 1
            or (t_pred.numel() > 1 and not (t_pred[1:] > t_pred[:-1]).all())
            or t_pred[0] < t[0]
        ):
            raise ValueError("t_pred: expected strictly increasing times starting at or after t[0]")
        if t_pred[0] > t[0]:
            return self.decode(z0, torch.cat([t[:1], t_pred]))[:, 1:]
        return self.decode(z0, t_pred)


class RNNBaseline(nn.Module):
    """The paper's RNN baseline: a tanh RNN (``hidden`` 25) over the observations in time order.

    Input ``[x_k, t_next − t_k]`` (``time_gap=True``, the paper's stronger variant) or ``x_k``; its
    hidden state predicts mean and log-std of the next observation; trained on their Gaussian
    NLL. ``predict`` runs over the observations, then feeds its own means back to extrapolate.
    """

    def __init__(
        self, obs_dim: int = 2, hidden: int = 25, time_gap: bool = True, cell: str = "rnn"
    ):
        super().__init__()
        if cell not in ("rnn", "gru"):
            raise ValueError(f"cell: expected 'rnn' or 'gru', got {cell!r}")
        self.obs_dim, self.hidden, self.time_gap = obs_dim, hidden, bool(time_gap)
        n_in = obs_dim + (1 if time_gap else 0)
        self.cell = nn.RNNCell(n_in, hidden) if cell == "rnn" else nn.GRUCell(n_in, hidden)
        self.head = nn.Linear(hidden, 2 * obs_dim)

    def _inp(self, xk, gap):
        return torch.cat([xk, gap.unsqueeze(1)], 1) if self.time_gap else xk

    def _run(self, x, t, mask):
        """Process the observations; returns per-step predicted (mean, logstd) ``[B, T, D]``,
        next-observation index, final h."""
        B, T, D = x.shape
        # next observed index after k (T if none), by a reverse scan
        nxt = torch.full((B, T), T, dtype=torch.long, device=x.device)
        cur = torch.full((B,), T, dtype=torch.long, device=x.device)
        for k in range(T - 1, -1, -1):
            nxt[:, k] = cur
            cur = torch.where(mask[:, k], torch.full_like(cur, k), cur)
        t_ext = torch.cat([t, t[-1:]])
        h = x.new_zeros(B, self.hidden)
        means, logstds = [], []
        for k in range(T):
            m = mask[:, k]
            gap = t_ext[nxt[:, k]] - t[k]
            h_new = self.cell(self._inp(x[:, k], gap), h)
            h = torch.where(m.unsqueeze(1), h_new, h)
            out = self.head(h)
            means.append(out[:, :D])
            logstds.append(out[:, D:])
        return torch.stack(means, 1), torch.stack(logstds, 1), nxt, h

    def loss(self, x, t, mask=None):
        """Mean Gaussian NLL of each next observation given the ones before it."""
        mask = _check_batch(x, t, mask, self.obs_dim)
        mean, logstd, nxt, _ = self._run(x, t, mask)
        B, T, D = x.shape
        valid = mask & (nxt < T)
        tgt = torch.gather(x, 1, nxt.clamp(max=T - 1).unsqueeze(-1).expand(B, T, D))
        nll = 0.5 * ((tgt - mean) / logstd.exp()).pow(2) + logstd + 0.5 * _LOG2PI
        nll = nll.sum(-1) * valid.to(nll.dtype)
        return nll.sum() / valid.sum().clamp(min=1)

    def predict(self, x, t, mask, t_pred):
        """Extrapolate at increasing times ``t_pred`` after each sample's last observation: ``[B,
        len(t_pred), obs_dim]``."""
        mask = _check_batch(x, t, mask, self.obs_dim)
        B, T, D = x.shape
        t_pred = torch.as_tensor(t_pred, dtype=t.dtype, device=t.device)
        # run over the observations, with the gap after the last one pointing at t_pred[0]
        last_idx = (torch.arange(T, device=x.device) * mask).argmax(1)
        if (t_pred[0] <= t[last_idx]).any():
            raise ValueError("t_pred: must start after every sample's last observation time")
        t_ext = torch.cat([t, t_pred[:1]])
        nxt = torch.full((B, T), T, dtype=torch.long, device=x.device)
        cur = torch.full((B,), T, dtype=torch.long, device=x.device)
        for k in range(T - 1, -1, -1):
            nxt[:, k] = cur
            cur = torch.where(mask[:, k], torch.full_like(cur, k), cur)
        h = x.new_zeros(B, self.hidden)
        for k in range(T):
            gap = t_ext[nxt[:, k]] - t[k]
            h = torch.where(mask[:, k].unsqueeze(1), self.cell(self._inp(x[:, k], gap), h), h)
        preds = []
        mean = self.head(h)[:, :D]
        preds.append(mean)
        for j in range(1, t_pred.numel()):
            gap = (t_pred[j] - t_pred[j - 1]).expand(B)
            h = self.cell(self._inp(mean, gap), h)
            mean = self.head(h)[:, :D]
            preds.append(mean)
        return torch.stack(preds, 1)
