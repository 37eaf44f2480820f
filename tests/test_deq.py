"""The DEQ layer (pn.DEQ) and the deq-2x / deq-mnist reproductions (--quick)."""

import argparse
import json
import math

import pytest
import torch
from torch import nn

import pyneuralode as pn

D = torch.float64


class Block(nn.Module):
    def __init__(self, n=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.5 * torch.randn(n, n, generator=g, dtype=D) / math.sqrt(n))
        self.U = nn.Parameter(torch.randn(n, n, generator=g, dtype=D) / math.sqrt(n))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T)


def _x():
    return torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "solver",
    [pn.DynamicSS(pn.Tsit5()), pn.Anderson(), pn.Broyden(), pn.FixedPointIteration()],
    ids=lambda s: type(s).__name__,
)
def test_deq_is_the_fixed_point_and_records_stats(solver):
    f = Block()
    deq = pn.DEQ(f, solver=solver, abstol=1e-11, reltol=0)
    x = _x()
    z = deq(x)
    assert (f(z, x) - z).abs().max() < 1e-10
    st = deq.last_stats
    assert (
        isinstance(st, pn.SteadyStateInfo)
        and st.converged
        and st.nfe > 0
        and st.solver == type(solver).__name__
    )
    assert pn.last_stats is st
    z2 = deq(x, z0=torch.randn(3, 4, dtype=D))  # z0-independent
    assert torch.allclose(z, z2, atol=1e-9)
    (z**2).sum().backward()
    assert st.nbackward == 1 and st.bwd_iterations > 0  # backward costs land in the forward's stats


def test_deq_gradient_vs_finite_differences():
    f = Block(seed=1)
    deq = pn.DEQ(
        f,
        solver=pn.Broyden(max_iters=100),
        sensealg=pn.SteadyStateAdjoint(rtol=1e-12),
        abstol=1e-13,
        reltol=0,
    )
    x = _x().requires_grad_()
    head = torch.linspace(-1, 1, 4, dtype=D)

    def loss(xx):
        return (torch.sin(deq(xx)) @ head).sum()

    gx, gW = torch.autograd.grad(loss(x), (x, f.W))
    h = 1e-6
    with torch.no_grad():
        for i in range(4):
            for j in range(4):
                f.W[i, j] += h
                lp = float(loss(x))
                f.W[i, j] -= 2 * h
                lm = float(loss(x))
                f.W[i, j] += h
                assert abs((lp - lm) / (2 * h) - float(gW[i, j])) < 1e-7
        e = torch.zeros_like(x)
        e[1, 2] = h
        fd = (float(loss(x + e)) - float(loss(x - e))) / (2 * h)
    assert abs(fd - float(gx[1, 2])) < 1e-7


def test_deq_training_reduces_loss_and_phantom_runs():
    torch.manual_seed(0)
    for sensealg in (pn.SteadyStateAdjoint(), pn.PhantomGradient(5)):
        f = Block(seed=2)
        deq = pn.DEQ(f, solver=pn.Anderson(), sensealg=sensealg, abstol=1e-8, reltol=0)
        x = _x()
        target = 0.3 * torch.ones(3, 4, dtype=D)
        opt = torch.optim.Adam(deq.parameters(), lr=0.05)
        losses = []
        for _ in range(40):
            opt.zero_grad()
            loss = ((deq(x) - target) ** 2).sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.1 * losses[0], (sensealg, losses[0], losses[-1])


def test_deq_jacobian_regularization_option():
    f = Block(seed=3)
    deq = pn.DEQ(f, solver=pn.Anderson(), abstol=1e-8, reltol=0, jac_reg_weight=2.0)
    x = _x()
    deq.train()
    deq(x)
    assert deq.jac_loss.item() > 0 and deq.jac_loss.requires_grad
    (gW,) = torch.autograd.grad(deq.jac_loss, f.W)
    assert gW.abs().sum() > 0
    deq.eval()
    with torch.no_grad():
        deq(x)
    assert deq.jac_loss.item() == 0.0


def test_deq_validation_and_julia_backend_message():
    with pytest.raises(ValueError, match="backend"):
        pn.DEQ(Block(), backend="jax")
    with pytest.raises(TypeError, match="solver"):
        pn.DEQ(Block(), solver=pn.Anderson)
    with pytest.raises(ValueError, match="init"):
        pn.DEQ(Block(), init="ones")
    deq = pn.DEQ(Block(), solver=pn.Anderson(), backend="julia")
    # No Julia on the test machines: the Julia backend must refuse with a message naming it.
    with pytest.raises(Exception, match="(?i)julia"):
        deq(_x())


def test_deq_failure_raises_or_reports():
    class Expanding(nn.Module):
        def forward(self, z, x):
            return 2.0 * z + x

    deq = pn.DEQ(Expanding(), solver=pn.FixedPointIteration(max_iters=12), abstol=1e-8, reltol=0)
    with pytest.raises(pn.SteadyStateError, match="MaxIters"):
        deq(_x())
    deq = pn.DEQ(
        Expanding(), solver=pn.FixedPointIteration(max_iters=12), abstol=1e-8, reltol=0, throw=False
    )
    deq(_x())
    assert not deq.last_stats.converged and deq.last_stats.retcode == pn.ReturnCode.MaxIters


def test_repro_deq_2x_quick(tmp_path):
    from pyneuralode.repro import deq_2x

    m = deq_2x.run(argparse.Namespace(quick=True, epochs=None, device="cpu", out=tmp_path, seed=0))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["deq_minus5"] == pytest.approx(m["deq_minus5"])
    assert (
        m["abs_error_minus5"] < 0.1 and m["target_met"]
    )  # the quick run (150 epochs) already extrapolates
    assert m["nfe_forward_mean"] > 0 and m["forward_failures"] == 0
    assert abs(m["effective_slope_a"] - 2 / 3) < 0.02  # z* = a x/(1-a) = 2x  <=>  a = 2/3
    assert (tmp_path / "deq_2x.png").is_file() and (tmp_path / "deq_2x_trajectories.png").is_file()


def test_repro_deq_mnist_quick(tmp_path):
    from pyneuralode.repro import deq_mnist

    m = deq_mnist.run(
        argparse.Namespace(quick=True, epochs=None, device="cpu", out=tmp_path, seed=0)
    )
    for v in deq_mnist.VARIANTS:
        assert m[f"{v}_fwd_nfe_per_batch"] > 0
        assert m[f"{v}_bwd_iters_per_batch"] > 0
        assert 0.0 <= m[f"{v}_test_accuracy"] <= 1.0
        assert m[f"{v}_saved_mb_per_batch"] > 0
    assert m["test_accuracy"] > 0.12  # above chance after a few batches
    assert m["phantom_bwd_iters_per_batch"] == 5  # k phantom steps per batch
    assert (
        m["phantom_saved_mb_per_batch"] > m["dynamicss_saved_mb_per_batch"]
    )  # unrolled steps keep more
    assert (tmp_path / "deq_mnist_pca.png").is_file() and (tmp_path / "table.md").is_file()


def test_repro_deq_mnist_blog_init_and_normalize():
    # The blog's Flux Dense default (Glorot-uniform weights, zero bias), z0 = f(0, x), and
    # --normalize
    import math

    import pyneuralode as pn
    from pyneuralode.repro import deq_mnist

    torch.manual_seed(0)
    m = deq_mnist.DEQNet(pn.Anderson(max_iters=100), pn.SteadyStateAdjoint(), 1e-8).double()
    assert m.deq.init == "f"
    for lin in (m.enc, m.deq.f.l1, m.deq.f.l2, m.dec):
        bound = math.sqrt(6 / (lin.in_features + lin.out_features))
        w, b = lin.weight.detach(), lin.bias.detach()
        assert float(b.abs().max()) == 0.0 and float(w.abs().max()) <= bound
        assert float(w.std()) > 0.5 * bound / math.sqrt(3)  # not PyTorch's (smaller) default
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    mn = deq_mnist.DEQNet(
        pn.Anderson(max_iters=100), pn.SteadyStateAdjoint(), 1e-8, normalize=True
    ).double()
    mn.load_state_dict(m.state_dict())
    with torch.no_grad():
        ref = m.features((x - deq_mnist.MNIST_MEAN) / deq_mnist.MNIST_STD)
        assert torch.allclose(mn.features(x), ref, atol=1e-6)
        assert not torch.allclose(m.features(x), ref, atol=1e-3)
    with pytest.raises(ValueError, match="--init"):
        deq_mnist.DEQNet(pn.Anderson(), pn.SteadyStateAdjoint(), 1e-1, init="xavier")


class _Square(nn.Module):
    """f(z, x) = w² z + x: z* = x / (1 − w²), dz*/dw = 2wx/(1−w²)², d²z*/dw² = 2x(1+3w²)/(1−w²)³."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5, dtype=D))

    def forward(self, z, x):
        return self.w**2 * z + x


def test_deq_second_derivative_raises_instead_of_a_wrong_value():
    """The implicit gradient is first-order only: differentiating it again returned 3.556 where the
    true d²z*/dw² is 8.296 (issue 16, item 4); now it raises, on both autograd paths."""
    block = _Square()
    deq = pn.DEQ(block, solver=pn.Broyden(), abstol=1e-12, reltol=0, batch_dim=None)
    x = torch.tensor([1.0], dtype=D)
    z = deq(x)
    (g,) = torch.autograd.grad(z.sum(), [block.w], create_graph=True)
    assert abs(g.item() - 2 * 0.5 / 0.75**2) < 1e-9  # the first derivative stays exact
    with pytest.raises(RuntimeError, match="twice through SteadyStateAdjoint.*PhantomGradient"):
        torch.autograd.grad(g, [block.w], retain_graph=True)
    with pytest.raises(RuntimeError, match="twice through SteadyStateAdjoint"):
        g.backward()


def test_phantom_gradient_second_derivative_matches_closed_form():
    """PhantomGradient's unrolled steps are an ordinary graph: with enough undamped steps its
    second derivative converges to the true d²z*/dw² (the alternative the error names)."""
    block = _Square()
    deq = pn.DEQ(
        block,
        solver=pn.Broyden(),
        sensealg=pn.PhantomGradient(k=80, damping=1.0),
        abstol=1e-12,
        reltol=0,
        batch_dim=None,
    )
    z = deq(torch.tensor([1.0], dtype=D))
    (g,) = torch.autograd.grad(z.sum(), [block.w], create_graph=True)
    (h,) = torch.autograd.grad(g, [block.w])
    assert abs(h.item() - 2 * (1 + 3 * 0.25) / 0.75**3) < 1e-8
