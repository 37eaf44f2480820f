"""The adjoint benchmarks run (--quick, written to gitignored *_quick.md files) and their tables
show what the README claims: flat memory for the adjoints, gradients that agree, errors that follow
the tolerance."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _run(name, timeout=600):
    subprocess.run(
        [sys.executable, f"benchmarks/{name}.py", "--quick"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    return (RESULTS / f"{name}_quick.md").read_text()


def _table(md, after):
    """Rows of the first Markdown table after the line containing ``after``: {first cell:
    [cells]}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    rows, n = {}, 0
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            n += 1
            if n > 2:  # after the header and the separator
                cells = [c.strip() for c in line.strip("|").split("|")]
                rows[cells[0]] = cells[1:]
        elif n:
            break
    return rows


def test_adjoint_speed_quick_gradients_agree():
    pytest.importorskip("torchdiffeq", reason="the speed benchmark compares with torchdiffeq")
    rows = _table(_run("adjoint_speed"), "### Problem `plain`")
    for name in (
        "DirectAdjoint",
        "DirectAdjoint(checkpoints=16)",
        "BacksolveAdjoint",
        "InterpolatingAdjoint",
        "QuadratureAdjoint",
        "torchdiffeq odeint_adjoint",
    ):
        fwd, bwd, cpu_ms, wall_ms, ratio, ratio_sn, gdiff = rows[name]
        assert float(cpu_ms) > 0 and float(ratio) > 0
        assert float(gdiff) < 1e-4, (name, gdiff)  # every route computes the same gradient
    assert rows["DirectAdjoint"][1] == "0" and int(rows["BacksolveAdjoint"][1]) > 0


def test_adjoint_accuracy_quick_follows_the_tolerance():
    rows = _table(_run("adjoint_accuracy"), "Relative gradient error")
    assert len(rows) >= 6
    for name, (e3, e6, e9) in rows.items():
        e3, e6, e9 = float(e3), float(e6), float(e9)
        assert e9 < e6 < e3 and e9 < 1e-7, (name, e3, e6, e9)


def test_adjoint_memory_quick_is_flat_for_the_adjoints():
    rows = _table(_run("adjoint_memory"), "Peak RSS in MB")
    ratio = {name: float(cells[-1]) for name, cells in rows.items()}
    assert ratio["DirectAdjoint"] > 1.5  # grows with the steps (×15 here)
    # the checkpointed DirectAdjoint keeps 16 states and one replayed segment's graph: far less
    # growth
    growth = {name: float(cells[-2]) - float(cells[0]) for name, cells in rows.items()}
    assert growth["DirectAdjoint(checkpoints=16)"] < 0.4 * growth["DirectAdjoint"], growth
    for name in (
        "BacksolveAdjoint",
        "InterpolatingAdjoint(n_checkpoints=8)",
        "QuadratureAdjoint(checkpointing, n_checkpoints=8)",
    ):
        assert ratio[name] < 1.10, (name, ratio[name])  # the target: within 10%
