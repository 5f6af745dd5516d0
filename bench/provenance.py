"""Where a benchmark result comes from: the commit, a hash of the code it measured, the date and the CPU.

Light on purpose (no torch): ``bench/common.py`` stamps every result with :func:`provenance` when it writes
``bench/results``, and ``bench/report.py`` judges each stored result with :func:`verdict` against the
code hash of the tree it renders from.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = "dqdeploy"  # the code a result measures: every tracked file under it (sources and the shipped assets)
PROVENANCE_KEYS = ("commit", "code_hash", "date", "machine")
# measured data shipped in the package, written by a bench script: not the code a result measures (else writing it
# would make that script's own results, and every other, stale)
MEASURED_DATA = ("dqdeploy/assets/quality_reference.json",)


def _git(*args: str, root: Path = ROOT) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout
    except OSError:  # no git at all
        return ""


def git_commit(root: Path = ROOT) -> str:
    """The commit the measured code is at (``+dirty`` when tracked code, outside bench/results and the
    Markdown files, differs from it)."""
    head = _git("rev-parse", "--short", "HEAD", root=root).strip() or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!*.md",
                 *(f":!{f}" for f in MEASURED_DATA), root=root).strip()
    return head + ("+dirty" if dirty else "")


def code_files(root: Path = ROOT) -> list[str]:
    """The files :func:`code_hash` covers, relative to ``root``, in a fixed order: git's tracked files under
    dqdeploy/ (every file under it, caches aside, where ``root`` is not a git work tree), ``MEASURED_DATA`` aside."""
    listed = _git("ls-files", "-z", "--", CODE, root=root)
    if listed:
        return sorted(f for f in listed.split("\0") if f and f not in MEASURED_DATA)
    return sorted(rel for rel in (p.relative_to(root).as_posix() for p in (root / CODE).rglob("*")
                                  if p.is_file() and "__pycache__" not in p.parts) if rel not in MEASURED_DATA)


def code_hash(root: Path = ROOT) -> str:
    """sha256 over the measured code as it is in the work tree now (uncommitted edits included): each file's
    path and contents, in :func:`code_files`' order. Two results with the same hash measured the same code."""
    h = hashlib.sha256()
    for rel in code_files(root):
        path = root / rel
        h.update(rel.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def missing(entry: dict) -> list[str]:
    """What a result lacks to count as a measurement of known code on a known CPU (empty: nothing)."""
    out = []
    commit = entry.get("commit")
    if not commit or commit == "unknown":
        out.append("commit")
    machine = entry.get("machine") or {}
    if not machine.get("cpu") or "int8_class" not in machine or "int8_flags" not in machine:
        out.append("CPU model and int8 flags")
    if str(entry.get("command", "")).startswith("manual"):
        out.append("script (run by hand)")
    return out


def verdict(entry: dict, current_hash: str) -> tuple[str, str]:
    """``("refused", why)`` for a result without its commit or CPU, ``("stale", why)`` for one measured on
    other code than ``current_hash`` (or before code hashes were recorded), else ``("current", "")``."""
    lacking = missing(entry)
    if lacking:
        return "refused", "no " + " and no ".join(lacking) + " recorded"
    if not entry.get("code_hash"):
        return "stale", "measured before code hashes were recorded"
    if entry["code_hash"] != current_hash:
        return "stale", f"measured on code {entry['code_hash'][:12]}; dqdeploy/ has changed since"
    return "current", ""
