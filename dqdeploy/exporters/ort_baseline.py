"""ONNX Runtime's own post-training quantization: the baseline dqdeploy's own
export is benchmarked against (``bench/``): what a user gets from ONNX Runtime without DilateQuant.

``quantize_static`` in QDQ format with uint8 activations (what ONNX Runtime fuses into QLinearConv /
QLinearMatMul on x86), int8 per-channel weights, MinMax calibration over the given input dicts.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CalibrationError, ExportError, require
from .onnx import EXTERNAL_DATA_THRESHOLD

log = logging.getLogger(__name__)

OP_TYPES = ["Conv", "MatMul", "Gemm"]


def _reader(inputs: list[dict[str, np.ndarray]]):
    """A CalibrationDataReader over ``inputs`` (rewindable)."""
    quant: Any = require("onnxruntime.quantization", "ort", "ONNX Runtime quantization")

    class _ListReader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self._items = inputs
            self._it: Iterator[dict[str, np.ndarray]] = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(self._items)

    return _ListReader()


@contextlib.contextmanager
def _calibration_threads(threads: int) -> Iterator[None]:
    """Run ``quantize_static``'s calibration session with ``threads`` intra-op threads.

    ORT's calibrator builds its own session with default threading (all cores) and exposes no
    option for it; its session factory is wrapped for the duration of the call.
    """
    ort = require("onnxruntime", "ort", "ONNX Runtime quantization")
    calibrate = require("onnxruntime.quantization.calibrate", "ort", "ONNX Runtime quantization")
    base: Any = getattr(calibrate, "CalibraterBase", None)
    original = getattr(base, "create_inference_session", None)
    if original is None:  # another ORT layout: calibrate with ORT's defaults
        log.info("onnxruntime.quantization has no CalibraterBase.create_inference_session; default threads")
        yield
        return

    def create_inference_session(self) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                  providers=self.execution_providers)

    base.create_inference_session = create_inference_session
    try:
        yield
    finally:
        base.create_inference_session = original


def _inspect(float_path: Path) -> tuple[set[str], int]:
    """The model's graph input names and its size in bytes (the file plus its external data)."""
    onnx = require("onnx", "ort", "ONNX Runtime quantization")
    model = onnx.load(str(float_path), load_external_data=False)
    init_names = {i.name for i in model.graph.initializer}
    names = {i.name for i in model.graph.input if i.name not in init_names}
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    size = float_path.stat().st_size + sum((float_path.parent / loc).stat().st_size for loc in locations
                                           if (float_path.parent / loc).is_file())
    return names, size


def _check_inputs(names: set[str], inputs: list[dict[str, np.ndarray]]) -> None:
    if not inputs:
        raise CalibrationError("quantize_with_ort got no calibration inputs",
                               hint="pass a list of {input name: array} dicts, e.g. from calibration trajectories")
    for k, item in enumerate(inputs):
        if set(item) != names:
            raise CalibrationError(
                f"calibration input {k} has keys {sorted(item)}; the model's inputs are {sorted(names)}",
                hint="give one array per graph input, named as in the ONNX file",
            )
        for name, value in item.items():
            if not np.all(np.isfinite(value)):
                raise CalibrationError(f"calibration input {k} ('{name}') holds NaN or inf values")


def _pre_process(float_path: Path, scratch: Path, large: bool) -> Path:
    """``quant_pre_process`` (ONNX shape inference + ORT basic optimizations), or the input if it fails.

    ORT's symbolic shape inference is skipped: it gives up on diffusers UNet exports ("Incomplete
    symbolic shape inference") and then writes ``sym_shape_infer_temp.onnx`` plus a ``<uuid>.data``
    into the current directory. A model under 2 GB is staged as one file first: with external data
    the pre-processor's optimized model points at a data file that is not next to it.
    """
    onnx = require("onnx", "ort", "ONNX Runtime quantization")
    quant: Any = require("onnxruntime.quantization", "ort", "ONNX Runtime quantization")
    source = float_path
    if not large:
        source = scratch / "float.onnx"
        onnx.save(onnx.load(str(float_path), load_external_data=True), str(source))
    out = scratch / "preprocessed.onnx"
    try:
        quant.quant_pre_process(str(source), str(out), skip_symbolic_shape=True, save_as_external_data=large,
                                all_tensors_to_one_file=True, external_data_location="preprocessed.onnx.data")
    except Exception as exc:  # the pre-processor raises bare Exceptions
        log.warning("quant_pre_process failed (%s: %s); quantizing the graph as exported", type(exc).__name__, exc)
        return float_path
    return out


def quantize_with_ort(
    float_onnx_path: str | Path,
    out_path: str | Path,
    calibration_inputs: list[dict[str, np.ndarray]],
    *,
    pre_process: bool = True,
    threads: int = 1,
) -> Path:
    """Quantize a float ONNX model with ONNX Runtime's ``quantize_static`` (QDQ, U8 activations, S8 weights).

    ``calibration_inputs``: one ``{input name: array}`` dict per calibration batch (MinMax ranges).
    Returns ``out_path``; a model over 2 GB gets its weights in ``<out_path>.data`` beside it.
    """
    quant: Any = require("onnxruntime.quantization", "ort", "ONNX Runtime quantization")
    float_path, out = Path(float_onnx_path), Path(out_path)
    if not float_path.is_file():
        raise ExportError(f"no float ONNX model at {float_path}", hint="export one with export_float_onnx first")
    names, size = _inspect(float_path)
    _check_inputs(names, calibration_inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    large = size > EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(prefix="dqdeploy-peer-") as tmp:
        source = _pre_process(float_path, Path(tmp), large) if pre_process else float_path
        try:
            with _calibration_threads(threads):
                quant.quantize_static(
                    str(source),
                    str(out),
                    _reader(calibration_inputs),
                    quant_format=quant.QuantFormat.QDQ,
                    op_types_to_quantize=OP_TYPES,
                    per_channel=True,
                    activation_type=quant.QuantType.QUInt8,
                    weight_type=quant.QuantType.QInt8,
                    calibrate_method=quant.CalibrationMethod.MinMax,
                    use_external_data_format=large,
                )
        except Exception as exc:
            raise ExportError(
                f"onnxruntime.quantization.quantize_static failed on {float_path}: {type(exc).__name__}: {exc}",
                hint="check that the float model runs in ONNX Runtime on the calibration inputs",
            ) from exc
    return out
