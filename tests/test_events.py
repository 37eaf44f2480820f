"""Terminal events: location against closed forms, gradients of the event time against analytic
derivatives and finite differences, torchdiffeq's odeint_event, and bad input."""

import math

import pytest
import torch

import pyneuralode as pn

DT = torch.float64
G = 9.81


def ball(g):
    def f(t, y):
        return torch.stack([y[1], -g * torch.ones_like(y[0])])

    return f


def height(t, y):
    return y[0]


def test_falling_ball_event_time_state_and_truncated_outputs():
    h = 10.0
    y0 = torch.tensor([h, 0.0], dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0, 5.0], dtype=DT)
    sol = pn.solve(ball(G), y0, t, pn.Tsit5(), rtol=1e-10, atol=1e-12, event=height)
    te = math.sqrt(2 * h / G)
    assert sol.retcode == "Terminated" and sol.retcode.successful
    assert abs(float(sol.event_t) - te) < 1e-9
    assert (
        abs(float(sol.event_y[0])) < 1e-9
        and abs(float(sol.event_y[1]) + math.sqrt(2 * G * h)) < 1e-8
    )
    assert sol.ys.shape == (3, 2)  # 0, 0.5, 1.0 lie before the event at 1.43; 2.0 and 5.0 do not
    torch.testing.assert_close(sol.ys[2, 0], torch.tensor(h - G / 2, dtype=DT), rtol=0, atol=1e-9)
    assert sol.t_reached == pytest.approx(te, abs=1e-9)


def test_event_gradients_match_closed_form():
    h = torch.tensor(10.0, dtype=DT, requires_grad=True)
    g = torch.tensor(G, dtype=DT, requires_grad=True)
    y0 = torch.stack([h, torch.zeros((), dtype=DT)])
    sol = pn.solve(
        ball(g), y0, torch.tensor([0.0, 5.0], dtype=DT), rtol=1e-10, atol=1e-12, event=height
    )
    dte = torch.autograd.grad(sol.event_t, [h, g], retain_graph=True)
    hv, gv = 10.0, G
    assert float(dte[0]) == pytest.approx(1 / math.sqrt(2 * hv * gv), rel=1e-7)
    assert float(dte[1]) == pytest.approx(-0.5 * math.sqrt(2 * hv) * gv**-1.5, rel=1e-7)
    dv = torch.autograd.grad(sol.event_y[1], [h, g])  # impact velocity −sqrt(2 g h)
    assert float(dv[0]) == pytest.approx(-math.sqrt(gv / (2 * hv)), rel=1e-7)
    assert float(dv[1]) == pytest.approx(-math.sqrt(hv / (2 * gv)), rel=1e-7)


@pytest.mark.parametrize("solver", [pn.Tsit5, pn.Dopri5, pn.Rodas5P], ids=lambda c: c.__name__)
def test_event_gradient_against_finite_differences(solver):
    """Damped oscillator reaching a moving threshold g(t, y) = y0 − 0.2 + 0.05 t (∂g/∂t ≠ 0)."""

    def f(t, y, k, c):
        return torch.stack([y[1], -k * y[0] - c * y[1]])

    def g_event(t, y):
        return y[0] - 0.2 + 0.05 * t

    def event_time(k, c, x0):
        y0 = torch.stack([x0, torch.zeros((), dtype=DT)])
        sol = pn.solve(
            f,
            y0,
            torch.tensor([0.0, 10.0], dtype=DT),
            solver(),
            rtol=1e-11,
            atol=1e-13,
            args=(k, c),
            event=g_event,
        )
        assert sol.retcode == "Terminated"
        return sol.event_t, sol.event_y[1]

    p = [torch.tensor(v, dtype=DT, requires_grad=True) for v in (3.0, 0.4, 1.0)]
    te, ve = event_time(*p)
    grads_t = torch.autograd.grad(te, p, retain_graph=True)
    grads_v = torch.autograd.grad(ve, p)
    eps = 1e-6
    for i in range(3):
        hi = [q.detach().clone() for q in p]
        lo = [q.detach().clone() for q in p]
        hi[i] += eps
        lo[i] -= eps
        with torch.no_grad():
            (th, vh), (tl, vl) = event_time(*hi), event_time(*lo)
        assert float(grads_t[i]) == pytest.approx(float(th - tl) / (2 * eps), rel=1e-5, abs=1e-8)
        assert float(grads_v[i]) == pytest.approx(float(vh - vl) / (2 * eps), rel=1e-5, abs=1e-8)


def test_no_crossing_is_success_and_start_on_surface_waits():
    y0 = torch.tensor([10.0, 0.0], dtype=DT)
    sol = pn.solve(ball(G), y0, torch.tensor([0.0, 1.0], dtype=DT), event=height)
    assert sol.retcode == "Success" and sol.event_t is None and sol.ys.shape == (2, 2)
    # thrown up from the ground: g = 0 at t0 is not an event; landing at t = 2 v / g is
    up = torch.tensor([0.0, 5.0], dtype=DT)
    sol = pn.solve(
        ball(G), up, torch.tensor([0.0, 10.0], dtype=DT), rtol=1e-10, atol=1e-12, event=height
    )
    assert float(sol.event_t) == pytest.approx(2 * 5.0 / G, abs=1e-9)


def test_event_backward_in_time_and_tuple_state():
    def f(t, y):
        x, v = y
        return v, -G * torch.ones_like(x)

    y_end = (torch.tensor(0.0, dtype=DT), torch.tensor(-math.sqrt(2 * G * 10.0), dtype=DT))
    # backwards in time from the impact (t = 0), the ball is back at height 5 at t = -(sqrt(20/G) -
    # sqrt(10/G))
    sol = pn.solve(
        f,
        y_end,
        torch.tensor([0.0, -5.0], dtype=DT),
        rtol=1e-10,
        atol=1e-12,
        event=lambda t, y: y[0] - 5.0,
    )
    te = -(math.sqrt(2 * 10.0 / G) - math.sqrt(2 * 5.0 / G))
    assert float(sol.event_t) == pytest.approx(te, abs=1e-9)
    assert isinstance(sol.event_y, tuple) and float(sol.event_y[0]) == pytest.approx(5.0, abs=1e-9)


def test_odeint_event_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip(
        "torchdiffeq", reason="torchdiffeq is the reference for odeint_event"
    )
    h = torch.tensor(3.0, dtype=DT, requires_grad=True)
    y0 = torch.stack([h, torch.tensor(1.0, dtype=DT)])
    f = ball(G)
    te, ys = pn.odeint_event(
        f, y0, torch.tensor(0.0, dtype=DT), event_fn=height, rtol=1e-10, atol=1e-12
    )
    te_ref, ys_ref = torchdiffeq.odeint_event(
        f, y0, torch.tensor(0.0, dtype=DT), event_fn=height, rtol=1e-10, atol=1e-12
    )
    assert ys.shape == ys_ref.shape == (2, 2)
    assert float(te.detach()) == pytest.approx(float(te_ref.detach()), abs=1e-8)
    torch.testing.assert_close(ys, ys_ref, rtol=0, atol=1e-7)
    (g_ours,) = torch.autograd.grad(te, h)
    (g_ref,) = torch.autograd.grad(te_ref, h)
    assert float(g_ours) == pytest.approx(float(g_ref), rel=1e-6)


def test_event_bad_input():
    y0 = torch.tensor([1.0, 0.0], dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(TypeError, match="event: expected a function"):
        pn.solve(ball(G), y0, t, event=3.0)
    with pytest.raises(ValueError, match="event: g\\(t, y\\) must return a scalar"):
        pn.solve(ball(G), y0, t, event=lambda t, y: y)
    with pytest.raises(ValueError, match="must be finite"):
        pn.solve(ball(G), y0, t, event=lambda t, y: y[0] / 0.0 * 0.0)
    with pytest.raises(RuntimeError, match="never crossed zero"):  # y grows: the event cannot fire
        pn.odeint_event(
            lambda t, y: torch.ones_like(y),
            torch.tensor([1.0], dtype=DT),
            0.0,
            event_fn=lambda t, y: y[0],
        )
    with pytest.raises(
        pn.SolveError
    ) as ei:  # an oscillation that never reaches the threshold, within max_steps
        pn.odeint_event(
            lambda t, y: torch.cos(t) * torch.ones_like(y),
            torch.tensor([0.0], dtype=DT),
            0.0,
            event_fn=lambda t, y: y[0] - 10.0,
            max_steps=50,
        )
    assert ei.value.retcode == "MaxIters"


def test_event_threshold_parameter_gets_its_gradient():
    """A threshold the event function closes over: t* = sqrt(2 (h − c) / g), dt*/dc = −1/sqrt(2 g (h
    − c))."""
    c = torch.tensor(2.0, dtype=DT, requires_grad=True)
    y0 = torch.tensor([10.0, 0.0], dtype=DT)  # nothing else requires grad
    sol = pn.solve(
        ball(G),
        y0,
        torch.tensor([0.0, 5.0], dtype=DT),
        rtol=1e-10,
        atol=1e-12,
        event=lambda t, y: y[0] - c,
    )
    (dc,) = torch.autograd.grad(sol.event_t, c)
    assert float(dc) == pytest.approx(-1 / math.sqrt(2 * G * 8.0), rel=1e-7)


def test_events_benchmark_quick(tmp_path):
    """The events benchmark runs and both libraries agree on the event time and the gradient."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torchdiffeq", reason="the benchmark compares with torchdiffeq")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "events.md"
    subprocess.run(
        [sys.executable, "benchmarks/events_vs_torchdiffeq.py", "--quick", "--out", str(out)],
        cwd=root,
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = [
        line.split("|")[1:-1]
        for line in out.read_text().splitlines()
        if line.startswith("| pn.") or line.startswith("| torchdiffeq")
    ]
    assert len(rows) == 4
    for ref, ours in (rows[0:2], rows[2:4]):
        assert ours[0].strip() == "pn.odeint_event"
        assert abs(float(ours[1]) - float(ref[1])) < 1e-7  # event times agree
        assert float(ours[7]) < 1e-6  # gradients agree
        assert float(ours[3]) > 0 and float(ours[5]) > 0


@pytest.mark.parametrize(
    "sensealg",
    [pn.BacksolveAdjoint(), pn.InterpolatingAdjoint(), pn.QuadratureAdjoint()],
    ids=lambda s: type(s).__name__,
)
def test_event_with_continuous_adjoints(sensealg):
    """The event is located first, then the adjoint solve runs to it: same event, same gradients."""
    h = torch.tensor(10.0, dtype=DT, requires_grad=True)
    g = torch.tensor(G, dtype=DT, requires_grad=True)
    y0 = torch.stack([h, torch.zeros((), dtype=DT)])
    t = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=DT)

    def f(t, y, grav):  # continuous adjoints see parameters through args (or module parameters)
        return torch.stack([y[1], -grav * torch.ones_like(y[0])])

    sol = pn.solve(f, y0, t, args=(g,), rtol=1e-10, atol=1e-12, event=height, sensealg=sensealg)
    assert (
        sol.retcode == "Terminated" and sol.ys.shape == (3, 2) and sol.stats["nfe_event_search"] > 0
    )
    assert float(sol.event_t.detach()) == pytest.approx(math.sqrt(2 * 10.0 / G), abs=1e-9)
    loss = sol.event_t + sol.event_y[1] + sol.ys[-1, 0]
    dh, dg = torch.autograd.grad(loss, [h, g])
    hv, gv = 10.0, G
    # t* = sqrt(2h/g), v* = -sqrt(2gh), x(1) = h - g/2
    assert float(dh) == pytest.approx(
        1 / math.sqrt(2 * hv * gv) - math.sqrt(gv / (2 * hv)) + 1.0, rel=1e-6
    )
    assert float(dg) == pytest.approx(
        -0.5 * math.sqrt(2 * hv) * gv**-1.5 - math.sqrt(hv / (2 * gv)) - 0.5, rel=1e-6
    )


def test_odeint_event_reverse_time_with_a_python_start_time():
    y_end = torch.tensor([0.0, -math.sqrt(2 * G * 10.0)], dtype=DT)
    te, ys = pn.odeint_event(
        ball(G),
        y_end,
        0.0,
        event_fn=lambda t, y: y[0] - 5.0,
        reverse_time=True,
        rtol=1e-10,
        atol=1e-12,
    )
    assert te.dtype == DT and float(te) == pytest.approx(
        -(math.sqrt(20 / G) - math.sqrt(10 / G)), abs=1e-10
    )
    assert float(ys[-1, 0]) == pytest.approx(5.0, abs=1e-9)


def test_dense_output_ends_at_the_event():
    sol = pn.solve(
        ball(G),
        torch.tensor([10.0, 0.0], dtype=DT),
        torch.tensor([0.0, 5.0], dtype=DT),
        rtol=1e-10,
        atol=1e-12,
        event=height,
    )
    te = float(sol.event_t)
    assert abs(float(sol(te - 1e-3)[0, 0]) - (10.0 - G / 2 * (te - 1e-3) ** 2)) < 1e-8
    with pytest.raises(ValueError, match="outside the solved span"):
        sol(te + 1e-3)
