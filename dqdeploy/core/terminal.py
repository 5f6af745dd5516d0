"""How dqdeploy writes to the terminal: progress bars that stay out of log files, one-line notes on stderr.

tqdm redraws its bar with carriage returns (and, for nested bars, cursor escapes): on a terminal that
is a moving bar, in a file it is every redraw at once. So a bar is drawn only while stderr is a
terminal (or in a notebook); redirected, the run prints nothing per step (``-v`` logs each stage
with its seconds instead).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

PROGRESS_ENV = "DQDEPLOY_PROGRESS"  # "1"/"0": set by the --nproc launcher, whose workers' stderr is a pipe


def on_terminal() -> bool:
    """Whether progress can be redrawn in place: stderr is a terminal (under ``--nproc``: the launcher's),
    or this is a notebook kernel."""
    if os.environ.get(PROGRESS_ENV) in ("0", "1"):
        return os.environ[PROGRESS_ENV] == "1"
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def bar(iterable: Any = None, *, terminal: bool | None = None, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``, disabled unless stderr is a terminal (:func:`on_terminal`, or ``terminal`` when
    given); ``disable=True`` and the ``TQDM_DISABLE`` environment variable still turn it off on a terminal."""
    from tqdm.auto import tqdm  # imported when a bar is made: the launcher imports this module too

    if kwargs.pop("disable", False) or not (on_terminal() if terminal is None else terminal):
        kwargs["disable"] = True  # else left out, so that tqdm's TQDM_* environment defaults apply
    return tqdm(iterable, **kwargs)


def say(line: str) -> None:
    """One line of information on the ``dqdeploy.progress`` logger (the CLI shows it without ``-v``; stdout stays
    for results)."""
    logging.getLogger("dqdeploy.progress").info(line)
