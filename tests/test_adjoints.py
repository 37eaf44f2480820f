"""Gradients through solves: BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint (and
DirectAdjoint as reference).

Everything in float64. References: closed-form gradients of linear ODEs (scalar exponentials and
autograd through ``torch.linalg.matrix_exp``), central finite differences, and DirectAdjoint.
"""

import dataclasses
import math

import pytest
import torch
from torch import nn

import pyneuralode as pn

DT = torch.float64
TIGHT = dict(rtol=1e-11, atol=1e-12)

ADJOINTS = {
    "backsolve": lambda: pn.BacksolveAdjoint(),
    "backsolve-seminorm": lambda: pn.BacksolveAdjoint(seminorm=True),
    "interpolating": lambda: pn.InterpolatingAdjoint(),
    "interpolating-ckpt": lambda: pn.InterpolatingAdjoint(n_checkpoints=3),
    "interpolating-dense": lambda: pn.InterpolatingAdjoint(checkpointing=False),
    "quadrature-gl": lambda: pn.QuadratureAdjoint(),
    "quadrature-gk": lambda: pn.QuadratureAdjoint("gauss-kronrod"),
    "quadrature-ckpt": lambda: pn.QuadratureAdjoint(checkpointing=True, n_checkpoints=2),
}
#: first derivatives only, no graph of the forward steps: the continuous adjoints and checkpointed
#: DirectAdjoint
FIRST_ORDER = {**ADJOINTS, "direct-ckpt": lambda: pn.DirectAdjoint(checkpoints=3)}
ALL = {"direct": lambda: pn.DirectAdjoint(), **FIRST_ORDER}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# Linear ODEs with closed-form gradients


@pytest.mark.parametrize("name", list(ALL))
def test_scalar_linear_exact_gradients(name):
    """y' = k ⊙ y: y(T) = y0 e^{kT}; L = Σ_i c_i·y(t_i) on several saved times; exact dL/dy0, dL/dk,
    dL/dt."""
    k = torch.tensor([-0.7, 0.3, 1.1], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    t = torch.tensor([0.1, 0.6, 1.3], dtype=DT, requires_grad=True)
    c = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -1.0], [0.5, -1.0, 3.0]], dtype=DT)
    sol = pn.solve(lambda t, y, k: k * y, y0, t, args=(k,), sensealg=ALL[name](), **TIGHT)
    L = (c * sol.ys).sum()
    gy0, gk, gt = torch.autograd.grad(L, [y0, k, t])
    with torch.no_grad():
        tau = (t - t[0]).unsqueeze(1)
        E = torch.exp(k * tau)  # (3 times, 3 comps)
        ex_y0 = (c * E).sum(0)
        ex_k = (c * tau * E * y0).sum(0)
        ys = y0 * E
        ex_t = (c * k * ys).sum(1)
        ex_t[0] = -(c * k * ys).sum()  # moving t0 shifts every later state
    assert rel_err(gy0, ex_y0) < 1e-8
    assert rel_err(gk, ex_k) < 1e-8
    assert rel_err(gt, ex_t) < 1e-8


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_matrix_linear_against_matrix_exp(name):
    """y' = A y with A in args; reference: autograd through torch.linalg.matrix_exp."""
    g = torch.Generator().manual_seed(3)
    A = (0.5 * torch.randn(3, 3, generator=g, dtype=DT)).requires_grad_()
    y0 = torch.randn(3, generator=g, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT)
    w = torch.randn(3, 3, generator=g, dtype=DT)
    sol = pn.solve(lambda t, y, A: A @ y, y0, t, args=(A,), sensealg=FIRST_ORDER[name](), **TIGHT)
    ga = torch.autograd.grad((w * sol.ys).sum(), [y0, A])
    ref = sum((w[i] * (torch.linalg.matrix_exp(A * t[i]) @ y0)).sum() for i in range(3))
    gr = torch.autograd.grad(ref, [y0, A])
    for a, b in zip(ga, gr):
        assert rel_err(a, b) < 1e-8


# ---------------------------------------------------------------------------------------------
# Random MLP vector field: finite differences and DirectAdjoint


class MLPField(nn.Module):
    def __init__(self, seed=0, dim=2, hidden=8):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(
            DT
        )

    def forward(self, t, y, s):
        tt = t.expand(*y.shape[:-1], 1)
        return s * self.net(torch.cat([y, tt], -1))


def _mlp_setup(direction):
    f = MLPField()
    g = torch.Generator().manual_seed(1)
    y0 = torch.randn(2, 2, generator=g, dtype=DT)  # a batch of two states
    s = torch.tensor(0.8, dtype=DT)
    t = (
        torch.tensor([0.0, 0.5, 1.2], dtype=DT)
        if direction == "forward"
        else torch.tensor([0.3, -0.2, -1.0], dtype=DT)
    )
    wts = torch.randn(3, 2, 2, generator=g, dtype=DT)

    def loss(sol_ys):
        return (wts * sol_ys).sum() + (sol_ys[-1] ** 2).sum()

    return f, y0, s, t, loss


def _grads(f, y0, s, t, loss, sensealg):
    y0 = y0.clone().requires_grad_()
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()
    sol = pn.solve(f, y0, t, args=(s,), sensealg=sensealg, **TIGHT)
    gs = torch.autograd.grad(loss(sol.ys), [y0, s, t, *f.parameters()])
    return gs, sol


_FD_CACHE = {}


def _finite_differences(direction):
    """Central differences of the loss w.r.t. y0, s, t and every parameter (computed once per
    direction)."""
    if direction in _FD_CACHE:
        return _FD_CACHE[direction]
    f, y0, s, t, loss = _mlp_setup(direction)
    eps = 1e-5

    def L(y0_, s_, t_):
        with torch.no_grad():
            return loss(pn.solve(f, y0_, t_, args=(s_,), **TIGHT).ys).item()

    def fd_tensor(x, fn):
        g = torch.zeros_like(x)
        for i in range(x.numel()):
            e = torch.zeros_like(x).reshape(-1)
            e[i] = eps
            e = e.view_as(x)
            g.view(-1)[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
        return g

    out = [
        fd_tensor(y0, lambda v: L(v, s, t)),
        fd_tensor(s, lambda v: L(y0, v, t)),
        fd_tensor(t, lambda v: L(y0, s, v)),
    ]
    for p in f.parameters():

        def Lp(v, p=p):
            old = p.data.clone()
            p.data.copy_(v)
            try:
                return L(y0, s, t)
            finally:
                p.data.copy_(old)

        out.append(fd_tensor(p.detach().clone(), Lp))
    _FD_CACHE[direction] = out
    return out


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("name", list(ALL))
def test_mlp_against_finite_differences_and_direct(name, direction):
    f, y0, s, t, loss = _mlp_setup(direction)
    fd = _finite_differences(direction)
    gs, sol = _grads(f, y0, s, t, loss, ALL[name]())
    ref, _ = _grads(f, y0, s, t, loss, pn.DirectAdjoint())
    labels = ["y0", "args", "t"] + [f"param{i}" for i in range(len(gs) - 3)]
    for lab, a, b, d in zip(labels, gs, fd, ref):
        assert rel_err(a, b) < 1e-6, (lab, rel_err(a, b))
        assert rel_err(a, d) < 1e-7, (lab, rel_err(a, d))
    if (
        name == "direct-ckpt"
    ):  # same gradient as DirectAdjoint to rounding: the replay takes the very same steps
        assert all(rel_err(a, d) < 1e-12 for a, d in zip(gs, ref))
        assert (
            sol.stats["nfe_recompute"] >= sol.stats["nfe"] - 2
        )  # every forward step is replayed once
    elif name != "direct":
        assert sol.stats["nfe_adjoint"] > 0 and sol.stats["naccept_adjoint"] > 0
        assert "nreject_adjoint" in sol.stats


# ---------------------------------------------------------------------------------------------
# Tuple states


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_tuple_state_harmonic_oscillator(name):
    """(x, v)' = (v, -ω² x): x(T) = x0 cos ωT + v0/ω sin ωT; exact dL/dx0, dL/dv0, dL/dω."""
    om = torch.tensor(1.7, dtype=DT, requires_grad=True)
    x0 = torch.tensor([1.0, 0.2], dtype=DT, requires_grad=True)
    v0 = torch.tensor([0.0, -0.5], dtype=DT, requires_grad=True)
    T = 1.3
    sol = pn.solve(
        lambda t, y, om: (y[1], -(om**2) * y[0]),
        (x0, v0),
        [0.0, T],
        args=(om,),
        sensealg=FIRST_ORDER[name](),
        **TIGHT,
    )
    L = sol.ys[0][-1].sum() + 0.5 * sol.ys[1][-1].sum()
    gx, gv, gom = torch.autograd.grad(L, [x0, v0, om])
    with torch.no_grad():
        w, c, s_ = om.item(), math.cos(om.item() * T), math.sin(om.item() * T)
        ex_x = torch.full((2,), c + 0.5 * (-w * s_), dtype=DT)
        ex_v = torch.full((2,), s_ / w + 0.5 * c, dtype=DT)
        # d/dω of x(T) and v(T) summed with the loss weights
        dx = (-x0 * T * s_ + v0 * (T * c / w - s_ / w**2)).sum()
        dv = (-x0 * (s_ + w * T * c) - v0 * T * s_).sum()
        ex_om = dx + 0.5 * dv
    assert rel_err(gx, ex_x) < 1e-8
    assert rel_err(gv, ex_v) < 1e-8
    assert abs(gom.item() - ex_om.item()) / abs(ex_om.item()) < 1e-8


# ---------------------------------------------------------------------------------------------
# Memory: no forward graph


def _graph_saved_numel(out: torch.Tensor) -> int:
    """Total elements of every tensor saved by the autograd graph behind ``out``."""
    seen, stack, total = set(), [out.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                v = getattr(fn, attr)
                vs = v if isinstance(v, (tuple, list)) else [v]
                total += sum(x.numel() for x in vs if isinstance(x, torch.Tensor))
        if hasattr(fn, "saved_tensors"):
            total += sum(x.numel() for x in fn.saved_tensors if x is not None)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return total


def _stored_numel(obj) -> int:
    """Elements of the tensors an adjoint keeps on its autograd node for the backward pass."""
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, (list, tuple)):
        return sum(_stored_numel(o) for o in obj)
    if dataclasses.is_dataclass(obj):  # the typed saved state of a forward pass
        return sum(_stored_numel(getattr(obj, fld.name)) for fld in dataclasses.fields(obj))
    if hasattr(obj, "data") and hasattr(obj, "interpolant"):  # a dense segment
        return _stored_numel(obj.data)
    return 0


@pytest.mark.parametrize(
    "name",
    [
        "direct",
        "backsolve",
        "interpolating-ckpt",
        "quadrature-gl",
        "quadrature-ckpt",
        "direct-ckpt",
    ],
)
def test_adjoints_keep_no_forward_graph(name):
    f = MLPField(hidden=16)
    y0 = torch.randn(4, 2, dtype=DT)
    counts, stored, nfe = [], [], []
    for T in (0.5, 8.0):
        sol = pn.solve(
            f,
            y0,
            [0.0, T],
            args=(torch.tensor(3.0, dtype=DT),),
            sensealg=ALL[name](),
            rtol=1e-6,
            atol=1e-8,
        )
        counts.append(_graph_saved_numel(sol.ys))
        nfe.append(sol.stats["nfe"])
        if name != "direct":
            assert "AdjointFunction" in type(sol.ys.grad_fn).__name__
            stored.append(_stored_numel(sol.ys.grad_fn.pass_.saved))
    assert nfe[1] > 5 * nfe[0]  # the long interval really takes many more steps
    if name == "direct":
        assert counts[1] > 3 * counts[0]
        return
    # The graph holds only the output states (2 times × 8 numbers), nothing per step.
    assert counts[0] == counts[1] == 2 * y0.numel()
    if name == "quadrature-gl":
        assert (
            stored[1] > stored[0]
        )  # the dense forward output (state-sized per step) is its documented cost
    elif name == "direct-ckpt":
        assert max(stored) <= 3 * y0.numel()  # at most checkpoints=3 states, however many steps
    else:
        assert stored[0] == stored[1]


def test_no_graph_when_nothing_requires_grad():
    f = MLPField()
    f.requires_grad_(False)
    sol = pn.solve(
        f,
        torch.ones(2, dtype=DT),
        [0.0, 1.0],
        args=(torch.tensor(1.0, dtype=DT),),
        sensealg=pn.BacksolveAdjoint(),
    )
    assert sol.ys.grad_fn is None and not sol.ys.requires_grad


# ---------------------------------------------------------------------------------------------
# Seminorm


@pytest.mark.parametrize("cls", [pn.BacksolveAdjoint, pn.InterpolatingAdjoint])
def test_seminorm_same_gradient_fewer_backward_steps(cls):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).to(DT)
    field = lambda t, y: f(y)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, t, y):
            return self.f(y)

    mod = Wrap()
    y0 = torch.randn(8, 2, dtype=DT, requires_grad=True)
    res = {}
    for sn in (False, True):
        sol = pn.solve(mod, y0, [0.0, 2.0], sensealg=cls(seminorm=sn), rtol=1e-6, atol=1e-8)
        res[sn] = (
            torch.autograd.grad(sol.ys[-1].square().sum(), [y0, *f.parameters()]),
            sol.stats["nfe_adjoint"],
        )
    sol = pn.solve(field, y0, [0.0, 2.0], rtol=1e-10, atol=1e-12)
    exact = torch.autograd.grad(sol.ys[-1].square().sum(), [y0, *f.parameters()])
    for sn in (False, True):
        for a, b in zip(res[sn][0], exact):
            assert rel_err(a, b) < 1e-4
    assert res[True][1] < 0.85 * res[False][1]


# ---------------------------------------------------------------------------------------------
# Other paths


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_loss_on_first_time_only_and_on_middle_time(name):
    k = torch.tensor([0.5], dtype=DT, requires_grad=True)
    y0 = torch.tensor([2.0], dtype=DT, requires_grad=True)
    t = [0.0, 1.0, 2.0]
    sol = pn.solve(lambda t, y, k: k * y, y0, t, args=(k,), sensealg=FIRST_ORDER[name](), **TIGHT)
    gy0, gk = torch.autograd.grad(sol.ys[0].sum(), [y0, k])
    assert gy0.item() == 1.0 and gk.item() == 0.0
    sol = pn.solve(lambda t, y, k: k * y, y0, t, args=(k,), sensealg=FIRST_ORDER[name](), **TIGHT)
    gy0, gk = torch.autograd.grad(sol.ys[1].sum(), [y0, k])
    assert abs(gy0.item() - math.exp(0.5)) < 1e-9 and abs(gk.item() - 2.0 * math.exp(0.5)) < 1e-9


@pytest.mark.parametrize("name", ["backsolve", "interpolating", "quadrature-gl", "direct-ckpt"])
def test_fixed_step_forward_and_backward(name):
    """adaptive=False, RK4 with dt: the adjoint uses the same fixed step; error O(dt⁴)."""
    k = torch.tensor([-0.4], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.5], dtype=DT, requires_grad=True)
    sol = pn.solve(
        lambda t, y, k: k * y,
        y0,
        [0.0, 2.0],
        pn.RK4(),
        adaptive=False,
        dt=0.01,
        args=(k,),
        sensealg=FIRST_ORDER[name](),
    )
    gy0, gk = torch.autograd.grad(sol.ys[-1].sum(), [y0, k])
    assert abs(gy0.item() - math.exp(-0.8)) < 1e-8
    assert abs(gk.item() - 1.5 * 2.0 * math.exp(-0.8)) < 1e-8


@pytest.mark.parametrize("name", ["backsolve", "interpolating", "quadrature-gl"])
def test_backward_solver_and_tolerances_are_used(name):
    """A different backward solver/tolerance changes the backward statistics, not the answer."""
    k = torch.tensor([0.3, -0.2], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 1.0], dtype=DT)
    cls = type(ADJOINTS[name]())
    stats = []
    for kw in (dict(), dict(solver=pn.Dopri5(), rtol=1e-4, atol=1e-6)):
        sol = pn.solve(
            lambda t, y, k: k * y, y0, [0.0, 3.0], args=(k,), sensealg=cls(**kw), **TIGHT
        )
        (gk,) = torch.autograd.grad(sol.ys[-1].sum(), [k])
        ex = 3.0 * torch.exp(3.0 * k.detach())
        assert rel_err(gk, ex) < (1e-8 if not kw else 1e-3)
        stats.append(sol.stats["naccept_adjoint"])
    assert stats[1] < stats[0]


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_double_backward_raises_clearly(name):
    k = torch.tensor([0.3], dtype=DT, requires_grad=True)
    sol = pn.solve(
        lambda t, y, k: k * y,
        torch.ones(1, dtype=DT),
        [0.0, 1.0],
        args=(k,),
        sensealg=FIRST_ORDER[name](),
    )
    (gk,) = torch.autograd.grad(sol.ys[-1].sum(), [k], create_graph=True)
    assert abs(gk.item() - math.exp(0.3)) < 1e-5  # first derivative still correct
    with pytest.raises(RuntimeError, match="DirectAdjoint"):
        gk.sum().backward()


@pytest.mark.parametrize("name", list(FIRST_ORDER))
@pytest.mark.parametrize("wrt", ["y0", "t", "k"])
def test_create_graph_first_derivative_and_second_derivative_error(name, wrt):
    """create_graph=True gives the first derivative whatever requires grad (it failed with only
    y0 or t: "expected 8, got 9"); a second derivative via torch.autograd.grad raises the clear
    error (it returned None/zero or a raw torch error)."""
    k = torch.tensor([0.3], dtype=DT, requires_grad=wrt == "k")
    y0 = torch.tensor([1.5], dtype=DT, requires_grad=wrt == "y0")
    t = torch.tensor([0.0, 1.0], dtype=DT, requires_grad=wrt == "t")
    x = {"k": k, "y0": y0, "t": t}[wrt]
    sol = pn.solve(lambda t, y, k: k * y, y0, t, args=(k,), sensealg=FIRST_ORDER[name](), **TIGHT)
    (g,) = torch.autograd.grad((sol.ys[-1] ** 2).sum(), [x], create_graph=True)
    e = 1.5**2 * math.exp(0.6)  # y(1)^2
    ex = {"k": 2 * e, "y0": 2 * e / 1.5, "t": torch.tensor([-0.6 * e, 0.6 * e], dtype=DT)}[wrt]
    assert rel_err(g.detach(), torch.as_tensor(ex, dtype=DT)) < 1e-8
    with pytest.raises(RuntimeError, match=r"twice through .*sensealg=pn\.DirectAdjoint\(\)"):
        torch.autograd.grad(g.sum(), [x], allow_unused=True)


def test_gauss_kronrod_and_legendre_rules_are_exact():
    from pyneuralode.sensitivity._quadrature_rules import gauss_kronrod15, gauss_legendre

    x, wk, wg = gauss_kronrod15()
    for deg in range(23):
        exact = 1.0 / (deg + 1)
        assert abs(sum(w * xi**deg for xi, w in zip(x, wk)) - exact) < 1e-14
        if deg <= 13:
            assert abs(sum(w * xi**deg for xi, w in zip(x, wg)) - exact) < 1e-14
    assert abs(sum(w * xi**14 for xi, w in zip(x, wg)) - 1 / 15) > 1e-10
    x, w = gauss_legendre(3)
    assert all(abs(sum(wi * xi**d for xi, wi in zip(x, w)) - 1 / (d + 1)) < 1e-14 for d in range(6))


def test_invalid_arguments():
    with pytest.raises(TypeError, match="seminorm"):
        pn.BacksolveAdjoint(seminorm="yes")
    with pytest.raises(ValueError, match="quadrature"):
        pn.QuadratureAdjoint("simpson")
    with pytest.raises(ValueError, match="n_checkpoints"):
        pn.InterpolatingAdjoint(n_checkpoints=-1)
    with pytest.raises(ValueError, match="n_checkpoints"):
        pn.InterpolatingAdjoint(checkpointing=False, n_checkpoints=3)
    with pytest.raises(ValueError, match="n_checkpoints"):
        pn.QuadratureAdjoint(n_checkpoints=3)
    with pytest.raises(TypeError, match="instance"):
        pn.BacksolveAdjoint(solver=pn.Tsit5)
    with pytest.raises(ValueError, match="rtol"):
        pn.InterpolatingAdjoint(rtol=-1.0)
    assert isinstance(pn.QuadratureAdjoint(solver="dopri5").solver, pn.Dopri5)
    # An adaptive forward solve with a backward solver that cannot adapt: a clear error at backward
    # time.
    k = torch.tensor([0.3], dtype=DT, requires_grad=True)
    sol = pn.solve(
        lambda t, y, k: k * y,
        torch.ones(1, dtype=DT),
        [0.0, 1.0],
        args=(k,),
        sensealg=pn.BacksolveAdjoint(solver=pn.RK4()),
    )
    with pytest.raises(ValueError, match="error estimate"):
        sol.ys.sum().backward()


def test_keeps_dense_defaults():
    assert not pn.BacksolveAdjoint.keeps_dense and not pn.InterpolatingAdjoint.keeps_dense
    assert (
        pn.QuadratureAdjoint.keeps_dense
        and not pn.QuadratureAdjoint(checkpointing=True).keeps_dense
    )
    assert pn.DirectAdjoint().keeps_dense and not pn.DirectAdjoint(checkpoints=8).keeps_dense
    sol = pn.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=DT, requires_grad=True),
        [0.0, 1.0],
        sensealg=pn.BacksolveAdjoint(),
    )
    with pytest.raises(ValueError, match="dense"):
        sol(0.5)
    sol = pn.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=DT, requires_grad=True),
        [0.0, 1.0],
        sensealg=pn.QuadratureAdjoint(),
    )
    assert abs(sol(0.5).item() - math.exp(-0.5)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Stiff problems: implicit backward solvers


def _stiff_setup():
    A = torch.tensor([[-1000.0, 1.0], [0.0, -1.0]], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=DT)
    w = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]], dtype=DT)
    ref = sum((w[i] * (torch.linalg.matrix_exp(A * t[i]) @ y0)).sum() for i in range(3))
    return A, y0, t, w, torch.autograd.grad(ref, [y0, A])


@pytest.mark.parametrize("cls", [pn.InterpolatingAdjoint, pn.QuadratureAdjoint])
def test_stiff_linear_with_implicit_backward_solver(cls):
    """Stiffness ratio 1000: Rodas5P forwards and backwards (the adjoint of a stiff problem is stiff
    too)."""
    A, y0, t, w, exact = _stiff_setup()
    sol = pn.solve(
        lambda t, y, A: A @ y,
        y0,
        t,
        pn.Rodas5P(),
        args=(A,),
        sensealg=cls(solver=pn.Rodas5P()),
        rtol=1e-8,
        atol=1e-10,
    )
    got = torch.autograd.grad((w * sol.ys).sum(), [y0, A])
    for a, b in zip(got, exact):
        assert rel_err(a, b) < 1e-7
    assert (
        sol.stats["naccept_adjoint"] < 1000
    )  # an explicit backward solver would need ~1000·(2/2.8) steps


def test_backsolve_on_stiff_problem_fails_with_advice():
    A, y0, t, w, _ = _stiff_setup()
    sol = pn.solve(
        lambda t, y, A: A @ y,
        y0,
        t,
        pn.Rodas5P(),
        args=(A,),
        sensealg=pn.BacksolveAdjoint(),
        rtol=1e-8,
        atol=1e-10,
        max_steps=400,
    )
    with pytest.raises(pn.SolveError, match="InterpolatingAdjoint"):
        (w * sol.ys).sum().backward()


@pytest.mark.parametrize("name", ["backsolve", "interpolating", "quadrature-gl"])
def test_implicit_backward_solver_differentiates_the_adjoint_rhs(name):
    """Rosenbrock methods need the exact Jacobian of the adjoint right-hand side (built through the
    VJP)."""
    f = MLPField()
    y0 = torch.randn(2, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    s = torch.tensor(0.8, dtype=DT, requires_grad=True)
    got = []
    for sensealg in (pn.DirectAdjoint(), type(ADJOINTS[name]())(solver=pn.Rodas5P())):
        sol = pn.solve(f, y0, [0.0, 1.0], pn.Tsit5(), args=(s,), sensealg=sensealg, **TIGHT)
        got.append(
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(sol.ys[-1].square().sum(), [s, *f.parameters()])
                ]
            )
        )
    assert rel_err(got[1], got[0]) < 1e-8
    assert sol.stats["njac_adjoint"] > 0


@pytest.mark.parametrize("solver", [pn.Dopri5, pn.Tsit5, pn.Rodas5P])
def test_checkpoint_resolve_replays_the_forward_steps(solver):
    """A checkpoint re-solve steps on the forward's accepted step times (``LoopOptions.grid``): it
    lands on the forward's state with no rejections and no more steps than the forward took."""
    from pyneuralode._loop import LoopOptions, integrate

    A = torch.tensor([[-0.3, 2.0], [-2.0, -0.3]], dtype=DT)

    def rhs(t, y):
        return A @ y + 0.1 * torch.sin(t * y)

    y0 = torch.tensor([1.0, 0.5], dtype=DT)
    stats: dict = {}
    fwd = integrate(
        rhs,
        y0,
        [0.0, 0.7, 5.0],
        solver(),
        LoopOptions(rtol=1e-6, atol=1e-9, record_steps=True),
        stats,
    )
    assert fwd.step_ts[-1] == 5.0 and len(fwd.step_ts) == stats["naccept"]
    from pyneuralode.sensitivity._passes import replay_grid

    grid = replay_grid(fwd.step_ts, 0.0, 5.0)
    rstats: dict = {}
    rep = integrate(
        rhs, y0, [0.0, 5.0], solver(), LoopOptions(rtol=1e-6, atol=1e-9, grid=grid), rstats
    )
    assert rstats["naccept"] == stats["naccept"] and rstats["nreject"] == 0
    assert (rep.y_final - fwd.y_final).abs().max().item() < 1e-11  # h = t_k+1 − t_k: rounding only
    # an interval from a checkpoint inside a step: the grid is framed by its ends, no slivers
    grid = replay_grid(fwd.step_ts, 0.7, 5.0)
    assert grid[0] == 0.7 and grid[-1] == 5.0 and all(b > a for a, b in zip(grid, grid[1:]))
    assert len(grid) - 1 <= stats["naccept"]
    rep = integrate(
        rhs, fwd.ys[1], [0.7, 5.0], solver(), LoopOptions(rtol=1e-6, atol=1e-9, grid=grid), {}
    )
    assert (rep.y_final - fwd.y_final).abs().max().item() < 1e-6


@pytest.mark.parametrize(
    "name,n_intervals",
    [("backsolve", 2), ("interpolating", 2), ("interpolating-ckpt", 4), ("quadrature-ckpt", 4)],
)
def test_backward_pass_starts_with_the_forward_step(name, n_intervals):
    """The backward pass starts with the forward step covering each interval's end (no starting-step
    heuristic, which costs two adjoint evaluations); gradients stay those of DirectAdjoint."""
    f = MLPField(hidden=16)
    y0 = torch.randn(4, 2, dtype=DT)
    ts = [0.0, 0.5, 2.0]
    grads = {}
    for key in ("direct", name):
        f.zero_grad()
        y = y0.clone().requires_grad_(True)
        sol = pn.solve(
            f,
            y,
            ts,
            pn.Tsit5(),
            args=(torch.tensor(1.5, dtype=DT),),
            rtol=1e-9,
            atol=1e-11,
            sensealg=ALL[key](),
        )
        sol.ys.square().sum().backward()
        grads[key] = torch.cat([y.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])
        stats = sol.stats
    assert rel_err(grads[name], grads["direct"]) < 1e-6
    # Tsit5 (FSAL): 6 evaluations per attempted step plus the first f of each interval; the
    # starting-step heuristic would add 2 per interval
    steps = stats["naccept_adjoint"] + stats["nreject_adjoint"]
    assert stats["nfe_adjoint"] == 6 * steps + n_intervals
    assert stats["nreject_adjoint"] <= n_intervals


# ---------------------------------------------------------------------------------------------
# DirectAdjoint(checkpoints=M): backprop through replayed segments


def test_thinned_states_keep_at_most_the_limit_evenly():
    from pyneuralode.sensitivity.direct import _ThinnedStates

    for limit, n in [(2, 1), (4, 3), (4, 100), (7, 1000), (32, 458)]:
        kept = _ThinnedStates(limit, 0.0, torch.zeros(1))
        for i in range(1, n + 1):
            kept.add(float(i), torch.full((1,), float(i)))
        idx = [e[0] for e in kept.entries]
        assert idx[0] == 0 and len(idx) <= limit
        assert all(b - a == kept.stride for a, b in zip(idx, idx[1:]))  # evenly thinned
        if n >= limit:
            assert len(idx) > limit // 2  # never thinned more than needed
        assert all(e[2].item() == e[1] == e[0] for e in kept.entries)


@pytest.mark.parametrize("solver", [pn.Tsit5, pn.Rodas5P, pn.KenCarp4], ids=lambda S: S.__name__)
@pytest.mark.parametrize("checkpoints", [2, 4])
def test_checkpointed_direct_equals_direct(solver, checkpoints):
    """Several outputs, args and module parameters, a stiff and an explicit solver: the replayed
    segments give DirectAdjoint's gradient; at most ``checkpoints`` states are kept."""
    f = MLPField(hidden=16)
    y0 = torch.randn(3, 2, dtype=DT)
    s = torch.tensor(-2.0, dtype=DT)
    t = [0.0, 0.4, 1.3, 2.0]
    out = {}
    for sens in (pn.DirectAdjoint(), pn.DirectAdjoint(checkpoints=checkpoints)):
        f.zero_grad()
        y, ss = y0.clone().requires_grad_(True), s.clone().requires_grad_(True)
        sol = pn.solve(f, y, t, solver(), args=(ss,), rtol=1e-7, atol=1e-9, sensealg=sens)
        (sol.ys[1:].square() * torch.arange(1, 4, dtype=DT).view(3, 1, 1)).sum().backward()
        out[sens.checkpoints] = torch.cat(
            [y.grad.reshape(-1), ss.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()]
        )
        if sens.checkpoints:
            assert len(sol.ys.grad_fn.pass_.saved.entries) <= checkpoints
            assert sol.stats["naccept"] > 2 * checkpoints  # many steps per kept state
    tol = (
        1e-9 if solver is pn.KenCarp4 else 1e-11
    )  # Newton's iterates are replayed to its tolerance
    assert rel_err(out[checkpoints], out[None]) < tol


def test_checkpointed_direct_rejects_bad_options():
    with pytest.raises(ValueError, match="checkpoints"):
        pn.DirectAdjoint(checkpoints=1)
    with pytest.raises(ValueError, match="checkpoints"):
        pn.DirectAdjoint(checkpoints=2.5)


@pytest.mark.parametrize("engine", ["engine", "public"])
def test_fast_vjp_equals_autograd_grad(engine, monkeypatch):
    """The adjoints' VJP calls the autograd engine entry directly; it must give what
    ``torch.autograd.grad(..., allow_unused=True, materialize_grads=True)`` gives, zeros for an
    unused input included, and the public-API fallback must give the same."""
    from pyneuralode.sensitivity import _torch_internals

    if engine == "public":
        monkeypatch.setattr(_torch_internals, "_ENGINE", [None])
    else:
        assert _torch_internals._engine_entry() is not None, (
            "the engine entry failed its self-check on this torch"
        )
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    unused = torch.randn(2, dtype=DT, requires_grad=True)
    y = torch.randn(5, 3, dtype=DT, requires_grad=True)
    a = torch.randn(5, 3, dtype=DT)
    inputs = [y, *lin.parameters(), unused]
    fast = _torch_internals.grad_first_order(torch.tanh(lin(y)), inputs, a)
    ref = torch.autograd.grad(
        torch.tanh(lin(y)), inputs, grad_outputs=a, allow_unused=True, materialize_grads=True
    )
    assert len(fast) == len(ref) == 4
    for g, r in zip(fast, ref):
        assert g.shape == r.shape
        assert torch.allclose(g, r, rtol=1e-14, atol=0), (g, r)
    assert torch.count_nonzero(fast[-1]) == 0 and fast[0].abs().max() > 0
    assert lin.weight.grad is None and y.grad is None  # nothing accumulated


# ---------------------------------------------------------------------------------------------
# Tensors f reaches without being handed them (issue 16, item 3)


def _fd(fun, x, h=1e-6):
    """Central finite differences of the scalar ``fun(x)`` over the entries of ``x``."""
    x = x.detach()
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[i] = h
        e = e.reshape(x.shape)
        out.reshape(-1)[i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return out


_Y0 = torch.tensor([1.0, -0.5], dtype=DT)
_T = [0.0, 0.4, 1.0]


def _closure_loss(theta, sensealg, **kw):
    """L(θ) for y' = A(θ) y with θ captured by a closure (not in args, f not a module)."""

    def f(t, y):
        return torch.stack([theta[0] * y[1] - 0.3 * y[0], -theta[1] * y[0] * y[1] - y[1]])

    sol = pn.solve(f, _Y0, _T, sensealg=sensealg, **TIGHT, **kw)
    return (sol.ys[1:] ** 2).sum()


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_closed_over_tensor_with_adjoint_params_against_finite_differences(name):
    theta = torch.tensor([0.8, 0.5], dtype=DT, requires_grad=True)
    loss = _closure_loss(theta, FIRST_ORDER[name](), adjoint_params=[theta])
    (g,) = torch.autograd.grad(loss, [theta])
    with torch.no_grad():
        fd = _fd(lambda th: _closure_loss(th, pn.DirectAdjoint()), theta)
    assert rel_err(g, fd) < 1e-6


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_closed_over_non_leaf_tensor_passes_its_gradient_on(name):
    """adjoint_params may hold a tensor computed from a leaf: the gradient goes on from it."""
    log_theta = torch.tensor([-0.2, -0.7], dtype=DT, requires_grad=True)
    theta = log_theta.exp()
    loss = _closure_loss(theta, FIRST_ORDER[name](), adjoint_params=[theta])
    (g,) = torch.autograd.grad(loss, [log_theta])
    with torch.no_grad():
        fd = _fd(lambda lt: _closure_loss(lt.exp(), pn.DirectAdjoint()), log_theta)
    assert rel_err(g, fd) < 1e-6


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_closed_over_tensor_without_adjoint_params_raises(name):
    theta = torch.tensor([0.8, 0.5], dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="adjoint_params"):
        _closure_loss(theta, FIRST_ORDER[name]())
    # the same tensor detached, or no grad mode: nothing to differentiate, no error
    _closure_loss(theta.detach(), FIRST_ORDER[name]())
    with torch.no_grad():
        _closure_loss(theta, FIRST_ORDER[name]())


class _Decay(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor([0.7, 0.2], dtype=DT))

    def forward(self, t, y):
        return -self.k * y

    def rate(self, t, y):
        return -self.k * y * (1 + 0.1 * t)


@pytest.mark.parametrize("name", list(FIRST_ORDER))
@pytest.mark.parametrize("how", ["closure", "bound-method", "partial"])
def test_parameters_of_reachable_modules_get_gradients(name, how):
    import functools

    m = _Decay()

    def loss(sensealg):
        f = {
            "closure": lambda t, y: m(t, y) * (1 + 0.1 * t),
            "bound-method": m.rate,
            "partial": functools.partial(lambda t, y, mod: mod.rate(t, y), mod=m),
        }[how]
        return (pn.solve(f, _Y0, _T, sensealg=sensealg, **TIGHT).ys ** 2).sum()

    (g,) = torch.autograd.grad(loss(FIRST_ORDER[name]()), [m.k])
    (ref,) = torch.autograd.grad(loss(pn.DirectAdjoint()), [m.k])
    assert rel_err(g, ref) < 1e-7
    assert g.abs().min() > 1e-3


@pytest.mark.parametrize("name", ["backsolve", "direct-ckpt"])
def test_module_attribute_or_global_tensor_that_requires_grad_raises(name):
    m = _Decay()
    m.extra = torch.tensor(1.0, dtype=DT, requires_grad=True)  # a plain attribute, not a Parameter
    with pytest.raises(ValueError, match=r"adjoint_params.*|extra"):
        pn.solve(m, _Y0, _T, sensealg=FIRST_ORDER[name]())
    # listed explicitly: accepted (module parameters listed too get gradients)
    sol = pn.solve(m, _Y0, _T, sensealg=FIRST_ORDER[name](), adjoint_params=[m.k, m.extra])
    assert sol.ys.requires_grad


def test_adjoint_params_validation():
    theta = torch.tensor([0.8, 0.5], dtype=DT, requires_grad=True)
    with pytest.raises(TypeError, match="adjoint_params"):
        pn.solve(lambda t, y: -y, _Y0, _T, sensealg=pn.BacksolveAdjoint(), adjoint_params=theta)
    with pytest.raises(TypeError, match=r"adjoint_params\[1\]"):
        pn.solve(
            lambda t, y: -y, _Y0, _T, sensealg=pn.BacksolveAdjoint(), adjoint_params=[theta, 1.0]
        )
    with pytest.raises(TypeError, match="adjoint_params"):
        pn.solve(lambda t, y: -y, _Y0, _T, sensealg=pn.BacksolveAdjoint(), adjoint_params=_Decay())


def test_adjoint_params_listed_twice_or_also_in_args_count_once():
    k = torch.tensor([0.7, 0.2], dtype=DT, requires_grad=True)
    sol = pn.solve(
        lambda t, y, k: -k * y,
        _Y0,
        [0.0, 1.0],
        args=(k,),
        sensealg=pn.InterpolatingAdjoint(),
        adjoint_params=[k, k],
        **TIGHT,
    )
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), [k])
    ex = -_Y0 * torch.exp(-k.detach())
    assert rel_err(g, ex) < 1e-8


# ---------------------------------------------------------------------------------------------
# Degenerate problems (issue 16, item 6)


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_single_output_time(name):
    """t of length 1: ys = [y0], dL/dy0 = dL/dys[0] (BacksolveAdjoint raised TypeError)."""
    k = torch.tensor([0.3], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    sol = pn.solve(lambda t, y, k: k * y, y0, [0.5], args=(k,), sensealg=FIRST_ORDER[name]())
    gy0, gk = torch.autograd.grad((3 * sol.ys).sum(), [y0, k])
    assert torch.equal(gy0, torch.full_like(y0, 3.0)) and torch.equal(gk, torch.zeros_like(k))


@pytest.mark.parametrize("name", list(FIRST_ORDER))
@pytest.mark.parametrize("field", ["constant", "time-only", "y-only", "k-only"])
def test_f_independent_of_state_or_parameters(name, field):
    """f that depends on neither y nor a target gives zero products (the adjoints crashed: VJP on
    an output without a graph); exact references for y' = c, y' = t, y' = -y, y' = k."""
    f = {
        "constant": lambda t, y, k: torch.ones_like(y),
        "time-only": lambda t, y, k: t * torch.ones_like(y),
        "y-only": lambda t, y, k: -y,
        "k-only": lambda t, y, k: k * torch.ones_like(y),
    }[field]
    k = torch.tensor(0.5, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, -1.0], dtype=DT, requires_grad=True)
    sol = pn.solve(f, y0, [0.0, 0.5, 1.0], args=(k,), sensealg=FIRST_ORDER[name](), **TIGHT)
    gy0, gk = torch.autograd.grad(sol.ys[1:].sum(), [y0, k])
    ey0 = 2.0 if field != "y-only" else math.exp(-0.5) + math.exp(-1.0)
    ek = 2 * (0.5 + 1.0) if field == "k-only" else 0.0
    assert (gy0 - ey0).abs().max() < 1e-8
    assert abs(gk.item() - ek) < 1e-8
