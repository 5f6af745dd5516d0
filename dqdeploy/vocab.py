"""One name per idea, defined once: the literal types shared by the CLI, the API and the formats.

* ``Layout``: which deployment the quantized graph (and the simulation) is shaped for --
  ``trt`` (int8, zero point 0, input-only Q/DQ: TensorRT) or ``ort`` (uint8, zero point 128, output
  Q/DQ so ONNX Runtime fuses QLinearConv / QLinearMatMul). A recipe field and a Q/DQ surgery option.
* ``Target``: what ``export`` writes -- ``onnx`` (the TensorRT-layout QDQ graph), ``ort`` (the
  ORT-layout QDQ graph), ``trt`` (``onnx`` in FP16 plus a TensorRT engine) or ``float``.
* ``GraphTarget``: the targets that name an ONNX graph (what an export folder's spec records).
* ``Runtime``: what runs a model when sampling (``torch``: the simulation); ``GraphRuntime``: what runs
  an exported graph (ONNX Runtime or TensorRT).
* ``Scaling``: the equivalent scaling before quantization (Weight Dilation, SmoothQuant, none).
"""

from __future__ import annotations

from typing import Literal, get_args

Layout = Literal["trt", "ort"]
Target = Literal["onnx", "ort", "trt", "float"]
GraphTarget = Literal["onnx", "ort", "float"]
Runtime = Literal["auto", "torch", "ort", "trt"]
GraphRuntime = Literal["ort", "trt"]
Scaling = Literal["wd", "smoothquant", "none"]

LAYOUTS: tuple[str, ...] = get_args(Layout)
TARGETS: tuple[str, ...] = get_args(Target)
GRAPH_TARGETS: tuple[str, ...] = get_args(GraphTarget)
RUNTIMES: tuple[str, ...] = get_args(Runtime)
GRAPH_RUNTIMES: tuple[str, ...] = get_args(GraphRuntime)
SCALINGS: tuple[str, ...] = get_args(Scaling)


def layout_of(target: GraphTarget) -> Layout | None:
    """The deployment layout of a graph target (``None`` for the float graph)."""
    return {"onnx": "trt", "ort": "ort"}.get(target)  # type: ignore[return-value]
