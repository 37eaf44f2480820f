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
  iteration count is shared, so one host sync per iteration: whether any row still iterates);
* a row whose Newton fails (after its retry) returns ``ok = False``: the loop rejects it alone
  and halves its step, as the scalar loop does; the other rows go on.

The Jacobians of the rows that need one come from one batched Jacobian of the whole working
batch (rows that did not ask keep theirs); only the rows that asked are counted in ``nfe``.
"""

from __future__ import annotations

import math

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
    rate, and the time of the last step (a row whose time moved accepted its step)."""

    def __init__(self, solver, call, t, y, rtol, atol, stats: dict, running):
        for k in ("njac", "nlu", "nnewton"):
            stats.setdefault(k, 0)
        self.solver, self.call, self.stats = solver, call, stats
        self.co = tableau_tensors(solver.tableau, y, _Coef)
        B = y.shape[0]
        dev = y.device
        self.rtol, self.atol = rtol, atol
        self.kappa = _row_tolerance(solver.kappa, rtol, y)
        self.ndz_floor = _row_tolerance(1e-5, rtol, y)
        self.J = self._jacobian(t, y)
        self.fresh = torch.ones(B, dtype=torch.bool, device=dev)
        self.eta = torch.ones(B, dtype=torch.float64, device=dev)
        self.theta_last = torch.zeros(B, dtype=torch.float64, device=dev)
        self.t_last = t.clone()
        self.pending = running.long()  # the first Jacobian's evaluation, counted at step 1

    def select(self, keep: torch.Tensor) -> RowESDIRK:
        """The state of the rows ``keep`` (compact mode drops finished rows)."""
        new = RowESDIRK.__new__(RowESDIRK)
        new.__dict__.update(self.__dict__)
        for k in ("J", "fresh", "eta", "theta_last", "t_last", "pending"):
            setattr(new, k, getattr(self, k)[keep])
        # tensor tolerances come shaped like the state (B, ...)
        new.rtol, new.atol, new.kappa, new.ndz_floor = (
            x[keep] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
            for x in (self.rtol, self.atol, self.kappa, self.ndz_floor)
        )
        return new

    def _jacobian(self, t, y):
        self.stats["njac"] += 1
        J, _ = batched_jacobian(self.call, t, y.detach(), self.solver.jac_mode, False)
        return J.detach()

    def step(self, t, h, y, f0, running) -> RowStep:
        """One step of every running row from ``(t_b, y_b)`` with ``f0 = f(t_b, y_b)`` (FSAL) and
        size ``h_b`` (``h`` (B,) float64, signed)."""
        solver = self.solver
        nfe = self.pending
        self.pending = torch.zeros_like(nfe)
        # a row whose time moved accepted its last step: its J is no longer fresh, and it asks
        # for a new one when that step converged slowly (after a rejection it keeps its J)
        moved = t != self.t_last
        self.t_last = t.clone()
        self.fresh = self.fresh & ~moved
        need = moved & (self.theta_last > solver.jac_theta) & running
        if bool(need.any()):
            self.J = torch.where(need.view(-1, 1, 1), self._jacobian(t, y), self.J)
            self.fresh = self.fresh | need
            nfe = nfe + need
        out = self._attempt(t, h, y, f0, running)
        ok, nfe = out[4], nfe + out[6]
        retry = running & ~ok & ~self.fresh  # Newton failed with an old J: once more, fresh J
        if bool(retry.any()):
            self.J = torch.where(retry.view(-1, 1, 1), self._jacobian(t, y), self.J)
            self.fresh = self.fresh | retry
            again = self._attempt(t, h, y, f0, retry)
            nfe = nfe + retry + again[6]
            rv = retry.view(-1, 1)
            y1, err, f1, dense, ok, theta_max, _, nan = out
            y1b, errb, f1b, denseb, okb, thetab, _, nanb = again
            out = (
                torch.where(rv, y1b, y1),
                torch.where(rv, errb, err),
                torch.where(rv, f1b, f1),
                _merge_dense(dense, denseb, rv),
                torch.where(retry, okb, ok),
                torch.where(retry, thetab, theta_max),
                None,
                torch.where(retry, nanb, nan),
            )
            ok = out[4]
        y1, err, f1, dense, ok, theta_max, _, nan = out
        failed = running & ~ok
        self.eta = torch.where(failed, torch.ones_like(self.eta), self.eta)
        self.theta_last = torch.where(ok, theta_max, torch.zeros_like(theta_max))
        # a failed row: no error estimate (NaN when its iteration met NaN/Inf: Unstable if it
        # ends there, else DtLessThanMin); the loop rejects it and halves its step
        with torch.no_grad():
            err = torch.where(
                _rows(ok, err), err, torch.where(_rows(nan, err), math.nan, 0.0).to(err.dtype)
            )
        return RowStep(y1, err, dense, ok, f1, nfe)

    def _attempt(self, t, h, y, f0, active):
        """The stages of the rows ``active``: ``(y1, error, f1, dense, ok, θ_max, nfe, nan)``."""
        solver, co = self.solver, self.co
        s = solver.tableau.stages
        dt = y.dtype
        hb = _rows(torch.where(active, h, torch.zeros_like(h)).to(dt), y)  # (B, 1)
        gamma = co.gamma
        hg = hb * gamma
        hg_safe = torch.where(hg != 0, hg, torch.ones_like(hg))
        n = y.shape[1]
        eye = torch.eye(n, dtype=dt, device=y.device)
        W = eye - hg.unsqueeze(-1) * self.J
        LU, piv, _ = torch.linalg.lu_factor_ex(W)
        self.stats["nlu"] += 1

        def solve(b):
            return torch.linalg.lu_solve(LU, piv, b.unsqueeze(-1)).squeeze(-1)

        with torch.no_grad():
            scale = self.atol + self.rtol * y.detach().abs()
        K = [f0]
        ok = active.clone()
        nan = torch.zeros_like(active)
        theta_max = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
        nfe = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
        z = y
        for i in range(1, s):
            Kst = torch.stack(K, 1)  # (B, i, n)
            psi = y + hb * torch.einsum("bjn,j->bn", Kst, co.a[i])
            z = psi + hg * torch.einsum("bjn,j->bn", Kst, co.pred[i])
            ti = t + co.c[i] * torch.where(active, h, torch.zeros_like(h))
            z, conv, th, met_nan, used = self._newton(ti, psi, z, hg, solve, scale, ok)
            nfe = nfe + used
            nan = nan | (ok & met_nan)
            ok = conv
            theta_max = torch.where(ok, torch.maximum(theta_max, th), theta_max)
            z = torch.where(_rows(ok, z), z, psi)  # a failed row: keep it finite
            K.append(torch.where(_rows(ok, z), (z - psi) / hg_safe, f0))
        Kst = torch.stack(K, 0)  # (s, B, n)
        err = hb * torch.einsum("sbn,s->bn", Kst, co.b_err)
        if solver.smooth_est:
            err = solve(err)
        y1 = torch.where(_rows(ok, z), z, y)  # stiffly accurate: the last stage is y1
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
        evaluations per row)``."""
        solver, stats = self.solver, self.stats
        kappa, floor, max_iter = self.kappa, self.ndz_floor, solver.max_iter
        inv_sqrt_n = 1.0 / math.sqrt(max(z.shape[1], 1))
        eta = self.eta.clamp(min=_EPS) ** 0.8
        iterating = active.clone()
        conv = torch.zeros_like(active)
        nan = torch.zeros_like(active)
        theta_max = torch.zeros_like(eta)
        used = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        ndz_prev = None
        for it in range(1, max_iter + 1):
            stats["nnewton"] += 1
            used = used + iterating
            dz = solve(psi + hg * self.call(ti, z) - z)
            with torch.no_grad():
                ndz = torch.linalg.vector_norm(dz.detach() / scale, dim=1).double() * inv_sqrt_n
            bad = ndz != ndz
            z = torch.where(_rows(iterating & ~bad, z), z + dz, z)
            fail = iterating & bad
            nan = nan | fail
            if ndz_prev is not None:
                theta = torch.where(ndz_prev > 0, ndz / ndz_prev, torch.zeros_like(ndz))
                theta_max = torch.where(iterating, torch.maximum(theta_max, theta), theta_max)
                fail = fail | (iterating & (theta >= 1.0))
                eta = torch.where(iterating & ~fail, theta / (1.0 - theta), eta)
                if it < max_iter:
                    slow = (theta ** (max_iter - it) / (1.0 - theta) * ndz > kappa) & (
                        eta * ndz > kappa
                    )
                    fail = fail | (iterating & slow)
                done = (eta * ndz <= kappa) | (ndz <= floor)
            else:
                done = ndz <= floor
            done = iterating & ~fail & done
            conv = conv | done
            self.eta = torch.where(done, eta, self.eta)
            iterating = iterating & ~fail & ~done
            ndz_prev = ndz
            if not bool(iterating.any()):  # the one sync of a Newton iteration
                break
        return z, conv, theta_max, nan, used


def _row_tolerance(kappa: float, rtol, y: torch.Tensor):
    """:func:`newton_tolerance` of every row (its floor follows the row's own smallest rtol);
    a float when the tolerance is shared by the rows."""
    if isinstance(rtol, torch.Tensor) and rtol.dim() == y.dim() and rtol.shape[0] == y.shape[0]:
        r = rtol.detach().reshape(rtol.shape[0], -1).amin(1).to(torch.float64)
        floor = 10.0 * torch.finfo(y.dtype).eps / r
        return torch.where(r > 0, floor.clamp(min=kappa), torch.full_like(r, kappa))
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
