"""Progress bars are drawn on terminals only (issue 23): a log file gets no carriage-return redraws."""

from __future__ import annotations

import io
import os

from dqdeploy.core.terminal import PROGRESS_ENV, bar, on_terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not on_terminal() and bar(range(3)).disable
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert on_terminal()
    if not os.environ.get("TQDM_DISABLE"):  # tqdm reads its environment when it is imported
        assert not bar(range(3), file=terminal).disable
    assert bar(range(3), file=terminal, disable=True).disable


def test_the_launcher_decides_for_its_workers(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a worker's stderr: the launcher's pipe
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert on_terminal()
    monkeypatch.setattr("sys.stderr", _Terminal())
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not on_terminal()
