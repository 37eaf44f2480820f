"""Toy data: 2-D densities (shapes, analytic moments) and the irregular spirals."""

import math

import pytest
import torch

from pyneuralode.data import TOY2D_NAMES, make_spirals, observation_mask, sample_toy2d

N = 200_000


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_shapes_dtype_reproducible(name):
    x = sample_toy2d(name, 1000, seed=3)
    assert x.shape == (1000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, sample_toy2d(name, 1000, seed=3))
    assert not torch.equal(x, sample_toy2d(name, 1000, seed=4))
    assert x.abs().max() < 8


# analytic first and second moments (mean, E|x|^2); se from N samples
MOMENTS = {
    "moons": ((0.0, 0.3), None),
    "circles": ((0.0, 0.0), 9 * (0.5 * 1.0 + 0.5 * 0.25 + 2 * 0.08**2)),
    "8gaussians": ((0.0, 0.0), (16 + 2 * 0.25) / 1.414**2),
    "checkerboard": ((0.0, 0.0), 2 * 16 / 3),
    "pinwheel": ((0.0, 0.0), None),
}


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_moments(name):
    x = sample_toy2d(name, N, seed=0, dtype=torch.float64)
    mean, m2 = MOMENTS[name]
    se = x.std(0) / math.sqrt(N)
    assert ((x.mean(0) - torch.tensor(mean, dtype=torch.float64)).abs() < 5 * se).all(), x.mean(0)
    if m2 is not None:
        r2 = x.pow(2).sum(1)
        assert abs(float(r2.mean()) - m2) < 5 * float(r2.std()) / math.sqrt(N)


def test_circles_and_moons_geometry():
    c = sample_toy2d("circles", 20000, seed=1, dtype=torch.float64)
    r = c.norm(dim=1)
    # two rings of radius 3 and 1.5, equally weighted
    assert abs(float((r > 2.25).double().mean()) - 0.5) < 0.01
    assert (
        abs(float(r[r > 2.25].median()) - 3.0) < 0.05
        and abs(float(r[r < 2.25].median()) - 1.5) < 0.05
    )
    g8 = sample_toy2d("8gaussians", 20000, seed=1, dtype=torch.float64)
    ang = torch.atan2(g8[:, 1], g8[:, 0])
    counts = torch.histc(
        torch.remainder(ang + math.pi / 8, 2 * math.pi), bins=8, min=0, max=2 * math.pi
    )
    assert (counts / 20000 - 0.125).abs().max() < 0.015


def test_bad_toy_arguments():
    with pytest.raises(ValueError, match="name"):
        sample_toy2d("swissroll2", 10)
    with pytest.raises(ValueError, match="n:"):
        sample_toy2d("moons", 0)
    assert sample_toy2d("two-moons", 5, seed=0).shape == (5, 2)


def test_spirals_protocol():
    d = make_spirals(n_spirals=100, n_window=200, seed=0)
    assert (
        d["ts"].shape == (200,)
        and d["clean"].shape == (100, 200, 2)
        and d["noisy"].shape == (100, 200, 2)
    )
    assert int(d["clockwise"].sum()) == 50
    assert torch.allclose(
        d["ts"][1:] - d["ts"][:-1], torch.full((199,), 6 * math.pi / 999), atol=1e-5
    )
    noise = (d["noisy"] - d["clean"]).double()
    assert abs(float(noise.std()) - 0.3) < 0.01 and abs(float(noise.mean())) < 0.01
    # counter-clockwise spirals are centred at (+5, 0) with r = 0.3 θ; clockwise ones at (-5, 0)
    cc = d["clean"][~d["clockwise"]].double()
    assert (cc[..., 0] > 5 - 0.3 * 6 * math.pi - 1e-4).all()
    r = (cc - torch.tensor([5.0, 0.0], dtype=torch.float64)).norm(dim=-1)
    assert (r[:, 1:] > r[:, :-1]).all()  # r grows with θ
    cw = d["clean"][d["clockwise"]].double()
    rcw = (cw - torch.tensor([-5.0, 0.0], dtype=torch.float64)).norm(dim=-1)
    assert (rcw[:, 1:] < rcw[:, :-1]).all()  # spirals inwards
    m = observation_mask(100, 100, 30, seed=1)
    assert m.shape == (100, 100) and (m.sum(1) == 30).all()
    assert not torch.equal(m[0], m[1])
    with pytest.raises(ValueError, match="n_obs"):
        observation_mask(3, 10, 11)
