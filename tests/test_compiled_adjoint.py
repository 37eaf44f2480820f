"""The compiled adjoint (``compile=True`` above the forward-sensitivity sizes, or
``sensealg=pn.InterpolatingAdjoint()``): gradients for many parameters and for the output times.

Checked against central differences of the compiled solve (an MLP field with 202 parameters,
Tsit5; a Robertson system with 40 parameters, Rodas5P; the output times), against the compiled
forward sensitivities (Robertson's rates, Rodas5P/KenCarp4/QNDF; Lotka–Volterra's y0 and
arguments), against the native engine's ``InterpolatingAdjoint`` (the MLP), and the refusals.
"""

import pytest
import torch
from _fields import lotka_volterra, robertson

import pyneuralode as pn
from pyneuralode.compiled import numba_available

pytestmark = pytest.mark.skipif(
    not numba_available(), reason="numba is not installed (pip install 'pyneuralode[compiled]')"
)

F64 = dict(dtype=torch.float64)


K_ROBER = torch.tensor([0.04, 3e7, 1e4], **F64)
T_ROBER = torch.tensor([0.0, 1.0, 10.0, 100.0], **F64)
#: weights of the loss Σ w·y (y2 is ~1e-5: weighted up so that every component counts)
W_ROBER = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2e4, 1.0], [1.0, 2e4, 1.0], [1.0, 2e4, 1.0]], **F64)


class _MLP(torch.nn.Module):
    """2 → 40 → 2 with tanh: 202 parameters (above the forward-sensitivity limit of 100)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 40), torch.nn.Tanh(), torch.nn.Linear(40, 2)
        ).double()

    def forward(self, t, y):
        return self.net(y) - 0.5 * y


def _mlp_setup():
    torch.manual_seed(0)
    f = _MLP()
    y0 = torch.tensor([0.4, -0.3], **F64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, **F64)
    w = torch.randn(4, 2, **F64)
    return f, y0, t, w


def _assign(params, flat):
    i = 0
    for p in params:
        p.copy_(flat[i : i + p.numel()].reshape(p.shape))
        i += p.numel()


def _flat_grad(gs):
    return torch.cat([g.reshape(-1) for g in gs])


def test_mlp_202_parameters_default_route_vs_central_differences():
    """Above the forward limit compile=True takes the adjoint by itself; the gradient w.r.t. y0
    and all 202 parameters matches central differences of the compiled solve (directional, in
    three random directions, and per component for y0)."""
    f, y0, t, w = _mlp_setup()
    params = list(f.parameters())
    kw = dict(rtol=1e-10, atol=1e-12, compile=True)
    sol = pn.solve(f, y0, t, pn.Tsit5(), **kw)
    assert sol.stats["nsens"] == 202  # the adjoint's parameter channels (not n·(1+m) columns)
    grads = torch.autograd.grad((sol.ys * w).sum(), (y0, *params))
    assert sol.stats["nfe_adjoint"] > 0
    g = _flat_grad(grads)
    theta0 = _flat_grad([y0.detach()] + [p.detach() for p in params])

    def loss(theta):
        with torch.no_grad():  # in place: the compiled module reads the parameters' storage
            _assign(params, theta[2:])
            s = pn.solve(f, theta[:2], t, pn.Tsit5(), **kw)
            _assign(params, theta0[2:])
        return (s.ys * w).sum()

    gen = torch.Generator().manual_seed(1)
    eps = 1e-5
    for _ in range(3):
        d = torch.randn(theta0.shape, generator=gen, **F64)
        fd = (loss(theta0 + eps * d) - loss(theta0 - eps * d)) / (2 * eps)
        torch.testing.assert_close(g @ d, fd, rtol=1e-6, atol=1e-9)
    for i in range(2):
        e = torch.zeros_like(theta0)
        e[i] = eps
        fd = (loss(theta0 + e) - loss(theta0 - e)) / (2 * eps)
        torch.testing.assert_close(g[i], fd, rtol=1e-6, atol=1e-9)


def test_mlp_equals_native_interpolating_adjoint():
    """The same gradient as the native engine's InterpolatingAdjoint (both at rtol 1e-10; the
    explicit choice sensealg=pn.InterpolatingAdjoint() on the compiled path)."""
    f, y0, t, w = _mlp_setup()
    wrt = (y0, *f.parameters())
    grads = []
    for compile in (True, False):
        sol = pn.solve(
            f,
            y0,
            t,
            pn.Tsit5(),
            rtol=1e-10,
            atol=1e-12,
            sensealg=pn.InterpolatingAdjoint(),
            compile=compile,
        )
        grads.append(_flat_grad(torch.autograd.grad((sol.ys * w).sum(), wrt)))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


def test_lotka_volterra_y0_args_and_times():
    """y0 and a tensor argument: the compiled forward sensitivities' gradient (to 1e-8); the
    output times (t0 included) against central differences."""
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F64, requires_grad=True)
    y0 = torch.tensor([1.0, 1.0], **F64, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 1.5, 3.0], **F64, requires_grad=True)
    w = torch.tensor([[0.5, -1.0], [1.0, 2.0], [-1.0, 0.5], [2.0, 1.0]], **F64)
    kw = dict(args=(p,), rtol=1e-11, atol=1e-13, compile=True)
    sol = pn.solve(lotka_volterra, y0, t, pn.Tsit5(), sensealg=pn.InterpolatingAdjoint(), **kw)
    ga = torch.autograd.grad((sol.ys * w).sum(), (y0, p, t))
    sol = pn.solve(lotka_volterra, y0, t.detach(), pn.Tsit5(), sensealg=pn.DirectAdjoint(), **kw)
    assert "nfe_adjoint" not in sol.stats and sol.stats["nsens"] == 6  # forward sensitivities
    gf = torch.autograd.grad((sol.ys * w).sum(), (y0, p))
    torch.testing.assert_close(ga[0], gf[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ga[1], gf[1], rtol=1e-8, atol=1e-10)
    eps = 1e-6
    for i in range(4):
        with torch.no_grad():
            tp, tm = t.detach().clone(), t.detach().clone()
            tp[i] += eps
            tm[i] -= eps
            lp = (pn.solve(lotka_volterra, y0, tp, pn.Tsit5(), **kw).ys * w).sum()
            lm = (pn.solve(lotka_volterra, y0, tm, pn.Tsit5(), **kw).ys * w).sum()
        torch.testing.assert_close(ga[2][i], (lp - lm) / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["Rodas5P", "KenCarp4", "QNDF"])
def test_robertson_rates_equal_forward_sensitivities(name):
    """Stiff methods: the backward system's traced Jacobian; ∂loss/∂(y0, k) equals the compiled
    forward sensitivities' (both at rtol 1e-9) to 1e-6 relative."""
    solver = getattr(pn, name)()
    grads = []
    for sa in (pn.InterpolatingAdjoint(), pn.DirectAdjoint()):
        k = K_ROBER.clone().requires_grad_(True)
        y0 = torch.tensor([1.0, 0.0, 0.0], **F64, requires_grad=True)
        sol = pn.solve(
            robertson,
            y0,
            T_ROBER,
            solver,
            args=(k,),
            rtol=1e-9,
            atol=1e-12,
            compile=True,
            sensealg=sa,
        )
        grads.append(torch.autograd.grad((sol.ys * W_ROBER).sum(), (y0, k)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


class _ManyRates(torch.nn.Module):
    """Robertson with log-rates ``log k0 + C θ``: 40 parameters θ (n·(1+m) = 123 > 40, beyond
    the implicit forward-sensitivity limit)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.C = 0.05 * torch.randn(3, 40, generator=gen, **F64)
        self.theta = torch.nn.Parameter(0.1 * torch.randn(40, generator=gen, **F64))

    def rates(self):
        return K_ROBER * torch.exp(self.C @ self.theta)

    def forward(self, t, y):
        return robertson(t, y, self.rates())


def test_robertson_40_parameters_rodas5p_vs_chain_rule_and_differences():
    """Rodas5P, 40 parameters, taken by the adjoint by default: the gradient equals the chain
    rule through the rates' forward-sensitivity gradient (1e-6) and a central difference in a
    random direction; the output times' gradient (t requiring grad: the adjoint route) against
    central differences."""
    f = _ManyRates()
    y0 = torch.tensor([1.0, 0.0, 0.0], **F64)
    kw = dict(rtol=1e-9, atol=1e-12, compile=True)
    sol = pn.solve(f, y0, T_ROBER, pn.Rodas5P(), **kw)
    (g_theta,) = torch.autograd.grad((sol.ys * W_ROBER).sum(), f.theta)
    assert sol.stats["nsens"] == 40 and sol.stats["nfe_adjoint"] > 0
    # chain rule: ∂L/∂θ = Cᵀ (k ⊙ ∂L/∂k), ∂L/∂k by compiled forward sensitivities
    k = f.rates().detach().requires_grad_(True)
    s = pn.solve(robertson, y0, T_ROBER, pn.Rodas5P(), args=(k,), **kw)
    (gk,) = torch.autograd.grad((s.ys * W_ROBER).sum(), k)
    torch.testing.assert_close(g_theta, f.C.t() @ (k.detach() * gk), rtol=1e-6, atol=1e-12)
    th0 = f.theta.detach().clone()
    d = torch.randn(40, generator=torch.Generator().manual_seed(3), **F64)
    tight = dict(rtol=1e-11, atol=1e-14, compile=True)

    def loss(theta, times):
        with torch.no_grad():
            f.theta.copy_(theta)
            out = (pn.solve(f, y0, times, pn.Rodas5P(), **tight).ys * W_ROBER).sum()
            f.theta.copy_(th0)
        return out

    eps = 1e-4
    fd = (loss(th0 + eps * d, T_ROBER) - loss(th0 - eps * d, T_ROBER)) / (2 * eps)
    torch.testing.assert_close(g_theta @ d, fd, rtol=1e-5, atol=1e-12)
    # ∂L/∂t_i = ⟨∂L/∂y(t_i), f(t_i, y(t_i))⟩ is as accurate as y(t_i): f of Robertson's
    # quasi-steady y2 is a small difference of large terms, so this check solves tightly
    t = T_ROBER.clone().requires_grad_(True)
    sol = pn.solve(f, y0, t, pn.Rodas5P(), **tight)
    (g_t,) = torch.autograd.grad((sol.ys * W_ROBER).sum(), t)
    for i in range(4):
        e = 1e-5 * max(1.0, float(T_ROBER[i]))
        tp, tm = T_ROBER.clone(), T_ROBER.clone()
        tp[i] += e
        tm[i] -= e
        fd = (loss(th0, tp) - loss(th0, tm)) / (2 * e)
        torch.testing.assert_close(g_t[i], fd, rtol=1e-5, atol=1e-9)


def test_routing_and_clear_errors():
    """Forward sensitivities within the limits, the adjoint above; what the compiled path
    refuses, with the alternative named."""
    y0 = torch.tensor([1.0, 1.0], **F64)
    t = torch.linspace(0, 1, 3, **F64)
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F64, requires_grad=True)
    sol = pn.solve(lotka_volterra, y0, t, pn.Tsit5(), args=(p,), compile=True)
    assert sol.stats["nsens"] == 4 and "nfe_adjoint" not in sol.stats  # forward
    sol = pn.solve(
        lotka_volterra, y0, t.clone().requires_grad_(True), pn.Tsit5(), args=(p,), compile=True
    )
    with pytest.raises(ValueError, match=r"sol\(tq\).*torch\.no_grad\(\)"):
        sol(torch.tensor([0.5], **F64))  # the adjoint route (t requires grad): no gradient there
    with torch.no_grad():
        assert torch.isfinite(sol(torch.tensor([0.5], **F64))).all()
    for bad, match in [
        (pn.BacksolveAdjoint(), r"does not support BacksolveAdjoint.*InterpolatingAdjoint"),
        (pn.DirectAdjoint(checkpoints=4), r"checkpoints.*InterpolatingAdjoint"),
        (pn.InterpolatingAdjoint(seminorm=True), r"seminorm=False"),
        (pn.InterpolatingAdjoint(solver=pn.Dopri5()), r"forward method \(Tsit5\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            pn.solve(lotka_volterra, y0, t, pn.Tsit5(), args=(p,), compile=True, sensealg=bad)
    many = torch.ones(120, **F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"m=120 .*sensealg=pn\.InterpolatingAdjoint\(\)"):
        pn.solve(
            lambda t, y, q: -q.sum() * y,
            torch.ones(1, **F64),
            t,
            pn.Tsit5(),
            args=(many,),
            compile=True,
            sensealg=pn.DirectAdjoint(),
        )
    with pytest.raises(ValueError, match=r"t\.detach\(\).*InterpolatingAdjoint"):
        pn.solve(
            lotka_volterra,
            y0,
            t.clone().requires_grad_(True),
            pn.Tsit5(),
            args=(p,),
            compile=True,
            sensealg=pn.DirectAdjoint(),
        )
    with pytest.raises(ValueError, match=r"ensemble.*forward sensitivities only"):
        pn.solve(
            robertson,
            torch.tensor([[1.0, 0.0, 0.0]] * 2, **F64),
            T_ROBER,
            pn.Rodas5P(batched=True),
            args=(K_ROBER,),
            compile=True,
            sensealg=pn.InterpolatingAdjoint(),
        )
