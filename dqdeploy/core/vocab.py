"""One name per idea, defined once: the literal types shared by the CLI, the API and the formats.

The TensorRT-vs-ONNX-Runtime choice has one word, **layout**; target and runtime are said in terms of it.

* ``Layout``: the conventions of the int8 graph, i.e. which runtime it is shaped for (the simulation
  models the same rounding) -- ``trt`` (int8, zero point 0, input-only Q/DQ: TensorRT's explicit
  quantization) or ``ort`` (uint8, zero point 128, output Q/DQ so ONNX Runtime fuses QLinearConv /
  QLinearMatMul). A recipe field (``quantize --layout``) and a Q/DQ surgery option.
* ``Target``: what ``export`` writes -- a layout, a precision, and an engine or not: ``onnx`` (the
  ``trt``-layout int8 QDQ graph, FP32 or ``--fp16``), ``trt`` (that graph in FP16 plus a strongly typed
  TensorRT engine built from it on this GPU), ``ort`` (the ``ort``-layout int8 QDQ graph, FP32) or
  ``float`` (unquantized: no layout). The names are those of the formats (export specs record them).
* ``GraphTarget``: the targets that name an ONNX graph (what an export folder's spec records: a
  ``trt`` export records ``onnx``, its graph's target).
* ``Runtime``: what runs a model when sampling (``torch``: the simulation); ``GraphRuntime``: what runs
  an exported graph -- ``ort`` (ONNX Runtime: either layout; the ``trt`` layout's Q/DQ as float math)
  or ``trt`` (TensorRT: the engine of a ``trt`` target, so the ``trt`` layout only).
* ``Scaling``: the equivalent scaling before quantization (Weight Dilation, SmoothQuant, none).
* ``Int8Format``: the integer format of an ORT-layout graph's weights -- ``vnni`` (int8 weights over
  the full range: exact where the CPU adds u8 x s8 products in 32 bits, i.e. x86 with VNNI/AMX and
  ARM64) or ``portable`` (int8 weights within [-64, 64], else uint8: exact on every CPU);
  ``CpuChoice`` adds ``auto`` (the exporting machine's). See :mod:`dqdeploy.system.cpu`.
"""

from __future__ import annotations

from typing import Literal, get_args

Layout = Literal["trt", "ort"]
Target = Literal["onnx", "ort", "trt", "float"]
GraphTarget = Literal["onnx", "ort", "float"]
Runtime = Literal["auto", "torch", "ort", "trt"]
GraphRuntime = Literal["ort", "trt"]
Scaling = Literal["wd", "smoothquant", "none"]
Int8Format = Literal["vnni", "portable"]
CpuChoice = Literal["auto", "vnni", "portable"]
Inexact = Literal["refuse", "float", "allow"]  # what a runtime does with a graph not exact on its CPU

LAYOUTS: tuple[str, ...] = get_args(Layout)
TARGETS: tuple[str, ...] = get_args(Target)
GRAPH_TARGETS: tuple[str, ...] = get_args(GraphTarget)
RUNTIMES: tuple[str, ...] = get_args(Runtime)
GRAPH_RUNTIMES: tuple[str, ...] = get_args(GraphRuntime)
SCALINGS: tuple[str, ...] = get_args(Scaling)
INT8_FORMATS: tuple[str, ...] = get_args(Int8Format)
CPU_CHOICES: tuple[str, ...] = get_args(CpuChoice)
INEXACT: tuple[str, ...] = get_args(Inexact)

# the denoiser graph's input names shared by every family (optimum's; :mod:`dqdeploy.core.inputs` uses them too)
SAMPLE = "sample"
TIMESTEP = "timestep"
CONTEXT = "encoder_hidden_states"
TEXT_MASK = "encoder_attention_mask"  # PixArt: 1 for the text tokens, 0 for padding [B, S]

