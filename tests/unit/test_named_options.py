"""Every command-line option a message of dqdeploy names (errors, hints, warnings, help) is one that exists: an option
of a ``dqdeploy`` command, or of the other tool the message is about (torchrun, TensorRT's trtexec)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from dqdeploy.cli import cli

PACKAGE = Path(__file__).resolve().parents[2] / "dqdeploy"
OTHER_TOOLS = {"--nproc-per-node", "--standalone", "--log-dir", "--master-addr", "--rdzv-endpoint",  # torchrun
               "--int8"}  # trtexec
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def dqdeploy_options() -> set[str]:
    names = {"--help", "--verbose", "--version"}
    for command in cli.commands.values():
        for param in command.params:
            names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return names


def named_options() -> dict[str, list[str]]:
    """``--flag`` -> where a string literal of the package names it (file:line)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    found.setdefault(flag, []).append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_every_option_a_message_names_exists():
    known = dqdeploy_options() | OTHER_TOOLS
    named = named_options()
    assert len(named) > 40  # the scan sees the package's messages
    unknown = {flag: where for flag, where in named.items() if flag not in known}
    assert not unknown, f"messages name options no command has: {unknown}"


def test_the_scan_finds_a_misspelt_option():
    assert FLAG.findall("pass --calib-sample 512 (not --x-y), a-b--c stays out") == ["--calib-sample", "--x-y"]
    assert "--calib-sample" not in dqdeploy_options() and "--calib-samples" in dqdeploy_options()
