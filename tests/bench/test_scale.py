"""bench/scale.py's stage runner: wall and CPU seconds, peak RSS, the longest silence of a real process, and the
steps a -v log names."""

from __future__ import annotations

import sys

from bench.scale import phases, run_stage


def test_a_stage_records_its_longest_silence_and_cpu_time(tmp_path):
    code = ("import time\nprint('a', flush=True)\ntime.sleep(1.5)\nprint('b', flush=True)\n"
            "sum(range(30_000_000))\nprint('c\\rd', flush=True)")
    row = run_stage([sys.executable, "-c", code], tmp_path / "stage.log")
    assert row["exit"] == 0 and row["seconds"] >= 1.5 and 1.4 <= row["longest_silence_s"] < row["seconds"]
    assert 0 < row["cpu_seconds"] < row["seconds"] and row["peak_rss_gb"] > 0
    text = (tmp_path / "stage.log").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in text] == ["a", "b", "c", "d"]  # a \r redraw is a line of its own


def test_the_steps_of_a_verbose_log(tmp_path):
    log = tmp_path / "quantize.log"
    q = "INFO dqdeploy.stages.quantize"
    log.write_text(f"[    3.5s] {q}: load the model ...\n"
                   f"[   12.6s] {q}: load the model: 9.1 s (peak RSS so far 3.90 GB, now 3.88 GB)\n"
                   "[   20.0s] INFO dqdeploy.progress: calibration trajectories: 0/8 traj-step\n"
                   f"[  365.9s] {q}: calibration trajectories: 353.2 s (peak RSS so far 4.88 GB)\n")
    assert phases(log) == {"load the model": {"seconds": 9.1, "peak_rss_gb": 3.9},
                           "calibration trajectories": {"seconds": 353.2, "peak_rss_gb": 4.88}}
