"""Every bad input of the API raises a clear ValueError/TypeError naming the argument."""
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
        ((torch.ones(2), torch.ones(2, dtype=torch.int32)), TypeError, r"y0\[1\]: dtype torch.int32"),
        ((torch.ones(2), torch.ones(2, dtype=torch.float64)), TypeError, r"y0\[1\]: all tuple components"),
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
    with pytest.raises(ValueError, match=r"f\(t, y\): returned shape \(3,\), but the state has shape \(2,\)"):
        pn.solve(lambda t, y: torch.ones(3, dtype=torch.float64), Y0, T)


def test_f_wrong_dtype():
    with pytest.raises(TypeError, match=r"f\(t, y\): returned dtype torch.float32, but the state is torch.float64"):
        pn.solve(lambda t, y: y.float(), Y0, T)


def test_f_not_a_tensor():
    with pytest.raises(TypeError, match=r"f\(t, y\): returned list"):
        pn.solve(lambda t, y: [0.0, 0.0], Y0, T)


def test_f_wrong_for_tuple_state():
    with pytest.raises(ValueError, match=r"f: returned Tensor; for a tuple state it must return a tuple of 2"):
        pn.solve(lambda t, s: s[0], (Y0, Y0), T)
    with pytest.raises(ValueError, match=r"f\(t, y\)\[1\]: returned shape"):
        pn.solve(lambda t, s: (s[0], s[1][:1]), (Y0, Y0), T)


def test_f_not_callable():
    with pytest.raises(TypeError, match=r"f: must be callable"):
        pn.solve(3, Y0, T)


def test_unknown_solver_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown name 'rk45'; valid names are: .*dop853.*tsit5.*vern7"):
        pn.solve(f, Y0, T, "rk45")
    with pytest.raises(ValueError, match=r"unknown name 'nope'; valid names are"):
        pn.odeint(f, Y0, T, method="nope")


def test_solver_class_instead_of_instance():
    with pytest.raises(TypeError, match=r"solver: got the class DP8; pass an instance"):
        pn.solve(f, Y0, T, pn.DP8)
    with pytest.raises(TypeError, match=r"solver: expected a solver"):
        pn.solve(f, Y0, T, 3)


def test_fixed_step_without_dt():
    with pytest.raises(ValueError, match=r"dt: fixed-step integration \(adaptive=False\) needs a step size"):
        pn.solve(f, Y0, T, pn.RK4(), adaptive=False)


@pytest.mark.parametrize("cls", [pn.Euler, pn.RK4])
def test_adaptive_with_a_solver_without_error_estimate(cls):
    with pytest.raises(ValueError, match=rf"solver: {cls.__name__} has no error estimate.*adaptive=False"):
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
        (dict(atol=torch.tensor([1e-6, 1e-6, 1e-6])), ValueError, r"atol: shape \(3,\) does not broadcast"),
        (dict(rtol=torch.tensor([1e-6, -1.0])), ValueError, r"rtol: must be finite and non-negative"),
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
