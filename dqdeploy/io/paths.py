"""Path safety for outputs: what dqdeploy may write, and what it may replace.

Checked before any work (calibration can take hours) and again at the final rename:

* an output folder may only replace a folder dqdeploy itself wrote (a quantized artifact or an
  export folder of the expected kind, recognised by its metadata file), never a regular file;
* never the working directory or one of its ancestors, never an input of the command (the source
  model folder) nor a folder that holds it;
* the output's parent must be creatable and writable (not under a regular file, not /proc, /sys, a
  read-only mount): probed by creating and removing a hidden folder there.

Output files (reports, PNGs) follow the same rule: never inside an input, never two outputs at one path, an
existing file only with ``--overwrite`` and then only one dqdeploy wrote (a JSON report tagged with
``"format": "dqdeploy-..."``, a PNG carrying dqdeploy's ``Software`` text chunk).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..core.errors import DQDeployError
from ..system.interrupts import deferred
from .folders import MANIFEST, SPEC_FILE

# kind -> (metadata file, format tag), as artifact.py and exporters/spec.py write them
OWN_FOLDERS = {
    "quantized": (MANIFEST, "dqdeploy-quantized"),
    "export": (SPEC_FILE, "dqdeploy-export"),
    "sensitivity": ("sensitivity.json", "dqdeploy-sensitivity"),
}
WRITERS = {"quantized": "dqdeploy quantize", "export": "dqdeploy export", "triton": "dqdeploy export --triton-repo",
           "sensitivity": "dqdeploy analyze"}
PNG_SOFTWARE = b"tEXtSoftware\x00dqdeploy"  # the text chunk dqdeploy's PNGs carry (eval.grid.png_bytes)
OWN_REPORT_PREFIX = "dqdeploy-"  # "format" of dqdeploy's JSON reports
MAX_METADATA_BYTES = 64 << 20


class OutputPathError(DQDeployError):
    """An output path is unsafe to write or to replace."""


def own_kind(folder: str | Path) -> str | None:
    """``"quantized"`` / ``"export"`` when ``folder`` holds dqdeploy's metadata with its format tag, else None."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    for kind, (fname, fmt) in OWN_FOLDERS.items():
        meta = folder / fname
        try:
            if meta.is_file() and not meta.is_symlink() and meta.stat().st_size <= MAX_METADATA_BYTES:
                data = json.loads(meta.read_text())
                if isinstance(data, dict) and data.get("format") == fmt:
                    return kind
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
    return None


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def nearest_existing(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists."""
    path = _resolved(path)
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_parent_writable(target: str | Path, what: str) -> None:
    """Refuse ``target`` when its folder cannot be created or written (under a file, /proc, read-only)."""
    target = _resolved(target)
    base = nearest_existing(target.parent)
    if not base.is_dir():
        raise OutputPathError(
            f"{what} {target} cannot be created: {base} is a file, not a folder",
            hint="choose an output path whose parent folders are folders",
        )
    try:
        with deferred():  # a signal between the two calls would leave the probe behind
            os.rmdir(tempfile.mkdtemp(prefix=".dqdeploy-probe-", dir=base))
    except OSError as exc:
        raise OutputPathError(
            f"{what} {target} cannot be written: creating a folder in {base} failed ({exc.strerror or exc})",
            hint="choose a writable location (not /proc, /sys or a read-only mount)",
        ) from None


def _check_not_protected(target: Path, what: str, sources: Iterable[str | Path]) -> None:
    cwd = _resolved(Path.cwd())
    if _is_within(cwd, target):
        raise OutputPathError(
            f"{what} {target} is the working directory or one of its ancestors: dqdeploy never replaces it",
            hint="choose a new folder, e.g. --out ./out",
        )
    for src in sources:
        if src is None:
            continue
        src = _resolved(src)
        if _is_within(src, target):
            raise OutputPathError(
                f"{what} {target} is the input {src} or a folder holding it: dqdeploy never replaces its inputs",
                hint="write to a new folder",
            )
        if src.is_dir() and _is_within(target, src):
            raise OutputPathError(f"{what} {target} lies inside the input {src}: dqdeploy never writes into its inputs",
                                  hint="write to a folder next to it, e.g. " + str(src.with_name(src.name + "-out")))


def replaceable(target: Path, kind: str | None = None, owned: Callable[[Path], bool] | None = None) -> bool:
    """Whether the existing folder ``target`` is one this writer may replace (see :func:`check_output_dir`)."""
    if target.is_symlink() or not target.is_dir():
        return False
    if owned is not None:
        return owned(target)
    found = own_kind(target)
    return found is not None and (kind is None or found == kind)


def check_output_dir(
    target: str | Path,
    *,
    overwrite: bool = False,
    kind: str | None = None,
    sources: Iterable[str | Path] = (),
    owned: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse an output folder that is unsafe to write or replace; call it before long work.

    ``kind``: the folder kind this command writes (``"quantized"``/``"export"``); with ``overwrite``
    only an existing folder of that kind may be replaced (any dqdeploy folder when ``kind`` is None).
    ``owned``: for other folders dqdeploy writes, a predicate recognising them (replaces ``kind``).
    ``sources``: the command's inputs, which are never replaced.
    """
    what = "output folder"
    target = _resolved(target)
    _check_not_protected(target, what, sources)
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            raise OutputPathError(
                f"{what} {target} exists and is not a folder: dqdeploy never replaces a file",
                hint="choose another --out",
            )
        if not overwrite:
            raise OutputPathError(f"{what} {target} already exists",
                                  hint="choose another --out or pass --overwrite")
        if not replaceable(target, kind, owned):
            found = own_kind(target)
            expected = WRITERS.get(kind or "", "dqdeploy")
            described = ("a folder dqdeploy did not write" if found is None
                         else f"a {found} folder (written by `{WRITERS[found]}`)")
            raise OutputPathError(
                f"--overwrite refused: {target} is {described}; only a folder written by `{expected}` may be replaced",
                hint="choose another --out (dqdeploy never deletes what it did not write)",
            )
    check_parent_writable(target, what)


def check_output_file(path: str | Path, what: str = "output file", sources: Iterable[str | Path] = ()) -> None:
    """Refuse an output file that is a folder, an input, or in an unwritable place (before any work)."""
    path = _resolved(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder", hint="name a file, e.g. out.png")
    for src in sources:
        if src is not None and _is_within(path, _resolved(src)) and path.exists():
            raise OutputPathError(f"{what} {path} lies inside the input {src}: dqdeploy never modifies its inputs",
                                  hint="write the file somewhere else")
    check_parent_writable(path, what)


def own_file(path: str | Path) -> bool:
    """Whether the existing file ``path`` is one dqdeploy wrote: a JSON report tagged ``dqdeploy-...``, a PNG with
    dqdeploy's text chunk, or a safetensors file whose metadata says ``format: dqdeploy-...``."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file():
            return False
        if path.suffix == ".safetensors":
            return _safetensors_format(path).startswith(OWN_REPORT_PREFIX)
        if path.stat().st_size > MAX_METADATA_BYTES:
            return False
        data = path.read_bytes()
    except OSError:
        return False
    if data.startswith(b"\x89PNG"):
        return PNG_SOFTWARE in data[:4096]
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and str(doc.get("format", "")).startswith(OWN_REPORT_PREFIX)


def _safetensors_format(path: Path) -> str:
    """The ``format`` entry of a safetensors file's ``__metadata__`` (its header only is read), or ""."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= MAX_METADATA_BYTES:
                return ""
            header = json.loads(fh.read(size))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return ""
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return str(meta.get("format", "")) if isinstance(meta, dict) else ""


def check_output_files(outputs: Mapping[str, str | Path | None], *, sources: Iterable[str | Path | None] = (),
                       overwrite: bool = False) -> None:
    """Refuse output files (option name -> path; None: not asked for) that are folders, lie inside an input, name one
    path twice, or exist -- unless ``overwrite`` and dqdeploy wrote them. Call it before any work."""
    seen: dict[Path, str] = {}
    for option, value in outputs.items():
        if value is None:
            continue
        path = _resolved(value)
        if path in seen:
            raise OutputPathError(f"{option} and {seen[path]} name the same file {path}: one would overwrite the other",
                                  hint=f"give {option} its own file name")
        seen[path] = option
        if path.is_dir():
            raise OutputPathError(f"{option} {path} is a folder", hint="name a file, e.g. out.png")
        for src in sources:
            if src is not None and _is_within(path, _resolved(src)):
                raise OutputPathError(f"{option} {path} lies inside the input {src}: "
                                      "dqdeploy never writes into its inputs",
                                      hint="write the file somewhere else")
        if os.path.lexists(path) and not overwrite:
            raise OutputPathError(f"{option} {path} already exists",
                                  hint="choose another file name or pass --overwrite")
        if os.path.lexists(path) and not own_file(path):
            raise OutputPathError(f"--overwrite refused: {option} {path} is a file dqdeploy did not write",
                                  hint="choose another file name (dqdeploy never replaces what it did not write)")
        check_parent_writable(path, option)
