"""Dense output: accuracy between steps (error order of each interpolant), continuity at step
boundaries, lazily evaluated extra stages (Vern7, DP8), gradients through sol(tq)."""

import math

import numpy as np
import pytest
import torch

import pyneuralode as pn


def f(t, y):
    return y * torch.cos(t)


T0 = 0.3


def exact(t):
    return np.exp(np.sin(t) - math.sin(T0))


# Local error of the interpolant inside one step of size h: O(h^(q+1)), q the interpolant's
# order: cubic Hermite for methods without their own extension (limited by y1's accuracy for
# orders < 3), 4 for Dopri5/Tsit5, 7 for DP8; Vern7's satisfies every order-6 condition exactly
# and the order-7 ones to ~1e-4 (see Vern7's docstring).
LOCAL = {
    "Euler": (2, [0.2, 0.1, 0.05, 0.025]),
    "Heun": (3, [0.2, 0.1, 0.05, 0.025]),
    "RK4": (4, [0.2, 0.1, 0.05, 0.025]),
    "BS3": (4, [0.2, 0.1, 0.05, 0.025]),
    "Dopri5": (5, [0.4, 0.2, 0.1, 0.05]),
    "Tsit5": (5, [0.4, 0.2, 0.1, 0.05]),
    "Vern7": (7, [0.8, 0.6, 0.4, 0.3]),
    "DP8": (8, [0.8, 0.6, 0.4, 0.3]),
}


@pytest.mark.parametrize("name", list(LOCAL))
def test_interpolant_local_order(name):
    p, hs = LOCAL[name]
    cls = getattr(pn, name)
    theta = np.array([0.25, 0.5, 0.75])
    errs = []
    for h in hs:
        sol = pn.solve(
            f,
            torch.ones(1, dtype=torch.float64),
            torch.tensor([T0, T0 + h], dtype=torch.float64),
            cls(),
            dt=h,
            adaptive=False,
        )
        tq = T0 + theta * h
        errs.append(np.abs(sol(torch.tensor(tq))[:, 0].numpy() - exact(tq)).max())
    assert min(errs) > 1e-14
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert p - 0.5 < slope < p + 1.0, (
        f"{name}: interpolation error ∝ h^{slope:.2f}, expected h^{p} ({errs})"
    )


@pytest.mark.parametrize(
    "cls", [pn.BS3, pn.Dopri5, pn.Tsit5, pn.Vern7, pn.DP8], ids=lambda c: c.__name__
)
def test_dense_output_accuracy_between_steps(cls):
    t = torch.tensor([T0, 4.0], dtype=torch.float64)
    sol = pn.solve(f, torch.ones(1, dtype=torch.float64), t, cls(), rtol=1e-9, atol=1e-12)
    assert sol.stats["naccept"] >= 4
    tq = torch.linspace(T0, 4.0, 401, dtype=torch.float64)
    err = np.abs(sol(tq)[:, 0].numpy() - exact(tq.numpy())).max()
    # Between steps the interpolant stays within ~10 rtol·max|y| (max|y| ≈ 1.9) of the truth.
    assert err < 2e-8, err
    # ... and is far better than a linear interpolation of the same steps would be.
    ts = [s.t0 for s in sol._segments] + [4.0]
    ys = exact(np.array(ts))
    lin = np.interp(tq.numpy(), ts, ys)
    assert np.abs(lin - exact(tq.numpy())).max() > 100 * err


@pytest.mark.parametrize(
    "cls", [pn.RK4, pn.BS3, pn.Dopri5, pn.Tsit5, pn.Vern7, pn.DP8], ids=lambda c: c.__name__
)
def test_continuity_at_step_boundaries(cls):
    kw = dict(dt=0.37, adaptive=False) if cls is pn.RK4 else dict(rtol=1e-6, atol=1e-9)
    sol = pn.solve(
        f,
        torch.ones(2, dtype=torch.float64),
        torch.tensor([T0, 5.0], dtype=torch.float64),
        cls(),
        **kw,
    )
    segs = sol._segments
    assert len(segs) >= 3
    for left, right in zip(segs, segs[1:]):
        assert right.t0 == left.t0 + left.dt or abs(right.t0 - (left.t0 + left.dt)) < 1e-14
        a, b = left.evaluate(1.0), right.evaluate(0.0)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (a, b)
        tb = right.t0
        # sol(tq) on both sides of the boundary agrees to first order in the offset.
        ya, yb = sol(torch.tensor([tb - 1e-7, tb + 1e-7], dtype=torch.float64))
        assert torch.allclose(ya, yb, rtol=0, atol=1e-6)
    # Output times reached exactly by a step match the dense output there.
    assert torch.allclose(sol(sol.ts), sol.ys, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls,extra", [(pn.Vern7, 5), (pn.DP8, 3)], ids=["Vern7", "DP8"])
def test_extra_stages_are_lazy_and_counted(cls, extra):
    t = torch.tensor([0.0, 3.0], dtype=torch.float64)
    sol = pn.solve(f, torch.ones(1, dtype=torch.float64), t, cls(), rtol=1e-8)
    nfe = sol.stats["nfe"]
    nseg = len(sol._segments)
    assert nseg >= 3
    # Without interior output times no extra stage was evaluated ...
    ref = pn.solve(f, torch.ones(1, dtype=torch.float64), t, cls(), rtol=1e-8)
    assert ref.stats["nfe"] == nfe
    # ... the first query in a step costs the extra stages once, repeated queries nothing.
    mid = sol._segments[1].t0 + 0.5 * sol._segments[1].dt
    y1 = sol(torch.tensor([mid], dtype=torch.float64))
    assert sol.stats["nfe"] == nfe + extra
    y2 = sol(torch.tensor([mid, mid + 1e-3 * sol._segments[1].dt], dtype=torch.float64))
    assert sol.stats["nfe"] == nfe + extra
    assert torch.equal(y1[0], y2[0])
    assert abs(y1[0, 0].item() - math.exp(math.sin(mid))) < 1e-7
    # Interior output times: every step containing one pays its extra stages.
    sol2 = pn.solve(
        f,
        torch.ones(1, dtype=torch.float64),
        torch.linspace(0, 3, 50, dtype=torch.float64),
        cls(),
        rtol=1e-8,
    )
    assert sol2.stats["nfe"] > sol.stats["nfe"]
    assert torch.allclose(sol2.ys[:, 0], torch.exp(torch.sin(sol2.ts)), rtol=1e-7)


@pytest.mark.parametrize("cls", [pn.Tsit5, pn.Vern7, pn.DP8], ids=lambda c: c.__name__)
def test_gradient_through_dense_output(cls):
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    sol = pn.solve(
        lambda t, y, k: -k * y,
        torch.ones(1, dtype=torch.float64),
        torch.tensor([0.0, 2.0], dtype=torch.float64),
        cls(),
        args=(k,),
        rtol=1e-10,
        atol=1e-12,
    )
    tq = 1.3
    y = sol(torch.tensor([tq], dtype=torch.float64))[0, 0]
    (g,) = torch.autograd.grad(y, k)
    assert abs(y.item() - math.exp(-0.7 * tq)) < 1e-8
    assert abs(g.item() - (-tq * math.exp(-0.7 * tq))) < 1e-6


def test_dense_output_outside_span_raises():
    sol = pn.solve(
        f, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="outside"):
        sol(torch.tensor([1.5]))
