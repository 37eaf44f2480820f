"""``steady_state``: fixed points ``z* = f(z*, *args)`` with implicit gradients, and their
statistics."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .._arguments import refuse_class, tolerance_pair
from .._solution import ReturnCode, SolveError
from ..sensitivity._resolve import resolve_sensealg
from .solvers import AbstractSteadyStateSolver, DynamicSS

__all__ = ["steady_state", "SteadyStateInfo", "SteadyStateError"]

#: ``_LOCAL.info``: the :class:`SteadyStateInfo` of this thread's most recent :func:`steady_state`
#: call, read as ``pn.last_stats`` (a convenience: a call in another thread never shows here; the
#: per-call record is ``steady_state(..., return_info=True)`` or ``DEQ.last_stats``).
_LOCAL = threading.local()


def __getattr__(name):
    if name == "last_stats":  # thread-local: see _LOCAL
        return getattr(_LOCAL, "info", None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class SteadyStateInfo:
    """What one steady-state solve did (also readable as a dict: ``info["nfe"]``).

    Forward: ``retcode`` (:class:`pn.ReturnCode`), ``solver``, ``nfe`` (evaluations of ``f``),
    ``iterations`` (solver iterations; accepted ODE steps for DynamicSS), ``naccept``/``nreject``
    and ``t`` (DynamicSS), ``residual`` (final ``‖f(z) − z‖∞``), ``abstol``/``reltol``,
    ``seconds``, ``message``. Backward (filled when ``.backward()`` runs, summed over backward
    calls): ``nbackward``, ``bwd_iterations`` (VJPs in the adjoint linear solves, or the phantom
    steps), ``bwd_residual``, ``bwd_retcode``; ``nfe_grad``: extra evaluations of ``f`` made to
    attach the gradient (1 for SteadyStateAdjoint, k for PhantomGradient).
    """

    solver: str = ""
    retcode: ReturnCode = ReturnCode.Failure
    nfe: int = 0
    iterations: int = 0
    naccept: int = 0
    nreject: int = 0
    t: float = 0.0
    residual: float = math.inf
    abstol: float = 0.0
    reltol: float = 0.0
    seconds: float = 0.0
    message: str = ""
    batch: int = 1
    sensealg: str = ""
    nfe_grad: int = 0
    nbackward: int = 0
    bwd_iterations: int = 0
    bwd_residual: float = 0.0
    bwd_retcode: ReturnCode | None = None

    @property
    def rtol(self) -> float:
        """``reltol`` under the native name."""
        return self.reltol

    @property
    def atol(self) -> float:
        """``abstol`` under the native name."""
        return self.abstol

    @property
    def converged(self) -> bool:
        return self.retcode.successful

    def record_backward(self, iterations: int, residual: float, ok: bool) -> None:
        self.nbackward += 1
        self.bwd_iterations += int(iterations)
        self.bwd_residual = float(residual)
        self.bwd_retcode = ReturnCode.Success if ok else ReturnCode.MaxIters

    def __getitem__(self, key):
        return getattr(self, key)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["retcode"] = str(self.retcode)
        d["bwd_retcode"] = None if self.bwd_retcode is None else str(self.bwd_retcode)
        d["converged"] = self.converged
        return d


class SteadyStateError(SolveError):
    """Raised by :func:`steady_state` (``throw=True``) when no fixed point was found; ``.info`` has
    the stats."""

    def __init__(self, message: str, info: SteadyStateInfo):
        super().__init__(message, info.retcode, info.t)
        self.info = info


#: an iterate whose ‖f(z)‖∞ exceeds RUNAWAY × max(‖z0‖∞, ‖f(z0)‖∞) has diverged (retcode Unstable)
RUNAWAY = 1e6
#: the relative tolerance counts the state's scale up to REL_SCALE × the start's scale
REL_SCALE = 10.0
_TINY = 1e-300


#: the defaults of ``steady_state`` (``DEQ`` has its own, looser ones)
RTOL, ATOL = 1e-6, 1e-8


def resolve_solver(solver) -> AbstractSteadyStateSolver:
    if solver is None:
        return DynamicSS()
    refuse_class("solver", solver)
    if isinstance(solver, AbstractSteadyStateSolver):
        return solver
    from ..solvers import AbstractSolver

    if isinstance(solver, AbstractSolver):
        raise TypeError(
            f"solver: {type(solver).__name__} is an ODE solver; wrap it as "
            f"solver=pn.DynamicSS(pn.{type(solver).__name__}())"
        )
    raise TypeError(
        "solver: expected pn.DynamicSS(...), pn.Anderson(), pn.Broyden() or "
        f"pn.FixedPointIteration(), got {type(solver).__name__}"
    )


def steady_state(
    f: Callable,
    z0: torch.Tensor,
    args: Sequence = (),
    solver: AbstractSteadyStateSolver | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    sensealg=None,
    throw: bool = True,
    return_info: bool = False,
    batch_dim: int | None = None,
    reltol: float | None = None,
    abstol: float | None = None,
):
    """Find ``z*`` with ``z* = f(z*, *args)``, starting from ``z0``; differentiable by the implicit
    function theorem.

    ``solver``: :class:`DynamicSS` (default, ``DynamicSS(Tsit5())``: integrate ``dz/dt = f(z) − z``
    to steady state), :class:`Anderson`, :class:`Broyden` or :class:`FixedPointIteration`.
    Converged when ``‖f(z) − z‖∞ <= atol`` or ``<= rtol·min(‖f(z)‖∞, 10·S0)`` (defaults
    ``rtol=1e-6``, ``atol=1e-8``; SciML's ``reltol``/``abstol`` are accepted as aliases) with
    ``S0 = max(‖z0‖∞, ‖f(z0)‖∞)`` the start's scale (so iterates running away from the start cannot
    meet
    the relative test); iterates with ``‖f(z)‖∞ > 1e6·S0`` stop with retcode ``Unstable``
    (``f(z) = z + 1`` has no fixed point). The forward solve runs
    under ``torch.no_grad``; then ``sensealg`` (default :class:`SteadyStateAdjoint`, or
    :class:`PhantomGradient`) makes the result differentiable w.r.t. the tensors in ``args``
    and every parameter ``f`` uses (not ``z0``: the fixed point does not depend on it).
    ``batch_dim=0`` says the first dimension stacks independent problems (Anderson/Broyden then
    mix per sample). On failure raises :class:`SteadyStateError` (``throw=True``) or returns the
    best iterate with ``info.retcode`` set.

    Returns ``z*`` (shaped like ``z0``), or ``(z*, info)`` with ``return_info=True`` (this call's
    :class:`SteadyStateInfo`). ``pn.last_stats`` is the info of the latest call *in this thread*
    (thread-local; ``None`` before the first).
    """
    if not callable(f):
        raise TypeError(
            f"f: must be callable as f(z, *args) returning the next iterate, got {type(f).__name__}"
        )
    if not isinstance(z0, torch.Tensor):
        raise TypeError(
            f"z0: expected a torch.Tensor, got {type(z0).__name__}; use torch.as_tensor(z0, "
            "dtype=torch.float64)"
        )
    if not z0.is_floating_point():
        raise TypeError(f"z0: dtype {z0.dtype} is not floating point; convert it, e.g. z0.double()")
    if not torch.isfinite(z0).all():
        raise ValueError("z0: contains NaN or Inf; the initial guess must be finite")
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"args: must be a tuple of extra arguments for f, got {type(args).__name__}; use "
            "args=(x,)"
        )
    args = tuple(args)
    rtol, atol = tolerance_pair(
        rtol, atol, reltol=reltol, abstol=abstol, default_rtol=RTOL, default_atol=ATOL
    )
    if atol == 0 and rtol == 0:
        raise ValueError("rtol, atol: at least one tolerance must be positive")
    solver = resolve_solver(solver)
    sensealg = resolve_sensealg(sensealg, steady=True)
    if not isinstance(throw, bool):
        raise TypeError(f"throw: expected True or False, got {throw!r}")
    batch = 1
    if batch_dim is not None:
        if batch_dim != 0:
            raise ValueError(
                f"batch_dim: only 0 (the leading dimension) or None is supported, got {batch_dim!r}"
            )
        if z0.ndim == 0:
            raise ValueError("batch_dim: z0 is a scalar; pass batch_dim=None")
        batch = z0.shape[0]

    info = SteadyStateInfo(
        solver=solver.name, abstol=atol, reltol=rtol, batch=batch, sensealg=sensealg.name
    )
    checked = []

    def fn(z):
        out = f(z, *args)
        if not checked:
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"f: returned {type(out).__name__}; f(z, *args) must return a tensor shaped "
                    "like z0"
                )
            if out.shape != z0.shape:
                raise ValueError(
                    f"f: returned shape {tuple(out.shape)}, but z0 has shape {tuple(z0.shape)}; a "
                    "fixed-point map must keep the state's shape"
                )
            if out.dtype != z0.dtype:
                raise TypeError(
                    f"f: returned dtype {out.dtype}, but z0 is {z0.dtype}; make f keep the state's "
                    f"dtype (e.g. cast its parameters with .to({z0.dtype}))"
                )
            checked.append(True)
        return out

    scale0: list = []  # the start's scale max(‖z0‖∞, ‖f(z0)‖∞): every solver checks z0 first
    ran_away: list = []

    def check(z, fz):
        if not z.numel():
            return True, 0.0
        r = float((fz - z).abs().max())
        if not math.isfinite(r):
            return False, math.inf
        size = float(fz.abs().max())
        if not scale0:
            scale0.append(max(float(z.abs().max()), size))
        if size > RUNAWAY * max(scale0[0], atol, _TINY):
            ran_away.append(size)
            return False, math.inf  # every solver stops on a non-finite residual
        # relative to the state's scale, but at most REL_SCALE × the start's: an iterate running
        # away from the start cannot meet it (f(z) = z + c would "converge" once ‖z‖ ≫ c/rtol)
        return r <= atol or r <= rtol * min(size, REL_SCALE * scale0[0]), r

    start = time.perf_counter()
    with torch.no_grad():
        z_star = solver.solve(fn, z0.detach(), check, info, batch)
    info.seconds = time.perf_counter() - start
    if ran_away:
        info.retcode = ReturnCode.Unstable
        info.message = (
            f"{solver.name}: the iterates ran away (‖f(z)‖∞ reached {ran_away[0]:.3g}, more than "
            f"{RUNAWAY:g} × the start's scale {scale0[0]:.3g}) without meeting the tolerances: f "
            "has no fixed point, or it repels this iteration (try pn.Broyden(), or a z0 closer to "
            "the fixed point)"
        )
    _LOCAL.info = info
    if not info.retcode.successful and throw:
        raise SteadyStateError(
            f"steady_state failed with retcode {info.retcode.value}: {info.message} (pass "
            "throw=False to get the best iterate and the retcode)",
            info,
        )
    if torch.is_grad_enabled():
        z = sensealg.attach(f, z_star, args, info)
    else:
        z = z_star
    return (z, info) if return_info else z
