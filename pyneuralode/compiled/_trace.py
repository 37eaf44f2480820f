"""Trace a torch right-hand side to an aten graph and translate it to numba-compilable source.

``f(t, y, *args)`` is traced once with :func:`torch.fx.experimental.proxy_tensor.make_fx` on the
flat float64 state; every aten node becomes one line of numpy code over float scalars (0-d
tensors) and arrays (the others), using the traced shapes. The Jacobian is traced the same way
from reverse-mode autograd (one ``torch.autograd.grad`` per row of ``f``, as ``jacrev`` without
``vmap``, whose batching rules trace to in-place and meta-device ops): exact, not finite
differences. ``∂f/∂t`` comes from the same reverse passes. An aten op without a translation raises
:class:`UnsupportedOpError` naming it.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


class UnsupportedOpError(ValueError):
    """f uses an operation the compiled path cannot translate."""


def _shape(node) -> tuple:
    val = node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        raise UnsupportedOpError(f"compile=True: the traced node {node.name} has no shape; pass compile=False")
    return tuple(int(s) for s in val.shape)


_UNARY = {
    aten.neg.default: "(-{0})",
    aten.exp.default: "np.exp({0})",
    aten.log.default: "np.log({0})",
    aten.log1p.default: "np.log1p({0})",
    aten.expm1.default: "np.expm1({0})",
    aten.sin.default: "np.sin({0})",
    aten.cos.default: "np.cos({0})",
    aten.tan.default: "np.tan({0})",
    aten.tanh.default: "np.tanh({0})",
    aten.sinh.default: "np.sinh({0})",
    aten.cosh.default: "np.cosh({0})",
    aten.atan.default: "np.arctan({0})",
    aten.sqrt.default: "np.sqrt({0})",
    aten.rsqrt.default: "(1.0 / np.sqrt({0}))",
    aten.reciprocal.default: "(1.0 / {0})",
    aten.abs.default: "np.abs({0})",
    aten.sigmoid.default: "(1.0 / (1.0 + np.exp(-{0})))",
    aten.relu.default: "np.maximum({0}, 0.0)",
    aten.sign.default: "np.sign({0})",
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
    aten.maximum.default: "np.maximum({0}, {1})",
    aten.minimum.default: "np.minimum({0}, {1})",
    aten.atan2.default: "np.arctan2({0}, {1})",
    aten.tanh_backward.default: "({0} * (1.0 - {1} * {1}))",
    aten.sigmoid_backward.default: "({0} * {1} * (1.0 - {1}))",
    aten.mv.default: "np.dot(np.ascontiguousarray({0}), np.ascontiguousarray({1}))",
    aten.mm.default: "np.dot(np.ascontiguousarray({0}), np.ascontiguousarray({1}))",
    aten.dot.default: "np.dot({0}, {1})",
    aten.matmul.default: "np.dot(np.ascontiguousarray({0}), np.ascontiguousarray({1}))",
}
_IDENTITY = {
    aten.detach.default, aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default,
    aten.contiguous.default, aten.positive.default,
}


class _Emitter:
    def __init__(self):
        self.lines: List[str] = []
        self.names: dict = {}

    def ref(self, a) -> str:
        if isinstance(a, torch.fx.Node):
            return self.names[a]
        if isinstance(a, bool):
            return "True" if a else "False"
        if isinstance(a, (int, float)):
            v = float(a)
            if math.isinf(v) or math.isnan(v):
                return f"np.float64({str(v)!r})"
            return repr(v)
        raise UnsupportedOpError(f"compile=True: a constant argument of type {type(a).__name__} cannot be translated; "
                                 "pass compile=False")


def _index(ndim: int, dim: int, what: str) -> str:
    dim = dim % max(ndim, 1)
    return "[" + ", ".join([":"] * dim + [what]) + "]"


def _zeros(shape) -> str:
    return "0.0" if shape == () else f"np.zeros({shape!r})"


def translate(gm: torch.fx.GraphModule, inputs: Sequence[str], consts: List):
    """The body lines and the output expression (numpy source) computing the graph ``gm``.

    ``consts`` collects the graph's tensor constants (module parameters, captured tensors), passed
    to the compiled function as extra arguments ``k0, k1, ...`` in that order.
    """
    em = _Emitter()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise RuntimeError("internal: traced inputs do not match")
    for n, name in zip(placeholders, inputs):
        em.names[n] = name
    body: List[str] = []
    tuples: dict = {}
    out_expr = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            res = n.args[0]
            if isinstance(res, (tuple, list)):
                raise UnsupportedOpError("compile=True: f must return one tensor (tuple states are packed before tracing)")
            out_expr = em.ref(res)
            break
        v = f"v_{n.name}"
        if n.op == "get_attr":
            val = getattr(gm, n.target)
            consts.append(val.detach())
            em.names[n] = f"k{len(consts) - 1}"
            continue
        if n.op != "call_function":
            raise UnsupportedOpError(f"compile=True: the traced graph holds a {n.op} node; pass compile=False")
        op = n.target
        if op is __import__("operator").getitem:
            src, i = n.args
            if src in tuples:
                base, dim, ndim = tuples[src]
                em.names[n] = v
                body.append(f"{v} = {base}{_index(ndim, dim, str(i))}")
                continue
            raise UnsupportedOpError(f"compile=True: indexing the result of {src.target} is not supported; pass compile=False")
        a = n.args
        kw = n.kwargs
        shape = _shape(n)
        R = em.ref
        em.names[n] = v
        if op in _IDENTITY:
            body.append(f"{v} = {R(a[0])}")
        elif op in _UNARY:
            body.append(f"{v} = " + _UNARY[op].format(R(a[0])))
        elif op in _BINARY:
            if op in (aten.add.Tensor, aten.sub.Tensor) and kw.get("alpha", 1) != 1:
                sign = "+" if op is aten.add.Tensor else "-"
                body.append(f"{v} = ({R(a[0])} {sign} {R(kw['alpha'])} * {R(a[1])})")
            else:
                body.append(f"{v} = " + _BINARY[op].format(R(a[0]), R(a[1])))
        elif op is aten._to_copy.default:
            dt = kw.get("dtype")
            if dt not in (None, torch.float64):
                raise UnsupportedOpError(f"compile=True: f casts to {dt}; the compiled path runs in float64; pass compile=False")
            body.append(f"{v} = {R(a[0])}")
        elif op is aten.select.int:
            src_shape = _shape(a[0])
            body.append(f"{v} = {R(a[0])}{_index(len(src_shape), a[1], str(a[2]))}")
        elif op is aten.slice.Tensor:
            src_shape = _shape(a[0])
            dim = a[1] if len(a) > 1 else 0
            start = a[2] if len(a) > 2 and a[2] is not None else 0
            end = a[3] if len(a) > 3 and a[3] is not None else src_shape[dim]
            step = a[4] if len(a) > 4 else 1
            end = min(end, src_shape[dim])
            body.append(f"{v} = {R(a[0])}{_index(len(src_shape), dim, f'{start}:{end}:{step}')}")
        elif op is aten.select_backward.default:
            g, sizes, dim, index = a
            body.append(f"{v} = np.zeros({tuple(sizes)!r})")
            body.append(f"{v}{_index(len(sizes), dim, str(index))} = {R(g)}")
        elif op is aten.slice_backward.default:
            g, sizes, dim, start, end, step = a
            end = min(end, sizes[dim])
            body.append(f"{v} = np.zeros({tuple(sizes)!r})")
            body.append(f"{v}{_index(len(sizes), dim, f'{start}:{end}:{step}')} = {R(g)}")
        elif op in (aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default):
            if op is not aten.unbind.int:
                raise UnsupportedOpError(f"compile=True: aten op {op} is not supported; use indexing, or pass compile=False")
            src_shape = _shape(a[0])
            dim = a[1] if len(a) > 1 else 0
            tuples[n] = (R(a[0]), dim, len(src_shape))
            del em.names[n]
        elif op is aten.stack.default:
            items = a[0]
            dim = a[1] if len(a) > 1 else 0
            shapes = [_shape(x) for x in items]
            if all(s == () for s in shapes):
                body.append(f"{v} = np.array([{', '.join(R(x) for x in items)}])")
            else:
                parts = ", ".join(f"np.ascontiguousarray({R(x)})" for x in items)
                body.append(f"{v} = np.stack(({parts},), axis={dim % len(shape)})")
        elif op is aten.cat.default:
            items = [x for x in a[0] if math.prod(_shape(x)) > 0 or len(_shape(x)) == len(shape)]
            dim = a[1] if len(a) > 1 else 0
            parts = ", ".join(f"np.ascontiguousarray({R(x)})" for x in items)
            body.append(f"{v} = np.concatenate(({parts},), axis={dim % len(shape)})")
        elif op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
                    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints):
            src_shape = _shape(a[0])
            x = R(a[0])
            if shape == src_shape:
                body.append(f"{v} = {x}")
            elif src_shape == ():
                body.append(f"{v} = np.full({shape!r}, {x})")
            elif shape == ():
                body.append(f"{v} = {x}.ravel()[0]")
            else:
                body.append(f"{v} = np.ascontiguousarray({x}).reshape({shape!r})")
        elif op is aten.expand.default:
            src_shape = _shape(a[0])
            body.append(f"{v} = {R(a[0])}" if src_shape == shape else f"{v} = np.zeros({shape!r}) + {R(a[0])}")
        elif op in (aten.t.default, aten.permute.default, aten.transpose.int):
            if len(shape) < 2:
                body.append(f"{v} = {R(a[0])}")
            elif op is aten.permute.default:
                body.append(f"{v} = np.ascontiguousarray(np.transpose({R(a[0])}, {tuple(a[1])!r}))")
            elif op is aten.transpose.int and len(shape) > 2:
                perm = list(range(len(shape)))
                d0, d1 = a[1] % len(shape), a[2] % len(shape)
                perm[d0], perm[d1] = perm[d1], perm[d0]
                body.append(f"{v} = np.ascontiguousarray(np.transpose({R(a[0])}, {tuple(perm)!r}))")
            else:
                body.append(f"{v} = np.ascontiguousarray({R(a[0])}.T)")
        elif op is aten.addmm.default:
            beta, alpha = kw.get("beta", 1), kw.get("alpha", 1)
            body.append(f"{v} = {R(beta)} * {R(a[0])} + {R(alpha)} * np.dot(np.ascontiguousarray({R(a[1])}), "
                        f"np.ascontiguousarray({R(a[2])}))")
        elif op in (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim):
            fn = "np.sum" if op in (aten.sum.default, aten.sum.dim_IntList) else "np.mean"
            src_shape = _shape(a[0])
            dims = a[1] if len(a) > 1 and a[1] is not None else list(range(len(src_shape)))
            keep = (a[2] if len(a) > 2 else kw.get("keepdim", False))
            dims = sorted({d % max(len(src_shape), 1) for d in dims})
            if dims == list(range(len(src_shape))):
                expr = f"{fn}({R(a[0])})"
            elif len(dims) == 1:
                expr = f"{fn}({R(a[0])}, axis={dims[0]})"
            else:
                raise UnsupportedOpError(f"compile=True: a reduction over several (not all) dims ({op}) is not "
                                         "supported; pass compile=False")
            if keep and shape != ():
                expr = f"np.ascontiguousarray({expr}).reshape({shape!r})" if dims != list(range(len(src_shape))) \
                    else f"np.full({shape!r}, {expr})"
            body.append(f"{v} = {expr}")
        elif op in (aten.ones_like.default, aten.zeros_like.default, aten.full_like.default,
                    aten.ones.default, aten.zeros.default, aten.full.default, aten.new_zeros.default,
                    aten.new_ones.default, aten.new_full.default, aten.scalar_tensor.default):
            fill = {aten.ones_like.default: 1.0, aten.ones.default: 1.0, aten.new_ones.default: 1.0}.get(op)
            if fill is None:
                if op in (aten.full_like.default, aten.full.default):
                    fill = a[1]
                elif op is aten.new_full.default:
                    fill = a[2]
                elif op is aten.scalar_tensor.default:
                    fill = a[0]
                else:
                    fill = 0.0
            if isinstance(fill, torch.fx.Node):
                raise UnsupportedOpError(f"compile=True: {op} with a traced fill value; pass compile=False")
            body.append(f"{v} = {R(fill)}" if shape == () else f"{v} = np.full({shape!r}, {R(fill)})")
        elif op is aten.clamp.default:
            x = R(a[0])
            lo = a[1] if len(a) > 1 else kw.get("min")
            hi = a[2] if len(a) > 2 else kw.get("max")
            if lo is not None:
                x = f"np.maximum({x}, {R(lo)})"
            if hi is not None:
                x = f"np.minimum({x}, {R(hi)})"
            body.append(f"{v} = {x}")
        elif op is aten.where.self:
            c, x, y = (R(z) for z in a)
            body.append(f"{v} = ({x} if {c} else {y})" if shape == () else f"{v} = np.where({c}, {x}, {y})")
        elif op in (aten.gt.Tensor, aten.gt.Scalar, aten.lt.Tensor, aten.lt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
                    aten.le.Tensor, aten.le.Scalar):
            sym = {"gt": ">", "lt": "<", "ge": ">=", "le": "<="}[op.__name__.split(".")[0]]
            body.append(f"{v} = ({R(a[0])} {sym} {R(a[1])})")
        elif op is aten.threshold_backward.default:
            g, x, thr = a
            body.append(f"{v} = ({R(g)} if {R(x)} > {R(thr)} else 0.0)" if shape == ()
                        else f"{v} = np.where({R(x)} > {R(thr)}, {R(g)}, 0.0)")
        else:
            raise UnsupportedOpError(
                f"compile=True: f uses the aten op {op}, which the compiled path cannot translate yet; "
                "pass compile=False (the native engine runs any torch function)"
            )
    if out_expr is None:
        raise RuntimeError("internal: the traced graph has no output")
    return body, out_expr


def trace_rhs(call: Callable, n: int, args: Sequence, jacobian: bool):
    """Trace ``call(t, y, *args)`` (flat float64 state of ``n`` components).

    Returns ``(source, consts, uses_t)``: the source of the numba functions ``rhs(t, y, a..., k...)``
    and, with ``jacobian=True``, ``jac(t, y, J, dT, a..., k...)`` filling ``J`` (n×n) and ``dT``;
    ``consts`` the tensor constants both take after the user's arguments; ``uses_t`` whether f
    depends on t.
    """
    t0 = torch.zeros((), dtype=torch.float64)
    y0 = torch.zeros(n, dtype=torch.float64) + 0.5
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
            gm = make_fx(f_flat)(t0, y0, *ex)
    except UnsupportedOpError:
        raise
    except Exception as e:  # pragma: no cover - depends on f
        raise UnsupportedOpError(f"compile=True: tracing f failed ({type(e).__name__}: {e}); pass compile=False") from e
    anames = [f"a{i}" for i in range(len(ex))]
    consts: list = []
    body, out = translate(gm, ["t", "y"] + anames, consts)
    uses_t = any(len(nd.users) > 0 for nd in gm.graph.nodes if nd.op == "placeholder" and nd.name.startswith("t"))
    nconst_f = len(consts)
    src = [_fn_header("rhs", ["t", "y"] + anames, nconst_f)]
    src += [f"    {ln}" for ln in body]
    src.append(f"    return np.ascontiguousarray(np.asarray({out}, dtype=np.float64)).reshape({n})")
    jsrc: List[str] = []
    jconsts: list = []
    if jacobian:
        def jac_flat(t, y, *rest):
            y = y.detach().requires_grad_(True)
            t = t.detach().requires_grad_(True)
            with torch.enable_grad():
                out = f_flat(t, y, *rest)
                rows, drows = [], []
                for i in range(n):
                    gy, gt = torch.autograd.grad(out[i], (y, t), retain_graph=True, allow_unused=True)
                    rows.append(gy if gy is not None else torch.zeros_like(y))
                    drows.append(gt if gt is not None else torch.zeros_like(t))
            return torch.cat([torch.stack(rows).reshape(-1), torch.stack(drows)])

        try:
            gj = make_fx(jac_flat)(t0, y0, *ex)
        except Exception as e:  # pragma: no cover - depends on f
            raise UnsupportedOpError(f"compile=True: tracing the Jacobian of f failed ({type(e).__name__}: {e}); "
                                     "pass compile=False") from e
        jbody, jout = translate(gj, ["t", "y"] + anames, jconsts)
        jsrc = [_fn_header("jac", ["t", "y", "J", "dT"] + anames, len(jconsts))]
        jsrc += [f"    {ln}" for ln in jbody]
        jsrc.append(f"    v_out = np.ascontiguousarray(np.asarray({jout}, dtype=np.float64))")
        jsrc.append(f"    J[:, :] = v_out[:{n * n}].reshape(({n}, {n}))")
        jsrc.append(f"    dT[:] = v_out[{n * n}:]")
    return "\n".join(src + [""] + jsrc) + "\n", consts, jconsts, uses_t, len(ex)


def _fn_header(name, inputs, nconst) -> str:
    ks = [f"k{i}" for i in range(nconst)]
    return "@njit(cache=True)\ndef {}({}):".format(name, ", ".join(list(inputs) + ks))
