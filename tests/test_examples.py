"""The single-file examples run end to end (their quick settings) and print what they promise."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=300):
    out = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_spiral_quick_writes_plot(tmp_path):
    png = tmp_path / "spiral.png"
    stdout = _run(["examples/spiral.py", "--quick", "--out", str(png)])
    loss = float(
        re.search(r"final L1 loss on the whole trajectory: ([0-9.eE+-]+)", stdout).group(1)
    )
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
    # from the guesses h = 5, e = 0.9 towards the truth h = 8, e = 0.7 through gradients of the
    # event times
    assert abs(h - 8.0) < 2.0 and abs(e - 0.7) < 0.1 and mse < 0.05
    assert png.stat().st_size > 10_000


def test_stiff_kinetics_fits_rate_constants_through_rodas5p(tmp_path):
    png = tmp_path / "kin.png"
    stdout = _run(["examples/stiff_kinetics.py", "--quick", "--out", str(png)])
    steps = int(re.search(r"Rodas5P to t = 1e5: (\d+) steps", stdout).group(1))
    assert steps < 400  # a stiff solver: explicit methods need hundreds of thousands
    m = re.search(
        r"max \|log k − log k_true\| = ([0-9.]+) \(start ([0-9.]+)\); loss ([0-9.eE+-]+) → "
        r"([0-9.eE+-]+)",
        stdout,
    )
    err, start, loss0, loss1 = (float(x) for x in m.groups())
    # gradients through the stiff solve move all three rate constants towards the truth
    assert err < 0.5 * start and loss1 < 0.1 * loss0
    assert png.stat().st_size > 10_000


# -- first-run polish of the examples and the repro CLI (issue 24) ---------------------------------


def test_every_example_help_prints_usage_without_running(tmp_path):
    # one interpreter for all examples (imports torch once); cwd is empty so any output would show
    code = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        print('EXIT', path, e.code)\n"
        "    else:\n"
        "        print('RAN', path)\n"
    )
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.py"))
    assert len(examples) >= 6
    out = subprocess.run(
        [sys.executable, "-c", code, *examples],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for path in examples:
        assert f"EXIT {path} 0" in out.stdout, (path, out.stdout[-2000:])
    assert out.stdout.count("usage:") == len(examples)
    assert list(tmp_path.iterdir()) == []  # --help wrote nothing: the job did not run


def test_example_without_matplotlib_writes_metrics_and_skips_the_plot(tmp_path):
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None\n"  # import matplotlib -> ImportError
        "sys.argv = ['spiral.py', '--iters', '2', '--seed', '3', '--out', "
        f"{str(tmp_path / 'sp.png')!r}]\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'spiral.py')!r}, run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("matplotlib is not installed: plots skipped") == 1
    assert not (tmp_path / "sp.png").exists()
    m = json.loads((tmp_path / "sp_metrics.json").read_text())
    assert m["iterations"] == 2 and m["seed"] == 3 and math.isfinite(m["final_l1_loss"])
    assert "--iters 2" in m["command"] and m["torch_version"] and m["wall_time_s"] > 0
    # stderr is a pipe here: summary lines, not a bar redrawn with carriage returns
    assert "\r" not in out.stderr and "fit spiral: 2/2" in out.stderr


def _quick_nfe_vs_tol(out):
    from pyneuralode.repro.cli import main

    return main(
        ["repro", "nfe-vs-tol", "--quick", "--epochs", "2", "--seed", "5", "--out", str(out)]
    )


def test_repro_writes_metrics_with_provenance_before_plotting(tmp_path, monkeypatch, capsys):
    from pyneuralode.repro import nfe_vs_tol

    def broken_pyplot():
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(nfe_vs_tol, "pyplot", broken_pyplot)
    with pytest.raises(RuntimeError, match="plotting failed"):
        _quick_nfe_vs_tol(tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())  # the run survives a failed plot
    assert m["seed"] == 5 and "nfe_tol_1e-01" in m
    assert m["command"].startswith("pyneuralode repro nfe-vs-tol")
    import numpy
    import torch

    import pyneuralode

    assert (m["pyneuralode_version"], m["torch_version"], m["numpy_version"]) == (
        pyneuralode.__version__,
        torch.__version__,
        numpy.__version__,
    )
    assert "git_commit" in m and m["wall_time_s"] > 0


def test_repro_without_matplotlib_skips_plots_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _quick_nfe_vs_tol(tmp_path) == 0
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed: plots skipped") == 1
    assert (tmp_path / "metrics.json").exists() and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "name",
    [
        "odenet-mnist",
        "table1-mnist",
        "cnf-2d",
        "latent-spiral",
        "nfe-vs-tol",
        "deq-2x",
        "deq-mnist",
    ],
)
def test_repro_name_help_does_not_run(name, tmp_path, monkeypatch, capsys):
    from pyneuralode.repro.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["repro", name, "--help"])
    assert e.value.code == 0
    assert "usage: pyneuralode repro" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no runs/NAME folder: nothing ran


def test_version_flag_and_module_version_agree(capsys):
    import pyneuralode
    from pyneuralode.repro.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pyneuralode {pyneuralode.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", pyneuralode.__version__)


def test_listing_into_a_closed_pipe_ends_without_traceback():
    p = subprocess.Popen(
        [sys.executable, "-m", "pyneuralode", "repro", "--list"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    p.stdout.close()  # the reader is gone before anything is written, as with `| head -0`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    p.stderr.close()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_progress_prints_a_few_lines_when_not_a_terminal(capsys):
    from pyneuralode.repro._common import progress

    bar = progress(range(1000), desc="train")
    total = 0
    for i in bar:
        total += i
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")
    err = capsys.readouterr().err
    assert total == sum(range(1000))
    lines = err.strip().splitlines()
    assert 2 <= len(lines) <= 6 and "\r" not in err, err
    assert lines[-1].startswith("train: 1000/1000") and "loss=0.001" in lines[-1]


def test_adjoint_solve_with_progress_reports_the_backward_pass(capsys):
    import torch

    import pyneuralode as pn

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, t, y):
            return torch.tanh(self.lin(y))

    f = F()
    sol = pn.solve(
        f,
        torch.randn(2),
        torch.linspace(0, 1, 3),
        sensealg=pn.InterpolatingAdjoint(),
        progress=True,
    )
    capsys.readouterr()
    sol.ys.sum().backward()
    err = (
        capsys.readouterr().err
    )  # not a terminal here: summary lines, one set per backward interval
    assert "solve t∈[1, 0.5]" in err and "solve t∈[0.5, 0]" in err and "\r" not in err, err
    assert f.lin.weight.grad is not None
