"""Typed errors raised at dqdeploy's boundaries.

Every user-facing failure is a :class:`DQDeployError`. Messages say what was expected, what was
found and how to fix it; the CLI prints them without a traceback and exits non-zero.
"""

from __future__ import annotations

import errno
import os


class DQDeployError(Exception):
    """Base class of every error dqdeploy reports to a user."""

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class ModelLoadError(DQDeployError):
    """A model folder is missing, malformed, or holds an unsupported model class."""


class RecipeError(DQDeployError):
    """A recipe has impossible or inconsistent values."""


class CalibrationError(DQDeployError):
    """Calibration data is missing, inconsistent, or not finite."""


class ArtifactError(DQDeployError):
    """A saved artifact is missing, from another format version, corrupted or tampered with."""


class ExportError(DQDeployError):
    """The ONNX export or graph surgery could not be done."""


class PipelineError(DQDeployError):
    """A diffusers pipeline folder (to export beside a denoiser) or an exported pipeline folder (to run) lacks a
    component, holds one dqdeploy cannot export or run, or does not match the denoiser."""


class LintError(DQDeployError):
    """An exported graph breaks a rule of the target runtime."""


class RuntimeInputError(DQDeployError):
    """Inputs given to a runtime do not match the model's I/O contract."""


class MissingDependencyError(DQDeployError):
    """An optional dependency (ONNX Runtime, TensorRT, CUDA, ...) is not installed."""


class CpuFormatError(DQDeployError):
    """An int8 graph's integer format is not exact on this CPU (its GEMM kernels would saturate)."""


class CheckFailedError(DQDeployError):
    """An accuracy check found outputs outside tolerance."""

    exit_code = 1


class DiskFullError(DQDeployError):
    """Writing failed: the disk, a quota or the file-size limit is full."""

    exit_code = 1


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def as_user_error(exc: BaseException) -> DQDeployError | None:
    """``exc`` as a user sees it: itself when it is a :class:`DQDeployError`, a full disk (Python's
    ``OSError`` or the error of safetensors' writer) as a :class:`DiskFullError`, else None (a bug)."""
    if isinstance(exc, DQDeployError):
        return exc
    code = exc.errno if isinstance(exc, OSError) else next(
        (c for c in DISK_FULL if type(exc).__name__ == "SafetensorError" and f"(os error {c})" in str(exc)), None)
    if code not in DISK_FULL:
        return None
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    return DiskFullError(f"writing failed: {os.strerror(code)}{where}",
                         hint="free space on that disk, or write the output (--out) and temporary files (TMPDIR) "
                              "to a disk with room: quantize keeps about the model's size there while it runs")


def check_format(data: dict, fmt: str, version: int | tuple[int, ...], what: str, command: str) -> None:
    """Refuse metadata of another format or of a format version not in ``version`` (``what``: the
    folder kind, ``command``: the dqdeploy command that writes it)."""
    if data.get("format") != fmt:
        raise ArtifactError(
            f"not a dqdeploy {what}: format is {data.get('format')!r}, expected {fmt!r}",
            hint=f"point at a folder written by `{command}`",
        )
    versions = version if isinstance(version, tuple) else (version,)
    found = data.get("format_version")
    if isinstance(found, bool) or found not in versions:
        raise ArtifactError(
            f"{what} format version {found} is not supported "
            f"(this dqdeploy reads version {', '.join(map(str, versions))})",
            hint=f"re-run `{command}` with this version of dqdeploy",
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or fail with the install command that fixes it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed ({exc}).",
            hint=f"pip install 'dqdeploy[{extra}]'",
        ) from exc
