"""Progress bars: tqdm on a terminal, a few summary lines otherwise (batch jobs, CI logs)."""

from __future__ import annotations

import sys
import time

__all__ = ["progress"]


class _Summary:
    """Stands in for a tqdm bar when stderr is not a terminal: a few summary lines, no carriage
    returns."""

    def __init__(self, iterable=None, desc="", total=None, lines=4, disable=False, **_):
        self.iterable, self.desc, self.disable = iterable, desc or "progress", disable
        self.total = (
            total
            if total is not None
            else (len(iterable) if hasattr(iterable, "__len__") else None)
        )
        self.n, self.postfix, self.lines, self._printed = 0, "", max(1, lines), -1
        self._t0 = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, ordered_dict=None, refresh=True, **kw):
        kw = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = str(s)

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or self.desc

    def update(self, n=1):
        self.n += n
        self.refresh()

    def refresh(self):
        # also called after `bar.n = k` (the integrate loop sets n directly)
        if self.total:
            k = int(self.lines * self.n / self.total)  # print at each 1/lines of the way
            if k > self._printed and k < self.lines:
                self._emit()
                self._printed = k

    def _emit(self):
        if self.disable:
            return
        frac = f"{self.n}/{self.total}" if self.total else str(self.n)
        tail = f" [{self.postfix}]" if self.postfix else ""
        print(
            f"{self.desc}: {frac} in {time.perf_counter() - self._t0:.1f} s{tail}",
            file=sys.stderr,
            flush=True,
        )

    def close(self):
        if self._printed != self.lines:
            self._emit()
            self._printed = self.lines


def progress(iterable=None, **kw):
    """A tqdm progress bar, e.g. ``for it in progress(range(n), desc="train")``.

    When stderr is not a terminal (batch jobs, CI logs) a few summary lines replace the bar.
    """
    if not sys.stderr.isatty():
        return _Summary(iterable, **kw)
    from tqdm.auto import tqdm

    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
