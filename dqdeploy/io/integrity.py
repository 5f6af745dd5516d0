"""Integrity of the folders dqdeploy reads back: bounded JSON reading, a sha256 seal over the
metadata itself, file names confined to their folder, and per-file sha256 + size records verified
on load (cached by size and modification time, so a sound folder is hashed once per process).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError

MAX_METADATA_BYTES = 16 << 20
SEAL_KEY = "integrity"
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}


def read_json_object(path: Path, what: str, hint: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object, refusing oversized, binary, deeply nested or non-object files."""
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise ArtifactError(f"{path} is {size} bytes, more than any {what} ({MAX_METADATA_BYTES} bytes)", hint=hint)
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({str(exc)[:200]}): the {what} is corrupted",
                            hint=hint) from None
    except RecursionError:
        raise ArtifactError(f"{path} is nested too deeply to be a {what}", hint=hint) from None
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read ({exc.strerror or exc})", hint=hint) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}; a {what} is a JSON object", hint=hint)
    return data


def _canonical(data: dict[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != SEAL_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``integrity`` = sha256 of its canonical JSON body (everything else)."""
    return {**data, SEAL_KEY: "sha256:" + hashlib.sha256(_canonical(data)).hexdigest()}


def verify_seal(data: dict[str, Any], where: Path, command: str) -> None:
    """Refuse metadata whose body does not match its ``integrity`` seal (edited by hand, or damaged)."""
    recorded = data.get(SEAL_KEY)
    if not isinstance(recorded, str) or not recorded.startswith("sha256:"):
        raise ArtifactError(f"{where} has no integrity record: it was written by an older dqdeploy or edited",
                            hint=f"re-run `{command}`")
    try:
        body = _canonical(data)
    except (TypeError, ValueError, RecursionError):
        body = b""
    if recorded != "sha256:" + hashlib.sha256(body).hexdigest():
        raise ArtifactError(f"{where} does not match its integrity record: the file was edited or damaged",
                            hint=f"re-run `{command}` (dqdeploy never loads hand-edited metadata)")


def check_file_name(name: Any, what: str, *, nested: bool = False) -> str:
    """A relative file name made of plain parts (``/``-separated only when ``nested``): no ``..``,
    no absolute path, no hidden or odd characters."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or (len(parts) > 1 and not nested) or not all(_PART.match(p) and p not in (".", "..") for p in parts):
        raise ArtifactError(f"{what}: file name {name!r} is not a plain relative name inside the folder",
                            hint="dqdeploy only reads files inside the folder it was given; re-create the folder")
    return name


def confined(folder: Path, name: str, what: str, *, nested: bool = False) -> Path:
    """``folder / name`` after checking the name and that no symlink leads outside ``folder``."""
    check_file_name(name, what, nested=nested)
    path = folder / name
    root = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise ArtifactError(f"{what}: {name} resolves to {real}, outside {folder}",
                            hint="replace the link by the file itself, or re-create the folder")
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime, inode) within this process."""
    st = path.stat()
    key = (str(Path(os.path.realpath(path))), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def file_record(path: Path) -> dict[str, Any]:
    """``{"sha256": ..., "size": ...}`` of a file, as export specs record them."""
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def check_digest(value: Any, what: str) -> str:
    """``value`` if it is a sha256 hex digest."""
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ArtifactError(f"{what}: {value!r} is not a sha256 hex digest", hint="re-create the folder")
    return value


def verify_file(folder: Path, name: str, digest: str, size: int | None, what: str, command: str, *,
                nested: bool = False) -> Path:
    """Check one recorded file: present, inside the folder, of the recorded size and sha256."""
    path = confined(folder, name, what, nested=nested)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing from the {what}", hint=f"re-run `{command}`")
    if size is not None and path.stat().st_size != size:
        raise ArtifactError(f"{path} is {path.stat().st_size} bytes, the {what} recorded {size}: "
                            "the file is truncated or was replaced",
                            hint=f"re-run `{command}`")
    if file_sha256(path) != digest:
        raise ArtifactError(f"{path} does not match the sha256 recorded in the {what}: "
                            "the file is corrupted or was modified",
                            hint=f"re-run `{command}`")
    return path
