"""A stand-in for the Julia side, built on pyneuralode's own engine.

:class:`NativeStandIn` implements the session protocol of :mod:`pyneuralode.julia._session`
the way ``julia/PyNeuralODEBridge.jl`` does, with the native solvers in place of OrdinaryDiffEq:
it receives the same arguments (1-D float arrays, the n×k cotangent matrix, string-keyed options),
calls the same Python callbacks (``cb.f``, ``cb.vjp``, ``cb.jac`` with freshly allocated output
arrays, as ``TorchRHS`` does), and returns the same things (an n×k Fortran-ordered trajectory,
a retcode string, a stats tuple, an opaque handle). Its backward pass is a backsolve adjoint
driven only by ``cb.vjp``, so gradients through it test the callbacks, the marshalling and the
autograd Function. Used by the tests and usable for debugging without Julia.

It also reproduces the SciMLSensitivity behaviours behind the bridge's bugs 4-7, and the
bridge's answer to each, so the Python half is tested against them:

* 4: the adjoints but BacksolveAdjoint return the states in *sorted* time order; the bridge
  (and this stand-in) reorders the columns by matching times (``_columns``);
* 5: array tolerances reach the adjoint solve, whose state is longer: ``backward`` refuses them;
* 6: the checkpoint re-solves of the interpolating/Gauss adjoints pass tolerances only, so a
  fixed-step method finds ``dt`` only on the problem (``problem_kwargs``);
* 7: a failed solve returns only the save times it reached, with its retcode.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from .._loop import LoopOptions, integrate
from ._mlp import evaluate_spec
from ._options import EXPLICIT_SOLVERS, IMPLICIT_SOLVERS, JULIA_SENSEALGS

_NP = {"float64": np.float64, "float32": np.float32}
#: methods without an error estimate (OrdinaryDiffEq: "Fixed timestep methods require a choice of
#: dt")
FIXED_STEP = ("Euler", "Midpoint", "Heun", "RK4")


def _columns(solt, ts, k):
    """The bridge's ``_columns``: for each of the first ``k`` requested times, its column in
    ``solt``."""
    solt = np.asarray(solt, dtype=np.float64)
    return [int(np.argmin(np.abs(solt - t))) for t in list(ts)[:k]]


class NativeStandIn:
    """Session protocol on the native engine (see the module docstring)."""

    def __init__(self):
        self.calls = Counter()
        self.last_forward_kwargs = None

    # -- right-hand sides
    # ---------------------------------------------------------------------------
    def callback_rhs(self, cb, dtype: str, jac: bool = True, vjp: str = "rrule"):
        if dtype not in _NP:
            raise ValueError(f"dtype must be float64 or float32, got {dtype}")
        self.calls["callback_rhs"] += 1
        return {"kind": "cb", "cb": cb, "dtype": _NP[dtype]}

    def mlp_rhs(self, spec):
        self.calls["mlp_rhs"] += 1
        return {"kind": "mlp", "spec": spec, "dtype": None}

    def _f(self, rhs, u, p, t):
        if rhs["kind"] == "cb":
            out = np.empty_like(u)
            rhs["cb"].f(out, u.copy(), p.copy(), float(t))
            return out
        with torch.no_grad():
            return evaluate_spec(rhs["spec"], torch.from_numpy(p), torch.from_numpy(u)).numpy()

    def _vjp(self, rhs, u, p, t, lam):
        if rhs["kind"] == "cb":
            du, dp = np.empty_like(u), np.empty_like(p)
            rhs["cb"].vjp(du, dp, u.copy(), p.copy(), float(t), lam.copy())
            return du, dp
        _, pull = torch.func.vjp(
            lambda y, q: evaluate_spec(rhs["spec"], q, y), torch.from_numpy(u), torch.from_numpy(p)
        )
        gu, gp = pull(torch.from_numpy(lam))
        return gu.numpy(), gp.numpy()

    def _jac(self, rhs, u, p, t):
        if rhs["kind"] == "cb":
            J = np.asfortranarray(np.empty((u.size, u.size), dtype=u.dtype))  # Julia's Matrix{T}
            rhs["cb"].jac(J, u.copy(), p.copy(), float(t))
            return J
        return torch.func.jacrev(lambda y: evaluate_spec(rhs["spec"], torch.from_numpy(p), y))(
            torch.from_numpy(u)
        ).numpy()

    # -- ODE
    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        rhs,
        u0,
        p,
        ts,
        *,
        solver="Tsit5",
        ad="finitediff",
        sensealg="InterpolatingAdjoint",
        checkpointing=True,
        abstol=1e-9,
        reltol=1e-6,
        dt=None,
        adaptive=True,
        maxiters=100_000,
        dtmin=None,
        dtmax=None,
        quad_abstol=1e-6,
        quad_reltol=1e-3,
        linsolve="default",
    ):
        from ..solvers import Tsit5, lookup

        self.calls["forward"] += 1
        if solver not in EXPLICIT_SOLVERS + IMPLICIT_SOLVERS:
            raise ValueError(f'unknown solver "{solver}"')
        if sensealg not in JULIA_SENSEALGS:
            raise ValueError(f'unknown sensealg "{sensealg}"')
        if linsolve not in ("default", "gmres"):
            raise ValueError(f'linsolve must be "default" or "gmres", got "{linsolve}"')
        if solver in FIXED_STEP and dt is None:
            raise ValueError("Fixed timestep methods require a choice of dt or choosing the tstops")
        self.last_forward_kwargs = dict(
            solver=solver,
            ad=ad,
            sensealg=sensealg,
            checkpointing=checkpointing,
            abstol=abstol,
            reltol=reltol,
            dt=dt,
            adaptive=adaptive,
            maxiters=maxiters,
            linsolve=linsolve,
        )
        u0 = np.array(np.asarray(u0), copy=True).reshape(-1)  # Julia copies on entry
        p = np.array(np.asarray(p), dtype=u0.dtype, copy=True).reshape(-1)
        ts = [float(x) for x in np.asarray(ts, dtype=np.float64)]
        try:
            cls = lookup(solver)
        except ValueError:  # Vern7, FBDF, ... have no native twin: any accurate solver stands in
            cls = Tsit5
        if solver in IMPLICIT_SOLVERS and cls is not Tsit5:
            # like the bridge: implicit methods get the supplied (torch) Jacobian, never AD through
            # f
            jac = lambda t, y: torch.from_numpy(
                self._jac(rhs, y.detach().reshape(-1).numpy(), p, float(t))
            )
            native = cls(jac=jac)
        else:
            native = cls()
        opts = self._opts(abstol, reltol, dt, adaptive, maxiters, dtmin, dtmax, u0.dtype)
        stats = {"nfe": 0, "naccept": 0, "nreject": 0}

        def f(t, y):
            stats["nfe"] += 1
            return torch.from_numpy(self._f(rhs, y.detach().numpy(), p, float(t)))

        loop = integrate(f, torch.from_numpy(u0), ts, native, opts, stats)
        solved = torch.stack(loop.ys).numpy().T  # n×k in the order of ts, k = save times reached
        k = solved.shape[1]
        # what SciMLSensitivity hands back: sorted save times except for BacksolveAdjoint (bug 4)
        order = (
            list(range(k))
            if sensealg == "BacksolveAdjoint"
            else sorted(range(k), key=lambda j: ts[j])
        )
        sol_t, sol_u = [ts[j] for j in order], solved[:, order]
        ys = np.asfortranarray(sol_u[:, _columns(sol_t, ts, k)])  # the bridge's reordering
        handle = {
            "rhs": rhs,
            "ys": ys,
            "ts": ts[:k],
            "p": p,
            "opts": opts,
            "solver": solver,
            "sensealg": sensealg,
            "problem_kwargs": {"dt": dt, "adaptive": adaptive},
            "vector_tols": bool(np.ndim(abstol) or np.ndim(reltol)),
        }
        return ys, loop.retcode.value, (stats["nfe"], stats["naccept"], stats["nreject"]), handle

    @staticmethod
    def _opts(abstol, reltol, dt, adaptive, maxiters, dtmin, dtmax, dtype):
        tol = lambda v: torch.as_tensor(np.asarray(v, dtype=dtype)) if np.ndim(v) else float(v)
        return LoopOptions(
            rtol=tol(reltol),
            atol=tol(abstol),
            dt=dt,
            adaptive=adaptive,
            max_steps=int(maxiters),
            dense=False,
            dtmin=dtmin,
            dtmax=dtmax,
        )

    def backward(self, handle, G):
        """Backsolve adjoint through ``cb.vjp`` only: λ' = -Jᵀλ, μ' = -(∂f/∂p)ᵀλ, jumps λ += G[:,
        j]."""
        from ..solvers import Tsit5

        self.calls["backward"] += 1
        if handle["vector_tols"]:  # bug 5, as the bridge's backward refuses them
            raise ValueError(
                "backward: array abstol/reltol cannot be used for gradients: SciMLSensitivity "
                "passes "
                "them to the adjoint solve, whose state is longer; use scalar tolerances"
            )
        G = np.asarray(G)
        ys, ts, p, rhs = handle["ys"], handle["ts"], handle["p"], handle["rhs"]
        n, k = ys.shape
        if G.shape != (n, k):
            raise ValueError(f"cotangent must be n×k = {(n, k)}, got {G.shape}")
        if handle["sensealg"] in ("InterpolatingAdjoint", "GaussAdjoint"):
            self._checkpoint_resolves(handle)
        lam = G[:, k - 1].astype(ys.dtype).copy()
        mu = np.zeros_like(p)
        base = handle["opts"]
        opts = LoopOptions(
            rtol=base.rtol if not isinstance(base.rtol, torch.Tensor) else float(base.rtol.min()),
            atol=base.atol if not isinstance(base.atol, torch.Tensor) else float(base.atol.min()),
            max_steps=base.max_steps,
            dense=False,
        )
        stats: dict = {}

        def aug(t, x):
            xn = x.numpy()
            u, lam_u = xn[:n], xn[n : 2 * n]
            du = self._f(rhs, u, p, t)
            vu, vp = self._vjp(rhs, u, p, t, lam_u)
            return torch.from_numpy(np.concatenate([du, -vu, -vp]))

        for j in range(k - 1, 0, -1):
            x0 = torch.from_numpy(np.concatenate([ys[:, j], lam, mu]))
            loop = integrate(aug, x0, [ts[j], ts[j - 1]], Tsit5(), opts, stats)
            xe = loop.y_final.numpy()
            lam = xe[n : 2 * n] + G[:, j - 1]
            mu = xe[2 * n :]
        return lam.copy(), mu.copy()

    def _checkpoint_resolves(self, handle):
        """Bug 6: re-solve each interval with the forward method, the problem's keywords and the
        tolerances only (as interpolating_adjoint.jl:88-91 does); each re-solve must succeed."""
        from ..solvers import Tsit5, lookup

        ys, ts, p, rhs, base = (
            handle["ys"],
            handle["ts"],
            handle["p"],
            handle["rhs"],
            handle["opts"],
        )
        pk = handle["problem_kwargs"]
        if handle["solver"] in FIXED_STEP and pk["dt"] is None:
            raise ValueError("Fixed timestep methods require a choice of dt or choosing the tstops")
        try:
            cls = lookup(handle["solver"])
        except ValueError:
            cls = Tsit5
        solver = Tsit5() if handle["solver"] in IMPLICIT_SOLVERS else cls()
        opts = LoopOptions(
            rtol=base.rtol,
            atol=base.atol,
            dt=pk["dt"],
            adaptive=pk["adaptive"],
            max_steps=base.max_steps,
            dense=False,
        )
        f = lambda t, y: torch.from_numpy(self._f(rhs, y.numpy(), p, float(t)))
        for j in range(1, ys.shape[1]):
            loop = integrate(
                f, torch.from_numpy(ys[:, j - 1].copy()), [ts[j - 1], ts[j]], solver, opts, {}
            )
            if not loop.retcode.successful:
                raise RuntimeError(
                    f"checkpoint re-solve failed on [{ts[j - 1]}, {ts[j]}]: {loop.retcode.value}"
                )

    # -- steady state
    # -----------------------------------------------------------------------------------
    def steady(
        self,
        rhs,
        z0,
        p,
        *,
        solver="Tsit5",
        ad="finitediff",
        abstol=1e-8,
        reltol=1e-6,
        maxiters=100_000,
        linsolve="default",
    ):
        """DynamicSS: integrate over doubling intervals until ‖F‖∞ ≤ abstol or ≤ reltol‖z + F‖∞."""
        from ..solvers import Tsit5

        self.calls["steady"] += 1
        z = np.array(np.asarray(z0), copy=True).reshape(-1)
        p = np.array(np.asarray(p), dtype=z.dtype, copy=True).reshape(-1)
        opts = LoopOptions(
            rtol=float(reltol) * 1e-2,
            atol=float(abstol) * 1e-2,
            max_steps=int(maxiters),
            dense=False,
        )
        stats = {"nfe": 0, "naccept": 0, "nreject": 0}
        f = lambda t, y: torch.from_numpy(self._f(rhs, y.numpy(), p, t))
        t, span, retcode = 0.0, 1.0, "MaxIters"
        for _ in range(60):
            r = self._f(rhs, z, p, t)
            if np.max(np.abs(r)) <= abstol or np.max(np.abs(r)) <= reltol * np.max(np.abs(z + r)):
                retcode = "Success"
                break
            loop = integrate(f, torch.from_numpy(z), [t, t + span], Tsit5(), opts, stats)
            z = loop.y_final.numpy().copy()
            t, span = t + span, span * 2
        handle = {"rhs": rhs, "z": z, "p": p}
        return z.copy(), retcode, (stats["nfe"], stats["naccept"], stats["nreject"]), handle

    def steady_backward(self, handle, g):
        """dp = -(∂F/∂p)ᵀλ with Jᵀλ = g (Jᵀ assembled column by column from ``cb.vjp``)."""
        self.calls["steady_backward"] += 1
        z, p, rhs = handle["z"], handle["p"], handle["rhs"]
        g = np.asarray(g, dtype=z.dtype).reshape(-1)
        n = z.size
        JT = np.empty((n, n), dtype=z.dtype)
        for i in range(n):
            e = np.zeros(n, dtype=z.dtype)
            e[i] = 1.0
            JT[:, i] = self._vjp(rhs, z, p, math.inf, e)[0]
        lam = np.linalg.solve(JT, g)
        return -self._vjp(rhs, z, p, math.inf, lam)[1]
