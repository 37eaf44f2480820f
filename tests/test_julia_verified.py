"""Every Julia name, keyword and field the bridge uses is in pyneuralode/julia/VERIFIED.md,
with a package the environment declares (the table records where each was read in the source).

Julia cannot run here; this is the machine-checked half of that desk check: a name added to the
bridge without being looked up (and listed) fails here, and so does a stale row.
"""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _julia_names import fields, keywords, qualified, read, strip_code, symbols, usings

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = ROOT / "julia" / "PyNeuralODEBridge.jl"
CUDA_FILE = ROOT / "julia" / "PyNeuralODEBridgeCUDA.jl"
STDLIB = {"LinearAlgebra"}
SOLUTION_TYPES = {"ODESolution", "NonlinearSolution"}


def _rows():
    rows = []
    text = (ROOT / "pyneuralode" / "julia" / "VERIFIED.md").read_text()
    for m in re.finditer(r"^\| `([^`]+)` \| (\w+) \| (\w+) \| (.+) \|$", text, re.M):
        rows.append(dict(name=m.group(1), kind=m.group(2), package=m.group(3), source=m.group(4)))
    return rows


def _declared(cuda: bool):
    pk = set(json.loads((ROOT / "pyneuralode" / "juliapkg.json").read_text())["packages"])
    if cuda:
        pk |= set(
            json.loads((ROOT / "pyneuralode" / "julia" / "juliapkg-cuda.json").read_text())[
                "packages"
            ]
        )
    return pk | {"Base"}


ROWS = _rows()
NAMES = {
    (r["package"], r["name"])
    for r in ROWS
    if r["kind"] in ("export", "public", "internal", "module")
}
KEYWORDS = {r["name"] for r in ROWS if r["kind"] == "keyword"}
FIELDS = {r["name"] for r in ROWS if r["kind"] == "field"}


def test_table_is_parsed_and_well_formed():
    assert len(ROWS) > 100
    assert {r["kind"] for r in ROWS} <= {
        "export",
        "public",
        "internal",
        "module",
        "keyword",
        "field",
    }
    for r in ROWS:
        assert re.search(r"\.(jl|toml|md)\b|NEWS", r["source"]), r  # every row cites a file
    for r in ROWS:
        if r["kind"] == "keyword":
            assert re.fullmatch(r"[\w.]+\(; \w+\)", r["name"]), r
        if r["kind"] == "field":
            assert re.fullmatch(r"\w+\.\w+", r["name"]), r


@pytest.mark.parametrize("path", [BRIDGE, CUDA_FILE], ids=lambda p: p.name)
def test_every_package_is_imported_by_name(path):
    for pkg, names in usings(read(path)):
        assert pkg in STDLIB or names, (
            f"{path.name}: `using {pkg}` brings unlisted names into scope; use `using {pkg}: ...`"
        )


@pytest.mark.parametrize("path", [BRIDGE, CUDA_FILE], ids=lambda p: p.name)
def test_every_name_is_verified_and_declared(path):
    code = read(path)
    declared = _declared(cuda=path == CUDA_FILE)
    used = usings(code)
    modules = {p for p, ns in used if p in ns}
    missing = []
    for pkg, names in used:
        if pkg in STDLIB:
            continue
        assert pkg in declared, f"{path.name}: {pkg} is not declared for this file"
        missing += [f"{pkg}: {n}" for n in names if (pkg, n) not in NAMES]
    for mod, n in qualified(code, modules):
        if (mod, n) not in NAMES:
            missing.append(f"{mod}.{n}")
    assert not missing, f"not in VERIFIED.md: {missing}"
    for r in ROWS:
        assert r["package"] in _declared(cuda=True), r


def _callees(code):
    used = usings(code)
    modules = {p for p, ns in used if p in ns}
    names = [n for p, ns in used for n in ns if n != p]
    return names + [f"{m}.{n}" for m, n in qualified(code, modules)]


@pytest.mark.parametrize("path", [BRIDGE, CUDA_FILE], ids=lambda p: p.name)
def test_every_keyword_is_verified(path):
    code = read(path)
    missing = []
    for c in _callees(code):
        short = c.split(".")[-1]
        missing += [
            f"{short}(; {k})" for k in keywords(code, c) if f"{short}(; {k})" not in KEYWORDS
        ]
    # the implicit solvers are called through the IMPLICIT table
    implicit = re.search(r"const IMPLICIT = Dict\{String, Any\}\((.*?)\)\n", code, re.S)
    if implicit:
        algs = re.findall(r"=> (\w+)", implicit.group(1))
        kws = keywords(code, "IMPLICIT[name]")
        assert kws == {"autodiff", "linsolve"}, kws
        missing += [f"{a}(; {k})" for a in algs for k in kws if f"{a}(; {k})" not in KEYWORDS]
    # keyword dictionaries splatted into solve / ODEFunction / ODEProblem, and hasproperty symbols
    for s in symbols(code):
        owners = {k.split("(")[0] for k in KEYWORDS if k.endswith(f"(; {s})")}
        if not owners & {"solve", "ODEFunction", "ODEProblem"} and not any(
            f.endswith(f".{s}") for f in FIELDS
        ):
            missing.append(f":{s}")
    assert not missing, f"not in VERIFIED.md: {missing}"


def test_every_solution_field_is_verified():
    code = read(BRIDGE)
    got = fields(code, ["sol", "plain", "sol.stats", "sol.original"])
    got["solve(...)"] = set(re.findall(r"\)\.(\w+)", code)) - {"back"}  # e.g. `solve(...).t`
    sol_fields = {f.split(".")[1] for f in FIELDS if f.split(".")[0] in SOLUTION_TYPES}
    stats_fields = {f.split(".")[1] for f in FIELDS if f.startswith("DEStats.")}
    assert got["sol"] | got["plain"] | got["solve(...)"] <= sol_fields, got
    assert got["sol.stats"] <= stats_fields
    assert {"retcode", "t", "u", "stats", "original"} <= sol_fields and stats_fields == {
        "nf",
        "naccept",
        "nreject",
    }


def test_no_stale_rows():
    code = strip_code(BRIDGE.read_text()) + strip_code(CUDA_FILE.read_text())
    for r in ROWS:
        if r["kind"] == "keyword":
            owner, kw = re.fullmatch(r"([\w.]+)\(; (\w+)\)", r["name"]).groups()
            assert re.search(rf"\b{owner}\b", code) and re.search(rf"\b{kw}\b", code), r
        else:
            assert re.search(rf"\b{re.escape(r['name'].split('.')[-1])}\b", code), r


def test_checks_can_fail():
    fake = strip_code(
        "using Foo\nusing Bar: baz\nx = Bar.qux(1; k = 2, j)\n"
        'y = solve(p; nope = 1)\nz = :zap\n"""doc"""\n'
    )
    assert ("Foo", []) in usings(fake) and ("Bar", ["baz"]) in usings(fake)
    assert qualified(fake, {"Bar"}) == {("Bar", "qux")}
    assert keywords(fake, "Bar.qux") == {"k", "j"} and keywords(fake, "solve") == {"nope"}
    assert "solve(; nope)" not in KEYWORDS and "zap" in symbols(fake)
    assert strip_code('a = "x # y" # c\nb = 1') == 'a = "" \nb = 1'


def _julia_keywords(function):
    code = read(BRIDGE)
    m = re.search(rf"^function {function}\(([^;]*);(.*?)\)\n", code, re.M | re.S)
    assert m, function
    return {k.split("::")[0].split("=")[0].strip() for k in m.group(2).split(",") if k.strip()}


def test_python_sends_only_keywords_the_bridge_accepts():
    """The session protocol: every keyword the Python half can send exists on the Julia side
    (a MethodError there otherwise) and on the stand-in, with the same names."""
    import inspect

    from pyneuralode.julia._standin import NativeStandIn

    sent_forward = {
        "solver",
        "ad",
        "sensealg",
        "checkpointing",
        "quad_reltol",
        "quad_abstol",
        "abstol",
        "reltol",
        "adaptive",
        "maxiters",
        "dt",
        "dtmin",
        "dtmax",
        "linsolve",
    }
    sent_steady = {"solver", "ad", "abstol", "reltol", "maxiters"}
    for name, sent in (("forward", sent_forward), ("steady", sent_steady)):
        julia = _julia_keywords(name)
        standin = {
            p.name
            for p in inspect.signature(getattr(NativeStandIn, name)).parameters.values()
            if p.kind is p.KEYWORD_ONLY
        }
        assert sent <= julia, (name, sent - julia)
        assert julia == standin, (name, julia ^ standin)


def test_python_keyword_sources_are_covered():
    # the keyword names the Python half builds, so the list above cannot silently go stale
    import pyneuralode as pn
    from pyneuralode._loop import LoopOptions
    from pyneuralode.julia._options import sensealg_kwargs, solve_kwargs

    kw = set(solve_kwargs(LoopOptions(dt=0.1, dtmin=1e-6, dtmax=1.0)))
    for s in (
        None,
        pn.BacksolveAdjoint(),
        pn.QuadratureAdjoint(),
        pn.QuadratureAdjoint(quadrature="gauss-kronrod", rtol=1e-6, atol=1e-8),
    ):
        kw |= set(sensealg_kwargs(s))
    assert kw | {"solver", "ad", "linsolve"} <= _julia_keywords("forward")
