"""The validated problem handed from ``solve`` to a sensitivity algorithm or backend.

Validation lives here: every message names the argument and the fix. Tuple states are packed
into one flat tensor (same dtype and device required) and unpacked around ``f``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from operator import eq, gt, lt

import torch
from torch import nn

from ._arguments import check_tolerance
from ._time import time_tensor


def _check_y0(y0) -> tuple[torch.Tensor, list[torch.Size] | None, bool]:
    if isinstance(y0, (tuple, list)):
        if len(y0) == 0:
            raise ValueError(
                "y0: an empty tuple is not a state; pass a tensor or a tuple of tensors"
            )
        for i, c in enumerate(y0):
            if not isinstance(c, torch.Tensor):
                raise TypeError(
                    f"y0[{i}]: expected a torch.Tensor, got {type(c).__name__}; wrap it with "
                    "torch.as_tensor(..., dtype=torch.float64)"
                )
            if not c.is_floating_point():
                raise TypeError(
                    f"y0[{i}]: dtype {c.dtype} is not floating point; convert it, e.g. "
                    f"y0[{i}].double()"
                )
            if c.dtype != y0[0].dtype or c.device != y0[0].device:
                raise TypeError(
                    f"y0[{i}]: all tuple components must share dtype and device ({y0[0].dtype}, "
                    f"{y0[0].device}); got ({c.dtype}, {c.device})"
                )
        _check_not_meta("y0[0]", y0[0])
        shapes = [c.shape for c in y0]
        flat = torch.cat([c.reshape(-1) for c in y0])
        return flat, shapes, True
    if not isinstance(y0, torch.Tensor):
        raise TypeError(
            f"y0: expected a torch.Tensor or a tuple of tensors, got {type(y0).__name__}; use "
            "torch.as_tensor(y0, dtype=torch.float64)"
        )
    if not y0.is_floating_point():
        raise TypeError(
            f"y0: dtype {y0.dtype} is not floating point; convert it, e.g. y0.double() or "
            "y0.float()"
        )
    _check_not_meta("y0", y0)
    return y0, None, False


def _check_not_meta(name: str, x: torch.Tensor):
    if x.device.type == "meta":
        raise ValueError(
            f"{name}: is on the meta device (a tensor without values); create it on "
            f"a real device, e.g. torch.ones(..., device='cpu'), or move it with "
            f".to('cpu')"
        )


#: up to this many values (output times, initial state) are checked as Python floats: fewer calls
#: than torch's ops
_FEW_VALUES = 64


def _all_finite(x: torch.Tensor) -> bool:
    if x.numel() <= _FEW_VALUES:
        return all(map(math.isfinite, x.detach().reshape(-1).tolist()))
    return bool(torch.isfinite(x).all())


def _check_t(t, ref: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The output times as a 1-D float tensor, and as Python floats."""
    if isinstance(t, torch.Tensor):
        tt = t
    else:
        try:
            tt = torch.as_tensor(t, dtype=torch.float64)
        except Exception as e:
            raise TypeError(
                f"t: could not convert {type(t).__name__} to a 1-D tensor of times ({e})"
            ) from None
    _check_not_meta("t", tt)
    if tt.ndim != 1:
        raise ValueError(
            "t: must be 1-D (a sequence of output times), or (B, T) per-sample times for a y0 "
            "whose first "
            f"dimension is the batch B; got shape {tuple(tt.shape)} for y0 of shape "
            f"{tuple(ref.shape)}; use "
            f"t.reshape(-1) or torch.tensor([t0, t1])"
        )
    if tt.numel() == 0:
        raise ValueError(
            "t: is empty; give at least the start time, e.g. t=torch.tensor([0.0, 1.0])"
        )
    if not tt.is_floating_point():
        tt = tt.to(torch.float64 if ref.dtype == torch.float64 else ref.dtype)
    values = tt.detach().cpu().tolist()
    if len(values) <= _FEW_VALUES:  # the same checks on Python floats, without torch's per-op cost
        finite = all(map(math.isfinite, values))
        later = values[1:]
        monotonic = not finite or all(map(lt, values, later)) or all(map(gt, values, later))
        repeated = not monotonic and any(map(eq, values, later))
    else:
        finite = bool(torch.isfinite(tt).all())
        d = tt[1:] - tt[:-1] if finite else None
        monotonic = d is None or bool((d > 0).all() or (d < 0).all())
        repeated = not monotonic and bool((d == 0).any())
    if not finite:
        raise ValueError("t: contains NaN or Inf; every output time must be finite")
    if not monotonic:
        if repeated:
            raise ValueError(
                "t: has repeated values; output times must be strictly increasing or strictly "
                "decreasing"
            )
        raise ValueError(
            "t: is not monotonic; output times must be strictly increasing (or strictly "
            "decreasing for backward integration)"
        )
    return tt, values  # (a floating tensor's tolist() gives Python floats)


def _check_tolerance(name: str, tol, flat: torch.Tensor, shapes, is_tuple: bool):
    if isinstance(tol, (tuple, list)) and is_tuple:
        if len(tol) != len(shapes):
            raise ValueError(
                f"{name}: a tuple tolerance needs one entry per state component ({len(shapes)}), "
                f"got {len(tol)}"
            )
        parts = []
        for i, (tl, shp) in enumerate(zip(tol, shapes)):
            tl = torch.as_tensor(tl, dtype=flat.dtype, device=flat.device)
            try:
                parts.append(tl.expand(shp).reshape(-1))
            except RuntimeError:
                raise ValueError(
                    f"{name}[{i}]: shape {tuple(tl.shape)} does not broadcast to the component "
                    f"shape {tuple(shp)}"
                ) from None
        tol = torch.cat(parts)
    if isinstance(tol, torch.Tensor) and tol.numel() > 1:
        tol = tol.to(dtype=flat.dtype, device=flat.device)
        try:
            tol = tol.expand(flat.shape) if not is_tuple else tol.reshape(-1).expand(flat.shape)
        except RuntimeError:
            raise ValueError(
                f"{name}: shape {tuple(tol.shape)} does not broadcast to the state shape "
                f"{tuple(flat.shape)}"
            ) from None
        if not torch.isfinite(tol).all() or (tol < 0).any():
            raise ValueError(f"{name}: must be finite and non-negative")
        return tol.detach().clone()
    if type(tol) is float and 0.0 <= tol < math.inf:  # the common case, before building messages
        return tol
    return check_tolerance(name, tol, other="a tensor broadcastable to the state")


def _check_adjoint_params(adjoint_params) -> tuple[torch.Tensor, ...] | None:
    if adjoint_params is None:
        return None
    if isinstance(adjoint_params, torch.Tensor):
        raise TypeError(
            "adjoint_params: expected a sequence of tensors, got one tensor; "
            "use adjoint_params=[theta]"
        )
    if isinstance(adjoint_params, nn.Module):
        raise TypeError(
            "adjoint_params: expected a sequence of tensors, got a module; "
            "use adjoint_params=list(module.parameters())"
        )
    try:
        out = tuple(adjoint_params)
    except TypeError:
        raise TypeError(
            f"adjoint_params: expected a sequence of tensors such as "
            f"list(model.parameters()), got "
            f"{type(adjoint_params).__name__}"
        ) from None
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params[{i}]: expected a torch.Tensor, got {type(p).__name__}")
    return out


_TIME_FUNCTIONS: dict = {}


def _time_function(dtype: torch.dtype, device):
    """:func:`time_tensor` for ``(dtype, device)``, made once (it holds no state)."""
    key = (dtype, device)
    fn = _TIME_FUNCTIONS.get(key)
    if fn is None:
        fn = _TIME_FUNCTIONS[key] = time_tensor(dtype, device)
    return fn


_IN_PLACE = (
    "f: modified its input y in place (e.g. y += ..., y[0] = ..., y.mul_(...)), which "
    "corrupts the solver's state; compute a new tensor instead (y = y + ..., "
    "torch.stack([...]), or y = y.clone() before writing)"
)


class ODEProblem:
    """``dy/dt = f(t, y, *args)`` on the output times ``t``, validated and packed.

    ``y0`` is the internal state (tuple states packed into one flat tensor), ``t_list`` the output
    times as Python floats, ``params`` the tensors gradients may flow to (module parameters and
    tensors in ``args`` that require grad).
    """

    def __init__(
        self, f: Callable, y0, t, args: Sequence = (), rtol=1e-6, atol=1e-9, adjoint_params=None
    ):
        if not callable(f):
            raise TypeError(f"f: must be callable as f(t, y, *args), got {type(f).__name__}")
        if not isinstance(args, (tuple, list)):
            raise TypeError(
                f"args: must be a tuple of extra arguments for f, got {type(args).__name__}; use "
                "args=(x,)"
            )
        self.f = f
        self.args = tuple(args)
        flat, shapes, is_tuple = _check_y0(y0)
        if not _all_finite(flat):
            raise ValueError("y0: contains NaN or Inf; the initial state must be finite")
        self.y0_user = y0
        self.y0 = flat
        self.shapes = shapes
        self.is_tuple = is_tuple
        self.t, self.t_list = _check_t(t, flat)
        self.time_dtype = self.t.dtype if self.t.is_floating_point() else flat.dtype
        #: ``time(t)``: the 0-d tensor of a float time that f receives
        self.time = _time_function(self.time_dtype, flat.device)
        self.rtol = _check_tolerance("rtol", rtol, flat, shapes, is_tuple)
        self.atol = _check_tolerance("atol", atol, flat, shapes, is_tuple)
        params: list[torch.Tensor] = []
        if isinstance(f, nn.Module):
            params.extend(p for p in f.parameters() if p.requires_grad)
        self.arg_tensors = [a for a in self.args if isinstance(a, torch.Tensor)]
        self.params = params
        #: the tensors an adjoint without the forward graph differentiates (None: those f reaches)
        self.adjoint_params = _check_adjoint_params(adjoint_params)
        self._checked = False

    # -- packing -------------------------------------------------------------------------------
    def unpack(self, y: torch.Tensor):
        """Internal state (..., N) → user state (tuple of tensors for tuple states)."""
        if not self.is_tuple:
            return y
        lead = y.shape[:-1]
        out, i = [], 0
        for shp in self.shapes:
            n = math.prod(shp)
            out.append(y[..., i : i + n].reshape(tuple(lead) + tuple(shp)))
            i += n
        return tuple(out)

    def pack(self, v) -> torch.Tensor:
        if not self.is_tuple:
            return v
        return torch.cat([c.reshape(-1) for c in v])

    # -- the right-hand side -----------------------------------------------------------------
    def call(self, t: torch.Tensor, y: torch.Tensor, args: Sequence | None = None) -> torch.Tensor:
        """``f(t, y, *args)`` on the internal state, with its output checked on the first call."""
        args = self.args if args is None else args
        out = self.f(t, self.unpack(y), *args)
        if self.is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(self.shapes):
                raise ValueError(
                    f"f: returned {type(out).__name__}; for a tuple state it must return a tuple "
                    f"of {len(self.shapes)} tensors shaped like y0"
                )
            if not self._checked:
                for i, (o, shp) in enumerate(zip(out, self.shapes)):
                    self._check_out(o, shp, f"f(t, y)[{i}]")
                self._checked = True
            return torch.cat([o.reshape(-1) for o in out])
        if not self._checked:
            self._check_out(out, self.y0.shape, "f(t, y)")
            self._checked = True
        return out

    def _check_out(self, o, shape, what, later: bool = False):
        if not isinstance(o, torch.Tensor):
            raise TypeError(
                f"{what}: returned {type(o).__name__}; f must return a torch.Tensor shaped like y0"
            )
        if o.shape != shape:
            when = " (it changed during the solve)" if later else ""
            raise ValueError(
                f"{what}: returned shape {tuple(o.shape)}{when}, but the state has "
                f"shape {tuple(shape)}; f must return dy/dt with the shape of y at "
                f"every call"
            )
        if o.dtype != self.y0.dtype:
            raise TypeError(
                f"{what}: returned dtype {o.dtype}, but the state is {self.y0.dtype}; make f keep "
                f"the state's dtype (e.g. cast its parameters with .to({self.y0.dtype}))"
            )
        if o.device != self.y0.device:
            raise ValueError(
                f"{what}: returned a tensor on {o.device}, but the state is on {self.y0.device}; "
                "move f to the state's device"
            )

    def rhs(self, stats: dict, key: str = "nfe", args: Sequence | None = None) -> Callable:
        """A counting right-hand side ``rhs(t_float, y)`` for the integrate loop."""
        call, f = self.call, self.f
        fargs = self.args if args is None else tuple(args)
        time = self.time
        plain = not self.is_tuple

        def rhs(t: float, y: torch.Tensor) -> torch.Tensor:
            stats[key] = stats.get(key, 0) + 1
            tt = time(t)
            # y's version counter catches an f that writes into y (it would corrupt the solver's
            # stages); inference tensors keep no counter (asked first: reading it raises, and a
            # raised exception per call made every solve under inference_mode slower).
            version = None if y.is_inference() else y._version
            try:
                if plain and self._checked:  # hot path: the first call checked f's output fully
                    out = f(tt, y, *fargs)
                    if out.shape != y.shape:
                        self._check_out(out, y.shape, "f(t, y)", later=True)
                else:
                    out = call(tt, y, fargs)
            except RuntimeError as e:  # torch refuses in-place writes into leaves requiring grad
                if "in-place" in str(e) and "leaf Variable" in str(e):
                    raise ValueError(_IN_PLACE) from e
                raise
            if version is not None and y._version != version:
                raise ValueError(_IN_PLACE)
            return out

        return rhs
