"""Progress lines for the long steps of quantize and export (wall time, the process's peak RSS), progress over the
items of a long loop, and releasing memory between them."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from ..core.terminal import bar, on_terminal

T = TypeVar("T")
PROGRESS = logging.getLogger("dqdeploy.progress")  # the CLI shows its lines without -v
EVERY = 50.0  # seconds between progress lines at most (+ the heartbeat's 1 s tick): no step silent for a minute


def rss_gb() -> float | None:
    """Resident memory of this process now, in GB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 1e9
    except OSError:
        return None


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


@contextlib.contextmanager
def stage(log: logging.Logger, name: str, *, every: float = EVERY) -> Iterator[None]:
    """Log ``name`` on ``log`` when it starts and, when it ends, its seconds and the peak RSS so far; where stderr is
    not a terminal, a line on :data:`PROGRESS` whenever ``every`` seconds pass with no other progress line (a step
    without its own progress is no silence)."""
    from .distributed import is_writer

    start = time.perf_counter()
    log.info("%s ...", name)
    with _heartbeat(lambda elapsed: PROGRESS.info("%s: still running, %s elapsed", name, _duration(elapsed)),
                    every, enabled=is_writer() and not on_terminal()):
        yield
    now = rss_gb()
    log.info("%s: %.1f s (peak RSS so far %.2f GB%s)", name, time.perf_counter() - start, peak_rss_gb(),
             "" if now is None else f", now {now:.2f} GB")


class Progress:
    """A count of done units out of ``total`` under a tqdm bar (count, elapsed, estimated time left); where stderr is
    not a terminal (a log file, a pipe) also lines on ``log``: at the start, after an update once ``every`` seconds
    (on ``clock``) have passed since the last line (done / ``total``, elapsed, estimated time left), at the end, and
    while one unit runs longer than ``every`` seconds, one every ``every`` seconds. Under torchrun rank 0 alone
    reports; ``enabled=False`` shows nothing. Use it as a context manager, calling :meth:`update` after each unit (or
    :func:`progress` over items)."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", log: logging.Logger = PROGRESS,
                 every: float = EVERY, terminal: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True) -> None:
        from .distributed import is_writer

        writer = enabled and is_writer()
        on_term = on_terminal() if terminal is None else terminal
        self.total, self.desc, self.unit, self.log, self.every, self.clock = total, desc, unit, log, every, clock
        self.lines = writer and not on_term
        self.start = self.last = clock()
        self.done = 0
        self.shown = bar(terminal=on_term, total=total, desc=desc, unit=unit, leave=False, disable=not writer)
        self.beat = _heartbeat(lambda elapsed: log.info("%s: %d/%d %s, %s elapsed, the next one still running", desc,
                                                        self.done, total, unit, _duration(elapsed)),
                               every, enabled=self.lines)

    def __enter__(self) -> Progress:
        if self.lines:
            _LAST_LINE[0] = time.monotonic()
            self.log.info("%s: 0/%d %s", self.desc, self.total, self.unit)
        self.beat.__enter__()
        return self

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.shown.update(n)
        done = self.done = self.done + n
        now = self.clock()
        if self.lines and (now - self.last >= self.every or done == self.total):
            self.last, elapsed = now, now - self.start
            _LAST_LINE[0] = time.monotonic()
            self.log.info("%s: %d/%d %s, %s elapsed, about %s left", self.desc, done, self.total, self.unit,
                          _duration(elapsed), _duration(elapsed / done * max(self.total - done, 0)))

    def __exit__(self, *exc: object) -> None:
        try:
            self.beat.__exit__(None, None, None)
        finally:
            self.shown.close()


def progress(items: Iterable[T], total: int, desc: str, *, unit: str = "it", log: logging.Logger = PROGRESS,
             every: float = EVERY, terminal: bool | None = None,
             clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """``items`` under a :class:`Progress` of ``total`` units, one per item."""
    with Progress(total, desc, unit=unit, log=log, every=every, terminal=terminal, clock=clock) as shown:
        for item in items:
            yield item
            shown.update()


_LAST_LINE = [time.monotonic()]  # when the last progress line was written (time.monotonic)
_BEATING: list[object] = []  # the open heartbeats, innermost last: only the innermost writes


@contextlib.contextmanager
def _heartbeat(line: Callable[[float], None], every: float, *, enabled: bool = True) -> Iterator[None]:
    """A thread that calls ``line(seconds since the start)`` whenever ``every`` seconds passed with no progress line
    (:data:`_LAST_LINE`), while this is the innermost open heartbeat: a long item or step is no silence."""
    if not enabled:
        yield
        return
    stop, start, token = threading.Event(), time.monotonic(), object()

    def beat() -> None:
        while not stop.wait(min(every / 4, 1.0)):
            if _BEATING[-1:] == [token] and time.monotonic() - _LAST_LINE[0] >= every:
                _LAST_LINE[0] = time.monotonic()
                line(_LAST_LINE[0] - start)

    _LAST_LINE[0] = start
    _BEATING.append(token)
    thread = threading.Thread(target=beat, name="dqdeploy-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _BEATING.remove(token)


def _duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``42s``."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; elsewhere a no-op):
    without it, the peak of one stage stays resident through the next."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; elsewhere a no-op). Cheap (well under a
    millisecond), unlike a garbage collection (a sixth of a second with torch and diffusers loaded)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
