"""Translation of ``nn.Sequential`` MLPs into Julia code (the native path of the Julia backend).

``mlp_spec(net)`` turns an ``nn.Sequential`` of ``nn.Linear`` layers and standard activations
into a small intermediate form (a list of layer dicts: weight shapes, bias, ranges in the flat
parameter vector, activation names). ``evaluate_spec`` evaluates that form with plain torch ops
on the flat parameters (the same formulas the Julia code uses), so a translation error shows up
in Python tests; ``julia_code`` generates the Julia function ``(u, p, t) -> ...`` from it. The
activation helpers (``relu_torch`` ...) are defined in ``julia/PyNeuralODEBridge.jl``.

Layout: the state ``(..., n)`` is flattened in C order, which Julia reshapes to an ``n × B``
matrix; a torch weight ``(out, in)`` flattened in C order is ``transpose(reshape(w, in, out))``
in Julia.

Vector fields qualify when they are autonomous: wrap the net as ``pn.julia.Autonomous(net)``
(``forward(t, y) = net(y)``) or give the module an ``autonomous_net`` attribute.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: torch activation class → (Julia function name in the bridge, argument attribute or None)
ACTIVATIONS = {
    nn.Tanh: ("tanh", None),
    nn.ReLU: ("relu_torch", None),
    nn.Sigmoid: ("sigmoid_torch", None),
    nn.SiLU: ("silu_torch", None),
    nn.Softplus: ("softplus_torch", None),
    nn.ELU: ("elu_torch", None),
    nn.LeakyReLU: ("leakyrelu_torch", "negative_slope"),
}

#: the same functions in torch, written exactly as in the Julia bridge
TORCH_FORMULAS = {
    "tanh": lambda x, a: torch.tanh(x),
    "relu_torch": lambda x, a: torch.clamp(x, min=0),
    "sigmoid_torch": lambda x, a: 1.0 / (1.0 + torch.exp(-x)),
    "silu_torch": lambda x, a: x / (1.0 + torch.exp(-x)),
    "softplus_torch": lambda x, a: torch.where(
        x > 20, x, torch.log1p(torch.exp(torch.clamp(x, max=20)))
    ),
    "elu_torch": lambda x, a: torch.where(x > 0, x, torch.expm1(torch.clamp(x, max=0))),
    "leakyrelu_torch": lambda x, a: torch.where(x > 0, x, a * x),
}


class Autonomous(nn.Module):
    """``f(t, y) = net(y)``: an autonomous vector field the Julia backend can translate natively."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def autonomous_net(self) -> nn.Module:
        return self.net

    def forward(self, t, y):
        return self.net(y)


def find_net(f) -> nn.Module | None:
    """The autonomous ``nn.Sequential`` behind ``f`` if it exposes one, else ``None``."""
    net = getattr(f, "autonomous_net", None)
    return net if isinstance(net, nn.Sequential) else None


def mlp_spec(net: nn.Module) -> list[dict] | None:
    """The intermediate form of ``net``, or ``None`` when it is not a translatable MLP.

    Translatable: ``nn.Sequential`` of ``nn.Linear``, ``nn.Identity`` and the activations in
    :data:`ACTIVATIONS` (Softplus only with beta=1, threshold=20; ELU only with alpha=1), every
    parameter requiring grad, consistent feature sizes.
    """
    if not isinstance(net, nn.Sequential) or len(net) == 0:
        return None
    spec: list[dict] = []
    offset = 0
    width = None
    for layer in net:
        if isinstance(layer, nn.Linear):
            if width is not None and layer.in_features != width:
                return None
            if not layer.weight.requires_grad or (
                layer.bias is not None and not layer.bias.requires_grad
            ):
                return None
            nin, nout = layer.in_features, layer.out_features
            entry = {
                "kind": "linear",
                "in": nin,
                "out": nout,
                "w": (offset, offset + nin * nout),
                "bias": None,
            }
            offset += nin * nout
            if layer.bias is not None:
                entry["bias"] = (offset, offset + nout)
                offset += nout
            spec.append(entry)
            width = nout
        elif isinstance(layer, nn.Identity):
            continue
        elif type(layer) in ACTIVATIONS:
            if isinstance(layer, nn.Softplus) and (layer.beta != 1 or layer.threshold != 20):
                return None
            if isinstance(layer, nn.ELU) and layer.alpha != 1.0:
                return None
            name, attr = ACTIVATIONS[type(layer)]
            spec.append(
                {"kind": "act", "name": name, "arg": float(getattr(layer, attr)) if attr else None}
            )
        else:
            return None
    if not any(e["kind"] == "linear" for e in spec):
        return None
    if spec[0]["kind"] != "linear":
        return None
    n_in = spec[0]["in"]
    if width != n_in:  # a vector field maps the state to its own size
        return None
    return spec


def spec_numel(spec: list[dict]) -> int:
    return max(
        [e["bias"][1] if e.get("bias") else e["w"][1] for e in spec if e["kind"] == "linear"]
    )


def evaluate_spec(spec: list[dict], p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Evaluate the intermediate form on the flat parameters, in the Julia code's layout.

    ``y`` is flattened in C order and reshaped column-major to ``n × B`` (as Julia does), i.e.
    row-major ``B × n``; weights are read as Julia reads them.
    """
    n = spec[0]["in"]
    h = y.reshape(-1, n).T  # n × B, as Julia's reshape(u, n, :)
    for e in spec:
        if e["kind"] == "linear":
            a, b = e["w"]
            w_jl = (
                p[a:b].reshape(e["out"], e["in"]).T.reshape(e["in"], e["out"])
            )  # Julia reshape(view, in, out)
            h = w_jl.T @ h  # transpose(reshape(...)) * h
            if e["bias"] is not None:
                ba, bb = e["bias"]
                h = h + p[ba:bb].reshape(-1, 1)
        else:
            h = TORCH_FORMULAS[e["name"]](h, e["arg"])
    return h.T.reshape(y.shape)


def _jl_range(r) -> str:
    return f"{r[0] + 1}:{r[1]}"


def _jl_float(x: float) -> str:
    if math.isfinite(x):
        return repr(float(x))
    raise ValueError(f"activation argument {x} is not finite")


def julia_code(spec: list[dict]) -> str:
    """Julia source of ``(u, p, t) -> vec(net(reshape(u, n, :)))`` for the intermediate form."""
    n = spec[0]["in"]
    lines = ["(u, p, t) -> begin", f"    h = reshape(u, {n}, :)"]
    for e in spec:
        if e["kind"] == "linear":
            w = f"transpose(reshape(view(p, {_jl_range(e['w'])}), {e['in']}, {e['out']}))"
            if e["bias"] is not None:
                lines.append(f"    h = {w} * h .+ view(p, {_jl_range(e['bias'])})")
            else:
                lines.append(f"    h = {w} * h")
        elif e["arg"] is None:
            lines.append(f"    h = {e['name']}.(h)")
        else:
            lines.append(f"    h = {e['name']}.(h, {_jl_float(e['arg'])})")
    lines.append("    vec(h)")
    lines.append("end")
    return "\n".join(lines) + "\n"
