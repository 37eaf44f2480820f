"""The optional Julia backend: DifferentialEquations.jl / SciMLSensitivity through juliacall.

``pn.solve(..., backend="julia")`` and ``pn.DEQ(..., backend="julia")`` hand the problem to
OrdinaryDiffEq, SteadyStateDiffEq and SciMLSensitivity. Nothing here imports juliacall until a
Julia solve is requested; ``import pyneuralode`` never starts Julia.

* :func:`is_available` — juliacall installed and a Julia known (starts nothing);
* :func:`install` — resolve and precompile the Julia environment (needs network once);
* ``python -m pyneuralode.julia doctor`` — what is found (juliacall, Julia, packages, threads,
  CUDA);
* :class:`Autonomous` — ``f(t, y) = net(y)`` for an ``nn.Sequential`` MLP, which the backend
  translates to Julia so solve and adjoint run without Python callbacks.
"""

from __future__ import annotations

from ._mlp import Autonomous
from ._session import INSTALL_HINT, JuliaNotAvailableError, is_available

__all__ = [
    "is_available",
    "install",
    "doctor",
    "Autonomous",
    "JuliaNotAvailableError",
    "INSTALL_HINT",
]


def install(cuda: bool = False, precompile: bool = True) -> None:
    """Resolve the Julia environment (juliapkg: Julia itself plus the packages in
    ``pyneuralode/juliapkg.json``), precompile it and load the bridge once, so later sessions
    start from the precompile cache. ``cuda=True`` also adds CUDA.jl and DLPack.jl (from
    ``pyneuralode/julia/juliapkg-cuda.json``; CPU users never install them) and loads them.
    Needs network access the first time. The first solve of each kind still compiles for a
    while (see the README: first-call latency, precompile workload, sysimage).
    """
    from ._session import get_session, juliacall_installed

    if not juliacall_installed():
        raise JuliaNotAvailableError(f"juliacall is not installed; {INSTALL_HINT}")
    import juliapkg

    if cuda:
        for name, spec in cuda_packages().items():
            juliapkg.add(name, spec["uuid"], version=spec["version"])
    juliapkg.resolve()
    if precompile:
        s = get_session()
        if cuda:
            s.cuda()
        print("pyneuralode.julia: Julia", s.versions()[0], "ready")


def cuda_packages() -> dict:
    """The optional CUDA packages: ``{name: {"uuid", "version"}}`` from ``juliapkg-cuda.json``."""
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parent / "juliapkg-cuda.json").read_text())[
        "packages"
    ]


def doctor(print_fn=print) -> dict:
    """Report what the Julia backend finds; see ``python -m pyneuralode.julia doctor``."""
    from ._doctor import run

    return run(print_fn)
