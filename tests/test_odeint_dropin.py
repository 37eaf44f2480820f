"""pn.odeint / odeint_adjoint / odeint_event as torchdiffeq drop-ins: the same calls run through
torchdiffeq and pyneuralode side by side (results, gradients, NFE), fitted convergence orders of
every method, and torchdiffeq's options, callbacks, events and errors."""

import math
import sys
import warnings

import numpy as np
import pytest
import torch

import pyneuralode as pn

torchdiffeq = pytest.importorskip(
    "torchdiffeq", reason="torchdiffeq is not installed (pip install torchdiffeq)"
)
TD_SOLVERS = set(sys.modules["torchdiffeq._impl.odeint"].SOLVERS)

A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
Y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)

ADAPTIVE = ["dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"]
FIXED = [
    "euler",
    "midpoint",
    "heun2",
    "heun3",
    "rk4",
    "explicit_adams",
    "implicit_adams",
    "fixed_adams",
]
IMPLICIT = [
    "implicit_euler",
    "implicit_midpoint",
    "trapezoid",
    "radauIIA3",
    "radauIIA5",
    "gl4",
    "gl6",
    "sdirk2",
    "trbdf2",
]
ORDER = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
    "explicit_adams": 4,
    "implicit_adams": 5,
    "fixed_adams": 5,
    "implicit_euler": 1,
    "implicit_midpoint": 2,
    "trapezoid": 2,
    "radauIIA3": 3,
    "radauIIA5": 5,
    "gl4": 4,
    "gl6": 6,
    "sdirk2": 2,
    "trbdf2": 2,
}


class Counting(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.nfe = fn, 0

    def forward(self, t, y):
        self.nfe += 1
        return self.fn(t, y)


def spiral(t, y):  # torchdiffeq's demo: non-linear
    return (y**3) @ A


def linear(t, y):
    return y @ A


def exact_linear(t, y0=Y0):
    return torch.stack([y0 @ torch.linalg.matrix_exp(A * ti) for ti in t])


# ---------------------------------------------------------------------------------------------
# side by side with torchdiffeq


@pytest.mark.parametrize("method", [m for m in ADAPTIVE + FIXED + ["scipy_solver"]])
def test_same_results_and_nfe_as_torchdiffeq(method):
    if method not in TD_SOLVERS:
        pytest.skip(f"the installed torchdiffeq has no {method!r}")
    t = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    opts = dict(step_size=0.05) if method in FIXED else {}
    kw = dict(rtol=1e-12, atol=1e-14) if method == "dopri8" else {}
    if method in ("adaptive_heun", "fehlberg2"):  # second order: thousands of steps at 1e-7
        kw = dict(rtol=1e-5, atol=1e-7)
    ours_f, ref_f = Counting(spiral), Counting(spiral)
    ours = pn.odeint(ours_f, Y0, t, method=method, options=dict(opts), **kw)
    ref = torchdiffeq.odeint(ref_f, Y0, t, method=method, options=dict(opts), **kw)
    assert ours.shape == ref.shape
    if method in FIXED:  # the same algorithm on the same grid: equal up to rounding, equal NFE
        assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12), (ours - ref).abs().max()
        assert ours_f.nfe == ref_f.nfe
    else:
        close = 1e-3 if kw.get("rtol") == 1e-5 else 1e-4
        assert torch.allclose(ours, ref, rtol=close, atol=close / 10), (ours - ref).abs().max()
        if method != "scipy_solver":
            # same tableau, same controller; initial step and step-end details may differ slightly;
            # fehlberg2: torchdiffeq reuses its third stage (at the low-order point) as the next f0,
            # we evaluate f(t1, y1): 4 evaluations a step instead of 3
            slack = {"fehlberg2": 0.6, "adaptive_heun": 1.2}.get(method, 0.35)  # heun: 3 vs 2
            assert abs(ours_f.nfe - ref_f.nfe) <= slack * ref_f.nfe + 8, (ours_f.nfe, ref_f.nfe)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "implicit_adams"])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_output_times_off_the_grid_interpolate_like_torchdiffeq(method, interp):
    t = torch.tensor([0.0, 0.13, 0.5, 0.77, 1.0], dtype=torch.float64)
    opts = dict(step_size=0.1, interp=interp)
    ours = pn.odeint(spiral, Y0, t, method=method, options=dict(opts))
    ref = torchdiffeq.odeint(spiral, Y0, t, method=method, options=dict(opts))
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["euler", "rk4", "midpoint"])
def test_fixed_grid_gradients_match_torchdiffeq(method):
    """Gradients w.r.t. y0, t and a parameter through the fixed grid t: torchdiffeq's, to
    rounding."""

    def grads(lib):
        w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        y0 = Y0.clone().requires_grad_(True)
        t = torch.tensor([0.0, 0.3, 0.45, 1.0], dtype=torch.float64, requires_grad=True)
        ys = lib.odeint(lambda tt, y: w * spiral(tt, y) + torch.sin(tt), y0, t, method=method)
        return torch.autograd.grad(
            (ys * torch.arange(ys.numel()).reshape(ys.shape)).sum(), (w, y0, t)
        )

    for g1, g2 in zip(grads(pn), grads(torchdiffeq)):
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "method", ["euler", "rk4", "heun3", "implicit_euler", "gl4", "explicit_adams"]
)
def test_fixed_grid_t_gradient_is_the_derivative_of_the_output(method):
    """Issue 16 item 7: on the output grid the gradient w.r.t. t is that of the computed output."""
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.2, 0.35, 0.6, 0.7], dtype=torch.float64, requires_grad=True)

    def f(tt, y):
        return torch.stack([y[1], -torch.sin(y[0]) + 0.3 * torch.cos(tt)])

    assert torch.autograd.gradcheck(lambda y, tt: pn.odeint(f, y, tt, method=method), (y0, t))


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
def test_adaptive_gradients_match_torchdiffeq(method):
    # tolerances a low-order method reaches in a few hundred steps (adaptive_heun at 1e-10 would
    # take ~1e5 steps, each kept in the graph)
    rtol = {"dopri5": 1e-10, "bosh3": 1e-7, "adaptive_heun": 1e-5}[method]

    def grads(lib, **kw):
        w = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        y0 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        t = torch.linspace(0, 2, 4, dtype=torch.float64)
        ys = lib.odeint(
            lambda tt, y: -w * y + torch.sin(tt), y0, t, method=method, rtol=rtol, atol=rtol, **kw
        )
        return torch.autograd.grad(ys.sum(), (w, y0))

    for g1, g2 in zip(grads(pn), grads(torchdiffeq)):
        assert torch.allclose(g1, g2, rtol=100 * rtol, atol=100 * rtol)


def test_default_method_is_dopri5_with_torchdiffeq_tolerances():
    f1, f2 = Counting(spiral), Counting(spiral)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    ours, ref = pn.odeint(f1, Y0, t), torchdiffeq.odeint(f2, Y0, t)
    exact = torchdiffeq.odeint(spiral, Y0, t, rtol=1e-12, atol=1e-14)
    # both at rtol=1e-7, atol=1e-9: errors of the same size (each ~6e-8 here), not equal values
    err_ours, err_ref = (ours - exact).abs().max(), (ref - exact).abs().max()
    assert err_ours <= 2 * err_ref + 1e-9 and err_ours < 1e-6, (err_ours, err_ref)
    dp5 = pn.odeint(spiral, Y0, t, method="dopri5", rtol=1e-7, atol=1e-9)
    assert torch.equal(ours, dp5)
    assert abs(f1.nfe - f2.nfe) <= 0.2 * f2.nfe


def test_tuple_state_and_mixed_norm():
    def osc(t, s):
        x, v = s
        return v, -x

    s0 = (
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor([1e-3], dtype=torch.float64),  # a small component: the max-of-RMS norm
    )
    t = torch.linspace(0, 3, 4, dtype=torch.float64)
    for method in ("dopri5", "rk4", "implicit_adams"):
        ours = pn.odeint(
            osc, s0, t, method=method, options={} if method == "dopri5" else dict(step_size=0.01)
        )
        ref = torchdiffeq.odeint(
            osc, s0, t, method=method, options={} if method == "dopri5" else dict(step_size=0.01)
        )
        for a, b in zip(ours, ref):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# convergence orders


def _order_options(method, h):
    if method in IMPLICIT:
        return dict(step_size=h, max_iters=200)
    if "adams" in method:  # fixed order 4 (torchdiffeq's default max_order=12 raises it to 11)
        return dict(step_size=h, max_order=5, max_iters=50)
    return dict(step_size=h)


def _fitted_order(method, f, exact, y0, t_end=1.0, steps=(0.1, 0.05, 0.025)):
    errs = []
    t = torch.tensor([0.0, t_end], dtype=torch.float64)
    for h in steps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = pn.odeint(
                f,
                y0,
                t,
                method=method,
                options=_order_options(method, h),
            )
        errs.append(float((y[-1] - exact).abs().max()))
    return np.polyfit(np.log(steps), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("method", FIXED + IMPLICIT)
def test_convergence_order_linear(method):
    exact = exact_linear([1.0])[0]
    steps = (0.2, 0.1, 0.05) if ORDER[method] >= 5 and "adams" not in method else (0.1, 0.05, 0.025)
    p, errs = _fitted_order(method, linear, exact, Y0, steps=steps)
    assert abs(p - ORDER[method]) < 0.35, (p, errs)


def _vdp_reference():
    from scipy.integrate import solve_ivp

    sol = solve_ivp(
        lambda t, y: [y[1], 0.5 * (1 - y[0] ** 2) * y[1] - y[0]],
        (0, 1.0),
        [2.0, 0.0],
        method="DOP853",
        rtol=1e-13,
        atol=1e-13,
    )
    return torch.tensor(sol.y[:, -1], dtype=torch.float64)


@pytest.mark.parametrize("method", FIXED + IMPLICIT)
def test_convergence_order_nonlinear(method):
    def vdp(t, y):
        return torch.stack([y[1], 0.5 * (1 - y[0] ** 2) * y[1] - y[0]])

    steps = (0.2, 0.1, 0.05) if ORDER[method] >= 5 and "adams" not in method else (0.1, 0.05, 0.025)
    p, errs = _fitted_order(
        method, vdp, _vdp_reference(), torch.tensor([2.0, 0.0], dtype=torch.float64), steps=steps
    )
    assert abs(p - ORDER[method]) < 0.4, (p, errs)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_reach_the_tolerance(method):
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    # second-order methods: tolerances they reach in a few hundred steps
    tols = (1e-3, 1e-6) if method in ("adaptive_heun", "fehlberg2") else (1e-5, 1e-8)
    errs = []
    for tol in tols:
        y = pn.odeint(linear, Y0, t, method=method, rtol=tol, atol=tol * 1e-2)
        errs.append(float((y - exact_linear(t)).abs().max()))
    assert errs[1] < 1e3 * tols[1] and errs[1] < errs[0] / 30, errs


# ---------------------------------------------------------------------------------------------
# options


def test_unexpected_option_warns_like_torchdiffeq():
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    for method, opt in (
        ("dopri5", "step_size"),
        ("euler", "first_step"),
        ("implicit_euler", "safety"),
    ):
        with pytest.warns(UserWarning, match=f"{method}: Unexpected arguments .*{opt}"):
            pn.odeint(linear, Y0, t, method=method, options={opt: 0.1})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.warns(UserWarning, match="Unexpected arguments"):
                torchdiffeq.odeint(
                    linear,
                    Y0,
                    t,
                    method=method if method in TD_SOLVERS else "euler",
                    options={opt: 0.1},
                )


def test_option_errors():
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mutually exclusive"):
        pn.odeint(
            linear,
            Y0,
            t,
            method="euler",
            options=dict(step_size=0.1, grid_constructor=lambda f, y, t: t),
        )
    with pytest.raises(ValueError, match=r"options\['interp'\]"):
        pn.odeint(linear, Y0, t, method="euler", options=dict(interp="quadratic"))
    with pytest.raises(ValueError, match=r"options\['step_size'\]"):
        pn.odeint(linear, Y0, t, method="rk4", options=dict(step_size=-0.1))
    with pytest.raises(ValueError, match="valid names"):
        pn.odeint(linear, Y0, t, method="dopri7")
    with pytest.raises(pn.SolveError, match="max_steps") as ei:
        pn.odeint(spiral, Y0, t, method="dopri5", rtol=1e-10, options=dict(max_num_steps=3))
    assert ei.value.retcode == "MaxIters"
    with pytest.raises(ValueError, match=r"options\['safety'\]"):
        pn.odeint(spiral, Y0, t, method="dopri5", options=dict(safety=1.5))


def test_grid_constructor_and_perturb():
    calls = []

    def f(t, x):
        calls.append(float(t))
        return x

    x0 = torch.tensor(1.0, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    xs = pn.odeint(
        f,
        x0,
        t,
        method="euler",
        options=dict(grid_constructor=lambda f, y0, t: torch.linspace(0, 1, 11, dtype=t.dtype)),
    )
    assert abs(float(xs[1]) - 1.1**10) < 1e-12
    for perturb in (False, True):
        calls.clear()
        pn.odeint(f, x0, t, method="rk4", options=dict(step_size=0.5, perturb=perturb))
        assert (0.0 in calls) == (0.5 in calls) == (not perturb)


def test_jump_t_and_step_t():
    def jumpy(t, x):
        return -0.5 * x if t < 0.5 else x**2

    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    plain, jump = Counting(jumpy), Counting(jumpy)
    y_plain = pn.odeint(plain, x0, t, atol=1e-6, rtol=1e-6)
    assert (y_plain[1] - x0 * math.exp(-0.15)).abs().max() < 1e-5
    y_jump = pn.odeint(jump, x0, t, atol=1e-6, rtol=1e-6, options=dict(jump_t=torch.tensor([0.5])))
    assert jump.nfe < plain.nfe
    x_half = x0 * math.exp(-0.25)
    exact = x_half / (1 - 0.5 * x_half)
    assert (y_jump[-1] - exact).abs().max() < 3e-5 and y_jump.shape == (3, 2)
    assert torch.allclose(y_jump[1], x0 * math.exp(-0.15), atol=1e-7)
    y_step = pn.odeint(jumpy, x0, t, atol=1e-6, rtol=1e-6, options=dict(step_t=[0.5]))
    assert (y_step[-1] - exact).abs().max() < 1e-4


def test_user_norm_is_called_and_used():
    seen = []

    def linf(x):
        seen.append(x.shape)
        return x.abs().max()

    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    y = pn.odeint(spiral, Y0, t, options=dict(norm=linf))
    ref = torchdiffeq.odeint(spiral, Y0, t, options=dict(norm=lambda x: x.abs().max()))
    assert seen and seen[0] == Y0.shape and torch.allclose(y, ref, rtol=1e-6, atol=1e-8)


def test_callbacks_like_torchdiffeq():
    counts = {"step": 0, "accept": 0, "reject": 0}

    class F(torch.nn.Module):
        def forward(self, t, y):
            return torch.tanh(y) * torch.sin(20 * t)

        def callback_step(self, t0, y0, dt):
            assert isinstance(t0, torch.Tensor) and y0.shape == (2,)
            counts["step"] += 1

        def callback_accept_step(self, t0, y0, dt):
            counts["accept"] += 1

        def callback_reject_step(self, t0, y0, dt):
            counts["reject"] += 1

    x0 = torch.tensor([1.0, 2.0])
    pn.odeint(F(), x0, torch.tensor([0.0, 1.0]), rtol=1e-3, atol=1e-4, options=dict(first_step=0.5))
    assert (
        counts["step"] > 0
        and counts["accept"] + counts["reject"] == counts["step"]
        and counts["reject"] > 0
    )
    counts["step"] = 0
    pn.odeint(F(), x0, torch.tensor([0.0, 1.0]), method="rk4", options=dict(step_size=0.1))
    assert counts["step"] == 10
    with pytest.warns(UserWarning, match="does not support callbacks"):
        pn.odeint(F(), x0, torch.tensor([0.0, 1.0]), method="euler")


def test_time_dtype_as_torchdiffeq():
    seen = []
    lin = torch.nn.Linear(3, 2)

    def f(t, y):
        seen.append(t.dtype)
        return lin(torch.cat([t.expand(1), y]))

    y0 = torch.tensor([1.0, 0.0])
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    for method in ("dopri5", "rk4"):
        seen.clear()
        ys = pn.odeint(f, y0, t, method=method)
        assert ys.dtype == torch.float32 and set(seen) == {torch.float32}


def test_no_integration_returns_y0():
    for method in ("dopri5", "euler", "gl4", "scipy_solver"):
        y = pn.odeint(linear, Y0, torch.tensor([0.5], dtype=torch.float64), method=method)
        assert torch.equal(y, Y0[None])


def test_reverse_time():
    t = torch.linspace(1.0, 0.0, 5, dtype=torch.float64)
    y1 = exact_linear([1.0])[0]
    for method, tol in (("dopri5", 1e-6), ("rk4", 5e-6), ("gl6", 1e-9), ("scipy_solver", 1e-5)):
        ys = pn.odeint(
            linear,
            y1,
            t,
            method=method,
            options={} if method in ("dopri5", "scipy_solver") else dict(step_size=0.05),
        )
        assert (ys[-1] - Y0).abs().max() < tol, method


# ---------------------------------------------------------------------------------------------
# odeint_adjoint


class Odefunc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, y):
        return (y**3) @ self.A


def test_odeint_adjoint_gradients_match_odeint_and_torchdiffeq():
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    res = []
    for _lib, fn in (
        (pn, pn.odeint_adjoint),
        (pn, pn.odeint),
        (torchdiffeq, torchdiffeq.odeint_adjoint),
    ):
        f = Odefunc()
        y0 = Y0.clone().requires_grad_(True)
        ys = fn(f, y0, t, rtol=1e-9, atol=1e-11)
        ys.sum().backward()
        res.append((ys.detach(), y0.grad, f.A.grad))
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_odeint_adjoint_params_reach_closed_over_tensors():
    theta = torch.tensor([0.5, -0.3], dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return -theta * y

    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = pn.odeint_adjoint(f, y0, t, adjoint_params=(theta,), rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(ys[-1].sum(), theta)
    exact = -y0 * torch.exp(-theta.detach())
    assert torch.allclose(g, exact, atol=1e-7)
    with pytest.raises(ValueError, match="adjoint_params"):
        pn.odeint_adjoint(f, y0, t)


def test_odeint_adjoint_seminorm_and_adjoint_options():
    f1, f2 = Odefunc(), Odefunc()
    t = torch.linspace(0, 2, 3, dtype=torch.float64)
    grads, nfes = [], []
    for f, aopts in ((f1, None), (f2, dict(norm="seminorm"))):
        y0 = Y0.clone().requires_grad_(True)
        counter = Counting(f)
        ys = pn.odeint_adjoint(
            counter,
            y0,
            t,
            adjoint_params=tuple(f.parameters()),
            adjoint_options=aopts,
            adjoint_rtol=1e-8,
            adjoint_atol=1e-10,
        )
        n_fwd = counter.nfe
        ys.sum().backward()
        nfes.append(counter.nfe - n_fwd)
        grads.append(f.A.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert nfes[1] <= nfes[0]
    with pytest.raises(ValueError, match="seminorm"):
        pn.odeint_adjoint(Odefunc(), Y0, t, adjoint_options=dict(norm="l2"))


# ---------------------------------------------------------------------------------------------
# odeint_event


def test_odeint_event_vector_event_fn_and_gradient():
    g = torch.tensor(9.81, dtype=torch.float64, requires_grad=True)

    def fall(t, s):
        return torch.stack([s[1], -g])

    def event_fn(
        t, s
    ):  # the first component to cross: the ground (height 0), not the lower bound -1
        return torch.stack([s[0], s[0] + 1.0])

    s0 = torch.tensor([10.0, 0.0], dtype=torch.float64)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    te, ys = pn.odeint_event(fall, s0, t0, event_fn=event_fn)
    exact = math.sqrt(2 * 10 / 9.81)
    assert abs(float(te) - exact) < 1e-6 and ys.shape == (2, 2) and abs(float(ys[-1, 0])) < 1e-6
    (dte,) = torch.autograd.grad(te, g)
    assert abs(float(dte) - (-0.5 * exact / 9.81)) < 1e-6
    te2, _ = torchdiffeq.odeint_event(fall, s0, t0, event_fn=event_fn)
    assert abs(float(te) - float(te2)) < 1e-6


def test_odeint_event_reverse_fixed_step_and_adjoint_interface():
    def decay(t, y):
        return -y

    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    te, ys = pn.odeint_event(decay, y0, t0, event_fn=lambda t, y: y[0] - 2.0, reverse_time=True)
    assert abs(float(te) + math.log(2.0)) < 1e-6
    # fixed steps: the event by bisection on the step's linear interpolant, as torchdiffeq's
    te, ys = pn.odeint_event(
        decay, y0, t0, event_fn=lambda t, y: y[0] - 0.5, method="rk4", options=dict(step_size=0.01)
    )
    te_td, _ = torchdiffeq.odeint_event(
        decay, y0, t0, event_fn=lambda t, y: y[0] - 0.5, method="rk4", options=dict(step_size=0.01)
    )
    assert abs(float(te) - math.log(2.0)) < 2e-5 and abs(float(te) - float(te_td)) < 1e-12
    te, ys = pn.odeint_event(
        decay,
        y0,
        t0,
        event_fn=lambda t, y: y[0] - 0.5,
        odeint_interface=pn.odeint_adjoint,
        adjoint_params=(),
        rtol=1e-9,
        atol=1e-11,
    )
    (g,) = torch.autograd.grad(te, y0)  # t* = log(2 y0)
    assert abs(float(te) - math.log(2.0)) < 1e-7 and abs(float(g) - 1.0) < 1e-5


def test_odeint_with_event_fn_returns_event_time_and_states():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    te, ys = pn.odeint(
        lambda t, y: -y,
        torch.tensor([1.0], dtype=torch.float64),
        t,
        event_fn=lambda t, y: y[0] - 0.25,
    )
    assert abs(float(te) - math.log(4.0)) < 1e-6 and ys.shape == (2, 1)
    with pytest.raises(ValueError, match="len"):
        pn.odeint(
            lambda t, y: -y,
            torch.tensor([1.0]),
            torch.tensor([0.0, 1.0, 2.0]),
            event_fn=lambda t, y: y[0],
        )


# ---------------------------------------------------------------------------------------------
# odeint_adjoint as torchdiffeq's: the augmented system solved backwards through pn.odeint


@pytest.mark.parametrize(
    "method, options",
    [
        ("euler", dict(step_size=0.05)),
        ("rk4", dict(step_size=0.05)),
        ("implicit_adams", dict(step_size=0.05)),
        ("dopri5", None),
        ("scipy_solver", dict(solver="RK45")),
    ],
)
def test_odeint_adjoint_every_method_matches_torchdiffeq_and_odeint(method, options):
    """Fixed-grid methods and scipy_solver solve the adjoint backwards too (not by
    differentiating the forward steps); gradients of y0, the parameters and t as torchdiffeq's."""
    t0 = torch.linspace(0, 2, 5, dtype=torch.float64)  # on the grid of step_size
    res = []
    for fn, m, opts, tols in (
        (pn.odeint_adjoint, method, options, {}),
        (torchdiffeq.odeint_adjoint, method, options, {}),
        (pn.odeint, "dopri5", None, dict(rtol=1e-11, atol=1e-12)),  # the exact gradient
    ):
        f = Odefunc()
        y0 = Y0.clone().requires_grad_(True)
        t = t0.clone().requires_grad_(True)
        ys = fn(f, y0, t, method=m, options=opts, **tols)
        (ys * torch.linspace(0.5, 1.5, ys.numel(), dtype=ys.dtype).view_as(ys)).sum().backward()
        res.append([ys.detach(), y0.grad, f.A.grad, t.grad])
    tol = 1e-10 if options and "step_size" in options else 2e-5
    for a, b in zip(res[0], res[1]):  # the same algorithm as torchdiffeq's
        assert torch.allclose(a, b, rtol=tol, atol=tol)
    if method != "euler":  # euler's O(h) at this step is too coarse to be compared
        for a, b in zip(res[0], res[2]):
            assert (a - b).abs().max() < 1e-3 * (1 + b.abs().max())


def test_odeint_adjoint_callbacks_and_perturb_in_the_backward_pass():
    """torchdiffeq calls ``callback_*_adjoint`` on the backward steps and perturbs the backward
    pass's times at the grid points as the forward pass's."""
    for method in ("euler", "implicit_euler", "dopri5"):
        for perturb in (True, False):
            ts, counts = [], {"step": 0, "accept": 0}
            f = Counting(lambda t, y, ts=ts: (ts.append(float(t)), -y)[1])
            f.callback_step_adjoint = lambda t0, y0, dt, counts=counts: counts.__setitem__(
                "step", counts["step"] + 1
            )
            f.callback_accept_step_adjoint = lambda t0, y0, dt, counts=counts: counts.__setitem__(
                "accept", counts["accept"] + 1
            )
            y0 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
            opts = None if method == "dopri5" else dict(step_size=0.25, perturb=perturb)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ys = pn.odeint_adjoint(
                    f, y0, torch.tensor([0.0, 1.0]), method=method, options=opts, adjoint_params=()
                )
                ts.clear()
                ys.sum().backward()
            assert counts["step"] == (4 if method != "dopri5" else counts["step"]) > 0
            if method == "dopri5":
                assert counts["accept"] > 0
                break
            assert counts["accept"] == 0  # fixed-grid methods have no accept callback
            assert (1.0 in ts) != perturb and (0.5 in ts) != perturb
            assert torch.allclose(
                y0.grad, 1 + torch.exp(-torch.ones(2, dtype=torch.float64)), atol=0.1
            )


def test_odeint_adjoint_norms_as_torchdiffeq():
    """The adjoint norm gets ``(t, y, adj_y, *adj_params)`` (a tuple state's components spelled
    out), ``"seminorm"`` leaves the parameters out, and ``grad_fn.adjoint_options`` holds it."""
    p1 = torch.rand(7, dtype=torch.float64, requires_grad=True)
    p2 = torch.rand((), dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    seen = []

    def adjoint_norm(parts):
        seen.append(tuple(p.shape for p in parts))
        return max(p.abs().pow(2).mean().sqrt() for p in parts)

    x0 = (torch.tensor(1.0, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    xs = pn.odeint_adjoint(
        lambda t, x: (-x[0] * p2, -x[1] * p1[0]),
        x0,
        t,
        adjoint_params=(p1, p2),
        adjoint_options=dict(norm=adjoint_norm),
    )
    xs[0].sum().backward()
    assert seen and seen[0] == ((), (), (2, 2), (), (2, 2), (7,), ())
    ys = pn.odeint_adjoint(
        lambda t, x: -x * p2,
        torch.ones(3, dtype=torch.float64),
        t,
        adjoint_params=(p1, p2),
        adjoint_options=dict(norm="seminorm"),
    )
    norm = ys.grad_fn.adjoint_options["norm"]
    parts = (
        torch.tensor(0.1),
        torch.ones(3),
        2 * torch.ones(3),
        5 * torch.ones(7),
        torch.tensor(9.0),
    )
    assert float(norm(parts)) == 2.0  # the parameter channels (5, 9) are left out
    ys = pn.odeint_adjoint(
        lambda t, x: -x * p2, torch.ones(3, dtype=torch.float64), t, adjoint_params=(p1, p2)
    )
    assert float(ys.grad_fn.adjoint_options["norm"](parts)) == 9.0


def test_odeint_adjoint_f_independent_of_y_and_params():
    """f(t) alone: the adjoint is constant, dL/dy0 = dL/dy(T); no error from autograd."""
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    ys = pn.odeint_adjoint(
        lambda t, y: -0.1 * torch.exp(-0.1 * t) * torch.ones_like(y), y0, t, adjoint_params=()
    )
    ys[-1].sum().backward()
    assert float(y0.grad) == pytest.approx(1.0, abs=1e-12)
    # dL/dT = f(T) and dL/dt0 = -f(t0)
    f = lambda s: -0.1 * math.exp(-0.1 * s)
    assert t.grad.tolist() == pytest.approx([-f(1.0), f(3.0)], abs=1e-7)


def test_min_step_as_torchdiffeq():
    """``min_step``: steps at least that long, accepted whatever their error (torchdiffeq's)."""
    ys, nfes = [], []
    for lib in (pn, torchdiffeq):
        f = Counting(linear)
        ys.append(
            lib.odeint(
                f, Y0, torch.linspace(0, 8, 5, dtype=torch.float64), options=dict(min_step=2.0)
            )
        )
        nfes.append(f.nfe)
    assert nfes[0] == nfes[1] < 50
    assert torch.allclose(ys[0], ys[1], rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="min_step"):
        pn.odeint(linear, Y0, torch.tensor([0.0, 1.0]), options=dict(min_step=-1.0))


@pytest.mark.parametrize(
    "method", ["rk4", "explicit_adams", "implicit_adams", "implicit_euler", "gl4"]
)
def test_events_for_every_fixed_grid_method(method):
    """Events step ``step_size`` until the sign changes and bisect the step's interpolant to
    ``atol`` as torchdiffeq: y' = -y from 1 until y = 0.5, reached at log 2."""
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    args = dict(
        event_fn=lambda t, y: y[0] - 0.5,
        method=method,
        options=dict(step_size=0.01, interp="cubic"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te, ys = pn.odeint(lambda t, y: -y, y0, t, **args)
    # implicit_euler: first order; explicit_adams: torchdiffeq's is off by the same 3e-4 here
    tol = {"implicit_euler": 5e-3, "explicit_adams": 1e-3}.get(method, 1e-7)
    assert abs(float(te) - math.log(2.0)) < tol and abs(float(ys[-1, 0]) - 0.5) < tol
    (g,) = torch.autograd.grad(ys[-1, 0], y0)  # y(t*) = 0.5 for every y0: no gradient
    assert abs(float(g)) < tol
    if method in TD_SOLVERS:  # the same steps and arithmetic as torchdiffeq's
        te_td, ys_td = torchdiffeq.odeint(lambda t, y: -y, y0, t, **args)
        assert float(te) == float(te_td) and torch.equal(ys.detach(), ys_td.detach())


def test_explicit_adams_event_float32_identical_to_torchdiffeq():
    """explicit_adams is marginally stable on y' = 2y/t + …; in float32 the step's rounding
    decides where it drifts, so only the same arithmetic gives torchdiffeq's event time."""

    def f(t, y):
        return 2 * y / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3

    def exact(t):
        return (
            -0.5 * t**4 * torch.cos(2 * t)
            + 0.5 * t**3 * torch.sin(2 * t)
            + 0.25 * t**2 * torch.cos(2 * t)
            - t**3
            + 2 * t**4
            + (math.pi - 0.25) * t**2
        )

    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y0 = exact(t[0]).float()
    target = exact(torch.tensor(2.5, dtype=torch.float64)).float()
    out = [
        lib.odeint(
            f,
            y0,
            t,
            event_fn=lambda t, y: y - target,
            method="explicit_adams",
            options=dict(step_size=0.01, interp="cubic"),
        )
        for lib in (pn, torchdiffeq)
    ]
    assert float(out[0][0]) == float(out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_odeint_adjoint_second_derivative_raises():
    """The backward pass runs without a graph: a second derivative raises instead of being 0."""
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    ys = pn.odeint_adjoint(
        lambda t, y: -w * y,
        torch.ones(2, dtype=torch.float64),
        torch.tensor([0.0, 1.0]),
        adjoint_params=(w,),
    )
    (g,) = torch.autograd.grad(ys[-1].sum(), w, create_graph=True)
    assert float(g) == pytest.approx(-2 * math.exp(-0.5), rel=1e-6)
    with pytest.raises(RuntimeError, match="twice through odeint_adjoint.*pn.odeint"):
        g.backward()
