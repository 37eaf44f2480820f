"""Solves under ``torch.inference_mode()`` (torch's context for pure inference).

A solve there must give the same numbers as under ``torch.no_grad()``, and must leave nothing
behind that breaks a later solve under autograd: the library caches each tableau's tensors per
dtype and device, and a cache first filled under inference mode used to hold inference tensors,
which autograd refuses to save ("Inference tensors cannot be saved for backward").
"""

from __future__ import annotations

import math

import pytest
import torch

import pyneuralode as pn
from pyneuralode.solvers import _base

SOLVERS = [
    "Tsit5",
    "Dopri5",
    "Vern7",
    "Rodas5P",
    "Rodas4",
    "Rosenbrock23",
    "KenCarp4",
    "Kvaerno5",
    "TRBDF2",
    "QNDF",
]


def _decay(t, y, k):
    return -k * y


def _vdp(t, y):
    return torch.stack([y[1], 10.0 * (1 - y[0] ** 2) * y[1] - y[0]])


@pytest.mark.parametrize("name", SOLVERS)
def test_inference_mode_solve_equals_no_grad(name):
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0.0, 3.0, 4, dtype=torch.float64)
    with torch.no_grad():
        ref = pn.solve(_vdp, y0, t, getattr(pn, name)(), rtol=1e-6, atol=1e-8)
    with torch.inference_mode():
        sol = pn.solve(_vdp, y0, t, getattr(pn, name)(), rtol=1e-6, atol=1e-8)
    assert sol.ys.is_inference()
    torch.testing.assert_close(sol.ys, ref.ys, rtol=0, atol=0)
    assert sol.stats["naccept"] == ref.stats["naccept"] and sol.stats["nfe"] == ref.stats["nfe"]


def _rows(t, Y):  # Van der Pol on each row of a (B, 2) state
    return torch.stack([Y[:, 1], 10.0 * (1 - Y[:, 0] ** 2) * Y[:, 1] - Y[:, 0]], 1)


_BLOCKS = torch.block_diag(
    *[torch.ones(2, 2)] * 3
).bool()  # the flattened (3, 2) state's Jacobian pattern


@pytest.mark.parametrize(
    "make",
    [
        lambda: pn.Rodas5P(batched=True),
        lambda: pn.KenCarp4(batched=True),
        lambda: pn.Rodas5P(jac_mode="jacfwd"),
        lambda: pn.Rodas5P(jac_mode="jacrev"),
        lambda: pn.QNDF(linsolve="sparse", jac_sparsity=_BLOCKS),
        lambda: pn.KenCarp4(linsolve="sparse", jac_sparsity=_BLOCKS),
        lambda: pn.QNDF(linsolve="gmres"),
        lambda: pn.KenCarp4(linsolve="gmres"),
    ],
    ids=[
        "Rodas5P-batched",
        "KenCarp4-batched",
        "Rodas5P-jacfwd",
        "Rodas5P-jacrev",
        "QNDF-sparse",
        "KenCarp4-sparse",
        "QNDF-gmres",
        "KenCarp4-gmres",
    ],
)
def test_inference_mode_jacobians_equal_no_grad(make):
    """Every Jacobian route (autograd rows, batched, forward mode, coloured sparse, GMRES products)
    gives the no_grad solve under inference mode; a zero Jacobian from a silently disabled autograd
    would take many more steps."""
    Y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.5, 0.5]], dtype=torch.float64)
    t = torch.linspace(0.0, 3.0, 4, dtype=torch.float64)
    with torch.no_grad():
        ref = pn.solve(_rows, Y0, t, make(), rtol=1e-6, atol=1e-8)
    with torch.inference_mode():
        sol = pn.solve(_rows, Y0, t, make(), rtol=1e-6, atol=1e-8)
    assert sol.stats["naccept"] == ref.stats["naccept"] and sol.stats["nfe"] == ref.stats["nfe"]
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SOLVERS)
def test_gradient_after_a_solve_under_inference_mode(name, monkeypatch):
    # an empty tableau cache, so that the inference-mode solve is the one that fills it
    monkeypatch.setattr(_base, "_TABLEAU_TENSORS", {})
    solver = getattr(pn, name)()
    if hasattr(solver, "_coef_cache"):
        monkeypatch.setattr(solver, "_coef_cache", {})
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    k = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        pn.solve(_decay, y0, t, solver, args=(k,), rtol=1e-8, atol=1e-10)
    sol = pn.solve(_decay, y0, t, solver, args=(k,), rtol=1e-8, atol=1e-10)
    sol.ys[-1].sum().backward()
    exact = -3.0 * math.exp(-2.0)  # d/dk of (1 + 2)·e^{-k} at k = 2, t = 1
    assert k.grad is not None
    assert abs(k.grad.item() - exact) < 1e-5 * abs(exact)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_cnf_under_inference_mode(trace):
    """The CNF's trace needs autograd inside f; under inference mode it must still work, give the
    no_grad numbers, and leave the model trainable."""
    torch.manual_seed(0)
    cnf = pn.CNF(2, trace=trace, rtol=1e-6, atol=1e-6).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = cnf.log_prob(x)
    torch.manual_seed(1)
    with torch.inference_mode():
        lp = cnf.log_prob(x)
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    loss = -cnf.log_prob(x).mean()
    loss.backward()
    grads = [p.grad for p in cnf.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "make",
    [
        lambda: pn.DynamicSS(pn.Tsit5()),
        lambda: pn.DynamicSS(pn.Rodas5P()),
        pn.Anderson,
        pn.Broyden,
        pn.FixedPointIteration,
    ],
    ids=["DynamicSS-Tsit5", "DynamicSS-Rodas5P", "Anderson", "Broyden", "FixedPointIteration"],
)
def test_deq_under_inference_mode_then_training(make):
    """A DEQ evaluated under inference mode gives the no_grad fixed point (a DynamicSS with an
    implicit solver forms Jacobians there), and then still trains with implicit gradients."""
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(4, 4)).double()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = f

        def forward(self, z, x):
            return torch.tanh(0.5 * self.lin(z) + x)

    deq = pn.DEQ(Block(), solver=make(), abstol=1e-10, reltol=0)
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        ref = deq(x)
    with torch.inference_mode():
        z = deq(x)
    torch.testing.assert_close(z, ref, rtol=1e-9, atol=1e-9)
    deq(x).pow(2).sum().backward()
    g = f[0].weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_event_under_inference_mode():
    """odeint_event under inference mode finds the no_grad event time."""

    def fall(t, y):
        return torch.stack([y[1], torch.full_like(y[1], -9.81)])

    def ground(t, y):
        return y[0]

    y0 = torch.tensor([10.0, 0.0], dtype=torch.float64)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    with torch.no_grad():
        te_ref, _ = pn.odeint_event(fall, y0, t0, event_fn=ground)
    with torch.inference_mode():
        te, ys = pn.odeint_event(fall, y0, t0, event_fn=ground)
    assert abs(float(te) - math.sqrt(2 * 10.0 / 9.81)) < 1e-6
    assert float(te) == float(te_ref)
