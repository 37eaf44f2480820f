"""Gradients on the compiled path (``compile=True``): forward sensitivities into torch autograd.

Against finite differences (``torch.autograd.gradcheck`` on fixed steps, where the forward
sensitivity of an explicit RK method is the exact derivative of the discrete solution; central
differences of the compiled solve for Robertson's three rate constants), against the native
engine's ``DirectAdjoint`` (backpropagation through the same fixed steps: equal to rounding;
adaptive: equal to the tolerance) and against an analytic derivative.
"""

import math

import pytest
import torch
from _fields import lotka_volterra, robertson

import pyneuralode as pn
from pyneuralode.compiled import numba_available

pytestmark = pytest.mark.skipif(
    not numba_available(), reason="numba is not installed (pip install 'pyneuralode[compiled]')"
)

F64 = dict(dtype=torch.float64)


LV_T = torch.linspace(0, 2, 5, **F64)
LV_FIXED = dict(adaptive=False, dt=0.05)


def test_gradcheck_fixed_steps():
    """gradcheck (float64 central differences) w.r.t. y0 and a tensor argument: on fixed steps
    the compiled forward sensitivities are the exact derivative of the discrete solution."""
    y0 = torch.tensor([1.0, 0.5], **F64, requires_grad=True)
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F64, requires_grad=True)

    def fn(y0, p):
        return pn.solve(
            lotka_volterra, y0, LV_T, pn.Tsit5(), args=(p,), compile=True, **LV_FIXED
        ).ys

    assert torch.autograd.gradcheck(fn, (y0, p), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_equals_direct_adjoint_fixed_steps():
    """The same fixed steps natively with DirectAdjoint (backpropagation through the solver):
    the same gradient to rounding, for a loss on all outputs."""
    y0 = torch.tensor([1.0, 0.5], **F64, requires_grad=True)
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F64, requires_grad=True)
    w = torch.linspace(0.5, 2.0, 10, **F64).reshape(5, 2)
    grads = []
    for compile in (True, False):
        sol = pn.solve(lotka_volterra, y0, LV_T, pn.Tsit5(), args=(p,), compile=compile, **LV_FIXED)
        grads.append(torch.autograd.grad((w * sol.ys).sum(), (y0, p)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.fixture(scope="module")
def robertson_setup():
    k = torch.tensor([0.04, 3e7, 1e4], **F64)
    y0 = torch.tensor([1.0, 0.0, 0.0], **F64)
    t = torch.tensor([0.0, 1.0, 10.0, 100.0], **F64)
    w = torch.tensor([1.0, 1e4, 1.0], **F64)  # y2 is ~1e-5: weigh it up

    def loss(k, compile=True, rtol=1e-11, atol=1e-16, solver="Rodas5P"):
        sol = pn.solve(
            robertson,
            y0,
            t,
            getattr(pn, solver)(),
            args=(k,),
            rtol=rtol,
            atol=atol,
            compile=compile,
        )
        return (w * sol.ys[1:]).sum()

    return k, loss


@pytest.mark.parametrize("name,bound", [("Rodas5P", 1e-6), ("KenCarp4", 2e-5), ("QNDF", 1e-6)])
def test_robertson_rate_constants_vs_central_differences(robertson_setup, name, bound):
    """∂loss/∂(k1, k2, k3) of Robertson (adaptive) against central differences of the compiled
    solve: to 1e-6 relative with Rodas5P and QNDF; KenCarp4's Newton iterations (stopped at a
    fraction of the tolerance) leave more noise in the differences."""
    k, loss = robertson_setup
    kk = k.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(kk, solver=name), kk)
    fd = torch.empty(3, **F64)
    with torch.no_grad():
        for i in range(3):
            h = 1e-4 * k[i].item()
            e = torch.zeros(3, **F64)
            e[i] = h
            fd[i] = (loss(k + e, solver=name) - loss(k - e, solver=name)) / (2 * h)
    rel = ((g - fd).abs() / fd.abs()).max().item()
    assert rel < bound, (g, fd, rel)


def test_robertson_vs_native_direct_adjoint(robertson_setup):
    """The native engine's DirectAdjoint gradient (different steps: the compiled error norm also
    covers the sensitivities) agrees to the tolerance."""
    k, loss = robertson_setup
    kk = k.clone().requires_grad_(True)
    (a,) = torch.autograd.grad(loss(kk, rtol=1e-8, atol=1e-12), kk)
    (b,) = torch.autograd.grad(loss(kk, compile=False, rtol=1e-8, atol=1e-12), kk)
    assert ((a - b).abs() / b.abs()).max().item() < 1e-5, (a, b)


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
        ).double()

    def forward(self, t, y):
        return self.net(y) - 0.5 * y


def test_module_parameters_equal_direct_adjoint():
    """nn.Module parameters (captured by the trace) and y0 get the DirectAdjoint gradient of the
    same fixed steps."""
    torch.manual_seed(0)
    f = _Field()
    y0 = torch.tensor([0.3, -0.2], **F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, **F64)
    wrt = (y0, *f.parameters())
    grads = []
    for compile in (True, False):
        sol = pn.solve(f, y0, t, pn.Tsit5(), adaptive=False, dt=0.1, compile=compile)
        grads.append(torch.autograd.grad((sol.ys**2).sum(), wrt))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


THETA = torch.tensor(0.7, **F64, requires_grad=True)


def decay(t, y):
    return -THETA * y  # THETA is captured, not passed: found in the traced graph


def test_captured_tensor_analytic():
    """A tensor f captures (not an argument, not a module parameter) gets its gradient:
    y = y0 exp(-θ t), ∂y/∂θ = -t y, ∂y/∂y0 = exp(-θ t)."""
    y0 = torch.tensor([2.0], **F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.5], **F64)
    sol = pn.solve(decay, y0, t, pn.Tsit5(), rtol=1e-10, atol=1e-12, compile=True)
    gth, gy0 = torch.autograd.grad(sol.ys.sum(), (THETA, y0))
    th = THETA.item()
    exact_th = sum(-tt * 2.0 * math.exp(-th * tt) for tt in (0.5, 1.5))
    exact_y0 = sum(math.exp(-th * tt) for tt in (0.0, 0.5, 1.5))
    assert abs(gth.item() - exact_th) < 1e-8 * abs(exact_th)
    assert abs(gy0.item() - exact_y0) < 1e-8 * exact_y0
    assert sol.stats["nsens"] == 2


def test_dense_output_carries_the_gradient():
    """sol(tq) of a solve with sensitivities interpolates S too: its gradient is the derivative
    of the interpolated state (-t y for y = y0 exp(-θ t))."""
    y0 = torch.tensor([2.0], **F64)
    sol = pn.solve(
        decay,
        y0,
        torch.tensor([0.0, 2.0], **F64),
        pn.Tsit5(),
        rtol=1e-10,
        atol=1e-12,
        compile=True,
    )
    tq = (0.3, 1.1)
    v = sol(torch.tensor(tq, **F64))
    (g,) = torch.autograd.grad(v.sum(), THETA)
    th = THETA.item()
    exact = sum(-tt * 2.0 * math.exp(-th * tt) for tt in tq)
    assert abs(g.item() - exact) < 1e-8 * abs(exact)
    torch.testing.assert_close(
        v.detach().reshape(-1),
        torch.tensor([2.0 * math.exp(-th * tt) for tt in tq], **F64),
        rtol=1e-9,
        atol=0,
    )


def built_inside(t, y):
    return -y * torch.tensor([1.0, 2.0], dtype=torch.float64)  # a constant f makes from data


def test_constant_built_inside_f():
    """A tensor f builds from data (torch.tensor) is a constant of the sensitivity system too:
    ∂y(1)/∂y0 = exp(-c)."""
    y0 = torch.tensor([1.0, 1.0], **F64, requires_grad=True)
    sol = pn.solve(
        built_inside,
        y0,
        torch.tensor([0.0, 1.0], **F64),
        pn.Tsit5(),
        rtol=1e-10,
        atol=1e-12,
        compile=True,
    )
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), y0)
    torch.testing.assert_close(g, torch.exp(-torch.tensor([1.0, 2.0], **F64)), rtol=1e-8, atol=0)


def scaled(t, y, p):
    return -p.sum() * y


def test_clear_errors():
    """Forward sensitivities chosen explicitly (sensealg=pn.DirectAdjoint()) refuse gradients
    w.r.t. t and more parameters than they are for (without sensealg the compiled adjoint takes
    those: tests/test_compiled_adjoint.py)."""
    t = torch.tensor([0.0, 1.0], **F64, requires_grad=True)
    direct = dict(compile=True, sensealg=pn.DirectAdjoint())
    with pytest.raises(ValueError, match=r"t\.detach\(\)"):
        pn.solve(decay, torch.ones(1, **F64), t, pn.Tsit5(), **direct)
    p = torch.ones(120, **F64, requires_grad=True)  # too many parameters for forward sensitivity
    with pytest.raises(ValueError, match=r"m=120 .*sensealg=pn.InterpolatingAdjoint\(\)"):
        pn.solve(scaled, torch.ones(1, **F64), t.detach(), pn.Tsit5(), args=(p,), **direct)
