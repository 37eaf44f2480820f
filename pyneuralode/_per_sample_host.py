"""The per-row decisions of per-sample stepping as one compiled kernel for CPU tensors.

:func:`pyneuralode._loop.integrate_per_sample` decides, after every batched step, each row's
error norm, accept/reject, controller factor, next step size, time, stop and return code. On a
GPU those are a few dozen element-wise tensor operations launched without host waits; on a CPU
every one of them is a torch dispatch costing more than its arithmetic on a (B,) vector. Here
they run as one numba kernel over numpy arrays that share memory with the loop's tensors (no
copies), row by row in the scalar loop's own floating-point operations: the error norm as
:func:`~pyneuralode.solvers._ops.rms_norm_small`'s host norm and the controllers' ``factor``
(:class:`~pyneuralode.controllers.PIController`, :class:`~pyneuralode.controllers.
PredictiveController`), so a row decides as its independent solve does (the per-sample tests
check equal accepted and rejected steps; the step's values round differently, being formed on the
rescaled field of :class:`~pyneuralode._loop._StepField`).

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

# rows of the float64 state ``F`` (one column per row of the batch)
T, T_NEXT, T_END, DT, DTMAX, DT_FLOOR, H, ERR_PREV, H_ACC = range(9)
# rows of the int64 state ``N``
NACC, ATTEMPTS, CODES, NEXT_OUT, NFE = range(5)
# rows of the bool state ``M``
RUNNING, ACCEPTED_LAST, LAST = range(3)
# rows of the working arrays (one column per stepped row): ``WF`` float64, ``WN`` int64, ``WM``
W_T, W_H = range(2)
W_NEXT_OUT, W_N_CROSS, W_N_INNER = range(3)
W_ACCEPT, W_STEPPED, W_DONE = range(3)

_kernels = None
_numba_missing = False


def _compile():
    """The two kernels, compiled on first use (numba's on-disk cache keeps them). IEEE division
    (``error_model="numpy"``): a zero error scale or an underflowed error gives inf/NaN, which the
    tests reject as the tensor decisions and the scalar loop do, not a ZeroDivisionError."""
    global _kernels
    if _kernels is not None:
        return _kernels
    from numba import njit

    @njit(cache=True, nogil=True, error_model="numpy")
    def prepare(F, M, work, WF, hy, direction):  # pragma: no cover - compiled
        """The step about to be taken by the stepped rows ``work``: each row's ``h`` (a stopped
        row has t_end = t, so 0), ``last`` (the step reaches t_end; stretched by up to 0.1%
        rather than leave a sliver) and ``hy`` (h in the state's dtype)."""
        for r in range(work.shape[0]):
            b = work[r]
            t = F[T_NEXT, b]
            F[T, b] = t
            remaining = F[T_END, b] - t if direction > 0 else t - F[T_END, b]
            dt = F[DT, b]
            last = dt > remaining * 0.999
            habs = remaining if last else dt
            h = habs if direction > 0 else -habs
            M[LAST, b] = last
            F[H, b] = h
            WF[W_T, r] = t
            WF[W_H, r] = h
            hy[r] = h

    @njit(cache=True, nogil=True, error_model="numpy")
    def decide(
        F, N, M, work, WN, WM, keep, y0, y1, err, f0, f1, y_next, f_next, key, P, Q, k
    ):  # pragma: no cover - compiled
        """One step's decisions for the stepped rows ``work`` (row r of the step's arrays is row
        ``work[r]`` of the batch); returns (rows running, rows failed, the most outputs a row
        passed, the most outputs strictly inside a row's step). ``keep[:rows running]``: the
        positions of the rows still running; with ``compact`` the selected next state holds only
        theirs, in that order."""
        rtol, atol, inv_sqrt_n, b1, b2, safety, lo, hi, q_inv, direction, dtmin_user = P
        kind, t_nonneg, only_end, history, max_steps, select, compact = Q
        R, n = y0.shape
        T_out = key.shape[1]
        n_run = n_fail = n_out_max = n_inner_max = 0
        eps4 = 4.0 * _EPS
        for r in range(R):
            b = work[r]
            running = M[RUNNING, b]
            # the scalar loop's host norm: Σ (e / (atol + rtol·max(|y0|, |y1|)))², in float64
            s = 0.0
            for i in range(n):
                a = abs(np.float64(y0[r, i]))
                c = abs(np.float64(y1[r, i]))
                e = np.float64(err[r, i]) / (atol + rtol * (a if a > c else c))
                s += e * e
            errn = math.sqrt(s) * inv_sqrt_n
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
            # a rejection shrinks the step (fac < 1), so dtmax binds only after an acceptance
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
            if select and (running_next or not compact):
                # the row's next state and derivative: the step's where accepted
                d = n_run if compact else r
                if accept:
                    for i in range(n):
                        y_next[d, i] = y1[r, i]
                    for i in range(f0.shape[1]):
                        f_next[d, i] = f1[r, i]
                else:
                    for i in range(n):
                        y_next[d, i] = y0[r, i]
                    for i in range(f0.shape[1]):
                        f_next[d, i] = f0[r, i]
            WM[W_ACCEPT, r] = accept
            WM[W_STEPPED, r] = running
            WM[W_DONE, r] = done
            M[RUNNING, b] = running_next
            if running and not running_next:  # stopped: its attempt count
                N[ATTEMPTS, b] = k
            if fail:  # DtLessThanMin (Unstable when the error was NaN/Inf), then MaxIters
                code = (2 if math.isfinite(errn) else 3) if small else 1
                N[CODES, b] += 2 if stuck else code
                F[T_END, b] = t
                n_fail += 1
            if running_next:
                keep[n_run] = r
                n_run += 1
            # outputs passed: key[b, next_out : next_out + n_cross] (n_inner of them inside)
            nc = ni = 0
            j0 = N[NEXT_OUT, b]
            if accept and not only_end:
                kt = direction * t_new
                j = j0
                while j < T_out and key[b, j] < kt:
                    j += 1
                ni = j - j0
                while j < T_out and key[b, j] <= kt:
                    j += 1
                nc = j - j0
                N[NEXT_OUT, b] = j
            WN[W_NEXT_OUT, r] = j0
            WN[W_N_CROSS, r] = nc
            WN[W_N_INNER, r] = ni
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
    global _numba_missing
    if _numba_missing:
        return False
    try:
        _compile()
    except ImportError:  # numba is the ``compiled`` extra: the tensor decisions serve
        _numba_missing = True
        return False
    return True


def _rows(x: torch.Tensor, R: int) -> np.ndarray:
    """A (R, ...) tensor as a (R, n) numpy array (a view when it is contiguous)."""
    x = x.detach() if x.requires_grad else x
    return (x if x.dim() == 2 else x.reshape(R, -1)).numpy()


class HostRows:
    """The per-row control state of a per-sample solve as numpy arrays over the whole batch
    (``F`` float64, ``N`` int64, ``M`` bool; one column per row), the stepped rows ``work``, and
    working arrays over the stepped rows with torch views that the step's field and the loop's
    output code read (:attr:`t`, :attr:`h`, :attr:`hy`, :attr:`accept_rows`, :attr:`next_out`,
    ...). Without autograd the kernel selects the rows' next state and derivative into two pairs
    of buffers (a step reads one pair, whose start its dense output keeps, while the kernel
    writes the other), in compact mode already compacted to the running rows."""

    def __init__(
        self,
        rows: dict,
        y: torch.Tensor,
        *,
        ctrl,
        q: int,
        direction: float,
        rtol: float,
        atol: float,
        dtmin,
        t_nonneg: bool,
        only_end: bool,
        history: bool,
        max_steps: int,
        compact: bool,
    ):
        """``rows``: the (B,) CPU tensors ``t``, ``t_end``, ``dt``, ``dtmax``, ``dt_floor``
        and ``nfe`` the loop starts from; ``y`` the initial state; the rest the loop's settings
        (``q``: the controller's order, ``t_nonneg``: times never negative, ``only_end``: the one
        output is the end, ``history``: the controller keeps the last error and step)."""
        t, t_end, dt, dtmax, dt_floor, nfe = (
            rows[k] for k in ("t", "t_end", "dt", "dtmax", "dt_floor", "nfe")
        )
        B = t.shape[0]
        self.F = F = np.zeros((9, B))
        self.N = np.zeros((5, B), dtype=np.int64)
        self.M = M = np.zeros((3, B), dtype=np.bool_)
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
        self.rshape = (-1,) + (1,) * (y.dim() - 1)
        self.direction = direction
        pi = isinstance(ctrl, PIController)
        self.P = np.array(
            [
                rtol,
                atol,
                1.0 / math.sqrt(max(y[0].numel(), 1)),
                ctrl.beta1 / q if pi else 0.0,
                ctrl.beta2 / q if pi else 0.0,
                ctrl.safety,
                ctrl.factor_min,
                ctrl.factor_max,
                1.0 / q,
                direction,
                math.nan if dtmin is None else float(dtmin),
            ]
        )
        # kind (0 PI, 1 predictive), t_nonneg, only_end, history, max_steps, select, compact
        self.Q = np.array([0 if pi else 1, t_nonneg, only_end, history, max_steps, 0, compact])
        self.prepare_kernel, self.decide_kernel = _compile()
        # working arrays over the batch; the stepped rows use their first R columns
        self.WF = np.zeros((2, B))
        self.WN = np.zeros((3, B), dtype=np.int64)
        self.WM = np.zeros((3, B), dtype=np.bool_)
        self.keep = np.zeros(B, dtype=np.int64)
        self.hy_np = np.zeros(B, dtype=np.float32 if y.dtype == torch.float32 else np.float64)
        self._full = None  # the two (y, f) buffer pairs over the batch (without autograd)
        self._buffers = self._buffer_arrays = None
        self._current = 0
        self.set_work(np.arange(B))

    def set_work(self, work: np.ndarray):
        """Step the rows ``work`` of the batch (global indices, increasing) from now on."""
        R = work.shape[0]
        self.work = work
        self.rows = torch.from_numpy(work)
        self.hy = torch.from_numpy(self.hy_np[:R]).view(self.rshape)
        self.t = torch.from_numpy(self.WF[W_T, :R])
        self.h = torch.from_numpy(self.WF[W_H, :R])
        self.accept_rows = torch.from_numpy(self.WM[W_ACCEPT, :R]).view(self.rshape)
        self._key_rows = None
        if self._full is not None:  # the buffers' first R rows
            self._buffers = [(y[:R], f[:R]) for y, f in self._full]
            self._buffer_arrays = [(y[:R], f[:R]) for y, f in self._full_np]

    # views the output code reads (only on the steps that pass outputs)
    stepped = property(lambda self: torch.from_numpy(self.WM[W_STEPPED, : self.work.shape[0]]))
    done = property(lambda self: torch.from_numpy(self.WM[W_DONE, : self.work.shape[0]]))
    next_out = property(lambda self: torch.from_numpy(self.WN[W_NEXT_OUT, : self.work.shape[0]]))
    n_cross = property(lambda self: torch.from_numpy(self.WN[W_N_CROSS, : self.work.shape[0]]))
    n_inner = property(lambda self: torch.from_numpy(self.WN[W_N_INNER, : self.work.shape[0]]))

    def key_rows(self, key: torch.Tensor) -> torch.Tensor:
        """The stepped rows of the batch's (B, T) output times ``key``."""
        if self._key_rows is None:
            self._key_rows = key if self.work.shape[0] == key.shape[0] else key[self.rows]
        return self._key_rows

    def compact(self, y: torch.Tensor, fraw: torch.Tensor, n_run: int):
        """Step only the ``n_run`` rows still running from now on; returns their ``y`` and
        ``fraw`` (the kernel's selection already holds only theirs)."""
        keep = self.keep[:n_run]
        selected = self._buffers is not None and y is self._buffers[self._current][0]
        self.set_work(self.work[keep])
        if selected:
            return self._buffers[self._current]
        keep_t = torch.from_numpy(keep.copy())  # autograd keeps the index
        return y[keep_t], fraw[keep_t]

    def running_rows(self) -> np.ndarray:
        """The positions (among the stepped rows) of the rows still running."""
        return np.flatnonzero(self.M[RUNNING, self.work])

    def row_state(self, r: int):
        """Stepped row ``r``'s (time, step size, last step accepted, next output, dtmax, dt
        floor), as the scalar loop takes them."""
        b = self.work[r]
        F = self.F
        return (
            float(F[T_NEXT, b]),
            float(F[DT, b]),
            bool(self.M[ACCEPTED_LAST, b]),
            int(self.N[NEXT_OUT, b]),
            float(F[DTMAX, b]),
            float(F[DT_FLOOR, b]),
        )

    def times(self) -> torch.Tensor:
        """The stepped rows' times (a copy)."""
        return torch.from_numpy(self.F[T_NEXT, self.work])

    def finish_row(self, r: int, sub: dict, k: int, calls_step: int):
        """Stepped row ``r``'s results after ``k`` batched steps and its continuation ``sub``
        in the scalar loop (see ``_loop._finish_row``)."""
        b = self.work[r]
        self.F[T_NEXT, b] = sub["t"]
        self.N[CODES, b] = sub["code"]
        self.N[NACC, b] += sub["naccept"]
        self.N[ATTEMPTS, b] = k + sub["attempts"]
        self.N[NFE, b] += sub["calls"] - sub["attempts"] * calls_step

    def add_nfe(self, calls: int, rows: np.ndarray):
        """``calls`` more evaluations for the batch rows ``rows``."""
        self.N[NFE, rows] += calls

    def prepare(self):
        """The next step's t, h and hy (working arrays) from the last decisions."""
        self.prepare_kernel(self.F, self.M, self.work, self.WF, self.hy_np, self.direction)

    def decide(self, y, y1, err, fraw, f1raw, key, k):
        """The step's decisions (see the kernel) from the (R, ...) tensors of the step's start
        ``y``, end ``y1``, error estimate and derivatives. Returns the kernel's counts and the
        rows' next state and derivative when the kernel selected them (no autograd; in compact
        mode the running rows' only), else ``None`` (the caller selects by
        :attr:`accept_rows`)."""
        R = y.shape[0]
        y_np, f_np = self._arrays(y, fraw)
        y1_np, f1_np = _rows(y1, R), _rows(f1raw, R)
        select = (
            self._buffers is not None
            and y1_np.dtype == y_np.dtype
            and f1_np.shape == f_np.shape
            and f1_np.dtype == f_np.dtype
        )
        nxt = 1 - self._current
        yn_np, fn_np = self._buffer_arrays[nxt] if select else (y_np, f_np)
        self.Q[5] = select
        counts = self.decide_kernel(
            self.F,
            self.N,
            self.M,
            self.work,
            self.WN,
            self.WM,
            self.keep,
            y_np,
            y1_np,
            _rows(err, R),
            f_np,
            f1_np,
            yn_np,
            fn_np,
            key,
            self.P,
            self.Q,
            k,
        )
        if not select:
            return counts, None
        self._current = nxt
        return counts, self._buffers[nxt]

    def _arrays(self, y, fraw):
        """Numpy views of the step's start state and derivative: the buffers' own when they are
        the kernel's last selection; else (the first step) the tensors', and the buffers are
        made (without autograd)."""
        if self._buffers is not None:
            yb, fb = self._buffers[self._current]
            if y is yb and fraw is fb:
                return self._buffer_arrays[self._current]
        R = y.shape[0]
        y_np, f_np = _rows(y, R), _rows(fraw, R)
        self._buffers = None
        if not torch.is_grad_enabled() and y.dtype == fraw.dtype and y.shape == fraw.shape:
            B = self.F.shape[1]
            if self._full is None:
                self._full = [
                    (
                        torch.empty((B, *y.shape[1:]), dtype=y.dtype),
                        torch.empty((B, *y.shape[1:]), dtype=y.dtype),
                    )
                    for _ in range(2)
                ]
                self._full_np = [(_rows(a, B), _rows(b, B)) for a, b in self._full]
            self._buffers = [(a[:R], b[:R]) for a, b in self._full]
            self._buffer_arrays = [(a[:R], b[:R]) for a, b in self._full_np]
            self._current = 0
        return y_np, f_np

    def results(self, calls_step: int):
        """(time reached, return code, evaluations, accepted steps, attempts) per batch row."""
        N = self.N
        nfe = N[NFE] + N[ATTEMPTS] * (calls_step or 0)
        return tuple(
            torch.from_numpy(np.ascontiguousarray(a))
            for a in (self.F[T_NEXT], N[CODES], nfe, N[NACC], N[ATTEMPTS])
        )
