"""solve(): shapes (batch, tuple states), dtypes, backward time, per-component tolerances,
statistics and return codes — checked against exact solutions."""

import math

import pytest
import torch

import pyneuralode as pn

ADAPTIVE = [pn.Heun, pn.BS3, pn.Dopri5, pn.Tsit5, pn.Vern7, pn.DP8]
ids = lambda c: c.__name__


def decay(t, y, k):
    return -k * y


@pytest.mark.parametrize("cls", ADAPTIVE, ids=ids)
def test_batched_state_matches_exact(cls):
    k = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)  # (3, 1) broadcasts over (3, 4)
    y0 = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    rtol = 1e-6 if cls is pn.Heun else 1e-8  # Heun is 2nd order: keep it cheap
    sol = pn.solve(decay, y0, t, cls(), rtol=rtol, atol=1e-10, args=(k,))
    assert sol.ys.shape == (5, 3, 4) and sol.ts.shape == (5,)
    exact = y0 * torch.exp(-k * t.reshape(-1, 1, 1))
    assert torch.allclose(sol.ys, exact, rtol=100 * rtol, atol=1e-9)
    assert torch.equal(sol.ys[0], y0)


@pytest.mark.parametrize("cls", [pn.Tsit5, pn.Vern7, pn.DP8, pn.RK4], ids=ids)
def test_tuple_state(cls):
    # x' = v, v' = -x (harmonic oscillator) as a tuple (x of shape (2,), v of shape (2, 1))
    def f(t, s):
        x, v = s
        return v.reshape(2), -x.reshape(2, 1)

    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    v0 = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    kw = dict(dt=0.01, adaptive=False) if cls is pn.RK4 else dict(rtol=1e-9, atol=1e-11)
    sol = pn.solve(f, (x0, v0), t, cls(), **kw)
    xs, vs = sol.ys
    assert xs.shape == (7, 2) and vs.shape == (7, 2, 1)
    c, s = torch.cos(t).unsqueeze(1), torch.sin(t).unsqueeze(1)
    x_exact = x0 * c + v0.reshape(2) * s
    v_exact = -x0 * s + v0.reshape(2) * c
    assert torch.allclose(xs, x_exact, atol=1e-7)
    assert torch.allclose(vs.squeeze(-1), v_exact, atol=1e-7)
    xq, vq = sol(torch.tensor([1.234], dtype=torch.float64))
    assert xq.shape == (1, 2) and vq.shape == (1, 2, 1)
    assert torch.allclose(xq[0], x0 * math.cos(1.234) + v0.reshape(2) * math.sin(1.234), atol=1e-7)


@pytest.mark.parametrize("cls", [pn.Tsit5, pn.Dopri5, pn.Vern7, pn.DP8], ids=ids)
@pytest.mark.parametrize(
    "dtype,rtol,tol", [(torch.float32, 1e-5, 1e-4), (torch.float64, 1e-10, 1e-8)]
)
def test_dtypes(cls, dtype, rtol, tol):
    y0 = torch.tensor([1.0, 2.0], dtype=dtype)
    t = torch.linspace(0, 2, 4, dtype=dtype)
    sol = pn.solve(lambda t, y: -y * torch.cos(t), y0, t, cls(), rtol=rtol, atol=rtol * 1e-2)
    assert sol.ys.dtype == dtype
    assert sol(torch.tensor([0.3])).dtype == dtype
    exact = y0 * torch.exp(-torch.sin(t)).unsqueeze(1)
    assert torch.allclose(sol.ys, exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls", [pn.Tsit5, pn.Vern7, pn.DP8, pn.BS3], ids=ids)
def test_backward_time(cls):
    # From y(2) = exp(sin 2) back to t = 0 along y' = y cos t.
    t = torch.tensor([2.0, 1.5, 0.7, 0.0], dtype=torch.float64)
    y2 = torch.tensor([math.exp(math.sin(2.0))], dtype=torch.float64)
    sol = pn.solve(lambda t, y: y * torch.cos(t), y2, t, cls(), rtol=1e-9, atol=1e-12)
    assert sol.retcode == "Success" and sol.t_reached == 0.0
    assert torch.allclose(sol.ys[:, 0], torch.exp(torch.sin(t)), rtol=1e-7)
    tq = torch.tensor([1.9, 1.0, 0.05], dtype=torch.float64)
    assert torch.allclose(sol(tq)[:, 0], torch.exp(torch.sin(tq)), rtol=1e-7)


def test_backward_fixed_step():
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    sol = pn.solve(
        lambda t, y: -y,
        torch.tensor([1.0], dtype=torch.float64),
        t,
        pn.RK4(),
        dt=0.01,
        adaptive=False,
    )
    assert sol.stats["naccept"] == 100
    assert abs(sol.ys[-1, 0].item() - math.e) < 1e-9


def test_per_component_tolerances_are_honoured():
    """Two identical components, one with a loose and one with a tight tolerance: the error
    of each follows its own tolerance, and the tight one drives the step size."""
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)

    def f(t, y):
        return y * torch.cos(t)

    exact = math.exp(math.sin(2.0))
    loose = pn.solve(f, y0, t, pn.Tsit5(), rtol=1e-4, atol=1e-4)
    tight = pn.solve(f, y0, t, pn.Tsit5(), rtol=1e-10, atol=1e-10)
    mixed = pn.solve(
        f, y0, t, pn.Tsit5(), rtol=torch.tensor([1e-4, 1e-10]), atol=torch.tensor([1e-4, 1e-10])
    )
    assert mixed.stats["naccept"] > 3 * loose.stats["naccept"]
    err_mixed = (mixed.ys[-1] - exact).abs()
    assert err_mixed.max() < 1e-8
    # A tight atol only on an irrelevant (zero) component does not tighten anything ...
    y0b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    a = pn.solve(f, y0b, t, pn.Tsit5(), rtol=1e-4, atol=torch.tensor([1e-4, 1e-12]))
    assert (
        a.stats["naccept"] == pn.solve(f, y0b, t, pn.Tsit5(), rtol=1e-4, atol=1e-4).stats["naccept"]
    )
    # ... while tightening the relevant component does.
    b = pn.solve(
        f, y0b, t, pn.Tsit5(), rtol=torch.tensor([1e-9, 1e-4]), atol=torch.tensor([1e-9, 1e-4])
    )
    assert b.stats["naccept"] > 3 * a.stats["naccept"]
    assert abs(b.ys[-1, 0].item() - exact) < 1e-7 < abs(a.ys[-1, 0].item() - exact)
    assert tight.stats["naccept"] >= mixed.stats["naccept"] - 1


def test_tolerance_broadcast_over_batch():
    y0 = torch.ones(4, 3, dtype=torch.float64)
    atol = torch.tensor(
        [1e-3, 1e-6, 1e-9], dtype=torch.float64
    )  # per feature, broadcast over the batch
    sol = pn.solve(
        lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=0.0, atol=atol
    )
    err = (sol.ys[-1] - math.exp(-1)).abs()
    assert err[:, 2].max() < 1e-7 and err[:, 2].max() < err[:, 0].max() + 1e-15


@pytest.mark.parametrize("cls", ADAPTIVE, ids=ids)
def test_stats_are_consistent(cls):
    calls = {"n": 0}

    def f(t, y):
        calls["n"] += 1
        return y * torch.cos(t)

    sol = pn.solve(
        f,
        torch.tensor([1.0], dtype=torch.float64),
        torch.linspace(0, 2, 3, dtype=torch.float64),
        cls(),
        rtol=1e-6,
    )
    st = sol.stats
    assert st["nfe"] == calls["n"]
    assert st["naccept"] >= 1 and st["nreject"] >= 0
    s = (
        cls.tableau.stages - (1 if cls.tableau.fsal else 0) + (0 if cls.tableau.fsal else 1)
    )  # new evaluations per attempt
    extra = cls.tableau.extra_stages - (
        1 if cls is pn.Vern7 else 0
    )  # lazily evaluated dense stages
    attempts = st["naccept"] + st["nreject"]
    # init (f0) + Hairer's initial step (1) + s per attempt, + lazy dense stages for interpolated
    # steps
    lo = 2 + (s - (0 if cls.tableau.fsal else 1)) * attempts
    assert lo <= st["nfe"] <= lo + attempts + extra * st["naccept"], st


def test_nreject_counts_rejections():
    # An initial step far too large for the tolerance is rejected (and shrunk) until accepted.
    calls = {"n": 0}

    def f(t, y):
        calls["n"] += 1
        return y * torch.cos(t)

    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    sol = pn.solve(
        f, torch.ones(1, dtype=torch.float64), t, pn.Tsit5(), dt=2.0, rtol=1e-10, atol=1e-10
    )
    st = sol.stats
    assert st["nreject"] >= 2
    # Tsit5 (FSAL): f0 once, then 6 new evaluations per attempt, accepted or not.
    assert st["nfe"] == calls["n"] == 1 + 6 * (st["naccept"] + st["nreject"])
    assert abs(sol.ys[-1, 0].item() - math.exp(math.sin(2.0))) < 1e-9


# ------------------------------------------------------------------------------------------
# Return codes and failures


def test_max_iters():
    t = torch.tensor([0.0, 10.0], dtype=torch.float64)
    with pytest.raises(pn.SolveError) as ei:
        pn.solve(
            lambda t, y: -y,
            torch.ones(1, dtype=torch.float64),
            t,
            pn.Tsit5(),
            max_steps=5,
            rtol=1e-10,
        )
    err = ei.value
    assert isinstance(err, RuntimeError)
    assert err.retcode == "MaxIters" and 0.0 < err.t < 10.0
    assert "max_steps" in str(err)
    sol = pn.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=torch.float64),
        t,
        pn.Tsit5(),
        max_steps=5,
        rtol=1e-10,
        throw=False,
    )
    assert sol.retcode == "MaxIters" and not sol.successful
    assert sol.t_reached == err.t
    assert sol.stats["naccept"] + sol.stats["nreject"] == 5


@pytest.mark.parametrize("cls", [pn.Tsit5, pn.DP8], ids=ids)
def test_blow_up_is_dt_less_than_min_or_unstable(cls):
    # y' = y², y(0) = 1 blows up at t = 1.
    t = torch.tensor([0.0, 0.5, 0.9, 2.0], dtype=torch.float64)
    y0 = torch.ones(1, dtype=torch.float64)
    with pytest.raises(pn.SolveError) as ei:
        pn.solve(lambda t, y: y * y, y0, t, cls())
    assert ei.value.retcode in ("DtLessThanMin", "Unstable")
    assert 0.999 < ei.value.t < 1.001
    sol = pn.solve(lambda t, y: y * y, y0, t, cls(), throw=False)
    assert sol.retcode in ("DtLessThanMin", "Unstable")
    # The partial solution holds the output times reached, correct there.
    assert sol.ys.shape == (3, 1) and sol.ts.shape == (3,)
    assert torch.allclose(sol.ys[:, 0], 1 / (1 - t[:3]), rtol=1e-5)


def test_nan_from_f_is_unstable():
    def f(t, y):
        return torch.where(t > 0.5, torch.full_like(y, float("nan")), -y)

    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    with pytest.raises(pn.SolveError) as ei:
        pn.solve(f, torch.ones(2, dtype=torch.float64), t, pn.Tsit5())
    assert ei.value.retcode == "Unstable" and 0.4 < ei.value.t <= 0.5
    sol = pn.solve(f, torch.ones(2, dtype=torch.float64), t, pn.Tsit5(), throw=False)
    assert sol.retcode == "Unstable" and sol.ys.shape == (2, 2)
    assert torch.isfinite(sol.ys).all()


def test_nan_in_fixed_step_is_unstable():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = pn.solve(
        lambda t, y: y * y,
        torch.ones(1, dtype=torch.float64),
        torch.tensor([0.0, 3.0], dtype=torch.float64),
        pn.RK4(),
        dt=0.5,
        adaptive=False,
        throw=False,
    )
    assert sol.retcode == "Unstable"
    with pytest.raises(pn.SolveError):
        pn.solve(
            lambda t, y: y * y,
            torch.ones(1, dtype=torch.float64),
            torch.tensor([0.0, 3.0], dtype=torch.float64),
            pn.RK4(),
            dt=0.5,
            adaptive=False,
        )
    ok = pn.solve(
        lambda t, y: -y, torch.ones(1, dtype=torch.float64), t, pn.RK4(), dt=0.5, adaptive=False
    )
    assert ok.retcode == "Success"


def test_single_output_time():
    sol = pn.solve(
        lambda t, y: -y,
        torch.ones(3, dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float64),
    )
    assert sol.ys.shape == (1, 3) and sol.retcode == "Success" and sol.stats["nfe"] == 0


def test_string_solver_names():
    y0 = torch.ones(1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for name in ["tsit5", "Vern7", "dopri8", "DP8", "dop853", "dopri5", "bosh3"]:
        sol = pn.solve(lambda t, y: -y, y0, t, name, rtol=1e-9, atol=1e-12)
        assert abs(sol.ys[-1, 0].item() - math.exp(-1)) < 1e-8, name


def _vdp(t, y, mu=5.0):
    return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


_I, _PI = pn.PIController(beta1=1.0, beta2=0.0), pn.PIController()


@pytest.mark.parametrize(
    "cls,expected,other_ctrl",
    [
        (pn.Tsit5, _I, _PI),
        (pn.Dopri5, _I, _PI),
        (pn.Rodas5P, pn.PredictiveController(), _PI),
        (pn.KenCarp4, _PI, _I),
        (pn.QNDF, _I, _PI),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_default_controller_is_per_solver_and_overridable(cls, expected, other_ctrl):
    """Explicit solvers and QNDF (as scipy BDF) default to integral control, Rosenbrock methods to
    Gustafsson's predictive control (Hairer's RODAS), the ESDIRK ones to SciML's PI gains;
    controller= overrides."""
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 6.0], dtype=torch.float64)
    assert cls().default_controller() == expected
    default = pn.solve(_vdp, y0, t, cls(), rtol=1e-6, atol=1e-8)
    same = pn.solve(_vdp, y0, t, cls(), rtol=1e-6, atol=1e-8, controller=expected)
    other = pn.solve(_vdp, y0, t, cls(), rtol=1e-6, atol=1e-8, controller=other_ctrl)
    assert (
        default.stats["naccept"] == same.stats["naccept"]
        and default.stats["nreject"] == same.stats["nreject"]
    )
    torch.testing.assert_close(default.ys, same.ys, rtol=0, atol=0)
    assert (other.stats["naccept"], other.stats["nreject"]) != (
        default.stats["naccept"],
        default.stats["nreject"],
    )
    if isinstance(expected, pn.PIController):
        # the integral controller grows steps faster: no more accepted steps than SciML's PI gains
        # here
        i_run, pi_run = (default, other) if expected == _I else (other, default)
        assert i_run.stats["naccept"] <= pi_run.stats["naccept"]


def test_predictive_controller_factor():
    """The factor is min(integral, Gustafsson's predictive) after an accepted step, clipped; the
    integral factor alone without a previous step; never growing after a rejection."""
    c = pn.PredictiveController()
    err, err_prev, q = 0.3, 0.05, 5
    integral = 0.9 * err ** (-1 / q)
    assert c.factor(err, err_prev, q, True) == pytest.approx(integral)
    predictive = 0.9 * 0.5 * (err_prev / err**2) ** (1 / q)
    assert predictive < integral
    assert c.factor(err, err_prev, q, True, dt_ratio=0.5) == pytest.approx(predictive)
    assert c.factor(err, err_prev, q, True, dt_ratio=4.0) == pytest.approx(
        integral
    )  # the smaller one wins
    assert c.factor(err, 1e-9, q, True, dt_ratio=1.0) == pytest.approx(
        min(integral, 0.9 * (1e-2 / err**2) ** (1 / q))
    )
    assert (
        c.factor(1e-12, 1.0, q, True) == c.factor_max
        and c.factor(1e6, 1.0, q, True) == c.factor_min
    )
    assert c.factor(0.01, 0.5, q, False, dt_ratio=1.0) <= 1.0
    assert c.factor(float("nan"), 0.5, q, True) == c.factor_min
    with pytest.raises(ValueError, match="safety"):
        pn.PredictiveController(safety=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("solver", [pn.Tsit5, pn.Rodas5P], ids=["Tsit5", "Rodas5P"])
def test_f_and_jac_receive_t_as_a_0d_tensor_of_the_time_dtype(dtype, solver):
    """f (and a user jac) get t as a fresh 0-d tensor of t's dtype on the state's device, equal to
    the stage time; keeping it across calls is safe (no shared buffer is overwritten)."""
    seen = []

    def f(t, y):
        seen.append(t)
        return -y

    def jac(t, y):
        seen.append(t)
        return -torch.eye(2, dtype=y.dtype)

    kw = {"jac": jac} if solver is pn.Rodas5P else {}
    t_out = torch.tensor([0.0, 1.0], dtype=dtype)
    with torch.no_grad():
        sol = pn.solve(f, torch.ones(2, dtype=dtype), t_out, solver(**kw), rtol=1e-6, atol=1e-8)
    assert sol.retcode == "Success" and len(seen) > 10
    assert all(
        isinstance(t, torch.Tensor)
        and t.shape == ()
        and t.dtype == dtype
        and t.device.type == "cpu"
        for t in seen
    )
    values = [float(t) for t in seen]
    assert values[0] == 0.0 and 0.0 <= min(values) and max(values) <= 1.0
    assert len(set(values)) > 5  # every call saw its own time, not a buffer rewritten in place


def test_a_failed_implicit_solve_halves_the_step():
    """When an implicit step's Newton iteration fails, the loop retries from the same point with
    half the step (RADAU5, OrdinaryDiffEq and scipy BDF all halve; a quarter cost extra steps to
    regrow)."""
    solver = pn.KenCarp4()
    calls = []
    step = solver.step

    def failing_once(rhs, t0, y0, h, cache):
        calls.append((t0, h))
        if len(calls) == 3:  # the third attempt fails as a Newton failure would
            return pn.StepResult(
                y1=y0, error=None, cache=cache, dense=None, ok=False, cache_on_reject=cache
            )
        return step(rhs, t0, y0, h, cache)

    solver.step = failing_once
    sol = pn.solve(
        _vdp,
        torch.tensor([2.0, 0.0], dtype=torch.float64),
        [0.0, 1.0],
        solver,
        rtol=1e-6,
        atol=1e-8,
    )
    assert sol.stats["nreject"] >= 1
    (t_fail, h_fail), (t_retry, h_retry) = calls[2], calls[3]
    assert t_retry == t_fail and h_retry == pytest.approx(0.5 * h_fail, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# issue 16: empty states, events returning floats, O(1) memory without dense output, hints


@pytest.mark.parametrize("S", [pn.Tsit5, pn.Rodas5P, pn.KenCarp4, pn.QNDF], ids=ids)
@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty_state_is_constant(S, shape):
    y0 = torch.zeros(shape, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    sol = pn.solve(lambda t, y: -y, y0, t, S())
    assert sol.retcode == "Success" and sol.ys.shape == (3, *shape)
    assert sol(torch.tensor([0.25, 0.75])).shape == (2, *shape)
    tup = pn.solve(lambda t, s: (-s[0], -s[1]), (y0, torch.zeros(0, dtype=torch.float64)), t, S())
    assert tup.ys[0].shape == (3, *shape) and tup.ys[1].shape == (3, 0)


@pytest.mark.parametrize("kind", ["float", "numpy", "0-d tensor"])
def test_event_returning_a_python_float(kind):
    """g may return a Python float or a 0-d tensor; the event is located all the same."""
    import numpy as np

    conv = {"float": float, "numpy": np.float64, "0-d tensor": lambda v: torch.tensor(v)}[kind]

    def g(t, y):
        return conv(float(y[0]) - 0.5)

    y0 = torch.tensor([1.0], dtype=torch.float64)
    sol = pn.solve(lambda t, y: -y, y0, torch.tensor([0.0, 2.0], dtype=torch.float64), event=g)
    assert sol.retcode == "Terminated" and abs(float(sol.event_t) - math.log(2.0)) < 1e-6
    t_e, ys = pn.odeint_event(lambda t, y: -y, y0, 0.0, event_fn=g)
    assert abs(float(t_e) - math.log(2.0)) < 1e-6 and abs(float(ys[-1, 0]) - 0.5) < 1e-6


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        with torch.no_grad():
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_long_no_grad_odeint_keeps_no_dense_output():
    """pn.odeint and odeint_event never expose the dense output, so memory must not grow with the
    number of steps (~400 B a step of Python objects alone: +190 KB here). 2 vs 30 periods of an
    oscillator: ~350 more steps."""
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    def odeint(n):
        t = torch.tensor([0.0, 2 * math.pi * n], dtype=torch.float64)
        return lambda: pn.odeint(osc, y0, t, method="tsit5", rtol=1e-5, atol=1e-5)

    def event(n):
        return lambda: pn.odeint_event(
            osc,
            y0,
            0.0,
            event_fn=lambda t, y: t - 2 * math.pi * n,
            method="tsit5",
            rtol=1e-5,
            atol=1e-5,
        )

    def solve(n):
        return lambda: pn.solve(osc, y0, [0.0, 2 * math.pi * n], rtol=1e-5, atol=1e-5, dense=False)

    for make in (odeint, event, solve):
        small, large = _peak_bytes(make(2)), _peak_bytes(make(30))
        assert large - small < 20_000, (make.__name__, small, large)
    # the dense output a user can read is still kept by pn.solve
    sol = pn.solve(osc, y0, [0.0, 2 * math.pi], rtol=1e-7)
    assert abs(float(sol(math.pi / 2)[0, 0])) < 1e-5


def test_step_collapse_hint_never_names_the_solver_in_use():
    y0 = torch.ones(1, dtype=torch.float64)  # y' = y² blows up at t = 1
    with pytest.raises(pn.SolveError) as e:
        pn.solve(lambda t, y: y * y, y0, [0.0, 2.0], pn.Rodas5P())
    assert "Rodas5P" not in str(e.value) and "implicit solver such as" not in str(e.value)
    # an explicit solver on a stiff problem is told to use an implicit one
    with pytest.raises(pn.SolveError, match=r"implicit solver such as pn.Rodas5P"):
        pn.solve(lambda t, y: -1e7 * (y - torch.cos(t)), y0, [0.0, 1e3], pn.Tsit5(), dtmin=1e-4)


def test_default_dtmin_follows_the_time_not_the_span():
    """A fast transient at t = 0 on a long span (the Robertson to 1e11 failure in small): the first
    steps (~1e-5) lie far below 4·eps·1e12, the old span-scaled floor."""
    y0 = torch.tensor([0.0], dtype=torch.float64)
    sol = pn.solve(
        lambda t, y: -1e5 * (y - 1.0), y0, [0.0, 1e-3, 1e12], pn.Rodas5P(), rtol=1e-6, atol=1e-10
    )
    assert sol.retcode == "Success"
    assert abs(float(sol.ys[1, 0]) - (1 - math.exp(-100.0))) < 1e-5
    assert abs(float(sol.ys[-1, 0]) - 1.0) < 1e-8
