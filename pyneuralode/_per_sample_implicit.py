"""Per-sample steps of the ESDIRK methods (KenCarp4, Kvaerno5, ...): a Newton iteration per row.

:func:`_loop.integrate_per_sample` gives every row of a batch ``(B, n)`` its own time and step
``h_b``; this module takes one ESDIRK step of every row with the decisions of the scalar engine
(:class:`solvers._esdirk.ESDIRK`) made per row, so a row's steps are those of its independent
solve with ``batched=True``:

* each row's Jacobian ``J_b`` (unscaled, at the row's own point) is kept across steps and a new
  one is formed for a row when its last accepted step converged slowly (θ > ``jac_theta``), or
  when its Newton iteration failed with an old ``J_b`` (the row's step is then retried once with
  the fresh one, the other rows keep their result) — the scalar engine's reuse rules, row by row;
* ``W_b = I − γ h_b J_b``: one LU per row, refactored every step (the scalar engine refactors
  whenever ``hγ`` changes; an unchanged ``hγ`` gives the same factors);
* every stage's simplified Newton iteration has a per-row convergence rate, η, status and
  stopping test; a row that converged (or failed) stops changing while the others iterate (the
  iteration count is shared; one host sync per iteration brings the (B,) norms to the host,
  where the per-row decisions are made);
* a row whose Newton fails (after its retry) returns ``ok = False``: the loop rejects it alone
  and halves its step, as the scalar loop does; the other rows go on.

The Jacobians of the rows that need one come from one batched Jacobian of the whole working
batch (rows that did not ask keep theirs); only the rows that asked are counted in ``nfe``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .solvers._base import tableau_tensors
from .solvers._esdirk import _EPS, _Coef
from .solvers._newton import newton_tolerance
from .solvers.linear.jacobian import batched_jacobian


class RowStep:
    """One per-sample ESDIRK step: ``ok`` (B,) bool, ``nfe_rows`` (B,) int64 evaluations per
    row, ``f1raw`` the derivative at the end (the next step's first stage)."""

    __slots__ = ("dense", "error", "f1raw", "nfe_rows", "ok", "y1")

    def __init__(self, y1, error, dense, ok, f1raw, nfe_rows):
        self.y1, self.error, self.dense = y1, error, dense
        self.ok, self.f1raw, self.nfe_rows = ok, f1raw, nfe_rows


def check_esdirk_per_sample(solver, y0: torch.Tensor) -> None:
    """The ESDIRK options that per-sample stepping supports (a clear error for the others)."""
    name = type(solver).__name__
    if not (solver.batched and y0.ndim == 2):
        raise ValueError(
            f"solver: per_sample=True with {name} needs batched=True (one Jacobian per "
            f"sample) and y0 of shape (B, n); got batched={solver.batched}, y0 of shape "
            f"{tuple(y0.shape)}"
        )
    if solver.linsolve != "lu" or solver.jac is not None:
        raise ValueError(
            f"solver: per_sample=True with {name} forms each sample's Jacobian by torch and "
            f"solves with its LU; got linsolve={solver.linsolve!r}, jac="
            f"{'a function' if solver.jac is not None else None}; use {name}(batched=True) "
            "(linsolve='lu', jac=None) or drop per_sample"
        )


class RowESDIRK:
    """The per-row state an ESDIRK method carries between per-sample steps (the scalar engine's
    cache, one entry per row): Jacobian, whether it is fresh, η, the last step's convergence
    rate, and the time of the last step (a row whose time moved accepted its step).

    The per-row decisions (Newton status, θ, η, Jacobian renewal) are (B,) numpy arrays on the
    host: each Newton iteration syncs once anyway (is any row still iterating?), so its (B,)
    norms come to the host in that sync and the decisions cost no device operations; the
    stages, solves and state updates stay on the state's device."""

    def __init__(self, solver, call, t, y, rtol, atol, stats: dict, running):
        for k in ("njac", "nlu", "nnewton"):
            stats.setdefault(k, 0)
        self.solver, self.call, self.stats = solver, call, stats
        self.co = tableau_tensors(solver.tableau, y, _Coef)
        B = y.shape[0]
        self.rtol, self.atol = rtol, atol
        self.kappa = _row_tolerance(solver.kappa, rtol, y)
        self.ndz_floor = _row_tolerance(1e-5, rtol, y)
        self.J = self._jacobian(t, y)
        self.fresh = np.ones(B, dtype=bool)
        self.eta = np.ones(B)
        self.theta_last = np.zeros(B)
        self.t_last = t.clone()
        # the first Jacobian's evaluations, counted at step 1
        self.pending = running.cpu().numpy().astype(np.int64) * self.jac_calls

    def select(self, keep: torch.Tensor) -> RowESDIRK:
        """The state of the rows ``keep`` (compact mode drops finished rows)."""
        new = RowESDIRK.__new__(RowESDIRK)
        new.__dict__.update(self.__dict__)
        k_host = keep.cpu().numpy()
        new.J, new.t_last = self.J[keep], self.t_last[keep]
        for k in ("fresh", "eta", "theta_last", "pending"):
            setattr(new, k, getattr(self, k)[k_host])
        # tensor tolerances come shaped like the state (B, ...)
        new.rtol, new.atol = (
            x[keep] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
            for x in (self.rtol, self.atol)
        )
        new.kappa, new.ndz_floor = (
            x[k_host] if isinstance(x, np.ndarray) else x for x in (self.kappa, self.ndz_floor)
        )
        return new

    def _jacobian(self, t, y):
        """The Jacobians of every row at ``(t_b, y_b)``; ``jac_calls``: the calls of f it took
        (1, or n + 1 by finite differences), counted in the ``nfe`` of the rows that use it."""
        self.stats["njac"] += 1
        calls = [0]

        def counted(tt, yy):
            calls[0] += 1
            return self.call(tt, yy)

        J, _ = batched_jacobian(counted, t, y.detach(), self.solver.jac_mode, False)
        self.jac_calls = calls[0]
        return J.detach()

    def step(self, t, h, y, f0, running) -> RowStep:
        """One step of every running row from ``(t_b, y_b)`` with ``f0 = f(t_b, y_b)`` (FSAL) and
        size ``h_b`` (``h`` (B,) float64, signed)."""
        solver = self.solver
        dev = y.device
        nfe = self.pending
        self.pending = np.zeros_like(nfe)
        # a row whose time moved accepted its last step: its J is no longer fresh, and it asks
        # for a new one when that step converged slowly (after a rejection it keeps its J)
        flags = torch.stack([running, t != self.t_last]).cpu().numpy()
        run, moved = flags[0], flags[1]
        self.t_last = t.clone()
        self.fresh = self.fresh & ~moved
        need = moved & (self.theta_last > solver.jac_theta) & run
        if need.any():
            self.J = torch.where(_dev(need, dev).view(-1, 1, 1), self._jacobian(t, y), self.J)
            self.fresh = self.fresh | need
            nfe = nfe + need * self.jac_calls
        y1, err, f1, dense, ok, theta_max, used, nan = self._attempt(t, h, y, f0, run)
        nfe = nfe + used
        retry = run & ~ok & ~self.fresh  # Newton failed with an old J: once more, fresh J
        if retry.any():
            rt = _dev(retry, dev)
            self.J = torch.where(rt.view(-1, 1, 1), self._jacobian(t, y), self.J)
            self.fresh = self.fresh | retry
            y1b, errb, f1b, denseb, okb, thetab, usedb, nanb = self._attempt(t, h, y, f0, retry)
            nfe = nfe + retry * self.jac_calls + usedb
            rv = rt.view(-1, 1)
            y1, err, f1 = (torch.where(rv, b, a) for a, b in ((y1, y1b), (err, errb), (f1, f1b)))
            dense = _merge_dense(dense, denseb, rv)
            ok, theta_max, nan = (
                np.where(retry, b, a) for a, b in ((ok, okb), (theta_max, thetab), (nan, nanb))
            )
        failed = run & ~ok
        self.eta = np.where(failed, 1.0, self.eta)
        self.theta_last = np.where(ok, theta_max, 0.0)
        # a failed row: no error estimate (NaN when its iteration met NaN/Inf: Unstable if it
        # ends there, else DtLessThanMin); the loop rejects it and halves its step
        ok_t = _dev(ok, dev)
        with torch.no_grad():
            if not ok.all():
                fill = _dev(np.where(nan, np.nan, 0.0), dev, err.dtype)
                err = torch.where(_rows(ok_t, err), err, _rows(fill, err))
        return RowStep(y1, err, dense, ok_t, f1, torch.from_numpy(nfe).to(dev))

    def _attempt(self, t, h, y, f0, active):
        """The stages of the rows ``active`` (numpy bool):
        ``(y1, error, f1, dense, ok, θ_max, evaluations, met NaN)`` (the last four numpy)."""
        solver, co = self.solver, self.co
        s = solver.tableau.stages
        dt, dev = y.dtype, y.device
        act = _dev(active, dev)
        h_act = torch.where(act, h, torch.zeros_like(h))
        hb = _rows(h_act.to(dt), y)  # (B, 1)
        hg = hb * co.gamma
        hg_safe = torch.where(hg != 0, hg, torch.ones_like(hg))
        n = y.shape[1]
        W = torch.eye(n, dtype=dt, device=dev) - hg.unsqueeze(-1) * self.J
        LU, piv, _ = torch.linalg.lu_factor_ex(W)
        self.stats["nlu"] += 1

        def solve(b):
            return torch.linalg.lu_solve(LU, piv, b.unsqueeze(-1)).squeeze(-1)

        with torch.no_grad():
            scale = self.atol + self.rtol * y.detach().abs()
        K = [f0]
        ok = active.copy()
        nan = np.zeros_like(active)
        theta_max = np.zeros(y.shape[0])
        nfe = np.zeros(y.shape[0], dtype=np.int64)
        z = y
        for i in range(1, s):
            Kst = torch.stack(K, 1)  # (B, i, n)
            psi = torch.addcmul(y, hb, co.a[i] @ Kst)
            z = torch.addcmul(psi, hg, co.pred[i] @ Kst)
            ti = t + co.c[i] * h_act
            z, conv, th, met_nan, used = self._newton(ti, psi, z, hg, solve, scale, ok)
            nfe += used
            nan |= ok & met_nan
            ok = conv
            theta_max = np.where(ok, np.maximum(theta_max, th), theta_max)
            okv = _rows(_dev(ok, dev), z)
            z = torch.where(okv, z, psi)  # a failed row: keep it finite
            K.append(torch.where(okv, (z - psi) / hg_safe, f0))
        Kst = torch.stack(K, 0)  # (s, B, n)
        err = hb * torch.tensordot(co.b_err, Kst, 1)
        if solver.smooth_est:
            err = solve(err)
        y1 = torch.where(okv, z, y)  # stiffly accurate: the last stage is y1
        f1 = K[-1]
        # dense output in the step's own variable θ ∈ [0, 1] (every row's step has size 1)
        if co.B is not None:
            dense = (y, (Kst * hb).reshape(s, -1), co.B, 1.0)
        else:
            dense = (y, y1, hb * f0, hb * f1, 1.0)
        return y1, err, f1, dense, ok, theta_max, nfe, nan

    def _newton(self, ti, psi, z, hg, solve, scale, active):
        """The simplified Newton iteration (Hairer & Wanner IV.8, as
        :meth:`ESDIRK._newton_loop`) with a status per row: ``(z, converged, θ_max, met NaN,
        evaluations per row)`` (the last four numpy)."""
        solver, stats = self.solver, self.stats
        kappa, floor, max_iter = self.kappa, self.ndz_floor, solver.max_iter
        inv_sqrt_n = 1.0 / math.sqrt(max(z.shape[1], 1))
        eta = np.maximum(self.eta, _EPS) ** 0.8
        iterating = active.copy()
        conv = np.zeros_like(active)
        nan = np.zeros_like(active)
        theta_max = np.zeros_like(eta)
        used = np.zeros(z.shape[0], dtype=np.int64)
        ndz_prev = None
        dev = z.device
        with np.errstate(all="ignore"):  # NaN rows and θ = 1 are decided on, not warned about
            for it in range(1, max_iter + 1):
                stats["nnewton"] += 1
                used += iterating
                dz = solve(psi + hg * self.call(ti, z) - z)
                with torch.no_grad():
                    ndz_t = torch.linalg.vector_norm(dz.detach() / scale, dim=1)
                ndz = ndz_t.double().cpu().numpy() * inv_sqrt_n  # the one sync of an iteration
                bad = np.isnan(ndz)
                z = torch.where(_rows(_dev(iterating & ~bad, dev), z), z + dz, z)
                fail = iterating & bad
                nan |= fail
                if ndz_prev is not None:
                    theta = np.where(ndz_prev > 0, ndz / ndz_prev, 0.0)
                    theta_max = np.where(iterating, np.maximum(theta_max, theta), theta_max)
                    fail |= iterating & (theta >= 1.0)
                    eta = np.where(iterating & ~fail, theta / (1.0 - theta), eta)
                    if it < max_iter:
                        slow = (theta ** (max_iter - it) / (1.0 - theta) * ndz > kappa) & (
                            eta * ndz > kappa
                        )
                        fail |= iterating & slow
                    done = (eta * ndz <= kappa) | (ndz <= floor)
                else:
                    done = ndz <= floor
                done &= iterating & ~fail
                conv |= done
                self.eta = np.where(done, eta, self.eta)
                iterating &= ~(fail | done)
                ndz_prev = ndz
                if not iterating.any():
                    break
        return z, conv, theta_max, nan, used


def _dev(a: np.ndarray, device, dtype=None) -> torch.Tensor:
    """A host (B,) array as a tensor on ``device``."""
    x = torch.from_numpy(a)
    return x.to(device=device, dtype=dtype) if dtype is not None or device.type != "cpu" else x


def _row_tolerance(kappa: float, rtol, y: torch.Tensor):
    """:func:`newton_tolerance` of every row (its floor follows the row's own smallest rtol), a
    (B,) numpy array; a float when the tolerance is shared by the rows."""
    if isinstance(rtol, torch.Tensor) and rtol.dim() == y.dim() and rtol.shape[0] == y.shape[0]:
        r = rtol.detach().reshape(rtol.shape[0], -1).amin(1).double().cpu().numpy()
        with np.errstate(divide="ignore"):
            floor = 10.0 * torch.finfo(y.dtype).eps / r
        return np.where(r > 0, np.maximum(floor, kappa), kappa)
    return newton_tolerance(kappa, rtol, y.dtype)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast over the rows of ``like`` (B, ...)."""
    return v.view(v.shape[0], *([1] * (like.dim() - 1)))


def _merge_dense(a, b, rv):
    """The dense data of two attempts, row ``b`` from ``b`` where ``rv`` (B, 1) is set."""
    if len(a) == 4:  # (y0, K (s, B·n), weights, 1.0)
        s = a[1].shape[0]
        Ka = a[1].view(s, rv.shape[0], -1)
        Kb = b[1].view(s, rv.shape[0], -1)
        return (a[0], torch.where(rv.unsqueeze(0), Kb, Ka).reshape(s, -1), a[2], a[3])
    return tuple(
        torch.where(rv, y, x) if isinstance(x, torch.Tensor) and x.dim() == 2 else x
        for x, y in zip(a, b)
    )
