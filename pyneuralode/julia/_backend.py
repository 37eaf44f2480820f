"""``backend="julia"``: the entry points the engine calls, and the autograd Functions.

``solve(problem, solver, sensealg, opts, throw=...)`` is called by :func:`pyneuralode.solve`;
``steady_state(f, z0, args, solver, sensealg, abstol, reltol)`` by the DEQ layer. Both pick a
path:

* **native**: the vector field is an autonomous ``nn.Sequential`` MLP (``pn.julia.Autonomous(net)``
  or any module exposing ``autonomous_net``), with no ``args`` and a plain tensor state: the MLP
  is translated to Julia (``_mlp.py``) and the solve *and* the adjoint run entirely in Julia; on
  CUDA tensors the arrays are exchanged through DLPack without copies.
* **callback**: anything else. Julia calls back into torch for ``f``, for one ``torch.func.vjp``
  per adjoint step, and for the Jacobian of implicit solvers (``torch.func.jacrev``).

Gradients: a ``torch.autograd.Function`` whose forward runs the Julia solve (under
``Zygote.pullback``) and whose backward sends the cotangents of all saved states (an n×k matrix)
to the recorded SciMLSensitivity pullback and returns gradients for ``y0`` and for the flattened
parameters (module parameters and tensor ``args`` that require grad), which flow back to every
tensor through ``torch.cat``. Vector fields that close over tensors without being ``nn.Module``
parameters or ``args`` get no gradient for those tensors on this backend.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .._solution import ReturnCode, Solution, SolveError
from ._callbacks import ode_callbacks, steady_callbacks
from ._marshal import (
    ParamLayout,
    dtype_name,
    from_julia_matrix,
    from_julia_vector,
    to_julia_matrix,
    to_julia_vector,
)
from ._mlp import find_net, mlp_spec, spec_numel
from ._options import is_implicit, sensealg_kwargs, solve_kwargs, solver_name
from ._session import get_session

#: ``_LOCAL.stats``: the stats dict of this thread's latest :func:`steady_state` call, read as
#: ``_backend.last_stats`` (a convenience: a call in another thread never shows here; the per-call
#: record is ``steady_state(..., return_info=True)``)
_LOCAL = threading.local()


def __getattr__(name):
    if name == "last_stats":  # thread-local: see _LOCAL
        return getattr(_LOCAL, "stats", {})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _retcode(s: str) -> ReturnCode:
    try:
        return ReturnCode(str(s))
    except ValueError:
        return ReturnCode.Failure


class _Run:
    """One Julia solve: the session, the right-hand side handle and the options, plus
    marshalling."""

    def __init__(self, session, rhs, shape, dtype, device, cuda: bool, stats: dict, callbacks=None):
        self.session = session
        self.rhs = rhs
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self.cuda = cuda
        self.stats = stats
        self.callbacks = callbacks
        self.handle = None

    def _in(self, x: torch.Tensor):
        if self.cuda:
            torch.cuda.synchronize(x.device)
            return self.session.cuda().from_torch(
                x.detach().reshape(-1).contiguous(), torch.utils.dlpack.to_dlpack
            )
        return to_julia_vector(x)

    def _in_matrix(self, g: torch.Tensor):
        if self.cuda:  # (k, n) C-contiguous torch = n×k column-major Julia (DLPack reverses dims)
            torch.cuda.synchronize(g.device)
            return self.session.cuda().from_torch(
                g.detach().reshape(g.shape[0], -1).contiguous(), torch.utils.dlpack.to_dlpack
            )
        return to_julia_matrix(g)

    def _out_matrix(self, a, shape):
        if self.cuda:
            cu = self.session.cuda()
            cu.synchronize()
            t = cu.to_torch(a, torch.from_dlpack)  # n×k Julia → (k, n) torch, no copy
            return t.clone().reshape(t.shape[0], *shape)
        return from_julia_matrix(a, shape, self.dtype, self.device)


class _ODERun(_Run):
    def __init__(self, *a, ts, kwargs, **k):
        super().__init__(*a, **k)
        self.ts = np.asarray(ts, dtype=np.float64)
        self.kwargs = kwargs

    def forward(self, y0: torch.Tensor, pflat: torch.Tensor):
        ys, retcode, st, handle = self.session.forward(
            self.rhs, self._in(y0), self._in(pflat), self.ts, **self.kwargs
        )
        self.handle = handle
        nf, na, nr = (int(x) for x in st)
        self.stats.update(nfe=nf, naccept=na, nreject=nr)
        if self.callbacks is not None:
            self.stats["nfe_python"] = self.callbacks.nfe
            self.stats["njac_python"] = self.callbacks.njac
        return self._out_matrix(ys, self.shape), str(retcode)

    def backward(self, grad_ys: torch.Tensor):
        nvjp0 = self.callbacks.nvjp if self.callbacks is not None else 0
        du0, dp = self.session.backward(self.handle, self._in_matrix(grad_ys))
        if self.callbacks is not None:
            self.stats["nvjp_python"] = (
                self.stats.get("nvjp_python", 0) + self.callbacks.nvjp - nvjp0
            )
        return du0, dp


class JuliaODEFunction(torch.autograd.Function):
    """``ys = solve(y0, p)`` in Julia; backward = SciMLSensitivity's adjoint with the cotangents of
    all saved states."""

    @staticmethod
    def forward(ctx, y0, pflat, run: _ODERun):
        ys, retcode = run.forward(y0, pflat)
        ctx.run = run
        ctx.p_shape = pflat.shape
        run.retcode = retcode
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys):
        run = ctx.run
        du0, dp = run.backward(grad_ys.contiguous())
        g_y0 = (
            from_julia_vector(du0, run.shape, run.dtype, run.device)
            if ctx.needs_input_grad[0]
            else None
        )
        g_p = (
            from_julia_vector(dp, ctx.p_shape, run.dtype, run.device)
            if ctx.needs_input_grad[1]
            else None
        )
        return g_y0, g_p, None


def _check_gradient_tolerances(kw) -> None:
    """Tensor tolerances cannot be used with gradients: SciMLSensitivity passes the solve's
    ``abstol``/``reltol`` on to the adjoint solve (concrete_solve.jl:955-975), whose state is
    longer than ``y0`` (n+np or 2n+np), and Julia fails there."""
    for name, key in (("atol", "abstol"), ("rtol", "reltol")):
        if isinstance(kw.get(key), np.ndarray):
            raise ValueError(
                f"{name}: a tensor tolerance cannot be used with gradients on backend='julia' "
                "(SciMLSensitivity reuses the solve's tolerances for the adjoint solve, whose "
                "state is longer); "
                f"pass a float, e.g. {name}=float({name}.min()), solve under torch.no_grad(), or "
                "use backend='torch'"
            )


def _native_spec(problem) -> list | None:
    if problem.args or problem.is_tuple:
        return None
    net = find_net(problem.f)
    if net is None:
        return None
    spec = mlp_spec(net)
    if spec is None or problem.y0.ndim == 0 or problem.y0.shape[-1] != spec[0]["in"]:
        return None
    if any(p.dtype != problem.y0.dtype for p in net.parameters()):
        return None
    return spec


def solve(
    problem, solver, sensealg, opts, throw: bool = True, *, session=None, path: str | None = None
) -> Solution:
    """Solve ``problem`` with OrdinaryDiffEq/SciMLSensitivity (see the module docstring).

    ``path``: ``None`` (automatic), ``"native"`` or ``"callback"``. ``session`` replaces the Julia
    session (tests use :class:`~pyneuralode.julia._standin.NativeStandIn`).
    """
    name = solver_name(solver)
    skw = sensealg_kwargs(sensealg)
    kw = solve_kwargs(opts)
    y0 = problem.y0
    dtype_name(y0.dtype)
    if path not in (None, "native", "callback"):
        raise ValueError(f"path: expected None, 'native' or 'callback', got {path!r}")
    session = session or get_session()
    # validate f's output (shape, dtype, device) once, natively, with a clear message
    with torch.no_grad():
        problem.call(problem.time(problem.t_list[0]), y0.detach())
    layout = ParamLayout(problem.f, problem.args, y0.dtype, y0.device)
    spec = _native_spec(problem) if path != "callback" else None
    if path == "native" and spec is None:
        raise ValueError(
            "path='native' needs an autonomous nn.Sequential MLP vector field "
            "(pn.julia.Autonomous(net)), no args and a tensor state"
        )
    if spec is not None and spec_numel(spec) != layout.n:
        spec = None
    stats: dict = {"nfe": 0, "naccept": 0, "nreject": 0}
    callbacks = None
    if spec is not None:
        rhs = session.mlp_rhs(spec)
        ad = "forwarddiff"
        cuda = y0.is_cuda
        stats["path"] = "native"
    else:
        callbacks = ode_callbacks(problem, layout)
        rhs = session.callback_rhs(callbacks, dtype_name(y0.dtype), jac=is_implicit(name))
        ad = "finitediff"
        cuda = False
        stats["path"] = "callback"
    run = _ODERun(
        session,
        rhs,
        y0.shape,
        y0.dtype,
        y0.device,
        cuda,
        stats,
        callbacks,
        ts=problem.t_list,
        kwargs=dict(solver=name, ad=ad, **skw, **kw),
    )
    pflat = layout.flatten()
    ts = problem.t
    time_grad = ts.requires_grad and torch.is_grad_enabled()
    y0_in = y0
    if time_grad:  # dΦ/dt0 = -(∂Φ/∂y0) f(t0, y0), as in the native solve
        f0 = problem.call(ts[0], y0).detach()
        y0_in = y0 - (ts[0] - ts[0].detach()).to(y0.dtype) * f0
    need_grad = torch.is_grad_enabled() and (y0_in.requires_grad or pflat.requires_grad)
    if need_grad:
        _check_gradient_tolerances(kw)
        if stats["path"] == "callback" and is_implicit(name):
            # The adjoint solve reuses this implicit algorithm on the n+np adjoint state; a dense
            # Jacobian of it costs n+np Python VJPs. GMRES keeps it Jacobian-free (one VJP per
            # Krylov iteration).
            run.kwargs["linsolve"] = "gmres"
    if need_grad:
        ys = JuliaODEFunction.apply(y0_in, pflat, run)
        retcode = run.retcode
    else:
        with torch.no_grad():
            ys, retcode = run.forward(y0_in, pflat)
    k = ys.shape[0]
    if time_grad and k > 1:
        tk = ts[1:k]
        fk = torch.stack(
            [problem.call(tk[i].detach(), ys[i + 1].detach()) for i in range(k - 1)]
        ).detach()
        shift = (tk - tk.detach()).to(ys.dtype).reshape(-1, *([1] * (ys.ndim - 1)))
        ys = torch.cat([ys[:1], ys[1:] + shift * fk])
    rc = _retcode(retcode)
    sol = Solution(
        ts=ts[:k] if k < ts.shape[0] else ts,
        ys=problem.unpack(ys),
        retcode=rc,
        stats=stats,
        segments=None,
        unflatten=problem.unpack if problem.is_tuple else None,
        t_reached=problem.t_list[k - 1] if k else problem.t_list[0],
        solver=solver,
    )
    if not rc.successful and throw:
        raise SolveError(
            f"solve failed with retcode {rc.value} (backend='julia', {name}) after {k} of "
            f"{len(problem.t_list)} output times "
            f"(pass throw=False to get the partial solution)",
            rc,
            sol.t_reached,
            sol,
        )
    return sol


# -- steady states (DEQ)
# ------------------------------------------------------------------------------
class _SteadyRun(_Run):
    def __init__(self, *a, kwargs, **k):
        super().__init__(*a, **k)
        self.kwargs = kwargs

    def forward(self, z0, pflat):
        z, retcode, st, handle = self.session.steady(
            self.rhs, to_julia_vector(z0), to_julia_vector(pflat), **self.kwargs
        )
        self.handle = handle
        self.stats.update(
            nfe=int(st[0]), naccept=int(st[1]), nreject=int(st[2]), retcode=str(retcode)
        )
        return from_julia_vector(z, self.shape, self.dtype, self.device), str(retcode)


class JuliaSteadyFunction(torch.autograd.Function):
    """``z* = steady(p)`` (DynamicSS); backward = SteadyStateAdjoint (implicit function theorem)."""

    @staticmethod
    def forward(ctx, z0, pflat, run: _SteadyRun):
        z, _ = run.forward(z0, pflat)
        ctx.run = run
        ctx.p_shape = pflat.shape
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        run = ctx.run
        dp = run.session.steady_backward(run.handle, to_julia_vector(g))
        g_p = (
            from_julia_vector(dp, ctx.p_shape, run.dtype, run.device)
            if ctx.needs_input_grad[1]
            else None
        )
        return None, g_p, None  # the steady state does not depend on z0


def _inner_solver(solver) -> str:
    if solver is None:
        return "Tsit5"
    cls = type(solver).__name__
    if cls == "DynamicSS" or getattr(solver, "name", None) == "DynamicSS":
        for attr in ("alg", "ode_solver", "solver", "inner"):
            inner = getattr(solver, attr, None)
            if inner is not None:
                return solver_name(inner)
        return "Tsit5"
    try:
        return solver_name(solver)  # an ODE solver given directly = DynamicSS(solver)
    except ValueError:
        raise ValueError(
            f"solver: {cls} has no counterpart in backend='julia' (SteadyStateDiffEq's "
            "DynamicSS); use "
            f"pn.DynamicSS(pn.Tsit5()) or backend='torch'"
        ) from None


def steady_state(
    f_module,
    z0,
    args=(),
    solver=None,
    sensealg=None,
    abstol=1e-8,
    reltol=1e-6,
    *,
    session=None,
    maxiters: int = 100_000,
    return_info: bool = False,
):
    """Fixed point ``z* = f(z*, *args)`` as the steady state of ``dz/dt = f(z, *args) - z``.

    SteadyStateDiffEq's ``DynamicSS(solver)`` forward, SciMLSensitivity's
    ``SteadyStateAdjoint(autojacvec=ZygoteVJP(), linsolve=KrylovJL_GMRES())`` backward (the
    linear solve is always GMRES on this backend). Returns ``z*`` shaped like ``z0``, with
    gradients for the module parameters and the tensor ``args`` (none for ``z0``), or
    ``(z*, stats)`` with ``return_info=True``. Stats (nfe, retcode, residual ``max|f(z*) - z*|``)
    are also this thread's ``last_stats``; a steady state that was not reached is reported there
    (``retcode``), not raised.
    """
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        raise TypeError(f"z0: expected a floating torch.Tensor, got {type(z0).__name__}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args: must be a tuple, got {type(args).__name__}; use args=(x,)")
    inner = _inner_solver(solver)
    if (
        sensealg is not None
        and getattr(sensealg, "name", type(sensealg).__name__) != "SteadyStateAdjoint"
    ):
        raise ValueError(
            f"sensealg: {type(sensealg).__name__} has no counterpart in backend='julia' for "
            "steady states; use "
            f"pn.SteadyStateAdjoint() (or backend='torch')"
        )
    dtype = dtype_name(z0.dtype)
    session = session or get_session()
    layout = ParamLayout(f_module, tuple(args), z0.dtype, z0.device)
    cb = steady_callbacks(f_module, z0, layout)
    rhs = session.callback_rhs(cb, dtype, jac=is_implicit(inner))
    stats: dict = {"path": "callback"}
    run = _SteadyRun(
        session,
        rhs,
        z0.shape,
        z0.dtype,
        z0.device,
        False,
        stats,
        cb,
        kwargs=dict(
            solver=inner,
            ad="finitediff",
            abstol=float(abstol),
            reltol=float(reltol),
            maxiters=int(maxiters),
        ),
    )
    pflat = layout.flatten()
    z0d = z0.detach()
    if torch.is_grad_enabled() and pflat.requires_grad:
        z = JuliaSteadyFunction.apply(z0d, pflat, run)
    else:
        with torch.no_grad():
            z, _ = run.forward(z0d, pflat)
    with torch.no_grad():
        params, a = layout.unflatten(pflat.detach())
        fz = (
            torch.func.functional_call(f_module, params, (z.detach(), *a))
            if params and isinstance(f_module, torch.nn.Module)
            else f_module(z.detach(), *a)
        )
        stats["residual"] = float((fz - z.detach()).abs().max())
    stats["nfe_python"] = cb.nfe
    _LOCAL.stats = stats
    return (z, stats) if return_info else z
