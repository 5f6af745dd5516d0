"""``dqdeploy quantize ... --nproc N``: the same command as N local processes under torchrun.

torchrun (``torch.distributed.run``) runs as a child process with the command's own arguments
(``--nproc`` removed); its exit status is the command's. SIGINT/SIGTERM sent to this process reach
torchrun, which stops its workers (each removes its temporary folders).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from .interrupts import Terminated


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


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``dqdeploy ARGV`` as ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dqdeploy", *without_option(argv, "--nproc")]


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``dqdeploy ARGV`` under torchrun with ``nproc`` local processes; returns its exit status."""
    proc = subprocess.Popen(torchrun_command(nproc, argv))
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
