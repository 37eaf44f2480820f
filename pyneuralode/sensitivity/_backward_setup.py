"""Options, tolerances and the seminorm of a continuous adjoint's backward pass, and the pass
itself.

Every backward pass steps with :func:`pyneuralode._loop.integrate`, the engine's only stepping code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from .._loop import LoopOptions, integrate
from .._solution import SolveError
from ..controllers import initial_step


def _tol_block(tol, n_state_blocks: int, n_extra: int, ref: torch.Tensor):
    """Tolerance for an augmented flat state [state-shaped × n_state_blocks, n_extra parameter
    channels]."""
    if not isinstance(tol, torch.Tensor):
        return tol
    t = tol.reshape(-1).to(dtype=ref.dtype, device=ref.device)
    parts = [t] * n_state_blocks
    if n_extra:
        parts.append(t.min().expand(n_extra))
    return torch.cat(parts)


def mixed_norm(blocks: Sequence[tuple]) -> Callable:
    """Error norm of an augmented state: the largest Hairer RMS norm over its blocks ``[(start,
    stop), ...]``.

    Every block (state, adjoint, the gradient of each parameter tensor) is held to the tolerance on
    its own, so a small block is not diluted by a large one (torchdiffeq's ``mixed`` norm for the
    adjoint). Channels in
    no block are left out of step-size control: leaving out the parameter-gradient block is the
    seminorm of Kidger, Chen & Lyons (ICML 2021) — those channels are pure integrals that never
    feed back into the dynamics.
    """
    blocks = [(i, j) for i, j in blocks if j > i]

    def norm(err, y0, y1, rtol, atol):
        r = err / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))
        if len(blocks) == 1:
            i, j = blocks[0]
            return torch.linalg.vector_norm(r[i:j]) / math.sqrt(j - i)
        return torch.stack(
            [torch.linalg.vector_norm(r[i:j]) / math.sqrt(j - i) for i, j in blocks]
        ).max()

    return norm


def backward_setup(
    sensealg,
    solver,
    opts: LoopOptions,
    ref: torch.Tensor,
    n_state_blocks: int,
    extra: Sequence[int],
    dense: bool,
    seminorm: bool = False,
):
    """The backward solver and :class:`LoopOptions` for the flat state ``[n_state_blocks × state,
    *extra]``.

    ``extra``: sizes of the parameter-gradient blocks (one per gradient target tensor). Step-size
    control uses :func:`mixed_norm` over all blocks (without the parameter blocks when
    ``seminorm``).
    """
    n_extra = sum(extra)
    bsolver = sensealg.solver if sensealg.solver is not None else solver
    adaptive = opts.adaptive
    if adaptive and not bsolver.adaptive_capable:
        if opts.dt is None:
            raise ValueError(
                f"{type(sensealg).__name__}(solver={type(bsolver).__name__}()): this backward "
                "solver has no error estimate and the forward solve was adaptive; use an adaptive "
                "backward solver (e.g. pn.Tsit5()) or a fixed-step forward solve with dt=..."
            )
        adaptive = False
    rtol = (
        sensealg.rtol
        if sensealg.rtol is not None
        else _tol_block(opts.rtol, n_state_blocks, n_extra, ref)
    )
    atol = (
        sensealg.atol
        if sensealg.atol is not None
        else _tol_block(opts.atol, n_state_blocks, n_extra, ref)
    )
    ny = ref[0].numel()
    blocks = [(k * ny, (k + 1) * ny) for k in range(n_state_blocks)]
    if not seminorm:
        start = n_state_blocks * ny
        for n in extra:
            blocks.append((start, start + n))
            start += n
    norm = mixed_norm(blocks) if len(blocks) > 1 or n_extra else None
    bopts = dataclasses.replace(
        opts,
        rtol=rtol,
        atol=atol,
        adaptive=adaptive,
        dense=dense,
        progress=opts.progress,
        norm=norm,
    )
    return bsolver, bopts


def _initial_step(
    rhs, t0: float, z: torch.Tensor, t1: float, solver, opts, n: int, bstats: dict
) -> float:
    """Hairer's starting step computed on the first ``n`` channels only.

    The parameter-gradient channels start at zero with scale ``atol`` while their derivative is
    not small, which makes the full-state heuristic pick a needlessly tiny first step (the step
    then grows slowly under PI control). Step-size control afterwards still uses ``opts.norm``.
    """
    f0 = rhs(t0, z)
    rest = z[n:]

    def part(t, y):
        return rhs(t, torch.cat([y, rest]))[:n]

    r = opts.rtol[:n] if isinstance(opts.rtol, torch.Tensor) else opts.rtol
    a = opts.atol[:n] if isinstance(opts.atol, torch.Tensor) else opts.atol
    order = min(solver.order, solver.error_order)
    dt = initial_step(part, t0, z[:n], f0[:n], 1.0 if t1 > t0 else -1.0, order, r, a, bstats)
    return min(dt, abs(t1 - t0))


def run_backward(
    rhs,
    z,
    t0: float,
    t1: float,
    solver,
    opts,
    bstats: dict,
    who: str,
    hint: str = "",
    n_state: int | None = None,
    first_step: float | None = None,
):
    """One backward integration over [t0, t1] with the engine's loop; a failure raises
    :class:`SolveError`.

    ``n_state``: the leading channels that are genuine ODE states (the rest are parameter-gradient
    integrals); the first step size is then estimated on those channels only. ``first_step``: a
    first step size known from the forward pass (used instead of the estimate).
    """
    if first_step is not None and first_step > 0 and opts.adaptive and opts.dt is None:
        opts = dataclasses.replace(opts, dt=min(first_step, abs(t1 - t0)))
    elif n_state is not None and n_state < z.numel() and opts.adaptive and opts.dt is None:
        opts = dataclasses.replace(
            opts, dt=_initial_step(rhs, t0, z, t1, solver, opts, n_state, bstats)
        )
    res = integrate(rhs, z, [t0, t1], solver, opts, bstats)
    where = f"[{min(t0, t1):g}, {max(t0, t1):g}]"
    check_pass(res, f"{who}: the backward (adjoint) pass on {where}", hint)
    return res


def check_pass(loop, what: str, hint: str = "", ok: bool = True) -> None:
    """Raise :class:`SolveError` ("``what`` failed with retcode ...") if a run of the loop inside a
    backward pass failed (or ``ok`` is false)."""
    if not (ok and loop.retcode.successful):
        raise SolveError(
            f"{what} failed with retcode {loop.retcode.value}: {loop.message}{hint}",
            loop.retcode,
            loop.t_reached,
        )


def merge_stats(stats: dict, bstats: dict, key: str = "adjoint"):
    """Add a backward pass's counters to the solution's stats: ``nfe_*`` as they are, the loop's and
    solver's counters (``naccept``, ``nreject``, ``njac``, ...) as ``naccept_adjoint`` etc."""
    for k in ("naccept", "nreject"):
        stats[f"{k}_{key}"] = stats.get(f"{k}_{key}", 0) + bstats.get(k, 0)
    for k, v in bstats.items():
        if k.startswith("nfe"):
            stats[k] = stats.get(k, 0) + v
        elif k not in ("naccept", "nreject") and isinstance(v, (int, float)):
            stats[f"{k}_{key}"] = stats.get(f"{k}_{key}", 0) + v


def last_nonzero(grad_ys: torch.Tensor) -> int:
    """Index of the last output time whose cotangent is not zero (-1 if all are zero)."""
    nz = grad_ys.reshape(grad_ys.shape[0], -1).ne(0).any(dim=1).nonzero()
    return int(nz[-1]) if nz.numel() else -1
