"""Every bad input of the API raises a clear ValueError/TypeError naming the argument."""

import math

import pytest
import torch

import pyneuralode as pn

Y0 = torch.ones(2, dtype=torch.float64)
T = torch.tensor([0.0, 1.0], dtype=torch.float64)


def f(t, y):
    return -y


@pytest.mark.parametrize(
    "y0,exc,match",
    [
        (torch.ones(2, dtype=torch.int64), TypeError, r"y0: dtype torch.int64 is not floating"),
        ([1.0, 2.0], TypeError, r"y0\[0\]: expected a torch.Tensor"),
        (3.0, TypeError, r"y0: expected a torch.Tensor"),
        (
            (torch.ones(2), torch.ones(2, dtype=torch.int32)),
            TypeError,
            r"y0\[1\]: dtype torch.int32",
        ),
        (
            (torch.ones(2), torch.ones(2, dtype=torch.float64)),
            TypeError,
            r"y0\[1\]: all tuple components",
        ),
        ((), ValueError, r"y0: an empty tuple"),
        (torch.tensor([1.0, float("nan")]), ValueError, r"y0: contains NaN or Inf"),
        (torch.tensor([1.0, float("inf")]), ValueError, r"y0: contains NaN or Inf"),
    ],
)
def test_bad_y0(y0, exc, match):
    with pytest.raises(exc, match=match):
        pn.solve(f, y0, T)


@pytest.mark.parametrize(
    "t,match",
    [
        (torch.tensor([[0.0, 1.0]]), r"t: must be 1-D"),
        (torch.tensor(1.0), r"t: must be 1-D"),
        (torch.tensor([]), r"t: is empty"),
        (torch.tensor([0.0, 1.0, 0.5]), r"t: is not monotonic"),
        (torch.tensor([0.0, 1.0, 1.0, 2.0]), r"t: has repeated values"),
        (torch.tensor([0.0, float("nan")]), r"t: contains NaN or Inf"),
        (torch.tensor([0.0, float("inf")]), r"t: contains NaN or Inf"),
    ],
)
def test_bad_t(t, match):
    with pytest.raises(ValueError, match=match):
        pn.solve(f, Y0, t)


def test_t_as_list_and_decreasing_are_fine():
    sol = pn.solve(f, Y0, [0.0, 0.5, 1.0])
    assert sol.ys.shape == (3, 2)
    sol = pn.solve(f, Y0, [1.0, 0.0])
    assert sol.retcode == "Success"


def test_f_wrong_shape():
    with pytest.raises(
        ValueError, match=r"f\(t, y\): returned shape \(3,\), but the state has shape \(2,\)"
    ):
        pn.solve(lambda t, y: torch.ones(3, dtype=torch.float64), Y0, T)


def test_f_wrong_dtype():
    with pytest.raises(
        TypeError, match=r"f\(t, y\): returned dtype torch.float32, but the state is torch.float64"
    ):
        pn.solve(lambda t, y: y.float(), Y0, T)


def test_f_not_a_tensor():
    with pytest.raises(TypeError, match=r"f\(t, y\): returned list"):
        pn.solve(lambda t, y: [0.0, 0.0], Y0, T)


def test_f_wrong_for_tuple_state():
    with pytest.raises(
        ValueError, match=r"f: returned Tensor; for a tuple state it must return a tuple of 2"
    ):
        pn.solve(lambda t, s: s[0], (Y0, Y0), T)
    with pytest.raises(ValueError, match=r"f\(t, y\)\[1\]: returned shape"):
        pn.solve(lambda t, s: (s[0], s[1][:1]), (Y0, Y0), T)


def test_f_not_callable():
    with pytest.raises(TypeError, match=r"f: must be callable"):
        pn.solve(3, Y0, T)


def test_unknown_solver_lists_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown name 'rk45'; valid names are: .*dop853.*tsit5.*vern7"
    ):
        pn.solve(f, Y0, T, "rk45")
    with pytest.raises(ValueError, match=r"unknown name 'nope'; valid names are"):
        pn.odeint(f, Y0, T, method="nope")


def test_solver_class_instead_of_instance():
    with pytest.raises(TypeError, match=r"solver: got the class DP8; pass an instance"):
        pn.solve(f, Y0, T, pn.DP8)
    with pytest.raises(TypeError, match=r"solver: expected a solver"):
        pn.solve(f, Y0, T, 3)


def test_fixed_step_without_dt():
    with pytest.raises(
        ValueError, match=r"dt: fixed-step integration \(adaptive=False\) needs a step size"
    ):
        pn.solve(f, Y0, T, pn.RK4(), adaptive=False)


@pytest.mark.parametrize("cls", [pn.Euler, pn.RK4])
def test_adaptive_with_a_solver_without_error_estimate(cls):
    with pytest.raises(
        ValueError, match=rf"solver: {cls.__name__} has no error estimate.*adaptive=False"
    ):
        pn.solve(f, Y0, T, cls())


@pytest.mark.parametrize("dt", [0.0, float("nan"), float("inf")])
def test_bad_dt(dt):
    with pytest.raises(ValueError, match=r"dt: must be a finite non-zero step size"):
        pn.solve(f, Y0, T, pn.RK4(), dt=dt, adaptive=False)


def test_bad_dt_type():
    with pytest.raises(TypeError, match=r"dt: expected a positive number"):
        pn.solve(f, Y0, T, pn.RK4(), dt=[0.1], adaptive=False)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(rtol=-1e-3), ValueError, r"rtol: must be a finite non-negative number"),
        (dict(atol=float("nan")), ValueError, r"atol: must be a finite non-negative number"),
        (dict(rtol="tight"), TypeError, r"rtol: expected a float or a tensor"),
        (
            dict(atol=torch.tensor([1e-6, 1e-6, 1e-6])),
            ValueError,
            r"atol: shape \(3,\) does not broadcast",
        ),
        (
            dict(rtol=torch.tensor([1e-6, -1.0])),
            ValueError,
            r"rtol: must be finite and non-negative",
        ),
        (dict(max_steps=0), ValueError, r"max_steps: must be a positive int"),
        (dict(adaptive="yes"), TypeError, r"adaptive: expected True or False"),
        (dict(backend="jax"), ValueError, r"backend: unknown backend 'jax'"),
        (dict(args=3), TypeError, r"args: must be a tuple"),
    ],
)
def test_bad_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        pn.solve(f, Y0, T, **kw)


def test_dense_query_without_dense_output():
    sol = pn.solve(f, Y0, T, dense=False)
    with pytest.raises(ValueError, match=r"sol\(tq\): this solution kept no dense output"):
        sol(0.5)


# ------------------------------------------------------------------------------------------------
# issue 16: options that used to be accepted silently or failed with a raw error


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(rtol=0.0, atol=0.0), ValueError, r"rtol, atol: both are 0"),
        (
            dict(rtol=torch.tensor([1e-6, 0.0]), atol=0.0),
            ValueError,
            r"rtol, atol: both are 0 \(in some component\)",
        ),
        (dict(throw="False"), TypeError, r"throw: expected True or False, got 'False'"),
        (dict(progress="yes"), TypeError, r"progress: expected True or False, got 'yes'"),
        (
            dict(dense="yes"),
            TypeError,
            r"dense: expected True or False \(or None for the default\), got 'yes'",
        ),
        (dict(dtmin=float("nan")), ValueError, r"dtmin: must be a finite number >= 0"),
        (dict(dtmin=-1e-3), ValueError, r"dtmin: must be a finite number >= 0"),
        (dict(dtmin="a"), TypeError, r"dtmin: expected a number"),
        (dict(dtmax=float("nan")), ValueError, r"dtmax: must be a positive number"),
        (dict(dtmax=0.0), ValueError, r"dtmax: must be a positive number"),
        (dict(dtmax="big"), TypeError, r"dtmax: expected a number"),
        (dict(dtmin=0.5, dtmax=0.1), ValueError, r"dtmin, dtmax: dtmin=0.5 exceeds dtmax=0.1"),
        (
            dict(controller="pi"),
            TypeError,
            r"controller: expected a step-size controller such as pn.PIController",
        ),
        (dict(max_steps=2.5), TypeError, r"max_steps: expected a positive int, got 2.5"),
        (dict(max_steps=True), TypeError, r"max_steps: expected a positive int"),
    ],
)
def test_bad_options_issue16(kw, exc, match):
    with pytest.raises(exc, match=match):
        pn.solve(f, Y0, T, **kw)


def test_numpy_integers_and_bools_are_accepted():
    np = pytest.importorskip("numpy")
    sol = pn.solve(f, Y0, T, max_steps=np.int64(1000), throw=np.bool_(True), dense=np.bool_(False))
    assert sol.retcode == "Success"
    assert torch.allclose(sol.ys[-1], Y0 * math.exp(-1.0), rtol=1e-5)
    with pytest.raises(pn.SolveError, match="max_steps=3"):
        pn.solve(f, Y0, T, max_steps=np.int32(3))


def test_dtmax_is_honoured():
    sol = pn.solve(f, Y0, T, dtmax=0.01)
    assert sol.stats["naccept"] >= 100


@pytest.mark.parametrize("which", ["y0", "t", "tuple"])
def test_meta_device_inputs(which):
    meta_y = torch.ones(2, dtype=torch.float64, device="meta")
    y0, t = Y0, T
    if which == "y0":
        y0 = meta_y
    elif which == "tuple":
        y0 = (meta_y, meta_y)
    else:
        t = torch.tensor([0.0, 1.0], dtype=torch.float64, device="meta")
    name = {"y0": "y0", "t": "t", "tuple": r"y0\[0\]"}[which]
    with pytest.raises(ValueError, match=rf"{name}: is on the meta device"):
        pn.solve(f, y0, t)


def test_f_changing_its_output_shape_mid_solve():
    calls = [0]

    def g(t, y):
        calls[0] += 1
        return -y if calls[0] < 5 else -y[:1]  # (1,) would broadcast silently into the stages

    msg = r"f\(t, y\): returned shape \(1,\) \(it changed during the solve\)"
    with pytest.raises(ValueError, match=msg):
        pn.solve(g, Y0, T)


@pytest.mark.parametrize(
    "S", [pn.Tsit5, pn.Rodas5P, pn.KenCarp4, pn.QNDF], ids=lambda S: S.__name__
)
def test_f_modifying_y_in_place(S):
    def g(t, y):
        y.mul_(1.0)  # even a no-op write bumps the version counter
        return -y

    with pytest.raises(ValueError, match=r"f: modified its input y in place"):
        pn.solve(g, Y0.clone(), T, S())

    def h(t, y):  # the silent corruption the issue reported: a write that changes the state
        y[0] = 0.0
        return -y

    for y0 in (Y0.clone(), Y0.clone().requires_grad_(True)):
        with pytest.raises(ValueError, match=r"f: modified its input y in place"):
            pn.solve(h, y0, T, S())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("S", [pn.Rodas5P, pn.KenCarp4, pn.QNDF], ids=lambda S: S.__name__)
def test_half_precision_with_implicit_solvers(dtype, S):
    msg = rf"y0: dtype {dtype} is not supported by the implicit solver {S.__name__}.*y0.float\(\)"
    with pytest.raises(TypeError, match=msg):
        pn.solve(f, Y0.to(dtype), T, S())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stall_is_not_success(dtype):
    """Default tolerances are far below the dtype's resolution: the steps used to round away and
    the solve returned y0 with Success. Now it fails and names the dtype (never an implicit
    solver)."""
    with pytest.raises(pn.SolveError, match=rf"{dtype}") as e:
        pn.solve(f, Y0.to(dtype), torch.tensor([0.0, 1.0, 2.0]))
    assert "Rodas5P" not in str(e.value) and e.value.retcode == "DtLessThanMin"
    # tolerances the dtype resolves
    sol = pn.solve(f, Y0.to(dtype), torch.tensor([0.0, 1.0, 2.0]), rtol=1e-2, atol=1e-2)
    assert sol.retcode == "Success"
    assert (sol.ys[-1].double() - Y0 * math.exp(-2.0)).abs().max() <= 3e-2  # a few atol


@pytest.mark.parametrize(
    "S", [pn.KenCarp4, pn.Kvaerno5, pn.QNDF, pn.Rodas5P, pn.TRBDF2], ids=lambda S: S.__name__
)
def test_nan_from_f_in_implicit_solvers_is_unstable(S):
    def g(t, y):
        return -y if float(t) < 0.5 else y * float("nan")

    with pytest.raises(pn.SolveError, match=r"NaN/Inf") as e:
        pn.solve(g, Y0, T, S())
    assert e.value.retcode == "Unstable"
    assert "try an implicit solver" not in str(e.value)
