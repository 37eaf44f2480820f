"""The documentation site: `mkdocs build --strict` succeeds, the generated tables and the API
reference cover the code's registries and public names, and the built pages render in headless
Chromium without console errors."""

from __future__ import annotations

import functools
import html
import http.server
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_DEPS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_docs_deps():
    return [
        m
        for m in DOCS_DEPS
        if importlib.util.find_spec(m.split(".")[0]) is None
        or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = _missing_docs_deps()
    if missing:
        pytest.skip(
            f"docs dependencies not installed ({', '.join(missing)}): pip install -e '.[docs]'"
        )
    out = tmp_path_factory.mktemp("site")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert time.perf_counter() - t0 < 240  # generous: the build takes ~10-30 s
    return out


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_strict_build_renders_every_page(site):
    for page in (
        "index.html",
        "getting-started/index.html",
        "solvers/index.html",
        "gradients/index.html",
        "stiff/index.html",
        "events/index.html",
        "deq/index.html",
        "models/index.html",
        "julia/index.html",
        "torchdiffeq/index.html",
        "api/solve/index.html",
    ):
        assert (site / page).stat().st_size > 1000, page


def test_solver_and_sensealg_tables_come_from_the_registries(site):
    import pyneuralode.sensitivity as sens
    from pyneuralode.solvers import REGISTRY

    solvers = _text(site / "solvers" / "index.html")
    for key, cls in REGISTRY.items():
        assert f"&quot;{key}&quot;" in solvers or f'"{key}"' in solvers, key
        assert f'href="../api/solvers/#pyneuralode.{cls.__name__}"' in solvers, cls.__name__
    gradients = _text(site / "gradients" / "index.html")
    for name in sens.__all__:
        if not name.startswith("Abstract"):
            assert f"#pyneuralode.{name}" in gradients, name


def test_every_public_name_has_a_rendered_docstring(site):
    import pyneuralode as pn
    import pyneuralode.data
    import pyneuralode.julia

    api = "".join(_text(p) for p in (site / "api").rglob("index.html"))
    names = [("pyneuralode", n, getattr(pn, n)) for n in pn.__all__]
    names += [
        ("pyneuralode.julia", n, getattr(pyneuralode.julia, n)) for n in pyneuralode.julia.__all__
    ]
    names += [
        ("pyneuralode.data", n, getattr(pyneuralode.data, n)) for n in pyneuralode.data.__all__
    ]
    missing = [
        f"{mod}.{n}"
        for mod, n, obj in names
        if callable(obj)
        and f'.{n}"' not in api.replace(f'id="{mod}.odeint.odeint"', f'id="{mod}.odeint"')
    ]
    assert not missing, f"public names without an API entry: {missing}"
    # each docstring itself is rendered, not only the heading: its first words are in the page text
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", api)))
    text = re.sub(r"\( ", "(", re.sub(r" ([,.;:)])", r"\1", text))
    undocumented, unrendered = [], []
    for mod, n, obj in names:
        if not callable(obj):
            continue
        doc = inspect.getdoc(obj)
        if not doc:
            undocumented.append(f"{mod}.{n}")
            continue
        probe = " ".join(re.sub(r":\w+:|`", "", doc.split("\n")[0]).split()[:4])
        if probe not in text:
            unrendered.append((f"{mod}.{n}", probe))
    assert not undocumented, f"public names without a docstring: {undocumented}"
    assert not unrendered, f"docstrings not rendered: {unrendered}"
    assert ":class:" not in api  # Sphinx roles are dropped by the docs hook


# -- headless Chromium over the DevTools protocol (pipe transport: no extra Python packages) -------


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _pipe_fds(read_fd, write_fd):
    # In the child: the browser reads commands on fd 3 and writes answers on fd 4.
    r, w = os.dup(read_fd), os.dup(write_fd)  # above 4, so the dup2s below cannot clobber them
    os.dup2(r, 3)
    os.dup2(w, 4)


class _CDP:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fds 3 and 4)."""

    def __init__(self, binary, profile):
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=functools.partial(_pipe_fds, to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read_message(self, deadline):
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=None, timeout=60):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method, timeout=60):
        deadline = time.monotonic() + timeout
        for i, m in enumerate(self.events):
            if m.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # already gone: nothing to close
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._r)
        os.close(self._w)


def _errors(events):
    out = []
    for m in events:
        p = m.get("params", {})
        if m.get("method") == "Runtime.exceptionThrown":
            out.append(
                p["exceptionDetails"].get("exception", {}).get("description")
                or p["exceptionDetails"]["text"]
            )
        elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(
                " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))
            )
        elif m.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"{p['entry'].get('text')} ({p['entry'].get('url', '')})")
    return out


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_index_and_api_page_render_in_headless_chromium_without_console_errors(served, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip(
            "no headless Chromium here (Debian: apt-get install chromium; scripts/setup.sh "
            "installs it)"
        )
    cdp = _CDP(binary, tmp_path / "profile")
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            cdp.send(f"{domain}.enable", session=session)
        checks = {
            "/": "document.querySelector('h1') && document.querySelector('h1').textContent",
            "/api/solve/": "document.querySelectorAll('.doc-heading').length + ' ' + "
            "document.getElementById('pyneuralode.solve').textContent",
        }
        seen = {}
        for path, expr in checks.items():
            cdp.events.clear()
            cdp.send("Page.navigate", {"url": served + path}, session=session)
            cdp.wait_for("Page.loadEventFired")
            time.sleep(1.0)  # let the theme's scripts (search index, navigation) run
            value = cdp.send(
                "Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session
            )["result"].get("value")
            errors = _errors(cdp.events)
            assert not errors, f"console errors on {path}: {errors}"
            seen[path] = value
    finally:
        cdp.close()
    assert seen["/"] and "pyneuralode" in seen["/"]
    count, heading = seen["/api/solve/"].split(" ", 1)
    assert int(count) >= 5 and "solve" in heading
