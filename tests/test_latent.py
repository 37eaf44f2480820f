"""LatentODE / RNN baseline: masks on the union of times equal separate per-sample solves; ELBO
terms; shapes."""

import math

import pytest
import torch

import pyneuralode as pn
from pyneuralode.nn.latent import union_times


def _samples():
    g = torch.Generator().manual_seed(0)
    times = [
        torch.tensor([0.0, 0.3, 0.9, 1.4]),
        torch.tensor([0.1, 0.3, 1.1]),
        torch.tensor([0.5, 0.7, 0.9, 1.2, 2.0]),
    ]
    values = [torch.randn(len(t), 2, generator=g) for t in times]
    return [t.double() for t in times], [v.double() for v in values]


def test_union_times():
    times, values = _samples()
    t, x, mask = union_times(times, values)
    assert torch.equal(t, torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.2, 1.4, 2.0]).double())
    assert mask.sum(1).tolist() == [4, 3, 5]
    for i in range(3):
        assert torch.equal(t[mask[i]], times[i]) and torch.equal(x[i][mask[i]], values[i])
        assert (x[i][~mask[i]] == 0).all()


def _own(t, ti, xi):
    """Sample i alone on its own times, plus the common start t[0] (unobserved) where it starts
    later: z0 and the recognition state refer to t[0] of the grid."""
    if ti[0] > t[0]:
        return (
            torch.cat([xi.new_zeros(1, 2), xi]).unsqueeze(0),
            torch.cat([t[:1], ti]),
            torch.cat(
                [torch.zeros(1, dtype=torch.bool), torch.ones(len(ti), dtype=torch.bool)]
            ).unsqueeze(0),
        )
    return xi.unsqueeze(0), ti, None


@pytest.mark.parametrize("encoder", ["rnn", "odernn"])
def test_masks_on_union_equal_separate_solves(encoder):
    torch.manual_seed(0)
    model = pn.LatentODE(encoder=encoder, rtol=1e-10, atol=1e-10).double()
    times, values = _samples()
    t, x, mask = union_times(times, values)
    mu, logvar = model.encode(x, t, mask)
    elbo = model.elbo(x, t, mask, sample=False)
    t_pred = torch.linspace(2.1, 3.0, 4, dtype=torch.float64)
    pred = model.predict(x, t, mask, t_pred)
    tol = 1e-12 if encoder == "rnn" else 1e-8
    for i in range(3):
        xi, ti, mi = _own(t, times[i], values[i])
        mu_i, lv_i = model.encode(xi, ti, mi)
        assert torch.allclose(mu[i], mu_i[0], atol=tol) and torch.allclose(
            logvar[i], lv_i[0], atol=tol
        )
        assert torch.allclose(elbo[i], model.elbo(xi, ti, mi, sample=False)[0], atol=1e-7)
        assert torch.allclose(pred[i], model.predict(xi, ti, mi, t_pred)[0], atol=1e-7)
    if encoder == "rnn":  # an RNN encoder ignores leading unobserved times altogether
        mu_1, _ = model.encode(values[1].unsqueeze(0), times[1])
        assert torch.allclose(mu[1], mu_1[0], atol=1e-12)


def test_elbo_equals_per_sample_elbo_and_formula():
    torch.manual_seed(1)
    model = pn.LatentODE(obs_std=0.5, rtol=1e-10, atol=1e-10).double()
    times, values = _samples()
    t, x, mask = union_times(times, values)
    elbo = model.elbo(x, t, mask, sample=False)
    with torch.no_grad():
        xhat, mu, logvar = model(x, t, mask, sample=False)
    # the formula, written out per sample over its own observations only
    for i in range(3):
        r = (x[i][mask[i]] - xhat[i][mask[i]]).detach() / 0.5
        ll = float((-0.5 * r.pow(2) - math.log(0.5) - 0.5 * math.log(2 * math.pi)).sum())
        kl = float(0.5 * (mu[i].detach().pow(2) + logvar[i].exp() - 1 - logvar[i]).sum())
        assert abs(float(elbo[i].detach()) - (ll - kl)) < 1e-9
    # changing an unobserved entry changes nothing
    x2 = x.clone()
    x2[~mask] = 123.0
    assert torch.allclose(model.elbo(x2, t, mask, sample=False), elbo, atol=1e-12)
    # with sample=True the reparameterised ELBO is noisy but averages to a lower value (KL fixed, ll
    # concave)
    assert torch.isfinite(model.loss(x, t, mask))


def test_latent_ode_fits_a_few_spirals():
    from pyneuralode.data import make_spirals, observation_mask

    torch.manual_seed(0)
    d = make_spirals(n_spirals=16, n_window=20, margin=50, seed=0)
    x, ts = d["noisy"][:, :20] / 5, d["ts"][:20]
    m = observation_mask(16, 20, 10, seed=0)
    model = pn.LatentODE(obs_std=0.3 / 5, rtol=1e-3, atol=1e-4)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with torch.no_grad():
        first = float(model.loss(x, ts, m))
    for _ in range(25):
        opt.zero_grad()
        model.loss(x, ts, m).backward()
        opt.step()
    with torch.no_grad():
        assert float(model.loss(x, ts, m)) < 0.5 * first


def test_rnn_baseline_masks_and_shapes():
    torch.manual_seed(0)
    rnn = pn.RNNBaseline(hidden=7).double()
    times, values = _samples()
    t, x, mask = union_times(times, values)
    t_pred = torch.tensor([2.5, 2.7, 3.0], dtype=torch.float64)
    pred = rnn.predict(x, t, mask, t_pred)
    assert pred.shape == (3, 3, 2)
    for i in range(3):
        assert torch.allclose(
            pred[i], rnn.predict(values[i].unsqueeze(0), times[i], None, t_pred)[0], atol=1e-12
        )
    # the loss is the NLL of each next observation; for one sample it is a mean over its n-1 pairs
    loss_all = rnn.loss(x, t, mask)
    per = [rnn.loss(values[i].unsqueeze(0), times[i]) for i in range(3)]
    n_pairs = torch.tensor([3.0, 2.0, 4.0], dtype=torch.float64)
    assert torch.allclose(loss_all, (torch.stack(per) * n_pairs).sum() / n_pairs.sum(), atol=1e-12)
    with pytest.raises(ValueError, match="t_pred"):
        rnn.predict(x, t, mask, torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_bad_inputs():
    model = pn.LatentODE()
    with pytest.raises(ValueError, match="x:"):
        model.encode(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="mask"):
        model.encode(torch.zeros(2, 3, 2), torch.arange(3.0), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="t:"):
        model.encode(torch.zeros(2, 3, 2), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="encoder"):
        pn.LatentODE(encoder="lstm")
