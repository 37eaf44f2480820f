"""Ensembles on the compiled path: many independent systems in one compiled call.

``solve_ensemble(f, y0, t, solver, args=...)`` takes the same batched ``f`` as the native
``batched=True`` option (``y0`` shaped ``(B, ...)``, ``f(t, Y, *args)`` acting row by row, tensor
arguments with a leading dimension ``B`` holding one row per system), so that switching between
``pn.solve(f, Y0, t, pn.Rodas5P(batched=True), args=(K,))`` and the compiled ensemble is one line;
``pn.solve(..., compile=True)`` with a ``batched=True`` solver runs it too. Unlike the native
batched solve (one step sequence for the whole batch), every system takes its own steps, with its
own return code and statistics.

``f`` is traced on one row; the generated ``solve_ensemble`` calls the compiled single-system loop
once per row (``numba.prange`` over the rows with ``parallel=True``). Before the first solve the
compiled per-row ``f`` is compared with ``f`` on the whole batch at ``(t0, y0)``, which catches an
``f`` whose rows interact or a shared argument that happens to have ``B`` rows.

Gradients: with ``y0``, an argument or a tensor ``f`` captures requiring grad, every system
integrates its forward sensitivities with respect to its own rows of ``y0`` and of the per-system
arguments and to the shared tensors (:mod:`._sensitivity`'s augmented system, traced on one row);
the backward pass gives a per-system input its rows and sums the systems' contributions for a
shared one.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .._loop_options import StepSettings, options_for
from .._problem import ODEProblem
from .._solution import ReturnCode, SolveError
from ..solvers import Tsit5
from ..solvers._resolve import resolve_solver
from . import _codegen, _driver, _sensitivity

_ENSEMBLE = """
from numba import prange

from {main} import solve


@njit((A1, A2, A2, A2, types.boolean, F8, F8, F8, F8, types.int64, types.boolean, F8, F8, F8,
       F8, F8, F8, F8, types.boolean, types.boolean, A1, RHS, JAC, A2, A2), cache=True,
      parallel={parallel})
def solve_ensemble(t_out, Y0, RTOL, ATOL, adaptive, dt_fixed, h_init, dtmax_in, dtmin_in,
                   max_steps, pred, beta1, beta2, safety, fmin, fmax, q, start_order, nonauto,
                   keep_dense, opt, rhs, jac, PF, PJ):
    B = Y0.shape[0]
    n = Y0.shape[1]
    n_out = t_out.shape[0]
    YS = np.full((B, n_out, n), np.nan)
    RC = np.zeros(B, dtype=np.int64)
    TR = np.zeros(B)
    ST = np.zeros((B, {nstats}), dtype=np.int64)
    for b in prange(B):
        out = solve(t_out, Y0[b], RTOL[b], ATOL[b], adaptive, dt_fixed, h_init, dtmax_in,
                    dtmin_in, max_steps, pred, beta1, beta2, safety, fmin, fmax, q, start_order,
                    nonauto, False, opt, rhs, jac, PF[b], PJ[b])
        ys = out[0]
        for i in range(out[1]):
            for j in range(n):
                YS[b, i, j] = ys[i, j]
        RC[b] = out[2]
        TR[b] = out[3]
        for j in range({nstats}):
            ST[b, j] = out[4][j]
    return YS, RC, TR, ST


@njit((F8, A2, A2, RHS, A2), cache=True)
def rows_rhs(t, Y0, PF, rhs, OUT):
    for b in range(Y0.shape[0]):
        rhs(t, Y0[b], OUT[b], PF[b])
"""

#: (method module name, parallel) -> the ensemble module (one per method, whatever f)
_WRAPPERS: dict = {}


class EnsembleSolution(_driver.CompiledSolution):
    """The solution of an ensemble: ``ys`` shaped ``(len(t), B, ...)`` (as the native batched
    solve; NaN after a failed system's last saved time), ``retcodes`` (one per system),
    ``retcode`` (``Success`` when every system succeeded, else the first failure's code),
    ``stats`` (totals) and ``system_stats`` (int64 tensors of length B: the statistics one
    compiled solve of the method reports, e.g. ``nfe``, ``naccept``, ``nreject``, ``njac``),
    ``t_reached_each``.
    """

    def __call__(self, tq):
        raise ValueError(
            "sol(tq): a compiled ensemble keeps the states at the output times only; pass the "
            "times you need in t, or solve one system with pn.solve(..., compile=True) for its "
            "dense output"
        )


def _per_system(args, B: int) -> list:
    return [isinstance(a, torch.Tensor) and a.ndim >= 1 and a.shape[0] == B for a in args]


def solve_ensemble(
    f,
    y0,
    t,
    solver=None,
    *,
    args=(),
    rtol=1e-6,
    atol=1e-9,
    dt=None,
    adaptive: bool = True,
    max_steps: int = 100_000,
    controller=None,
    dtmin=None,
    dtmax=None,
    throw: bool = True,
    parallel: bool = True,
):
    """Solve ``B`` independent systems ``dy_b/dt = f(t, y_b, *args_b)`` in one compiled call.

    ``y0`` shaped ``(B, ...)``; ``f(t, Y, *args)`` the batched right-hand side (rows
    independent), as for ``batched=True``; a tensor argument whose first dimension is ``B``
    gives one row to each system, the others are shared. ``rtol``/``atol`` broadcast to ``y0``.
    ``parallel``: rows over numba's threads (``prange``). Float64 CPU. Gradients (``y0``, tensor
    arguments or tensors ``f`` captures requiring grad) come from every system's forward
    sensitivities, as for one system (:mod:`._sensitivity`). Returns an
    :class:`EnsembleSolution`; with ``throw=True`` a failed system raises :class:`SolveError`.
    """
    solver = resolve_solver(solver, Tsit5)
    if not isinstance(y0, torch.Tensor) or y0.ndim < 2:
        raise ValueError(
            "y0: solve_ensemble takes the initial states of B systems as one tensor shaped "
            f"(B, n) or (B, ...), got {type(y0).__name__}"
            + (f" of shape {tuple(y0.shape)}" if isinstance(y0, torch.Tensor) else "")
            + "; for one system use pn.solve(..., compile=True)"
        )
    if not isinstance(parallel, bool):
        raise TypeError(f"parallel: expected True or False, got {parallel!r}")
    problem = ODEProblem(f, y0, t, args=args, rtol=rtol, atol=atol)
    steps = StepSettings(dt, adaptive, max_steps, controller, dtmin, dtmax)
    opts = options_for(problem, solver, steps)
    return run_ensemble(problem, solver, opts, throw=throw, parallel=parallel)


def run_ensemble(problem: ODEProblem, solver, opts, *, throw: bool, parallel: bool = True):
    """The ensemble solve of a validated problem (also ``pn.solve(..., compile=True)`` with a
    ``batched=True`` solver)."""
    if not _driver.numba_available():
        raise ImportError(
            "compile=True needs numba: pip install 'pyneuralode[compiled]' (or pip install numba), "
            "or pass compile=False"
        )
    kind = _driver._method_kind(solver)
    if kind != "erk":
        _driver._check_rosenbrock_options(solver, allow_batched=True)
    Y0 = problem.y0
    if Y0.dtype != torch.float64 or Y0.device.type != "cpu":
        raise TypeError(
            f"y0: the compiled ensemble runs in float64 on the CPU, got {Y0.dtype} on "
            f"{Y0.device}; pass y0.double() (and float64 arguments), or compile=False"
        )
    if problem.is_tuple:
        raise TypeError("y0: the compiled ensemble takes one tensor shaped (B, ...), not a tuple")
    B = Y0.shape[0]
    row_shape = (1, *Y0.shape[1:])
    n = math.prod(row_shape)
    per = _per_system(problem.args, B)
    row_args = tuple(a[:1] if p else a for a, p in zip(problem.args, per))
    key = (
        "ensemble-row",
        _driver.f_key(problem.f),
        kind != "erk",
        row_shape,
        tuple(_driver._layout_key(a) for a in row_args),
        tuple(per),
    )

    def call(t, y, a):
        return problem.f(t, y.reshape(row_shape), *a)

    stats: dict = {}
    t_build = time.perf_counter()
    aug = None
    if torch.is_grad_enabled():  # forward sensitivities of every system (see _sensitivity)
        row = ODEProblem(problem.f, Y0[:1], problem.t, args=row_args)
        aug = _sensitivity.augmented_module(row, kind, who="the compiled ensemble")
    if aug is None:
        built, new = _driver.problem_module(key, call, n, row_args, kind != "erk", torch.float64)
        m, extra = 0, []
    else:
        built, new, m = aug["built"], aug["new"], aug["m"]
        extra = list(aug["args"][len(row_args) :])  # captured parameters: shared by the systems
    mod, new_method = _driver._method_module(solver, kind)
    wkey = (mod.__name__, parallel)
    emod = _WRAPPERS.get(wkey)
    new_wrapper = emod is None
    if new_wrapper:
        emod = _WRAPPERS[wkey] = _codegen.load_module(
            _codegen._HEADER
            + _ENSEMBLE.format(main=mod.__name__, parallel=parallel, nstats=len(_codegen.STATS))
        )
    # the parameter arrays of every system: its rows of the per-system arguments, the shared
    # ones, then the traced constants (the order the translator reads them in)
    per_arrays = []
    for a, p in zip(problem.args, per):
        if isinstance(a, torch.Tensor):
            x = a.detach().double().cpu()
            per_arrays.append(
                x.reshape(B, -1).numpy()
                if p
                else np.broadcast_to(x.reshape(1, -1).numpy(), (B, x.numel()))
            )
    for x in extra:
        x = x.detach().double().cpu()
        per_arrays.append(np.broadcast_to(x.reshape(1, -1).numpy(), (B, x.numel())))

    def table(consts):
        parts = per_arrays + [
            np.broadcast_to(c.detach().double().cpu().reshape(1, -1).numpy(), (B, c.numel()))
            for c in consts
        ]
        if not parts:
            return np.zeros((B, 0))
        return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float64)

    PF, PJ = table(built["kf"]), table(built["kj"])
    y0_rows = np.ascontiguousarray(Y0.detach().reshape(B, n).numpy())
    tols = [
        np.ascontiguousarray(
            np.broadcast_to(
                tol.detach().double().cpu().numpy()
                if isinstance(tol, torch.Tensor)
                else np.float64(tol),
                tuple(Y0.shape),
            ).reshape(B, n)
        )
        for tol in (problem.rtol, problem.atol)
    ]
    if m:  # z = [y, vec(S)]: S(t0) = [I | 0]; the rows of S take their component's tolerances
        y0_rows = np.ascontiguousarray(
            np.concatenate([y0_rows, np.broadcast_to(aug["S0"].reshape(1, -1), (B, n * m))], 1)
        )
        tols = [np.ascontiguousarray(np.concatenate([x, np.repeat(x, m, axis=1)], 1)) for x in tols]
    one = _driver.loop_arguments(
        problem, solver, opts, kind, built, mod, y0_rows[0], tols[0][0], tols[1][0], []
    )
    call_args = (
        one[0],
        y0_rows,
        tols[0],
        tols[1],
        *one[4:19],
        False,
        one[20],
        one[21],
        one[22],
        PF,
        PJ,
    )
    _check_rows(problem, emod, one[21], y0_rows, PF, B, per, n)
    if new or new_method or new_wrapper:  # first use in the process: trace, compile or load
        stats["compile_s"] = time.perf_counter() - t_build
    YS, RC, TR, ST = _driver.entry_point(emod.solve_ensemble)(*call_args)
    # the names a single solve reports
    names = list(_driver.stats_of(kind, range(len(_codegen.STATS)), {}))
    system_stats = {
        k: torch.from_numpy(np.ascontiguousarray(ST[:, _codegen.STATS.index(k)])) for k in names
    }
    stats.update({k: int(v.sum()) for k, v in system_stats.items()})
    retcodes = [ReturnCode(_codegen.RETCODES[int(rc)]) for rc in RC]
    bad = [b for b, r in enumerate(retcodes) if not r.successful]
    retcode = retcodes[bad[0]] if bad else ReturnCode("Success")
    ys = torch.from_numpy(YS[:, :, :n]).permute(1, 0, 2)
    if m:
        full = [problem.y0] if problem.y0.requires_grad else []
        flags = [True] if problem.y0.requires_grad else []
        for a, p in zip(problem.args, per):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                full.append(a)
                flags.append(p)
        full += aug["inputs"][len(full) :]  # the captured parameters
        flags += [False] * (len(full) - len(flags))
        S = torch.from_numpy(YS[:, :, n:]).reshape(B, YS.shape[1], n, m)
        ys = _EnsembleSensitivities.apply(ys, S, tuple(flags), *full)
        stats["nsens"] = m
    ys = ys.reshape(problem.t.shape[0], *Y0.shape)
    sol = EnsembleSolution(
        ts=problem.t,
        ys=ys,
        retcode=retcode,
        stats=stats,
        segments=None,
        unflatten=None,
        t_reached=float(TR.min()) if B else float(problem.t[-1]),
        solver=solver,
    )
    sol.retcodes = retcodes
    sol.system_stats = system_stats
    sol.t_reached_each = torch.from_numpy(TR)
    if bad and throw:
        b = bad[0]
        msg = _driver._MESSAGES[retcodes[b].value].format(max_steps=opts.max_steps, t=float(TR[b]))
        raise SolveError(
            f"solve failed for {len(bad)} of {B} systems (first: system {b}, retcode "
            f"{retcodes[b].value}: {msg}); pass throw=False to get the partial solution and "
            "sol.retcodes",
            retcodes[b],
            float(TR[b]),
            sol,
        )
    return sol


class _EnsembleSensitivities(torch.autograd.Function):
    """``ys`` (T, B, n) of an ensemble with sensitivities ``S`` (B, T, n, m): the gradient of
    a per-system input (``y0``, an argument with B rows) row by row, of a shared one summed."""

    @staticmethod
    def forward(ctx, ys, S, per, *inputs):
        ctx.save_for_backward(S)
        ctx.per = per
        ctx.shapes = [x.shape for x in inputs]
        return ys.clone()

    @staticmethod
    def backward(ctx, g):
        (S,) = ctx.saved_tensors
        G = torch.einsum("tbn,btnm->bm", g.to(S.dtype), S)
        out, i = [], 0
        for p, shp in zip(ctx.per, ctx.shapes):
            c = math.prod(shp) // (shp[0] if p else 1)
            part = G[:, i : i + c]
            out.append(part.reshape(shp) if p else part.sum(0).reshape(shp))
            i += c
        return (None, None, None, *out)


def _check_rows(problem, emod, rhs, y0_rows, PF, B, per, n):
    """The compiled per-row f against f on the whole batch at (t0, y0): rows must not interact
    and the per-system arguments must be the ones with B rows."""
    with torch.no_grad():
        full = problem.f(problem.t[0], problem.y0.detach(), *problem.args)
    if not isinstance(full, torch.Tensor) or full.shape != problem.y0.shape:
        raise ValueError(
            f"f: on the whole batch returned {type(full).__name__}"
            + (f" of shape {tuple(full.shape)}" if isinstance(full, torch.Tensor) else "")
            + f"; it must return dy/dt shaped like y0 {tuple(problem.y0.shape)}"
        )
    full = full.detach().double().reshape(B, n).numpy()
    out = np.empty(y0_rows.shape)
    _driver.entry_point(emod.rows_rhs)(float(problem.t[0]), y0_rows, PF, rhs, out)
    out = out[:, :n]  # with sensitivities: f is the first n components
    fin = np.isfinite(full)
    diff = np.where(fin, np.abs(out - np.where(fin, full, 0.0)), 0.0).max(axis=1)
    scale = np.where(fin, np.abs(full), 0.0).max(axis=1) + 1e-300
    rel = np.where((fin == np.isfinite(out)).all(axis=1), diff / scale, np.inf)
    bad = int(np.argmax(rel)) if B else 0
    if B and not rel[bad] <= 1e-10:
        rows = [i for i, p in enumerate(per) if p]
        raise ValueError(
            f"f: row {bad} of f(t0, y0, *args) on the whole batch differs from f on that row "
            f"alone (relative difference {rel[bad]:.2e}); the compiled ensemble needs f to act "
            "on each row independently, with the tensor arguments whose first dimension is "
            f"B={B} (here args {rows}) holding one row per system; give a shared argument "
            "another leading dimension (e.g. unsqueeze(0)), or use compile=False"
        )
