"""Skip DEQ and Skip-Reg DEQ (pn.SkipDEQ, pn.SkipRegDEQ, pn.DEQ(init=g / "f", skip_weight=...))."""

import math

import pytest
import torch
from torch import nn

import pyneuralode as pn

D = torch.float64
N = 4
SOLVERS = [
    pn.DynamicSS(pn.Tsit5()),
    pn.Anderson(max_iters=200),
    pn.Broyden(max_iters=200),
    pn.FixedPointIteration(max_iters=2000),
]


class Block(nn.Module):
    """``f(z, x) = tanh(W z + U x)``, contractive (‖W‖ small)."""

    def __init__(self, n=N, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.5 * torch.randn(n, n, generator=g, dtype=D) / math.sqrt(n))
        self.U = nn.Parameter(torch.randn(n, n, generator=g, dtype=D) / math.sqrt(n))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T)


class Init(nn.Module):
    """Explicit predictor ``g(x) = V₂ tanh(V₁ x)`` of the fixed point."""

    def __init__(self, n=N, hidden=16, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.V1 = nn.Parameter(torch.randn(hidden, n, generator=g, dtype=D) / math.sqrt(n))
        self.V2 = nn.Parameter(
            0.3 * torch.randn(n, hidden, generator=g, dtype=D) / math.sqrt(hidden)
        )

    def forward(self, x):
        return torch.tanh(x @ self.V1.T) @ self.V2.T


def _x(batch=3, seed=5):
    return torch.randn(batch, N, dtype=D, generator=torch.Generator().manual_seed(seed))


def _tight(solver=None, sensealg=None):
    return {
        "solver": solver or pn.Broyden(max_iters=200),
        "sensealg": sensealg or pn.SteadyStateAdjoint(rtol=1e-12),
        "abstol": 1e-13,
        "reltol": 0,
    }


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_skip_fixed_point_and_gradient_equal_plain_deq(solver):
    # z* and the implicit gradient of a loss of z* do not depend on how z0 is predicted
    f, x = Block(), _x()
    head = torch.linspace(-1, 1, N, dtype=D)
    layers = [
        pn.DEQ(f, solver, abstol=1e-11, reltol=0),
        pn.SkipDEQ(f, Init(), solver, abstol=1e-11, reltol=0),
        pn.SkipRegDEQ(f, solver, abstol=1e-11, reltol=0),
    ]
    zs, grads = [], []
    for deq in layers:
        z = deq(x)
        assert deq.last_stats.converged and (f(z, x) - z).abs().max() < 1e-10
        zs.append(z.detach())
        grads.append(torch.autograd.grad((torch.sin(z) @ head).sum(), (f.W, f.U)))
    for z, g in zip(zs[1:], grads[1:]):
        assert torch.allclose(z, zs[0], atol=1e-9, rtol=0)
        for a, b in zip(g, grads[0]):
            assert torch.allclose(a, b, atol=1e-7, rtol=0)
    assert (
        layers[0].skip_loss.item() == 0.0
        and layers[1].skip_loss.item() > 0
        and layers[2].skip_loss.item() > 0
    )


def _fd(loss, p, h=1e-6):
    out = torch.zeros_like(p)
    with torch.no_grad():
        for i in range(p.numel()):
            p.view(-1)[i] += h
            lp = float(loss())
            p.view(-1)[i] -= 2 * h
            lm = float(loss())
            p.view(-1)[i] += h
            out.view(-1)[i] = (lp - lm) / (2 * h)
    return out


@pytest.mark.parametrize("kind", ["skip", "skipreg"])
def test_skip_loss_gradient_vs_finite_differences(kind):
    # d/dθ [L(z*(θ)) + λ mean|z0(θ) − sg(z*)|]: the implicit term by FD of L(z*(θ)), the skip
    # term by FD with z* frozen at its value (the stop-gradient the layer documents)
    f, g = Block(seed=2), Init(hidden=4, seed=3)
    lam = 0.7
    deq = (
        pn.SkipDEQ(f, g, skip_weight=lam, **_tight())
        if kind == "skip"
        else pn.SkipRegDEQ(f, skip_weight=lam, **_tight())
    )
    x = _x()
    head = torch.linspace(-1, 1, N, dtype=D)
    params = [g.V1, g.V2, f.W] if kind == "skip" else [f.W, f.U]
    z = deq(x)
    total = (torch.sin(z) @ head).sum() + deq.skip_loss
    grads = torch.autograd.grad(total, params)
    z_frozen = z.detach()
    z0 = (lambda: g(x)) if kind == "skip" else (lambda: f(torch.zeros_like(x), x))
    with torch.no_grad():  # the loss is λ · mean|z0 − z*|
        assert deq.skip_loss.item() == pytest.approx(
            lam * float((z0() - z_frozen).abs().mean()), rel=1e-12
        )
    for p, gp in zip(params, grads):
        fd_main = _fd(lambda: (torch.sin(deq(x)) @ head).sum(), p)
        fd_skip = _fd(lambda: lam * (z0() - z_frozen).abs().mean(), p)
        assert torch.allclose(gp, fd_main + fd_skip, atol=1e-7, rtol=1e-6), (
            p.shape,
            (gp - fd_main - fd_skip).abs().max(),
        )
        assert (
            fd_skip.abs().max() > 1e-3 or p is f.W
        )  # the skip term contributes (f.W does not enter z0)


@pytest.mark.parametrize(
    "sensealg", [pn.SteadyStateAdjoint(), pn.PhantomGradient(5)], ids=lambda s: s.name
)
@pytest.mark.parametrize("solver", SOLVERS[:3], ids=lambda s: type(s).__name__)
def test_skip_loss_reaches_g_and_f_on_every_route(solver, sensealg):
    x = _x()
    for kind in ("skip", "skipreg"):
        f, g = Block(seed=4), Init(seed=5)
        deq = (
            pn.SkipDEQ(f, g, solver, sensealg, abstol=1e-8, reltol=0)
            if kind == "skip"
            else pn.SkipRegDEQ(f, solver, sensealg, abstol=1e-8, reltol=0)
        )
        z = deq(x)
        assert deq.last_stats.converged and deq.skip_weight == 0.01
        (z.sum() + deq.skip_loss).backward()
        trained = [g.V1, g.V2, f.W, f.U] if kind == "skip" else [f.W, f.U]
        for p in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0
        if kind == "skip":  # g is a submodule: the optimiser sees its parameters
            assert {id(p) for p in g.parameters()} <= {id(p) for p in deq.parameters()}


def test_skip_initialisation_needs_fewer_evaluations_than_zeros():
    # train g alone on the skip loss for a fixed f; on unseen inputs, solves from g(x) are cheaper
    torch.manual_seed(0)
    f = Block(seed=6).requires_grad_(False)
    g = Init(hidden=32, seed=7)
    deq = pn.SkipDEQ(f, g, pn.Anderson(max_iters=200), skip_weight=1.0, abstol=1e-3, reltol=0)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(8)
    for _ in range(150):
        deq(torch.randn(64, N, dtype=D, generator=gen))
        opt.zero_grad()
        deq.skip_loss.backward()
        opt.step()
    x_test = torch.randn(64, N, dtype=D, generator=gen)
    plain = pn.DEQ(f, abstol=1e-3, reltol=0)
    for solver in (pn.DynamicSS(pn.Tsit5()), pn.Anderson(max_iters=200)):
        deq.solver = plain.solver = solver
        with torch.no_grad():
            z_plain = plain(x_test)
            nfe_zeros = plain.last_stats.nfe
            z_skip = deq(x_test)
            nfe_skip = deq.last_stats.nfe
        assert torch.allclose(z_plain, z_skip, atol=1e-2)  # the same point, to the solve tolerance
        assert nfe_skip < 0.75 * nfe_zeros, (type(solver).__name__, nfe_skip, nfe_zeros)
    assert deq.skip_loss.item() < 0.1 * float(z_skip.abs().mean())  # g predicts z* well


def test_a_perfect_skip_prediction_costs_one_evaluation():
    # g(x) = z* exactly: every solver stops after the residual check at z0 (DynamicSS used to
    # test f(z0) − 2 z0 there, and always took a Tsit5 step)
    f, x = Block(), _x()
    z_star = pn.DEQ(f, pn.Anderson(), abstol=1e-12, reltol=0)(x).detach()

    class Oracle(nn.Module):
        def forward(self, xx):
            return z_star.clone()

    for solver in SOLVERS:
        deq = pn.SkipDEQ(f, Oracle(), solver, abstol=1e-6, reltol=0)
        with torch.no_grad():
            deq(x)
        assert deq.last_stats.nfe == 1 and deq.last_stats.converged, type(solver).__name__


def test_skip_reg_trains_f_towards_cheaper_solves():
    # Skip-Reg: the regulariser pulls f(0, x) towards z*; on a regression task the f trained with
    # it needs fewer DynamicSS evaluations from f(0, x) than the same f trained without it
    x = _x(batch=64, seed=9)
    target = torch.sin(2 * x)

    def train(weight):
        torch.manual_seed(0)
        f = Block(seed=10)
        deq = pn.DEQ(
            f, pn.Anderson(max_iters=200), abstol=1e-8, reltol=0, init="f", skip_weight=weight
        )
        opt = torch.optim.Adam(f.parameters(), lr=2e-2)
        for _ in range(60):
            opt.zero_grad()
            loss = ((deq(x) - target) ** 2).mean() + deq.skip_loss
            loss.backward()
            opt.step()
        deq.solver, deq.abstol = pn.DynamicSS(pn.Tsit5()), 1e-4
        with torch.no_grad():
            z = deq(x)
            return deq.last_stats.nfe, float((f(torch.zeros_like(x), x) - z).abs().mean())

    nfe_plain, gap_plain = train(0.0)
    nfe_reg, gap_reg = train(5.0)
    assert gap_reg < 0.6 * gap_plain, (gap_reg, gap_plain)
    assert nfe_reg < 0.9 * nfe_plain, (nfe_reg, nfe_plain)


def test_skip_loss_without_graph_in_no_grad_and_default_init_f_unchanged():
    f, g, x = Block(), Init(), _x()
    deq = pn.SkipDEQ(f, g, pn.Anderson())
    with torch.no_grad():
        deq(x)
    assert deq.skip_loss.item() > 0 and not deq.skip_loss.requires_grad
    plain_f = pn.DEQ(
        f, pn.Anderson(), init="f"
    )  # no skip weight: z0 = f(0, x) carries no graph, no loss
    plain_f(x)
    assert plain_f.skip_loss.item() == 0.0 and plain_f.skip_weight == 0.0


def test_skip_validation():
    f = Block()
    with pytest.raises(TypeError, match="init"):
        pn.DEQ(f, init=lambda x: x)  # a plain function has no parameters to train: must be a Module
    with pytest.raises(ValueError, match="init"):
        pn.DEQ(f, init="skip")
    with pytest.raises(ValueError, match="skip_weight"):
        pn.DEQ(f, init="f", skip_weight=-1.0)
    with pytest.raises(ValueError, match="skip_weight.*init='f'"):
        pn.DEQ(f, skip_weight=0.01)  # zeros start: nothing to regularise
    with pytest.raises(TypeError, match="init_module"):
        pn.SkipDEQ(f, "f")
    with pytest.raises(TypeError, match="init"):
        pn.SkipRegDEQ(f, init="zeros")

    class Bad(nn.Module):
        def forward(self, x):
            return x[:1]

    with pytest.raises(ValueError, match="batch"):
        pn.SkipDEQ(f, Bad(), pn.Anderson())(_x())

    class NotTensor(nn.Module):
        def forward(self, x):
            return [x]

    with pytest.raises(TypeError, match="floating-point tensor"):
        pn.SkipDEQ(f, NotTensor(), pn.Anderson())(_x())


def test_skip_initial_state_reaches_the_julia_backend(monkeypatch):
    # backend="julia": z0 = g(x) (detached) is the u0 handed to the backend; the skip loss is formed
    # here from the returned z*. A stand-in backend (no Julia on the test machines) records u0.
    import pyneuralode.nn.deq as deq_mod

    seen = {}

    def fake_backend(f, z0, args, solver, sensealg, abstol, reltol):
        seen["z0"] = z0
        return pn.steady_state(f, z0, args, pn.Anderson(), abstol=1e-12, reltol=0), {"nfe": 0}

    monkeypatch.setattr(deq_mod, "_julia_steady_state", fake_backend)
    f, g, x = Block(), Init(), _x()
    deq = pn.SkipDEQ(f, g, backend="julia")
    z = deq(x)
    assert not seen["z0"].requires_grad and torch.equal(seen["z0"], g(x).detach())
    with torch.no_grad():
        assert deq.skip_loss.item() == pytest.approx(
            0.01 * float((g(x) - z).abs().mean()), rel=1e-12
        )
    deq.skip_loss.backward()
    assert g.V1.grad.abs().sum() > 0


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)
def test_skip_deq_cuda_matches_cpu():
    x = _x()
    outs = []
    for dev in ("cpu", "cuda"):
        f, g = Block().to(dev), Init().to(dev)
        deq = pn.SkipDEQ(f, g, pn.DynamicSS(pn.Tsit5()), abstol=1e-10, reltol=0)
        z = deq(x.to(dev))
        (z.sum() + deq.skip_loss).backward()
        outs.append((z.detach().cpu(), g.V1.grad.cpu()))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-8) and torch.allclose(
        outs[0][1], outs[1][1], atol=1e-8
    )
