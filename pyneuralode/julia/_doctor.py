"""``python -m pyneuralode.julia doctor``: what the Julia backend finds on this machine."""

from __future__ import annotations

import importlib.metadata as md

from ._session import (
    INSTALL_HINT,
    bridge_path,
    julia_executable_hint,
    juliacall_installed,
    juliapkg_julia,
    juliapkg_project,
)


def run(print_fn=print, start: bool | None = None) -> dict:
    """Collect and print a report; starts Julia only when juliacall and a Julia are present
    (``start=None``) — set ``start=False`` to never start it."""
    info: dict = {
        "juliacall": None,
        "julia_executable": julia_executable_hint() or juliapkg_julia(),
        "bridge": None,
        "julia_version": None,
        "threads": None,
        "packages": {},
        "cuda": None,
        "error": None,
    }
    try:
        info["bridge"] = str(bridge_path())
    except Exception as e:
        info["bridge"] = f"missing ({e})"
    if juliacall_installed():
        try:
            info["juliacall"] = md.version("juliacall")
        except md.PackageNotFoundError:
            info["juliacall"] = "installed (version unknown)"
    if start is None:
        start = info["juliacall"] is not None and info["julia_executable"] is not None
    if start and info["juliacall"] is not None:
        try:
            from ._session import get_session

            s = get_session()
            ver, threads, pkgs = s.versions()
            info["julia_version"] = str(ver)
            info["threads"] = int(threads)
            info["packages"] = {str(k): str(v) for k, v in dict(pkgs).items()}
            try:
                ok, dev, rt = s.cuda().cuda_info()
                info["cuda"] = (
                    f"{dev} (CUDA runtime {rt})" if ok else "CUDA.jl loaded, no functional GPU"
                )
            except Exception as e:
                info["cuda"] = (
                    f"not available ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})"
                )
        except Exception as e:
            info["error"] = f"{type(e).__name__}: {e}"
    lines = ["pyneuralode Julia backend doctor"]
    lines.append(f"  juliacall:        {info['juliacall'] or 'NOT installed'}")
    exe = info["julia_executable"] or (
        "none on PATH / PYTHON_JULIACALL_EXE (juliapkg may download one)"
    )
    lines.append(f"  julia executable: {exe}")
    lines.append(f"  bridge module:    {info['bridge']}")
    lines.append(f"  juliapkg project: {juliapkg_project()}")
    if info["julia_version"]:
        lines.append(f"  Julia version:    {info['julia_version']}")
        lines.append(f"  Julia threads:    {info['threads']}")
        for k in sorted(info["packages"]):
            lines.append(f"  {k + ':':<18}{info['packages'][k]}")
        lines.append(f"  CUDA:             {info['cuda']}")
    if info["error"]:
        lines.append(f"  starting Julia failed: {info['error']}")
    if info["juliacall"] is None or info["error"]:
        lines.append(f"  backend='julia' is NOT available; {INSTALL_HINT}")
    elif info["julia_version"]:
        lines.append("  backend='julia' is available")
    for line in lines:
        print_fn(line)
    return info
