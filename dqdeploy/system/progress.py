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
def stage(log: logging.Logger, name: str) -> Iterator[None]:
    """Log ``name`` on ``log`` when it starts and, when it ends, its seconds and the peak RSS so far."""
    start = time.perf_counter()
    log.info("%s ...", name)
    yield
    now = rss_gb()
    log.info("%s: %.1f s (peak RSS so far %.2f GB%s)", name, time.perf_counter() - start, peak_rss_gb(),
             "" if now is None else f", now {now:.2f} GB")


def progress(items: Iterable[T], total: int, desc: str, *, unit: str = "it", log: logging.Logger = PROGRESS,
             every: float = 60.0, terminal: bool | None = None,
             clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """``items`` under a tqdm bar (count, elapsed, estimated time left); where stderr is not a terminal (a log
    file, a pipe) also lines on ``log``: at the start, after an item once ``every`` seconds (on ``clock``) have
    passed since the last line (done / ``total``, elapsed, estimated time left), at the end, and while one item runs
    longer than ``every`` seconds, one every ``every`` seconds. Under torchrun rank 0 alone reports."""
    from .distributed import is_writer

    writer = is_writer()
    on_term = on_terminal() if terminal is None else terminal
    lines = writer and not on_term
    start = last = clock()
    state = {"done": 0, "line": time.monotonic()}
    if lines:
        log.info("%s: 0/%d %s", desc, total, unit)
    shown = bar(items, terminal=on_term, total=total, desc=desc, unit=unit, leave=False, disable=not writer)
    beat = (_heartbeat(log, f"{desc}: %d/{total} {unit}, %s elapsed, the next one still running", every, state)
            if lines else contextlib.nullcontext())
    with beat:
        try:
            for done, item in enumerate(shown, 1):
                yield item
                now, state["done"] = clock(), done
                if lines and (now - last >= every or done == total):
                    last, elapsed, state["line"] = now, now - start, time.monotonic()
                    log.info("%s: %d/%d %s, %s elapsed, about %s left", desc, done, total, unit,
                             _duration(elapsed), _duration(elapsed / done * (total - done)))
        finally:
            shown.close()


@contextlib.contextmanager
def _heartbeat(log: logging.Logger, line: str, every: float, state: dict[str, float]) -> Iterator[None]:
    """A thread that logs ``line % (state["done"], elapsed)`` whenever ``every`` seconds passed since
    ``state["line"]`` (the last line, ``time.monotonic``): an item that takes long is no silence."""
    stop, start = threading.Event(), time.monotonic()

    def beat() -> None:
        while not stop.wait(min(every / 4, 5.0)):
            if time.monotonic() - state["line"] >= every:
                state["line"] = time.monotonic()
                log.info(line, state["done"], _duration(state["line"] - start))

    thread = threading.Thread(target=beat, name="dqdeploy-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
