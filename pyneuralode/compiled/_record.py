"""A light aten-graph recorder: ``record(fn)(*inputs)`` builds the same kind of
:class:`torch.fx.GraphModule` as ``make_fx(fn)(*inputs)`` (real tensors, one ``call_function``
node per aten op, ``meta["val"]`` on every node, captured tensors as ``get_attr`` constants).

It runs ``fn`` on the real inputs under a :class:`TorchDispatchMode` that appends one node per
op, without make_fx's fake-tensor metadata per op: the graphs of the forward-sensitivity system
and its exact Jacobian (reverse-mode passes through reverse-mode passes, thousands of ops) record
in a fraction of a second instead of tens of seconds. Mutating ops are refused (the translator
reads values, not memory).
"""

from __future__ import annotations

import operator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ._trace import UnsupportedOpError

_LIFT = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: torch.fx.Graph, root: torch.nn.Module):
        super().__init__()
        self.graph, self.root = graph, root
        self.env: dict = {}  # id(tensor) -> node
        self.keep: list = []  # the recorded tensors stay alive, so that ids are not reused
        self.nconst = 0

    def bind(self, x: torch.Tensor, node):
        self.env[id(x)] = node
        self.keep.append(x)
        node.meta["val"] = x

    def node_of(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        nd = self.env.get(id(x))
        if nd is None:  # a tensor fn captured (a parameter, a constant it built)
            name = f"_tensor_constant{self.nconst}"
            self.nconst += 1
            setattr(self.root, name, x)  # a Parameter registers as one: the same tensor object
            nd = self.graph.get_attr(name)
            self.bind(x, nd)
        return nd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if schema is not None and schema.is_mutable:
            raise UnsupportedOpError(
                f"compile=True: f uses the in-place op {func}, which the compiled path cannot "
                "translate; write it out of place, or pass compile=False"
            )
        if func in _LIFT:  # a tensor f built from data (torch.tensor(...)): a constant
            out = func(*args, **kwargs)
            self.env[id(out)] = self.node_of(args[0])
            self.keep.append(out)
            return out
        nargs = tree_map(self.node_of, args)
        nkwargs = tree_map(self.node_of, kwargs)
        out = func(*args, **kwargs)
        node = self.graph.call_function(func, tuple(nargs), dict(nkwargs))
        if isinstance(out, torch.Tensor):
            self.bind(out, node)
        elif isinstance(out, (tuple, list)):
            node.meta["val"] = out
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self.bind(o, self.graph.call_function(operator.getitem, (node, i)))
        else:
            node.meta["val"] = out
        return out


def record(fn):
    """``record(fn)(*inputs) -> GraphModule``, as ``make_fx``; the inputs are placeholders."""

    def trace(*inputs):
        graph = torch.fx.Graph()
        root = torch.nn.Module()
        rec = _Recorder(graph, root)
        for i, x in enumerate(inputs):
            rec.bind(x, graph.placeholder(f"arg{i}"))
        with rec:
            out = fn(*inputs)
        flat, _ = tree_flatten(out)
        if len(flat) != 1 or not isinstance(flat[0], torch.Tensor):
            raise UnsupportedOpError("compile=True: f must return one tensor")
        res = rec.env.get(id(flat[0]))
        if res is None:  # fn returned an input or a captured tensor unchanged
            with rec:
                res = rec.node_of(flat[0])
        graph.output(res)
        return torch.fx.GraphModule(root, graph)

    return trace
