"""One contract per concept (issue 23): the sensitivity bases, the shared resolvers and tolerance
validator used by every entry point, per-call statistics, composition in ``solve`` and an import
graph without cycles."""

import ast
import dataclasses
import math
import pathlib
import threading

import pytest
import torch
from torch import nn

import pyneuralode as pn
from pyneuralode.nn.odenet import ODEBlock
from pyneuralode.sensitivity import _base, _passes
from pyneuralode.sensitivity._resolve import IMPLICIT_NAMES, SENSEALG_NAMES

D = torch.float64


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.7, dtype=D))

    def forward(self, t, y):
        return self.a * y


class Contraction(nn.Module):
    """z ↦ 0.5 z + w x: the fixed point is z* = 2 w x."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.8, dtype=D))

    def forward(self, z, x):
        return 0.5 * z + self.w * x


# ---------------------------------------------------------------------------------------------
# The sensitivity contracts


def test_sensitivity_bases_declare_their_contracts():
    with pytest.raises(TypeError, match="abstract"):
        pn.AbstractSensitivity()

    class NoBackward(_base.AbstractContinuousAdjoint):
        def _forward(self, problem, y0, solver, opts, stats):
            raise AssertionError

    with pytest.raises(TypeError, match="_backward"):
        NoBackward()
    for alg in (pn.BacksolveAdjoint(), pn.InterpolatingAdjoint(), pn.QuadratureAdjoint()):
        assert isinstance(alg, _base.AbstractContinuousAdjoint)
    assert isinstance(pn.DirectAdjoint(checkpoints=3), _base.AbstractAdjoint)
    for alg in (pn.SteadyStateAdjoint(), pn.PhantomGradient()):
        assert isinstance(alg, _base.AbstractImplicitGradient)
        assert not isinstance(alg, pn.AbstractSensitivity) and not hasattr(alg, "run")


@pytest.mark.parametrize(
    "make, saved_type",
    [
        (pn.BacksolveAdjoint, _passes.StepBounds),
        (pn.InterpolatingAdjoint, _passes.Checkpoints),
        (lambda: pn.InterpolatingAdjoint(checkpointing=False), _passes.DenseTrajectory),
        (pn.QuadratureAdjoint, _passes.DenseTrajectory),
        (lambda: pn.QuadratureAdjoint(checkpointing=True), _passes.Checkpoints),
        (lambda: pn.DirectAdjoint(checkpoints=4), _passes.ThinnedCheckpoints),
    ],
)
def test_saved_state_is_a_typed_record_and_the_gradient_exact(make, saved_type):
    """dy/dt = a y: y(T) = y0 e^{aT}, so dy(T)/dy0 = e^{aT} and dy(T)/da = T y0 e^{aT}."""
    a = torch.tensor(-0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.3], dtype=D, requires_grad=True)
    T = 2.0
    sol = pn.solve(
        lambda t, y, a: a * y, y0, [0.0, 1.0, T], args=(a,), sensealg=make(), rtol=1e-10, atol=1e-12
    )
    saved = sol.ys.grad_fn.pass_.saved
    assert type(saved) is saved_type and dataclasses.is_dataclass(saved)
    gy0, ga = torch.autograd.grad(sol.ys[-1].sum(), (y0, a))
    e = math.exp(-0.7 * T)
    assert abs(float(gy0) - e) < 1e-7 and abs(float(ga) - T * 1.3 * e) < 1e-7


# ---------------------------------------------------------------------------------------------
# One sensealg resolver, one solver resolver, one tolerance validator


def _ode_entry_points(sensealg=None, solver=None, rtol=1e-6):
    """Build (or run) each ODE entry point with the given options."""
    y0 = torch.ones(1, 1, dtype=D)
    return {
        "solve": lambda: pn.solve(Linear(), y0, [0.0, 1.0], solver, sensealg=sensealg, rtol=rtol),
        "NeuralODE": lambda: pn.NeuralODE(Linear(), solver=solver, sensealg=sensealg, rtol=rtol)(
            y0
        ),
        "ODEBlock": lambda: ODEBlock(_Counted(), solver=solver, sensealg=sensealg, rtol=rtol)(y0),
    }


class _Counted(Linear):
    nfe = 0


def _steady_entry_points(sensealg=None, rtol=1e-6):
    x = torch.ones(2, dtype=D)
    return {
        "steady_state": lambda: pn.steady_state(
            Contraction(), torch.zeros(2, dtype=D), (x,), sensealg=sensealg, rtol=rtol
        ),
        "DEQ": lambda: pn.DEQ(Contraction(), sensealg=sensealg, rtol=rtol)(x),
    }


@pytest.mark.parametrize("name", sorted(SENSEALG_NAMES))
def test_sensealg_names_are_accepted_the_same_everywhere(name):
    cls = SENSEALG_NAMES[name]
    assert type(pn.NeuralODE(Linear(), sensealg=name).sensealg) is cls
    assert type(ODEBlock(_Counted(), sensealg=name).sensealg) is cls
    assert type(pn.CNF(2, sensealg=name).sensealg) is cls
    grads = []
    for sensealg in (name, cls()):
        f = Linear()
        sol = pn.solve(
            f, torch.ones(1, dtype=D), [0.0, 1.0], sensealg=sensealg, rtol=1e-9, atol=1e-12
        )
        grads.append(torch.autograd.grad(sol.ys[-1].sum(), f.a)[0])
    assert torch.equal(grads[0], grads[1])
    assert abs(float(grads[0]) - math.exp(-0.7)) < 1e-7  # d/da e^{a} at a = -0.7


@pytest.mark.parametrize("name", sorted(IMPLICIT_NAMES))
def test_implicit_gradient_names(name):
    x = torch.ones(2, dtype=D)
    f = Contraction()
    z = pn.steady_state(f, torch.zeros(2, dtype=D), (x,), sensealg=name, atol=1e-12, rtol=0)
    assert type(pn.DEQ(f, sensealg=name).sensealg) is IMPLICIT_NAMES[name]
    (g,) = torch.autograd.grad(z.sum(), f.w)
    # implicit: z* = 2 w x (two entries); phantom: 5 steps z <- 0.75 z + 0.5 w x from z*
    exact = 4.0 if name == "implicit" else 2 * 0.5 * (1 - 0.75**5) / 0.25
    assert abs(float(g) - exact) < 1e-8


def test_bad_sensealg_gets_the_same_error_at_every_entry_point():
    for entry, points in (("ode", _ode_entry_points), ("steady", _steady_entry_points)):
        for run in points(sensealg="nope").values():
            with pytest.raises(ValueError, match=r"sensealg: unknown name 'nope'; use one of"):
                run()
        for run in points(
            sensealg=pn.InterpolatingAdjoint if entry == "ode" else pn.PhantomGradient
        ).values():
            with pytest.raises(TypeError, match=r"sensealg: got the class .*; pass an instance"):
                run()
        for run in points(sensealg=3).values():  # NeuralODE used to raise ValueError here
            with pytest.raises(TypeError, match=r"sensealg: expected an object such as"):
                run()
    for run in _ode_entry_points(sensealg=pn.SteadyStateAdjoint()).values():
        with pytest.raises(TypeError, match="differentiates steady states"):
            run()
    for run in _steady_entry_points(sensealg=pn.InterpolatingAdjoint()).values():
        with pytest.raises(TypeError, match="cannot differentiate a steady state"):
            run()


def test_solver_names_and_errors_are_resolved_the_same_everywhere():
    assert (
        type(pn.solve(lambda t, y: -y, torch.ones(1, dtype=D), [0.0, 1.0], "dopri5").solver)
        is pn.Dopri5
    )
    assert type(pn.NeuralODE(Linear(), solver="dopri5").solver) is pn.Dopri5
    assert type(ODEBlock(_Counted(), solver="dopri5").solver) is pn.Dopri5
    assert type(pn.DynamicSS("dopri5").ode_solver) is pn.Dopri5
    assert type(pn.InterpolatingAdjoint(solver="dopri5").solver) is pn.Dopri5
    makers = {
        "solve": lambda s: pn.solve(lambda t, y: -y, torch.ones(1, dtype=D), [0.0, 1.0], s),
        "NeuralODE": lambda s: pn.NeuralODE(Linear(), solver=s),
        "ODEBlock": lambda s: ODEBlock(_Counted(), solver=s),
        "DynamicSS": lambda s: pn.DynamicSS(s),
        "InterpolatingAdjoint": lambda s: pn.InterpolatingAdjoint(solver=s),
    }
    for make in makers.values():
        with pytest.raises(TypeError, match=r"got the class Dopri5; pass an instance"):
            make(pn.Dopri5)
        with pytest.raises(TypeError, match=r"expected a solver such as pn.Tsit5\(\)"):
            make(3)
        with pytest.raises(ValueError, match="unknown name 'rk99'"):
            make("rk99")


@pytest.mark.parametrize(
    "bad, exc",
    [(-1e-3, ValueError), (math.nan, ValueError), ("1e-6", TypeError), (True, TypeError)],
)
def test_one_tolerance_validator(bad, exc):
    """The same argument gets the same error everywhere; a string or a bool (which float() would
    accept silently) is refused."""
    runs = {
        **_ode_entry_points(rtol=bad),
        **_steady_entry_points(rtol=bad),
        "InterpolatingAdjoint": lambda: pn.InterpolatingAdjoint(rtol=bad),
        "SteadyStateAdjoint": lambda: pn.SteadyStateAdjoint(rtol=bad),
    }
    for run in runs.values():
        with pytest.raises(exc, match=r"rtol"):
            run()


def test_steady_state_and_deq_take_reltol_abstol_as_aliases():
    x = torch.ones(2, dtype=D)
    f = Contraction()
    z1, i1 = pn.steady_state(
        f, torch.zeros(2, dtype=D), (x,), rtol=1e-3, atol=1e-9, return_info=True
    )
    z2, i2 = pn.steady_state(
        f, torch.zeros(2, dtype=D), (x,), reltol=1e-3, abstol=1e-9, return_info=True
    )
    assert torch.equal(z1, z2) and (i1.rtol, i1.atol) == (i2.reltol, i2.abstol) == (1e-3, 1e-9)
    with pytest.raises(ValueError, match="atol, abstol: the same tolerance under two names"):
        pn.steady_state(f, torch.zeros(2, dtype=D), (x,), atol=1e-9, abstol=1e-9)
    deq = pn.DEQ(f, abstol=1e-3, reltol=0)
    assert (deq.atol, deq.rtol) == (1e-3, 0.0)
    deq.abstol = 1e-4
    assert deq.atol == 1e-4 and "atol=0.0001" in repr(deq)
    assert (pn.DEQ(f).rtol, pn.DEQ(f).atol) == (1e-6, 1e-6)
    with pytest.raises(ValueError, match="rtol, reltol"):
        pn.DEQ(f, rtol=1e-3, reltol=1e-3)


# ---------------------------------------------------------------------------------------------
# Statistics per call


def test_two_threads_solving_at_once_see_their_own_stats():
    def run(rate, out, barrier=None):
        if barrier is not None:
            barrier.wait()
        sol = pn.solve(
            lambda t, y: rate * y, torch.ones(3, dtype=D), [0.0, 1.0], rtol=1e-8, atol=1e-10
        )
        out.append(dict(sol.stats))

    serial = {}
    for rate in (-0.5, -20.0):
        serial[rate] = []
        run(rate, serial[rate])
    assert serial[-0.5][0] != serial[-20.0][0]
    seen = {-0.5: [], -20.0: []}
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=run, args=(rate, seen[rate], barrier)) for rate in seen]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == serial


def test_julia_backend_stats_are_per_thread_and_per_call():
    from pyneuralode.julia import _backend
    from pyneuralode.julia._standin import NativeStandIn

    x = torch.ones(2, dtype=D)
    barrier = threading.Barrier(2)
    seen = {}

    def work(name, atol):
        z, stats = _backend.steady_state(
            Contraction(),
            torch.zeros(2, dtype=D),
            (x,),
            None,
            None,
            atol,
            0.0,
            session=NativeStandIn(),
            return_info=True,
        )
        barrier.wait()  # both calls are done before either thread reads last_stats
        seen[name] = _backend.last_stats is stats and stats["retcode"] == "Success"

    threads = [threading.Thread(target=work, args=(n, a)) for n, a in (("a", 1e-6), ("b", 1e-10))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == {"a": True, "b": True}


# ---------------------------------------------------------------------------------------------
# Composition in solve


def test_event_with_a_continuous_adjoint_counts_into_the_returned_stats():
    """The event search is counted, and the backward pass adds its counts to the stats the user
    holds (the solution used to carry a copy that the backward pass never reached)."""
    k = torch.tensor(0.9, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=D)
    kw = dict(event=lambda t, y: y[0] - 0.5, rtol=1e-10, atol=1e-12, args=(k,))
    sol = pn.solve(lambda t, y, k: -k * y, y0, [0.0, 5.0], sensealg=pn.InterpolatingAdjoint(), **kw)
    assert sol.retcode == "Terminated" and sol.stats["nfe_event_search"] > 0
    (g,) = torch.autograd.grad(sol.event_t, k)
    assert sol.stats["nfe_adjoint"] > 0
    # t* = ln 2 / k: dt*/dk = -ln 2 / k²
    assert abs(float(sol.event_t.detach()) - math.log(2) / 0.9) < 1e-9
    assert abs(float(g) + math.log(2) / 0.81) < 1e-7


@pytest.mark.parametrize(
    "sensealg", [pn.BacksolveAdjoint, pn.QuadratureAdjoint, lambda: pn.DirectAdjoint(checkpoints=3)]
)
def test_events_compose_with_every_sensealg(sensealg):
    """An event works with every ODE sensealg (checkpointed DirectAdjoint used to be refused): the
    gradients of the event time and of the saved states equal DirectAdjoint()'s."""
    f = lambda t, y, k: -k * y
    kw = dict(event=lambda t, y: y[0] - 0.5, rtol=1e-10, atol=1e-12)
    grads = []
    for sens in (pn.DirectAdjoint(), sensealg()):
        k = torch.tensor(0.9, dtype=D, requires_grad=True)
        y0 = torch.tensor([1.0, 0.3], dtype=D, requires_grad=True)
        sol = pn.solve(f, y0, [0.0, 0.5, 5.0], args=(k,), sensealg=sens, **kw)
        assert sol.retcode == "Terminated" and sol.ys.shape == (2, 2)
        grads.append(torch.autograd.grad(sol.event_t + sol.ys.sum() + sol.event_y.sum(), (k, y0)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9), (a, b)


def test_per_sample_times_use_the_given_norm():
    """Per-sample output times used to drop ``norm``; they run the one problem with every option."""
    calls = []

    def norm(err, y0, y1, rtol, atol):
        calls.append(1)
        return torch.linalg.vector_norm(
            err / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))
        ) / math.sqrt(err.numel())

    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.3, 0.9]], dtype=D)
    sol = pn.solve(lambda t, y: -y, torch.ones(2, 1, dtype=D), t, norm=norm, rtol=1e-8, atol=1e-10)
    assert calls and sol.ys.shape == (3, 2, 1)
    assert torch.allclose(sol.ys[:, :, 0].T, torch.exp(-t), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# The import graph


def _import_graph():
    root = pathlib.Path(pn.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    edges = {}
    for name, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        out = set()
        for node in ast.walk(tree):  # function-level (lazy) imports count: a cycle is a cycle
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                out.update(
                    f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                    for a in node.names
                )
        edges[name] = {m for m in out if m in modules and m != name}
    return edges


def test_the_import_graph_has_no_cycles():
    edges = _import_graph()
    assert "pyneuralode.events" in edges["pyneuralode._solve"]  # the graph sees the imports
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
