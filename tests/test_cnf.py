"""CNF: exact change of variables against a Gaussian pushed through a linear ODE, Hutchinson's
estimator against the exact trace, RNODE channels, gradients, and the planar-flow baseline."""

import math

import pytest
import torch

import pyneuralode as pn


class Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, z):
        return z @ self.A.T


A = torch.tensor([[-0.3, 1.0], [-0.5, 0.2]], dtype=torch.float64)
T = 0.7


def analytic_logp(x, A, T, std=1.0):
    # z(T) = expm(A T) x ; log p(x) = log N(z(T); 0, std^2 I) + T tr(A)
    z = x @ torch.linalg.matrix_exp(A * T).T
    return (
        -0.5 * (z / std).pow(2).sum(1)
        - 2 * math.log(std)
        - math.log(2 * math.pi)
        + T * torch.trace(A)
    )


@pytest.mark.parametrize("sensealg", [None, "interpolating"])
def test_exact_log_prob_matches_linear_flow(sensealg):
    cnf = pn.CNF(
        2, Linear(A), T=T, rtol=1e-10, atol=1e-10, sensealg=sensealg, base_std=1.3
    ).double()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cnf.log_prob(x), analytic_logp(x, A, T, 1.3), atol=1e-8)


def test_exact_log_prob_gradient_matches_analytic():
    for sensealg in (None, "interpolating"):
        cnf = pn.CNF(2, Linear(A), T=T, rtol=1e-10, atol=1e-10, sensealg=sensealg).double()
        x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        cnf.log_prob(x).sum().backward()
        Ar = A.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(analytic_logp(x, Ar, T).sum(), Ar)
        assert torch.allclose(cnf.vector_field.A.grad, g_ref, atol=1e-6), sensealg


def test_trainable_T_gradient():
    cnf = pn.CNF(2, Linear(A), T=T, rtol=1e-10, atol=1e-10, train_T=True).double()
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cnf.log_prob(x).sum().backward()
    Tr = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    (gT,) = torch.autograd.grad(analytic_logp(x, A, Tr).sum(), Tr)
    # d/d sqrt_T = dL/dT * 2 sqrt_T
    assert torch.allclose(cnf.sqrt_T.grad, gT * 2 * math.sqrt(T), atol=1e-6)


def test_hutchinson_noise_fixed_over_the_solve():
    # For a linear field the estimate is exactly T eps^T A eps, only if eps is held fixed.
    for noise in ("rademacher", "gaussian"):
        cnf = pn.CNF(
            2, Linear(A), T=T, trace="hutchinson", noise=noise, rtol=1e-10, atol=1e-10
        ).double()
        x = torch.randn(50, 2, dtype=torch.float64)
        lp = cnf.log_prob(x)
        e = cnf.dynamics.eps
        if noise == "rademacher":
            assert set(e.unique().tolist()) == {-1.0, 1.0}
        z = x @ torch.linalg.matrix_exp(A * T).T
        est = (
            -0.5 * z.pow(2).sum(1)
            - math.log(2 * math.pi)
            + T * torch.einsum("bi,ij,bj->b", e, A, e)
        )
        assert torch.allclose(lp, est, atol=1e-8)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_for_nonlinear_field(noise):
    torch.manual_seed(0)
    vf = pn.ConcatMLP(2, (16,), layer="concat", activation="tanh").double()
    exact = pn.CNF(2, vf, T=1.0, rtol=1e-8, atol=1e-8).double()
    hutch = pn.CNF(2, vf, T=1.0, rtol=1e-8, atol=1e-8, trace="hutchinson", noise=noise).double()
    x0 = torch.tensor([[0.4, -0.8]], dtype=torch.float64)
    n = 3000
    with torch.no_grad():
        ref = exact.log_prob(x0)
        est = hutch.log_prob(x0.repeat(n, 1))
    se = float(est.std()) / math.sqrt(n)
    assert float(est.std()) > 1e-3  # it is a noisy estimate...
    assert abs(float(est.mean() - ref)) < 4 * se  # ...that is unbiased (fixed seed)
    # the trace override evaluates the exact value with the Hutchinson model
    with torch.no_grad():
        assert torch.allclose(hutch.log_prob(x0, trace="exact"), ref, atol=1e-10)


def test_rnode_regularisers_linear_field():
    cnf = pn.CNF(2, Linear(A), T=T, rtol=1e-10, atol=1e-10, kinetic=0.1, jacobian=0.2).double()
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lp = cnf.log_prob(x)
    assert torch.allclose(
        lp, analytic_logp(x, A, T), atol=1e-8
    )  # the extra channels leave log p alone
    # kinetic: ∫ |A expm(A t) x|^2 dt by Gauss–Legendre; Jacobian: T ||A||_F^2
    nodes, weights = (
        torch.tensor(v, dtype=torch.float64)
        for v in __import__("numpy").polynomial.legendre.leggauss(40)
    )
    ts, ws = (nodes + 1) * T / 2, weights * T / 2
    kin = sum(
        w * (x @ (A @ torch.linalg.matrix_exp(A * t)).T).pow(2).sum(1) for t, w in zip(ts, ws)
    )
    assert torch.allclose(cnf.last_reg["kinetic"], kin.mean(), atol=1e-8)
    assert torch.allclose(cnf.last_reg["jacobian"], T * A.pow(2).sum(), atol=1e-8)
    loss = cnf.loss(x)
    expected = -lp.mean() + 0.1 * kin.mean() + 0.2 * T * A.pow(2).sum()
    assert torch.allclose(loss, expected, atol=1e-7)
    with torch.no_grad():
        cnf.log_prob(x)
    assert cnf.last_reg == {}  # channels only integrated when training


def test_sample_is_the_inverse_flow():
    cnf = pn.CNF(2, Linear(A), T=T, rtol=1e-9, atol=1e-9, base_std=0.5).double()
    g = torch.Generator().manual_seed(5)
    x = cnf.sample(2000, generator=g)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5
    assert torch.allclose(x, z @ torch.linalg.matrix_exp(-A * T).T, atol=1e-7)


def test_cnf_trains_a_bit():
    torch.manual_seed(0)
    cnf = pn.CNF(2, pn.ConcatMLP(2, (16, 16), layer="concatsquash"), rtol=1e-3, atol=1e-3)
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-2)
    x = pn.data.sample_toy2d("8gaussians", 256, seed=0)
    with torch.no_grad():
        before = float(-cnf.log_prob(x).mean())
    for _ in range(15):
        opt.zero_grad()
        cnf.loss(x).backward()
        opt.step()
    with torch.no_grad():
        after = float(-cnf.log_prob(x).mean())
    assert after < before - 0.3


def test_planar_flow_density_and_inverse():
    torch.manual_seed(0)
    pf = pn.PlanarFlow(2, 6).double()
    with torch.no_grad():
        pf.w.mul_(20)
        pf.u.mul_(20)  # strongly non-linear layers
        g = torch.linspace(-9, 9, 401, dtype=torch.float64)
        X, Y = torch.meshgrid(g, g, indexing="ij")
        p = pf.log_prob(torch.stack([X.reshape(-1), Y.reshape(-1)], 1)).exp()
        mass = float(p.sum() * (g[1] - g[0]) ** 2)
    assert abs(mass - 1.0) < 1e-2
    x = pf.sample(500, generator=torch.Generator().manual_seed(1))
    # pushing the samples back through the normalising direction recovers the base draws
    z = x
    for k in range(pf.K):
        u = pf._u_hat(k)
        z = z + torch.tanh(z @ pf.w[k] + pf.b[k]).unsqueeze(-1) * u
    z_ref = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(z.detach(), z_ref, atol=1e-8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="trace"):
        pn.CNF(2, trace="bogus")
    with pytest.raises(ValueError, match="noise"):
        pn.CNF(2, noise="uniform")
    with pytest.raises(ValueError, match="x:"):
        pn.CNF(2).log_prob(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="K"):
        pn.PlanarFlow(2, 0)


def test_bad_arguments_name_the_cnf_argument():
    """Issue 16: NaN penalty weights and base_std=inf were accepted; bad data was named y0/t."""
    nan, inf = float("nan"), float("inf")
    for kw, name in [
        ({"kinetic": nan}, "kinetic"),
        ({"jacobian": nan}, "jacobian"),
        ({"kinetic": -1.0}, "kinetic"),
        ({"base_std": inf}, "base_std"),
        ({"base_std": 0.0}, "base_std"),
        ({"T": inf}, "T"),
        ({"T": nan}, "T"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            pn.CNF(2, **kw)
    with pytest.raises(TypeError, match=r"^T:"):
        pn.CNF(2, T="1")
    cnf = pn.CNF(2, vector_field=Linear(A))
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^x: contains NaN"):
        cnf.log_prob(torch.full((3, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^x: dtype"):
        cnf.log_prob(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^x: expected a tensor"):
        cnf.log_prob([[0.0, 0.0]])
    with torch.no_grad():
        cnf.sqrt_T.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"^T: the \(learned\) integration time"):
        cnf.log_prob(x)
