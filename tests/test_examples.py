"""The single-file examples run end to end (their quick settings) and print what they promise."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=300):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_spiral_quick_writes_plot(tmp_path):
    png = tmp_path / "spiral.png"
    stdout = _run(["examples/spiral.py", "--quick", "--out", str(png)])
    loss = float(re.search(r"final L1 loss on the whole trajectory: ([0-9.eE+-]+)", stdout).group(1))
    assert math.isfinite(loss) and loss < 2.0
    assert png.stat().st_size > 10_000


def test_deq_2x_example_learns_the_map():
    stdout = _run(["examples/deq_2x.py"])
    value = float(re.search(r"deq\(-5\) = (-?[0-9.]+)", stdout).group(1))
    assert abs(value + 10.0) < 0.1


def test_bouncing_ball_fits_through_event_times(tmp_path):
    png = tmp_path / "ball.png"
    stdout = _run(["examples/bouncing_ball.py", "--quick", "--out", str(png)])
    m = re.search(r"fitted h = ([0-9.]+) .*, e = ([0-9.]+) .*impact-time MSE ([0-9.eE+-]+)", stdout)
    h, e, mse = (float(x) for x in m.groups())
    # from the guesses h = 5, e = 0.9 towards the truth h = 8, e = 0.7 through gradients of the event times
    assert abs(h - 8.0) < 2.0 and abs(e - 0.7) < 0.1 and mse < 0.05
    assert png.stat().st_size > 10_000


def test_stiff_kinetics_fits_rate_constants_through_rodas5p(tmp_path):
    png = tmp_path / "kin.png"
    stdout = _run(["examples/stiff_kinetics.py", "--quick", "--out", str(png)])
    steps = int(re.search(r"Rodas5P to t = 1e5: (\d+) steps", stdout).group(1))
    assert steps < 400  # a stiff solver: explicit methods need hundreds of thousands
    m = re.search(r"max \|log k − log k_true\| = ([0-9.]+) \(start ([0-9.]+)\); loss ([0-9.eE+-]+) → ([0-9.eE+-]+)", stdout)
    err, start, loss0, loss1 = (float(x) for x in m.groups())
    # gradients through the stiff solve move all three rate constants towards the truth
    assert err < 0.5 * start and loss1 < 0.1 * loss0
    assert png.stat().st_size > 10_000
