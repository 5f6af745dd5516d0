"""``dqdeploy quantize ... --nproc N``: the same command as N local processes under torchrun.

torchrun (``torch.distributed.run``) runs as a child process with the command's own arguments
(``--nproc`` removed). SIGINT/SIGTERM sent to this process reach torchrun, which stops its workers (each
removes its temporary folders). The ranks' own output passes through as it comes; torchrun's closing
traceback of a failed or signalled job (``ChildFailedError``, ``SignalException``) is dropped -- the
rank's error message above it says what happened -- and the exit status is the command's own (rank 0
writes it to ``DQDEPLOY_EXIT_FILE``), not torchrun's 1. torchrun's log folder is a temporary folder of
this process, removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from ..core.terminal import PROGRESS_ENV, on_terminal
from .interrupts import Terminated

EXIT_FILE_ENV = "DQDEPLOY_EXIT_FILE"
TRACEBACK = b"Traceback (most recent call last):"
LAUNCHER_ERRORS = (b"ChildFailedError", b"SignalException")  # torchrun's own report of a failed / signalled job


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, argv: list[str], log_dir: str | None = None) -> list[str]:
    """The torchrun command line that runs ``dqdeploy ARGV`` as ``nproc`` processes on this machine."""
    logs = [f"--log-dir={log_dir}"] if log_dir else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *logs,
            "-m", "dqdeploy", *without_option(argv, "--nproc")]


def under_launcher() -> bool:
    """Whether this process is a rank started by ``--nproc`` (its output shares the launcher's terminal)."""
    return EXIT_FILE_ENV in os.environ


def local_peer() -> bool:
    """Whether this process is a rank other than 0 started by ``--nproc``."""
    return under_launcher() and os.environ.get("RANK", "0") != "0"


def write_exit_status(code: int) -> None:
    """Rank 0 records the command's exit status for the launcher (a no-op outside ``--nproc``)."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(str(code))


def _forward(stream: IO[bytes], out: IO[bytes]) -> None:
    """Copy ``stream`` to ``out`` as it comes, holding back from the last traceback on; at the end drop that
    traceback if it is torchrun's report of the job, else write it."""
    held = b""
    while chunk := stream.read1(1 << 16):  # type: ignore[attr-defined]
        if not held and TRACEBACK not in chunk:
            out.write(chunk)
            out.flush()
            continue
        data = held + chunk
        at = data.rfind(TRACEBACK)
        out.write(data[:at] if at > 0 else b"")
        out.flush()
        held = data[max(at, 0):]
    if held and not any(e in held for e in LAUNCHER_ERRORS):
        out.write(held)
    out.flush()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``dqdeploy ARGV`` under torchrun with ``nproc`` local processes; returns its exit status."""
    scratch = tempfile.mkdtemp(prefix="dqdeploy-torchrun-")
    exit_file = Path(scratch) / "exit-status"
    try:
        # the workers' stderr is a pipe to this process: they draw progress bars where this one would
        env = {**os.environ, EXIT_FILE_ENV: str(exit_file), "TMPDIR": scratch,
               PROGRESS_ENV: "1" if on_terminal() else "0"}
        proc = subprocess.Popen(torchrun_command(nproc, argv, scratch), stderr=subprocess.PIPE, env=env)
        assert proc.stderr is not None
        forward = threading.Thread(target=_forward, args=(proc.stderr, sys.stderr.buffer), daemon=True)
        forward.start()
        code = _wait(proc)
        forward.join(timeout=10)
        recorded = exit_file.read_text().strip() if exit_file.is_file() else ""
        return int(recorded) if code != 0 and recorded.isdigit() else code
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _wait(proc: subprocess.Popen) -> int:
    """torchrun's exit status; an interruption of this process is passed on to it first."""
    try:
        return _status(proc.wait())
    except (KeyboardInterrupt, Terminated) as exc:
        try:  # a terminal's Ctrl-C reached the whole process group already; a signal sent to us alone did not
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
