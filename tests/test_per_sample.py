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


@pytest.mark.parametrize("sensealg", [None, pn.InterpolatingAdjoint()], ids=["direct", "interpolating"])
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
        s = pn.solve(f, y0[b:b + 1], t[b], args=(w,), rtol=1e-10, atol=1e-12)
        ref_ys.append(s.ys[:, 0])
        ref_loss = ref_loss + (s.ys[:, 0] * torch.linspace(-1, 1, 3, dtype=DT)).sum()
    torch.testing.assert_close(sol.ys.detach(), torch.stack(ref_ys, 1).detach(), rtol=1e-8, atol=1e-9)
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
        s = pn.solve(f, y0[b:b + 1], t[b], args=(w,), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sol.ys[:, b], s.ys[:, 0], rtol=1e-8, atol=1e-9)
    # rows that share their times give the ordinary batched solution
    same = torch.linspace(0, 1, 5, dtype=DT).expand(3, 5)
    torch.testing.assert_close(pn.solve(f, y0, same, args=(w,)).ys, pn.solve(f, y0, same[0], args=(w,)).ys)


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
    with pytest.raises(ValueError, match=r"row 1 of the per-sample times is not strictly monotonic"):
        pn.solve(f, y0, torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 1.0]], dtype=DT), args=(w,))
    with pytest.raises(ValueError, match=r"run in different directions"):
        pn.solve(f, y0, torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=DT), args=(w,))
    with pytest.raises(ValueError, match=r"gradients with respect to per-sample output times"):
        pn.solve(f, y0, torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=DT, requires_grad=True), args=(w,))
    with pytest.raises(ValueError, match=r"t: must be 1-D"):  # 2-D t whose rows do not match the batch
        pn.solve(f, y0, torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]], dtype=DT), args=(w,))
    with pytest.raises(ValueError, match=r"event: not supported together with per-sample"):
        pn.solve(f, y0, torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=DT), args=(w,), event=lambda t, y: y.sum())
