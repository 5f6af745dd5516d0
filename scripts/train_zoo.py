#!/usr/bin/env python
"""Train the development model zoo (``bench/zoo.py``) one model at a time, skipping members that are
already cached. Each member runs ``scripts/train_digits.py --stage ddpm`` with its registry
arguments under ``nice -n 10`` on one thread; the log goes to ``ZOO_ROOT/NAME/train.log``.

Usage:  python scripts/train_zoo.py              # every missing member, in registry order
        python scripts/train_zoo.py early cond   # just these
        python scripts/train_zoo.py --list       # state and training command of every member
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import zoo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="members to train (default: every missing one)")
    ap.add_argument("--list", action="store_true", help="print each member's state and command, train nothing")
    args = ap.parse_args(argv)
    members = [zoo.get(n) for n in (args.names or zoo.names())]
    if args.list:
        for m in members:
            state = "ready" if m.available() else "missing"
            print(f"{m.name:8s} {state:8s} {m.folder()}\n         {m.description}\n         "
                  f"{shlex.join(m.train_command())}")
        return 0
    for m in members:
        if m.available():
            print(f"{m.name}: cached at {m.folder()}", flush=True)
            continue
        start = time.time()
        print(f"{m.name}: training ({shlex.join(m.train_command())})", flush=True)
        zoo.train(m.name)
        print(f"{m.name}: done in {time.time() - start:.0f} s -> {m.folder()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
