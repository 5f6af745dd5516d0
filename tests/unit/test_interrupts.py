"""Signals held back by ``interrupts.deferred`` arrive, and raise, right after the step."""

from __future__ import annotations

import os
import signal

import pytest

from dqdeploy.system.interrupts import Terminated, deferred, on_signal


def test_a_signal_inside_deferred_is_raised_after_it():
    previous = signal.signal(signal.SIGTERM, on_signal)
    steps = []
    try:
        with pytest.raises(Terminated):
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("finished")  # not cut in half
            steps.append("after")  # the held signal is raised before this line
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert steps == ["finished"]


def test_a_signal_is_held_while_other_threads_run():
    """A process-directed signal may reach any thread that does not block it (onnxruntime starts one at
    import): it must still wait for the end of the step."""
    import threading

    stop = threading.Event()
    others = [threading.Thread(target=stop.wait, daemon=True) for _ in range(4)]
    for t in others:
        t.start()
    previous = signal.signal(signal.SIGTERM, on_signal)
    steps = []
    try:
        for _ in range(20):  # the kernel picks the receiving thread; try it often
            with pytest.raises(Terminated):
                with deferred():
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(1000):  # bytecodes during which an undeferred handler would run
                        pass
                    steps.append("finished")
                steps.append("after")
            signal.signal(signal.SIGTERM, on_signal)  # on_signal ignores a second SIGTERM; re-arm it
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
    assert steps == ["finished"] * 20
