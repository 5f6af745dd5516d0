"""Typed errors raised at dqdeploy's boundaries.

Every user-facing failure is a :class:`DQDeployError`. Messages say what was expected, what was
found and how to fix it; the CLI prints them without a traceback and exits non-zero.
"""

from __future__ import annotations


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


class LintError(DQDeployError):
    """An exported graph breaks a rule of the target runtime."""


class RuntimeInputError(DQDeployError):
    """Inputs given to a runtime do not match the model's I/O contract."""


class MissingDependencyError(DQDeployError):
    """An optional dependency (ONNX Runtime, TensorRT, CUDA, ...) is not installed."""


class CheckFailedError(DQDeployError):
    """An accuracy check found outputs outside tolerance."""

    exit_code = 1


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
            f"{what} format version {found} is not supported (this dqdeploy reads version {', '.join(map(str, versions))})",
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
