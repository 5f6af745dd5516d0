"""Run the hostile-input corpus (tests/hostile) and record its size by category and the outcomes in
bench/results/reliability.json, then re-render BENCHMARKS.md.

    python bench/reliability.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "reliability.json"
COMMAND = "python bench/reliability.py"


def main() -> int:
    env = {**os.environ, "DQDEPLOY_RELIABILITY_OUT": str(OUT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                           "tests/hostile"], cwd=ROOT, env=env)
    data = json.loads(OUT.read_text())
    data |= {"command": COMMAND, "wall_s": round(time.perf_counter() - start, 1), "pytest_exit": proc.returncode}
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    report.main()
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
