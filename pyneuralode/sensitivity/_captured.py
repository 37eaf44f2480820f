"""The tensors a vector field reaches without being handed them: what adjoints must differentiate.

A continuous adjoint (and checkpointed ``DirectAdjoint``) runs the forward solve without a graph,
so a tensor that ``f`` uses gets a gradient only if it is one of the adjoint's targets. This
module finds, cheaply and without calling ``f``, what ``f`` can reach: ``f`` itself if it is an
``nn.Module``, the owner of a bound method, ``functools.partial`` arguments, closure cells, the
globals its code names, the attributes of a callable object, and (recursively, to a small depth)
the functions and modules found there. ``nn.Module`` parameters become default targets; any other
tensor that requires grad is reported so that the caller can raise instead of silently giving it
a zero gradient (torchdiffeq and diffrax raise too).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch import nn

_MAX_DEPTH = 4
_ATOMS = (str, bytes, int, float, bool, type(None), type, types.ModuleType)
_MAX_ITEMS = 64  # elements of a list/tuple/dict looked into
#: library code whose functions are not looked into (they close over no user tensors)
_LIBRARY = ("torch", "numpy", "scipy", "pyneuralode", "functools", "math", "builtins", "typing")


def reachable(f: Callable) -> tuple[list[torch.Tensor], dict[int, tuple[str, torch.Tensor]]]:
    """``(module_parameters, loose)``: parameters of the modules ``f`` reaches that require grad,
    and
    ``{id: (where, tensor)}`` for the other reachable tensors that require grad (not parameters of a
    reachable module)."""
    params: dict[int, torch.Tensor] = {}
    loose: dict[int, tuple[str, torch.Tensor]] = {}
    seen: set = set()

    def module(m: nn.Module, where: str) -> None:
        for name, sub in m.named_modules():  # one walk: parameters and attributes together
            for p in sub._parameters.values():
                if p is not None and p.requires_grad:
                    params[id(p)] = p
            if type(sub).__module__.split(".")[0] in _LIBRARY:
                continue  # torch's and our own layers keep their tensors as parameters/buffers
            fwd = getattr(type(sub), "forward", None)
            if isinstance(fwd, types.FunctionType):
                function(fwd, f"{type(sub).__name__}.forward", _MAX_DEPTH - 1)
            for k, v in vars(sub).items():
                if k.startswith("_"):
                    continue  # nn.Module's own bookkeeping (_parameters, _buffers, hooks, ...)
                visit(v, f"{where}{'.' + name if name else ''}.{k}", _MAX_DEPTH - 1)

    def function(fn, where: str, depth: int) -> None:
        code = getattr(fn, "__code__", None)
        if code is None or (getattr(fn, "__module__", None) or "").split(".")[0] in _LIBRARY:
            return
        cells = getattr(fn, "__closure__", None) or ()
        for name, cell in zip(code.co_freevars, cells):
            try:
                v = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                continue
            visit(v, f"{where}: closure variable {name!r}", depth - 1)
        g = getattr(fn, "__globals__", {})
        for name in _names(code):
            if name in g:
                visit(g[name], f"{where}: global {name!r}", depth - 1)
        for d in getattr(fn, "__defaults__", None) or ():
            visit(d, f"{where}: a default argument", depth - 1)
        for k, d in (getattr(fn, "__kwdefaults__", None) or {}).items():
            visit(d, f"{where}: default argument {k!r}", depth - 1)

    def visit(v, where: str, depth: int) -> None:
        if depth < 0 or isinstance(v, _ATOMS):
            return
        if isinstance(v, torch.Tensor):
            if v.requires_grad and id(v) not in params:
                loose.setdefault(id(v), (where, v))
            return
        if id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, nn.Module):
            module(v, where)
        elif isinstance(v, functools.partial):
            visit(v.func, where, depth)
            for i, a in enumerate(v.args[:_MAX_ITEMS]):
                visit(a, f"{where}: partial argument {i}", depth - 1)
            for k, a in list(v.keywords.items())[:_MAX_ITEMS]:
                visit(a, f"{where}: partial argument {k!r}", depth - 1)
        elif isinstance(v, types.MethodType):
            visit(v.__self__, f"{where}.__self__", depth)
            function(v.__func__, where, depth)
        elif isinstance(v, types.FunctionType):
            function(v, f"function {getattr(v, '__qualname__', '?')}", depth)
        elif isinstance(v, (list, tuple, set, frozenset)):
            for i, a in enumerate(list(v)[:_MAX_ITEMS]):
                visit(a, f"{where}[{i}]", depth - 1)
        elif isinstance(v, dict):
            for k, a in list(v.items())[:_MAX_ITEMS]:
                visit(a, f"{where}[{k!r}]", depth - 1)
        elif callable(v) and hasattr(v, "__dict__"):  # a callable object: its attributes
            if type(v).__module__.split(".")[0] in _LIBRARY:
                return
            for k, a in list(vars(v).items())[:_MAX_ITEMS]:
                visit(a, f"{where}.{k}", depth - 1)
            call = getattr(type(v), "__call__", None)  # noqa: B004 - fetches the method to inspect
            if isinstance(call, types.FunctionType):
                function(call, f"{type(v).__name__}.__call__", depth)

    visit(f, "f", _MAX_DEPTH)
    for k in list(loose):  # a tensor reached loose before its module was found is still a parameter
        if k in params:
            del loose[k]
    return list(params.values()), loose


def _names(code) -> list[str]:
    """Global names used by ``code`` and by the functions (lambdas, comprehensions) inside it."""
    out = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out.extend(_names(c))
    return out


def adjoint_targets(problem, who: str) -> list[torch.Tensor]:
    """The tensors besides ``y0`` and ``args`` that ``who`` (an adjoint without the forward graph)
    differentiates: ``adjoint_params`` when given, else the parameters of the modules ``f`` reaches.

    Raises ``ValueError`` for a reachable tensor that requires grad and would get no gradient.
    """
    args = {id(a) for a in problem.args if isinstance(a, torch.Tensor)}
    module_params, loose = reachable(problem.f)
    explicit = problem.adjoint_params
    chosen = list(explicit) if explicit is not None else module_params
    covered = {id(t) for t in chosen} | args
    missing = [(where, t) for k, (where, t) in loose.items() if k not in covered]
    if missing:
        where, t = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"f reaches a tensor that requires grad ({where}, shape {tuple(t.shape)}){more} that "
            f"{who} would leave with a zero gradient (it solves forward without a graph). List it "
            f"in solve(..., adjoint_params=[...]) together with the module parameters that need "
            f"gradients, or pass it through args=(...,) to f(t, y, *args), or use "
            f"sensealg=pn.DirectAdjoint(); detach it if it needs no gradient"
        )
    out, ids = [], set()
    for t in chosen:
        if t.requires_grad and id(t) not in ids and id(t) not in args:
            ids.add(id(t))
            out.append(t)
    return out
