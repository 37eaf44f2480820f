"""Trace a torch right-hand side to an aten graph and translate it to numba-compilable source.

``f(t, y, *args)`` is traced once with :func:`torch.fx.experimental.proxy_tensor.make_fx` on the
flat float64 state; every aten node becomes one line of numpy code over float scalars (0-d
tensors) and arrays (the others), using the traced shapes. The Jacobian is traced the same way
from reverse-mode autograd (one ``torch.autograd.grad`` per row of ``f``, as ``jacrev`` without
``vmap``, whose batching rules trace to in-place and meta-device ops): exact, not finite
differences. ``∂f/∂t`` comes from the same reverse passes. An aten op without a translation
raises
:class:`UnsupportedOpError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


class UnsupportedOpError(ValueError):
    """f uses an operation the compiled path cannot translate."""


def _shape(node) -> tuple:
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        raise UnsupportedOpError(
            f"compile=True: the traced node {node.name} has no shape; pass compile=False"
        )
    return tuple(int(s) for s in val.shape)


#: the largest number of scalar operations a traced function may unroll to (the compiled path is
#: for small systems: every tensor element becomes a scalar variable)
MAX_SCALAR_OPS = 200_000

_UNARY = {
    aten.neg.default: "(-{0})",
    aten.exp.default: "math.exp({0})",
    aten.log.default: "math.log({0})",
    aten.log1p.default: "math.log1p({0})",
    aten.expm1.default: "math.expm1({0})",
    aten.sin.default: "math.sin({0})",
    aten.cos.default: "math.cos({0})",
    aten.tan.default: "math.tan({0})",
    aten.tanh.default: "math.tanh({0})",
    aten.sinh.default: "math.sinh({0})",
    aten.cosh.default: "math.cosh({0})",
    aten.atan.default: "math.atan({0})",
    aten.sqrt.default: "math.sqrt({0})",
    aten.rsqrt.default: "(1.0 / math.sqrt({0}))",
    aten.reciprocal.default: "(1.0 / {0})",
    aten.abs.default: "abs({0})",
    aten.sigmoid.default: "(1.0 / (1.0 + math.exp(-{0})))",
    aten.relu.default: "max({0}, 0.0)",
    aten.sign.default: "float(({0} > 0.0) - ({0} < 0.0))",
    aten.square.default: "({0} * {0})",
}
_BINARY = {
    aten.add.Tensor: "({0} + {1})",
    aten.add.Scalar: "({0} + {1})",
    aten.sub.Tensor: "({0} - {1})",
    aten.sub.Scalar: "({0} - {1})",
    aten.rsub.Scalar: "({1} - {0})",
    aten.rsub.Tensor: "({1} - {0})",
    aten.mul.Tensor: "({0} * {1})",
    aten.mul.Scalar: "({0} * {1})",
    aten.div.Tensor: "({0} / {1})",
    aten.div.Scalar: "({0} / {1})",
    aten.pow.Tensor_Scalar: "({0} ** {1})",
    aten.pow.Tensor_Tensor: "({0} ** {1})",
    aten.pow.Scalar: "({0} ** {1})",
    aten.maximum.default: "max({0}, {1})",
    aten.minimum.default: "min({0}, {1})",
    aten.atan2.default: "math.atan2({0}, {1})",
    aten.tanh_backward.default: "({0} * (1.0 - {1} * {1}))",
    aten.sigmoid_backward.default: "({0} * {1} * (1.0 - {1}))",
    aten.gt.Tensor: "({0} > {1})",
    aten.gt.Scalar: "({0} > {1})",
    aten.lt.Tensor: "({0} < {1})",
    aten.lt.Scalar: "({0} < {1})",
    aten.ge.Tensor: "({0} >= {1})",
    aten.ge.Scalar: "({0} >= {1})",
    aten.le.Tensor: "({0} <= {1})",
    aten.le.Scalar: "({0} <= {1})",
}
_IDENTITY = {
    aten.detach.default,
    aten.alias.default,
    aten.clone.default,
    aten.lift_fresh_copy.default,
    aten.contiguous.default,
    aten.positive.default,
}
_RESHAPE = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.flatten.using_ints,
    aten.expand.default,
}
_ZERO, _ONE = "0.0", "1.0"


def _lit(a) -> str:
    if isinstance(a, bool):
        return "1.0" if a else "0.0"
    if isinstance(a, (int, float)):
        v = float(a)
        if math.isinf(v):
            return "math.inf" if v > 0 else "(-math.inf)"
        if math.isnan(v):
            return "math.nan"
        return repr(v)
    raise UnsupportedOpError(
        f"compile=True: a constant argument of type {type(a).__name__} cannot be translated; "
        "pass compile=False"
    )


def _simplify(op, x: str, y: str):
    """Fold the zeros and ones that reverse-mode graphs are full of (select_backward, ones_like)."""
    if op in (aten.mul.Tensor, aten.mul.Scalar):
        if x == _ZERO or y == _ZERO:
            return _ZERO
        if x == _ONE:
            return y
        if y == _ONE:
            return x
    elif op in (aten.add.Tensor, aten.add.Scalar):
        if x == _ZERO:
            return y
        if y == _ZERO:
            return x
    elif op in (aten.sub.Tensor, aten.sub.Scalar):
        if y == _ZERO:
            return x
    elif op in (aten.div.Tensor, aten.div.Scalar):
        if x == _ZERO:
            return _ZERO
        if y == _ONE:
            return x
    elif op is aten.pow.Tensor_Scalar:
        if y == _ONE:
            return x
        if y == "2.0":
            return f"({x} * {x})"
    elif op in (aten.tanh_backward.default, aten.sigmoid_backward.default):
        if x == _ZERO:
            return _ZERO
    return None


class _Val:
    """A traced tensor as its shape and one scalar expression per element (row-major)."""

    __slots__ = ("shape", "el")

    def __init__(self, shape, el):
        self.shape = tuple(shape)
        self.el = list(el)


def _idx(shape):
    return np.arange(math.prod(shape), dtype=np.int64).reshape(shape)


def _take(v: _Val, idx: np.ndarray) -> _Val:
    return _Val(idx.shape, [v.el[i] for i in idx.ravel().tolist()])


class _Translator:
    def __init__(self):
        self.lines: list[str] = []
        self.count = 0

    def atom(self, expr: str) -> str:
        """A variable holding ``expr`` (literals and names are used as they are)."""
        if expr.replace(".", "").replace("_", "").replace("[", "").replace(
            "]", ""
        ).isalnum() or expr in (_ZERO, _ONE):
            return expr
        try:
            float(expr)
            return expr
        except ValueError:
            pass
        self.count += 1
        if self.count > MAX_SCALAR_OPS:
            raise UnsupportedOpError(
                f"compile=True: f unrolls to more than {MAX_SCALAR_OPS} scalar operations; the "
                "compiled path is for small systems; pass compile=False"
            )
        name = f"s{self.count}"
        self.lines.append(f"{name} = {expr}")
        return name

    def val(self, a, vals) -> _Val:
        if isinstance(a, torch.fx.Node):
            return vals[a]
        return _Val((), [_lit(a)])

    def elementwise(self, template, ins: list[_Val], shape, op=None) -> _Val:
        out = []
        maps = [np.broadcast_to(_idx(v.shape), shape).ravel().tolist() for v in ins]
        for k in range(math.prod(shape)):
            xs = [v.el[m[k]] for v, m in zip(ins, maps)]
            simple = _simplify(op, *xs) if len(xs) == 2 else None
            out.append(self.atom(simple if simple is not None else template.format(*xs)))
        return _Val(shape, out)

    def sum_of_products(self, pairs) -> str:
        terms = [f"{a} * {b}" if b != _ONE else a for a, b in pairs if a != _ZERO and b != _ZERO]
        return self.atom("(" + " + ".join(terms) + ")") if terms else _ZERO

    def matmul(self, A: _Val, B: _Val) -> _Val:
        a2 = A.shape if len(A.shape) == 2 else (1,) + A.shape
        b2 = B.shape if len(B.shape) == 2 else B.shape + (1,)
        Ai, Bi = _idx(a2), _idx(b2)
        out = []
        for i in range(a2[0]):
            for j in range(b2[1]):
                out.append(
                    self.sum_of_products((A.el[Ai[i, k]], B.el[Bi[k, j]]) for k in range(a2[1]))
                )
        shape = tuple(
            x for x, keep in ((a2[0], len(A.shape) == 2), (b2[1], len(B.shape) == 2)) if keep
        )
        return _Val(shape, out)


def translate(gm: torch.fx.GraphModule, inputs: Sequence[tuple], consts: list, const_base: int):
    """Straight-line scalar code computing the graph ``gm``: every tensor element is a scalar.

    ``inputs``: ``(name, shape, offset)`` of each placeholder (an array argument, read as
    ``name[offset + i]`` over its flattened elements; ``t`` is a float). ``consts`` collects the
    graph's tensor constants, read from the parameter array ``p`` after ``const_base`` elements
    (the user's tensor arguments come first). Returns the code lines and the output's element
    expressions.
    """
    tr = _Translator()
    vals: dict = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, (name, shape, off) in zip(placeholders, inputs):
        vals[n] = _Val(
            shape,
            [name] if name == "t" else [f"{name}[{off + i}]" for i in range(math.prod(shape))],
        )
    const_off = const_base
    getitem = __import__("operator").getitem
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            res = n.args[0]
            if isinstance(res, (tuple, list)):
                raise UnsupportedOpError("compile=True: f must return one tensor")
            return tr.lines, tr.val(res, vals).el
        if n.op == "get_attr":
            c = getattr(gm, n.target).detach()
            consts.append(c)
            vals[n] = _Val(tuple(c.shape), [f"p[{const_off + i}]" for i in range(c.numel())])
            const_off += c.numel()
            continue
        if n.op != "call_function":
            raise UnsupportedOpError(
                f"compile=True: the traced graph holds a {n.op} node; pass compile=False"
            )
        op, a, kw = n.target, n.args, n.kwargs
        if op is getitem:
            vals[n] = vals[a[0]][a[1]]
            continue
        if op in (aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default):
            src = vals[a[0]]
            dim = (
                (a[1] if op is aten.unbind.int else a[2])
                if len(a) > (1 if op is aten.unbind.int else 2)
                else 0
            )
            idx = _idx(src.shape)
            if op is aten.unbind.int:
                parts = [np.take(idx, i, axis=dim) for i in range(src.shape[dim])]
            else:
                sizes = (
                    a[1]
                    if isinstance(a[1], (list, tuple))
                    else [a[1]] * math.ceil(src.shape[dim] / a[1])
                )
                parts = np.split(idx, np.cumsum(sizes)[:-1].tolist(), axis=dim)
            vals[n] = [_take(src, p) for p in parts]
            continue
        shape = _shape(n)
        V = lambda x: tr.val(x, vals)
        if op in _IDENTITY or op is aten._to_copy.default:
            dt = kw.get("dtype")
            if dt not in (None, torch.float64):
                raise UnsupportedOpError(
                    f"compile=True: f casts to {dt}; the compiled path runs in float64; "
                    "pass compile=False"
                )
            vals[n] = V(a[0])
        elif op in _UNARY:
            vals[n] = tr.elementwise(_UNARY[op], [V(a[0])], shape)
        elif op in _BINARY:
            x, y = V(a[0]), V(a[1])
            alpha = kw.get("alpha", 1)
            if op in (aten.add.Tensor, aten.sub.Tensor) and alpha != 1:
                y = tr.elementwise(
                    "({0} * {1})", [y, _Val((), [_lit(alpha)])], y.shape, aten.mul.Tensor
                )
            vals[n] = tr.elementwise(_BINARY[op], [x, y], shape, op)
        elif op is aten.where.self:
            vals[n] = tr.elementwise("({1} if {0} else {2})", [V(a[0]), V(a[1]), V(a[2])], shape)
        elif op is aten.threshold_backward.default:
            vals[n] = tr.elementwise(
                "({0} if {1} > {2} else 0.0)", [V(a[0]), V(a[1]), V(a[2])], shape
            )
        elif op is aten.clamp.default:
            x = V(a[0])
            lo = a[1] if len(a) > 1 else kw.get("min")
            hi = a[2] if len(a) > 2 else kw.get("max")
            if lo is not None:
                x = tr.elementwise("max({0}, {1})", [x, V(lo)], shape)
            if hi is not None:
                x = tr.elementwise("min({0}, {1})", [x, V(hi)], shape)
            vals[n] = x
        elif op is aten.select.int:
            src = V(a[0])
            vals[n] = _take(src, np.take(_idx(src.shape), a[2], axis=a[1]))
        elif op is aten.slice.Tensor:
            src = V(a[0])
            dim = a[1] if len(a) > 1 else 0
            sl = [slice(None)] * len(src.shape)
            sl[dim] = slice(
                a[2] if len(a) > 2 else None,
                a[3] if len(a) > 3 else None,
                a[4] if len(a) > 4 else 1,
            )
            vals[n] = _take(src, _idx(src.shape)[tuple(sl)])
        elif op in (aten.select_backward.default, aten.slice_backward.default):
            g, sizes = V(a[0]), tuple(a[1])
            idx = _idx(sizes)
            if op is aten.select_backward.default:
                pos = np.take(idx, a[3], axis=a[2])
            else:
                sl = [slice(None)] * len(sizes)
                sl[a[2]] = slice(a[3], a[4], a[5])
                pos = idx[tuple(sl)]
            el = [_ZERO] * math.prod(sizes)
            for p, e in zip(pos.ravel().tolist(), g.el):
                el[p] = e
            vals[n] = _Val(sizes, el)
        elif op in (aten.stack.default, aten.cat.default):
            items = [V(x) for x in a[0]]
            dim = a[1] if len(a) > 1 else kw.get("dim", 0)
            offs = np.cumsum([0] + [len(v.el) for v in items])
            idxs = [_idx(v.shape) + o for v, o in zip(items, offs)]
            if op is aten.cat.default:
                idxs = [i for i, v in zip(idxs, items) if len(v.shape) == len(shape)]
                comb = np.concatenate(idxs, axis=dim)
            else:
                comb = np.stack(idxs, axis=dim)
            vals[n] = _take(_Val((len(offs),), sum((v.el for v in items), [])), comb)
        elif op in _RESHAPE:
            src = V(a[0])
            if op is aten.expand.default:
                vals[n] = _take(src, np.broadcast_to(_idx(src.shape), shape))
            else:
                vals[n] = _Val(shape, src.el)
        elif op in (aten.t.default, aten.permute.default, aten.transpose.int):
            src = V(a[0])
            idx = _idx(src.shape)
            if op is aten.permute.default:
                idx = np.transpose(idx, a[1])
            elif op is aten.transpose.int:
                idx = np.swapaxes(idx, a[1], a[2])
            else:
                idx = idx.T
            vals[n] = _take(src, idx)
        elif op in (aten.mv.default, aten.mm.default, aten.dot.default, aten.matmul.default):
            A, B = V(a[0]), V(a[1])
            if len(A.shape) > 2 or len(B.shape) > 2:
                raise UnsupportedOpError(
                    f"compile=True: batched {op} is not supported; pass compile=False"
                )
            vals[n] = tr.matmul(A, B)
        elif op is aten.addmm.default:
            P = tr.matmul(V(a[1]), V(a[2]))
            beta, alpha = kw.get("beta", 1), kw.get("alpha", 1)
            if alpha != 1:
                P = tr.elementwise(
                    "({0} * {1})", [P, _Val((), [_lit(alpha)])], P.shape, aten.mul.Tensor
                )
            bias = V(a[0])
            if beta != 1:
                bias = tr.elementwise(
                    "({0} * {1})", [bias, _Val((), [_lit(beta)])], bias.shape, aten.mul.Tensor
                )
            vals[n] = tr.elementwise("({0} + {1})", [bias, P], shape, aten.add.Tensor)
        elif op in (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim):
            src = V(a[0])
            nd = len(src.shape)
            dims = a[1] if len(a) > 1 and a[1] is not None else list(range(nd))
            dims = sorted({d % max(nd, 1) for d in dims}) if nd else []
            keep = [d for d in range(nd) if d not in dims]
            idx = np.transpose(_idx(src.shape), keep + dims).reshape(
                -1, math.prod(src.shape[d] for d in dims)
            )
            scale = 1.0 / idx.shape[1] if op in (aten.mean.default, aten.mean.dim) else 1.0
            out = []
            for row in idx.tolist():
                sm = tr.sum_of_products((src.el[i], _ONE) for i in row)
                out.append(tr.atom(f"({sm} * {scale!r})") if scale != 1.0 and sm != _ZERO else sm)
            vals[n] = _Val(shape, out)
        elif op in (
            aten.ones_like.default,
            aten.zeros_like.default,
            aten.full_like.default,
            aten.ones.default,
            aten.zeros.default,
            aten.full.default,
            aten.new_zeros.default,
            aten.new_ones.default,
            aten.new_full.default,
            aten.scalar_tensor.default,
        ):
            fill = {
                aten.ones_like.default: 1.0,
                aten.ones.default: 1.0,
                aten.new_ones.default: 1.0,
            }.get(op)
            if fill is None:
                fill = {
                    aten.full_like.default: 1,
                    aten.full.default: 1,
                    aten.new_full.default: 2,
                    aten.scalar_tensor.default: 0,
                }.get(op)
                fill = 0.0 if fill is None else a[fill]
            vals[n] = _Val(shape, [_lit(fill)] * math.prod(shape))
        else:
            raise UnsupportedOpError(
                f"compile=True: f uses the aten op {op}, which the compiled path cannot "
                "translate yet; "
                "pass compile=False (the native engine runs any torch function)"
            )
    raise RuntimeError("internal: the traced graph has no output")


def trace_rhs(
    call: Callable,
    n: int,
    args: Sequence,
    jacobian: bool,
    dtype=torch.float64,
    tracer: Callable = make_fx,
):
    """Trace ``call(t, y, *args)`` (flat state of ``n`` components, traced in ``dtype``; the
    generated code computes in float64 whatever the dtype).

    Returns ``(source, f_consts, jac_consts, uses_t)``: the source of the numba functions
    ``rhs(t, y, out, p)`` writing f into ``out`` and, with ``jacobian=True``,
    ``jac(t, y, J, dT, p)`` filling ``J`` (n×n) and ``dT = ∂f/∂t``, compiled for the signatures
    :data:`RHS_SIG` and :data:`JAC_SIG`. ``p`` holds the user's tensor arguments (flattened, in
    order) followed by the tensor constants of the traced function (``f_consts`` for rhs,
    ``jac_consts`` for jac); whether f depends on t. ``tracer``: ``make_fx`` or
    :func:`._record.record` (the same graphs, faster on large ones such as the forward-sensitivity
    system's).
    """
    t0 = torch.zeros((), dtype=dtype)
    y0 = torch.zeros(n, dtype=dtype) + 0.5
    targs = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    tensor_pos = [i for i, a in enumerate(targs) if isinstance(a, torch.Tensor)]

    def split(rest):
        full = list(targs)
        for i, a in zip(tensor_pos, rest):
            full[i] = a
        return full

    def f_flat(t, y, *rest):
        return call(t, y, split(rest)).reshape(-1)

    ex = [targs[i] for i in tensor_pos]
    try:
        with torch.no_grad():
            gm = tracer(f_flat)(t0, y0, *ex)
    except UnsupportedOpError:
        raise
    except Exception as e:  # pragma: no cover - depends on f
        raise UnsupportedOpError(
            f"compile=True: tracing f failed ({type(e).__name__}: {e}); pass compile=False"
        ) from e
    offs = np.cumsum([0] + [x.numel() for x in ex]).tolist()
    ins = [("t", (), 0), ("y", (n,), 0)] + [("p", tuple(x.shape), o) for x, o in zip(ex, offs)]
    consts: list = []
    body, out = translate(gm, ins, consts, offs[-1])
    uses_t = len(next(nd for nd in gm.graph.nodes if nd.op == "placeholder").users) > 0
    src = ["@njit(RHS_SIG, cache=True)", "def rhs(t, y, out, p):"]
    src += [f"    {ln}" for ln in body]
    src += [f"    out[{i}] = {e}" for i, e in enumerate(out)]
    jsrc: list[str] = []
    jconsts: list = []
    if jacobian:

        def jac_flat(t, y, *rest):
            y = y.detach().requires_grad_(True)
            t = t.detach().requires_grad_(True)
            with torch.enable_grad():
                out = f_flat(t, y, *rest)
                rows, drows = [], []
                for i in range(n):
                    gy, gt = torch.autograd.grad(
                        out[i], (y, t), retain_graph=True, allow_unused=True
                    )
                    rows.append(gy if gy is not None else torch.zeros_like(y))
                    drows.append(gt if gt is not None else torch.zeros_like(t))
            return torch.cat([torch.stack(rows).reshape(-1), torch.stack(drows)])

        try:
            gj = tracer(jac_flat)(t0, y0, *ex)
        except Exception as e:  # pragma: no cover - depends on f
            raise UnsupportedOpError(
                f"compile=True: tracing the Jacobian of f failed ({type(e).__name__}: {e}); "
                "pass compile=False"
            ) from e
        jbody, jout = translate(gj, ins, jconsts, offs[-1])
        jsrc = ["@njit(JAC_SIG, cache=True)", "def jac(t, y, J, dT, p):"]
        jsrc += [f"    {ln}" for ln in jbody]
        jsrc += [f"    J[{i // n}, {i % n}] = {e}" for i, e in enumerate(jout[: n * n])]
        jsrc += [f"    dT[{i}] = {e}" for i, e in enumerate(jout[n * n :])]
    return "\n".join(src + [""] + jsrc) + "\n", consts, jconsts, uses_t
