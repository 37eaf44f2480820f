"""The built wheel, installed (not editable) into a fresh virtual environment, works on its own:
import, a solve, a gradient (scripts/smoke_test.py), the console script, and the Julia doctor
finds the bridge files inside the installed package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    # --no-build-isolation: setuptools is reused from this environment (no network needed)
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        cwd=tmp,
    )
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not available to build the wheel")
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = list(dist.glob("pyneuralode-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    # --system-site-packages: torch and numpy are reused instead of downloaded; --without-pip and
    # `pip --python` (pip >= 22.3) skip ensurepip, most of the venv's set-up time
    r = _run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
        cwd=tmp,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    py = venv / "bin" / "python"
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            str(wheels[0]),
        ],
        cwd=tmp,
    )
    if (
        r.returncode != 0 and "no such option: --python" in r.stderr
    ):  # older pip: the venv's own pip
        assert _run([str(py), "-m", "ensurepip", "-q"], cwd=tmp).returncode == 0
        r = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheels[0])], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return py, tmp


def test_wheel_installs_and_solves_with_gradients(venv_python):
    py, tmp = venv_python
    r = _run(
        [str(py), str(ROOT / "scripts" / "smoke_test.py")], cwd=tmp
    )  # cwd outside the checkout
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "smoke test passed" in r.stdout and str(tmp / "venv") in r.stdout


def test_wheel_console_script(venv_python):
    py, tmp = venv_python
    r = _run([str(py.parent / "pyneuralode"), "--version"], cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.fullmatch(r"pyneuralode \d+\.\d+\.\d+\S*", r.stdout.strip())
    r = _run([str(py.parent / "pyneuralode"), "repro", "--list"], cwd=tmp)
    assert r.returncode == 0 and "latent-spiral" in r.stdout


def test_wheel_julia_doctor_finds_the_bridge_files(venv_python):
    py, tmp = venv_python
    r = _run([str(py), "-m", "pyneuralode.julia", "doctor"], cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"bridge module:\s+(\S.*)", r.stdout)
    assert m, r.stdout
    bridge = Path(m.group(1).strip())
    assert bridge.is_file(), r.stdout
    assert str(tmp / "venv") in str(bridge)  # inside the installed package, not the checkout
