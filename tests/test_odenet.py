"""ODE-Net / RK-Net / ResNet / ablation for MNIST (Table 1) and their repro modules. No network."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import pyneuralode as pn
from pyneuralode.nn.odenet import MNISTNet, ODEBlock, ODENetFunc, PreActResBlock

PARAMS = {"odenet": 208_266, "rknet": 208_266, "resnet": 576_778, "none": 132_874}


@pytest.mark.parametrize("variant", list(PARAMS))
def test_parameter_counts_and_shapes(variant):
    torch.manual_seed(0)
    m = MNISTNet(variant)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[variant]
    out = m(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    if variant in ("odenet", "rknet"):
        assert m.nfe_forward > 0
    else:
        assert m.nfe_forward is None and m.nfe_backward is None


class _Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A)
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return y @ self.A.T


def test_odeblock_matches_matrix_exponential():
    torch.manual_seed(1)
    A = torch.randn(3, 3, dtype=torch.float64) * 0.7
    blk = ODEBlock(_Linear(A), t_end=1.0, rtol=1e-10, atol=1e-12)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(blk(y0), y0 @ torch.linalg.matrix_exp(A).T, rtol=1e-8, atol=1e-9)
    assert blk.nfe_forward == blk.last_stats["nfe"] > 0
    # looser tolerance: fewer evaluations
    loose = ODEBlock(_Linear(A), rtol=1e-3, atol=1e-3)
    loose(y0)
    assert loose.nfe_forward < blk.nfe_forward


def test_rknet_is_four_rk4_steps():
    torch.manual_seed(2)
    m = MNISTNet("rknet", rk_steps=4).double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    h = m.downsampling(x)
    f = m.features.func
    dt = 0.25
    for i in range(4):
        t = torch.tensor(i * dt, dtype=torch.float64)
        k1 = f(t, h)
        k2 = f(t + dt / 2, h + dt / 2 * k1)
        k3 = f(t + dt / 2, h + dt / 2 * k2)
        k4 = f(t + dt, h + dt * k3)
        h = h + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(m(x), m.head(h), rtol=1e-10, atol=1e-12)
    assert m.nfe_forward >= 16


def test_odenet_func_time_channel_matters():
    torch.manual_seed(3)
    f = ODENetFunc(8).double()
    h = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    a, b = (
        f(torch.tensor(0.0, dtype=torch.float64), h),
        f(torch.tensor(1.0, dtype=torch.float64), h),
    )
    assert a.shape == h.shape and not torch.allclose(a, b)
    assert f.nfe == 2


def test_preact_resblock_identity_when_convs_zero():
    blk = PreActResBlock(8)
    torch.nn.init.zeros_(blk.conv2.weight)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(blk(x), x)


@pytest.mark.parametrize("sensealg", ["direct", "backsolve", "interpolating"])
def test_block_gradient_matches_matrix_exponential(sensealg):
    torch.manual_seed(4)
    A0 = torch.randn(3, 3, dtype=torch.float64) * 0.5
    y0 = torch.randn(2, 3, dtype=torch.float64)
    A_ref = A0.clone().requires_grad_(True)
    (y0 @ torch.linalg.matrix_exp(A_ref).T).square().sum().backward()
    func = _Linear(A0.clone())
    blk = ODEBlock(func, rtol=1e-10, atol=1e-10, sensealg=sensealg)
    blk(y0).square().sum().backward()
    torch.testing.assert_close(func.A.grad, A_ref.grad, rtol=1e-6, atol=1e-8)
    if sensealg == "direct":
        assert blk.nfe_backward == 0
    else:  # the adjoint re-evaluates f on the way back
        assert blk.nfe_backward > 0


def test_finite_difference_gradient_odenet_func():
    torch.manual_seed(5)
    func = ODENetFunc(4).double()
    # fixed RK4 steps (RK-Net): the discrete map is smooth in the weights, so central differences
    # must match autograd closely (adaptive steps move with the weights, which DirectAdjoint
    # ignores)
    blk = ODEBlock(func, solver=pn.RK4(), adaptive=False, dt=0.25)
    y0 = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    w = func.conv2.layer.weight  # conv1's bias would be cancelled by the GroupNorm after it
    blk(y0).square().sum().backward()
    g = w.grad[1, 2, 0, 1].item()
    eps = 1e-6
    with torch.no_grad():
        w[1, 2, 0, 1] += eps
        up = blk(y0).square().sum().item()
        w[1, 2, 0, 1] -= 2 * eps
        dn = blk(y0).square().sum().item()
        w[1, 2, 0, 1] += eps
    fd = (up - dn) / (2 * eps)
    assert abs(g) > 1e-3 and math.isclose(g, fd, rel_tol=1e-7), (g, fd)


def test_bad_inputs():
    with pytest.raises(ValueError, match="variant"):
        MNISTNet("vgg")
    with pytest.raises(ValueError, match="rk_steps"):
        MNISTNet("rknet", rk_steps=0)
    with pytest.raises(ValueError, match="sensealg"):
        MNISTNet("odenet", sensealg="magic")
    with pytest.raises(ValueError, match="x"):
        MNISTNet("none")(torch.rand(2, 28, 28))
    with pytest.raises(TypeError, match="nfe"):
        ODEBlock(torch.nn.Linear(2, 2))


def test_saved_memory_ordering():
    from pyneuralode.repro.table1_mnist import saved_tensor_bytes

    torch.manual_seed(6)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    mb = {v: saved_tensor_bytes(MNISTNet(v), x, y) for v in ("none", "resnet", "rknet", "odenet")}
    # backprop through 4 RK4 steps (16 evaluations of two convs) keeps more than 6 residual blocks,
    # which keep more than no block at all
    assert mb["rknet"] > mb["resnet"] > mb["none"] > 0
    adj = saved_tensor_bytes(MNISTNet("odenet", sensealg="backsolve"), x, y)
    # the adjoint keeps O(1) memory: about the ablation's plus the block's input/output
    assert adj < mb["odenet"] / 3 and adj < mb["resnet"]
    assert adj - mb["none"] < 4 * 8 * 64 * 6 * 6 * 4


def test_random_crop_windows():
    from pyneuralode.repro.odenet_mnist import random_crop

    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    torch.testing.assert_close(random_crop(x, 0), x)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    xp = F.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [xp[b, :, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    from pyneuralode.data.mnist import synthetic_mnist, write_idx

    root = tmp_path_factory.mktemp("mnist_idx")
    d = synthetic_mnist(n_train=180, n_val=1, n_test=64, seed=0)
    for kind, prefix in (("train", "train"), ("test", "t10k")):
        X, y = d[kind]
        write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz", (X[:, 0] * 255).round().to(torch.uint8).numpy()
        )
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y.to(torch.uint8).numpy())
    return root


def _opts(out, **kw):
    base = dict(
        quick=True, epochs=None, device="cpu", out=out, seed=0, no_progress=True, max_batches=3
    )
    base.update(kw)
    return argparse.Namespace(**base)


def _finite(v):
    return v is not None and math.isfinite(v)


def test_repro_odenet_mnist_quick(tmp_path, idx_dir):
    import json

    from pyneuralode.repro import odenet_mnist

    m = odenet_mnist.run(_opts(tmp_path, mnist_dir=str(idx_dir)))
    for k in (
        "test_accuracy",
        "test_error",
        "val_accuracy",
        "nfe_forward",
        "nfe_backward",
        "train_seconds",
        "final_train_loss",
    ):
        assert _finite(m[k]), k
    assert (
        m["params"] == 208_266 and m["data"] == "mnist" and m["steps"] == 3 and m["n_train"] == 150
    )
    assert 0 <= m["test_accuracy"] <= 1 and m["nfe_forward"] > 0
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test_accuracy"] == pytest.approx(m["test_accuracy"])
    assert (tmp_path / "training.png").stat().st_size > 0 and (tmp_path / "model.pt").is_file()


def test_repro_odenet_mnist_synthetic_source(tmp_path):
    from pyneuralode.repro import odenet_mnist

    m = odenet_mnist.run(_opts(tmp_path, data="synthetic", max_batches=2, solver="bs3", tol=1e-2))
    assert (
        m["data"] == "synthetic"
        and m["solver"] == "BS3"
        and m["tol"] == 1e-2
        and m["n_train"] == 384
    )
    assert _finite(m["test_accuracy"]) and m["nfe_forward"] > 0


def test_repro_table1_quick(tmp_path, idx_dir):
    from pyneuralode.repro import table1_mnist

    m = table1_mnist.run(_opts(tmp_path, mnist_dir=str(idx_dir), max_batches=2))
    for v in ("resnet", "rknet", "odenet", "none"):
        assert m[f"params_{v}"] == PARAMS[v]
        assert (
            _finite(m[f"test_error_{v}"])
            and _finite(m[f"saved_mb_{v}"])
            and _finite(m[f"seconds_per_batch_{v}"])
        )
    assert m["nfe_forward_rknet"] == 17 and m["nfe_backward_rknet"] == 0
    assert m["nfe_forward_resnet"] is None
    text = (tmp_path / "table1.md").read_text()
    assert "| ODE-Net |" in text and "208,266" in text and "576,778" in text
    assert (tmp_path / "table1.png").is_file()


def test_repro_via_cli(tmp_path, idx_dir):
    import json

    cli = pytest.importorskip("pyneuralode.repro.cli", reason="the repro CLI module is not there")
    rc = cli.main(
        [
            "repro",
            "odenet-mnist",
            "--quick",
            "--out",
            str(tmp_path),
            "--mnist-dir",
            str(idx_dir),
            "--max-batches",
            "2",
            "--solver",
            "bs3",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["steps"] == 2 and m["solver"] == "BS3" and _finite(m["test_accuracy"])


def test_repro_bad_options(tmp_path, idx_dir):
    from pyneuralode.repro import odenet_mnist, table1_mnist

    with pytest.raises(ValueError, match="--batch-size"):
        odenet_mnist.run(_opts(tmp_path, mnist_dir=str(idx_dir), batch_size=0))
    with pytest.raises(ValueError, match="--models"):
        table1_mnist.run(_opts(tmp_path, mnist_dir=str(idx_dir), models="resnet,vgg"))


def test_repro_paper_schedule_quick(tmp_path):
    from pyneuralode.repro import odenet_mnist

    m = odenet_mnist.run(
        _opts(tmp_path, data="synthetic", schedule="paper", max_batches=2, solver="bs3", tol=1e-2)
    )
    # SGD lr 0.1 scaled by batch/128 (quick batch 32); --quick shortens the 160 epochs to 1
    assert (
        m["schedule"] == "paper"
        and m["lr"] == pytest.approx(0.025)
        and m["epochs"] == 1
        and m["steps"] == 2
    )
    assert _finite(m["test_accuracy"])
