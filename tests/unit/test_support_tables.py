"""docs/SUPPORT_MATRIX.md's target and family tables are the registries' (scripts/support_tables.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_support_matrix_tables_match_the_registries():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "support_tables.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_target_and_family_has_a_row():
    sys.path.insert(0, str(ROOT / "scripts"))
    from support_tables import tables

    from dqdeploy.core.denoisers import SPECS
    from dqdeploy.runtimes.targets import TARGET_SPECS

    text = tables()
    assert all(f"| `{t}` |" in text for t in TARGET_SPECS) and all(f"| `{c}` |" in text for c in SPECS)
