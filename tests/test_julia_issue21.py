"""Issue 21: the Python half against the SciMLSensitivity behaviours behind the bridge's bugs 4-8.

``NativeStandIn`` reproduces what SciMLSensitivity does (sorted save times, tolerances reused by
the adjoint solve, checkpoint re-solves that see only the problem's ``dt``, partial solves) and
the bridge's answer to each, so these tests fail if the Python half or the mirrored fix breaks.
Also: the MLP cache of the real session, ``is_available`` finding a juliapkg-installed Julia,
the import-order warning and the CUDA-packages error, none of which start Julia.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pyneuralode as pn
from pyneuralode.julia import _session
from pyneuralode.julia._session import (
    JuliaImportOrderWarning,
    JuliaNotAvailableError,
    JuliaSession,
    check_import_order,
    use_session,
)
from pyneuralode.julia._standin import NativeStandIn, _columns

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=D))

    def forward(self, t, y):
        return torch.tanh(y @ self.A.T) + 0.1 * torch.sin(t)


def _run(backend, f, y0, t, **kw):
    sol = pn.solve(f, y0, t, backend=backend, **kw)
    loss = (sol.ys**2 * torch.arange(1, sol.ys.shape[0] + 1, dtype=D)[:, None]).sum()
    return sol, torch.autograd.grad(loss, (y0, f.A))


# -- bug 4: backward in time -----------------------------------------------------------------------
def test_columns_match_times_in_the_requested_order():
    ts = [2.0, 1.5, 0.5, 0.0]
    assert _columns(sorted(ts), ts, 4) == [3, 2, 1, 0]  # what the adjoints but Backsolve return
    assert _columns(ts, ts, 4) == [0, 1, 2, 3]  # BacksolveAdjoint: the solver's order
    assert _columns(sorted(ts), ts, 2) == [3, 2]  # a partial solve: the first k requested times


@pytest.mark.parametrize(
    "sensealg",
    [None, pn.BacksolveAdjoint(), pn.QuadratureAdjoint()],
    ids=lambda s: type(s).__name__,
)
def test_backward_in_time_matches_native(sensealg):
    f = Field()
    y0 = torch.tensor([0.4, -0.7], dtype=D, requires_grad=True)
    t = torch.tensor([1.5, 1.0, 0.2, 0.0], dtype=D)
    ref, gref = _run("torch", f, y0, t, **TOL)
    with use_session(NativeStandIn()):
        sol, g = _run("julia", f, y0, t, sensealg=sensealg, **TOL)
    assert torch.allclose(sol.ys, ref.ys, atol=1e-9)  # column j is the state at t[j]
    for a, b in zip(g, gref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


# -- bug 5: tensor tolerances ----------------------------------------------------------------------
def test_tensor_tolerance_with_gradients_is_refused_before_the_solve():
    f = Field()
    y0 = torch.tensor([0.4, -0.7], dtype=D, requires_grad=True)
    fake = NativeStandIn()
    with (
        use_session(fake),
        pytest.raises(ValueError, match=r"atol: a tensor tolerance cannot be used with gradients"),
    ):
        pn.solve(
            f, y0, [0.0, 1.0], backend="julia", rtol=1e-8, atol=torch.tensor([1e-10, 1e-9], dtype=D)
        )
    assert fake.calls["forward"] == 0


def test_tensor_tolerance_without_gradients_works():
    f = Field()
    y0 = torch.tensor([0.4, -0.7], dtype=D)
    atol = torch.tensor([1e-12, 1e-11], dtype=D)
    with torch.no_grad():
        ref = pn.solve(f, y0, [0.0, 0.5, 1.0], rtol=1e-10, atol=atol)
        fake = NativeStandIn()
        with use_session(fake):
            sol = pn.solve(f, y0, [0.0, 0.5, 1.0], backend="julia", rtol=1e-10, atol=atol)
    assert np.ndim(fake.last_forward_kwargs["abstol"]) == 1
    assert torch.allclose(sol.ys, ref.ys, atol=1e-9)


def test_standin_backward_refuses_array_tolerances_like_the_bridge():
    fake = NativeStandIn()
    cb = type(
        "CB", (), {"f": staticmethod(lambda out, u, p, t: out.__setitem__(slice(None), -u))}
    )()
    rhs = fake.callback_rhs(cb, "float64", jac=False)
    ys, rc, _, handle = fake.forward(
        rhs, np.ones(2), np.zeros(1), [0.0, 1.0], abstol=np.array([1e-9, 1e-9])
    )
    assert rc == "Success"
    with pytest.raises(ValueError, match="array abstol/reltol"):
        fake.backward(handle, np.ones((2, 2)))


# -- bug 6: fixed-step methods with the checkpointed adjoints --------------------------------------
@pytest.mark.parametrize(
    "sensealg",
    [None, pn.InterpolatingAdjoint(), pn.QuadratureAdjoint()],
    ids=lambda s: type(s).__name__,
)
def test_fixed_step_euler_gradients_with_checkpointed_adjoints(sensealg):
    f = Field()
    y0 = torch.tensor([0.4, -0.7], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    kw = dict(solver=pn.Euler(), adaptive=False, dt=5e-3)
    ref, gref = _run("torch", f, y0, t, **kw)
    fake = NativeStandIn()
    with use_session(fake):
        sol, g = _run("julia", f, y0, t, sensealg=sensealg, **kw)
    assert fake.last_forward_kwargs["dt"] == 5e-3 and fake.last_forward_kwargs["adaptive"] is False
    assert torch.allclose(sol.ys, ref.ys, atol=1e-12)
    for a, b in zip(g, gref):  # the stand-in's adjoint is continuous: O(dt) from the discrete one
        assert torch.allclose(a, b, rtol=3e-2, atol=3e-3)


def test_checkpoint_resolve_without_problem_dt_fails_like_ordinarydiffeq():
    fake = NativeStandIn()
    cb = type(
        "CB",
        (),
        {
            "f": staticmethod(lambda out, u, p, t: out.__setitem__(slice(None), -u)),
            "vjp": staticmethod(
                lambda du, dp, u, p, t, lam: (
                    du.__setitem__(slice(None), -lam),
                    dp.__setitem__(slice(None), 0.0),
                )
            ),
        },
    )()
    rhs = fake.callback_rhs(cb, "float64", jac=False)
    ys, rc, _, handle = fake.forward(
        rhs, np.ones(2), np.zeros(1), [0.0, 0.5], solver="Euler", dt=0.01, adaptive=False
    )
    du0, _ = fake.backward(handle, np.ones((2, 2)))
    assert np.allclose(du0, 1 + np.exp(-0.5), rtol=1e-3)
    handle["problem_kwargs"]["dt"] = None  # the old bridge: dt only as a solve keyword
    with pytest.raises(ValueError, match="Fixed timestep methods require a choice of dt"):
        fake.backward(handle, np.ones((2, 2)))


# -- bug 7: a failed solve -------------------------------------------------------------------------
def test_failed_backward_in_time_solve_returns_the_times_reached_in_order():
    f = lambda t, y: -y
    y0 = torch.ones(2, dtype=D, requires_grad=True)
    t = torch.linspace(10, 0, 6, dtype=D)
    with use_session(NativeStandIn()):
        sol = pn.solve(f, y0, t, backend="julia", max_steps=4, throw=False)
        (g,) = torch.autograd.grad(sol.ys.sum(), y0)
    k = sol.ys.shape[0]
    assert sol.retcode == "MaxIters" and 1 <= k < 6
    assert torch.equal(sol.ts, t[:k])
    exact = torch.exp(-(t[:k] - 10))[:, None] * torch.ones(2, dtype=D)
    assert torch.allclose(sol.ys, exact, rtol=1e-4)
    assert torch.allclose(g, exact[:, 0].sum() * torch.ones(2, dtype=D), rtol=1e-4)


# -- bug 8: the MLP is built once per generated code -----------------------------------------------
class _FakeBridge:
    def __init__(self):
        self.built = []

    def build_mlp(self, code):
        self.built.append(code)
        return object()


def test_session_caches_the_translated_mlp():
    from pyneuralode.julia._mlp import mlp_spec

    bridge = _FakeBridge()
    s = JuliaSession(None, bridge)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    a = s.mlp_rhs(mlp_spec(net))
    with torch.no_grad():
        net[0].weight.add_(1.0)  # new parameter values, same code
    b = s.mlp_rhs(mlp_spec(net))
    c = s.mlp_rhs(mlp_spec(nn.Sequential(nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 2)).double()))
    assert a is b and a is not c and len(bridge.built) == 2


# -- stiff callback path: Jacobian-free adjoint ----------------------------------------------------
def test_implicit_solver_with_gradients_uses_gmres():
    f = Field()
    y0 = torch.tensor([0.4, -0.7], dtype=D, requires_grad=True)
    fake = NativeStandIn()
    with use_session(fake):
        sol = pn.solve(
            f, y0, [0.0, 0.5], solver=pn.Rodas5P(), backend="julia", rtol=1e-8, atol=1e-10
        )
        assert fake.last_forward_kwargs["linsolve"] == "gmres"
        torch.autograd.grad(sol.ys.sum(), y0)
        with torch.no_grad():
            pn.solve(f, y0, [0.0, 0.5], solver=pn.Rodas5P(), backend="julia")
        assert fake.last_forward_kwargs["linsolve"] == "default"
        pn.solve(f, y0, [0.0, 0.5], solver=pn.Tsit5(), backend="julia")
        assert fake.last_forward_kwargs["linsolve"] == "default"


# -- starting Julia: availability, import order, CUDA packages -------------------------------------
def _no_julia(monkeypatch, tmp_path):
    monkeypatch.setattr(_session, "juliacall_installed", lambda: True)
    for var in ("PYTHON_JULIACALL_EXE", "PYTHON_JULIAPKG_EXE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("PYTHON_JULIAPKG_PROJECT", str(tmp_path / "env"))
    return tmp_path / "env" / "pyjuliapkg"


def test_is_available_finds_a_julia_juliapkg_installed(monkeypatch, tmp_path):
    prefix = _no_julia(monkeypatch, tmp_path)
    assert not _session.is_available()
    exe = prefix / "install" / "bin" / "julia"
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    assert _session.is_available() and _session.juliapkg_julia() == str(exe)


def test_is_available_reads_juliapkg_meta(monkeypatch, tmp_path):
    prefix = _no_julia(monkeypatch, tmp_path)
    exe = tmp_path / "julia-1.11" / "bin" / "julia"
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    prefix.mkdir(parents=True)
    (prefix / "meta.json").write_text(json.dumps({"meta_version": 5, "executable": str(exe)}))
    assert _session.is_available() and _session.juliapkg_julia() == str(exe)
    (prefix / "meta.json").write_text(json.dumps({"executable": str(tmp_path / "gone")}))
    assert not _session.is_available()


def test_import_order_warning(monkeypatch):
    monkeypatch.delenv("PYNEURALODE_JULIA_IMPORT_ORDER", raising=False)
    with pytest.warns(JuliaImportOrderWarning, match="import juliacall"):
        assert not check_import_order({"torch": object()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_import_order({"juliacall": object(), "torch": object()})
        assert check_import_order({})
        monkeypatch.setenv("PYNEURALODE_JULIA_IMPORT_ORDER", "ignore")
        assert not check_import_order({"torch": object()})


def test_missing_cuda_packages_say_how_to_install():
    def include(*a):
        raise RuntimeError("ArgumentError: Package CUDA not found in current path")

    jl = type("JL", (), {"seval": staticmethod(lambda code: include)})()
    with pytest.raises(JuliaNotAvailableError, match=r"install\(cuda=True\)"):
        JuliaSession(jl, None).cuda()
