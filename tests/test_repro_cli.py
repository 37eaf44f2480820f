"""The `pyneuralode repro` CLI: listing, errors, and the --quick reproductions (cnf-2d,
latent-spiral, nfe-vs-tol)."""

import json
import math
import subprocess
import sys

import pytest

from pyneuralode.repro import _common
from pyneuralode.repro.cli import REPRO_NAMES, main

EXPECTED = {
    "cnf-2d": [
        "nll_cnf_exact",
        "nll_cnf_hutchinson",
        "nll_planar",
        "nll_cnf",
        "nll_cnf_rnode",
        "params_cnf",
        "params_planar",
        "nfe_eval_cnf_exact",
        "train_nfe_cnf_rnode",
    ],
    "latent-spiral": [f"rmse_{m}_{n}" for m in ("latent_ode", "rnn") for n in (30, 50, 100)],
    "nfe-vs-tol": [
        "nfe_tol_1e-01",
        "nfe_tol_1e-07",
        "time_ms_tol_1e-05",
        "error_tol_1e-03",
        "corr_time_nfe",
        "nfe_ratio_backward_forward",
        "nfe_forward_start",
        "nfe_forward_end",
        "nfe_growth",
        "ms_per_nfe",
    ],
}
PNGS = {
    "cnf-2d": ["cnf_2d_density.png", "cnf_2d_samples.png"],
    "latent-spiral": ["latent_spiral.png"],
    "nfe-vs-tol": ["nfe_vs_tol.png"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quick_repro_writes_metrics_and_plots(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["repro", name, "--quick", "--out", str(out), "--seed", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in EXPECTED[name]:
        assert key in metrics, key
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), (
            key,
            metrics[key],
        )
    for png in PNGS[name]:
        assert (out / png).stat().st_size > 1000
    assert "metrics.json" in capsys.readouterr().out


def test_quick_nfe_sweep_is_monotone(tmp_path):
    main(["repro", "nfe-vs-tol", "--quick", "--out", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    nfes = [m[f"nfe_tol_{t}"] for t in ("1e-01", "1e-03", "1e-05", "1e-07")]
    assert nfes == sorted(nfes) and nfes[-1] > nfes[0] and m["nfe_monotone_in_tol"] is True


def test_list_and_errors(tmp_path, capsys):
    assert main(["repro", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in (
        "odenet-mnist",
        "table1-mnist",
        "cnf-2d",
        "latent-spiral",
        "nfe-vs-tol",
        "deq-2x",
        "deq-mnist",
        "cdeq-mnist",
    ):
        assert name in listing and name in REPRO_NAMES
    with pytest.raises(SystemExit) as e:
        main(["repro", "no-such-thing", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown reproduction 'no-such-thing'" in err and "latent-spiral" in err
    with pytest.raises(SystemExit):
        main(["repro", "cnf-2d", "--epochs", "0", "--out", str(tmp_path)])
    assert "--epochs" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "pyneuralode", "repro", "--list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "latent-spiral" in r.stdout


def test_write_metrics_flat_and_finite(tmp_path):
    import torch

    p = _common.write_metrics(
        tmp_path / "x", {"a": torch.tensor(1.5), "b": 2, "c": float("nan"), "flag": True}
    )
    m = json.loads(p.read_text())
    assert {k: m[k] for k in ("a", "b", "c", "flag")} == {"a": 1.5, "b": 2, "c": None, "flag": True}
    # provenance keys come with every metrics file
    import pyneuralode

    assert (
        m["pyneuralode_version"] == pyneuralode.__version__
        and m["torch_version"] == torch.__version__
    )
    with pytest.raises(ValueError, match="nested"):
        _common.write_metrics(tmp_path, {"a": {"b": 1}})


def test_module_specific_flags_reach_run(tmp_path):
    out = tmp_path / "c"
    assert (
        main(
            [
                "repro",
                "cnf-2d",
                "--quick",
                "--out",
                str(out),
                "--data",
                "circles",
                "--no-rnode",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == "circles" and m["iterations"] == 2 and "nll_cnf_rnode" not in m


def test_quick_cdeq_mnist_four_rows_mean_sd_table_and_plot(tmp_path):
    from pyneuralode.repro import cdeq_mnist

    out = tmp_path / "cdeq"
    assert main(["repro", "cdeq-mnist", "--quick", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["seeds"] == "0,1" and m["epochs"] == 1 and m["batch_size"] == 32 and m["tol"] == 0.005
    for row in cdeq_mnist.MODELS:
        for key in (
            "test_accuracy",
            "test_nfe",
            "train_seconds_per_epoch",
            "predict_seconds_per_batch",
            "train_nfe_per_batch",
            "bwd_iters_per_batch",
        ):
            vals = m[f"{row}_{key}_seeds"]
            assert len(vals) == 2 and all(v > 0 for v in vals), (row, key, vals)
            mean, sd = m[f"{row}_{key}_mean"], m[f"{row}_{key}_sd"]
            assert mean == pytest.approx(sum(vals) / 2) and sd == pytest.approx(
                abs(vals[0] - vals[1]) / math.sqrt(2)
            )
    # the authors' layers: 784·128+128 (encoder) + 2·128·128 (f, no biases) + 128·10+10
    # (classifier); g adds 128·128+128
    assert m["vanilla_params_mean"] == m["skipreg_params_mean"] == m["jacreg_params_mean"] == 134538
    assert m["skip_params_mean"] == 134538 + 16512
    assert m["train_speedup_skipreg_vs_vanilla"] > 0
    table = (out / "table.md").read_text()
    assert "Skip-Reg DEQ" in table and "97.973" in table  # the paper's row beside ours
    assert (out / "cdeq_mnist.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="--models"):
        main(["repro", "cdeq-mnist", "--quick", "--models", "vanilla,resnet", "--out", str(out)])


def test_cdeq_mnist_stops_a_diverged_step_with_the_fix():
    import torch

    from pyneuralode.repro.cdeq_mnist import check_finite_step

    w = torch.nn.Parameter(torch.ones(2))
    loss = (w * 2).sum()
    loss.backward()
    check_finite_step(loss, [w], "ok")  # finite: nothing happens
    w.grad[0] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"step 3: training diverged \(a gradient .*--skip-weight"
    ):
        check_finite_step(loss, [w], "step 3")
    with pytest.raises(FloatingPointError, match="the loss is NaN"):
        check_finite_step(torch.tensor(float("inf")), [], "step 4")
