"""Gradients on the compiled path for many parameters: an interpolating continuous adjoint.

The forward compiled solve keeps its dense output (the method's own interpolant over its accepted
steps). The backward pass integrates, from the last output time to the first, ::

    λ' = −J_y(t, y(t))ᵀ λ,      μ' = −(∂f/∂θ)(t, y(t))ᵀ λ,

with ``y(t)`` read from that dense output (SciML's ``InterpolatingAdjoint`` without
checkpointing), ``λ`` jumping by the output cotangent ``∂L/∂y(t_i)`` at every output time. Then
``∂L/∂y0 = λ(t0)`` and ``∂L/∂θ = μ(t0)``. The vector–Jacobian products are traced once
(reverse-mode autograd through the traced graph of f, with ``λ`` an input of the trace) and
translated like f itself into a problem module whose ``rhs(t, z, out, p)`` interpolates ``y(t)``
(by the method module's ``dense`` functions) and evaluates them; the same method module integrates
it, one call per interval between output times. For the implicit methods the module's ``jac``
gives the backward system's exact Jacobian (``−J_yᵀ`` and ``−(∂f/∂θ)ᵀ`` in the ``λ`` columns) and
its time derivative along ``y(t)``. Gradients with respect to the output times:
``∂L/∂t_i = ⟨∂L/∂y(t_i), f(t_i, y(t_i))⟩`` and ``∂L/∂t_0 = −λ(t_0⁺)ᵀ f(t_0, y_0)``.

The cost is one backward solve of ``n + m`` components whatever ``m`` (no ``n·m`` sensitivity
matrix): the method for many parameters. Memory: the forward dense output (every accepted step).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from . import _codegen, _driver, _sensitivity, _trace
from ._record import record

#: (f, method, layouts, what requires grad) -> the adjoint problem module, kept for the process
_ADJOINTS: dict = {}


def _vjp_call(
    gm, n: int, tpos, arg_cols, names_index, n_params: int, with_jac: bool, with_dt: bool = False
):
    """``call(t, w, a)`` with ``w = [y, λ]``: ``[−J_yᵀλ, −(∂f/∂θ)ᵀλ]`` (``θ``: the tensor
    arguments marked in ``arg_cols``, then the captured parameters), or with ``with_jac`` the
    backward system's Jacobian rows in ``λ`` (row-major ``(n + m) × n``) followed by its time
    derivative along the interpolated ``y(t)`` (``with_dt``, ``w = [y, λ, y']``; zeros
    otherwise: only the Rosenbrock methods use it)."""

    def call(t, w, a):
        a = list(a)
        y, lam = w[:n], w[n : 2 * n]
        user = [a[i] for i in tpos]
        params = a[len(a) - n_params :] if n_params else []
        with torch.enable_grad():
            yv = y.detach().requires_grad_(True)
            tv = t.detach().requires_grad_(True)
            user = [
                u.detach().requires_grad_(True) if arg_cols[j] else u for j, u in enumerate(user)
            ]
            params = [p.detach().requires_grad_(True) for p in params]
            subs = {name: params[j] for name, j in names_index.items()}
            out = _sensitivity._Substituted(gm, subs).run(tv, yv, *user)
            wrt = [yv] + [u for j, u in enumerate(user) if arg_cols[j]] + params

            def flat(gs):
                return torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(x)).reshape(-1)
                        for g, x in zip(gs, wrt)
                    ]
                )

            if not with_jac:
                gs = torch.autograd.grad(out, wrt, grad_outputs=lam, allow_unused=True)
                return -flat(gs)
            # rows of [J_y | ∂f/∂θ]: the backward Jacobian is minus their transpose
            rows = []
            for i in range(n):
                gs = torch.autograd.grad(out[i], wrt, retain_graph=True, allow_unused=True)
                rows.append(flat(gs))
            Jb = -torch.stack(rows).t()  # (n + m, n): ∂(backward rhs)/∂λ
            if not with_dt:
                return torch.cat([Jb.reshape(-1), torch.zeros(Jb.shape[0], dtype=w.dtype)])
            # Rosenbrock: d/dt of the backward rhs at fixed λ along the interpolated y(t), i.e.
            # its derivative in the direction (1, y'(t)) (w = [y, λ, y'] here): one more reverse
            # pass and a transposition through a dummy u
            g = -flat(
                torch.autograd.grad(
                    out, wrt, grad_outputs=lam, create_graph=True, allow_unused=True
                )
            )
            u = torch.zeros(g.shape[0], dtype=w.dtype, requires_grad=True)
            gy, gt = torch.autograd.grad(
                g, (yv, tv), grad_outputs=u, create_graph=True, allow_unused=True
            )
            v = (u * 0).sum()
            if gy is not None:
                v = v + (gy * w[2 * n :]).sum()
            if gt is not None:
                v = v + gt
            (dT,) = torch.autograd.grad(v, u, allow_unused=True)
            if dT is None:
                dT = torch.zeros(g.shape[0], dtype=w.dtype)
            return torch.cat([Jb.reshape(-1), dT])

    return call


def _adjoint_source(vjp_src, jac_src, method_module, kind, n, m, ny, nk) -> str:
    """The adjoint problem module: the traced products renamed, the interpolation of ``y(t)``
    from the forward dense output packed at the end of ``p`` (``p[-2]`` steps from offset
    ``p[-1]``: segT, segY, segK), and ``rhs``/``jac`` of the backward system."""
    if kind in ("erk", "esdirk"):
        dense_import = "dense"
        call = "dense(th, segY[k, 0], segY[k, 1], h, segK[k], segY[k, 3], segY[k, 2], tmp)"
    elif kind == "rosenbrock":
        dense_import = "dense_rb"
        call = "dense_rb(th, segY[k, 0], segY[k, 1], segK[k], tmp)"
    else:
        dense_import = "dense_nd"
        call = f"dense_nd(th, segK[k], {nk - 1}, tmp)"
    N, NB = n, n + m
    NW = 3 * n if kind == "rosenbrock" else 2 * n  # jac's w: [y, λ] (and y'(t) for dT)
    L = [f"from {method_module} import {dense_import}", ""]
    L.append(vjp_src.replace("def rhs(", "def vjp(").replace("def jac(", "def _unused_jac("))
    if jac_src is not None:
        L.append(jac_src.replace("def rhs(", "def vjp_jac(").replace("def jac(", "def _unj("))
    L.append(
        f"""
@njit(cache=True)
def ystate(t, p, w, deriv):
    # y(t) from the forward dense output into w[:{N}]; with deriv, y'(t) of the interpolant
    # (a central difference of the polynomial) into w[{2 * N}:{3 * N}]
    L = p.shape[0]
    M = int(p[L - 2])
    b = int(p[L - 1])
    segT = p[b : b + 2 * M].reshape((M, 2))
    b += 2 * M
    segY = p[b : b + M * {ny * N}].reshape((M, {ny}, {N}))
    b += M * {ny * N}
    segK = p[b : b + M * {nk * N}].reshape((M, {nk}, {N}))
    s = 1.0 if segT[0, 1] >= 0 else -1.0
    lo = 0
    hi = M - 1
    while lo < hi:  # the last step starting at or before t (in the direction of the solve)
        mid = (lo + hi + 1) // 2
        if s * (segT[mid, 0] - t) <= 0:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    h = segT[k, 1]
    th = (t - segT[k, 0]) / h
    tmp = np.zeros({N})
    {call}
    for j in range({N}):
        w[j] = tmp[j]
    if deriv:
        d = 1e-5
        th0 = th
        th = th0 + d
        {call}
        for j in range({N}):
            w[{2 * N} + j] = tmp[j]
        th = th0 - d
        {call}
        for j in range({N}):
            w[{2 * N} + j] = (w[{2 * N} + j] - tmp[j]) / (2 * d * h)


@njit(RHS_SIG, cache=True)
def rhs(t, z, out, p):
    w = np.empty({2 * N})
    ystate(t, p, w, False)
    for j in range({N}):
        w[{N} + j] = z[j]
    vjp(t, w, out, p)
"""
    )
    if jac_src is not None:
        L.append(
            f"""
@njit(JAC_SIG, cache=True)
def jac(t, z, J, dT, p):
    w = np.empty({NW})
    ystate(t, p, w, {NW > 2 * N})
    for j in range({N}):
        w[{N} + j] = z[j]
    r = np.empty({NB * N + NB})
    vjp_jac(t, w, r, p)
    for a in range({NB}):
        for i in range({NB}):
            J[a, i] = r[a * {N} + i] if i < {N} else 0.0
        dT[a] = r[{NB * N} + a]
"""
        )
    return _codegen.problem_source("\n".join(L))


def adjoint_module(problem, kind: str, method_mod, ny: int, nk: int):
    """The backward system's problem module for ``problem`` (traced once per f, method and what
    requires grad). Returns a dict: ``built`` (for :func:`._driver.loop_arguments`), ``new``,
    ``n``, ``m`` (parameter components), ``inputs`` (the tensors ``μ`` belongs to, in order),
    ``args`` (the traced module's arguments: the user's, then the captured parameters)."""
    n = problem.y0.numel()
    gm, tpos = _sensitivity._trace_f(problem, n)
    params, names_index = _sensitivity._captured_parameters(gm)
    user = [problem.args[i] for i in tpos]
    arg_cols = [bool(u.requires_grad) for u in user]
    inputs = [u for u, c in zip(user, arg_cols) if c] + list(params)
    m = sum(x.numel() for x in inputs)
    args = tuple(problem.args) + tuple(p.detach() for p in params)
    key = (
        "adjoint",
        _driver.f_key(problem.f),
        method_mod.__name__,
        problem.y0.dtype,
        tuple(problem.y0.shape),
        problem.is_tuple,
        tuple(map(tuple, problem.shapes or [])),
        tuple(_driver._layout_key(a) for a in problem.args),
        tuple(arg_cols),
        tuple((tuple(p.shape), p.dtype) for p in params),
    )
    hit = _ADJOINTS.get(key)
    if hit is not None:
        return {**hit, "inputs": inputs, "args": args, "new": False}
    implicit = kind != "erk"
    dtype = problem.y0.dtype
    vjp_src, kf, _, _ = _trace.trace_rhs(
        _vjp_call(gm, n, tpos, arg_cols, names_index, len(params), False),
        2 * n,
        args,
        jacobian=False,
        dtype=dtype,
        tracer=record,
    )
    jac_src, kj = None, []
    if implicit:
        jac_src, kj, _, _ = _trace.trace_rhs(
            _vjp_call(gm, n, tpos, arg_cols, names_index, len(params), True, kind == "rosenbrock"),
            3 * n if kind == "rosenbrock" else 2 * n,
            args,
            jacobian=False,
            dtype=dtype,
            tracer=record,
        )
    src = _adjoint_source(vjp_src, jac_src, method_mod.__name__, kind, n, m, ny, nk)
    mod = _codegen.load_module(src)
    built = {"mod": mod, "kf": kf, "kj": kj, "uses_t": True}
    if len(_ADJOINTS) >= _driver._MAX_PROBLEMS:
        _ADJOINTS.pop(next(iter(_ADJOINTS)))
    _ADJOINTS[key] = {"built": built, "n": n, "m": m}
    return {"built": built, "n": n, "m": m, "inputs": inputs, "args": args, "new": True}


class _Backward:
    """What the backward pass needs from the forward compiled solve."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def covering(self, t: float) -> float:
        """The length of the forward step that ends at or covers ``t``."""
        starts, steps = self.steps[:, 0], self.steps[:, 1]
        if starts.shape[0] == 0:
            return -1.0
        s = 1.0 if steps[0] >= 0 else -1.0
        k = int(np.searchsorted(s * starts, s * t, side="left")) - 1
        return float(abs(steps[max(k, 0)]))

    def gradients(self, g: torch.Tensor, want_t: bool):
        """``(∂L/∂t, ∂L/∂y0, ∂L/∂θ)`` for the output cotangent ``g`` (rows of the saved
        states)."""
        n, m, k = self.n, self.m, self.k
        gs = g.detach().double().reshape(g.shape[0], -1)[:k].numpy()
        ts = self.t_out
        ys = self.ys
        a = list(self.call_args)
        z = np.zeros(n + m)
        z[:n] = gs[k - 1]
        gt = np.zeros(len(ts)) if want_t else None
        fbuf = np.zeros(n)
        nfe = naccept = nreject = 0
        for i in range(k - 1, 0, -1):
            if want_t:
                self.rhs(float(ts[i]), ys[i], fbuf, self.pf)
                gt[i] = float(gs[i] @ fbuf)
            a[0] = np.array([ts[i], ts[i - 1]])
            a[1] = z
            if self.adaptive and self.h_user <= 0.0:
                # start with the forward step covering t_i (as the native engine): Hairer's
                # heuristic over z would see μ's channels start at zero and pick a tiny step
                a[6] = min(self.covering(float(ts[i])), abs(float(ts[i] - ts[i - 1])))
            out = _driver.entry_point(self.mod.solve)(*a)
            rc, st = int(out[2]), out[4]
            nfe += int(st[0])
            naccept += int(st[1])
            nreject += int(st[2])
            if rc != 0:
                msg = _driver._MESSAGES[_codegen.RETCODES[rc]].format(
                    max_steps=self.max_steps, t=float(out[3])
                )
                raise RuntimeError(
                    f"compile=True adjoint: the backward solve failed with retcode "
                    f"{_codegen.RETCODES[rc]}: {msg}"
                )
            z = out[0][1].copy()
            z[:n] += gs[i - 1]
        if want_t:
            self.rhs(float(ts[0]), ys[0], fbuf, self.pf)
            gt[0] = -float((z[:n] - gs[0]) @ fbuf)
        self.stats.update(nfe_adjoint=nfe, naccept_adjoint=naccept, nreject_adjoint=nreject)
        return gt, z[:n], z[n:]


class _CompiledAdjoint(torch.autograd.Function):
    """``ys`` from the compiled forward solve; backward: the compiled adjoint solve."""

    @staticmethod
    def forward(ctx, ys, bw, t, y0, *inputs):
        ctx.bw = bw
        ctx.shapes = [(x.shape, x.dtype) for x in inputs]
        ctx.t_like = (t.shape, t.dtype)
        ctx.y0_like = (y0.shape, y0.dtype)
        return ys.clone()

    @staticmethod
    def backward(ctx, g):
        bw = ctx.bw
        want_t = ctx.needs_input_grad[2]
        gt, gy0, gth = bw.gradients(g, want_t)
        out_t = None
        if want_t:
            full = np.zeros(int(np.prod(ctx.t_like[0])))
            full[: gt.shape[0]] = gt
            out_t = torch.from_numpy(full).to(ctx.t_like[1]).reshape(ctx.t_like[0])
        out_y0 = None
        if ctx.needs_input_grad[3]:
            out_y0 = torch.from_numpy(gy0).to(ctx.y0_like[1]).reshape(ctx.y0_like[0])
        outs, i = [], 0
        for shp, dtype in ctx.shapes:
            c = int(np.prod(shp))
            outs.append(torch.from_numpy(gth[i : i + c].copy()).to(dtype).reshape(shp))
            i += c
        return (None, None, out_t, out_y0, *outs)


class AdjointSolution(_driver.CompiledSolution):
    """A compiled solution whose saved states carry the compiled adjoint's gradients; its dense
    output ``sol(tq)`` does not (refused with grad mode on rather than returned without a
    gradient)."""

    def _states(self, out):
        if torch.is_grad_enabled():
            raise ValueError(
                "sol(tq): the compiled adjoint differentiates the states at the output times t "
                "only; put the times in t, use forward sensitivities "
                "(sensealg=pn.DirectAdjoint(), for up to ~100 states + parameters), or evaluate "
                "sol(tq) under torch.no_grad()"
            )
        return out


def solve_adjoint(problem, solver, opts, kind: str, sensealg, *, throw: bool):
    """``solve(..., compile=True)`` with gradients by the compiled adjoint (see the module
    docstring)."""
    stats: dict = {}
    t_build = time.perf_counter()
    mod, new_method = _driver._method_module(solver, kind)
    fwd, new_f = _driver._problem_module(problem, kind, problem.args)
    n = problem.y0.numel()
    user_arrays = [
        np.ascontiguousarray(a.detach().double().cpu().reshape(-1).numpy())
        for a in problem.args
        if isinstance(a, torch.Tensor)
    ]
    fopts = copy.copy(opts)
    fopts.dense = True  # the backward pass reads y(t) from the dense output
    call_args = _driver.loop_arguments(
        problem,
        solver,
        fopts,
        kind,
        fwd,
        mod,
        problem.y0.detach().double().reshape(-1).numpy(),
        _driver._tol_array(problem.rtol, n),
        _driver._tol_array(problem.atol, n),
        user_arrays,
    )
    out = _driver.entry_point(mod.solve)(*call_args)
    ys_np, k, M = out[0], int(out[1]), int(out[9])
    segT, segY, segK, segX = out[5][:M], out[6][:M], out[7][:M], out[8][:M]
    adj = adjoint_module(problem, kind, mod, segY.shape[1], segK.shape[1])
    if new_f or new_method or adj["new"]:
        stats["compile_s"] = time.perf_counter() - t_build
    m = adj["m"]
    if kind == "erk" and M > 0:  # Vern7/DP8's lazy extra stages, once for every step
        mod.interp(
            np.arange(M, dtype=np.int64),
            np.full(M, 0.5),
            segT,
            segY,
            segK,
            segX,
            call_args[21],
            call_args[23],
            np.zeros((M, n)),
        )
    table = np.concatenate([segT.reshape(-1), segY.reshape(-1), segK.reshape(-1)])
    b_arrays = [
        np.ascontiguousarray(a.detach().double().cpu().reshape(-1).numpy())
        for a in adj["args"]
        if isinstance(a, torch.Tensor)
    ]

    def packed(consts):
        head = _driver._flat_params(b_arrays, consts)
        return np.ascontiguousarray(
            np.concatenate([head, table, [float(M), float(head.shape[0])]]), dtype=np.float64
        )

    rtol_b = sensealg.rtol if getattr(sensealg, "rtol", None) is not None else problem.rtol
    atol_b = sensealg.atol if getattr(sensealg, "atol", None) is not None else problem.atol
    rt = _driver._tol_array(rtol_b, n)
    at = _driver._tol_array(atol_b, n)
    bopts = copy.copy(opts)
    bopts.dense = False
    b_args = list(
        _driver.loop_arguments(
            problem,
            solver,
            bopts,
            kind,
            adj["built"],
            mod,
            np.zeros(n + m),
            np.concatenate([rt, np.full(m, rt.min())]),
            np.concatenate([at, np.full(m, at.min())]),
            b_arrays,
        )
    )
    b_args[23] = packed(adj["built"]["kf"])
    b_args[24] = packed(adj["built"]["kj"])
    stats["nsens"] = m
    bw = _Backward(
        n=n,
        m=m,
        k=k,
        t_out=call_args[0],
        ys=np.ascontiguousarray(ys_np[:k]),
        call_args=tuple(b_args),
        mod=mod,
        rhs=fwd["mod"].rhs,
        pf=call_args[23],
        max_steps=opts.max_steps,
        stats=stats,
        steps=np.ascontiguousarray(segT),
        adaptive=bool(opts.adaptive),
        h_user=float(b_args[6]),
    )
    ys = _CompiledAdjoint.apply(
        torch.from_numpy(ys_np[:k]), bw, problem.t, problem.y0, *adj["inputs"]
    )
    return _driver.package(
        problem,
        solver,
        opts,
        kind,
        mod,
        call_args,
        out,
        stats,
        throw,
        ys_flat=ys.to(problem.y0.dtype),
        cls=AdjointSolution,
    )
