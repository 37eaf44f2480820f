"""Read the Julia bridge files without Julia: what they import, call with keywords and access.

Used by tests/test_julia_verified.py to check the files against pyneuralode/julia/VERIFIED.md.
A small lexer (comments, docstrings and strings removed) and regular expressions; the bridge is
written so that these suffice: every package is imported as ``using Pkg: names`` (so no name
reaches the file unqualified without being listed), or used qualified as ``Pkg.name``.
"""

from __future__ import annotations

import re
from pathlib import Path

IDENT = r"[^\W\d]\w*!?"


def strip_code(src: str) -> str:
    """``src`` without comments, docstrings and string contents (newlines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        if src.startswith('"""', i):
            j = src.index('"""', i + 3) + 3
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j
        elif src[i] == '"':
            j = i + 1
            while src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif src.startswith("#=", i):
            j = src.index("=#", i) + 2
            out.append("\n" * src.count("\n", i, j))
            i = j
        elif src[i] == "#":
            j = src.find("\n", i)
            i = n if j < 0 else j
        else:
            out.append(src[i])
            i += 1
    return "".join(out)


def usings(code: str) -> list[tuple[str, list[str]]]:
    """``[(package, [names] or [])]`` per ``using``/``import`` (continuation lines joined)."""
    found = []
    for m in re.finditer(r"^\s*(?:using|import)\s+((?:[^\n]*,[ \t]*\n)*[^\n]*)", code, re.M):
        clause = " ".join(m.group(1).split())
        if clause.startswith("."):
            continue
        if ":" in clause:
            pkg, names = clause.split(":", 1)
            found.append((pkg.strip(), [x.strip() for x in names.split(",") if x.strip()]))
        else:
            found += [(p.strip(), []) for p in clause.split(",") if p.strip()]
    return found


def qualified(code: str, modules: set[str]) -> set[tuple[str, str]]:
    """``(Module, name)`` for every ``Module.name`` with ``Module`` an imported package module."""
    return {(m, n) for m, n in re.findall(rf"(?<![\w.])({IDENT})\.({IDENT})", code) if m in modules}


def _args(code: str, start: int) -> str:
    depth, i = 0, start
    while True:
        c = code[i]
        depth += c in "([{"
        depth -= c in ")]}"
        if depth == 0:
            return code[start + 1 : i]
        i += 1


def _split_top(s: str, seps: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if depth == 0 and c in seps:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def keywords(code: str, callee: str) -> set[str]:
    """Keywords passed in calls ``callee(...)``: ``k = v`` anywhere, or a bare ``k`` after ``;``."""
    kws = set()
    for m in re.finditer(rf"(?<![\w.]){re.escape(callee)}(?:\{{[^}}]*\}})?\(", code):
        inner = _args(code, m.end() - 1)
        parts = _split_top(inner, ";")
        positional, named = parts[0], ";".join(parts[1:])
        for part in _split_top(positional, ","):
            k = re.match(rf"^\s*({IDENT})\s*=(?!=)", part)
            if k:
                kws.add(k.group(1))
        for part in _split_top(named, ","):
            part = part.strip()
            k = re.match(rf"^({IDENT})\s*=(?!=)", part) or re.match(rf"^({IDENT})$", part)
            if k:
                kws.add(k.group(1))
    return kws


def symbols(code: str) -> set[str]:
    """Symbol literals ``:name`` (keys of the keyword dictionaries splatted into calls)."""
    return set(re.findall(rf"(?<![\w:)\]}}])\:({IDENT})", code))


def fields(code: str, receivers: list[str]) -> dict[str, set[str]]:
    """Fields read as ``receiver.field`` (the receiver may be dotted, e.g. ``sol.stats``)."""
    out: dict[str, set[str]] = {}
    for r in receivers:
        out[r] = set(re.findall(rf"(?<![\w.]){re.escape(r)}\.({IDENT})", code))
    return out


def read(path: Path) -> str:
    return strip_code(path.read_text())
