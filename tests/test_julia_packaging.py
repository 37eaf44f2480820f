"""The Julia environment files agree, and the Julia files ship inside the Python package.

* pyneuralode/juliapkg.json (what juliapkg installs) and the top-level Project.toml [deps]
  declare the same packages, UUIDs and compat bounds; CUDA.jl/DLPack.jl are optional
  (pyneuralode/julia/juliapkg-cuda.json and Project.toml [weakdeps]), used only by the CUDA module;
* every UUID is the one in the package's own Project.toml (read from the sources, see
  pyneuralode/julia/VERIFIED.md);
* pyneuralode/julia/jl/ (package data, what a wheel install loads) links to julia/'s files.
"""

import json
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
JL = ROOT / "pyneuralode" / "julia" / "jl"
REQUIRED = {
    "OrdinaryDiffEqTsit5",
    "OrdinaryDiffEqVerner",
    "OrdinaryDiffEqLowOrderRK",
    "OrdinaryDiffEqRosenbrock",
    "OrdinaryDiffEqSDIRK",
    "OrdinaryDiffEqBDF",
    "SciMLSensitivity",
    "SciMLBase",
    "SteadyStateDiffEq",
    "LinearSolve",
    "Zygote",
    "ChainRulesCore",
    "ADTypes",
    "PythonCall",
}
OPTIONAL = {"CUDA", "DLPack"}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# from the packages' own Project.toml files (repository@commit in pyneuralode/julia/VERIFIED.md)
KNOWN = {
    "OrdinaryDiffEqTsit5": "b1df2697-797e-41e3-8120-5422d3b24e4a",
    "OrdinaryDiffEqVerner": "79d7bb75-1356-48c1-b8c0-6832512096c2",
    "OrdinaryDiffEqLowOrderRK": "1344f307-1e59-4825-a18e-ace9aa3fa4c6",
    "OrdinaryDiffEqRosenbrock": "43230ef6-c299-4910-a778-202eb28ce4ce",
    "OrdinaryDiffEqSDIRK": "2d112036-d095-4a1e-ab9a-08536f3ecdbf",
    "OrdinaryDiffEqBDF": "6ad6398a-0878-4a85-9266-38940aa047c8",
    "SciMLSensitivity": "1ed8b502-d754-442c-8d5d-10ac956f44a1",
    "SciMLBase": "0bca4576-84f4-4d90-8ffe-ffa030f20462",
    "SteadyStateDiffEq": "9672c7b4-1e72-59bd-8a11-6ac3964bc41f",
    "LinearSolve": "7ed4a6bd-45f5-4d41-b270-4a48e9bafcae",
    "Zygote": "e88e6eb3-aa80-5325-afca-941959d7151f",
    "PythonCall": "6099a3de-0909-46bc-b1f4-468b9a2dfc0d",
    "DLPack": "53c2dc0f-f7d5-43fd-8906-6c0220547083",
    "CUDA": "052768ef-5323-5732-b1bb-66c8b64840ba",
}


def _json():
    return json.loads((ROOT / "pyneuralode" / "juliapkg.json").read_text())


def _cuda_json():
    return json.loads((ROOT / "pyneuralode" / "julia" / "juliapkg-cuda.json").read_text())


def _toml():
    return tomllib.loads((ROOT / "Project.toml").read_text())


def test_juliapkg_json_lists_required_packages():
    pk = _json()["packages"]
    assert set(pk) == REQUIRED
    assert set(_cuda_json()["packages"]) == OPTIONAL  # CPU users never install CUDA.jl
    for name, entry in {**pk, **_cuda_json()["packages"]}.items():
        assert UUID.match(entry["uuid"]), name
        assert entry.get("version"), f"{name} has no compat bound"
        if name in KNOWN:
            assert entry["uuid"] == KNOWN[name], name


def test_cuda_pin_stays_at_5():
    # DLPack.jl 0.3.1 ext/CUDAExt.jl:32 uses CUDA.Mem, removed in CUDA.jl 6.0
    assert _cuda_json()["packages"]["CUDA"]["version"] == "5"


def test_json_and_project_toml_agree():
    pk, cu, proj = _json()["packages"], _cuda_json()["packages"], _toml()
    assert {k: v["uuid"] for k, v in pk.items()} == proj["deps"]
    assert {k: v["uuid"] for k, v in cu.items()} == proj["weakdeps"]
    compat = dict(proj["compat"])
    assert compat.pop("julia") == _json()["julia"]
    assert {k: v["version"] for k, v in {**pk, **cu}.items()} == compat


def test_install_cuda_reads_the_optional_packages():
    from pyneuralode.julia import cuda_packages

    assert cuda_packages() == _cuda_json()["packages"]


def _used_packages(path):
    used = set()
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(?:using|import)\s+([\w, .:]+)", line)
        if not m or m.group(1).startswith("."):
            continue
        clause = m.group(1)
        heads = [clause.split(":")[0]] if ":" in clause else clause.split(",")
        used |= {h.strip() for h in heads if h.strip()}
    return used


def test_bridge_uses_only_declared_packages():
    deps, weak = set(_toml()["deps"]), set(_toml()["weakdeps"])
    stdlib = {"LinearAlgebra", "Test"}
    main = _used_packages(ROOT / "julia" / "PyNeuralODEBridge.jl") | _used_packages(
        ROOT / "julia" / "test" / "runtests.jl"
    )
    assert main <= deps | stdlib, (
        main - deps - stdlib
    )  # the CPU bridge never loads CUDA.jl/DLPack.jl
    cuda = _used_packages(ROOT / "julia" / "PyNeuralODEBridgeCUDA.jl")
    assert cuda <= deps | weak, cuda - deps - weak
    assert {"CUDA", "DLPack"} <= cuda
    assert deps <= main, f"declared but never used: {deps - main}"


def test_used_packages_parser_can_fail(tmp_path):
    f = tmp_path / "x.jl"
    f.write_text("using Foo: bar, baz\nusing Qux, Quux\nimport Corge\nusing .Local\n")
    assert _used_packages(f) == {"Foo", "Qux", "Quux", "Corge"}


def test_package_bridge_files_link_to_the_julia_folder():
    """pyneuralode/julia/jl/ is what a wheel ships; its files are symlinks into julia/ (one source:
    the wheel build copies their contents, which tests/test_julia_wheel.py checks)."""
    shipped = {p.name: p for p in JL.glob("*.jl")}
    assert set(shipped) == {"PyNeuralODEBridge.jl", "PyNeuralODEBridgeCUDA.jl"}
    for name, p in shipped.items():
        assert p.is_symlink(), f"{p} must be a symlink to julia/{name}, not a copy"
        assert p.resolve() == (ROOT / "julia" / name).resolve()


def test_bridge_path_prefers_the_package_copy(monkeypatch):
    from pyneuralode.julia._session import bridge_path

    monkeypatch.delenv("PYNEURALODE_JULIA_BRIDGE", raising=False)
    assert bridge_path() == JL / "PyNeuralODEBridge.jl"
    assert bridge_path("PyNeuralODEBridgeCUDA.jl") == JL / "PyNeuralODEBridgeCUDA.jl"


def test_package_data_lists_the_julia_files():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["pyneuralode"]
    assert (
        "julia/jl/*.jl" in data and "julia/juliapkg-cuda.json" in data and "juliapkg.json" in data
    )
