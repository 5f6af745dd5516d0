"""Running the ``dqdeploy`` CLI as a user does: in-process through ``main()`` (fast, same exit codes
and error printing) or as a real subprocess (signals, concurrency); asserting the user-facing contract."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(*args, cwd: Path | None = None) -> Result:
    """``dqdeploy ARGS`` in this process; an exception escaping ``main()`` is a traceback (re-raised)."""
    from dqdeploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, old_cwd = sys.argv, os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    sys.argv = ["dqdeploy", *map(str, args)]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(old_cwd)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return Result(code, out.getvalue(), err.getvalue())


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def spawn(*args, cwd: Path | None = None, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """``dqdeploy ARGS`` as a real subprocess (for signals and concurrent runs)."""
    return subprocess.Popen([sys.executable, "-m", "dqdeploy.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env() | (env_extra or {}), cwd=cwd or ROOT)


def refused(result: Result, *needles: str, code: int | None = None) -> None:
    """A user error: non-zero exit, no traceback, ``error:``/usage message naming every needle."""
    assert result.returncode != 0, result.stdout + result.stderr
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    text = result.stderr.lower()
    assert "error" in text, result.stderr
    for needle in needles:
        assert needle.lower() in text, f"{needle!r} not in: {result.stderr}"


def has_fix(result: Result) -> None:
    """The message says how to fix it (a ``fix:`` line or a usage hint)."""
    assert "fix:" in result.stderr or "Try 'dqdeploy" in result.stderr or "--help" in result.stderr, result.stderr


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to assert that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary or old folders dqdeploy might leave next to outputs."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if ".tmp-" in p.name or ".old-" in p.name or p.name.startswith(".dqdeploy-probe"))
