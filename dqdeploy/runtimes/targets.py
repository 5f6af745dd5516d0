"""The export targets, one record each: what :func:`dqdeploy.export` builds for a target and which
options apply to it. The export stage, the CLI's ``--target`` help and the checks of a request read
this table instead of branching on target names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.errors import ExportError
from ..core.vocab import TARGETS, GraphTarget, Layout

Fp16 = Literal["never", "option", "always"]


@dataclass(frozen=True)
class TargetSpec:
    """One export target."""

    name: str
    graph: GraphTarget  # the target its ONNX graph records (``trt`` builds from the ``onnx`` graph)
    layout: Layout | None  # the int8 graph's conventions; None: unquantized
    fp16: Fp16  # FP16 activations: never (ORT CPU runs FP32), an option (--fp16), or always
    cpu_format: bool  # --cpu applies: the graph's integer format is chosen per CPU
    engine: bool  # a TensorRT engine is built from the graph (needs TensorRT and a GPU)
    summary: str  # one line for --help and the docs

    @property
    def quantized(self) -> bool:
        """Needs a quantized artifact (every target but ``float``)."""
        return self.layout is not None


TARGET_SPECS: dict[str, TargetSpec] = {
    "ort": TargetSpec("ort", "ort", "ort", "never", True, False,
                      "int8 QDQ graph in the ort layout (uint8, QLinearConv/QLinearMatMul fusion) for ONNX Runtime"),
    "onnx": TargetSpec("onnx", "onnx", "trt", "option", False, False,
                       "int8 QDQ graph in the trt layout (TensorRT's explicit quantization), FP32 or --fp16"),
    "trt": TargetSpec("trt", "onnx", "trt", "always", False, True,
                      "the trt-layout graph in FP16 plus a TensorRT engine built from it on this GPU"),
    "float": TargetSpec("float", "float", None, "option", False, False,
                        "the unquantized graph of any diffusers model folder (the baseline), FP32 or --fp16"),
}
assert set(TARGET_SPECS) == set(TARGETS), "every Target literal has a record"


def target_spec(name: str) -> TargetSpec:
    """The record of target ``name`` (:class:`ExportError` naming the targets for an unknown one)."""
    if name not in TARGET_SPECS:
        raise ExportError(f"unknown target {name!r} (expected {', '.join(TARGETS)})")
    return TARGET_SPECS[name]


def layout_of(graph_target: str) -> Layout | None:
    """The layout of the graph an export folder records (``onnx`` -> ``trt``, ``ort`` -> ``ort``, ``float`` -> None)."""
    return TARGET_SPECS[graph_target].layout if graph_target in TARGET_SPECS else None


def targets_help() -> str:
    """The ``--target`` help: one line per target."""
    return "; ".join(f"{t.name}: {t.summary}" for t in TARGET_SPECS.values())
