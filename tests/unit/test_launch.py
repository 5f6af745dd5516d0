"""``--nproc N``: the torchrun command line it starts."""

from __future__ import annotations

import sys

from dqdeploy.system.launch import torchrun_command, without_option


def test_without_option_drops_both_spellings_only():
    argv = ["quantize", "m", "--nproc", "2", "--out", "q", "--nproc=3", "--nprocs", "x"]
    assert without_option(argv, "--nproc") == ["quantize", "m", "--out", "q", "--nprocs", "x"]


def test_torchrun_command_runs_the_same_command_without_nproc():
    cmd = torchrun_command(2, ["-v", "quantize", "m", "--out", "q", "--nproc", "2"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd
    assert cmd[cmd.index("dqdeploy") - 1 :] == ["-m", "dqdeploy", "-v", "quantize", "m", "--out", "q"]
