"""The per-row decisions of per-sample stepping as one compiled kernel for CPU tensors.

:func:`pyneuralode._loop.integrate_per_sample` decides, after every batched step, each row's
error norm, accept/reject, controller factor, next step size, time, stop and return code. On a
GPU those are a few dozen element-wise tensor operations launched without host waits; on a CPU
every one of them is a torch dispatch costing more than its arithmetic on a (B,) vector. Here
they run as one numba kernel over numpy arrays that share memory with the loop's tensors (no
copies), row by row in the scalar loop's own floating-point operations: the error norm as
:func:`~pyneuralode.solvers._ops.rms_norm_small`'s host norm and the controllers' ``factor``
(:class:`~pyneuralode.controllers.PIController`, :class:`~pyneuralode.controllers.
PredictiveController`), so a row takes the steps its independent solve takes.

Used for explicit Runge–Kutta methods with scalar tolerances and those two controllers when numba
is installed (the ``compiled`` extra); everything else keeps the tensor decisions of the loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .controllers import PIController, PredictiveController

#: switch for tests: False keeps every solve on the tensor decisions
ENABLED = True

_EPS = 2.220446049250313e-16

# rows of the float64 state ``F`` (B columns)
T, T_NEXT, T_END, DT, DTMAX, DT_FLOOR, H, ERR_PREV, H_ACC, ERRN = range(10)
# rows of the int64 state ``N``
NACC, ATTEMPTS, CODES, NEXT_OUT, NFE, N_CROSS, N_INNER = range(7)
# rows of the bool state ``M``
RUNNING, ACCEPT, STEPPED, DONE, ACCEPTED_LAST, LAST, FAIL = range(7)

_kernels = None


def _compile():
    """The two kernels, compiled on first use (numba's on-disk cache keeps them)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    from numba import njit

    @njit(cache=True, nogil=True)
    def prepare(F, M, hy, direction):  # pragma: no cover - compiled
        """The step about to be taken: each row's ``h`` (a stopped row: t_end = t, so 0),
        ``last`` (the step reaches t_end; stretched by up to 0.1% rather than leave a sliver)
        and ``hy`` (h in the state's dtype)."""
        for b in range(F.shape[1]):
            t = F[T_NEXT, b]
            F[T, b] = t
            remaining = F[T_END, b] - t if direction > 0 else t - F[T_END, b]
            dt = F[DT, b]
            last = dt > remaining * 0.999
            habs = remaining if last else dt
            h = habs if direction > 0 else -habs
            M[LAST, b] = last
            F[H, b] = h
            hy[b] = h

    @njit(cache=True, nogil=True)
    def decide(
        F,
        N,
        M,
        y0,
        y1,
        err,
        key,
        rtol,
        atol,
        inv_sqrt_n,
        kind,
        b1,
        b2,
        safety,
        lo,
        hi,
        q_inv,
        direction,
        t_nonneg,
        dtmin_user,
        k,
        max_steps,
        only_end,
        history,
    ):  # pragma: no cover - compiled
        """One step's decisions for every row; returns (rows running, rows failed, the most
        outputs a row passed, the most outputs strictly inside a row's step)."""
        B, n = y0.shape
        T_out = key.shape[1]
        n_run = n_fail = n_out_max = n_inner_max = 0
        eps4 = 4.0 * _EPS
        for b in range(B):
            running = M[RUNNING, b]
            # the scalar loop's host norm: Σ (e / (atol + rtol·max(|y0|, |y1|)))², in float64
            s = 0.0
            for i in range(n):
                a = abs(np.float64(y0[b, i]))
                c = abs(np.float64(y1[b, i]))
                r = np.float64(err[b, i]) / (atol + rtol * (a if a > c else c))
                s += r * r
            errn = math.sqrt(s) * inv_sqrt_n
            F[ERRN, b] = errn
            accept = errn <= 1.0 and running  # NaN/Inf fail the test
            h = F[H, b]
            habs = abs(h)
            acc_last = M[ACCEPTED_LAST, b]
            # the controllers' scalar ``factor``
            if kind == 0:  # PIController
                if errn == 0.0:
                    fac = hi
                elif not math.isfinite(errn):
                    fac = lo
                else:
                    fac = safety * errn ** (-b1) * (F[ERR_PREV, b] ** b2 if errn <= 1.0 else 1.0)
                    fac = min(hi, max(lo, fac))
                    if not acc_last:
                        fac = min(fac, 1.0)
            else:  # PredictiveController
                if errn == 0.0:
                    fac = hi if acc_last else 1.0
                elif not math.isfinite(errn):
                    fac = lo
                else:
                    fac = min(hi, max(lo, safety * errn ** (-q_inv)))
                    ratio = habs / F[H_ACC, b]
                    if errn <= 1.0 and not math.isnan(ratio):
                        ep = F[ERR_PREV, b]
                        gus = (
                            safety * ratio * ((ep if ep > 1e-2 else 1e-2) / (errn * errn)) ** q_inv
                        )
                        fac = min(fac, min(hi, max(lo, gus)))
                    if not acc_last:
                        fac = min(fac, 1.0)
            if history and accept:
                F[ERR_PREV, b] = errn if errn > 1e-4 else 1e-4
                F[H_ACC, b] = habs
            dt = habs * fac
            dtmax = F[DTMAX, b]
            dt = dt if dt < dtmax else dtmax
            F[DT, b] = dt
            M[ACCEPTED_LAST, b] = accept
            t = F[T, b]
            last = M[LAST, b]
            t_new = F[T_END, b] if last else t + h
            stuck = False
            if not math.isnan(dtmin_user):  # a user's dtmin may allow steps below t's resolution
                stuck = accept and t_new == t
                accept = accept and not stuck
            if accept:
                N[NACC, b] += 1
                t = t_new
            F[T_NEXT, b] = t
            done = accept and last
            cont = running and not done
            if math.isnan(dtmin_user):
                at = t if t_nonneg else abs(t)
                small = dt < (at if at > F[DT_FLOOR, b] else F[DT_FLOOR, b]) * eps4
            else:
                small = dt < dtmin_user
            fail = (cont if k >= max_steps else cont and small) or stuck
            running_next = cont and not fail
            M[ACCEPT, b] = accept
            M[STEPPED, b] = running
            M[DONE, b] = done
            M[FAIL, b] = fail
            M[RUNNING, b] = running_next
            if running and not running_next:  # stopped: its attempt count
                N[ATTEMPTS, b] = k
            if fail:  # DtLessThanMin (Unstable when the error was NaN/Inf), then MaxIters
                code = (2 if math.isfinite(errn) else 3) if small else 1
                N[CODES, b] += 2 if stuck else code
                F[T_END, b] = t
                n_fail += 1
            if running_next:
                n_run += 1
            if not only_end:  # outputs passed: key[b, next_out : next_out + n_cross]
                nc = ni = 0
                if accept:
                    kt = direction * t_new
                    j = N[NEXT_OUT, b]
                    while j < T_out and key[b, j] < kt:
                        j += 1
                    ni = j - N[NEXT_OUT, b]
                    while j < T_out and key[b, j] <= kt:
                        j += 1
                    nc = j - N[NEXT_OUT, b]
                N[N_CROSS, b] = nc
                N[N_INNER, b] = ni
                n_out_max = max(n_out_max, nc)
                n_inner_max = max(n_inner_max, ni)
        return n_run, n_fail, n_out_max, n_inner_max

    _kernels = (prepare, decide)
    return _kernels


def applies(solver, ctrl, rtol, atol, y: torch.Tensor) -> bool:
    """Whether the compiled decisions serve this solve."""
    if not ENABLED or y.device.type != "cpu" or y.dtype not in (torch.float32, torch.float64):
        return False
    if isinstance(rtol, torch.Tensor) or isinstance(atol, torch.Tensor):
        return False
    if type(ctrl) not in (PIController, PredictiveController):
        return False
    from .solvers._erk import ExplicitRK

    if not isinstance(solver, ExplicitRK):
        return False
    try:
        _compile()
    except ImportError:
        return False
    return True


class HostRows:
    """The per-row control state of a per-sample solve as numpy arrays (``F`` float64, ``N``
    int64, ``M`` bool; one column per stepped row) with torch views of the rows the step's field
    and the loop's tensor code read (``t``, ``h``, ``hy``, ``accept``, ...)."""

    def __init__(self, t, t_end, dt, dtmax, dt_floor, nfe, y, ctrl, q, direction):
        B = t.shape[0]
        self.F = np.zeros((10, B))
        self.N = np.zeros((7, B), dtype=np.int64)
        self.M = np.zeros((7, B), dtype=np.bool_)
        F, M = self.F, self.M
        F[T_NEXT] = t.numpy()
        F[T_END] = t_end.numpy()
        F[DT] = dt.numpy()
        F[DTMAX] = dtmax.numpy()
        F[DT_FLOOR] = dt_floor.numpy()
        F[ERR_PREV] = 1.0
        F[H_ACC] = math.nan
        M[RUNNING] = F[T_END] != F[T_NEXT]
        M[ACCEPTED_LAST] = True
        self.N[NEXT_OUT] = 1
        self.N[NFE] = nfe.numpy()
        self.np_dtype = np.float32 if y.dtype == torch.float32 else np.float64
        self.rshape = (-1,) + (1,) * (y.dim() - 1)
        self.direction = direction
        if isinstance(ctrl, PIController):
            self.ctrl = (
                0,
                ctrl.beta1 / q,
                ctrl.beta2 / q,
                ctrl.safety,
                ctrl.factor_min,
                ctrl.factor_max,
                1.0 / q,
            )
        else:
            self.ctrl = (1, 0.0, 0.0, ctrl.safety, ctrl.factor_min, ctrl.factor_max, 1.0 / q)
        self.prepare_kernel, self.decide_kernel = _compile()
        self._views()

    def _views(self):
        B = self.F.shape[1]
        self.hy_np = np.zeros(B, dtype=self.np_dtype)
        self.hy = torch.from_numpy(self.hy_np).view(self.rshape)
        self.t = torch.from_numpy(self.F[T])
        self.h = torch.from_numpy(self.F[H])
        self.accept = torch.from_numpy(self.M[ACCEPT])
        self.n_cross = torch.from_numpy(self.N[N_CROSS])
        self.n_inner = torch.from_numpy(self.N[N_INNER])
        self.next_out = torch.from_numpy(self.N[NEXT_OUT])
        self.done = torch.from_numpy(self.M[DONE])
        self.stepped = torch.from_numpy(self.M[STEPPED])
        self.running = torch.from_numpy(self.M[RUNNING])

    def prepare(self):
        """The next step's t, h and hy from the last decisions."""
        self.prepare_kernel(self.F, self.M, self.hy_np, self.direction)

    def decide(
        self,
        y0,
        y1,
        err,
        key,
        rtol,
        atol,
        inv_sqrt_n,
        t_nonneg,
        dtmin,
        k,
        max_steps,
        only_end,
        history,
    ):
        """The step's decisions (see the kernel); ``y0``, ``y1``, ``err`` (B, ...) tensors."""
        B = y0.shape[0]
        kind, b1, b2, safety, lo, hi, q_inv = self.ctrl
        return self.decide_kernel(
            self.F,
            self.N,
            self.M,
            y0.detach().reshape(B, -1).numpy(),
            y1.detach().reshape(B, -1).numpy(),
            err.detach().reshape(B, -1).numpy(),
            key,
            rtol,
            atol,
            inv_sqrt_n,
            kind,
            b1,
            b2,
            safety,
            lo,
            hi,
            q_inv,
            self.direction,
            t_nonneg,
            math.nan if dtmin is None else float(dtmin),
            k,
            max_steps,
            only_end,
            history,
        )

    def select(self, keep: np.ndarray):
        """Keep only the columns (rows of the batch) ``keep``."""
        self.F, self.N, self.M = self.F[:, keep], self.N[:, keep], self.M[:, keep]
        self.F = np.ascontiguousarray(self.F)
        self.N = np.ascontiguousarray(self.N)
        self.M = np.ascontiguousarray(self.M)
        self._views()
