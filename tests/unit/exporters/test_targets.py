"""The export target registry: one record per target, and the request checks read it."""

from __future__ import annotations

import pytest

from dqdeploy.core.errors import ExportError
from dqdeploy.core.vocab import TARGETS
from dqdeploy.runtimes.targets import TARGET_SPECS, layout_of, target_spec, targets_help


def test_one_record_per_target_literal():
    assert set(TARGET_SPECS) == set(TARGETS)
    assert all(TARGET_SPECS[t.graph].engine is False for t in TARGET_SPECS.values())  # an engine builds from a graph


def test_layouts_and_quantized():
    assert {t: (s.layout, s.quantized) for t, s in TARGET_SPECS.items()} == {
        "ort": ("ort", True), "onnx": ("trt", True), "trt": ("trt", True), "float": (None, False)}
    assert [layout_of(t) for t in ("onnx", "ort", "float", "nonsense")] == ["trt", "ort", None, None]


def test_unknown_target_names_the_known_ones():
    with pytest.raises(ExportError, match="unknown target 'tensorrt' .expected onnx, ort, trt, float"):
        target_spec("tensorrt")


def test_help_has_a_line_per_target():
    assert all(f"{t}: " in targets_help() for t in TARGET_SPECS)
