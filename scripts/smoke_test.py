"""Smoke test of an installed pyneuralode (run by tests/test_wheel.py inside a fresh venv that
holds the built wheel): import, a solve, a gradient, version metadata, py.typed."""

import importlib.metadata as md
import math
import sys
from pathlib import Path

import torch

import pyneuralode as pn

where = Path(pn.__file__).resolve()
print(f"pyneuralode {pn.__version__} from {where}")
if "site-packages" not in where.parts:
    sys.exit(f"imported from {where}, not from an installed wheel")
if md.version("pyneuralode") != pn.__version__:
    sys.exit(
        f"metadata version {md.version('pyneuralode')} != pyneuralode.__version__ {pn.__version__}"
    )
if not (where.parent / "py.typed").exists():
    sys.exit("py.typed is missing from the installed package")

t = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
sol = pn.solve(
    lambda t, y, k: -k * y,
    torch.ones(1, dtype=torch.float64),
    t,
    pn.Tsit5(),
    rtol=1e-10,
    atol=1e-12,
    args=(k,),
)
y1 = sol.ys[-1, 0]
(dk,) = torch.autograd.grad(y1, k)
err_y = abs(y1.item() - math.exp(-0.7))
err_g = abs(dk.item() + math.exp(-0.7))  # d/dk exp(-k) at t = 1
print(f"solve error {err_y:.1e}, gradient error {err_g:.1e}")
if not (sol.retcode == "Success" and err_y < 1e-8 and err_g < 1e-6):
    sys.exit("the solve or its gradient is wrong")
print("smoke test passed")
