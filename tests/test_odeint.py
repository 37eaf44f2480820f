"""pn.odeint as a drop-in for torchdiffeq.odeint: same call, same results (compared against
torchdiffeq itself when it is installed) and against exact solutions."""

import math

import pytest
import torch

import pyneuralode as pn

torchdiffeq = pytest.importorskip(
    "torchdiffeq",
    reason="torchdiffeq is not installed (pip install torchdiffeq) — the comparison needs it",
)

A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)


def func(t, y):  # torchdiffeq's spiral demo: y' = y³ A, in a batch of 3
    return (y**3) @ A


def linear(t, y):
    return y @ A


Y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, -0.25]], dtype=torch.float64)
T = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)


def exact_linear(t):
    return torch.stack([Y0 @ torch.linalg.matrix_exp(A * ti) for ti in t])


def test_dopri5_matches_torchdiffeq():
    ours = pn.odeint(func, Y0, T, method="dopri5", rtol=1e-7, atol=1e-9)
    ref = torchdiffeq.odeint(func, Y0, T, method="dopri5", rtol=1e-7, atol=1e-9)
    assert ours.shape == ref.shape == (5, 3, 2)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    tight = torchdiffeq.odeint(func, Y0, T, method="dopri5", rtol=1e-12, atol=1e-12)
    assert (ours - tight).abs().max() < 1e-5


def test_dopri5_exact_linear():
    ours = pn.odeint(linear, Y0, T, method="dopri5", rtol=1e-9, atol=1e-11)
    assert torch.allclose(ours, exact_linear(T), atol=1e-8)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_fixed_grid_on_output_times(method):
    """Without options torchdiffeq steps once between consecutive output times; so do we."""
    t = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
    ours = pn.odeint(func, Y0, t, method=method)
    ref = torchdiffeq.odeint(func, Y0, t, method=method)
    if method == "euler":  # the same algorithm: identical up to rounding
        assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    else:  # torchdiffeq's "rk4" is Kutta's 3/8 rule, ours the classical RK4: both O(h⁴)
        assert torch.allclose(ours, ref, atol=1e-4)
        lin_ours = pn.odeint(linear, Y0, t, method=method)
        assert (lin_ours - exact_linear(t)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_fixed_step_size_option(method):
    step = 0.05  # output times on multiples of the step: both land on them
    ours = pn.odeint(func, Y0, T, method=method, options=dict(step_size=step))
    ref = torchdiffeq.odeint(func, Y0, T, method=method, options=dict(step_size=step))
    assert ours.shape == ref.shape == (5, 3, 2)
    if method == "euler":
        assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    else:
        assert torch.allclose(ours, ref, atol=1e-5)
    # steps whose grids hold the output times (elsewhere torchdiffeq's linear interpolation, O(h²),
    # rules)
    coarse = pn.odeint(linear, Y0, T, method=method, options=dict(step_size=0.125))
    fine = pn.odeint(linear, Y0, T, method=method, options=dict(step_size=0.0625))
    e_c, e_f = ((x - exact_linear(T)).abs().max().item() for x in (coarse, fine))
    ratio = e_c / e_f
    assert (1.6 < ratio < 2.5) if method == "euler" else (12 < ratio < 20), ratio


def test_dopri5_first_step_and_max_num_steps_options():
    ours = pn.odeint(func, Y0, T, method="dopri5", options=dict(first_step=1e-3))
    ref = torchdiffeq.odeint(func, Y0, T, method="dopri5")
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(pn.SolveError) as ei:
        pn.odeint(func, Y0, T, method="dopri5", rtol=1e-10, options=dict(max_num_steps=3))
    assert ei.value.retcode == "MaxIters"
    with pytest.warns(UserWarning, match="dopri5: Unexpected arguments"):  # torchdiffeq's warning
        pn.odeint(func, Y0, T, method="dopri5", options=dict(grid_constructor=None))


def test_default_method_and_gradients_match_torchdiffeq():
    w = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def g(t, y):
        return -w * y + torch.sin(t)

    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    ours = pn.odeint(g, y0, T, rtol=1e-9, atol=1e-11)  # default method (dopri5)
    ref = torchdiffeq.odeint(g, y0, T, rtol=1e-9, atol=1e-11)  # default method (dopri5)
    assert torch.allclose(ours, ref, atol=1e-7)
    (g1,) = torch.autograd.grad(ours[-1].sum(), w)
    (g2,) = torch.autograd.grad(ref[-1].sum(), w)
    assert abs(g1.item() - g2.item()) < 1e-6


def test_tuple_state_like_torchdiffeq():
    def osc(t, s):
        x, v = s
        return v, -x

    s0 = (torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    xs, vs = pn.odeint(osc, s0, T, method="dopri5", rtol=1e-9, atol=1e-11)
    rx, rv = torchdiffeq.odeint(osc, s0, T, method="dopri5", rtol=1e-9, atol=1e-11)
    assert torch.allclose(xs, rx, atol=1e-8) and torch.allclose(vs, rv, atol=1e-8)
    assert abs(xs[-1, 0].item() - math.cos(1.0)) < 1e-8


def _counting(fn):
    calls = [0]

    def g(t, y):
        calls[0] += 1
        return fn(t, y)

    return g, calls


@pytest.mark.parametrize(
    "opts", [{}, dict(safety=0.8, ifactor=5.0, dfactor=0.3)], ids=["defaults", "custom"]
)
def test_dopri5_controller_options_follow_torchdiffeq(opts):
    """torchdiffeq's safety/ifactor/dfactor map to the integral controller: NFE within 10% of
    torchdiffeq's own dopri5 with the same options, and custom settings change the step sequence."""
    ours_f, ours_n = _counting(func)
    ref_f, ref_n = _counting(func)
    ours = pn.odeint(ours_f, Y0, T, method="dopri5", rtol=1e-6, atol=1e-8, options=dict(opts))
    ref = torchdiffeq.odeint(
        ref_f, Y0, T, method="dopri5", rtol=1e-6, atol=1e-8, options=dict(opts)
    )
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5)
    assert abs(ours_n[0] - ref_n[0]) <= 0.1 * ref_n[0], (ours_n[0], ref_n[0])
    default = pn.odeint(func, Y0, T, method="dopri5", rtol=1e-6, atol=1e-8)
    assert torch.equal(default, ours) == (not opts)  # other settings, other steps, other rounding


def test_controller_option_errors():
    with pytest.raises(ValueError, match=r"options\['safety'\]"):
        pn.odeint(func, Y0, T, method="dopri5", options=dict(safety=1.5))
    with pytest.raises(ValueError, match="dfactor < 1 < ifactor"):
        pn.odeint(func, Y0, T, method="dopri5", options=dict(ifactor=0.5))
    with pytest.raises(TypeError, match=r"options\['dfactor'\]"):
        pn.odeint(func, Y0, T, method="dopri5", options=dict(dfactor="small"))
