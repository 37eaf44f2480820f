"""Gradients on the compiled path: forward sensitivities, returned into torch autograd.

With ``compile=True`` and a ``y0``, tensor argument or tensor captured by ``f`` (e.g. an
``nn.Module``'s parameters) that requires grad, the compiled loop integrates the augmented system
(SciML's ``ForwardSensitivity``)::

    y' = f(t, y, θ),    S' = J_y S + [0 | ∂f/∂θ],    S(t0) = [I | 0],

where ``S = ∂y/∂(y0, θ)`` (the ``y0`` columns only when ``y0`` requires grad). ``J_y`` and
``∂f/∂θ`` come from reverse-mode autograd on the traced graph of ``f`` (one pass per component of
``f``), and the augmented system is traced and compiled with the same generated step as ``f``
itself, its Jacobian (for the implicit methods: Rosenbrock, ESDIRK) traced exactly from it in
turn. ``S`` at the
output times then gives every vector–Jacobian product in the backward pass of a custom
:class:`torch.autograd.Function`. The error norm covers ``S`` too (rows of ``S`` take the
tolerances of their component of ``y``), so the gradient is as accurate as the solution.

The cost grows as ``n·(1 + m)`` for ``n`` states and ``m`` parameters: this is the method for
small systems with few parameters (SciML recommends it below ~100 of both). Larger problems
(``n + m > 100``, or ``n·(1 + m) > 40`` for the implicit methods, whose augmented Jacobian is
traced and compiled as straight-line code) go to the compiled adjoint (:mod:`._adjoint`); chosen
explicitly (``sensealg=pn.DirectAdjoint()``) they raise a ``ValueError`` pointing to it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from . import _driver, _trace
from ._record import record

#: the sizes forward sensitivities are for (SciML recommends them below ~100 parameters and
#: states); for the implicit methods the traced exact Jacobian of the augmented system (n(1+m))²
#: entries, many of them second derivatives) makes numba's compile time grow steeply with its size
MAX_STATES_AND_PARAMETERS = 100
MAX_IMPLICIT = 40


class _Substituted(torch.fx.Interpreter):
    """Runs a traced graph with some of its captured tensors replaced (by differentiable
    inputs)."""

    def __init__(self, gm, subs: dict):
        super().__init__(gm)
        self.subs = subs

    def get_attr(self, target, args, kwargs):
        if target in self.subs:
            return self.subs[target]
        return super().get_attr(target, args, kwargs)


def _captured_parameters(gm) -> tuple:
    """``(names, tensors, index)``: the graph's captured tensors that require grad (module
    parameters, closed-over tensors), each distinct tensor once; ``index[name]`` its position."""
    tensors: list = []
    index: dict = {}
    for nd in gm.graph.nodes:
        if nd.op != "get_attr":
            continue
        c = getattr(gm, nd.target)
        if isinstance(c, torch.Tensor) and c.requires_grad:
            for j, u in enumerate(tensors):
                if u is c:
                    index[nd.target] = j
                    break
            else:
                index[nd.target] = len(tensors)
                tensors.append(c)
    return tensors, index


#: (f, state layout, args layout) -> (traced graph of f, positions of the tensor args)
_TRACED: dict = {}


def needs_gradient(problem) -> bool:
    """Whether a gradient can flow: grad mode on and ``y0``, ``t``, a tensor argument, a module
    parameter or a tensor ``f`` captures (found in its traced graph) requires grad."""
    if not torch.is_grad_enabled():
        return False
    if any(x.requires_grad for x in [problem.y0, problem.t, *problem.arg_tensors, *problem.params]):
        return True
    gm, _ = _trace_f(problem, problem.y0.numel())
    return bool(_captured_parameters(gm)[0])


def _trace_f(problem, n: int):
    key = (
        _driver.f_key(problem.f),
        problem.y0.dtype,
        tuple(problem.y0.shape),
        problem.is_tuple,
        tuple(map(tuple, problem.shapes or [])),
        tuple(_driver._layout_key(a) for a in problem.args),
    )
    hit = _TRACED.get(key)
    if hit is not None:
        return hit
    shape0 = problem.y0.shape
    targs = [a.detach() if isinstance(a, torch.Tensor) else a for a in problem.args]
    tpos = [i for i, a in enumerate(targs) if isinstance(a, torch.Tensor)]

    def f_flat(t, y, *rest):
        full = list(targs)
        for i, a in zip(tpos, rest):
            full[i] = a
        return problem.call(t, y.reshape(shape0), full).reshape(-1)

    t0 = torch.zeros((), dtype=problem.y0.dtype)
    y0 = torch.zeros(n, dtype=problem.y0.dtype) + 0.5
    try:
        with torch.no_grad():
            gm = record(f_flat)(t0, y0, *[targs[i] for i in tpos])
    except _trace.UnsupportedOpError:
        raise
    except Exception as e:  # pragma: no cover - depends on f
        raise _trace.UnsupportedOpError(
            f"compile=True: tracing f failed ({type(e).__name__}: {e}); pass compile=False"
        ) from e
    if len(_TRACED) >= _driver._MAX_PROBLEMS:  # a new f per call must not grow it forever
        _TRACED.pop(next(iter(_TRACED)))
    _TRACED[key] = (gm, tpos)
    return gm, tpos


def _augmented_call(gm, n: int, tpos, arg_cols, y0_cols: bool, names_index, n_params, m):
    """``call(t, z, a)`` of the augmented system ``z = [y, vec(S)]`` (S row-major n×m); ``a``:
    the user's arguments followed by the captured parameters."""

    def call(t, z, a):
        a = list(a)
        y, S = z[:n], z[n:].reshape(n, m)
        user = [a[i] for i in tpos]
        params = a[len(a) - n_params :] if n_params else []
        with torch.enable_grad():
            yv = y if y.requires_grad else y.detach().requires_grad_(True)
            user = [
                u.detach().requires_grad_(True) if arg_cols[j] else u for j, u in enumerate(user)
            ]
            params = [p.detach().requires_grad_(True) for p in params]
            subs = {name: params[j] for name, j in names_index.items()}
            out = _Substituted(gm, subs).run(t, yv, *user)
            wrt = [yv] + [u for j, u in enumerate(user) if arg_cols[j]] + params
            rows = []
            for i in range(n):
                gs = torch.autograd.grad(
                    out[i], wrt, retain_graph=True, create_graph=True, allow_unused=True
                )
                parts = [
                    (g if g is not None else torch.zeros_like(w)).reshape(-1)
                    for g, w in zip(gs, wrt)
                ]
                rows.append(torch.cat(parts))
            R = torch.stack(rows)  # (n, n + m_θ): [J_y | ∂f/∂θ]
            Jy, Fp = R[:, :n], R[:, n:]
            if y0_cols:
                Fp = torch.cat([torch.zeros(n, n, dtype=R.dtype), Fp], 1)
            dS = Jy @ S + Fp
        return torch.cat([out, dS.reshape(-1)])

    return call


class _Sensitivities(torch.autograd.Function):
    """``ys`` (k, n) from the compiled augmented solve; backward: ``Σ_k g_k · S_k``."""

    @staticmethod
    def forward(ctx, ys, S, *inputs):
        ctx.save_for_backward(S)
        ctx.shapes = [x.shape for x in inputs]
        return ys.clone()

    @staticmethod
    def backward(ctx, g):
        (S,) = ctx.saved_tensors
        k = S.shape[0]
        gt = torch.einsum("kn,knm->m", g[:k].to(S.dtype), S)
        out, i = [], 0
        for shp in ctx.shapes:
            c = math.prod(shp)
            out.append(gt[i : i + c].reshape(shp))
            i += c
        return (None, None, *out)


class SensitivitySolution(_driver.CompiledSolution):
    """A compiled solution whose states (and ``sol(tq)``) carry forward-sensitivity gradients."""

    def _states(self, out):
        n, m, inputs = self._sens
        k = out.shape[0]
        return _Sensitivities.apply(out[:, :n], out[:, n:].reshape(k, n, m), *inputs)


def gradient_size(problem) -> tuple:
    """``(n, m)``: the states and the forward-sensitivity columns (``y0``, tensor arguments and
    captured tensors that require grad) of ``problem``."""
    n = problem.y0.numel()
    gm, tpos = _trace_f(problem, n)
    params, _ = _captured_parameters(gm)
    user = [problem.args[i] for i in tpos if problem.args[i].requires_grad]
    m = sum(x.numel() for x in user + params) + (n if problem.y0.requires_grad else 0)
    return n, m


def fits_forward(n: int, m: int, kind: str) -> bool:
    """Whether forward sensitivities take ``n`` states and ``m`` columns (see the limits
    above)."""
    return n + m <= MAX_STATES_AND_PARAMETERS and (kind == "erk" or n * (1 + m) <= MAX_IMPLICIT)


def augmented_module(problem, kind: str, who: str = "compile=True"):
    """The forward-sensitivity system of ``problem`` traced to a problem module.

    Returns ``None`` when nothing requires grad, else a dict: ``built``, ``new`` (as
    :func:`._driver.problem_module`), ``n``, ``m``, ``inputs`` (the tensors the ``m`` columns of
    ``S`` belong to, in order: ``y0`` when it requires grad, tensor arguments that do, captured
    tensors that do), ``args`` (the augmented system's arguments: the user's, then the captured
    parameters, detached) and ``S0``."""
    if problem.t.requires_grad:
        raise ValueError(
            f"t: {who} differentiates with respect to y0, tensor args and the tensors f "
            "captures (module parameters), not the output times; pass t.detach()"
            + (
                ", or sensealg=pn.InterpolatingAdjoint() (the compiled adjoint) for gradients "
                "with respect to t"
                if who == "compile=True"
                else ", or compile=False for gradients with respect to t"
            )
        )
    n = problem.y0.numel()
    gm, tpos = _trace_f(problem, n)
    params, names_index = _captured_parameters(gm)
    user = [problem.args[i] for i in tpos]
    arg_cols = [bool(u.requires_grad) for u in user]
    y0_cols = bool(problem.y0.requires_grad)
    inputs = ([problem.y0] if y0_cols else []) + [u for u, c in zip(user, arg_cols) if c]
    inputs += params
    m = sum(x.numel() for x in inputs)
    if m == 0:  # e.g. a module parameter that f does not use: no gradient to carry
        return None
    if not fits_forward(n, m, kind):
        raise ValueError(
            f"{who} computes gradients by forward sensitivities, whose cost grows as "
            f"n·(1 + m) (here n={n} states, m={m} parameters and initial values that require "
            f"grad); the compiled path takes n + m ≤ {MAX_STATES_AND_PARAMETERS}"
            + (
                f" and, for the implicit methods (their exact Jacobian of the augmented system "
                f"is traced), n·(1 + m) ≤ {MAX_IMPLICIT}"
                if kind != "erk"
                else ""
            )
            + "; use the compiled adjoint (sensealg=pn.InterpolatingAdjoint(), the default "
            "above these sizes), or let fewer tensors require grad"
        )
    call = _augmented_call(gm, n, tpos, arg_cols, y0_cols, names_index, len(params), m)
    args = tuple(problem.args) + tuple(p.detach() for p in params)
    key = (
        "forward-sensitivity",
        _driver.f_key(problem.f),
        problem.y0.dtype,
        kind != "erk",
        tuple(problem.y0.shape),
        problem.is_tuple,
        tuple(map(tuple, problem.shapes or [])),
        tuple(_driver._layout_key(a) for a in problem.args),
        y0_cols,
        tuple(arg_cols),
        tuple((tuple(p.shape), p.dtype) for p in params),
    )
    built, new = _driver.problem_module(
        key, call, n * (1 + m), args, kind != "erk", problem.y0.dtype, tracer=record
    )
    S0 = np.zeros((n, m))
    if y0_cols:
        S0[:, :n] = np.eye(n)
    return {
        "built": built,
        "new": new,
        "n": n,
        "m": m,
        "inputs": inputs,
        "args": args,
        "S0": S0,
    }


def solve_sensitivities(problem, solver, opts, kind: str, *, throw: bool):
    """``solve(..., compile=True)`` when a gradient is needed: the augmented system compiled,
    ``ys`` (and ``sol(tq)``) attached to autograd (see the module docstring)."""
    stats: dict = {}
    t_build = time.perf_counter()
    aug = augmented_module(problem, kind)
    if aug is None:
        with torch.no_grad():
            return _driver.solve_plain(problem, solver, opts, kind, throw=throw)
    built, n, m, inputs = aug["built"], aug["n"], aug["m"], aug["inputs"]
    mod, new_method = _driver._method_module(solver, kind)
    if aug["new"] or new_method:
        stats["compile_s"] = time.perf_counter() - t_build
    z0 = np.concatenate([problem.y0.detach().double().reshape(-1).numpy(), aug["S0"].reshape(-1)])
    rtol = _driver._tol_array(problem.rtol, n)
    atol = _driver._tol_array(problem.atol, n)
    arrays = [
        np.ascontiguousarray(a.detach().double().cpu().reshape(-1).numpy())
        for a in aug["args"]
        if isinstance(a, torch.Tensor)
    ]
    call_args = _driver.loop_arguments(
        problem,
        solver,
        opts,
        kind,
        built,
        mod,
        z0,
        np.concatenate([rtol, np.repeat(rtol, m)]),
        np.concatenate([atol, np.repeat(atol, m)]),
        arrays,
    )
    out = _driver.entry_point(mod.solve)(*call_args)
    stats["nsens"] = m
    k = int(out[1])
    zs = torch.from_numpy(out[0][:k])
    ys = _Sensitivities.apply(zs[:, :n], zs[:, n:].reshape(k, n, m), *inputs)
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
        cls=SensitivitySolution,
        attrs={"_sens": (n, m, inputs)},
    )
