"""The tree is formatted and lint-clean under the ruff configuration of pyproject.toml (ruff is in
the test extra, pinned to a minor version so that a new ruff release cannot fail CI by itself)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff():
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    return exe


@pytest.mark.parametrize(
    "args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"]
)
def test_ruff_reports_nothing(args):
    run = subprocess.run([_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"ruff {' '.join(args)} found problems:\n{run.stdout}{run.stderr}"


def test_ruff_is_configured_for_the_supported_pythons():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ruff = conf["tool"]["ruff"]
    assert ruff["line-length"] == 100
    low = conf["project"]["requires-python"].removeprefix(">=").replace(".", "")
    assert ruff["target-version"] == f"py{low}", "ruff must not rewrite code beyond requires-python"
