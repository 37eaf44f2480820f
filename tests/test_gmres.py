"""The one batched GMRES (solvers/linear/gmres.py): against direct solves, per-sample tolerances,
breakdown and singular systems, gradients against finite differences, and its two users."""

import math

import pytest
import torch

import pyneuralode as pn
from pyneuralode.solvers.linear import gmres

F64 = torch.float64


def _systems(B, n, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=F64) + 0.4 * torch.randn(B, n, n, generator=g, dtype=F64) / math.sqrt(n)
    b = torch.randn(B, n, generator=g, dtype=F64)
    return A.to(dtype), b.to(dtype)


@pytest.mark.parametrize("restart", [40, 7], ids=["one-cycle", "restarted"])
def test_batched_gmres_matches_a_direct_solve(restart):
    """Five independent nonsymmetric 40×40 systems, one Krylov space each: every solution agrees
    with torch.linalg.solve to the tolerance (also when restarts are needed), and the reported
    residual is the largest true one to rounding."""
    A, b = _systems(5, 40)
    res = gmres(
        lambda v: torch.einsum("bij,bj->bi", A, v),
        b,
        rtol=1e-12,
        restart=restart,
        maxiter=400,
        batch=5,
    )
    exact = torch.linalg.solve(A, b)
    assert res.converged and res.x.shape == b.shape
    assert (res.x - exact).abs().max() <= 1e-9 * exact.abs().max()
    true_res = (b - torch.einsum("bij,bj->bi", A, res.x)).norm(dim=1)
    assert (true_res <= 1e-10 * b.norm(dim=1)).all()
    if restart == 7:
        assert res.iterations > 7  # it did restart
    else:
        assert res.iterations <= 40 * 5


def test_per_sample_tolerance_and_a_zero_right_hand_side():
    """A sample whose right-hand side is 0 gets x = 0 and does not stop the others; each sample
    meets max(atol, rtol·‖b_i‖) (here rtol decides for the large sample, atol for the small)."""
    A, b = _systems(3, 12, seed=1)
    b = b * torch.tensor([[1.0], [0.0], [1e-6]], dtype=F64)
    res = gmres(lambda v: torch.einsum("bij,bj->bi", A, v), b, rtol=1e-10, atol=1e-13, batch=3)
    assert res.converged
    assert torch.equal(res.x[1], torch.zeros(12, dtype=F64))
    r = (b - torch.einsum("bij,bj->bi", A, res.x)).norm(dim=1)
    assert r[0] <= 1e-10 * b[0].norm() * 10 and r[2] <= 1e-13 * 10
    assert torch.allclose(
        res.x[[0, 2]], torch.linalg.solve(A[[0, 2]], b[[0, 2]]), rtol=1e-8, atol=1e-15
    )


def test_breakdown_and_singular_systems():
    """An invariant Krylov space (b an eigenvector) is a lucky breakdown: solved in one iteration.
    A singular system with b outside its range is reported as not converged, never as solved."""
    D = torch.diag(torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=F64))
    e = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64)
    res = gmres(lambda v: D @ v, e, rtol=1e-12)
    assert (
        res.converged and res.iterations == 1 and torch.allclose(res.x, e / 3.0, rtol=0, atol=1e-15)
    )
    S = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=F64))
    res = gmres(lambda v: S @ v, torch.ones(3, dtype=F64), rtol=1e-10, maxiter=20)
    assert not res.converged and res.residual >= 0.99  # the component along e_3 cannot be matched
    assert torch.allclose(res.x[:2], torch.tensor([1.0, 0.5], dtype=F64))


def test_gmres_gradients_match_finite_differences():
    """x = A⁻¹ b through GMRES is differentiable in b and in the matrix behind matvec (what
    Rosenbrock + DirectAdjoint with linsolve='gmres' needs): gradcheck against central differences,
    with the solve converged far below the differences' error."""
    A0, b0 = _systems(2, 6, seed=2)

    def solve(A, b):
        return gmres(lambda v: torch.einsum("bij,bj->bi", A, v), b, rtol=1e-13, batch=2).x

    A = A0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(solve, (A, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float32_systems():
    """float32 systems (the least squares runs in float64) reach float32's tolerance."""
    A, b = _systems(4, 20, seed=3, dtype=torch.float32)
    res = gmres(lambda v: torch.einsum("bij,bj->bi", A, v), b, rtol=1e-5, batch=4)
    assert res.converged and res.x.dtype == torch.float32
    assert torch.allclose(
        res.x.double(), torch.linalg.solve(A.double(), b.double()), rtol=1e-4, atol=1e-5
    )


def test_float32_tiny_and_huge_right_hand_sides():
    """float32 right-hand sides of entries ~1e-25 (the float32 norm underflows to 0) and ~1e25
    (it overflows), batched with an ordinary one, as the DEQ adjoint met them (a NaN gradient in
    cdeq-mnist training, issue 18): every solution is finite and matches a float64 direct solve,
    and the residual is reported in the original units. Alone (batch=1) as well."""
    A, b = _systems(3, 16, seed=4, dtype=torch.float32)
    b = b * torch.tensor([[1.0], [1e-25], [1e25]])
    assert b[1].norm() == 0 and math.isinf(b[2].norm())  # what Arnoldi would normalise by
    exact = torch.linalg.solve(A.double(), b.double())
    res = gmres(lambda v: torch.einsum("bij,bj->bi", A, v), b, rtol=1e-5, batch=3)
    assert res.converged and bool(torch.isfinite(res.x).all())
    rel = (res.x.double() - exact).norm(dim=1) / exact.norm(dim=1)
    assert (rel <= 1e-4).all(), rel
    true_res = (b.double() - torch.einsum("bij,bj->bi", A.double(), res.x.double())).norm(dim=1)
    assert res.residual == pytest.approx(float(true_res.max()), rel=0.1)  # the 1e25 system's
    for i in (1, 2):
        one = gmres(lambda v, M=A[i]: M @ v, b[i], rtol=1e-5)
        assert one.converged and (one.x.double() - exact[i]).norm() <= 1e-4 * exact[i].norm()


def test_an_operator_that_overflows_is_not_converged():
    """A product that is not finite stops the solve, reported as not converged (no exception)."""
    A, b = _systems(2, 5, seed=5)
    res = gmres(lambda v: torch.einsum("bij,bj->bi", A, v) * math.inf, b, batch=2)
    assert not res.converged and not math.isfinite(res.residual)


def test_empty_systems():
    """Empty states (zero unknowns per system) are solved at once, batched or not."""
    for b, B in ((torch.zeros(2, 0), 2), (torch.zeros(0), 1)):
        res = gmres(lambda v: 2 * v, b, batch=B)
        assert res.converged and res.x.shape == b.shape and res.iterations == 0


def test_the_stiff_solvers_and_the_steady_state_adjoint_call_the_same_gmres(monkeypatch):
    """linsolve='gmres' of the implicit solvers and SteadyStateAdjoint('gmres') both go through
    solvers.linear.gmres.gmres (no second Krylov solver in the package)."""
    import importlib

    from pyneuralode.sensitivity import implicit
    from pyneuralode.solvers.linear import operators

    gmres_module = importlib.import_module("pyneuralode.solvers.linear.gmres")

    assert implicit.gmres is operators.gmres is gmres_module.gmres
    calls = []

    def spy(*a, **k):
        calls.append(k.get("batch", 1))
        return gmres_module.gmres(*a, **k)

    monkeypatch.setattr(implicit, "gmres", spy)
    monkeypatch.setattr(operators, "gmres", spy)
    M = torch.tensor([[-50.0, 1.0], [2.0, -3.0]], dtype=F64)
    with torch.no_grad():
        sol = pn.solve(
            lambda t, y: M @ y,
            torch.ones(2, dtype=F64),
            [0.0, 0.1],
            pn.Rodas5P(linsolve="gmres"),
            rtol=1e-6,
            atol=1e-9,
        )
    n_stiff = len(calls)
    assert n_stiff == sol.stats["nsolve"] > 0
    x = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    z = pn.steady_state(
        lambda z, x: 0.5 * torch.tanh(z) + x,
        torch.zeros(2, dtype=F64),
        (x,),
        pn.Anderson(),
        abstol=1e-12,
        reltol=0,
        sensealg=pn.SteadyStateAdjoint("gmres"),
    )
    z.sum().backward()
    assert len(calls) == n_stiff + 1 and x.grad is not None
