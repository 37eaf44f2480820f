"""pyneuralode/juliapkg.json and the top-level Project.toml declare the same Julia packages."""
import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"OrdinaryDiffEq", "SciMLSensitivity", "SciMLBase", "SteadyStateDiffEq", "LinearSolve", "Zygote",
            "ChainRulesCore", "ADTypes", "PythonCall", "CUDA", "DLPack"}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# from the packages' own Project.toml files (see shared/reference/julia-bridge.md)
KNOWN = {
    "SciMLSensitivity": "1ed8b502-d754-442c-8d5d-10ac956f44a1",
    "OrdinaryDiffEq": "1dea7af3-3e70-54e6-95c3-0bf5283fa5ed",
    "SciMLBase": "0bca4576-84f4-4d90-8ffe-ffa030f20462",
    "LinearSolve": "7ed4a6bd-45f5-4d41-b270-4a48e9bafcae",
    "PythonCall": "6099a3de-0909-46bc-b1f4-468b9a2dfc0d",
}


def _json():
    return json.loads((ROOT / "pyneuralode" / "juliapkg.json").read_text())


def _toml():
    return tomllib.loads((ROOT / "Project.toml").read_text())


def test_juliapkg_json_lists_required_packages():
    pk = _json()["packages"]
    assert set(pk) == REQUIRED
    for name, entry in pk.items():
        assert UUID.match(entry["uuid"]), name
        assert entry.get("version"), f"{name} has no compat bound"
    for name, uuid in KNOWN.items():
        assert pk[name]["uuid"] == uuid


def test_json_and_project_toml_agree():
    pk, proj = _json(), _toml()
    assert {k: v["uuid"] for k, v in pk["packages"].items()} == proj["deps"]
    compat = dict(proj["compat"])
    assert compat.pop("julia") == _json()["julia"]
    assert {k: v["version"] for k, v in pk["packages"].items()} == compat


def test_bridge_uses_only_declared_packages():
    declared = set(_toml()["deps"]) | {"LinearAlgebra", "Test"}
    for f in (ROOT / "julia").rglob("*.jl"):
        for line in f.read_text().splitlines():
            m = re.match(r"\s*using\s+([\w, .:]+)", line)
            if not m or m.group(1).startswith("."):
                continue
            names = [n.split(":")[0].strip() for n in m.group(1).split(",")] if ":" not in m.group(1) else [m.group(1).split(":")[0].strip()]
            for n in names:
                assert n in declared, f"{f.name}: `using {n}` is not declared in Project.toml"
