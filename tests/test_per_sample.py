"""Per-sample output times t of shape (B, T): against solving each sample on its own times, with
gradients, backward time, partial failures and bad input."""

import pytest
import torch

import pyneuralode as pn

DT = torch.float64


def field():
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=DT) * 0.5
    return lambda t, y, w: torch.tanh(y @ (w * A).T) + torch.sin(t)


def times(B=5, T=7, seed=1, span=2.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(B, T, dtype=DT, generator=g) * span, dim=1).values
    t[:, 0] = 0.0
    return t


@pytest.mark.parametrize(
    "sensealg", [None, pn.InterpolatingAdjoint()], ids=["direct", "interpolating"]
)
def test_per_sample_times_match_separate_solves_with_gradients(sensealg):
    f = field()
    y0 = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(2)).requires_grad_()
    w = torch.tensor(1.3, dtype=DT, requires_grad=True)
    t = times()
    sol = pn.solve(f, y0, t, args=(w,), rtol=1e-10, atol=1e-12, sensealg=sensealg)
    assert sol.ys.shape == (7, 5, 3) and sol.ts is t
    loss = (sol.ys * torch.linspace(-1, 1, 3, dtype=DT)).sum()
    gy0, gw = torch.autograd.grad(loss, [y0, w])
    ref_ys, ref_loss = [], 0.0
    for b in range(5):
        s = pn.solve(f, y0[b : b + 1], t[b], args=(w,), rtol=1e-10, atol=1e-12)
        ref_ys.append(s.ys[:, 0])
        ref_loss = ref_loss + (s.ys[:, 0] * torch.linspace(-1, 1, 3, dtype=DT)).sum()
    torch.testing.assert_close(
        sol.ys.detach(), torch.stack(ref_ys, 1).detach(), rtol=1e-8, atol=1e-9
    )
    ry0, rw = torch.autograd.grad(ref_loss, [y0, w])
    torch.testing.assert_close(gy0, ry0, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-8)


def test_per_sample_backward_time_and_shared_times():
    f = field()
    w = torch.tensor(1.0, dtype=DT)
    y0 = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    t = -times(B=3, T=4, seed=4)  # every row strictly decreasing from 0
    sol = pn.solve(f, y0, t, args=(w,), rtol=1e-10, atol=1e-12)
    for b in range(3):
        s = pn.solve(f, y0[b : b + 1], t[b], args=(w,), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sol.ys[:, b], s.ys[:, 0], rtol=1e-8, atol=1e-9)
    # rows that share their times give the ordinary batched solution
    same = torch.linspace(0, 1, 5, dtype=DT).expand(3, 5)
    torch.testing.assert_close(
        pn.solve(f, y0, same, args=(w,)).ys, pn.solve(f, y0, same[0], args=(w,)).ys
    )


def test_per_sample_partial_failure_is_nan_after_the_failure():
    def blow_up(t, y):
        return y * y

    y0 = torch.ones(2, 1, dtype=DT)  # y = 1/(1 - t): blows up at t = 1
    t = torch.tensor([[0.0, 0.5, 2.0], [0.0, 0.9, 1.5]], dtype=DT)
    sol = pn.solve(blow_up, y0, t, throw=False)
    assert not sol.retcode.successful
    assert sol.ys.shape == (3, 2, 1)
    assert torch.isfinite(sol.ys[:2]).all() and torch.isnan(sol.ys[2]).all()
    assert float(sol.ys[1, 0, 0]) == pytest.approx(2.0, rel=1e-5)


def test_per_sample_bad_input():
    f = field()
    w = torch.tensor(1.0, dtype=DT)
    y0 = torch.zeros(2, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"must all start at the same time"):
        pn.solve(f, y0, torch.tensor([[0.0, 1.0], [0.1, 1.0]], dtype=DT), args=(w,))
    with pytest.raises(
        ValueError, match=r"row 1 of the per-sample times is not strictly monotonic"
    ):
        pn.solve(f, y0, torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 1.0]], dtype=DT), args=(w,))
    with pytest.raises(ValueError, match=r"run in different directions"):
        pn.solve(f, y0, torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=DT), args=(w,))
    with pytest.raises(ValueError, match=r"gradients with respect to per-sample output times"):
        pn.solve(
            f, y0, torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=DT, requires_grad=True), args=(w,)
        )
    with pytest.raises(
        ValueError, match=r"t: must be 1-D"
    ):  # 2-D t whose rows do not match the batch
        pn.solve(f, y0, torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]], dtype=DT), args=(w,))
    with pytest.raises(ValueError, match=r"event: not supported together with per-sample"):
        pn.solve(
            f,
            y0,
            torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=DT),
            args=(w,),
            event=lambda t, y: y.sum(),
        )


# ------------------------------------------------------------------------------------------------
# per_sample=True: every sample its own steps (issue 22)


def vdp(t, y):
    """Van der Pol with μ carried in the state (column 2), so rows are independent."""
    x, v, mu = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([v, mu * (1 - x * x) * v - x, torch.zeros_like(x)], -1)


def vdp_batch(B, lo=0.1, hi=10.0):
    mu = torch.linspace(lo, hi, B, dtype=DT)
    return torch.cat([torch.tensor([[2.0, 0.0]], dtype=DT).expand(B, 2), mu[:, None]], 1)


def rows_field(t, y, w):
    """Non-autonomous: every row reads its own time t[b]."""
    A = torch.tensor([[0.1, -1.0, 0.3], [1.0, 0.2, -0.4], [0.0, 0.5, -0.3]], dtype=DT)
    return torch.tanh(y @ (w * A).T) + 0.5 * torch.sin(3 * t).unsqueeze(-1)


@pytest.fixture(params=["host", "tensor"])
def decisions(request, monkeypatch):
    """Both implementations of the per-row decisions: the compiled kernel over numpy arrays
    (CPU tensors, numba installed) and the tensor operations (what CUDA runs), each checked to
    have been the one used."""
    from pyneuralode import _per_sample_host

    host = request.param == "host"
    if host:
        pytest.importorskip("numba", reason="the host decisions need numba (the compiled extra)")
    monkeypatch.setattr(_per_sample_host, "ENABLED", host)
    calls = []
    decide = _per_sample_host.HostRows.decide
    monkeypatch.setattr(
        _per_sample_host.HostRows, "decide", lambda self, *a: calls.append(1) or decide(self, *a)
    )
    yield request.param
    assert bool(calls) == host


def staggered_times(B, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(B, T, dtype=DT, generator=g) * 3, 1).values
    t[:, 0] = torch.rand(B, dtype=DT, generator=g) * 0.3  # rows start at different times
    return t


@pytest.mark.parametrize("mode", [True, "compact"])
@pytest.mark.parametrize("solver", [pn.Tsit5(), pn.Dopri5(), pn.Vern7(), pn.DP8()], ids=str)
def test_per_sample_steps_equal_independent_solves(solver, mode, decisions):
    B = 5
    y0 = vdp_batch(B, 0.5, 4.0)
    y0[:, :2] += torch.randn(B, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    # forward and backward time (backward in time Van der Pol leaves its cycle: a short span)
    for t in (staggered_times(B), -0.3 * staggered_times(B, seed=2)):
        sol = pn.solve(vdp, y0, t, solver, rtol=1e-7, atol=1e-9, per_sample=mode)
        assert isinstance(sol, pn.PerSampleSolution) and sol.ys.shape == (5, B, 3)
        assert all(r == "Success" for r in sol.retcode) and sol.successful
        for b in range(B):
            ref = pn.solve(vdp, y0[b : b + 1], t[b], solver, rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-10, atol=1e-11)
            assert int(sol.stats["naccept"][b]) == ref.stats["naccept"]
            assert int(sol.stats["nreject"][b]) == ref.stats["nreject"]
            if not isinstance(solver, (pn.Vern7, pn.DP8)):
                # (Vern7/DP8 evaluate their dense-output stages for every row when any row has
                # an output inside its step)
                assert int(sol.stats["nfe"][b]) == ref.stats["nfe"]
            assert float(sol.t_reached[b]) == pytest.approx(float(t[b, -1]), abs=1e-12)


@pytest.mark.parametrize("mode", [True, "compact"])
@pytest.mark.parametrize("solver", [pn.Rodas5P(batched=True), pn.Rodas4(batched=True)], ids=repr)
def test_per_sample_rosenbrock_equals_independent_solves(solver, mode):
    B = 4
    y0 = vdp_batch(B, 1.0, 300.0)  # from mild to stiff
    for t in (torch.tensor([0.0, 0.7, 2.0], dtype=DT), staggered_times(B, T=3, seed=3)):
        sol = pn.solve(vdp, y0, t, solver, rtol=1e-6, atol=1e-8, per_sample=mode)
        for b in range(B):
            ref = pn.solve(
                vdp, y0[b : b + 1], t if t.ndim == 1 else t[b], type(solver)(), rtol=1e-6, atol=1e-8
            )
            torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-9, atol=1e-10)
            assert int(sol.stats["naccept"][b]) == ref.stats["naccept"]
            assert int(sol.stats["nreject"][b]) == ref.stats["nreject"]
            # a retried step forms its Jacobian again (the step's field changed with h)
            extra = int(sol.stats["nfe"][b]) - ref.stats["nfe"]
            assert 0 <= extra <= ref.stats["nreject"] + B
    assert sol.stats["njac"] > 0
    # DirectAdjoint through the per-row Jacobians and solves: the separate solves' gradient
    y0 = y0[:2].clone().requires_grad_()
    t = torch.tensor([0.0, 1.0], dtype=DT)
    sol = pn.solve(vdp, y0, t, solver, rtol=1e-8, atol=1e-10, per_sample=mode)
    (g,) = torch.autograd.grad(sol.ys[-1, :, :2].sum(), [y0])
    for b in range(2):
        ref = pn.solve(vdp, y0[b : b + 1], t, type(solver)(), rtol=1e-8, atol=1e-10)
        (gb,) = torch.autograd.grad(ref.ys[-1, 0, :2].sum(), [y0])
        torch.testing.assert_close(g[b], gb[b], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ctrl", [pn.PIController(), pn.PredictiveController()], ids=repr)
def test_per_sample_controllers_and_step_bounds_follow_independent_solves(ctrl, decisions):
    y0 = vdp_batch(3, 0.5, 8.0)
    t = torch.tensor([0.0, 3.0], dtype=DT)
    kw = {"controller": ctrl, "dtmax": 0.5, "dtmin": 1e-12}
    sol = pn.solve(vdp, y0, t, pn.Tsit5(), per_sample=True, **kw)
    for b in range(3):
        ref = pn.solve(vdp, y0[b : b + 1], t, pn.Tsit5(), **kw)
        assert int(sol.stats["naccept"][b]) == ref.stats["naccept"]
        assert int(sol.stats["nreject"][b]) == ref.stats["nreject"]
        torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-10, atol=1e-11)


def test_per_sample_nonautonomous_field_gets_each_rows_time(decisions):
    B = 4
    y0 = torch.randn(B, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    w = torch.tensor(0.8, dtype=DT)
    t = staggered_times(B, T=4, seed=5)
    sol = pn.solve(rows_field, y0, t, args=(w,), rtol=1e-9, atol=1e-11, per_sample=True)
    for b in range(B):
        ref = pn.solve(
            lambda s, y, w: rows_field(s.reshape(1), y, w),
            y0[b : b + 1],
            t[b],
            args=(w,),
            rtol=1e-9,
            atol=1e-11,
        )
        torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-10, atol=1e-11)
        assert int(sol.stats["naccept"][b]) == ref.stats["naccept"]


@pytest.mark.parametrize("mode", [True, "compact"])
def test_per_sample_vdp_batch_evaluations_match_independent_solves(mode, decisions):
    B = 16  # μ spread over [0.1, 10] (the batch, smaller)
    y0 = vdp_batch(B)
    t = torch.tensor([0.0, 6.0], dtype=DT)
    sol = pn.solve(vdp, y0, t, rtol=1e-6, atol=1e-8, per_sample=mode)
    independent = sum(
        pn.solve(vdp, y0[b : b + 1], t, rtol=1e-6, atol=1e-8).stats["nfe"] for b in range(B)
    )
    per_sample = int(sol.stats["nfe"].sum())
    assert per_sample <= 1.15 * independent
    if mode == "compact":  # the rows actually evaluated: finished samples stopped costing
        assert sol.stats["nrows"] <= 1.15 * independent
    shared = pn.solve(vdp, y0, t, rtol=1e-6, atol=1e-8)
    # the shared step takes the stiffest sample's steps for all of them
    assert B * shared.stats["nfe"] > 1.5 * per_sample
    torch.testing.assert_close(sol.ys[-1], shared.ys[-1], rtol=1e-4, atol=1e-4)


def test_per_sample_mask_mode_last_row_keeps_the_whole_batch(monkeypatch, decisions):
    # mask mode hands its last running row to the scalar loop: f must keep seeing every row (here
    # it captures per-sample constants of shape (B, 1)), the stopped rows at their own end times
    # and unchanged, and the last row must still equal its own solve
    from pyneuralode import _loop

    handed = []
    finish = _loop._finish_row
    monkeypatch.setattr(_loop, "_finish_row", lambda *a: handed.append(a[-1]) or finish(*a))
    k = torch.tensor([[0.5], [2.0], [40.0], [1.0]], dtype=DT)
    seen = []

    def f(t, y):
        seen.append((y.shape[0], t.clone()))
        return torch.cat([-k * y[:, :1] * (1 + 0.1 * t[:, None]), k * y[:, :1] - y[:, 1:]], 1)

    y0 = torch.tensor([[1.0, 0.0], [2.0, 1.0], [1.0, 1.0], [0.5, 0.0]], dtype=DT)
    t = torch.tensor([0.0, 0.7, 3.0], dtype=DT)
    sol = pn.solve(f, y0, t, pn.Tsit5(), rtol=1e-8, atol=1e-10, per_sample=True)
    assert len(handed) == 1 and handed[0][0] == 2  # the stiff row, with the batch
    assert all(b == 4 for b, _ in seen)
    t_last = seen[-1][1]
    assert torch.equal(t_last[[0, 1, 3]], torch.full((3,), 3.0, dtype=DT))
    for b in range(4):
        kb = k[b : b + 1]

        def fb(t, y, kb=kb):
            return torch.cat([-kb * y[:, :1] * (1 + 0.1 * t), kb * y[:, :1] - y[:, 1:]], 1)

        own = pn.solve(fb, y0[b : b + 1], t, pn.Tsit5(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(sol.ys[:, b], own.ys[:, 0], rtol=1e-10, atol=1e-12)
        assert int(sol.stats["naccept"][b]) == own.stats["naccept"]
        assert int(sol.stats["nreject"][b]) == own.stats["nreject"]
        assert int(sol.stats["nfe"][b]) == own.stats["nfe"]
    assert sol.stats["nrows"] == 4 * sol.stats["ncalls"]


def test_per_sample_retcodes_one_sample_fails_others_succeed(decisions):
    def blow_up(t, y):
        return y * y  # y0 = 2 blows up at t = 0.5

    y0 = torch.tensor([[0.5], [2.0], [1.0], [0.3]], dtype=DT)
    t = torch.tensor([0.0, 0.4, 0.9], dtype=DT)
    for mode in (True, "compact"):
        sol = pn.solve(blow_up, y0, t, per_sample=mode, throw=False)
        assert [str(r) for r in sol.retcode] == ["Success", "DtLessThanMin", "Success", "Success"]
        assert not sol.successful and sol.successful_mask.tolist() == [True, False, True, True]
        assert float(sol.t_reached[1]) == pytest.approx(0.5, abs=1e-5)
        assert torch.isnan(sol.ys[2, 1]).all() and torch.isfinite(sol.ys[:2, 1]).all()
        for b in (0, 2, 3):
            ref = pn.solve(blow_up, y0[b : b + 1], t)
            torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-12, atol=1e-12)
            assert int(sol.stats["nfe"][b]) == ref.stats["nfe"]
        with pytest.raises(pn.SolveError, match=r"1 of 4 samples \(sample 1: DtLessThanMin"):
            pn.solve(blow_up, y0, t, per_sample=mode)
    # max_steps counts each sample's attempts: the stiff sample stops, the mild ones finish
    y0 = vdp_batch(3, 0.5, 1.0)
    y0[1, 2] = 1000.0
    ref = pn.solve(vdp, y0[1:2], torch.tensor([0.0, 3.0], dtype=DT), throw=False, max_steps=200)
    for mode in (True, "compact"):  # compact: the stiff sample ends alone (in the scalar loop)
        sol = pn.solve(
            vdp, y0, torch.tensor([0.0, 3.0], dtype=DT), per_sample=mode, throw=False, max_steps=200
        )
        assert [str(r) for r in sol.retcode] == ["Success", "MaxIters", "Success"]
        assert int(sol.stats["naccept"][1] + sol.stats["nreject"][1]) == 200
        assert int(sol.stats["naccept"][1]) == ref.stats["naccept"]
        assert int(sol.stats["nfe"][1]) == ref.stats["nfe"]


@pytest.mark.parametrize("mode", [True, "compact"])
def test_per_sample_gradients_vs_finite_differences_and_separate_solves(mode, decisions):
    B = 3
    y0 = torch.randn(B, 3, dtype=DT, generator=torch.Generator().manual_seed(4)).requires_grad_()
    w = torch.tensor(1.3, dtype=DT, requires_grad=True)
    t = staggered_times(B, T=3, seed=6)
    c = torch.linspace(-1, 1, 3, dtype=DT)

    def loss(y0_, w_, **kw):
        return (pn.solve(rows_field, y0_, t, args=(w_,), per_sample=mode, **kw).ys * c).sum()

    gy0, gw = torch.autograd.grad(loss(y0, w, rtol=1e-9, atol=1e-11), [y0, w])
    ref = sum(
        (
            pn.solve(
                lambda s, y, w_: rows_field(s.reshape(1), y, w_),
                y0[b : b + 1],
                t[b],
                args=(w,),
                rtol=1e-9,
                atol=1e-11,
            ).ys
            * c
        ).sum()
        for b in range(B)
    )
    ry0, rw = torch.autograd.grad(ref, [y0, w])
    torch.testing.assert_close(gy0, ry0, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-11)
    eps = 1e-6
    with torch.no_grad():
        tight = {"rtol": 1e-12, "atol": 1e-13}
        fd_w = (loss(y0, w + eps, **tight) - loss(y0, w - eps, **tight)) / (2 * eps)
        e = torch.zeros_like(y0)
        e[1, 2] = eps
        fd_y = (loss(y0 + e, w, **tight) - loss(y0 - e, w, **tight)) / (2 * eps)
    assert float(gw) == pytest.approx(float(fd_w), rel=1e-6, abs=1e-7)
    assert float(gy0[1, 2]) == pytest.approx(float(fd_y), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("mode", [True, "compact"])
def test_per_sample_joint_backsolve_adjoint(mode, decisions):
    """Per-sample forward steps, one backward pass for the batch: the gradient of the same
    solution as DirectAdjoint's, to the tolerance."""
    B = 3
    y0 = torch.randn(B, 3, dtype=DT, generator=torch.Generator().manual_seed(8)).requires_grad_()
    w = torch.tensor(0.9, dtype=DT, requires_grad=True)
    t = torch.tensor([0.1, 0.8, 2.0], dtype=DT)
    c = torch.linspace(-1, 1, 3, dtype=DT)
    grads, sols = [], []
    for sensealg in (None, pn.BacksolveAdjoint()):
        sol = pn.solve(
            rows_field, y0, t, args=(w,), per_sample=mode, sensealg=sensealg, rtol=1e-10, atol=1e-12
        )
        grads.append(torch.autograd.grad((sol.ys * c).sum(), [y0, w]))
        sols.append(sol)
    torch.testing.assert_close(sols[1].ys, sols[0].ys, rtol=0, atol=0)  # the same forward steps
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-7, atol=1e-9)
    assert sols[1].stats["nfe_adjoint"] > 0 and sols[1].stats["naccept"].shape == (B,)
    with pytest.raises(ValueError, match="every sample needs the same times"):
        pn.solve(
            rows_field,
            y0,
            staggered_times(B),
            args=(w,),
            per_sample=mode,
            sensealg=pn.BacksolveAdjoint(),
        )


def test_neural_ode_per_sample(decisions):
    torch.manual_seed(0)
    model = pn.NeuralODE(pn.ConcatMLP(2, hidden=16), rtol=1e-6, atol=1e-8, per_sample=True).double()
    y0 = torch.randn(4, 2, dtype=DT)
    y = model(y0)
    assert y.shape == (4, 2) and model.nfe_forward == model.last_stats["ncalls"]
    vf = model.vector_field
    for b in range(4):
        ref = pn.solve(
            lambda t, y: vf(t, y),
            y0[b : b + 1],
            torch.tensor([0.0, 1.0], dtype=DT),
            pn.Dopri5(),
            rtol=1e-6,
            atol=1e-8,
        )
        torch.testing.assert_close(y[b], ref.ys[-1, 0], rtol=1e-10, atol=1e-12)
        assert int(model.last_stats["naccept"][b]) == ref.stats["naccept"]
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="per_sample: expected False, True"):
        pn.NeuralODE(pn.ConcatMLP(2), per_sample="yes")


def test_odeint_unaffected_by_per_sample():
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq not installed")
    y0 = vdp_batch(4, 0.5, 3.0)
    t = torch.linspace(0, 2, 3, dtype=DT)
    ours = pn.odeint(vdp, y0, t, rtol=1e-8, atol=1e-10)
    theirs = torchdiffeq.odeint(vdp, y0, t, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    sol = pn.solve(vdp, y0, t, rtol=1e-8, atol=1e-10)  # shared steps by default
    assert isinstance(sol.stats["nfe"], int) and str(sol.retcode) == "Success"


@pytest.mark.parametrize(
    "ctrl",
    [pn.PIController(), pn.PIController(beta1=1.0, beta2=0.0), pn.PredictiveController()],
    ids=repr,
)
def test_batch_controller_factor_equals_scalar_factor(ctrl):
    g = torch.Generator().manual_seed(7)
    err = torch.cat(
        [
            torch.rand(40, dtype=DT, generator=g) * 3,
            torch.tensor([0.0, 0.0, float("inf"), float("nan"), 1.0], dtype=DT),
        ]
    )
    n = err.numel()
    err_prev = torch.rand(n, dtype=DT, generator=g) + 1e-3
    acc = torch.rand(n, generator=g) > 0.3
    ratio = torch.rand(n, dtype=DT, generator=g) * 2
    ratio[::5] = float("nan")
    err_in = torch.where(torch.isnan(err), float("inf"), err)
    got = ctrl.factor_batch(err_in, err_prev, 5, acc, ratio)
    for i in range(n):
        e = float("inf") if err[i].isnan() else float(err[i])
        want = ctrl.factor(
            e, float(err_prev[i]), 5, bool(acc[i]), None if ratio[i].isnan() else float(ratio[i])
        )
        assert float(got[i]) == pytest.approx(want, rel=1e-12), i


def test_batch_controller_factor_follows_changed_fields():
    # factor_batch keeps its constants as tensors on the controller: a changed field (or another
    # dtype) must not reuse the old ones
    ctrl = pn.PIController(beta1=1.0, beta2=0.0)
    err = torch.tensor([0.0, 0.3, 0.9, 2.0, 50.0], dtype=DT)
    acc = torch.tensor([False, True, False, True, True])
    for safety, factor_max in ((0.9, 10.0), (0.5, 3.0)):
        ctrl.safety, ctrl.factor_max = safety, factor_max
        for dtype in (DT, torch.float32):
            got = ctrl.factor_batch(err.to(dtype), None, 5, acc)
            assert got.dtype == dtype
            for i in range(err.numel()):
                want = ctrl.factor(float(err[i]), 1.0, 5, bool(acc[i]))
                assert float(got[i]) == pytest.approx(want, rel=1e-6), (safety, dtype, i)


def test_per_sample_bad_input_is_named():
    y0 = vdp_batch(3)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(ValueError, match="per_sample: expected False, True"):
        pn.solve(vdp, y0, t, per_sample="rows")
    with pytest.raises(ValueError, match="solver: per_sample=True steps the adaptive explicit"):
        pn.solve(vdp, y0, t, pn.QNDF(), per_sample=True)
    with pytest.raises(ValueError, match="KenCarp4 needs batched=True"):
        pn.solve(vdp, y0, t, pn.KenCarp4(), per_sample=True)
    with pytest.raises(ValueError, match="needs batched=True"):
        pn.solve(vdp, y0, t, pn.Rodas5P(), per_sample=True)
    with pytest.raises(ValueError, match="sensealg: per_sample=True supports DirectAdjoint"):
        pn.solve(vdp, y0, t, per_sample=True, sensealg=pn.DirectAdjoint(checkpoints=4))
    with pytest.raises(ValueError, match=r"t: per_sample=True takes times of shape"):
        pn.solve(vdp, y0, torch.zeros(2, 2, dtype=DT), per_sample=True)
    with pytest.raises(ValueError, match="t: row 1 is not strictly monotonic"):
        pn.solve(
            vdp, y0, torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]], dtype=DT), per_sample=True
        )
    with pytest.raises(ValueError, match="t: gradients with respect to the times"):
        pn.solve(vdp, y0, t.clone().requires_grad_(), per_sample=True)
    with pytest.raises(ValueError, match="dense: per_sample=True keeps no dense output"):
        pn.solve(vdp, y0, t, per_sample=True, dense=True)
    with pytest.raises(ValueError, match="adaptive: per_sample=True"):
        pn.solve(vdp, y0, t, per_sample=True, adaptive=False, dt=0.1)
    with pytest.raises(ValueError, match="per_sample: compile=True, event"):
        pn.solve(vdp, y0, t, per_sample=True, event=lambda t, y: y.sum())
    with pytest.raises(TypeError, match=r"y0: per_sample=True takes one tensor"):
        pn.solve(lambda t, y: y, (y0, y0), t, per_sample=True)
    mu = torch.tensor([0.1, 1.0, 100.0], dtype=DT)  # a per-sample constant outside the state

    def captured(t, y):
        return torch.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0], 0 * y[:, 0]], 1)

    with pytest.raises(ValueError, match="with per_sample=.compact. f gets only the running"):
        pn.solve(captured, y0, torch.tensor([0.0, 3.0], dtype=DT), per_sample="compact")
    sol = pn.solve(captured, y0, torch.tensor([0.0, 3.0], dtype=DT), per_sample=True)  # mask: fine
    assert sol.successful
    with pytest.raises(ValueError, match="keeps no dense output"):
        sol(0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_per_sample_on_cuda_equals_cpu():
    y0 = vdp_batch(64)
    t = torch.linspace(0, 3, 4, dtype=DT)
    cpu = pn.solve(vdp, y0, t, rtol=1e-7, atol=1e-9, per_sample=True)
    for mode in (True, "compact"):
        gpu = pn.solve(vdp, y0.cuda(), t.cuda(), rtol=1e-7, atol=1e-9, per_sample=mode)
        assert gpu.ys.device.type == "cuda"
        # reductions round differently on the GPU: a step more or less, the same tolerance
        torch.testing.assert_close(gpu.ys.cpu(), cpu.ys, rtol=1e-5, atol=1e-6)
        assert int((gpu.stats["naccept"].cpu() - cpu.stats["naccept"]).abs().max()) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_per_sample_esdirk_on_cuda_equals_cpu():
    y0 = vdp_batch(16, 1.0, 300.0)
    t = torch.linspace(0, 1, 3, dtype=DT)
    cpu = pn.solve(vdp, y0, t, pn.KenCarp4(batched=True), per_sample=True)
    for mode in (True, "compact"):
        gpu = pn.solve(vdp, y0.cuda(), t.cuda(), pn.KenCarp4(batched=True), per_sample=mode)
        assert gpu.ys.device.type == "cuda" and gpu.successful
        torch.testing.assert_close(gpu.ys.cpu(), cpu.ys, rtol=1e-4, atol=1e-5)
        assert int((gpu.stats["naccept"].cpu() - cpu.stats["naccept"]).abs().max()) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_per_sample_cuda_one_host_sync_per_step():
    y0 = vdp_batch(32).cuda()
    t = torch.tensor([0.0, 2.0], dtype=DT, device="cuda")
    pn.solve(vdp, y0, t, per_sample=True)  # warm up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = pn.solve(vdp, y0, t, per_sample=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    steps = int((sol.stats["naccept"] + sol.stats["nreject"]).max())
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    # one per step, plus a few outside the loop (initial step, packaging the result)
    assert syncs <= steps + 10


# ------------------------------------------------------------------------------------------------
# per_sample=True with the ESDIRK methods (a Newton iteration per row) and the joint
# Interpolating/Quadrature adjoints (issue 22, session 4)


@pytest.mark.parametrize("mode", [True, "compact"])
@pytest.mark.parametrize("method", [pn.KenCarp4, pn.Kvaerno5], ids=lambda m: m.__name__)
def test_per_sample_esdirk_equals_independent_solves(method, mode):
    """Stiff Van der Pol, μ from 1 to 1000: every row's own Jacobians, LUs, Newton iterations and
    step control, so its values, accepted/rejected steps and evaluations are its own solve's.
    KenCarp4 interpolates with its continuous extension, Kvaerno5 with Hermite."""
    y0 = torch.cat(
        [
            torch.tensor([[2.0, 0.0]], dtype=DT).expand(3, 2),
            torch.tensor([[1.0], [30.0], [1000.0]], dtype=DT),
        ],
        1,
    )
    t = torch.tensor([0.0, 0.35, 1.0], dtype=DT)  # 0.35: an output inside a step
    with torch.no_grad():
        sol = pn.solve(vdp, y0, t, method(batched=True), rtol=1e-6, atol=1e-8, per_sample=mode)
    assert all(r == "Success" for r in sol.retcode)
    rejected = 0
    for b in range(3):
        with torch.no_grad():
            ref = pn.solve(vdp, y0[b : b + 1], t, method(batched=True), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-9, atol=1e-10)
        assert int(sol.stats["naccept"][b]) == ref.stats["naccept"]
        assert int(sol.stats["nreject"][b]) == ref.stats["nreject"]
        assert int(sol.stats["nfe"][b]) == ref.stats["nfe"]  # Newton iterations and Jacobians
        rejected += ref.stats["nreject"]
    assert rejected > 0  # the stiff rows reject steps on their own
    assert sol.stats["njac"] > 0 and sol.stats["nnewton"] > 0


def test_per_sample_esdirk_staggered_backward_nonautonomous_and_gradients():
    """Rows with their own (staggered) times, forward and backward in time, a field that reads
    each row's time; DirectAdjoint gradients equal the separate solves' and finite differences."""

    def relax(t, y):  # y' = -k (y - cos t), k (column 1) from 1 to 1e4
        k = y[:, 1:2]
        return torch.cat([-k * (y[:, :1] - torch.cos(t).reshape(-1, 1)), torch.zeros_like(k)], 1)

    y0 = torch.tensor([[1.0, 1.0], [0.5, 100.0], [0.0, 1e4]], dtype=DT)
    t = torch.tensor([[0.0, 0.5, 1.0], [0.3, 0.7, 1.5], [1.0, 1.2, 1.3]], dtype=DT)
    for tt, f in ((t, relax), (t.flip(1), lambda s, y: -relax(s, y))):  # stable both ways
        with torch.no_grad():
            sol = pn.solve(f, y0, tt, pn.KenCarp4(batched=True), per_sample="compact")
        for b in range(3):
            with torch.no_grad():
                ref = pn.solve(f, y0[b : b + 1], tt[b], pn.KenCarp4(batched=True))
            torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-8, atol=1e-9)
            assert int(sol.stats["naccept"][b]) == ref.stats["naccept"]
            assert int(sol.stats["nreject"][b]) == ref.stats["nreject"]
    # tolerances per row (a tensor shaped like the state): each row's Newton and error scale
    rtol = torch.tensor([[1e-8], [1e-4], [1e-6]], dtype=DT).expand(3, 2)
    with torch.no_grad():
        sol = pn.solve(relax, y0, t, pn.Kvaerno5(batched=True), per_sample="compact", rtol=rtol)
    for b in range(3):
        with torch.no_grad():
            ref = pn.solve(
                relax, y0[b : b + 1], t[b], pn.Kvaerno5(batched=True), rtol=rtol[b : b + 1]
            )
        torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-8, atol=1e-9)
        assert int(sol.stats["naccept"][b]) == ref.stats["naccept"]
    w = torch.tensor(0.8, dtype=DT, requires_grad=True)

    def osc(s, y):  # mildly stiff Van der Pol, a parameter w
        return torch.stack([y[:, 1], 5 * w * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.6], dtype=DT)
    kw = {"rtol": 1e-7, "atol": 1e-9}

    def loss(per_sample=True, **extra):
        sol = pn.solve(osc, y0, t, pn.Kvaerno5(batched=True), per_sample=per_sample, **extra)
        return (sol.ys[-1] * torch.tensor([1.0, -0.5], dtype=DT)).sum()

    gw, gy = torch.autograd.grad(loss(**kw), [w, y0])
    rw, ry = torch.zeros((), dtype=DT), torch.zeros_like(y0)
    for b in range(2):
        ref = pn.solve(osc, y0[b : b + 1], t, pn.Kvaerno5(batched=True), **kw)
        a, c = torch.autograd.grad(
            (ref.ys[-1] * torch.tensor([1.0, -0.5], dtype=DT)).sum(), [w, y0]
        )
        rw, ry = rw + a, ry + c
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gy, ry, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        eps, tight = 1e-6, {"rtol": 1e-10, "atol": 1e-12}
        w += eps
        lp = loss(**tight)
        w -= 2 * eps
        lm = loss(**tight)
        w += eps
    assert float(gw) == pytest.approx(float((lp - lm) / (2 * eps)), rel=1e-4)


def test_per_sample_esdirk_newton_fails_in_one_row_others_succeed():
    """Row 1's field is NaN after t = 1: its Newton iterations fail there, its steps halve until
    it stops (Unstable, as its own solve); the other rows never notice."""

    def f(t, y):
        k = y[:, 1:2]
        out = torch.cat([-k * (y[:, :1] - torch.cos(t).reshape(-1, 1)), 0 * y[:, 1:]], 1)
        return torch.where((y[:, 2:3] > 0) & (t.reshape(-1, 1) > 1.0), torch.nan, out)

    y0 = torch.tensor([[1.0, 10.0, 0.0], [1.0, 1e3, 1.0], [1.0, 1e3, 0.0]], dtype=DT)
    t = torch.tensor([0.0, 0.8, 2.0], dtype=DT)
    for mode in (True, "compact"):
        with torch.no_grad():
            sol = pn.solve(f, y0, t, pn.KenCarp4(batched=True), per_sample=mode, throw=False)
            ref1 = pn.solve(f, y0[1:2], t, pn.KenCarp4(batched=True), throw=False)
        assert [str(r) for r in sol.retcode] == ["Success", "Unstable", "Success"]
        assert str(ref1.retcode) == "Unstable"
        assert float(sol.t_reached[1]) == pytest.approx(1.0, abs=1e-12)
        assert torch.isnan(sol.ys[2, 1]).all() and torch.isfinite(sol.ys[:2, 1]).all()
        torch.testing.assert_close(sol.ys[1, 1], ref1.ys[1, 0], rtol=1e-9, atol=1e-10)
        # (near the NaN wall the halvings depend on rounding: counts agree to a few steps)
        assert abs(int(sol.stats["nreject"][1]) - ref1.stats["nreject"]) <= 5
        for b in (0, 2):
            with torch.no_grad():
                ref = pn.solve(f, y0[b : b + 1], t, pn.KenCarp4(batched=True))
            torch.testing.assert_close(sol.ys[:, b], ref.ys[:, 0], rtol=1e-9, atol=1e-10)
            assert int(sol.stats["naccept"][b]) == ref.stats["naccept"]
            assert int(sol.stats["nreject"][b]) == ref.stats["nreject"]
            assert int(sol.stats["nfe"][b]) == ref.stats["nfe"]
        if mode == "compact":
            with pytest.raises(pn.SolveError, match=r"1 of 3 samples \(sample 1: Unstable"):
                pn.solve(f, y0, t, pn.KenCarp4(batched=True), per_sample=mode)
    # max_steps per row: row 0 needs 32 attempts, row 2 25; with 28 only row 0 stops
    kw = {"throw": False, "max_steps": 28}
    with torch.no_grad():
        sol = pn.solve(f, y0[[0, 2]], t, pn.KenCarp4(batched=True), per_sample=True, **kw)
        ref = pn.solve(f, y0[:1], t, pn.KenCarp4(batched=True), **kw)
    assert [str(r) for r in sol.retcode] == ["MaxIters", "Success"] and not ref.successful
    assert int(sol.stats["naccept"][0] + sol.stats["nreject"][0]) == 28
    assert int(sol.stats["naccept"][0]) == ref.stats["naccept"]


@pytest.mark.parametrize(
    "sensealg",
    [
        pn.InterpolatingAdjoint(),
        pn.InterpolatingAdjoint(n_checkpoints=2),
        pn.QuadratureAdjoint(),
        pn.QuadratureAdjoint(quadrature="gauss-kronrod"),
    ],
    ids=repr,
)
def test_per_sample_joint_interpolating_and_quadrature_adjoints(sensealg):
    """Per-sample forward steps, one backward pass for the batch that re-solves the state from
    the output-time checkpoints: the gradient of DirectAdjoint's and of the separate per-sample
    solves with the same adjoint, to the tolerance, and finite differences."""
    B = 3
    y0 = torch.randn(B, 3, dtype=DT, generator=torch.Generator().manual_seed(8)).requires_grad_()
    w = torch.tensor(0.9, dtype=DT, requires_grad=True)
    t = torch.tensor([0.1, 0.8, 2.0], dtype=DT)
    c = torch.linspace(-1, 1, 3, dtype=DT)
    kw = {"args": (w,), "rtol": 1e-10, "atol": 1e-12}
    grads = {}
    for mode, alg in (("mask", None), ("mask", sensealg), ("compact", sensealg)):
        sol = pn.solve(rows_field, y0, t, per_sample=mode, sensealg=alg, **kw)
        grads[mode, alg is None] = torch.autograd.grad((sol.ys * c).sum(), [y0, w])
        if alg is not None:
            assert sol.stats["nfe_adjoint"] > 0 and sol.stats["nfe_recompute"] > 0
    direct = grads["mask", True]
    for mode in ("mask", "compact"):
        for g, d in zip(grads[mode, False], direct):
            torch.testing.assert_close(g, d, rtol=1e-7, atol=1e-9)
    sep = [torch.zeros_like(y0), torch.zeros_like(w)]
    for b in range(B):
        ref = pn.solve(
            lambda s, y, w_: rows_field(s.reshape(1), y, w_),
            y0[b : b + 1],
            t,
            sensealg=sensealg,
            **kw,
        )
        for i, g in enumerate(torch.autograd.grad((ref.ys * c).sum(), [y0, w])):
            sep[i] = sep[i] + g
    for g, s in zip(grads["mask", False], sep):
        torch.testing.assert_close(g, s, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        eps, tight = 1e-6, {"args": None, "rtol": 1e-12, "atol": 1e-13}
        lp = (
            pn.solve(rows_field, y0, t, per_sample=True, **{**tight, "args": (w + eps,)}).ys * c
        ).sum()
        lm = (
            pn.solve(rows_field, y0, t, per_sample=True, **{**tight, "args": (w - eps,)}).ys * c
        ).sum()
    assert float(grads["mask", False][1]) == pytest.approx(float((lp - lm) / (2 * eps)), rel=1e-6)
    with pytest.raises(ValueError, match="every sample needs the same times"):
        pn.solve(rows_field, y0, staggered_times(B), args=(w,), per_sample=True, sensealg=sensealg)


def test_per_sample_joint_adjoint_with_a_batched_implicit_solver():
    """KenCarp4(batched=True) forward per sample; the joint backward pass takes the unbatched
    method for the flat adjoint state and re-solves the batch with the batched one."""
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def osc(s, y):
        return torch.stack([y[:, 1], 5 * w * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.6], dtype=DT)

    def grads_agree(solver, algs):  # each joint adjoint's gradient against DirectAdjoint's
        grads = []
        for alg in (None, *algs):
            sol = pn.solve(
                osc,
                y0,
                t,
                solver,
                per_sample=True,
                sensealg=alg,
                rtol=1e-7,
                atol=1e-9,
                adjoint_params=(w,),
            )
            grads.append(torch.autograd.grad(sol.ys[1:].sum(), [y0, w]))
        for g in grads[1:]:
            for a, d in zip(g, grads[0]):
                torch.testing.assert_close(a, d, rtol=1e-4, atol=1e-6)

    grads_agree(pn.KenCarp4(batched=True), (pn.InterpolatingAdjoint(), pn.QuadratureAdjoint()))
    # the same for the joint BacksolveAdjoint with a batched Rodas method (it failed before:
    # the batched method was given the flat adjoint state)
    grads_agree(pn.Rodas5P(batched=True), (pn.BacksolveAdjoint(),))


def test_per_sample_joint_adjoints_find_the_parameters_f_reaches():
    """A module reached by f (a closure; y0 needs no gradient): the joint adjoints differentiate
    its parameters, as DirectAdjoint does (they were missed: the backward pass's wrapper of f
    hid them, and the solve fell back to the shared-step loop)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DT)

    def f(t, y):  # the row's speed in column 2
        return torch.cat([y[:, 2:] * net(y[:, :2]), torch.zeros_like(y[:, 2:])], 1)

    y0 = torch.cat([torch.randn(3, 2, dtype=DT), torch.tensor([[0.5], [1.0], [3.0]], dtype=DT)], 1)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    grads = []
    for alg in (None, pn.BacksolveAdjoint(), pn.InterpolatingAdjoint(), pn.QuadratureAdjoint()):
        sol = pn.solve(f, y0, t, per_sample=True, sensealg=alg, rtol=1e-9, atol=1e-11)
        assert isinstance(sol, pn.PerSampleSolution)
        grads.append(torch.autograd.grad((sol.ys[1:, :, :2] ** 2).sum(), list(net.parameters())))
    for g in grads[1:]:
        for a, d in zip(g, grads[0]):
            torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-8)


def _host_and_tensor(monkeypatch, run):
    from pyneuralode import _per_sample_host

    out = []
    for host in (True, False):
        monkeypatch.setattr(_per_sample_host, "ENABLED", host)
        out.append(run())
    return out


@pytest.mark.parametrize("mode", [True, "compact"])
def test_per_sample_host_decisions_take_the_tensor_decisions_steps(monkeypatch, mode):
    """The compiled host decisions and the tensor decisions (CUDA's code, run here on the CPU)
    take the same steps: every row's accepted and rejected steps, evaluations, return code and
    end time, over outputs inside steps, per-row and backward times, a time-dependent field, the
    PI (with β₂) and predictive controllers, dtmin/dtmax/dt, max_steps, a failing row, and
    DirectAdjoint gradients; float32 to the tolerance. (Step sizes may differ in the last bits:
    the two norms round differently. On the stiffest rows with the predictive controller that
    can change a step, so that case runs on the milder rows.)"""
    pytest.importorskip("numba", reason="the host decisions need numba (the compiled extra)")
    y0 = vdp_batch(6, 0.3, 30.0)
    y0[:, :2] += torch.randn(6, 2, dtype=DT, generator=torch.Generator().manual_seed(7))
    w = torch.tensor(0.8, dtype=DT)
    cases = [
        (vdp, y0, staggered_times(6, T=6), pn.Vern7(), {}),
        (vdp, y0, -0.3 * staggered_times(6, seed=2), pn.DP8(), {}),
        (
            lambda t, y: rows_field(t, y, w),
            y0,
            staggered_times(6, seed=4),
            pn.BS3(),
            {"controller": pn.PIController(beta1=0.6, beta2=0.2)},
        ),
        (
            vdp,
            y0[:4],
            torch.tensor([0.0, 1.0, 4.0], dtype=DT),
            pn.Tsit5(),
            {"controller": pn.PredictiveController(), "dtmax": 0.3, "dtmin": 1e-9},
        ),
        (vdp, y0, torch.tensor([0.0, 4.0], dtype=DT), pn.Dopri5(), {"max_steps": 60, "dt": 0.01}),
        (
            lambda t, y: y * y,
            torch.tensor([[0.5], [2.0], [1.0]], dtype=DT),
            torch.tensor([0.0, 0.4, 0.9], dtype=DT),
            pn.Dopri5(),
            {},
        ),
        (  # atol = 0 and a component at 0: a zero error scale (0/0), Unstable in every row
            lambda t, y: torch.stack([-y[:, 0], torch.zeros_like(y[:, 0])], 1),
            torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=DT),
            torch.tensor([0.0, 1.0], dtype=DT),
            pn.Dopri5(),
            {"atol": 0.0},
        ),
    ]
    for f, y, t, solver, kw in cases:
        kw = {"rtol": 1e-7, "atol": 1e-9, **kw}
        host, tensor = _host_and_tensor(
            monkeypatch,
            lambda: pn.solve(f, y, t, solver, per_sample=mode, throw=False, **kw),  # noqa: B023
        )
        for key in ("nfe", "naccept", "nreject"):
            assert torch.equal(host.stats[key], tensor.stats[key]), (solver, key)
        for key in ("nsteps", "ncalls", "nrows"):
            assert host.stats[key] == tensor.stats[key], (solver, key)
        assert [str(r) for r in host.retcode] == [str(r) for r in tensor.retcode]
        torch.testing.assert_close(host.t_reached, tensor.t_reached, rtol=1e-8, atol=1e-12)
        # the same steps; their sizes may differ in the last bits (the norms round differently),
        # which the stiffer rows carry to ~1e-10
        torch.testing.assert_close(host.ys, tensor.ys, rtol=1e-8, atol=1e-9, equal_nan=True)
    # float32: the host norm sums in float64 as the scalar loop's does, the tensor norm in
    # float32; near the precision's floor the rejections follow the rounding, so the two agree to
    # the tolerance, not step for step
    t = torch.tensor([0.0, 0.5, 3.0])
    host, tensor = _host_and_tensor(
        monkeypatch,
        lambda: pn.solve(vdp, y0.float(), t, pn.Tsit5(), rtol=1e-5, atol=1e-7, per_sample=mode),
    )
    ref = pn.solve(vdp, y0, t.double(), pn.Tsit5(), rtol=1e-10, atol=1e-12, per_sample=mode).ys
    for sol in (host, tensor):
        assert sol.ys.dtype == torch.float32 and sol.successful
        torch.testing.assert_close(sol.ys.double(), ref, rtol=1e-3, atol=1e-3)
    # gradients through the host decisions' steps (DirectAdjoint)
    y0g = y0[:3].clone().requires_grad_()
    grads = _host_and_tensor(
        monkeypatch,
        lambda: torch.autograd.grad(
            pn.solve(vdp, y0g, staggered_times(3), per_sample=mode).ys.sum(), [y0g]
        )[0],
    )
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_per_sample_without_numba_takes_the_tensor_decisions(monkeypatch):
    """A CPU without numba (the ``compiled`` extra not installed) steps with the tensor
    decisions, to the same result."""
    import sys

    from pyneuralode import _per_sample_host

    y0 = vdp_batch(5, 0.5, 4.0)
    t = torch.tensor([0.0, 1.0, 3.0], dtype=DT)
    with_numba = pn.solve(vdp, y0, t, pn.Tsit5(), per_sample="compact")
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.setattr(_per_sample_host, "_kernels", None)
    monkeypatch.setattr(_per_sample_host, "_numba_missing", False)
    monkeypatch.setattr(
        _per_sample_host.HostRows, "__init__", lambda *a, **k: pytest.fail("host decisions used")
    )
    without = pn.solve(vdp, y0, t, pn.Tsit5(), per_sample="compact")
    assert _per_sample_host._numba_missing
    torch.testing.assert_close(without.ys, with_numba.ys, rtol=1e-8, atol=1e-9)
    assert torch.equal(without.stats["naccept"], with_numba.stats["naccept"])


@pytest.mark.parametrize("mode", [True, "compact"])
def test_per_sample_tensor_decisions_synchronise_once_per_step(monkeypatch, mode):
    """The tensor decisions (what a GPU runs) read the device at most once per step: every
    tensor method that makes a CUDA device wait for the host (``item``, ``tolist``, ``bool``,
    ``int``, ``float``, ``nonzero``, ``cpu``, ``numpy``) is counted here on the CPU, over a solve
    with outputs inside steps, rows finishing at different steps (compaction) and the last row's
    hand-off to the scalar loop (whose decisions are on the host by design, after one read)."""
    from pyneuralode import _loop, _per_sample_host

    monkeypatch.setattr(_per_sample_host, "ENABLED", False)
    y0 = vdp_batch(16, 0.5, 6.0)
    t = torch.linspace(0, 3, 7, dtype=DT)
    in_loop = []
    per_sample = _loop.integrate_per_sample

    def traced(*a, **k):
        in_loop.append(0)
        try:
            return per_sample(*a, **k)
        finally:
            in_loop.append(None)

    monkeypatch.setattr(_loop, "integrate_per_sample", traced)
    # the hand-off's scalar loop decides on the host: not counted
    finish = _loop._finish_row
    monkeypatch.setattr(_loop, "_finish_row", lambda *a: in_loop.append(None) or finish(*a))
    counts = {}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        method = getattr(torch.Tensor, name)

        def counted(self, *a, _m=method, _n=name, **k):
            if in_loop and in_loop[-1] == 0:
                counts[_n] = counts.get(_n, 0) + 1
            return _m(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    sol = pn.solve(vdp, y0, t, pn.Dopri5(), per_sample=mode)
    monkeypatch.undo()
    assert sol.successful
    steps = sol.stats["nsteps"]
    # one per batched step, plus the set-up's (direction, times' sign, running rows) and the
    # hand-off's read of its row
    assert sum(counts.values()) <= steps + 6, (counts, steps)
    assert counts.get("nonzero", 0) <= 1  # compaction finds the rows without reading the device


def test_per_sample_steps_side_by_side_with_torchode():
    """torchode, the peer that defines per-sample stepping, on the same Van der Pol batch (Dopri5,
    the integral controller, rtol 1e-6, atol 1e-8): both solutions within 2e-5 of a tight solve,
    and each sample takes within 15% of torchode's accepted steps (their norms and safety
    factors differ in detail), the most for the same sample."""
    to = pytest.importorskip("torchode", reason="the side-by-side check needs torchode")
    B = 16
    y0 = vdp_batch(B)
    t = torch.tensor([0.0, 6.0], dtype=DT)
    term = to.ODETerm(vdp)
    peer = to.AutoDiffAdjoint(
        to.Dopri5(term=term), to.IntegralController(atol=1e-8, rtol=1e-6, term=term)
    ).solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(B, 2)))
    ours = pn.solve(vdp, y0, t, pn.Dopri5(), rtol=1e-6, atol=1e-8, per_sample=True)
    tight = pn.solve(vdp, y0, t, pn.Dopri5(), rtol=1e-12, atol=1e-14, per_sample=True)
    torch.testing.assert_close(ours.ys[-1], tight.ys[-1], rtol=0, atol=2e-5)
    torch.testing.assert_close(peer.ys[:, -1], tight.ys[-1], rtol=0, atol=2e-5)
    ratio = ours.stats["naccept"].double() / peer.stats["n_accepted"].double()
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    assert int(ours.stats["naccept"].argmax()) == int(peer.stats["n_accepted"].argmax())
