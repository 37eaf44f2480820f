"""mkdocs hook: tables and API listings generated from the code itself at build time.

Markers in the Markdown pages are replaced before rendering:

* ``<!-- solver-table -->``: every registered solver (``pyneuralode.solvers.REGISTRY``).
* ``<!-- sensealg-table -->``: every sensitivity algorithm (``pyneuralode.sensitivity.__all__``).
* ``<!-- steady-table -->``: every steady-state solver (``pyneuralode.steady``).
* ``<!-- api: MODULE -->``: a mkdocstrings ``:::`` block for each name in ``MODULE.__all__``
  (documented under its public path), so a new public name appears without editing a page.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

# Document the checkout this hook belongs to, whatever pyneuralode is installed elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_API = re.compile(r"<!--\s*api:\s*([\w.]+)(?:\s+as\s+([\w.]+))?\s*-->")


def _summary(obj, sentences: int | None = None) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    if sentences:  # the first sentence(s) only: the API page has the rest
        first = " ".join(re.split(r"(?<=\.)\s+(?=[A-Z(])", first)[:sentences])
    return first.replace("|", "\\|")


def solver_table() -> str:
    from pyneuralode.solvers import REGISTRY

    rows = [
        "| Class | String names | Family | Order | Error estimate | Summary |",
        "|---|---|---|---|---|---|",
    ]
    classes = {}
    for key, cls in REGISTRY.items():
        classes.setdefault(cls, []).append(key)
    for cls, keys in classes.items():
        inst = cls()
        err = getattr(inst, "error_order", None)
        multistep = getattr(cls, "multistep", False)
        order = "1–5 (variable)" if multistep else str(inst.order)
        err = "variable" if multistep else err
        family = {"bdf": "multistep (implicit)", "explicit": "explicit Runge–Kutta"}.get(
            cls.__module__.rsplit(".", 1)[-1], cls.__module__.rsplit(".", 1)[-1] + " (implicit)"
        )
        names = ", ".join(f'`"{k}"`' for k in sorted(keys))
        rows.append(
            f"| [`{cls.__name__}`][pyneuralode.{cls.__name__}] | {names} | {family} | {order} | "
            f"{'none (fixed `dt`)' if not err else err if multistep else 'order ' + str(err)} | "
            f"{_summary(cls, 1)} |"
        )
    return "\n".join(rows)


def sensealg_table() -> str:
    import pyneuralode.sensitivity as sens

    rows = ["| Name | Used with | Summary |", "|---|---|---|"]
    for name in sens.__all__:
        obj = getattr(sens, name)
        if name.startswith("Abstract"):
            continue
        where = (
            "`pn.solve` / `pn.odeint` / models"
            if isinstance(obj, type) and issubclass(obj, sens.AbstractSensitivity)
            else "`pn.steady_state` / `pn.DEQ`"
        )
        rows.append(f"| [`{name}`][pyneuralode.{name}] | {where} | {_summary(obj)} |")
    return "\n".join(rows)


def steady_table() -> str:
    import pyneuralode.steady as st

    rows = ["| Name | Summary |", "|---|---|"]
    for name in st.__all__:
        obj = getattr(st, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, st.AbstractSteadyStateSolver)
            and not name.startswith("Abstract")
        ):
            rows.append(f"| [`{name}`][pyneuralode.{name}] | {_summary(obj)} |")
    return "\n".join(rows)


def api_blocks(module: str, public: str | None) -> str:
    mod = importlib.import_module(module)
    prefix = public or module
    # classes and functions; constants (tuples, strings) are named in the page's text
    return "\n\n".join(
        f"::: {prefix}.{name}" for name in mod.__all__ if callable(getattr(mod, name))
    )


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|obj|data|exc):(?=<code>)")


def on_page_content(html, page, config, files):
    # Docstrings use Sphinx roles (:class:`X`); the rendered code span is kept, the role dropped.
    return _ROLE.sub("", html)


def on_page_markdown(markdown, page, config, files):
    markdown = markdown.replace("<!-- solver-table -->", solver_table())
    markdown = markdown.replace("<!-- sensealg-table -->", sensealg_table())
    markdown = markdown.replace("<!-- steady-table -->", steady_table())
    return _API.sub(lambda m: api_blocks(m.group(1), m.group(2)), markdown)
