"""Starting Julia (lazily) and the session object the backend talks to.

A *session* implements six calls, the protocol between the Python half and the Julia module
``julia/PyNeuralODEBridge.jl``:

* ``callback_rhs(cb, dtype, jac)`` / ``mlp_rhs(spec)`` → an opaque right-hand-side handle;
* ``forward(rhs, u0, p, ts, **kw)`` → ``(ys n×k, retcode, (nf, naccept, nreject), handle)``;
* ``backward(handle, G n×k)`` → ``(du0, dp)``;
* ``steady(rhs, z0, p, **kw)`` → ``(z, retcode, stats, handle)``; ``steady_backward(handle, g)`` →
  ``dp``.

:class:`JuliaSession` forwards them to Julia; :class:`pyneuralode.julia._standin.NativeStandIn`
implements them with the native engine (used to test the Python half where Julia is absent).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

INSTALL_HINT = (
    'install it with: pip install -e ".[julia]" in a pyneuralode checkout (there is no release on '
    "PyPI "
    'yet), then python -c "import pyneuralode; pyneuralode.julia.install()" (downloads Julia and '
    "the SciML "
    "packages once, then precompiles them)"
)


class JuliaNotAvailableError(ImportError):
    """The Julia backend cannot start (juliacall or Julia missing, or the environment failed)."""


class JuliaImportOrderWarning(RuntimeWarning):
    """juliacall is started after torch was imported (PythonCall's FAQ: import juliacall first)."""


_SESSION = None
_OVERRIDE = None

#: the Julia files shipped in the wheel (package data); julia/ at the repository root holds the
#: same bytes (tests/test_julia_packaging.py keeps the two in sync)
JL_DIR = Path(__file__).resolve().parent / "jl"


def bridge_path(name: str = "PyNeuralODEBridge.jl") -> Path:
    """Where the Julia module lives: ``$PYNEURALODE_JULIA_BRIDGE`` (a folder), else the installed
    package's ``pyneuralode/julia/jl/``, else the repository's ``julia/``."""
    env = os.environ.get("PYNEURALODE_JULIA_BRIDGE")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [JL_DIR, here.parent.parent / "julia"]
    for c in candidates:
        if (c / name).is_file():
            return c / name
    raise JuliaNotAvailableError(
        f"julia backend: cannot find {name} (looked in {', '.join(str(c) for c in candidates)}); "
        f"set PYNEURALODE_JULIA_BRIDGE to the folder that holds it"
    )


def juliacall_installed() -> bool:
    return importlib.util.find_spec("juliacall") is not None


def julia_executable_hint() -> str | None:
    """A Julia executable juliacall would use, without starting anything (``None`` if none is
    known)."""
    for var in ("PYTHON_JULIACALL_EXE", "PYTHON_JULIAPKG_EXE"):
        if os.environ.get(var):
            return os.environ[var]
    return shutil.which("julia")


def juliapkg_project() -> Path:
    """The Julia environment juliapkg uses, computed as pyjuliapkg does without importing it
    (pyjuliapkg@0aa8af1 src/juliapkg/state.py:54-86: ``PYTHON_JULIAPKG_PROJECT``, else
    ``<venv or conda prefix>/julia_env``, else ``<depot>/environments/pyjuliapkg``)."""
    project = os.environ.get("PYTHON_JULIAPKG_PROJECT")
    if project:
        return Path(project)
    prefix = sys.prefix if sys.prefix != sys.base_prefix else os.environ.get("CONDA_PREFIX")
    if prefix:
        return Path(prefix).resolve() / "julia_env"
    depot = os.environ.get("JULIA_DEPOT_PATH", "").split(";" if os.name == "nt" else ":")[0]
    depot = depot or os.path.join(os.path.expanduser("~"), ".julia")
    return Path(depot).resolve() / "environments" / "pyjuliapkg"


def juliapkg_julia() -> str | None:
    """A Julia that juliapkg found or installed earlier, read from its files (starts nothing).

    ``meta.json`` records the executable of the last resolve (pyjuliapkg deps.py:551-560);
    juliapkg installs Julia into ``<project>/pyjuliapkg/install`` (state.py:91, find_julia.py:60).
    """
    prefix = juliapkg_project() / "pyjuliapkg"
    try:
        exe = json.loads((prefix / "meta.json").read_text()).get("executable")
        if exe and os.path.isfile(exe):
            return str(exe)
    except (OSError, ValueError, AttributeError):
        pass
    exe = prefix / "install" / "bin" / ("julia.exe" if os.name == "nt" else "julia")
    return str(exe) if exe.is_file() else None


def is_available() -> bool:
    """True when juliacall is installed and a Julia is known (or a session already runs).

    Cheap: starts nothing and imports neither juliacall nor juliapkg. A Julia is known when it
    is configured (``PYTHON_JULIACALL_EXE``/``PYTHON_JULIAPKG_EXE``), on PATH, installed by
    juliapkg earlier, or juliaup is on PATH (juliapkg then installs through it).
    """
    if _OVERRIDE is not None or _SESSION is not None:
        return True
    if not juliacall_installed():
        return False
    return bool(julia_executable_hint() or juliapkg_julia() or shutil.which("juliaup"))


class JuliaSession:
    """The real session: the Julia module, included once into ``juliacall.newmodule``."""

    def __init__(self, jl_module, bridge):
        self.jl = jl_module
        self.bridge = bridge
        self._cuda = None
        self._mlp = {}

    # -- right-hand sides
    # ---------------------------------------------------------------------------
    def callback_rhs(self, cb, dtype: str, jac: bool = True, vjp: str = "rrule"):
        return self.bridge.make_rhs(cb, dtype, vjp=vjp, jac=jac)

    def mlp_rhs(self, spec):
        # Cached by the generated code: a new Julia function type per call would recompile the
        # solver, the adjoint and Zygote every time (bug 8; the bridge caches too).
        from ._mlp import julia_code

        code = julia_code(spec)
        if code not in self._mlp:
            self._mlp[code] = self.bridge.build_mlp(code)
        return self._mlp[code]

    # -- solves
    # -------------------------------------------------------------------------------------
    def forward(self, rhs, u0, p, ts, **kw):
        return tuple(self.bridge.forward(rhs, u0, p, ts, **kw))

    def backward(self, handle, G):
        return tuple(self.bridge.backward(handle, G))

    def steady(self, rhs, z0, p, **kw):
        return tuple(self.bridge.steady(rhs, z0, p, **kw))

    def steady_backward(self, handle, g):
        return self.bridge.steady_backward(handle, g)

    # -- CUDA (native path only)
    # ----------------------------------------------------------------------
    def cuda(self):
        """The CUDA/DLPack helper module (loaded on first use)."""
        if self._cuda is None:
            try:
                self.jl.seval("Base.include")(self.jl, str(bridge_path("PyNeuralODEBridgeCUDA.jl")))
            except Exception as e:
                raise JuliaNotAvailableError(
                    "backend='julia' on CUDA tensors needs CUDA.jl and DLPack.jl, which failed "
                    "to load "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install "
                    "them with "
                    f'python -c "import pyneuralode; pyneuralode.julia.install(cuda=True)"'
                ) from e
            self._cuda = self.jl.PyNeuralODEBridgeCUDA
        return self._cuda

    def versions(self):
        return tuple(self.bridge.versions())


def get_session():
    """The process-wide session (starting Julia on first use), or the override set by
    :func:`use_session`."""
    global _SESSION
    if _OVERRIDE is not None:
        return _OVERRIDE
    if _SESSION is not None:
        return _SESSION
    if not juliacall_installed():
        raise JuliaNotAvailableError(
            f"backend='julia' needs juliacall, which is not installed; {INSTALL_HINT}"
        )
    path = bridge_path()
    check_import_order()
    try:
        import juliacall

        jl = juliacall.newmodule("PyNeuralODE")
        jl.seval("Base.include")(jl, str(path))
        bridge = jl.PyNeuralODEBridge
    except JuliaNotAvailableError:
        raise
    except Exception as e:
        raise JuliaNotAvailableError(
            f"backend='julia': starting Julia failed ({type(e).__name__}: {e}); {INSTALL_HINT}"
        ) from e
    _SESSION = JuliaSession(jl, bridge)
    return _SESSION


def check_import_order(modules=None) -> bool:
    """Warn when Julia is about to start after torch was imported; True when the order is safe.

    PythonCall's FAQ (PythonCall.jl@34d3f55 docs/src/faq.md:52-64 and :66-87) asks for
    ``import juliacall`` before ``import torch`` (heap corruption, #215) and before libraries that
    load an older system ``libstdc++`` (#255; SciMLSensitivity loads Enzyme, whose LLVM needs a
    recent one). pyneuralode imports torch itself, so the safe start is ``import juliacall`` as
    the first import of the script; ``PYNEURALODE_JULIA_IMPORT_ORDER=ignore`` silences this.
    """
    modules = sys.modules if modules is None else modules
    if "juliacall" in modules or "torch" not in modules:
        return True
    if os.environ.get("PYNEURALODE_JULIA_IMPORT_ORDER", "").lower() != "ignore":
        warnings.warn(
            "backend='julia': Julia is starting after torch was imported; PythonCall's FAQ "
            "reports heap "
            "corruption and libstdc++ clashes in this order. If Julia crashes or fails to start, "
            "put "
            "`import juliacall` before `import torch`/`import pyneuralode` in your script (set "
            "PYNEURALODE_JULIA_IMPORT_ORDER=ignore to silence this warning)",
            JuliaImportOrderWarning,
            stacklevel=3,
        )
    return False


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
