"""The engine-vs-peers benchmark runs end to end (``--quick``) and writes a well-formed table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "engine_vs_peers.py"

pytest.importorskip(
    "torchdiffeq",
    reason=(
        "the benchmark's ratios are to torchdiffeq (pip install torchdiffeq, or the 'bench' extra)"
    ),
)
pytest.importorskip(
    "torchode",
    reason="the benchmark compares with torchode (pip install torchode, or the 'bench' extra)",
)
pytest.importorskip("scipy", reason="the benchmark compares with scipy's solve_ivp")

TORCH_ROWS = [
    "torchdiffeq dopri5",
    "pyneuralode Tsit5",
    "pyneuralode Dopri5",
    "pyneuralode Tsit5, SciML PI*",
    "pyneuralode Dopri5, SciML PI*",
    "torchode tsit5",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _cells(md: str, section: str):
    """Rows of the first table after the heading starting with ``section``: list of cell lists."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(section))
    rows, in_table = [], False
    for ln in lines[start + 1 :]:
        if ln.startswith("|"):
            in_table = True
            cells = [c.strip() for c in ln.strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif in_table:
            break
    return rows[0], rows[1:]


def _finite(cell: str) -> float:
    v = float(cell.rstrip("%"))
    assert math.isfinite(v), cell
    return v


def test_mlp_table_rows_and_numbers(quick_run):
    out, stdout = quick_run
    md = (out / "engine_vs_peers.md").read_text()
    assert md.strip() == stdout.strip()
    header, rows = _cells(md, "## (a)")
    assert header[:3] == ["dtype", "method", "NFE"]
    got = [(r[0], r[1]) for r in rows]
    assert got == [(d, m) for d in ("float32", "float64") for m in TORCH_ROWS]
    for r in rows:
        nums = [_finite(c) for c in r[2:]]
        nfe, fwd_ms, fwd_ratio, fb_ms, fb_ratio, overhead, err, gdiff = nums
        assert nfe >= 8 and nfe == int(nfe)
        assert fwd_ms > 0 and fb_ms > 0 and fwd_ratio > 0 and fb_ratio > 0
        assert 0 <= overhead <= 100
        assert err < 1e-3  # every method solved the same problem to roughly the tolerance
        assert gdiff < 1e-3  # and backprop gives the same gradient
        if r[1] == "torchdiffeq dopri5":
            assert fwd_ratio == 1.0 and fb_ratio == 1.0 and gdiff == 0.0
    # Dopri5 with the default (integral) controller makes torchdiffeq's steps on this problem;
    # SciML's PI gains are more cautious.
    nfe = {(r[0], r[1]): int(r[2]) for r in rows}
    for d in ("float32", "float64"):
        assert nfe[(d, "pyneuralode Dopri5")] <= nfe[(d, "torchdiffeq dopri5")]
        assert nfe[(d, "pyneuralode Dopri5, SciML PI*")] >= nfe[(d, "pyneuralode Dopri5")]


def test_lotka_volterra_table(quick_run):
    out, _ = quick_run
    md = (out / "engine_vs_peers.md").read_text()
    header, rows = _cells(md, "## (b)")
    assert header[:3] == ["method", "NFE", "ms per solve"]
    assert [r[0] for r in rows] == TORCH_ROWS + ["scipy RK45", "scipy DOP853"]
    for r in rows:
        nfe, ms, ratio, overhead, err = (_finite(c) for c in r[1:])
        assert nfe > 100 and ms > 0 and ratio > 0 and 0 <= overhead <= 100
        assert err < 1e-3


def test_accuracy_sweep_and_json(quick_run):
    out, _ = quick_run
    data = json.loads((out / "engine_vs_peers.json").read_text())
    assert set(data) >= {"command", "versions", "mlp", "lotka_volterra", "accuracy_sweep"}
    assert "--quick" in data["command"]
    for problem, rows in data["accuracy_sweep"].items():
        for method, cells in rows.items():
            errs = [e for _, _, e in cells]
            nfes = [n for _, n, _ in cells]
            assert all(math.isfinite(e) and e > 0 for e in errs), (problem, method)
            # tighter tolerance: more work, smaller error
            assert nfes == sorted(nfes) and errs[-1] < errs[0], (problem, method, cells)
    for dt_rows in data["mlp"].values():
        for r in dt_rows.values():
            assert all(math.isfinite(v) for v in r.values())
