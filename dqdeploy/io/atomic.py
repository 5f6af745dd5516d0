"""Atomic outputs: write into a hidden temporary folder next to the target, then rename.

An interrupted run leaves at most a ``.NAME.tmp-PID-*`` folder (marked as dqdeploy's own by a
``.dqdeploy-partial`` file), never a folder that looks complete; the next run writing NAME sweeps
such folders of dead processes. The target is checked on entry (:func:`dqdeploy.io.paths.check_output_dir`)
and again at the rename, so a folder that appeared meanwhile is never silently replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .paths import OutputPathError, check_output_dir, own_kind, replaceable

PARTIAL_MARKER = ".dqdeploy-partial"
REPLACED_MARKER = ".dqdeploy-replaced"  # in a ``.NAME.old-PID`` folder: moved aside by dqdeploy itself


check_target = check_output_dir  # the name callers used before dqdeploy.io.paths existed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    return 0o666 & ~_umask()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, prefix: str) -> int | None:
    rest = name[len(prefix):]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def sweep_stale(target: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` folders left next to ``target`` by dead dqdeploy processes, and
    restore or drop ``.NAME.old-PID`` folders of an interrupted replacement. Returns what was removed."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    tmp_prefix, old_prefix = f".{target.name}.tmp-", f".{target.name}.old-"
    for entry in parent.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            continue
        if entry.name.startswith(tmp_prefix):
            pid = _owner_pid(entry.name, tmp_prefix)
            if pid is not None and not pid_alive(pid) and (entry / PARTIAL_MARKER).is_file():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        elif entry.name.startswith(old_prefix):
            pid = _owner_pid(entry.name, old_prefix)
            if pid is None or pid_alive(pid) or own_kind(entry) is None:
                continue
            if not os.path.lexists(target):  # interrupted between the two renames: put the old folder back
                os.replace(entry, target)
                (target / REPLACED_MARKER).unlink(missing_ok=True)
            elif (entry / REPLACED_MARKER).is_file():  # the replacement completed: our old copy is garbage
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _restore(old: Path, target: Path) -> None:
    """Put a folder moved aside by :func:`_install` back in place."""
    os.replace(old, target)
    (target / REPLACED_MARKER).unlink(missing_ok=True)


def _install(tmp: Path, target: Path, overwrite: bool, kind: str | None, owned: Callable[[Path], bool] | None) -> None:
    """Rename ``tmp`` to ``target``, re-checking the target at this moment."""
    if os.path.lexists(target):
        if not overwrite or not replaceable(target, kind, owned):
            raise OutputPathError(
                f"output folder {target} appeared while dqdeploy was working and is not one it may replace",
                hint="choose another --out; nothing was written",
            )
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        try:
            (old / REPLACED_MARKER).write_text(str(os.getpid()))
            os.replace(tmp, target)
        except OSError:  # another run installed its folder between the two renames: keep that one
            try:
                _restore(old, target)
            except OSError:
                shutil.rmtree(old, ignore_errors=True)
            raise OutputPathError(f"another run wrote {target} at the same moment; its folder was kept",
                                  hint="run one writer per output folder") from None
        except BaseException:  # interrupted between the two renames: put the old folder back
            _restore(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, target)
    except OSError as exc:  # a non-empty folder appeared between the check and the rename
        raise OutputPathError(f"output folder {target} could not be created ({exc.strerror or exc})",
                              hint="choose another --out; nothing was written") from None


@contextlib.contextmanager
def atomic_dir(
    target: str | Path,
    *,
    overwrite: bool = False,
    kind: str | None = None,
    sources: Iterable[str | Path] = (),
    owned: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target`` in one rename.

    ``kind``/``sources``/``owned``: see :func:`dqdeploy.io.paths.check_output_dir`.
    """
    target = Path(os.path.abspath(target))
    check_output_dir(target, overwrite=overwrite, kind=kind, sources=sources, owned=owned)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any folder
        (tmp / PARTIAL_MARKER).write_text(str(os.getpid()))
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        fix_modes(tmp)
        _install(tmp, target, overwrite, kind, owned)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fix_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open`` would (safetensors and mkstemp write 0600)."""
    mode = _file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                p.chmod(mode)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def own_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary folder ``PREFIX-PID-*`` in the system temp folder, marked as dqdeploy's and removed on exit; folders
    of the same prefix that dead processes left (kill -9) are swept first."""
    base = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            pid = _owner_pid(entry.name, prefix + "-") if entry.name.startswith(prefix + "-") else None
            if pid is not None and not pid_alive(pid) and not entry.is_symlink() and (entry / PARTIAL_MARKER).is_file():
                shutil.rmtree(entry, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=base))
    try:
        (tmp / PARTIAL_MARKER).write_text(str(os.getpid()))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
