"""The schema of a quantize checkpoint's ``checkpoint.json`` (``checkpoint.py``): what a resume checks before it
trusts any key of the state."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..quant.distill import BlockReport


def schema_problems(state: dict[str, Any]) -> list[str]:
    """What is wrong with a checkpoint state's keys and types (a resume trusts nothing it did not check)."""
    problems = []
    allowed = {"format", "format_version", "fingerprint", "pid", "started", "blocks", "files", "search"}
    if set(state) - allowed:
        problems.append(f"unknown keys {sorted(set(state) - allowed)}")
    fp = state.get("fingerprint")
    if not (isinstance(fp, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in fp.items())):
        problems.append("fingerprint must map names to sha256 strings")
    files = state.get("files")
    if not (isinstance(files, dict) and all(isinstance(k, str) and "/" not in k and k not in ("", ".", "..")
                                            and isinstance(v, dict) and set(v) == {"sha256", "size"}
                                            for k, v in files.items())):
        problems.append("files must map file names in the folder to {sha256, size}")
    search = state.get("search", {"order": [], "gains": {}})
    order, gains = (search.get("order"), search.get("gains")) if isinstance(search, dict) else (None, None)
    if not (isinstance(search, dict) and set(search) == {"order", "gains"} and isinstance(order, list)
            and all(isinstance(n, str) for n in order) and isinstance(gains, dict)
            and all(n in order and isinstance(g, float) and math.isfinite(g) for n, g in gains.items())):
        problems.append("search must hold the fallback search's layer order and a finite gain per scored layer")
    blocks = state.get("blocks")
    fields = {f.name for f in dataclasses.fields(BlockReport)} | {"index"}
    if not isinstance(blocks, list):
        problems.append("blocks must be a list")
    else:
        for b in blocks:
            ok = (isinstance(b, dict) and set(b) == fields and isinstance(b.get("index"), int)
                  and isinstance(b.get("name"), str))
            numbers = ([b["loss_before"], b["loss_after"], *(b["curve"] if isinstance(b["curve"], list) else [None])]
                       if ok else [])
            if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                 for v in numbers):
                problems.append(f"block record {str(b)[:80]} is not {{index, name, finite losses}}")
                break
    return problems
