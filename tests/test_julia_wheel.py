"""A built wheel, installed non-editable into a temporary folder, finds the Julia bridge files.

Builds with the installed setuptools (no network: ``--no-build-isolation``), installs with
``pip install --no-deps --target`` and imports pyneuralode from there in a fresh interpreter
whose working directory is outside the repository, so only the installed copy can be found.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pip(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip(
        "setuptools", reason="building the wheel needs setuptools (pip install setuptools)"
    )
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "pyneuralode",
        src / "pyneuralode",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    dist = tmp_path_factory.mktemp("dist")
    r = _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src), cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = dist.glob("pyneuralode-*.whl")
    return whl


def test_wheel_contains_the_julia_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (
        "pyneuralode/juliapkg.json",
        "pyneuralode/julia/juliapkg-cuda.json",
        "pyneuralode/julia/jl/PyNeuralODEBridge.jl",
        "pyneuralode/julia/jl/PyNeuralODEBridgeCUDA.jl",
    ):
        assert f in names, f
    with zipfile.ZipFile(wheel) as z:
        assert (
            z.read("pyneuralode/julia/jl/PyNeuralODEBridge.jl")
            == (ROOT / "julia" / "PyNeuralODEBridge.jl").read_bytes()
        )


def test_installed_wheel_finds_the_bridge(wheel, tmp_path):
    site = tmp_path / "site"
    r = _pip(
        "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    code = (
        "import pyneuralode, pyneuralode.julia._session as s, pyneuralode.julia._doctor as d; "
        "print(pyneuralode.__file__); print(s.bridge_path()); "
        "print(s.bridge_path('PyNeuralODEBridgeCUDA.jl')); "
        "print(d.run(print_fn=lambda x: None, start=False)['bridge'])"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYNEURALODE_JULIA_BRIDGE")
    }
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    init, bridge, cuda, doctor = out.stdout.split()
    assert Path(init).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(bridge) == site / "pyneuralode" / "julia" / "jl" / "PyNeuralODEBridge.jl"
    assert Path(cuda) == site / "pyneuralode" / "julia" / "jl" / "PyNeuralODEBridgeCUDA.jl"
    assert Path(doctor) == Path(bridge)
    assert Path(bridge).read_bytes() == (ROOT / "julia" / "PyNeuralODEBridge.jl").read_bytes()
    assert (
        site / "pyneuralode" / "juliapkg.json"
    ).is_file()  # juliapkg finds it next to the package
