"""Progress lines for the long steps of quantize and export (wall time, the process's peak RSS), and releasing
memory between them."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import resource
import sys
import time
from collections.abc import Iterator


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
