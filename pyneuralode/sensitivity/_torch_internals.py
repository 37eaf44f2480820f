"""The one place pyneuralode uses a private torch API, each use with a public fallback.

``grad_first_order`` is ``torch.autograd.grad(out, inputs, cotangent, allow_unused=True,
materialize_grads=True)`` for the adjoints' hot path. It calls the engine entry that
``torch.autograd.grad`` itself ends in (``torch.autograd.graph._engine_run_backward``), skipping
that function's argument normalisation. The entry is checked once against the public function on a
tiny graph; where it is missing, its signature differs or the check fails, the public
``torch.autograd.grad`` is used instead (same result).
"""

from __future__ import annotations

import torch


def grad_first_order(out: torch.Tensor, inputs: list[torch.Tensor], cotangent: torch.Tensor):
    """``torch.autograd.grad(out, inputs, cotangent, allow_unused=True, materialize_grads=True)``
    for the hot path of the adjoints (shapes already match; no graph of the gradients).

    It calls the engine entry that ``torch.autograd.grad`` itself ends in, skipping that function's
    argument normalisation, which this call site does not need. Falls back to
    ``torch.autograd.grad`` where that entry is missing or fails its self-check.
    """
    run = _engine_entry()
    if run is not None:
        grads = run((out,), (cotangent,), False, False, tuple(inputs), True, False)
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))
    return torch.autograd.grad(
        out, inputs, grad_outputs=cotangent, allow_unused=True, materialize_grads=True
    )


_ENGINE: list = []


def _engine_entry():
    """``torch.autograd.graph._engine_run_backward`` (what ``torch.autograd.grad`` itself calls),
    or None. Checked once against ``torch.autograd.grad`` on a tiny graph (an unused input
    included)."""
    if not _ENGINE:
        run = getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None)
        if run is not None:
            try:
                with torch.enable_grad():
                    x = torch.tensor([1.0, 2.0], requires_grad=True)
                    unused = torch.tensor(0.0, requires_grad=True)
                    g = run(
                        ((x * x),),
                        (torch.tensor([1.0, -1.0]),),
                        False,
                        False,
                        (x, unused),
                        True,
                        False,
                    )
                ok = (
                    isinstance(g, tuple)
                    and len(g) == 2
                    and g[1] is None
                    and torch.equal(g[0], torch.tensor([2.0, -4.0]))
                )
            except Exception:
                ok = False
            run = run if ok else None
        _ENGINE.append(run)
    return _ENGINE[0]
