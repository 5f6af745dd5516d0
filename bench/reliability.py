"""Run the hostile-input corpus (tests/hostile) and record its size by category and the outcomes in
bench/results/reliability.json, then re-render BENCHMARKS.md.

    python bench/reliability.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import write_results  # noqa: E402

COMMAND = "python bench/reliability.py"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "reliability.json"  # the corpus's own summary (tests/hostile/conftest.py)
        env = {**os.environ, "DQDEPLOY_RELIABILITY_OUT": str(summary), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                               "tests/hostile"], cwd=ROOT, env=env)
        data = json.loads(summary.read_text())
    data |= {"command": COMMAND, "wall_s": round(time.perf_counter() - start, 1), "pytest_exit": proc.returncode}
    print("wrote", write_results("reliability", data))
    from bench import report

    report.main()
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
