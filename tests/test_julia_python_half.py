"""The Python half of the Julia backend, driven through the native stand-in for Julia.

``NativeStandIn`` implements the session protocol of ``julia/PyNeuralODEBridge.jl`` with the
native engine and calls the same Python callbacks Julia would, so these tests check the
marshalling (row/column-major, dtype), the parameter flattening, the callbacks (against finite
differences), the option mapping, the autograd Functions (against ``pn.solve`` and finite
differences), the MLP translation and the DEQ steady state — everything except Julia itself.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import pyneuralode as pn
from pyneuralode._problem import ODEProblem
from pyneuralode.julia import _backend
from pyneuralode.julia._callbacks import ode_callbacks, steady_callbacks
from pyneuralode.julia._marshal import (
    ParamLayout,
    dtype_name,
    from_julia_matrix,
    from_julia_vector,
    to_julia_matrix,
    to_julia_vector,
)
from pyneuralode.julia._mlp import Autonomous, evaluate_spec, mlp_spec
from pyneuralode.julia._options import sensealg_kwargs, solve_kwargs, solver_name
from pyneuralode.julia._session import JuliaNotAvailableError, juliacall_installed, use_session
from pyneuralode.julia._standin import NativeStandIn

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=D))
        self.b = nn.Parameter(torch.tensor([0.1, -0.2], dtype=D))

    def forward(self, t, y, scale=None):
        out = torch.tanh(y @ self.A.T + self.b) + 0.1 * torch.sin(t)
        return out if scale is None else out * scale


def _weights(k):
    return torch.arange(1, k + 1, dtype=D).reshape(k, *([1] * 2))


def _loss(ys):
    return (
        (ys**2 * _weights(ys.shape[0])[..., : ys.shape[-1]]).sum()
        if ys.ndim == 3
        else (ys**2).sum()
    )


# -- no Julia here: import, error message, doctor
# ---------------------------------------------------------
def test_import_does_not_start_julia():
    code = (
        "import sys, pyneuralode as pn; pn.julia.is_available(); print('juliacall' in "
        "sys.modules, 'juliapkg' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]


def test_backend_julia_without_julia_says_how_to_install():
    if juliacall_installed():
        pytest.skip("juliacall is installed here; the missing-Julia message cannot be provoked")
    f = Field()
    with pytest.raises(JuliaNotAvailableError) as e:
        pn.solve(f, torch.ones(2, dtype=D), [0.0, 1.0], backend="julia")
    msg = str(e.value)
    assert 'pip install -e ".[julia]"' in msg and "pyneuralode.julia.install()" in msg
    assert isinstance(e.value, ImportError)


def test_doctor_reports_absence():
    r = subprocess.run(
        [sys.executable, "-m", "pyneuralode.julia", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "juliacall:" in r.stdout and "bridge module:" in r.stdout
    if not juliacall_installed():
        assert (
            "NOT installed" in r.stdout
            and "NOT available" in r.stdout
            and "pip install" in r.stdout
        )
    info = pn.julia.doctor(print_fn=lambda s: None)
    assert set(info) >= {"juliacall", "julia_version", "packages", "threads", "cuda"}


# -- marshalling
# ---------------------------------------------------------------------------------------------
def test_cotangent_matrix_is_n_by_k_column_major():
    g = torch.arange(24, dtype=D).reshape(4, 3, 2)  # k=4 times, state (3, 2)
    G = to_julia_matrix(g)
    assert G.shape == (6, 4) and G.flags.f_contiguous
    for j in range(4):
        np.testing.assert_array_equal(G[:, j], g[j].reshape(-1).numpy())


def test_trajectory_from_julia_layout():
    ys = torch.randn(5, 3, 2, dtype=D)
    jl = np.asfortranarray(ys.reshape(5, -1).numpy().T)  # what juliacall exposes for an n×k Array
    back = from_julia_matrix(jl, (3, 2), D, "cpu")
    assert torch.equal(back, ys)
    jl[0, 0] = 99.0  # torch owns a copy: Julia memory may be reused
    assert back[0, 0, 0] != 99.0
    with pytest.raises(RuntimeError, match="n×k"):
        from_julia_matrix(jl, (4,), D, "cpu")


def test_dtypes_cross_unchanged():
    x = torch.randn(3, 2, dtype=torch.float32)
    v = to_julia_vector(x)
    assert v.dtype == np.float32 and v.flags.c_contiguous and v.shape == (6,)
    y = from_julia_vector(v, (3, 2), torch.float32, "cpu")
    assert y.dtype == torch.float32 and torch.equal(y, x)
    assert dtype_name(torch.float64) == "float64"
    with pytest.raises(TypeError, match="float64 and float32"):
        dtype_name(torch.float16)


def test_param_layout_roundtrip_and_functional_call():
    f = Field()
    x = torch.tensor([2.0, 3.0], dtype=D, requires_grad=True)
    lay = ParamLayout(f, (x,), D, "cpu")
    assert [e[0] for e in lay.entries] == ["param", "param", "arg"] and lay.n == 8
    flat = lay.flatten()
    params, args = lay.unflatten(flat)
    assert torch.equal(params["A"], f.A) and torch.equal(args[0], x)
    t, y = torch.tensor(0.3, dtype=D), torch.tensor([0.5, -1.0], dtype=D)
    out = torch.func.functional_call(f, params, (t, y, *args))
    assert torch.allclose(out, f(t, y, x))
    empty = ParamLayout(lambda t, y: y, (), D, "cpu")
    assert empty.n == 0 and empty.julia_length == 1 and empty.flatten().shape == (1,)
    with pytest.raises(TypeError, match="dtype"):
        ParamLayout(Field().float(), (), D, "cpu")


# -- callbacks against finite differences
# ----------------------------------------------------------------------
def _fd(fun, x, eps=1e-6):
    cols = []
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = eps
        cols.append((fun(x + e) - fun(x - e)) / (2 * eps))
    return np.stack(cols, axis=1)  # ∂fun/∂x, rows = outputs


def test_callbacks_match_finite_differences():
    f = Field()
    x = torch.tensor([1.5, 0.5], dtype=D, requires_grad=True)
    y0 = torch.tensor([[0.3, -0.2], [1.0, 0.4]], dtype=D)
    prob = ODEProblem(f, y0, [0.0, 1.0], args=(x,))
    lay = ParamLayout(f, (x,), D, "cpu")
    cb = ode_callbacks(prob, lay)
    u = y0.reshape(-1).numpy().copy()
    p = lay.flatten().detach().numpy().copy()
    t = 0.7

    def fval(uu, pp):
        out = np.empty_like(uu)
        cb.f(out, uu, pp, t)
        return out

    ref = f(torch.tensor(t, dtype=D), y0, x).reshape(-1).detach().numpy()
    np.testing.assert_allclose(fval(u, p), ref, rtol=1e-14)
    Ju = _fd(lambda v: fval(v, p), u)
    Jp = _fd(lambda q: fval(u, q), p)
    lam = np.array([0.3, -1.2, 0.7, 2.0])
    du, dp = np.empty_like(u), np.empty_like(p)
    cb.vjp(du, dp, u, p, t, lam)
    np.testing.assert_allclose(du, Ju.T @ lam, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(dp, Jp.T @ lam, rtol=1e-7, atol=1e-9)
    J = np.asfortranarray(np.empty((4, 4)))  # Julia's column-major n×n matrix
    cb.jac(J, u, p, t)
    np.testing.assert_allclose(J, Ju, rtol=1e-7, atol=1e-9)
    assert (cb.nfe, cb.nvjp, cb.njac) == (1 + 2 * 4 + 2 * 8, 1, 1)


# -- option mapping
# -------------------------------------------------------------------------------------------------
def test_solver_mapping():
    assert solver_name(pn.Tsit5()) == "Tsit5"
    assert solver_name(pn.Dopri5()) == "DP5"
    for name in ("Rodas5P", "KenCarp4", "Kvaerno5", "Rosenbrock23", "TRBDF2"):
        cls = getattr(pn, name, None)
        if cls is not None:
            assert solver_name(cls()) == name
    assert solver_name("vern7") == "Vern7"

    class Custom:
        name = "MyRK"

    with pytest.raises(ValueError, match="no OrdinaryDiffEq counterpart"):
        solver_name(Custom())


def test_sensealg_mapping():
    assert sensealg_kwargs(pn.DirectAdjoint()) == {
        "sensealg": "InterpolatingAdjoint",
        "checkpointing": True,
    }
    assert sensealg_kwargs(pn.InterpolatingAdjoint(checkpointing=False))["checkpointing"] is False
    assert sensealg_kwargs(pn.BacksolveAdjoint())["sensealg"] == "BacksolveAdjoint"
    assert sensealg_kwargs(pn.QuadratureAdjoint())["sensealg"] == "GaussAdjoint"
    gk = sensealg_kwargs(pn.QuadratureAdjoint(quadrature="gauss-kronrod", rtol=1e-5))
    assert gk["sensealg"] == "QuadratureAdjoint" and gk["quad_reltol"] == 1e-5
    with pytest.raises(ValueError, match="solver"):
        sensealg_kwargs(pn.InterpolatingAdjoint(solver=pn.Tsit5()))
    with pytest.raises(ValueError, match="tolerances"):
        sensealg_kwargs(pn.BacksolveAdjoint(rtol=1e-4))

    class PhantomGradient:
        name = "PhantomGradient"

    with pytest.raises(ValueError, match="no SciMLSensitivity counterpart"):
        sensealg_kwargs(PhantomGradient())


def test_solve_kwargs_mapping():
    from pyneuralode._loop_options import make_options

    opts = make_options(
        pn.Tsit5(),
        rtol=1e-7,
        atol=torch.tensor([1e-9, 1e-8], dtype=D),
        dt=0.1,
        adaptive=True,
        max_steps=500,
        dense=False,
        progress=False,
        controller=None,
        dtmin=None,
        dtmax=0.5,
    )
    kw = solve_kwargs(opts)
    assert kw["reltol"] == 1e-7 and kw["maxiters"] == 500 and kw["dt"] == 0.1 and kw["dtmax"] == 0.5
    np.testing.assert_array_equal(kw["abstol"], [1e-9, 1e-8])
    assert "dtmin" not in kw
    opts.controller = pn.PIController(beta1=0.5)
    with pytest.raises(ValueError, match="controller"):
        solve_kwargs(opts)


# -- the autograd Function against pn.solve and finite differences
# ---------------------------------------------
def _grads(backend, f, y0, t, x=None, **kw):
    args = () if x is None else (x,)
    inputs = [y0, *f.parameters()] + ([] if x is None else [x])
    sol = pn.solve(f, y0, t, args=args, backend=backend, **TOL, **kw)
    return sol, torch.autograd.grad(_loss(sol.ys), inputs)


SENSEALGS = [None, pn.InterpolatingAdjoint(), pn.BacksolveAdjoint(), pn.QuadratureAdjoint()]


@pytest.mark.parametrize("sensealg", SENSEALGS, ids=lambda s: type(s).__name__)
def test_solve_gradients_match_native(sensealg):
    f = Field()
    x = torch.tensor([1.5, 0.5], dtype=D, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1.5, 4, dtype=D)
    ref, gref = _grads("torch", f, y0, t, x)
    fake = NativeStandIn()
    with use_session(fake):
        sol, g = _grads("julia", f, y0, t, x, sensealg=sensealg)
    assert sol.ys.shape == ref.ys.shape and sol.retcode == "Success"
    assert torch.allclose(sol.ys, ref.ys, atol=1e-9)
    for a, b in zip(g, gref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)
    assert (
        fake.calls["backward"] == 1
        and sol.stats["path"] == "callback"
        and sol.stats["nvjp_python"] > 0
    )
    expected = sensealg_kwargs(sensealg)["sensealg"]
    assert (
        fake.last_forward_kwargs["sensealg"] == expected
        and fake.last_forward_kwargs["ad"] == "finitediff"
    )


def test_stiff_solver_gets_torch_jacobian_and_matches_native():
    # mildly stiff: the stand-in backsolves (no stiff adjoint)
    k = torch.tensor(5.0, dtype=D, requires_grad=True)
    f = lambda t, y, k: torch.stack([-k * (y[0] - torch.cos(t)), y[0] - y[1]])
    y0 = torch.tensor([0.0, 1.0], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=D)
    fake = NativeStandIn()
    with use_session(fake):
        sol = pn.solve(
            f, y0, t, solver=pn.Rodas5P(), args=(k,), backend="julia", rtol=1e-8, atol=1e-10
        )
        g = torch.autograd.grad(sol.ys[-1].sum(), (y0, k))
    ref = pn.solve(f, y0, t, solver=pn.Rodas5P(), args=(k,), rtol=1e-8, atol=1e-10)
    gref = torch.autograd.grad(ref.ys[-1].sum(), (y0, k))
    assert torch.allclose(sol.ys, ref.ys, atol=1e-6)
    for a, b in zip(g, gref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert fake.last_forward_kwargs["solver"] == "Rodas5P" and sol.stats["njac_python"] > 0


def test_gradients_match_finite_differences():
    f = Field()
    y0 = torch.tensor([0.4, -0.7], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.2], dtype=D)
    with use_session(NativeStandIn()):
        sol = pn.solve(f, y0, t, backend="julia", **TOL)
        gy, gA = torch.autograd.grad(_loss(sol.ys), (y0, f.A))

    def L(y0v, Av):
        with torch.no_grad():
            f2 = Field()
            f2.A.copy_(Av)
            return _loss(pn.solve(f2, y0v, t, **TOL).ys).item()

    eps = 1e-6
    for i in range(2):
        e = torch.zeros(2, dtype=D)
        e[i] = eps
        fd = (L(y0.detach() + e, f.A.detach()) - L(y0.detach() - e, f.A.detach())) / (2 * eps)
        assert abs(gy[i].item() - fd) < 1e-6 * max(1, abs(fd))
    E = torch.zeros(2, 2, dtype=D)
    E[0, 1] = eps
    fd = (L(y0.detach(), f.A.detach() + E) - L(y0.detach(), f.A.detach() - E)) / (2 * eps)
    assert abs(gA[0, 1].item() - fd) < 1e-6 * max(1, abs(fd))


def test_tuple_state_and_time_gradient_match_native():
    f = lambda t, y: (y[1], -y[0] * torch.cos(t))
    y0 = (
        torch.tensor([1.0], dtype=D, requires_grad=True),
        torch.tensor([0.5], dtype=D, requires_grad=True),
    )
    t = torch.tensor([0.0, 0.8, 1.6], dtype=D, requires_grad=True)
    ref = pn.solve(f, y0, t, **TOL)
    gref = torch.autograd.grad((ref.ys[0] ** 2).sum() + ref.ys[1].sum(), (*y0, t))
    with use_session(NativeStandIn()):
        sol = pn.solve(f, y0, t, backend="julia", **TOL)
        g = torch.autograd.grad((sol.ys[0] ** 2).sum() + sol.ys[1].sum(), (*y0, t))
    assert isinstance(sol.ys, tuple) and sol.ys[0].shape == (3, 1)
    for a, b in zip(g, gref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_failure_retcode_and_partial_solution():
    f = lambda t, y: -y
    y0 = torch.ones(2, dtype=D)
    t = torch.linspace(0, 10, 6, dtype=D)
    with use_session(NativeStandIn()):
        with pytest.raises(pn.SolveError, match="MaxIters"):
            pn.solve(f, y0, t, backend="julia", max_steps=3)
        sol = pn.solve(f, y0, t, backend="julia", max_steps=3, throw=False)
    assert sol.retcode == "MaxIters" and sol.ys.shape[0] < 6 and sol.ts.shape[0] == sol.ys.shape[0]
    with pytest.raises(ValueError, match="dense output"):
        sol(0.5)


# -- the MLP translation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [(), (5,)])
def test_mlp_intermediate_form_matches_module(batch):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 7),
        nn.Tanh(),
        nn.Linear(7, 6),
        nn.Softplus(),
        nn.Linear(6, 5, bias=False),
        nn.LeakyReLU(0.2),
        nn.Linear(5, 4),
        nn.ELU(),
        nn.Linear(4, 4),
        nn.SiLU(),
        nn.Linear(4, 3),
        nn.Sigmoid(),
        nn.Linear(3, 3),
        nn.ReLU(),
    ).double()
    spec = mlp_spec(net)
    p = torch.cat([q.reshape(-1) for q in net.parameters()])
    y = 8 * torch.randn(
        *batch, 3, dtype=D
    )  # large inputs hit the Softplus threshold and both ReLU branches
    assert torch.allclose(evaluate_spec(spec, p, y), net(y), rtol=1e-12, atol=1e-12)


def test_mlp_translation_rejects_what_it_cannot_translate():
    assert mlp_spec(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))) is not None
    assert (
        mlp_spec(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))) is None
    )  # does not map the state to itself
    assert mlp_spec(nn.Sequential(nn.Linear(2, 2), nn.Softplus(beta=2.0))) is None
    assert mlp_spec(nn.Sequential(nn.Linear(2, 2), nn.GELU())) is None
    assert mlp_spec(nn.Linear(2, 2)) is None
    frozen = nn.Sequential(nn.Linear(2, 2))
    frozen[0].bias.requires_grad_(False)
    assert mlp_spec(frozen) is None


def test_native_path_matches_native_solve():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    f = Autonomous(net)
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=D)
    ref, gref = _grads("torch", f, y0, t)
    fake = NativeStandIn()
    with use_session(fake):
        sol, g = _grads("julia", f, y0, t)
    assert (
        sol.stats["path"] == "native"
        and fake.calls["mlp_rhs"] == 1
        and fake.calls["callback_rhs"] == 0
    )
    assert fake.last_forward_kwargs["ad"] == "forwarddiff"
    assert torch.allclose(sol.ys, ref.ys, atol=1e-9)
    for a, b in zip(g, gref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)
    with use_session(NativeStandIn()):  # arbitrary modules fall back to callbacks
        assert pn.solve(Field(), y0, t, backend="julia").stats["path"] == "callback"


# -- the DEQ steady state
# -------------------------------------------------------------------------------------------------
class DEQCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(
            torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.2, -0.3], [-0.2, 0.1, 0.25]], dtype=D)
        )

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


def test_steady_state_fixed_point_and_gradients():
    cell = DEQCell()
    x = torch.tensor([[0.5, -1.0, 0.3], [0.1, 0.2, -0.4]], dtype=D, requires_grad=True)
    z0 = torch.zeros(2, 3, dtype=D)
    fake = NativeStandIn()
    z = _backend.steady_state(cell, z0, (x,), None, None, 1e-11, 1e-11, session=fake)
    assert torch.allclose(cell(z, x), z, atol=1e-9)
    assert _backend.last_stats["retcode"] == "Success" and _backend.last_stats["residual"] < 1e-9
    gW, gx = torch.autograd.grad((z * torch.arange(6, dtype=D).reshape(2, 3)).sum(), (cell.W, x))

    def L(W, xv):  # the fixed point by plain iteration (a contraction here)
        zz = torch.zeros(2, 3, dtype=D)
        for _ in range(400):
            zz = torch.tanh(zz @ W.T + xv)
        return (zz * torch.arange(6, dtype=D).reshape(2, 3)).sum().item()

    eps = 1e-6
    E = torch.zeros(3, 3, dtype=D)
    E[1, 2] = eps
    fd = (L(cell.W.detach() + E, x.detach()) - L(cell.W.detach() - E, x.detach())) / (2 * eps)
    assert abs(gW[1, 2].item() - fd) < 1e-6
    Ex = torch.zeros(2, 3, dtype=D)
    Ex[1, 0] = eps
    fd = (L(cell.W.detach(), x.detach() + Ex) - L(cell.W.detach(), x.detach() - Ex)) / (2 * eps)
    assert abs(gx[1, 0].item() - fd) < 1e-6


def test_steady_state_callbacks_are_residual_form():
    cell = DEQCell()
    x = torch.ones(3, dtype=D)
    z0 = torch.full((3,), 0.2, dtype=D)
    lay = ParamLayout(cell, (x,), D, "cpu")
    cb = steady_callbacks(cell, z0, lay)
    out = np.empty(3)
    cb.f(out, z0.numpy().copy(), lay.flatten().detach().numpy().copy(), float("inf"))
    np.testing.assert_allclose(out, (cell(z0, x) - z0).detach().numpy(), rtol=1e-14)


def test_steady_state_option_errors():
    cell = DEQCell()

    class Anderson:
        name = "Anderson"

    with pytest.raises(ValueError, match="DynamicSS"):
        _backend.steady_state(
            cell,
            torch.zeros(3, dtype=D),
            (torch.ones(3, dtype=D),),
            Anderson(),
            None,
            1e-8,
            1e-6,
            session=NativeStandIn(),
        )

    class PhantomGradient:
        name = "PhantomGradient"

    with pytest.raises(ValueError, match="SteadyStateAdjoint"):
        _backend.steady_state(
            cell,
            torch.zeros(3, dtype=D),
            (torch.ones(3, dtype=D),),
            None,
            PhantomGradient(),
            1e-8,
            1e-6,
            session=NativeStandIn(),
        )
