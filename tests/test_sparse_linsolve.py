"""``linsolve="sparse"``: coloured sparse Jacobians and SuperLU for large stiff systems.

References: the dense autograd Jacobian, the dense-LU solve of the same problem (same steps, same
answer to rounding), central finite differences and closed forms for gradients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pyneuralode as pn
from pyneuralode.solvers.linear import (
    SparseJacobian,
    color_columns,
    dense_jacobian,
    sparsity_pattern,
)

sp = pytest.importorskip("scipy.sparse", reason="linsolve='sparse' factors with scipy's SuperLU")
F64 = torch.float64


def _benchmark():
    """``benchmarks/stiff_large.py``: its Brusselator is the problem these tests solve."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stiff_large.py"
    spec = importlib.util.spec_from_file_location("stiff_large", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def brusselator(N):
    """1-D Brusselator (Hairer & Wanner II, IV.1): 2N states [u; v]; (f, Jacobian pattern, y0)."""
    b = _benchmark()
    return b.torch_rhs(N), b.sparsity(N), torch.tensor(b.y0_of(N), dtype=F64)


def test_colouring_separates_columns_that_share_a_row():
    rng = np.random.default_rng(0)
    A = sp.random(60, 60, density=0.05, random_state=rng, format="csc") + sp.identity(60)
    P = sparsity_pattern(A, 60, "test")
    colors = color_columns(P)
    for c in np.unique(colors):
        cols = np.flatnonzero(colors == c)
        rows = np.concatenate([P.indices[P.indptr[j] : P.indptr[j + 1]] for j in cols])
        assert len(rows) == len(np.unique(rows)), c  # no row touched twice within a colour
    assert colors.max() + 1 < 60  # far fewer products than columns


@pytest.mark.parametrize("jac_mode", ["autograd", "finite_difference"])
def test_sparse_jacobian_equals_the_dense_one(jac_mode):
    N = 12
    f, P, y0 = brusselator(N)
    y = y0 + 0.1 * torch.sin(torch.arange(2 * N, dtype=F64))
    sj = SparseJacobian(sparsity_pattern(P, 2 * N, "test"), jac_mode)
    assert (
        sj.n_colors <= 6
    )  # greedy colouring of the [u; v] pattern; one product per state would be 24
    J, fy = sj(f, 0.0, y)
    Jd, _ = dense_jacobian(f, 0.0, y)
    tol = 1e-12 if jac_mode == "autograd" else 1e-6
    assert np.abs(J.toarray() - Jd.numpy()).max() <= tol * np.abs(Jd.numpy()).max()
    assert torch.allclose(fy, f(0.0, y))


@pytest.mark.parametrize("S", [pn.QNDF, pn.KenCarp4, pn.Rodas5P], ids=lambda S: S.__name__)
def test_sparse_solve_equals_the_dense_solve(S):
    N = 40
    f, P, y0 = brusselator(N)
    with torch.no_grad():
        dense = pn.solve(f, y0, [0.0, 1.0, 5.0], S(), rtol=1e-7, atol=1e-9)
        sparse = pn.solve(
            f, y0, [0.0, 1.0, 5.0], S(linsolve="sparse", jac_sparsity=P), rtol=1e-7, atol=1e-9
        )
    assert (
        sparse.stats["naccept"] == dense.stats["naccept"]
        and sparse.stats["njac"] == dense.stats["njac"]
    )
    assert torch.allclose(sparse.ys, dense.ys, rtol=1e-9, atol=1e-11), (
        (sparse.ys - dense.ys).abs().max()
    )


def test_user_jac_returning_a_sparse_matrix():
    N = 20
    f, P, y0 = brusselator(N)
    sj = SparseJacobian(sparsity_pattern(P, 2 * N, "test"), "autograd")

    def jac(t, y):  # scipy CSC, as a user would build it
        return sj(f, float(t), y)[0]

    with torch.no_grad():
        a = pn.solve(f, y0, [0.0, 2.0], pn.QNDF(linsolve="sparse", jac=jac), rtol=1e-7, atol=1e-9)
        b = pn.solve(
            f, y0, [0.0, 2.0], pn.QNDF(linsolve="sparse", jac_sparsity=P), rtol=1e-7, atol=1e-9
        )
    assert torch.allclose(a.ys, b.ys, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sensealg", ["direct", "interpolating"])
@pytest.mark.parametrize("S", [pn.QNDF, pn.KenCarp4], ids=lambda S: S.__name__)
def test_gradients_through_sparse_solves(S, sensealg):
    """The sparse solve's backward (a transpose solve) against central finite differences in y0."""
    N = 8
    f, P, y0 = brusselator(N)
    w = torch.linspace(-1.0, 1.0, 2 * N, dtype=F64)
    solver = S(linsolve="sparse", jac_sparsity=P)
    sa = (
        pn.DirectAdjoint()
        if sensealg == "direct"
        else pn.InterpolatingAdjoint(solver=S(linsolve="sparse", jac_sparsity=P))
    )
    kw = dict(rtol=1e-10, atol=1e-12)

    def loss(y):
        return (pn.solve(f, y, [0.0, 0.5], solver, sensealg=sa, **kw).ys[-1] * w).sum()

    y = y0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(y), y)
    h = 1e-6
    with torch.no_grad():
        fd = torch.stack(
            [(loss(y0 + h * e) - loss(y0 - h * e)) / (2 * h) for e in torch.eye(2 * N, dtype=F64)]
        )
    assert torch.allclose(g, fd, rtol=1e-5, atol=1e-7), (g - fd).abs().max()


def test_bad_sparse_options_raise():
    N = 5
    f, P, y0 = brusselator(N)
    with pytest.raises(ValueError, match="needs jac_sparsity"):
        pn.QNDF(linsolve="sparse")
    with pytest.raises(ValueError, match="jac_sparsity is used by linsolve='sparse'"):
        pn.Rodas5P(jac_sparsity=P)
    with pytest.raises(ValueError, match="batched=True"):
        pn.KenCarp4(linsolve="sparse", jac_sparsity=P, batched=True)
    with pytest.raises(ValueError, match=r"jac_sparsity has shape \(10, 10\).*\(4, 4\)"):
        pn.solve(
            lambda t, y: -y,
            torch.ones(4, dtype=F64),
            [0.0, 1.0],
            pn.QNDF(linsolve="sparse", jac_sparsity=P),
        )
    with pytest.raises(TypeError, match="jac_sparsity must be"):
        pn.solve(
            lambda t, y: -y,
            torch.ones(4, dtype=F64),
            [0.0, 1.0],
            pn.QNDF(linsolve="sparse", jac_sparsity="banded"),
        )
    assert pn.QNDF(linsolve="sparse", jac_sparsity=P) != pn.QNDF(
        linsolve="sparse", jac_sparsity=P.copy()
    )
    same = pn.QNDF(linsolve="sparse", jac_sparsity=P)
    assert same == same


def test_rosenbrock_gradient_through_a_sparse_jacobian_is_refused_not_approximated():
    """DirectAdjoint through a Rosenbrock step differentiates J; a sparse J cannot be, so the solve
    says so instead of returning the gradient of a different map. With differentiable_jac=False
    (J held fixed, the user's explicit choice) or a continuous adjoint it runs."""
    N = 6
    f, P, y0 = brusselator(N)
    y = y0.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="differentiable_jac=False"):
        pn.solve(f, y, [0.0, 0.1], pn.Rodas5P(linsolve="sparse", jac_sparsity=P))
    sol = pn.solve(
        f, y, [0.0, 0.1], pn.Rodas5P(linsolve="sparse", jac_sparsity=P, differentiable_jac=False)
    )
    assert torch.isfinite(torch.autograd.grad(sol.ys[-1].sum(), y)[0]).all()
    sol = pn.solve(
        f,
        y,
        [0.0, 0.1],
        pn.Rodas5P(linsolve="sparse", jac_sparsity=P),
        rtol=1e-9,
        atol=1e-11,
        sensealg=pn.InterpolatingAdjoint(),
    )
    g = torch.autograd.grad(sol.ys[-1].sum(), y)[0]
    ref = pn.solve(f, y, [0.0, 0.1], pn.Rodas5P(), rtol=1e-9, atol=1e-11)
    g_ref = torch.autograd.grad(ref.ys[-1].sum(), y)[0]
    assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-8), (g - g_ref).abs().max()


def test_w_on_the_jacobians_own_pattern_equals_the_sparse_sum():
    """``factor(J, g, diag)`` forms I − gJ by writing into J's data (the pattern holds the
    diagonal); its solves equal those of the generic identity-minus-matrix factorisation, and a
    pattern without a full diagonal is detected."""
    from pyneuralode.solvers.linear import diagonal_positions
    from pyneuralode.solvers.linear import sparse_factor as factor

    rng = np.random.default_rng(1)
    P = sparsity_pattern(sp.random(50, 50, density=0.08, random_state=rng), 50, "test")
    J = sp.csc_matrix((rng.standard_normal(P.nnz), P.indices, P.indptr), shape=P.shape)
    diag = diagonal_positions(J)
    assert diag is not None and np.array_equal(J.data[diag], J.diagonal())
    b = rng.standard_normal(50)
    x_fast, x_generic = factor(J, 0.3, diag).solve(b), factor(J, 0.3).solve(b)
    W = np.eye(50) - 0.3 * J.toarray()
    assert np.abs(W @ x_fast - b).max() < 1e-12 and np.abs(x_fast - x_generic).max() < 1e-12
    no_diag = sp.csc_matrix(np.triu(np.ones((4, 4)), 1))
    assert diagonal_positions(no_diag) is None


def test_colouring_of_a_band_is_optimal():
    """On a banded pattern of half-bandwidth w the greedy colouring is optimal: 2w + 1 colours."""
    n, w = 200, 3
    P = sparsity_pattern(
        sp.diags(
            [np.ones(n - abs(k)) for k in range(-w, w + 1)], list(range(-w, w + 1)), format="csc"
        ),
        n,
        "test",
    )
    assert color_columns(P).max() + 1 == 2 * w + 1
