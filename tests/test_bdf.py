"""QNDF: the variable-order (1–5) quasi-constant step NDF (ode15s / scipy BDF / OrdinaryDiffEq
QNDF).

References: exact solutions (fixed-step convergence orders of the order-capped method, dense
output, tolerance proportionality), the stored scipy Radau solutions at rtol 1e-12 of Robertson
and Van der Pol (``tests/data/stiff_references.json``), live scipy BDF step counts, central finite
differences (in test_stiff, with the other stiff solvers) and closed forms for gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _step_paths import counts_agree

# The stiff test problems, the stored references and the digit count are shared with test_stiff.
from test_stiff import (
    F64,
    LAM,
    REFS,
    _digits,
    prothero_robinson,
    robertson,
    robertson_np,
    robertson_rows,
    vdp,
    vdp_np,
)

import pyneuralode as pn
from pyneuralode.solvers.bdf import _rescale_matrix


def test_registered_and_options_checked():
    assert pn.QNDF is pn.solvers.lookup("qndf")
    assert pn.QNDF().implicit and pn.QNDF.start_order == 1
    for bad in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="max_order"):
            pn.QNDF(max_order=bad)
    with pytest.raises(ValueError):
        pn.QNDF(linsolve="cholesky")
    assert repr(pn.QNDF(max_order=3)) == "QNDF(max_order=3)"


def test_rescale_matrix_is_the_identity_for_equal_steps_and_exact_on_polynomials():
    for k in range(1, 6):
        assert np.allclose(_rescale_matrix(k, 1.0), np.eye(k + 1), atol=1e-13)
    # Backward differences of a cubic on a grid of spacing h, re-expressed for spacing h/2,
    # equal the differences computed directly on the finer grid.
    p = np.polynomial.Polynomial([0.3, -1.0, 0.5, 2.0])
    t, h, k = 1.0, 0.1, 3

    def diffs(step):
        vals = [p(t - j * step) for j in range(k + 1)]
        out = [vals]
        for _ in range(k):
            prev = out[-1]
            out.append([prev[j] - prev[j + 1] for j in range(len(prev) - 1)])
        return np.array([row[0] for row in out])

    D = diffs(h)
    assert np.allclose(_rescale_matrix(k, 0.5) @ D, diffs(h / 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_order", [1, 2])
def test_convergence_order_with_fixed_steps(max_order):
    """Order-capped QNDF on fixed steps: the fitted slope is the cap (orders 1 and 2 start
    cleanly)."""
    T = 1.0
    exact = math.sin(T) + math.exp(LAM * T)
    Ns = [32, 64, 128, 256]
    errs = []
    with torch.no_grad():
        for N in Ns:
            sol = pn.solve(
                prothero_robinson,
                torch.tensor([1.0], dtype=F64),
                [0.0, T],
                pn.QNDF(max_order=max_order),
                dt=T / N,
                adaptive=False,
            )
            errs.append(abs(sol.ys[-1, 0].item() - exact))
    slope = np.polyfit(np.log(T / np.array(Ns)), np.log(errs), 1)[0]
    assert max_order - 0.2 < slope < max_order + 0.4, (slope, errs)


@pytest.mark.parametrize(
    "max_order, tols",
    [
        (1, [1e-3, 1e-4, 1e-5, 1e-6]),
        (2, [1e-4, 1e-5, 1e-6, 1e-7, 1e-8]),
        (3, [1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]),
        (4, [1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]),
        (5, [1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]),
    ],
)
def test_order_from_work_precision(max_order, tols):
    """Orders 3–5 cannot be fitted on fixed steps (the start at order 1 dominates), so the order of
    each capped QNDF is fitted adaptively: global error ∝ steps^(−order) (measured 1.0, 2.0, 3.2,
    5.0, 5.3)."""
    T = 4.0
    exact = math.sin(T) + math.exp(LAM * T)
    errs, steps = [], []
    for tol in tols:
        with torch.no_grad():
            sol = pn.solve(
                prothero_robinson,
                torch.tensor([1.0], dtype=F64),
                [0.0, T],
                pn.QNDF(max_order=max_order),
                rtol=tol,
                atol=tol,
            )
        errs.append(abs(sol.ys[-1, 0].item() - exact))
        steps.append(sol.stats["naccept"])
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert max_order - 0.4 < slope < max_order + 1.2, (slope, steps, errs)


def test_error_follows_the_tolerance_and_the_order_rises():
    """The largest error over 41 output times falls in proportion to the tolerance, and tight
    tolerances use the higher orders (fewer steps than a fixed order 2 needs)."""
    t = torch.linspace(0.0, 2.0, 41, dtype=F64)
    exact = torch.sin(t) + torch.exp(LAM * t)
    tols = [1e-4, 1e-6, 1e-8, 1e-10]
    errs = []
    for tol in tols:
        with torch.no_grad():
            sol = pn.solve(
                prothero_robinson, torch.tensor([1.0], dtype=F64), t, pn.QNDF(), rtol=tol, atol=tol
            )
        errs.append((sol.ys[:, 0] - exact).abs().max().item())
        assert errs[-1] < 50 * tol, (tol, errs[-1])
    slope = np.polyfit(np.log(tols), np.log(errs), 1)[0]
    assert 0.7 < slope < 1.3, (slope, errs)
    with torch.no_grad():
        o2 = pn.solve(
            prothero_robinson,
            torch.tensor([1.0], dtype=F64),
            t,
            pn.QNDF(max_order=2),
            rtol=1e-10,
            atol=1e-10,
        )
    assert sol.stats["naccept"] * 2 < o2.stats["naccept"], (sol.stats, o2.stats)


def test_dense_output_against_the_exact_solution():
    tq = torch.linspace(0.0, 2.0, 81, dtype=F64)
    with torch.no_grad():
        sol = pn.solve(
            prothero_robinson,
            torch.tensor([1.0], dtype=F64),
            [0.0, 2.0],
            pn.QNDF(),
            rtol=1e-9,
            atol=1e-11,
            dense=True,
        )
        yq = sol(tq).reshape(-1)
    exact = torch.sin(tq) + torch.exp(LAM * tq)
    err = (yq - exact).abs().max().item()
    assert err < 2e-7, err
    assert err > 0


@pytest.fixture(scope="module")
def scipy_bdf_steps():
    from scipy.integrate import solve_ivp

    r = REFS["robertson"]
    s1 = solve_ivp(robertson_np, (0.0, r["t"][-1]), r["y0"], method="BDF", rtol=1e-7, atol=1e-11)
    assert s1.success
    return {"robertson": s1.t.size - 1}


def test_robertson_reuses_the_jacobian(scipy_bdf_steps):
    """t = 1e5 at rtol 1e-7: ≥ 5 digits at every output time; steps within 2× scipy BDF's; far
    fewer Jacobians than steps."""
    r = REFS["robertson"]
    k = torch.tensor(r["k"], dtype=F64)
    with torch.no_grad():
        sol = pn.solve(
            robertson,
            torch.tensor(r["y0"], dtype=F64),
            torch.tensor(r["t"], dtype=F64),
            pn.QNDF(),
            rtol=1e-7,
            atol=1e-11,
            args=(k,),
        )
    for i in range(1, len(r["t"])):
        assert _digits(sol.ys[i].numpy(), r["y"][i]) >= 5, (r["t"][i], sol.ys[i], r["y"][i])
    st = sol.stats
    steps = st["naccept"] + st["nreject"]
    assert steps <= 2 * scipy_bdf_steps["robertson"], (st, scipy_bdf_steps)
    assert st["njac"] * 5 < st["naccept"], st
    assert st["nfe"] < 4 * steps, st


def test_vanderpol_tracks_scipy_bdf():
    """The same algorithm as scipy's BDF: at rtol = atol = 1e-7 the final-time error is within 3× of
    scipy BDF's and the steps within 1.5×; against the stored reference ≥ 4 digits (the end point
    sits just after a sharp transition, where scipy BDF also keeps only ~4)."""
    from scipy.integrate import solve_ivp

    v = REFS["vanderpol"]
    ref = np.asarray(v["y"][-1])
    s = solve_ivp(vdp_np, (0.0, v["t"][-1]), v["y0"], method="BDF", rtol=1e-7, atol=1e-7)
    with torch.no_grad():
        sol = pn.solve(
            vdp,
            torch.tensor(v["y0"], dtype=F64),
            [0.0, v["t"][-1]],
            pn.QNDF(),
            rtol=1e-7,
            atol=1e-7,
        )
    err = np.max(np.abs(sol.ys[-1].numpy() - ref) / np.abs(ref))
    err_scipy = np.max(np.abs(s.y[:, -1] - ref) / np.abs(ref))
    assert err < 3 * err_scipy, (err, err_scipy)
    assert _digits(sol.ys[-1].numpy(), ref) >= 4
    st = sol.stats
    assert st["naccept"] <= 1.5 * (s.t.size - 1) and st["nfe"] <= 1.5 * s.nfev, (
        st,
        s.t.size - 1,
        s.nfev,
    )


def test_rejections_and_factorisations_track_scipy_bdf():
    """After an error-test rejection QNDF shrinks the step as scipy BDF does: the integral factor
    times the Newton-iteration safety (2m+1)/(2m+n). With SciML's PI gains and no Newton safety it
    took 285 rejections for 1267 accepted steps on Van der Pol (μ = 1000, rtol 1e-6) and 537 LU
    factorisations to scipy's 293; now about 100 and under 1.3× scipy's LUs."""
    from scipy.integrate import solve_ivp

    v = REFS["vanderpol"]
    s = solve_ivp(vdp_np, (0.0, v["t"][-1]), v["y0"], method="BDF", rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        sol = pn.solve(
            vdp,
            torch.tensor(v["y0"], dtype=F64),
            [0.0, v["t"][-1]],
            pn.QNDF(),
            rtol=1e-6,
            atol=1e-6,
        )
    st = sol.stats
    assert st["nreject"] <= 0.12 * st["naccept"], st
    assert st["nlu"] <= 1.3 * s.nlu and st["nfe"] <= 1.1 * s.nfev, (st, s.nlu, s.nfev)


def test_batched_equals_separate():
    K = torch.tensor([[0.04, 3e7, 1e4], [0.08, 1e7, 3e4]], dtype=F64)
    Y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]], dtype=F64)
    kw = dict(rtol=1e-8, atol=1e-12)
    with torch.no_grad():
        Kc, Yc = K[:1].expand(3, 3), Y0[:1].expand(3, 3)
        sb = pn.solve(
            robertson_rows, Yc, [0.0, 1.0, 100.0], pn.QNDF(batched=True), args=(Kc,), **kw
        )
        sep = pn.solve(robertson, Y0[0], [0.0, 1.0, 100.0], pn.QNDF(), args=(K[0],), **kw)
        assert sb.stats["naccept"] == sep.stats["naccept"]
        for b in range(3):
            assert torch.allclose(sb.ys[:, b], sep.ys, rtol=1e-10, atol=1e-15)
        sb = pn.solve(robertson_rows, Y0, [0.0, 100.0], pn.QNDF(batched=True), args=(K,), **kw)
        for b in range(2):
            sep = pn.solve(robertson, Y0[b], [0.0, 100.0], pn.QNDF(), args=(K[b],), **kw)
            assert torch.allclose(sb.ys[-1, b], sep.ys[-1], rtol=1e-6, atol=1e-12), (
                b,
                sb.ys[-1, b],
                sep.ys[-1],
            )


@pytest.mark.parametrize(
    "sensealg", ["direct", "backsolve", "interpolating", "interpolating-ckpt", "quadrature"]
)
def test_adjoints_with_qndf(sensealg):
    """Every route (QNDF forward, and backward for the continuous adjoints) against the closed-form
    gradient of a stiff linear system y' = A y, L = Σ_i w·y(t_i): dL/dy0 = Σ_i exp(Aᵀ t_i) w.

    With checkpoints inside the solve, the re-solve restarts QNDF at order 1 from a checkpoint, so
    it re-solves adaptively instead of replaying the forward's (higher-order) steps."""
    A = torch.tensor([[-100.0, 1.0], [0.5, -2.0]], dtype=F64)

    def f(t, y):
        return A @ y

    ts = [0.0, 0.5, 1.0, 1.5]
    w = torch.tensor([1.0, -2.0], dtype=F64)
    y0 = torch.tensor([1.0, 3.0], dtype=F64, requires_grad=True)
    S = {
        "direct": pn.DirectAdjoint(),
        "backsolve": pn.BacksolveAdjoint(solver=pn.QNDF()),
        "interpolating": pn.InterpolatingAdjoint(solver=pn.QNDF()),
        "interpolating-ckpt": pn.InterpolatingAdjoint(n_checkpoints=4),
        "quadrature": pn.QuadratureAdjoint(solver=pn.QNDF()),
    }[sensealg]
    sol = pn.solve(f, y0, ts, pn.QNDF(), rtol=1e-9, atol=1e-12, sensealg=S)
    (g,) = torch.autograd.grad((sol.ys[1:] * w).sum(), y0)
    exact = sum(torch.linalg.matrix_exp(A.T * t) @ w for t in ts[1:])
    assert torch.allclose(g, exact, rtol=1e-6, atol=1e-9), (g, exact)
    if sensealg == "interpolating-ckpt":
        assert sol.stats.get("nfe_recompute", 0) > 0


@pytest.mark.parametrize("sensealg", ["interpolating", "quadrature"])
def test_checkpoint_resolves_restart_qndf_adaptively(sensealg):
    """A nonlinear field (the adjoint reads the re-solved state): with checkpoints inside the solve,
    the gradient still equals DirectAdjoint's to 1e-6. Replaying the forward's steps from a
    checkpoint would restart QNDF at order 1 on steps taken at up to order 5 (~1e-4 off)."""

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
            ).double()

        def forward(self, t, y):
            return self.net(y) * torch.cos(t)

    f = Field()

    y0 = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    ts = torch.linspace(0, 1, 4, dtype=F64)
    S = (
        pn.InterpolatingAdjoint(n_checkpoints=5)
        if sensealg == "interpolating"
        else pn.QuadratureAdjoint(checkpointing=True, n_checkpoints=5)
    )
    grads = []
    for sa in (pn.DirectAdjoint(), S):
        y = y0.clone().requires_grad_()
        sol = pn.solve(f, y, ts, pn.QNDF(), rtol=1e-8, atol=1e-10, sensealg=sa)
        grads.append(torch.autograd.grad(sol.ys.square().sum(), [y, *f.parameters()]))
    for g_ref, g in zip(*grads):
        assert (g - g_ref).abs().max() <= 1e-6 * g_ref.abs().max(), (
            (g - g_ref).abs().max(),
            g_ref.abs().max(),
        )


def test_checkpointed_direct_adjoint_refuses_a_multistep_solver():
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="multistep.*DirectAdjoint\\(\\) or InterpolatingAdjoint"):
        pn.solve(
            lambda t, y: -y, y0, [0.0, 1.0], pn.QNDF(), sensealg=pn.DirectAdjoint(checkpoints=4)
        )


def test_newton_failure_is_a_clear_error_not_a_wrong_answer():
    """A right-hand side that turns NaN: the solve stops with a message instead of returning
    garbage."""

    def f(t, y):
        return torch.where(t > 0.5, torch.full_like(y, float("nan")), -y)

    with pytest.raises(pn.SolveError, match="t=0.5|NaN|step size"):
        pn.solve(f, torch.tensor([1.0], dtype=F64), [0.0, 1.0], pn.QNDF(), rtol=1e-6, atol=1e-9)


def test_large_system_benchmark_quick():
    """``benchmarks/stiff_large.py --quick`` (200-state Brusselator) runs, every solver is accurate,
    and QNDF forms far fewer Jacobians and factorisations than the one-step methods."""
    import importlib.util

    pytest.importorskip("scipy", reason="the benchmark's reference and peers are scipy's solve_ivp")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stiff_large.py"
    spec = importlib.util.spec_from_file_location("stiff_large", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--quick"])
    assert set(rows) >= {
        "pn.QNDF",
        "pn.QNDF (rtol ÷ 10)",
        "pn.Rodas5P",
        "pn.KenCarp4",
        "scipy BDF (jac_sparsity)",
    }
    for name, (sec, err, _st) in rows.items():
        assert math.isfinite(sec) and sec > 0
        assert err < 1e-4, (name, err)
    q, r = rows["pn.QNDF"][2], rows["pn.Rodas5P"][2]
    assert q["njac"] * 20 < q["naccept"] and q["nlu"] < r["nlu"], (q, r)
    assert rows["pn.QNDF (rtol ÷ 10)"][1] < rows["pn.QNDF"][1]
    md = (path.parent / "results" / "stiff_large_quick.md").read_text()
    assert md.count("| pn.") == 10 and "÷ QNDF" in md
    for name in (
        "QNDF",
        "KenCarp4",
        "Rodas5P",
    ):  # the sparse path: same steps, same answer as the dense one
        sparse, dense = rows[f"pn.{name}, linsolve='sparse'"], rows[f"pn.{name}"]
        assert sparse[2]["naccept"] == dense[2]["naccept"] and abs(sparse[1] - dense[1]) < 1e-8, (
            name
        )
    inf, ng = rows["pn.QNDF, linsolve='sparse', inference_mode"], rows["pn.QNDF, linsolve='sparse'"]
    assert inf[2] == ng[2] and inf[1] == ng[1]  # under inference mode: the same solve


def _brusselator(N):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stiff_large.py"
    spec = importlib.util.spec_from_file_location("stiff_large", path)
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    return b.torch_rhs(N), b.sparsity(N), torch.tensor(b.y0_of(N), dtype=F64)


@pytest.mark.parametrize("case", ["tiny", "tiny-f32", "batched", "dense-lu", "sparse"])
def test_host_and_torch_stage_arithmetic_agree(case, monkeypatch):
    """QNDF's one step on host (numpy) and torch arithmetic: on the CPU without autograd the table,
    predictor and Newton iterations run in numpy; with autograd on (and nothing requiring grad) on
    torch. Both take the same steps to the same states, for the tiny-system inverse, batched LU,
    dense LU and SuperLU; float32 stays float32 (and, rounding differently, may take a few steps
    more or less)."""
    from pyneuralode.solvers import _ops

    k = torch.tensor([0.04, 3e7, 1e4], dtype=F64)
    if case in ("tiny", "tiny-f32"):
        dt = torch.float32 if case == "tiny-f32" else F64
        f, y0, args, solver = (
            robertson,
            torch.tensor([1.0, 0.0, 0.0], dtype=dt),
            (k.to(dt),),
            pn.QNDF(),
        )
        t, kw = [0.0, 1.0, 40.0], dict(rtol=1e-4 if dt == torch.float32 else 1e-7, atol=1e-8)
    elif case == "batched":
        f, y0, args = (
            robertson_rows,
            torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]], dtype=F64),
            (k.expand(2, 3),),
        )
        solver, t, kw = pn.QNDF(batched=True), [0.0, 1.0, 40.0], dict(rtol=1e-7, atol=1e-10)
    else:
        f, P, y0 = _brusselator(20)
        args, t, kw = (), [0.0, 1.0, 5.0], dict(rtol=1e-7, atol=1e-9)
        solver = pn.QNDF() if case == "dense-lu" else pn.QNDF(linsolve="sparse", jac_sparsity=P)
    calls = []  # QNDF steps on the host arithmetic (each starts by taking the table as numpy)
    table = _ops.HostOps.table
    monkeypatch.setattr(_ops.HostOps, "table", staticmethod(lambda D: calls.append(1) or table(D)))
    with torch.no_grad():
        fast = pn.solve(f, y0, t, solver, args=args, **kw)
    assert calls  # the numpy step ran
    n_numpy = len(calls)
    with torch.enable_grad():
        ref = pn.solve(f, y0, t, solver, args=args, **kw)
    assert len(calls) == n_numpy  # and not under autograd
    assert fast.ys.dtype == y0.dtype and fast.retcode == "Success"
    if counts_agree(fast, ref):  # float32: checked to the solve's rtol
        return
    tol = 1e-10
    assert torch.allclose(fast.ys, ref.ys.detach(), rtol=tol, atol=tol * 1e-3), (
        (fast.ys - ref.ys).abs().max()
    )
    mid = 0.5 * (t[1] + t[2])
    assert torch.allclose(
        fast(torch.tensor(mid, dtype=y0.dtype)),
        ref(torch.tensor(mid, dtype=y0.dtype)).detach(),
        rtol=tol,
        atol=tol * 1e-3,
    )
