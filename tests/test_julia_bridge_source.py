"""The Julia sources parse (tree-sitter-julia) and agree with the Python tables; the generated MLP
code parses."""

import re
from pathlib import Path

import pytest
from torch import nn

from pyneuralode.julia._mlp import ACTIVATIONS, TORCH_FORMULAS, julia_code, mlp_spec
from pyneuralode.julia._options import EXPLICIT_SOLVERS, IMPLICIT_SOLVERS, JULIA_SENSEALGS

ROOT = Path(__file__).resolve().parents[1]
JL_FILES = sorted((ROOT / "julia").rglob("*.jl"))


def _parser():
    ts = pytest.importorskip(
        "tree_sitter", reason="tree-sitter is not installed (pip install tree-sitter)"
    )
    tsj = pytest.importorskip(
        "tree_sitter_julia",
        reason="tree-sitter-julia is not installed (pip install tree-sitter-julia)",
    )
    return ts.Parser(ts.Language(tsj.language()))


def _errors(src: bytes):
    tree = _parser().parse(src)
    bad = []

    def walk(n):
        if n.type == "ERROR" or n.is_missing:
            bad.append(
                f"{n.type} at line {n.start_point[0] + 1}: {src[n.start_byte : n.end_byte][:60]!r}"
            )
        for c in n.children:
            walk(c)

    walk(tree.root_node)
    return tree, bad


def test_julia_files_exist():
    names = {p.name for p in JL_FILES}
    assert {"PyNeuralODEBridge.jl", "PyNeuralODEBridgeCUDA.jl", "runtests.jl"} <= names


@pytest.mark.parametrize("path", JL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_julia_file_parses(path):
    tree, bad = _errors(path.read_bytes())
    assert not bad, bad
    assert not tree.root_node.has_error


def test_parser_catches_errors():
    # the check can fail: broken Julia is reported
    _, bad = _errors(b"function f(x)\n    x + (1\nend\n")
    assert bad


def _bridge_text():
    return (ROOT / "julia" / "PyNeuralODEBridge.jl").read_text()


def _dict_keys(name):
    m = re.search(rf"const {name} = Dict\{{String, Any\}}\((.*?)\)\n", _bridge_text(), re.S)
    assert m, f"Dict {name} not found in the bridge"
    return set(re.findall(r'"(\w+)" =>', m.group(1)))


def test_solver_tables_match_julia_factory():
    assert _dict_keys("EXPLICIT") == set(EXPLICIT_SOLVERS)
    assert _dict_keys("IMPLICIT") == set(IMPLICIT_SOLVERS)


def test_sensealg_table_matches_julia_factory():
    text = _bridge_text()
    body = text[text.index("function make_sensealg") : text.index("_tol(x")]
    assert set(re.findall(r'name == "(\w+)"', body)) == set(JULIA_SENSEALGS)
    # every algorithm is built with an explicit Zygote VJP (never the automatic choice)
    assert body.count("autojacvec = ajv") == len(JULIA_SENSEALGS)


def test_implicit_solvers_never_default_to_forwarddiff_through_python():
    text = _bridge_text()
    assert "AutoFiniteDiff()" in text and 'ad::AbstractString = "finitediff"' in text
    assert (
        "ODEFunction{false, SciMLBase.FullSpecialize}" in text
    )  # out-of-place: no FunctionWrappers re-wrap


def test_activation_helpers_defined_in_bridge():
    text = _bridge_text()
    for name, _ in ACTIVATIONS.values():
        assert name == "tanh" or re.search(rf"^{name}\(x", text, re.M), name
        assert name in TORCH_FORMULAS


def test_generated_mlp_code_parses():
    net = nn.Sequential(
        nn.Linear(3, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.LeakyReLU(0.05),
        nn.Linear(16, 8, bias=False),
        nn.Softplus(),
        nn.Linear(8, 8),
        nn.SiLU(),
        nn.Linear(8, 8),
        nn.ELU(),
        nn.Linear(8, 8),
        nn.Sigmoid(),
        nn.Linear(8, 3),
        nn.ReLU(),
        nn.Identity(),
    )
    spec = mlp_spec(net)
    assert spec is not None
    code = julia_code(spec)
    tree, bad = _errors(code.encode())
    assert not bad, (bad, code)
    # parameter ranges in the code cover 1:numel exactly once, in order
    ranges = [tuple(map(int, r)) for r in re.findall(r"view\(p, (\d+):(\d+)\)", code)]
    n = sum(p.numel() for p in net.parameters())
    assert ranges[0][0] == 1 and ranges[-1][1] == n
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))
    assert "leakyrelu_torch.(h, 0.05)" in code
