"""Signals held back by ``interrupts.deferred`` arrive, and raise, right after the step."""

from __future__ import annotations

import os
import signal

import pytest

from dqdeploy.interrupts import Terminated, deferred, on_signal


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
