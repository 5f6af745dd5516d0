"""Old public names kept for one release: a module's ``__getattr__`` that answers each old name with
the object under its new name and a ``DeprecationWarning``.

The ``*UNet*`` names renamed ``*Denoiser*`` (the same objects run diffusion transformers too) resolve to the
very same classes and functions, so ``isinstance`` and subclassing keep working::

    from dqdeploy.quant.modules import QuantizedUNet   # DeprecationWarning; QuantizedUNet is QuantizedDenoiser
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

WHEN = "kept for one release"


def renamed(module: str, names: Mapping[str, str], shims: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module`` answering each old name of ``names`` (old -> new) with
    the new object, or with the module's attribute ``shims[old]`` (an adaptor for the old signature)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new = names[name]
        warnings.warn(f"{module}.{name} is deprecated ({WHEN}): use {module}.{new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(sys.modules[module], (shims or {}).get(name, new))

    return __getattr__


def deprecated_alias(owner: str, old: str, new: str) -> property:
    """A read-only attribute ``old`` of class ``owner`` that warns and returns attribute ``new``."""

    def get(self: Any) -> Any:
        warnings.warn(f"{owner}.{old} is deprecated ({WHEN}): use {owner}.{new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"Deprecated alias of ``{new}``.")
