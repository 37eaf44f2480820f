"""Ensembles on the compiled path (``pyneuralode.compiled.solve_ensemble`` and ``pn.solve(...,
compile=True)`` with a ``batched=True`` solver): equality with separate compiled solves (bitwise:
the same generated loop per system, its own steps and statistics), agreement with the native
``batched=True`` solve to the tolerance, per-system return codes, and the clear errors.
"""

import pytest
import torch

import pyneuralode as pn
from pyneuralode.compiled import numba_available

pytestmark = pytest.mark.skipif(
    not numba_available(), reason="numba is not installed (pip install 'pyneuralode[compiled]')"
)

F64 = dict(dtype=torch.float64)


def robertson_rows(t, Y, K, s):
    """Robertson for a batch of systems: rows of Y and K per system, the scale s shared."""
    y1, y2, y3 = Y[:, 0], Y[:, 1], Y[:, 2]
    k1, k2, k3 = K[:, 0], K[:, 1], K[:, 2]
    return s * torch.stack(
        [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2], 1
    )


B = 4
K = torch.tensor([0.04, 3e7, 1e4], **F64) * torch.tensor(
    [[1.0, 1.0, 1.0], [1.5, 0.7, 1.2], [0.6, 1.4, 0.8], [1.2, 1.1, 0.6]], **F64
)
S = torch.tensor([1.0, 1.0, 1.0], **F64)  # shared (its leading dimension 3 is not B)
Y0 = torch.tensor([[1.0, 0.0, 0.0]], **F64).repeat(B, 1)
Y0[3] = torch.tensor([0.9, 0.0, 0.1], **F64)
T = torch.tensor([0.0, 0.5, 10.0, 400.0], **F64)
TOL = dict(rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def ensemble():
    with torch.no_grad():
        return pn.compiled.solve_ensemble(
            robertson_rows, Y0, T, pn.Rodas5P(), args=(K, S), **TOL
        )


def test_equals_separate_compiled_solves(ensemble):
    """Each system of the ensemble is the compiled solve of that system alone: the same states
    bit for bit and the same statistics; every system took its own steps."""
    assert ensemble.ys.shape == (len(T), B, 3) and ensemble.retcode == "Success"
    steps = []
    for b in range(B):
        one = pn.solve(
            robertson_rows, Y0[b : b + 1], T, pn.Rodas5P(), args=(K[b : b + 1], S),
            compile=True, **TOL,
        )
        assert torch.equal(one.ys[:, 0], ensemble.ys[:, b])
        for k in ("nfe", "naccept", "nreject", "njac"):
            assert ensemble.system_stats[k][b].item() == one.stats[k], (b, k)
        assert ensemble.retcodes[b] == "Success"
        steps.append(one.stats["naccept"])
    assert len(set(steps)) > 1  # different systems, different step sequences
    assert ensemble.stats["naccept"] == sum(steps)


def test_agrees_with_native_batched_and_solve_switch(ensemble):
    """The native batched=True solve (one step sequence for all systems) agrees to the
    tolerance; pn.solve(..., compile=True) with Rodas5P(batched=True) is the ensemble; the serial
    variant (parallel=False) gives the same bits."""
    with torch.no_grad():
        native = pn.solve(robertson_rows, Y0, T, pn.Rodas5P(batched=True), args=(K, S), **TOL)
        switch = pn.solve(
            robertson_rows, Y0, T, pn.Rodas5P(batched=True), args=(K, S), compile=True, **TOL
        )
        serial = pn.compiled.solve_ensemble(
            robertson_rows, Y0, T, pn.Rodas5P(), args=(K, S), parallel=False, **TOL
        )
    rel = ((ensemble.ys - native.ys).abs() / (native.ys.abs() + 1e-10)).max().item()
    assert rel < 1e-5, rel
    assert isinstance(switch, pn.compiled.EnsembleSolution)
    assert torch.equal(switch.ys, ensemble.ys) and torch.equal(serial.ys, ensemble.ys)


def test_failed_system_has_its_own_retcode():
    """A system whose rate constant is NaN fails alone: its retcode, NaN after its last saved
    time; the others are unaffected; throw=True raises naming it."""
    Kbad = K.clone()
    Kbad[2, 0] = float("nan")
    with torch.no_grad():
        sol = pn.compiled.solve_ensemble(
            robertson_rows, Y0, T, pn.Rodas5P(), args=(Kbad, S), throw=False, **TOL
        )
        ok = pn.compiled.solve_ensemble(robertson_rows, Y0, T, pn.Rodas5P(), args=(K, S), **TOL)
        assert [r.successful for r in sol.retcodes] == [True, True, False, True]
        assert sol.retcode == sol.retcodes[2] and not sol.retcode.successful
        assert torch.isnan(sol.ys[-1, 2]).all()
        keep = [0, 1, 3]
        assert torch.equal(sol.ys[:, keep], ok.ys[:, keep])
        with pytest.raises(pn.SolveError, match="system 2"):
            pn.compiled.solve_ensemble(
                robertson_rows, Y0, T, pn.Rodas5P(), args=(Kbad, S), **TOL
            )


def coupled(t, Y):
    return -Y + Y.mean(0)  # rows interact: not an ensemble


def test_clear_errors():
    with torch.no_grad():
        with pytest.raises(ValueError, match="row 0 .*independently"):
            pn.compiled.solve_ensemble(
                coupled, torch.tensor([[1.0], [2.0]], **F64), T[:2], pn.Tsit5()
            )
        with pytest.raises(ValueError, match=r"\(B, n\)"):
            pn.compiled.solve_ensemble(coupled, torch.ones(3, **F64), T[:2], pn.Tsit5())
        with pytest.raises(TypeError, match="parallel"):
            pn.compiled.solve_ensemble(
                coupled, torch.ones(2, 1, **F64), T[:2], pn.Tsit5(), parallel=1
            )
    with pytest.raises(ValueError, match="no gradients"):
        pn.compiled.solve_ensemble(
            robertson_rows, Y0, T, pn.Rodas5P(), args=(K.clone().requires_grad_(), S)
        )
