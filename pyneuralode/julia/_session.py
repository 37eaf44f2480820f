"""Starting Julia (lazily) and the session object the backend talks to.

A *session* implements six calls, the protocol between the Python half and the Julia module
``julia/PyNeuralODEBridge.jl``:

* ``callback_rhs(cb, dtype, jac)`` / ``mlp_rhs(spec)`` → an opaque right-hand-side handle;
* ``forward(rhs, u0, p, ts, **kw)`` → ``(ys n×k, retcode, (nf, naccept, nreject), handle)``;
* ``backward(handle, G n×k)`` → ``(du0, dp)``;
* ``steady(rhs, z0, p, **kw)`` → ``(z, retcode, stats, handle)``; ``steady_backward(handle, g)`` → ``dp``.

:class:`JuliaSession` forwards them to Julia; :class:`pyneuralode.julia._standin.NativeStandIn`
implements them with the native engine (used to test the Python half where Julia is absent).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

INSTALL_HINT = (
    'install it with: pip install "pyneuralode[julia]", then '
    'python -c "import pyneuralode; pyneuralode.julia.install()" (downloads Julia and the SciML packages once, '
    "then precompiles them)"
)


class JuliaNotAvailableError(ImportError):
    """The Julia backend cannot start (juliacall or Julia missing, or the environment failed)."""


_SESSION = None
_OVERRIDE = None


def bridge_path(name: str = "PyNeuralODEBridge.jl") -> Path:
    """Where the Julia module lives: ``$PYNEURALODE_JULIA_BRIDGE`` (a folder), else the repository's ``julia/``."""
    env = os.environ.get("PYNEURALODE_JULIA_BRIDGE")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here / "jl", here.parent.parent / "julia"]
    for c in candidates:
        if (c / name).is_file():
            return c / name
    raise JuliaNotAvailableError(
        f"julia backend: cannot find {name} (looked in {', '.join(str(c) for c in candidates)}); "
        f"set PYNEURALODE_JULIA_BRIDGE to the folder that holds it"
    )


def juliacall_installed() -> bool:
    return importlib.util.find_spec("juliacall") is not None


def julia_executable_hint() -> Optional[str]:
    """A Julia executable juliacall would use, without starting anything (``None`` if none is known)."""
    for var in ("PYTHON_JULIACALL_EXE", "PYTHON_JULIAPKG_EXE"):
        if os.environ.get(var):
            return os.environ[var]
    return shutil.which("julia")


def is_available() -> bool:
    """True when juliacall is installed and a Julia is known (or a session already runs).

    Cheap: starts nothing. (juliapkg may still download Julia on first start if none is on PATH;
    ``pyneuralode.julia.install()`` does that ahead of time.)
    """
    if _OVERRIDE is not None or _SESSION is not None:
        return True
    if not juliacall_installed():
        return False
    if julia_executable_hint():
        return True
    try:  # a Julia juliapkg installed earlier
        import juliapkg  # noqa: F401  (light: no Julia started)
        from juliapkg import state  # type: ignore

        return bool(getattr(state, "STATE", {}).get("executable"))
    except Exception:  # noqa: BLE001
        return False


class JuliaSession:
    """The real session: the Julia module, included once into ``juliacall.newmodule``."""

    def __init__(self, jl_module, bridge):
        self.jl = jl_module
        self.bridge = bridge
        self._cuda = None

    # -- right-hand sides ---------------------------------------------------------------------------
    def callback_rhs(self, cb, dtype: str, jac: bool = True, vjp: str = "rrule"):
        return self.bridge.make_rhs(cb, dtype, vjp=vjp, jac=jac)

    def mlp_rhs(self, spec):
        from ._mlp import julia_code

        return self.bridge.build_mlp(julia_code(spec))

    # -- solves -------------------------------------------------------------------------------------
    def forward(self, rhs, u0, p, ts, **kw):
        return tuple(self.bridge.forward(rhs, u0, p, ts, **kw))

    def backward(self, handle, G):
        return tuple(self.bridge.backward(handle, G))

    def steady(self, rhs, z0, p, **kw):
        return tuple(self.bridge.steady(rhs, z0, p, **kw))

    def steady_backward(self, handle, g):
        return self.bridge.steady_backward(handle, g)

    # -- CUDA (native path only) ----------------------------------------------------------------------
    def cuda(self):
        """The CUDA/DLPack helper module (loaded on first use)."""
        if self._cuda is None:
            self.jl.seval("Base.include")(self.jl, str(bridge_path("PyNeuralODEBridgeCUDA.jl")))
            self._cuda = self.jl.PyNeuralODEBridgeCUDA
        return self._cuda

    def versions(self):
        return tuple(self.bridge.versions())


def get_session():
    """The process-wide session (starting Julia on first use), or the override set by :func:`use_session`."""
    global _SESSION
    if _OVERRIDE is not None:
        return _OVERRIDE
    if _SESSION is not None:
        return _SESSION
    if not juliacall_installed():
        raise JuliaNotAvailableError(f"backend='julia' needs juliacall, which is not installed; {INSTALL_HINT}")
    path = bridge_path()
    try:
        import juliacall  # noqa: F401  (starts Julia; juliapkg resolves the environment first)

        jl = juliacall.newmodule("PyNeuralODE")
        jl.seval("Base.include")(jl, str(path))
        bridge = jl.PyNeuralODEBridge
    except JuliaNotAvailableError:
        raise
    except Exception as e:  # noqa: BLE001
        raise JuliaNotAvailableError(f"backend='julia': starting Julia failed ({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    _SESSION = JuliaSession(jl, bridge)
    return _SESSION


@contextlib.contextmanager
def use_session(session):
    """Route ``backend="julia"`` to ``session`` (e.g. the native stand-in) inside the block."""
    global _OVERRIDE
    old = _OVERRIDE
    _OVERRIDE = session
    try:
        yield session
    finally:
        _OVERRIDE = old
