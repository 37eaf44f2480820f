"""Shared check for the tests that run one solve on a host step (numpy, or the unrolled Rosenbrock
step) and again on the torch step."""

from __future__ import annotations

import torch


def counts_agree(fast, ref) -> bool:
    """Assert that the host-step solve ``fast`` took the torch-step solve ``ref``'s steps.

    float64: the same accepted/rejected steps and Newton/LU/solve counts (nfe may differ by the one
    f(y0) that autograd's set-up evaluates with its graph); returns ``False``, leaving the states to
    the caller's tolerance. float32: numpy and torch round differently and an error test near 1 can
    go either way, so the step counts may part by up to 10% and the states agree to the solve's
    rtol (1e-4); returns ``True``, nothing more to compare.
    """
    if fast.ys.dtype == torch.float32:
        assert abs(fast.stats["naccept"] - ref.stats["naccept"]) <= 0.1 * ref.stats["naccept"]
        assert torch.allclose(fast.ys, ref.ys.detach(), rtol=1e-4, atol=1e-9), (
            (fast.ys - ref.ys).abs().max()
        )
        return True
    for key in ("naccept", "nreject", "njac", "nlu", "nsolve", "nnewton", "nconvfail"):
        assert fast.stats.get(key) == ref.stats.get(key), (key, fast.stats, ref.stats)
    assert ref.stats["nfe"] - fast.stats["nfe"] in (0, 1)
    return False
