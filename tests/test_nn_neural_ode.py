"""NeuralODE layer and the time-dependent blocks: exact solutions, finite differences, NFE
counters."""

import pytest
import torch

import pyneuralode as pn


class Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, y):
        return y @ self.A.T


A0 = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=torch.float64)


def test_final_state_and_trajectory_match_matrix_exponential():
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    m = pn.NeuralODE(Linear(A0), t, rtol=1e-10, atol=1e-12, return_trajectory=True)
    traj = m(y0)
    assert traj.shape == (5, 2, 2)
    for i, ti in enumerate(t):
        ref = y0 @ torch.linalg.matrix_exp(A0 * ti).T
        assert torch.allclose(traj[i], ref, atol=1e-8)
    m.return_trajectory = False
    assert torch.allclose(m(y0), traj[-1], atol=1e-12)


@pytest.mark.parametrize(
    "sensealg",
    [None, "backsolve", "interpolating", "quadrature", pn.DirectAdjoint(checkpoints=3)],
    ids=["direct", "backsolve", "interpolating", "quadrature", "direct-ckpt"],
)
def test_gradient_matches_finite_differences(sensealg):
    torch.manual_seed(0)
    vf = pn.ConcatMLP(2, (8,), layer="concat", activation="tanh").double()
    m = pn.NeuralODE(vf, (0.0, 1.5), sensealg=sensealg, rtol=1e-10, atol=1e-10)
    y0 = torch.tensor([[0.3, -0.7], [1.1, 0.2]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)
    loss = (m(y0) * w).sum() + m(y0).pow(2).sum()
    params = [p for p in vf.parameters()]
    grads = torch.autograd.grad(loss, [y0, *params])
    eps = 1e-6

    def f():
        with torch.no_grad():
            out = m(y0)
            return float((out * w).sum() + out.pow(2).sum())

    # y0 and a few parameter entries
    for tensor, g in [(y0, grads[0]), (params[0], grads[1]), (params[-1], grads[-1])]:
        flat = tensor.data.view(-1)
        for i in range(min(3, flat.numel())):
            old = float(flat[i])
            flat[i] = old + eps
            fp = f()
            flat[i] = old - eps
            fm = f()
            flat[i] = old
            assert abs((fp - fm) / (2 * eps) - float(g.reshape(-1)[i])) < 1e-6 * max(
                1.0, abs(float(g.reshape(-1)[i]))
            )


def test_nfe_counters():
    torch.manual_seed(0)
    vf = pn.ConcatMLP(2, (8,)).double()
    y0 = torch.randn(4, 2, dtype=torch.float64)
    direct = pn.NeuralODE(vf, (0.0, 1.0), rtol=1e-6, atol=1e-8)
    out = direct(y0)
    assert direct.nfe_forward == direct.last_stats["nfe"] > 0
    assert direct.nfe_backward == 0
    out.sum().backward()
    # backprop goes through (almost) every evaluation that fed the result
    assert 0.5 * direct.nfe_forward <= direct.nfe_backward <= direct.nfe_forward
    adj = pn.NeuralODE(vf, (0.0, 1.0), sensealg=pn.InterpolatingAdjoint(), rtol=1e-6, atol=1e-8)
    adj(y0).sum().backward()
    assert adj.nfe_backward == adj.last_stats["nfe_adjoint"] > 0
    ckpt = pn.NeuralODE(
        vf, (0.0, 1.0), sensealg=pn.DirectAdjoint(checkpoints=3), rtol=1e-6, atol=1e-8
    )
    ckpt(y0).sum().backward()  # the replayed steps: about the forward's evaluations again
    assert ckpt.nfe_backward == ckpt.last_stats["nfe_recompute"] >= ckpt.nfe_forward - 2
    with torch.no_grad():
        direct(y0)
    assert direct.nfe_backward == 0


def test_fixed_step_rk4_and_time_override():
    m = pn.NeuralODE(Linear(A0), (0.0, 1.0), solver=pn.RK4(), adaptive=False, dt=0.01)
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert m.nfe_forward == 0
    ref = y0 @ torch.linalg.matrix_exp(A0 * 0.5).T
    assert torch.allclose(m(y0, torch.tensor([0.0, 0.5], dtype=torch.float64)), ref, atol=1e-9)
    assert 200 <= m.nfe_forward <= 201  # 50 RK4 steps (+ the initial f evaluation)


def test_bad_arguments():
    with pytest.raises(TypeError, match="vector_field"):
        pn.NeuralODE(3)
    with pytest.raises(ValueError, match="t:"):
        pn.NeuralODE(Linear(A0), (0.0,))
    with pytest.raises(ValueError, match="sensealg"):
        pn.NeuralODE(Linear(A0), sensealg="nope")
    with pytest.raises(ValueError, match="layer"):
        pn.ConcatMLP(2, layer="bogus")


def test_blocks_time_dependence_and_shapes():
    torch.manual_seed(0)
    for layer in ("concat", "concatsquash"):
        f = pn.ConcatMLP(3, (5, 5), layer=layer)
        y = torch.randn(4, 3)
        assert f(torch.tensor(0.0), y).shape == (4, 3)
        assert not torch.allclose(f(torch.tensor(0.0), y), f(torch.tensor(1.0), y))
    f = pn.ConcatMLP(3, 5, layer="ignore")
    assert torch.equal(f(0.0, torch.ones(2, 3)), f(1.0, torch.ones(2, 3)))
    conv = pn.ConvODEFunc(8, groups=4)
    x = torch.randn(2, 8, 6, 6)
    assert conv(torch.tensor(0.5), x).shape == x.shape
    m = pn.NeuralODE(conv, (0.0, 1.0), rtol=1e-3, atol=1e-3)
    assert m(x).shape == x.shape
    # ConcatConv2d really sees t: a 1x1 conv reading only the time channel
    cc = pn.ConcatConv2d(1, 1, ksize=1, padding=0)
    with torch.no_grad():
        cc.layer.weight.zero_()
        cc.layer.weight[0, 0] = 1.0
        cc.layer.bias.zero_()
    assert torch.allclose(
        cc(torch.tensor(0.25), torch.zeros(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 0.25)
    )


@pytest.mark.parametrize("y0_shape", [(4, 3), (5,)])
def test_wrong_state_width_names_y0(y0_shape):
    """A state the vector field cannot take gave torch's raw matmul error (issue 16)."""
    model = pn.NeuralODE(pn.ConcatMLP(2, (8,)))
    with pytest.raises(ValueError, match=r"^y0: the vector field cannot take a state shaped") as e:
        model(torch.zeros(*y0_shape))
    assert "shapes cannot be multiplied" in str(e.value)  # torch's own detail is kept
    assert model(torch.zeros(4, 2)).shape == (4, 2)


def test_other_errors_of_the_vector_field_pass_through():
    class Broken(torch.nn.Module):
        def forward(self, t, y):
            raise RuntimeError("a bug in f")

    with pytest.raises(RuntimeError, match="a bug in f"):
        pn.NeuralODE(Broken())(torch.zeros(2, 2))
