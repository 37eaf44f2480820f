"""The compiled path (``solve(..., compile=True)``, :mod:`pyneuralode.compiled`).

Fitted convergence orders of the compiled methods (fixed steps, exact solution), equality with the
native engine (same steps, same statistics, states to rounding) and with the stored Radau
references on Robertson and Van der Pol (μ = 1000), the dense output ``sol(tq)`` against the
native engine's, float32 states, the ``odeint``/``NeuralODE`` switches, and the clear errors.
"""

import json
import math
import pathlib

import numpy as np
import pytest
import torch
from _fields import lotka_volterra, robertson

import pyneuralode as pn
from pyneuralode.compiled import UnsupportedOpError, numba_available

pytestmark = pytest.mark.skipif(
    not numba_available(), reason="numba is not installed (pip install 'pyneuralode[compiled]')"
)

REF = json.loads((pathlib.Path(__file__).parent / "data" / "stiff_references.json").read_text())
F64 = dict(dtype=torch.float64)


def growth(
    t, y
):  # y' = y cos t  =>  y = exp(sin t); non-autonomous (exercises ∂f/∂t in Rosenbrock)
    return y * torch.cos(t)


def van_der_pol(t, y):
    return torch.stack([y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]])


# fixed steps on [0, 2]: errors well above round-off and in the asymptotic range (Rodas4 is
# pre-asymptotic below ~45 steps: slope 3.2 there, natively too)
STEPS = {
    "Tsit5": [28, 40, 56, 80],
    "Dopri5": [20, 28, 40, 56],
    "Vern7": [8, 11, 16, 22],
    "DP8": [3, 4, 5, 6],
    "Rodas4": [45, 64, 90, 128],
    "Rodas5P": [16, 23, 32, 45],
    "KenCarp4": [16, 23, 32, 45],
    "Kvaerno5": [8, 11, 16, 23],
}


@pytest.mark.parametrize(
    "name,order",
    [
        ("Tsit5", 5),
        ("Dopri5", 5),
        ("Vern7", 7),
        ("DP8", 8),
        ("Rodas4", 4),
        ("Rodas5P", 5),
        ("KenCarp4", 4),
        ("Kvaerno5", 5),
    ],
)
def test_fitted_order(name, order):
    y0 = torch.tensor([1.0], **F64)
    ts = torch.tensor([0.0, 2.0], **F64)
    exact = math.exp(math.sin(2.0))
    errs = []
    for n in STEPS[name]:
        sol = pn.solve(
            growth,
            y0,
            ts,
            getattr(pn, name)(),
            adaptive=False,
            dt=2.0 / n,
            compile=True,
            rtol=1e-12,
            atol=1e-14,  # (ESDIRK: Newton converged far below the truncation error)
        )
        errs.append(abs(sol.ys[-1, 0].item() - exact))
    slope = -np.polyfit(np.log(STEPS[name]), np.log(errs), 1)[0]
    assert abs(slope - order) < (0.3 if order <= 4 else 0.5), (
        name,
        slope,
        errs,
    )  # as test_explicit_convergence


@pytest.mark.parametrize("name", ["Tsit5", "Vern7"])
def test_equals_native_lotka_volterra(name):
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F64)
    y0 = torch.tensor([1.0, 1.0], **F64)
    t = torch.linspace(0, 10, 21, **F64)  # most outputs fall inside steps: the dense output
    kw = dict(args=(p,), rtol=1e-8, atol=1e-10)
    a = pn.solve(lotka_volterra, y0, t, getattr(pn, name)(), compile=True, **kw)
    b = pn.solve(lotka_volterra, y0, t, getattr(pn, name)(), **kw)
    assert a.retcode == "Success"
    for k in ("nfe", "naccept", "nreject"):  # the same algorithm: the same steps
        assert a.stats[k] == b.stats[k], (k, a.stats, b.stats)
    torch.testing.assert_close(a.ys, b.ys, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", ["Rodas5P", "Rodas4", "KenCarp4", "Kvaerno5", "QNDF"])
def test_robertson_reference_and_native(name):
    R = REF["robertson"]
    y0, t, k = (torch.tensor(R[x], **F64) for x in ("y0", "t", "k"))
    kw = dict(args=(k,), rtol=1e-8, atol=1e-10)
    a = pn.solve(robertson, y0, t, getattr(pn, name)(), compile=True, **kw)
    b = pn.solve(robertson, y0, t, getattr(pn, name)(), **kw)
    ref = torch.tensor(R["y"], **F64)
    assert ((a.ys - ref).abs() / (ref.abs() + 1e-8)).max() < 1e-5
    if name.startswith("Rodas"):
        assert a.stats["njac"] == a.stats["naccept"]
        keys = ("naccept", "nreject", "nlu")
    else:  # ESDIRK, QNDF: the same Jacobian reuse, Newton iterations and convergence failures
        keys = ("naccept", "nreject", "njac", "nlu", "nnewton", "nconvfail")
    for key in keys:
        assert a.stats[key] == b.stats[key], (key, a.stats, b.stats)
    torch.testing.assert_close(a.ys, b.ys, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["Rodas5P", "KenCarp4", "QNDF"])
def test_van_der_pol_reference_and_native(name):
    V = REF["vanderpol"]
    y0, t = torch.tensor(V["y0"], **F64), torch.tensor(V["t"], **F64)
    kw = dict(rtol=1e-7, atol=1e-9)
    a = pn.solve(van_der_pol, y0, t, getattr(pn, name)(), compile=True, **kw)
    b = pn.solve(van_der_pol, y0, t, getattr(pn, name)(), **kw)
    ref = torch.tensor(V["y"], **F64)
    assert ((a.ys - ref).abs() / (ref.abs() + 1e-6)).max() < 1e-3
    assert a.stats["naccept"] == b.stats["naccept"] and a.stats["nreject"] == b.stats["nreject"]
    torch.testing.assert_close(a.ys, b.ys, rtol=1e-6 if name == "KenCarp4" else 1e-7, atol=1e-10)


def test_unsupported_op_names_it():
    def f(t, y):
        return torch.cumsum(y, 0)

    with pytest.raises(UnsupportedOpError, match=r"aten\.cumsum.*compile=False"):
        pn.solve(f, torch.ones(2, **F64), torch.tensor([0.0, 1.0], **F64), pn.Tsit5(), compile=True)


def test_clear_errors():
    y0 = torch.ones(2, **F64)
    t = torch.tensor([0.0, 1.0], **F64)
    with pytest.raises(TypeError, match="float64 or float32"):
        pn.solve(lambda t, y: -y, y0.half(), t, pn.Tsit5(), compile=True)
    with pytest.raises(ValueError, match="compile=False"):
        pn.solve(lambda t, y: -y, y0, t, pn.Rosenbrock23(), compile=True)
    with pytest.raises(ValueError, match="linsolve"):
        pn.solve(lambda t, y: -y, y0, t, pn.KenCarp4(linsolve="gmres"), compile=True)
    with pytest.raises(TypeError, match="compile"):
        pn.solve(lambda t, y: -y, y0, t, pn.Tsit5(), compile="yes")


def test_module_parameters_are_live_arguments():
    """An nn.Module f: its parameters reach the compiled code as arguments, so new values (training)
    reuse the compiled module and give the native engine's answer."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y) - 0.5 * y

    f = Field()
    y0 = torch.tensor([0.3, -0.2, 0.1], **F64)
    t = torch.linspace(0, 2, 5, **F64)
    with torch.no_grad():
        for _ in range(2):
            a = pn.solve(f, y0, t, pn.Tsit5(), compile=True)
            b = pn.solve(f, y0, t, pn.Tsit5())
            torch.testing.assert_close(a.ys, b.ys, rtol=1e-11, atol=1e-12)
            assert a.stats["naccept"] == b.stats["naccept"]
            net[0].weight.mul_(1.5)  # an in-place update, as an optimizer step
        assert "compile_s" not in a.stats  # the second solve reused the compiled module


def test_tuple_and_shaped_states():
    """Tuple states are packed before tracing; shaped outputs come back shaped like y0."""

    def f(t, y):
        x, v = y
        return v, -x * torch.cos(t)

    y0 = (torch.tensor([[1.0, 0.5]], **F64), torch.tensor([[0.0, 0.2]], **F64))
    t = torch.linspace(0, 3, 4, **F64)
    a = pn.solve(f, y0, t, pn.Dopri5(), compile=True)
    b = pn.solve(f, y0, t, pn.Dopri5())
    assert isinstance(a.ys, tuple) and a.ys[0].shape == (4, 1, 2) and a.ys[1].shape == (4, 1, 2)
    for u, w in zip(a.ys, b.ys):
        torch.testing.assert_close(u, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "name", ["Tsit5", "Vern7", "DP8", "Rodas5P", "KenCarp4", "Kvaerno5", "QNDF"]
)  # own polynomial, with lazy extra stages (Vern7, DP8), Rosenbrock's, ESDIRK's, Hermite, QNDF's
def test_dense_output_equals_native(name):
    k = torch.tensor([0.04, 3e7, 1e4], **F64)
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F64)
    if name in ("Tsit5", "Vern7", "DP8"):
        # Tsit5, Vern7: > 64 steps, the compiled dense store grows (DP8 on a shorter span: on
        # [0, 30] a rounding-level difference of its error norm at 1.0 gives it one step less)
        end = 6.0 if name == "DP8" else 30.0
        f, y0, t, args = lotka_volterra, [1.0, 1.0], [0.0, end], (p,)
        tq = torch.linspace(0, end, 41)
    else:
        f, y0, t, args = robertson, [1.0, 0.0, 0.0], [0.0, 40.0], (k,)
        tq = torch.linspace(0, 40, 41)
    y0, t, tq = torch.tensor(y0, **F64), torch.tensor(t, **F64), tq.double()
    kw = dict(args=args, rtol=1e-7, atol=1e-10)
    a = pn.solve(f, y0, t, getattr(pn, name)(), compile=True, **kw)
    b = pn.solve(f, y0, t, getattr(pn, name)(), **kw)
    assert a.stats["naccept"] == b.stats["naccept"]
    assert name not in ("Tsit5", "Vern7") or a.stats["naccept"] > 64
    ya, yb = a(tq), b(tq)
    assert ya.shape == yb.shape == (41, *y0.shape)
    torch.testing.assert_close(ya, yb, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(a(t), a.ys)  # the ends of the span: the saved states
    with pytest.raises(ValueError, match="outside the solved span"):
        a(torch.tensor([41.0]))  # past both spans


def test_dense_output_backward_time_and_tuple_state():
    def f(t, y):
        x, v = y
        return v, -x * torch.cos(t)

    y0 = (torch.tensor([1.0], **F64), torch.tensor([0.5], **F64))
    t = torch.tensor([3.0, 0.0], **F64)
    tq = torch.linspace(3, 0, 13, **F64)
    a = pn.solve(f, y0, t, pn.Tsit5(), compile=True, rtol=1e-8, atol=1e-10)
    b = pn.solve(f, y0, t, pn.Tsit5(), rtol=1e-8, atol=1e-10)
    for u, w in zip(a(tq), b(tq)):
        torch.testing.assert_close(u, w, rtol=1e-9, atol=1e-11)
    c = pn.solve(f, y0, t, pn.Tsit5(), compile=True, dense=False)
    with pytest.raises(ValueError, match="dense=True"):
        c(tq)


def test_float32_states():
    """float32 in, float32 out: f traced in float32 (a float32 module), integrated in float64."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))

    def f(t, y):
        return net(y) - y

    y0 = torch.tensor([0.5, -0.3])
    t = torch.linspace(0, 2, 5)
    with torch.no_grad():
        a = pn.solve(f, y0, t, pn.Tsit5(), compile=True, rtol=1e-7, atol=1e-9)
        net64 = net.double()
        c = pn.solve(f, y0.double(), t.double(), pn.Tsit5(), compile=True, rtol=1e-7, atol=1e-9)
        net.float()
        b = pn.solve(f, y0, t, pn.Tsit5(), rtol=1e-4, atol=1e-6)  # native float32
    assert net64 is net and a.ys.dtype == torch.float32 and a(t[1:3]).dtype == torch.float32
    # the float64 computation rounded to float32 (the float32 weights are exact in float64)
    torch.testing.assert_close(a.ys, c.ys.float(), rtol=0, atol=0)
    torch.testing.assert_close(a.ys, b.ys, rtol=1e-4, atol=1e-5)


def test_odeint_switch():
    """pn.odeint(..., compile=True): the torchdiffeq interface, the compiled solve; one compiled
    problem per func, not per call."""
    from pyneuralode.compiled import _driver

    def f(t, y):
        return torch.stack([y[1], -torch.sin(y[0])])

    y0 = torch.tensor([1.0, 0.0], **F64)
    t = torch.linspace(0, 5, 6, **F64)
    a = pn.odeint(f, y0, t, compile=True)
    n_built = len(_driver._PROBLEMS)
    a2 = pn.odeint(f, y0, t, method="dopri5", compile=True)
    b = pn.odeint(f, y0, t)
    assert len(_driver._PROBLEMS) == n_built
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a2, a, rtol=0, atol=0)


def test_neural_ode_switch():
    torch.manual_seed(0)
    tol = dict(rtol=1e-9, atol=1e-11)  # gradients: sensitivities vs DirectAdjoint agree to ~tol
    model = pn.NeuralODE(pn.ConcatMLP(2, hidden=(8,)), compile=True, **tol).double()
    ref = pn.NeuralODE(model.vector_field, **tol)
    y0 = torch.tensor([[0.3, -0.2], [0.1, 0.4]], **F64)
    with torch.no_grad():
        torch.testing.assert_close(model(y0), ref(y0), rtol=1e-8, atol=1e-10)
    assert model.nfe_forward == ref.nfe_forward
    # with gradients: the compiled forward sensitivities (pyneuralode.compiled._sensitivity)
    g = torch.autograd.grad(model(y0).square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(ref(y0).square().sum(), list(ref.parameters()))
    for u, w in zip(g, g_ref):
        torch.testing.assert_close(u, w, rtol=1e-6, atol=1e-8)
    with pytest.raises(TypeError, match="compile"):
        pn.NeuralODE(pn.ConcatMLP(2, hidden=(8,)), compile="yes")


# -- the call path's caches and fast checks (issue 19, s4-19c) ---------------------------------


class _Decay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([-1.0, -2.0], **F64))

    def forward(self, t, y):
        return self.a * y


def _decay_pair(m, **kw):
    y0 = torch.tensor([1.0, 2.0], **F64)
    t = torch.linspace(0.0, 1.0, 5, **F64)
    return [
        pn.solve(m, y0, t, pn.Tsit5(), compile=c, rtol=1e-8, atol=1e-10, **kw)
        for c in (True, False)
    ]


def test_compiled_cache_sees_replaced_module_parameters():
    """The traced code holds the tensors f read: a parameter updated in place is read on every
    call, one replaced (a new Parameter, or ``.data = ...``) is traced again; never the old
    values (the cache was keyed on f alone and kept solving with them)."""
    m = _Decay()
    with torch.no_grad():
        first = _decay_pair(m)[0].ys
        m.a.copy_(torch.tensor([-3.0, -0.5]))
        comp, nat = _decay_pair(m)
        torch.testing.assert_close(comp.ys, nat.ys, rtol=1e-9, atol=1e-12)
        m.a = torch.nn.Parameter(torch.tensor([-0.25, -4.0], **F64))
        comp, nat = _decay_pair(m)
        torch.testing.assert_close(comp.ys, nat.ys, rtol=1e-9, atol=1e-12)
        m.a.data = torch.tensor([0.5, -1.5], **F64)
        comp, nat = _decay_pair(m)
        torch.testing.assert_close(comp.ys, nat.ys, rtol=1e-9, atol=1e-12)
        exact = torch.tensor([1.0, 2.0], **F64) * torch.exp(m.a * 1.0)
        torch.testing.assert_close(comp.ys[-1], exact, rtol=1e-7, atol=0)
    assert not torch.allclose(first, comp.ys)


def test_compiled_gradient_reaches_a_replaced_module_parameter():
    """Forward sensitivities of a module's parameters after the parameter was replaced: the
    gradient goes to the new tensor (the traced graph must not keep the old one)."""
    m = _Decay()
    grads = []
    for _ in range(2):
        m.a = torch.nn.Parameter(m.a.detach() * 1.5)
        sols = _decay_pair(m, sensealg=pn.DirectAdjoint())
        gs = [torch.autograd.grad(s.ys[-1].sum(), m.a)[0] for s in sols]
        torch.testing.assert_close(gs[0], gs[1], rtol=1e-7, atol=1e-10)
        grads.append(gs[0])
    exact = torch.tensor([1.0, 2.0], **F64) * torch.exp(m.a.detach())  # d/da y0·e^{a}
    torch.testing.assert_close(grads[-1], exact, rtol=1e-6, atol=0)
    assert not torch.allclose(grads[0], grads[1])


def test_compiled_sees_changed_inputs_between_calls():
    """Every call reads its own y0, t, args and tolerances (views of the tensors, no cached
    copies): values changed in place, a new y0 shape and a float32 state all give the native
    engine's answer."""
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F64)
    y0 = torch.tensor([1.0, 1.0], **F64)
    t = torch.linspace(0.0, 2.0, 5, **F64)

    def both(y0, t, p, rtol=1e-7):
        return [
            pn.solve(lotka_volterra, y0, t, pn.Tsit5(), args=(p,), compile=c, rtol=rtol).ys
            for c in (True, False)
        ]

    with torch.no_grad():
        a, b = both(y0, t, p)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        p[0] = 0.7
        y0[1] = 0.3
        t.mul_(1.5)
        c, d = both(y0, t, p, rtol=1e-5)
        torch.testing.assert_close(c, d, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(a, c)
        c32, d32 = both(y0.float(), t.float(), p.float(), rtol=1e-5)
        assert c32.dtype == torch.float32
        torch.testing.assert_close(c32, d32, rtol=1e-5, atol=1e-6)
        y4 = torch.tensor([[1.0, 1.0], [0.5, 2.0]], **F64)

        def lv_rows(t, y, p):
            return torch.stack([lotka_volterra(t, y[i], p) for i in range(2)])

        e, g = [
            pn.solve(lv_rows, y4, t, pn.Tsit5(), args=(p,), compile=c, rtol=1e-7).ys
            for c in (True, False)
        ]
        assert e.shape == (5, 2, 2)
        torch.testing.assert_close(e, g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", [4, 100])  # checked as Python floats up to 64 values, by torch above
def test_time_and_state_checks_same_messages_small_and_large(n):
    y0 = torch.ones(n, **F64)
    t = torch.linspace(0.0, 1.0, n, **F64)

    def f(t, y):
        return -y

    for bad, msg in (
        (torch.cat([t[:-1], t[-2:-1]]), "t: has repeated values"),
        (torch.cat([t[:-1], t[-3:-2]]), "t: is not monotonic"),
        (torch.cat([t[:-1], torch.tensor([float("nan")], **F64)]), "t: contains NaN or Inf"),
    ):
        with pytest.raises(ValueError, match=msg):
            pn.solve(f, y0, bad, compile=True)
    y_bad = y0.clone()
    y_bad[-1] = float("inf")
    with pytest.raises(ValueError, match="y0: contains NaN or Inf"):
        pn.solve(f, y_bad, t, compile=True)
    sol = pn.solve(f, y0[:2], t.flip(0), compile=True)  # decreasing times are fine
    torch.testing.assert_close(sol.ys[-1], torch.exp(1.0 - t.flip(0)[-1]).expand(2))


def test_dense_output_keeps_the_parameters_of_its_solve():
    """``sol(tq)`` of Vern7 evaluates f for its extra stages later: with the parameters of the
    solve, even if the tensor passed in ``args`` is changed in place afterwards."""
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], **F64)
    y0 = torch.tensor([1.0, 1.0], **F64)
    t = torch.linspace(0.0, 2.0, 3, **F64)
    tq = torch.linspace(0.1, 1.9, 7, **F64)
    with torch.no_grad():
        native = pn.solve(lotka_volterra, y0, t, pn.Vern7(), args=(p,), rtol=1e-8)(tq)
        sol = pn.solve(lotka_volterra, y0, t, pn.Vern7(), args=(p,), compile=True, rtol=1e-8)
        p.mul_(2.0)  # before the first sol(tq), which evaluates the extra stages
        torch.testing.assert_close(sol(tq), native, rtol=1e-9, atol=1e-12)
