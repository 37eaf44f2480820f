"""End-to-end: the real Julia backend against the native engine (needs juliacall + Julia).

Marked ``julia``; every test skips with the reason where Julia cannot start. Nothing here has
been run on the development machines (no Julia there) — see the README's verification status.
"""

import pytest
import torch
from torch import nn

import pyneuralode as pn

pytestmark = pytest.mark.julia
D = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def session():
    from pyneuralode.julia._session import get_session, juliacall_installed

    if not juliacall_installed():
        pytest.skip('Julia not available: juliacall is not installed (pip install -e ".[julia]")')
    try:
        return get_session()
    except Exception as e:
        pytest.skip(f"Julia not available: {type(e).__name__}: {str(e).splitlines()[0]}")


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=D))

    def forward(self, t, y):
        return torch.tanh(y @ self.A.T) + 0.1 * torch.sin(t)


def _compare(f, y0, t, backend_kw, native_kw=None, rtol=1e-5):
    native_kw = native_kw or backend_kw
    inputs = [y0, *f.parameters()]
    ref = pn.solve(f, y0, t, **TOL, **native_kw)
    gref = torch.autograd.grad((ref.ys**2).sum(), inputs)
    sol = pn.solve(f, y0, t, backend="julia", **TOL, **backend_kw)
    g = torch.autograd.grad((sol.ys**2).sum(), inputs)
    assert sol.retcode == "Success"
    assert torch.allclose(sol.ys, ref.ys, rtol=1e-6, atol=1e-8)
    for a, b in zip(g, gref):
        assert torch.allclose(a, b, rtol=rtol, atol=1e-7)
    return sol


SOLVERS = ["Tsit5", "Dopri5", "Rodas5P", "KenCarp4", "Kvaerno5"]
SENSEALGS = [
    None,
    pn.InterpolatingAdjoint(),
    pn.BacksolveAdjoint(),
    pn.QuadratureAdjoint(),
    pn.QuadratureAdjoint(quadrature="gauss-kronrod"),
]


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_callback_path(session, solver):
    y0 = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1.5, 4, dtype=D)
    sol = _compare(Field(), y0, t, dict(solver=getattr(pn, solver)()))
    assert sol.stats["path"] == "callback" and sol.stats["nvjp_python"] > 0


@pytest.mark.parametrize("sensealg", SENSEALGS, ids=lambda s: repr(s))
def test_sensealgs_callback_path(session, sensealg):
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1.5, 4, dtype=D)
    _compare(Field(), y0, t, dict(sensealg=sensealg), dict())


@pytest.mark.parametrize("solver", ["Tsit5", "Rodas5P"])
def test_native_mlp_path(session, solver):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=D)
    sol = _compare(pn.julia.Autonomous(net), y0, t, dict(solver=getattr(pn, solver)()))
    assert sol.stats["path"] == "native"


def test_float32(session):
    f = Field().float()
    y0 = torch.tensor([1.0, 0.5], requires_grad=True)
    sol = pn.solve(f, y0, torch.linspace(0, 1, 3), backend="julia", rtol=1e-5, atol=1e-7)
    ref = pn.solve(f, y0, torch.linspace(0, 1, 3), rtol=1e-5, atol=1e-7)
    assert sol.ys.dtype == torch.float32 and torch.allclose(sol.ys, ref.ys, atol=1e-4)


def test_deq_steady_state(session):
    from pyneuralode.julia import _backend

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(0.3 * torch.eye(3, dtype=D) + 0.05)

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T + x)

    cell = Cell()
    x = torch.tensor([0.5, -1.0, 0.3], dtype=D, requires_grad=True)
    z = _backend.steady_state(cell, torch.zeros(3, dtype=D), (x,), None, None, 1e-10, 1e-10)
    assert torch.allclose(cell(z, x), z, atol=1e-8)
    gW, gx = torch.autograd.grad(z.sum(), (cell.W, x))
    J = torch.autograd.functional.jacobian(lambda zz: cell(zz, x), z.detach())
    lam = torch.linalg.solve((torch.eye(3, dtype=D) - J).T, torch.ones(3, dtype=D))
    _, vjp = torch.func.vjp(lambda xx: cell(z.detach(), xx), x.detach())
    assert torch.allclose(gx, vjp(lam)[0], rtol=1e-5, atol=1e-8)


@pytest.mark.cuda
def test_cuda_native_path(session):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double().cuda()
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=D, device="cuda", requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=D)
    sol = _compare(pn.julia.Autonomous(net), y0, t, dict())
    assert sol.ys.is_cuda and sol.stats["path"] == "native"


# -- issue 21: the behaviours behind bugs 4-8, on the real Julia side
# ---------------------------------------------------
@pytest.mark.parametrize(
    "sensealg", [None, pn.BacksolveAdjoint(), pn.QuadratureAdjoint()], ids=lambda s: repr(s)
)
def test_backward_in_time(session, sensealg):
    y0 = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    t = torch.tensor([1.5, 1.0, 0.2, 0.0], dtype=D)  # SciMLSensitivity sorts saveat (bug 4)
    _compare(Field(), y0, t, dict(sensealg=sensealg), dict())


@pytest.mark.parametrize("sensealg", [None, pn.QuadratureAdjoint()], ids=lambda s: repr(s))
def test_fixed_step_euler_gradients(session, sensealg):
    y0 = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=D)
    kw = dict(solver=pn.Euler(), adaptive=False, dt=1e-3)  # checkpoint re-solves need dt (bug 6)
    f = Field()
    ref = pn.solve(f, y0, t, **kw)
    gref = torch.autograd.grad(ref.ys.sum(), (y0, f.A))
    sol = pn.solve(f, y0, t, backend="julia", sensealg=sensealg, **kw)
    g = torch.autograd.grad(sol.ys.sum(), (y0, f.A))
    assert torch.allclose(sol.ys, ref.ys, atol=1e-10)
    for a, b in zip(g, gref):  # continuous adjoint vs discrete: O(dt)
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-3)


def test_tensor_tolerances(session):
    f = Field()
    y0 = torch.tensor([1.0, 0.5], dtype=D)
    atol = torch.tensor([1e-11, 1e-10], dtype=D)
    with torch.no_grad():
        sol = pn.solve(f, y0, [0.0, 1.0], backend="julia", rtol=1e-9, atol=atol)
        ref = pn.solve(f, y0, [0.0, 1.0], rtol=1e-9, atol=atol)
    assert torch.allclose(sol.ys, ref.ys, atol=1e-7)
    with pytest.raises(ValueError, match="atol"):  # bug 5
        pn.solve(f, y0.requires_grad_(), [0.0, 1.0], backend="julia", rtol=1e-9, atol=atol)


def test_failure_returns_partial_solution(session):
    f = lambda t, y: -y
    t = torch.linspace(0, 50, 11, dtype=D)
    sol = pn.solve(
        f,
        torch.ones(2, dtype=D),
        t,
        backend="julia",
        max_steps=20,
        rtol=1e-12,
        atol=1e-14,
        throw=False,
    )  # bug 7: no extrapolation past the failure
    k = sol.ys.shape[0]
    assert sol.retcode == "MaxIters" and 1 <= k < 11
    assert torch.allclose(sol.ys, torch.exp(-t[:k])[:, None].expand(k, 2), rtol=1e-6)


def test_native_mlp_is_built_once(session):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    y0 = torch.tensor([1.0, 0.5], dtype=D)
    pn.solve(pn.julia.Autonomous(net), y0, [0.0, 1.0], backend="julia")
    before = len(session._mlp)
    with torch.no_grad():
        net[0].weight.mul_(0.5)
    pn.solve(
        pn.julia.Autonomous(net), y0, [0.0, 1.0], backend="julia"
    )  # bug 8: no new function type
    assert len(session._mlp) == before
