"""ONNX Runtime drop-in: an exported denoiser on an ``onnxruntime.InferenceSession`` (CPU by default), guarded
against integer formats that are not exact on this CPU (:func:`exactness_entries`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.deprecation import renamed
from ..core.errors import ArtifactError, RuntimeInputError
from ..core.vocab import Inexact
from .base import CONTEXT, OUTPUT, SAMPLE, DenoiserRuntime
from .session import CPU, ORT_TYPES, Provider, open_session
from .spec import LORA_PREFIX, SPEC_FILE, ExportSpec, TensorSpec, read_spec

log = logging.getLogger(__name__)


def resolve_source(source: str | Path) -> tuple[Path, ExportSpec | None]:
    """``(onnx_path, spec)`` for an export folder, its ``unet/model.onnx`` (``transformer/model.onnx``),
    or any ONNX file (spec None)."""
    path = Path(source)
    if path.is_dir():
        spec = read_spec(path)
        return path / spec.onnx_file, spec
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist",
                            hint="pass an export folder (the --out of `dqdeploy export`) or an .onnx file")
    folder = path.parent.parent
    if path.parent.name in ("unet", "transformer") and (folder / SPEC_FILE).is_file():
        return path, read_spec(folder)
    return path, None


def _spec_from_session(session, path: Path) -> ExportSpec:
    """A minimal spec for a bare ONNX file with the denoiser I/O names (no calibrated steps, no recipe)."""
    def tensor(v) -> TensorSpec:
        dims = [d if isinstance(d, int) else str(d or "?") for d in v.shape]
        return TensorSpec(v.name, dims, ORT_TYPES.get(v.type, v.type))

    inputs = [tensor(v) for v in session.get_inputs()]
    outputs = [tensor(v) for v in session.get_outputs()]
    by_name = {t.name: t for t in inputs}
    if SAMPLE not in by_name or len(by_name[SAMPLE].shape) != 4:
        raise ArtifactError(f"{path}: expected an input 'sample' [B, C, H, W], found inputs {[t.name for t in inputs]}",
                            hint="export with `dqdeploy export`, which writes optimum's I/O names")
    _, c, h, w = by_name[SAMPLE].shape
    config: dict[str, Any] = {"in_channels": c,
                              "out_channels": outputs[0].shape[1] if len(outputs[0].shape) == 4 else c,
                              "sample_size": h if h == w else [h, w]}
    if CONTEXT in by_name:
        config["cross_attention_dim"] = by_name[CONTEXT].shape[-1]
        config["time_cond_proj_dim"] = None
    return ExportSpec(
        target="unknown", precision="fp16" if by_name[SAMPLE].dtype == "float16" else "fp32", opset=0,
        model_class="UNet2DConditionModel" if CONTEXT in by_name else "UNet2DModel", model_config=config,
        inputs=inputs, outputs=outputs,
    )


def _static(shape) -> tuple:
    """A shape with symbolic dims (names, None) as None: what must match between graph and spec."""
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


class OrtDenoiser(DenoiserRuntime):
    """An exported denoiser on ONNX Runtime, callable like the diffusers UNet or transformer it came from.

    ``source``: an export folder, its ``unet/model.onnx``, or any ONNX file with optimum's I/O names.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        source: str | Path,
        providers: Sequence[Provider] | str = (CPU,),
        threads: int = 1,
        options: Any = None,
        check_values: bool = True,
        inexact: Inexact = "refuse",
        lora: Any = None,
    ) -> None:
        """``check_values``: refuse NaN/Inf/out-of-range inputs (False skips the pass over the inputs).
        ``inexact``: what to do when the graph's int8 format is not exact on this CPU (:func:`exactness_entries`).
        ``lora``: adapters for an export with LoRA slots (``FILE``, ``(FILE, scale)`` or a list; :meth:`set_lora`)."""
        path, spec = resolve_source(source)
        if not path.is_file():
            raise ArtifactError(f"{path} not found", hint="the export folder is incomplete; re-run `dqdeploy export`")
        self.session = open_session(path, spec, providers, threads, options, inexact)
        spec = spec or _spec_from_session(self.session, path)
        super().__init__(spec, str(source))
        self.check_values = check_values
        self._lora_feeds: dict[str, np.ndarray] = {}
        self._check_session(path)
        self.onnx_path = path
        self.set_lora(lora)

    def set_lora(self, lora: Any = None) -> None:
        """Run the export's LoRA slots with ``lora`` (``FILE``, ``(FILE, scale)`` or a list of them; ``None``: no
        adapter, the graph computes what it computes without slots). No re-export, no new session."""
        from .lora_feeds import adapter_feeds

        self._lora_feeds = adapter_feeds(self.spec, lora, str(self.source))

    def _check_session(self, path: Path) -> None:
        got = {v.name: (ORT_TYPES.get(v.type, v.type), _static(v.shape)) for v in self.session.get_inputs()
               if not v.name.startswith(LORA_PREFIX)}
        want = {t.name: (t.dtype, _static(t.shape)) for t in self.spec.inputs}
        if got != want:
            raise ArtifactError(
                f"{path} does not match its dqdeploy_export.json: the graph's inputs (dtype, static dims) are {got}, "
                f"the spec says {want}",
                hint="the folder was edited by hand or mixed from two exports; re-run `dqdeploy export`",
            )
        outputs = [v.name for v in self.session.get_outputs()]
        self._output = OUTPUT if OUTPUT in outputs else outputs[0]

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        arrays: Mapping[str, np.ndarray] = {**{n: t.numpy() for n, t in feeds.items()}, **self._lora_feeds}
        try:
            (out,) = self.session.run([self._output], arrays)
        except Exception as exc:  # ORT's own error types (allocation failures, kernels refusing a shape)
            shapes = {n: tuple(a.shape) for n, a in arrays.items()}
            raise RuntimeInputError(f"ONNX Runtime could not run the graph on inputs {shapes}: "
                                    f"{str(exc).splitlines()[0][:300]}",
                                    hint="smaller inputs (batch, resolution) need less memory; inputs must match "
                                         "`dqdeploy inspect EXPORT_DIR`") from None
        return torch.from_numpy(out)


if not TYPE_CHECKING:  # old names, kept for one release (mypy sees only the new ones)
    __getattr__ = renamed(__name__, {"OrtUNet": "OrtDenoiser"})
