"""Shared machinery of the continuous adjoints (Backsolve, Interpolating, Quadrature).

The adjoint of ``dy/dt = f(t, y, θ)`` with a loss on the states at the output times is

    da/dt = -aᵀ ∂f/∂y,    dg/dt = -aᵀ ∂f/∂θ,

integrated backwards from the last output time with ``a`` jumping by ``∂L/∂y(t_i)`` at every
output time; ``a(t_0) = dL/dy_0`` and ``g(t_0) = dL/dθ`` (Pontryagin; Chen et al. 2018, app. B).

This module holds what the three algorithms share: the autograd ``Function`` whose forward runs
the integrate loop without a graph and whose backward hands over to the algorithm, the gradient
targets (module parameters of ``f`` and tensors in ``args`` that require grad, flattened into one
channel block), the vector–Jacobian product (one ``torch.autograd.grad`` per adjoint right-hand
side evaluation gives the state and the parameter parts together), the options and tolerances of
the backward pass, the seminorm, dense-output lookup and Gauss quadrature rules. Every backward
pass steps with :func:`pyneuralode._loop.integrate`, the engine's only stepping code.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch

from .._loop import LoopOptions, integrate
from .._solution import SolveError
from ..controllers import initial_step

# ---------------------------------------------------------------------------------------------
# Validation of the constructor arguments shared by the adjoints


def check_checkpointing(cls_name: str, checkpointing, n_checkpoints) -> None:
    """Validate the ``checkpointing``/``n_checkpoints`` pair shared by the interpolating and quadrature adjoints."""
    if not isinstance(checkpointing, bool):
        raise TypeError(f"{cls_name}(checkpointing=...): expected True or False, got {checkpointing!r}")
    if n_checkpoints is not None:
        if not isinstance(n_checkpoints, int) or isinstance(n_checkpoints, bool) or n_checkpoints < 0:
            raise ValueError(f"{cls_name}(n_checkpoints=...): expected a non-negative int or None, got {n_checkpoints!r}")
        if not checkpointing:
            raise ValueError(f"{cls_name}: n_checkpoints needs checkpointing=True (checkpointing=False keeps the whole dense output instead)")


def check_common(cls_name: str, solver, rtol, atol):
    from ..solvers import AbstractSolver, lookup

    if solver is not None:
        if isinstance(solver, str):
            solver = lookup(solver)()
        elif isinstance(solver, type) and issubclass(solver, AbstractSolver):
            raise TypeError(f"{cls_name}(solver=...): got the class {solver.__name__}; pass an instance, e.g. solver=pn.{solver.__name__}()")
        elif not isinstance(solver, AbstractSolver):
            raise TypeError(f"{cls_name}(solver=...): expected a solver such as pn.Tsit5() (or None for the forward solver), got {type(solver).__name__}")
    out = []
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"{cls_name}({name}=...): expected a float or None (None = the forward {name}), got {type(v).__name__}") from None
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{cls_name}({name}=...): must be a finite non-negative number, got {v}")
        out.append(v)
    return solver, out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Gradient targets


class Targets:
    """The tensors gradients flow to besides ``y0``: ``adjoint_params`` (default: the parameters of
    the modules f reaches), then ``args`` tensors that require grad. ``who`` names the sensealg in
    the error raised for a tensor f uses that would otherwise get no gradient."""

    def __init__(self, problem, who: str):
        from ._captured import adjoint_targets

        self.params: List[torch.Tensor] = adjoint_targets(problem, who)
        self.arg_index = [i for i, a in enumerate(problem.args) if isinstance(a, torch.Tensor) and a.requires_grad]
        self.tensors: List[torch.Tensor] = self.params + [problem.args[i] for i in self.arg_index]
        self.numels = [t.numel() for t in self.tensors]
        self.n = sum(self.numels)

    def leaf_args(self, problem):
        """``args`` with the grad-requiring tensors replaced by detached leaves (the VJP's inputs)."""
        args = list(problem.args)
        leaves = []
        for i in self.arg_index:
            leaf = args[i].detach().requires_grad_(True)
            args[i] = leaf
            leaves.append(leaf)
        return tuple(args), leaves

    def split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        if self.n == 0:
            return []
        return [c.reshape(t.shape).to(t.dtype) for c, t in zip(flat.split(self.numels), self.tensors)]


# ---------------------------------------------------------------------------------------------
# The vector–Jacobian product


class VJP:
    """``(f(t, y), -aᵀ∂f/∂y, -aᵀ∂f/∂θ)`` with one ``torch.autograd.grad``.

    ``y`` and ``a`` have the internal state's shape. If called in grad mode on inputs that require
    grad (an implicit backward solver differentiating the adjoint right-hand side), the products
    are built with ``create_graph=True`` so that they are differentiable in turn.
    """

    def __init__(self, problem, targets: Targets):
        self.problem = problem
        self.args, leaves = targets.leaf_args(problem)
        self.param_inputs = targets.params + leaves
        self.has_params = targets.n > 0

    def __call__(self, t: float, y: torch.Tensor, a: torch.Tensor, with_params: bool = True):
        problem = self.problem
        create = torch.is_grad_enabled() and (y.requires_grad or a.requires_grad)
        with torch.enable_grad():
            y_in = y if create and y.requires_grad else y.detach().requires_grad_(True)
            fy = problem.call(problem.time(t), y_in, self.args)
            inputs = [y_in] + (self.param_inputs if with_params else [])
            if not fy.requires_grad:  # f depends neither on y nor on a target: zero products
                grads = tuple(torch.zeros_like(x) for x in inputs)
            elif create or fy.shape != a.shape or fy.dtype != a.dtype:
                grads = torch.autograd.grad(
                    fy, inputs, grad_outputs=-a, allow_unused=True, materialize_grads=True, create_graph=create
                )
            else:
                grads = _vjp_first_order(fy, inputs, -a)
        if not create:
            fy = fy.detach()
        return fy, grads[0], grads[1:]


def _vjp_first_order(out: torch.Tensor, inputs: List[torch.Tensor], cotangent: torch.Tensor):
    """``torch.autograd.grad(out, inputs, cotangent, allow_unused=True, materialize_grads=True)``
    for the hot path of the adjoints (shapes already match; no graph of the gradients).

    It calls the engine entry that ``torch.autograd.grad`` itself ends in, skipping that function's
    argument normalisation (~20 µs per call: a few percent of a small neural ODE's backward pass).
    Falls back to ``torch.autograd.grad`` where that entry is missing or its signature differs.
    """
    run = _engine_entry()
    if run is not None:
        grads = run((out,), (cotangent,), False, False, tuple(inputs), True, False)
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))
    return torch.autograd.grad(out, inputs, grad_outputs=cotangent, allow_unused=True, materialize_grads=True)


_ENGINE: list = []


def _engine_entry():
    """``torch.autograd.graph._engine_run_backward`` (what ``torch.autograd.grad`` itself calls), or
    None. Checked once against ``torch.autograd.grad`` on a tiny graph (an unused input included)."""
    if not _ENGINE:
        run = getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None)
        if run is not None:
            try:
                with torch.enable_grad():
                    x = torch.tensor([1.0, 2.0], requires_grad=True)
                    unused = torch.tensor(0.0, requires_grad=True)
                    g = run(((x * x),), (torch.tensor([1.0, -1.0]),), False, False, (x, unused), True, False)
                ok = (isinstance(g, tuple) and len(g) == 2 and g[1] is None
                      and torch.equal(g[0], torch.tensor([2.0, -4.0])))
            except Exception:  # noqa: BLE001 - any failure means: use the public API
                ok = False
            run = run if ok else None
        _ENGINE.append(run)
    return _ENGINE[0]


def flat_cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].reshape(-1)


# ---------------------------------------------------------------------------------------------
# Options, tolerances and the seminorm of the backward pass


def _tol_block(tol, n_state_blocks: int, n_extra: int, ref: torch.Tensor):
    """Tolerance for an augmented flat state [state-shaped × n_state_blocks, n_extra parameter channels]."""
    if not isinstance(tol, torch.Tensor):
        return tol
    t = tol.reshape(-1).to(dtype=ref.dtype, device=ref.device)
    parts = [t] * n_state_blocks
    if n_extra:
        parts.append(t.min().expand(n_extra))
    return torch.cat(parts)


def mixed_norm(blocks: Sequence[tuple]) -> Callable:
    """Error norm of an augmented state: the largest Hairer RMS norm over its blocks ``[(start, stop), ...]``.

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
        return torch.stack([torch.linalg.vector_norm(r[i:j]) / math.sqrt(j - i) for i, j in blocks]).max()

    return norm


def backward_setup(sensealg, solver, opts: LoopOptions, ref: torch.Tensor, n_state_blocks: int, extra: Sequence[int],
                   dense: bool, seminorm: bool = False):
    """The backward solver and :class:`LoopOptions` for the flat state ``[n_state_blocks × state, *extra]``.

    ``extra``: sizes of the parameter-gradient blocks (one per gradient target tensor). Step-size
    control uses :func:`mixed_norm` over all blocks (without the parameter blocks when ``seminorm``).
    """
    n_extra = sum(extra)
    bsolver = sensealg.solver if sensealg.solver is not None else solver
    adaptive = opts.adaptive
    if adaptive and not bsolver.adaptive_capable:
        if opts.dt is None:
            raise ValueError(
                f"{type(sensealg).__name__}(solver={type(bsolver).__name__}()): this backward solver has no error estimate and "
                f"the forward solve was adaptive; use an adaptive backward solver (e.g. pn.Tsit5()) or a fixed-step forward solve with dt=..."
            )
        adaptive = False
    rtol = sensealg.rtol if sensealg.rtol is not None else _tol_block(opts.rtol, n_state_blocks, n_extra, ref)
    atol = sensealg.atol if sensealg.atol is not None else _tol_block(opts.atol, n_state_blocks, n_extra, ref)
    ny = ref[0].numel()
    blocks = [(k * ny, (k + 1) * ny) for k in range(n_state_blocks)]
    if not seminorm:
        start = n_state_blocks * ny
        for n in extra:
            blocks.append((start, start + n))
            start += n
    norm = mixed_norm(blocks) if len(blocks) > 1 or n_extra else None
    bopts = dataclasses.replace(opts, rtol=rtol, atol=atol, adaptive=adaptive, dense=dense,
                                progress=opts.progress, norm=norm)
    return bsolver, bopts


def _initial_step(rhs, t0: float, z: torch.Tensor, t1: float, solver, opts, n: int, bstats: dict) -> float:
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


def run_backward(rhs, z, t0: float, t1: float, solver, opts, bstats: dict, who: str, hint: str = "",
                 n_state: Optional[int] = None, first_step: Optional[float] = None):
    """One backward integration over [t0, t1] with the engine's loop; a failure raises :class:`SolveError`.

    ``n_state``: the leading channels that are genuine ODE states (the rest are parameter-gradient
    integrals); the first step size is then estimated on those channels only. ``first_step``: a
    first step size known from the forward pass (used instead of the estimate).
    """
    if first_step is not None and first_step > 0 and opts.adaptive and opts.dt is None:
        opts = dataclasses.replace(opts, dt=min(first_step, abs(t1 - t0)))
    elif n_state is not None and n_state < z.numel() and opts.adaptive and opts.dt is None:
        opts = dataclasses.replace(opts, dt=_initial_step(rhs, t0, z, t1, solver, opts, n_state, bstats))
    res = integrate(rhs, z, [t0, t1], solver, opts, bstats)
    if not res.retcode.successful:
        raise SolveError(
            f"{who}: the backward (adjoint) pass failed on [{min(t0, t1):g}, {max(t0, t1):g}] with retcode "
            f"{res.retcode.value}: {res.message}{hint}",
            res.retcode, res.t_reached,
        )
    return res


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


# ---------------------------------------------------------------------------------------------
# Dense output lookup and quadrature rules


class DenseLookup:
    """``y(t)`` from a list of dense segments (forward or backward in time)."""

    def __init__(self, segments):
        if not segments:
            raise RuntimeError("internal: dense lookup over an empty trajectory")
        self.segments = segments
        self.direction = 1.0 if segments[0].dt > 0 else -1.0
        self.keys = [s.t0 * self.direction for s in segments]

    def __call__(self, t: float) -> torch.Tensor:
        k = bisect.bisect_right(self.keys, t * self.direction) - 1
        k = min(max(k, 0), len(self.segments) - 1)
        s = self.segments[k]
        return s.evaluate((t - s.t0) / s.dt)


def gauss_legendre(n: int):
    """Nodes and weights of the n-point Gauss–Legendre rule on [0, 1] (exact to degree 2n−1)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return [float(v) for v in (x + 1) / 2], [float(v) for v in w / 2]


# Gauss–Kronrod 7–15 (QUADPACK qk15): Kronrod nodes on [0, 1], their weights, and the weights of
# the embedded 7-point Gauss rule (on the odd Kronrod nodes; zero elsewhere).
_XGK = [0.991455371120812639206854697526329, 0.949107912342758524526189684047851, 0.864864423359769072789712788640926,
        0.741531185599394439863864773280788, 0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
        0.207784955007898467600689403773245, 0.0]
_WGK = [0.022935322010529224963732008058970, 0.063092092629978553290700663189204, 0.104790010322250183839876322541518,
        0.140653259715525918745189590510238, 0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
        0.204432940075298892414161999234649, 0.209482141084727828012999174891714]
_WG = [0.0, 0.129484966168869693270611432679082, 0.0, 0.279705391489276667901467771423780, 0.0,
       0.381830050505118944950369775488975, 0.0, 0.417959183673469387755102040816327]


def gauss_kronrod15():
    """(nodes, Kronrod weights, Gauss-7 weights) on [0, 1]; K15 exact to degree 22, G7 to degree 13."""
    xs, wk, wg = [], [], []
    for x, a, b in zip(_XGK[:-1], _WGK[:-1], _WG[:-1]):
        for s in (-1.0, 1.0):
            xs.append((1 + s * x) / 2)
            wk.append(a / 2)
            wg.append(b / 2)
    xs.append(0.5)
    wk.append(_WGK[-1] / 2)
    wg.append(_WG[-1] / 2)
    return xs, wk, wg


# ---------------------------------------------------------------------------------------------
# The autograd Function shared by the adjoints

_DOUBLE_BACKWARD = (
    "differentiating twice through {name} is not supported: its backward pass runs without a "
    "graph, so a second derivative would be wrong; use sensealg=pn.DirectAdjoint() (the whole "
    "graph) for higher-order derivatives (e.g. torch.autograd.grad(..., create_graph=True) twice)"
)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes a first derivative on and raises if it is differentiated again.

    Its inputs are the tensors the derivative depends on (the solve's inputs and the incoming
    cotangent), so every path of a second derivative — ``.backward()`` or ``torch.autograd.grad``
    with any ``inputs`` — runs through this backward and raises instead of returning zero.
    """

    @staticmethod
    def forward(ctx, message, value, *depends_on):
        ctx.message = message
        return value.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


@dataclasses.dataclass
class Pass:
    """What the backward pass needs from the forward pass."""

    problem: Any
    solver: Any
    opts: LoopOptions
    stats: dict
    targets: Targets
    saved: Any = None


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box, sensealg, problem, solver, opts, stats, targets, y0, *tensors):
        ys, loop, saved = sensealg._forward(problem, y0.detach(), solver, opts, stats, keep=True)
        box["loop"] = loop
        ctx.sensealg = sensealg
        ctx.pass_ = Pass(problem, solver, opts, stats, targets, saved)
        ctx.save_for_backward(ys)
        # the inputs only anchor the second-derivative error (their values are never read)
        ctx.inputs = (y0, *tensors)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        sensealg = ctx.sensealg
        double = torch.is_grad_enabled()
        (ys,) = ctx.saved_tensors
        inputs = ctx.inputs
        with torch.no_grad():
            grad_y0, grad_flat = sensealg._backward(ctx.pass_, ys, grad_ys.detach())
        grads = ctx.pass_.targets.split(grad_flat) if grad_flat is not None else [None] * len(ctx.pass_.targets.tensors)
        outs = [grad_y0, *grads]
        if double:  # create_graph=True: the first derivative, but no second one
            depends = [v for v in (*inputs, grad_ys) if v.requires_grad]
            if depends:
                message = _DOUBLE_BACKWARD.format(name=sensealg.name)
                outs = [None if v is None else _FirstOrderOnly.apply(message, v, *depends)
                        for v in outs]
        return (None,) * 7 + tuple(outs)


def run_adjoint(sensealg, problem, y0, solver, opts, stats):
    """``AbstractSensitivity.run`` for the continuous adjoints."""
    targets = Targets(problem, sensealg.name) if torch.is_grad_enabled() else None
    if targets is None or not (y0.requires_grad or any(t.requires_grad for t in targets.tensors)):
        with torch.no_grad():
            ys, loop, _ = sensealg._forward(problem, y0, solver, opts, stats, keep=False)
        return ys, loop
    box: dict = {}
    ys = _AdjointFunction.apply(box, sensealg, problem, solver, opts, stats, targets, y0, *targets.tensors)
    return ys, box["loop"]


# ---------------------------------------------------------------------------------------------
# Forward passes that keep what an interpolating backward pass needs, and its intervals


def checkpoint_times(t_list: List[float], n_checkpoints: Optional[int]):
    """Output times merged with ``n_checkpoints`` evenly spaced times; the merged index of each output time."""
    n = n_checkpoints or 0
    if n == 0 or len(t_list) < 2:
        return list(t_list), list(range(len(t_list)))
    t0, t1 = t_list[0], t_list[-1]
    tol = 1e-9 * abs(t1 - t0)
    extra = [float(x) for x in np.linspace(t0, t1, n + 2)[1:-1]]
    extra = [x for x in extra if min(abs(x - s) for s in t_list) > tol]
    direction = 1.0 if t1 > t0 else -1.0
    merged = sorted(set(t_list) | set(extra), key=lambda x: direction * x)
    pos = {x: j for j, x in enumerate(merged)}
    return merged, [pos[x] for x in t_list]


def forward_dense(problem, y0, solver, opts, stats):
    """Forward pass keeping the whole dense output (returned to the user only if ``opts.dense``)."""
    loop = integrate(problem.rhs(stats), y0, problem.t_list, solver, dataclasses.replace(opts, dense=True), stats)
    out = loop if opts.dense else dataclasses.replace(loop, segments=None)
    return torch.stack(loop.ys), out, ("dense", loop.segments)


def forward_checkpointed(problem, y0, solver, opts, stats, n_checkpoints):
    """Forward pass keeping the states at the checkpoints (output times + ``n_checkpoints`` evenly spaced).

    It also keeps the accepted step times (floats: the backward re-solves replay them). When the
    user asked for dense output (``opts.dense``), the whole of it is kept anyway and the backward
    pass reads it instead of re-solving.
    """
    merged, out_index = checkpoint_times(problem.t_list, n_checkpoints)
    loop = integrate(problem.rhs(stats), y0, merged, solver, dataclasses.replace(opts, record_steps=True), stats)
    kk = len(loop.ys)
    ys = [loop.ys[j] for j in out_index if j < kk]
    out = dataclasses.replace(loop, ys=ys, step_ts=None)
    if opts.dense:
        return torch.stack(ys), out, ("dense", loop.segments)
    output_of: List[Optional[int]] = [None] * kk
    for i, j in enumerate(out_index):
        if j < kk:
            output_of[j] = i
    saved = ("checkpoints", merged[:kk], list(loop.ys), output_of, loop.step_ts)
    return torch.stack(ys), out, saved


def replay_grid(step_ts: List[float], t0: float, t1: float) -> List[float]:
    """The forward pass's accepted step times inside (t0, t1), framed by t0 and t1.

    Re-solving a checkpoint interval on this grid replays the forward's accepted steps: no error
    estimates, no rejections, no starting-step heuristic. Times within 1e-12 of the interval's span
    of an end are dropped (no sliver steps).
    """
    direction = 1.0 if t1 > t0 else -1.0
    margin = 1e-12 * abs(t1 - t0)

    def key(s):  # increasing along step_ts
        return direction * s

    i = bisect.bisect_right(step_ts, direction * t0 + margin, key=key)
    j = bisect.bisect_left(step_ts, direction * t1 - margin, key=key)
    return [t0] + step_ts[i:j] + [t1]


def step_covering(starts_ends: List[float], t: float) -> Optional[float]:
    """Length of the forward step ``[s_k, s_k+1]`` (from the sorted-in-direction step times) that ends at or covers ``t``."""
    if len(starts_ends) < 2:
        return None
    direction = 1.0 if starts_ends[-1] > starts_ends[0] else -1.0
    k = bisect.bisect_left(starts_ends, direction * t, key=lambda s: direction * s)
    k = min(max(k, 1), len(starts_ends) - 1)
    return abs(starts_ends[k] - starts_ends[k - 1])


def backward_intervals(p: "Pass", m: int, bstats: dict, who: str):
    """Yield ``(t_hi, t_lo, lookup, out_lo, h_first)`` from output ``m`` back to the first time.

    ``lookup`` gives the forward state over [t_lo, t_hi] (the stored dense output, or a re-solve
    from the checkpoint at ``t_lo`` that replays the forward's accepted steps — adaptive for a
    multistep solver — counted as ``nfe_recompute``); ``out_lo`` is the output index at ``t_lo`` (its cotangent is added there)
    or ``None`` for a pure checkpoint; ``h_first`` is the length of the forward step that covers
    ``t_hi``: the backward pass starts with it instead of a starting-step heuristic (which costs
    two adjoint evaluations).
    """
    problem = p.problem
    if p.saved[0] == "dense":
        segs = p.saved[1]
        lookup = DenseLookup(segs)
        bounds = [s.t0 for s in segs] + [segs[-1].t0 + segs[-1].dt] if segs else []
        times = problem.t_list
        for i in range(m, 0, -1):
            yield times[i], times[i - 1], lookup, i - 1, step_covering(bounds, times[i])
        return
    _, times, states, output_of, step_ts = p.saved
    bounds = [times[0]] + list(step_ts)
    # A multistep method restarts from a checkpoint without its history, so it cannot replay the
    # forward's steps (they were taken at a higher order): it re-solves adaptively, to the tolerance.
    replay = not getattr(p.solver, "multistep", False)
    for j in range(output_of.index(m), 0, -1):
        rstats: dict = {}
        grid = replay_grid(step_ts, times[j - 1], times[j]) if replay else None
        fopts = dataclasses.replace(p.opts, dense=True, progress=False, grid=grid)
        floop = integrate(problem.rhs(bstats, key="nfe_recompute"), states[j - 1], [times[j - 1], times[j]], p.solver, fopts, rstats)
        if not floop.retcode.successful:
            raise SolveError(
                f"{who}: re-solving the state from the checkpoint at t={times[j - 1]:g} failed with retcode "
                f"{floop.retcode.value}: {floop.message}", floop.retcode, floop.t_reached,
            )
        lookup = DenseLookup(floop.segments)
        del floop
        yield times[j], times[j - 1], lookup, output_of[j - 1], step_covering(bounds, times[j])
        del lookup  # this interval's dense output is freed before the next re-solve
