"""Interruptions: SIGINT and SIGTERM raise in the main thread (so every ``finally`` and atomic writer
cleans up), but never inside a module import, where an exception thrown through torch's native
initialisation aborts the process; there the signal is re-delivered shortly after."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally``/atomic writer cleans up."""


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def on_signal(signum, frame) -> None:
    """SIGINT/SIGTERM: raise in the main thread, but never inside a module import (an exception
    thrown through torch's native initialisation aborts the process): re-deliver it shortly after."""
    if _importing(frame):
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises :class:`Terminated`, SIGINT ``KeyboardInterrupt`` (both deferred past imports)."""
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


@contextmanager
def deferred() -> Iterator[None]:
    """SIGINT/SIGTERM held back for a short step that must not be cut in half (create then remove);
    delivered, and raised, as soon as it is done. Outside the main thread: no effect.

    Held by swapping the Python handlers, not by the thread's signal mask: a process-directed signal goes
    to any thread that does not block it (onnxruntime starts one at import), and Python then runs the
    handler in the main thread at once; the Python-level handler is what every thread's signal reaches."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():  # None: a handler not set from Python; the default then
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
