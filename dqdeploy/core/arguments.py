"""Arguments of the public verbs, checked where a user passes them: wrong keywords, wrong types and strings where
objects are expected become :class:`DQDeployError` with the signature and the fix, never a raw ``TypeError``."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import DQDeployError, RecipeError

F = TypeVar("F", bound=Callable[..., Any])


def public(fn: F) -> F:
    """A public verb: a call that does not fit its signature (unknown or missing arguments) is a user error."""
    sig = inspect.signature(fn)

    first = next(iter(sig.parameters))  # the folder each verb reads

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = args[0] if args else kwargs.get(first)
        if hasattr(given, "save_pretrained"):  # a loaded pipeline or model: said before any missing argument
            as_path(given, first, fn.__name__)
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise DQDeployError(f"dqdeploy.{fn.__name__}(): {exc}", hint=f"see help(dqdeploy.{fn.__name__})") from None
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def as_path(value: Any, name: str, verb: str) -> Path:
    """``value`` as a path, or an error naming what was passed (a loaded model, None, a number, ...)."""
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return Path(value)
    found = type(value).__name__
    hint = "pass a folder path (str or pathlib.Path)"
    if hasattr(value, "components"):  # a diffusers pipeline
        hint = f"save it first (pipe.save_pretrained(DIR)) and pass DIR; dqdeploy.{verb} reads diffusers folders"
    elif hasattr(value, "save_pretrained"):  # a denoiser (pipe.unet, pipe.transformer) or another component
        hint = (f"save the pipeline it belongs to (pipe.save_pretrained(DIR)) and pass DIR, or save it "
                f"(model.save_pretrained(DIR)) and pass DIR with scheduler_dir=(pipe.scheduler.save_pretrained's "
                f"folder); dqdeploy.{verb} reads diffusers folders")
    raise DQDeployError(f"dqdeploy.{verb}(): {name} must be a path, found {found} {str(value)[:60]!r}", hint=hint)


def as_recipe(value: Any) -> Any:
    """A :class:`~dqdeploy.core.recipe.Recipe` from a Recipe, a preset name / recipe JSON path, or a dict of its
    fields."""
    from .recipe import Recipe, resolve_recipe

    if isinstance(value, Recipe):
        return value
    if isinstance(value, (str, os.PathLike)):
        return resolve_recipe(str(value))
    if isinstance(value, dict):
        return Recipe.from_dict(value)
    raise RecipeError("recipe must be a Recipe, a preset name (w8a8, w7a8, w4a8, w4a4), a recipe .json path or a dict; "
                      f"found {type(value).__name__}",
                      hint="e.g. dqdeploy.W8A8 or dqdeploy.W8A8.replace(iters=100)")


def as_calibration(value: Any) -> Any:
    """A :class:`~dqdeploy.core.recipe.CalibrationConfig` from itself or a dict of its fields."""
    from .recipe import CalibrationConfig

    if isinstance(value, CalibrationConfig):
        return value
    if isinstance(value, dict):
        try:
            return CalibrationConfig(**value)
        except TypeError as exc:
            raise RecipeError(f"calibration: {exc}",
                              hint=f"fields: {', '.join(inspect.signature(CalibrationConfig).parameters)}") from None
    raise RecipeError(f"calibration must be a CalibrationConfig or a dict of its fields; found {type(value).__name__}",
                      hint="e.g. dqdeploy.CalibrationConfig(samples=512)")
