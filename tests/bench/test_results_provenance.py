"""Results discipline: bench scripts stamp every result with its provenance; report.py refuses results without it
and marks those measured on other code as stale."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import common, provenance

sys.path.insert(0, str(Path(common.__file__).parent))
import report  # noqa: E402  (bench/report.py, run as a script)

CPU = {"cpu": "Test CPU", "arch": "x86_64", "int8_class": "vnni", "int8_flags": "avx2 avx512_vnni"}


def latency(speedup: float, **prov) -> dict:
    return {"command": f"python bench/latency.py --speedup {speedup}", "model": "m", "batch": 8, "repeats": 3,
            "median_ms": {"fp32": 10.0, "dq-per-step": 10.0 / speedup},
            "speedup_vs_fp32": {"fp32": 1.0, "dq-per-step": speedup},
            "dq_per_step_vs_peer": 1.1, "per_step_overhead": 0.01} | prov


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def test_write_results_stamps_commit_code_hash_date_and_cpu(results):
    common.write_results("latency", latency(2.0))
    common.write_results("int8_kernels", {"command": "a"}, label="host")
    flat = json.loads((results / "latency.json").read_text())
    keyed = json.loads((results / "int8_kernels.json").read_text())["host"]
    for e in (flat, keyed):
        assert e["code_hash"] == provenance.code_hash() and len(e["code_hash"]) == 64
        assert e["commit"] and e["commit"] != "unknown" and e["date"].endswith("Z")
        assert e["machine"]["cpu"] and "int8_class" in e["machine"] and "int8_flags" in e["machine"]
        assert provenance.verdict(e, provenance.code_hash()) == ("current", "")


def test_code_hash_follows_the_code(tmp_path):
    (tmp_path / "dqdeploy").mkdir()
    (tmp_path / "dqdeploy" / "a.py").write_text("x = 1\n")
    before = provenance.code_hash(tmp_path)
    assert provenance.code_hash(tmp_path) == before
    (tmp_path / "dqdeploy" / "a.py").write_text("x = 2\n")
    assert provenance.code_hash(tmp_path) != before


def test_report_refuses_results_without_provenance_and_marks_stale_ones(results):
    prov = {"commit": "abc1234", "date": "2026-01-01T00:00:00Z", "machine": CPU}
    (results / "latency.json").write_text(json.dumps(latency(3.25, code_hash="c" * 64, **prov)))  # current
    (results / "latency_dit.json").write_text(json.dumps(  # no commit, CPU as a bare architecture: refused
        {"command": "python bench/dit_latency.py", "model": "dit", "batch": 2, "repeats": 3,
         "machine": {"cpu": "x86_64"},
         "median_ms": {"fp32": 9.0, "int8": 1.0}, "speedup_vs_fp32": {"fp32": 1.0, "int8": 9.87}}))
    (results / "scale.json").write_text(json.dumps({  # a hand-run entry and a stale one
        "by-hand": {"command": "manual, under /usr/bin/time", "calibration": "", "stages": {}, **prov},
        "old": {"command": "python bench/scale.py --config old", "calibration": "", "code_hash": "d" * 64,
                "stages": {"load": {"seconds": 1.0, "peak_rss_gb": 4.56, "exit": 0, "command": "load"}}, **prov}}))
    text = "\n".join(report.render("c" * 64))

    assert "3.25x" in text  # the current result, in its section and in the summary
    current = text[text.index("## ONNX Runtime CPU latency\n"):]
    assert "Measured at commit `abc1234`, code `cccccccccccc`" in current.split("## ")[1]
    assert "Stale" not in current.split("## ")[1]
    assert "9.87" not in text  # refused: no figure of it is rendered ...
    not_shown = text[text.index("## Not shown"):]
    assert "`latency_dit.json`" in not_shown and "`scale.json [by-hand]`" in not_shown  # ... it is listed instead
    assert "by-hand" not in text[:text.index("## Not shown")]
    assert "4.56" in text and "**Stale (measured on abc1234)**" in text  # stale: rendered and marked
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert "stale (abc1234)" in summary and "current (abc1234)" in summary


def test_results_without_code_hash_are_stale_and_without_commit_refused():
    old = {"commit": "08de6f7+dirty", "machine": CPU}
    assert provenance.verdict(old, "x")[0] == "stale"
    assert provenance.verdict(old | {"commit": ""}, "x")[0] == "refused"
    assert provenance.verdict(old | {"machine": {"cpu": "x86_64"}}, "x")[0] == "refused"


def test_zoo_rows_are_summarised_with_their_run_command_and_group(results):
    prov = {"commit": "abc1234", "date": "2026-01-01T00:00:00Z", "machine": CPU, "code_hash": "c" * 64}
    base = {"recipe": "fp32", "variant": "default", "flavour": "sim", "seed": 0, "n": 100, "steps": 50,
            "digits_fid": 10.0, "vs_fp": 1.0} | prov
    rows = {"heldout-vpred|fp32|default|sim|seed0": base | {"model": "heldout-vpred"},
            "heldout-vpred|w8a8|default|sim|seed0": base | {"model": "heldout-vpred", "recipe": "w8a8",
                                                             "digits_fid": 10.3, "vs_fp": 1.03}}
    runs = [{"command": "python bench/zoo_quality.py --models heldout-vpred"} | prov]
    (results / "zoo_quality.json").write_text(json.dumps({"rows": rows, "runs": runs, "steps": 50}))
    text = "\n".join(report.render("c" * 64))
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert "w8a8 (simulation): worst digits-FID vs FP, held-out members 1.03x (heldout-vpred)" in summary
    assert "zoo_quality.py --models heldout-vpred" in summary
    assert "| held-out | w8a8 | default | sim | 1.030x" in text and "heldout-vpred (held-out)" in text
