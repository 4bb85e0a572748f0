"""Progress of long work: a tqdm bar on a terminal, periodic structured log lines elsewhere.

Without a terminal (CI, containers, the demo's training subprocess writing to a log file) a bar's
carriage-return redraws become thousands of lines of noise; there a ``progress`` log line every
``settings.progress_log_s`` seconds (and one at the end) says how far the work is, as JSON like
every other log line. One function for every long loop::

    for batch in progress(batches, desc="embedding", unit="batch", enabled=show):
        ...
    with progress(total=n, desc="publish", unit="ev") as bar:
        bar.update(k)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

import structlog
from tqdm import tqdm

T = TypeVar("T")
log = structlog.get_logger(__name__)


class LoggedProgress(Generic[T]):
    """tqdm's interface (iteration, ``update``, ``set_postfix``, ``close``, a context manager)
    that logs a ``progress`` line at most every ``every_s`` seconds instead of drawing; nothing at
    all when not ``enabled``."""

    def __init__(self, iterable: Iterable[T] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, every_s: float = 30.0) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled, self.every_s = enabled, every_s
        self.n = 0.0
        self.postfix: dict[str, Any] = {}
        self.lines = 0  # log lines written (tests count them)
        self._started = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("progress() without an iterable is updated with update(n), not iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.enabled and time.monotonic() - self._last >= self.every_s:
            self._log("progress")

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._log("progress_done")

    def _log(self, event: str) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = now - self._started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        fields: dict[str, Any] = {"task": self.desc, "done": round(self.n, 3), "unit": self.unit,
                                  "elapsed_s": round(elapsed, 1), "per_s": round(rate, 2)}
        if self.total:
            fields |= {"total": self.total, "percent": round(100 * self.n / self.total, 1)}
            if rate > 0 and self.n < self.total:
                fields["eta_s"] = round((self.total - self.n) / rate, 1)
        self.lines += 1
        log.info(event, **fields, **self.postfix)

    def __enter__(self) -> LoggedProgress[T]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# What progress() returns: annotate a bar passed around with it.
Progress = tqdm | LoggedProgress


def progress(iterable: Iterable[T] | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True, leave: bool = True, every_s: float | None = None,
             tty: bool | None = None) -> tqdm | LoggedProgress[T]:
    """A tqdm bar when ``enabled`` and stderr is a terminal (``tty`` overrides the check), else a
    :class:`LoggedProgress` logging every ``every_s`` seconds (default
    ``settings.progress_log_s``); ``enabled=False``: silent either way."""
    if tty is None:
        tty = sys.stderr.isatty()
    if enabled and tty:
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    if every_s is None:
        from core.settings import load_settings

        every_s = load_settings().progress_log_s
    return LoggedProgress(iterable, total=total, desc=desc, unit=unit, enabled=enabled, every_s=every_s)
