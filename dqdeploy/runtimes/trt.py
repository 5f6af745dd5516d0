"""TensorRT drop-in: ``unet/model.plan`` of an export folder on an NVIDIA GPU.

Inputs are bound as torch CUDA tensors (``set_tensor_address``), the output is allocated as a torch
CUDA tensor of the shape TensorRT infers, and the engine is enqueued on torch's current stream
(``execute_async_v3``), so it orders with the surrounding torch work without extra syncs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.deprecation import renamed
from ..core.errors import ArtifactError, DQDeployError, RuntimeInputError
from ..system.trt_gate import gpu_description, require_tensorrt
from .base import OUTPUT, DenoiserRuntime
from .engine_spec import read_engine_info
from .spec import read_spec

TORCH_OF_TRT = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool, "UINT8": torch.uint8}


class TrtDenoiser(DenoiserRuntime):
    """A TensorRT engine built by :func:`dqdeploy.exporters.engine.build_engine`, callable like a diffusers UNet.

    ``device``: the CUDA device index the engine runs on (default: the current one).
    """

    backend = "tensorrt"

    def __init__(self, export_dir: str | Path, device: int | None = None, lora: Any = None) -> None:
        """``lora``: adapters for an engine with LoRA slots (``FILE``, ``(FILE, scale)``, a list; :meth:`set_lora`)."""
        trt = require_tensorrt("running a TensorRT engine")
        export_dir = Path(export_dir)
        spec = read_spec(export_dir)
        info = read_engine_info(export_dir)
        plan = export_dir / spec.engine_file
        if not plan.is_file():
            raise ArtifactError(f"{plan} not found", hint=f"build it with build_engine('{export_dir}')")
        super().__init__(spec, str(export_dir))
        self.info = info
        self._device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self._device):
            self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if self.engine is None:
                gpu, cap = gpu_description()
                raise ArtifactError(
                    f"TensorRT {trt.__version__} on {gpu} (sm {cap}) cannot load {plan}, built with TensorRT "
                    f"{info.get('tensorrt_version')} on {info.get('gpu')} (sm {info.get('compute_capability')}): "
                    "engines are specific to the TensorRT version and GPU that built them",
                    hint=f"rebuild here: build_engine('{export_dir}', overwrite=True)",
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._engine_inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self._engine_inputs]
        slot_inputs = [n for s in spec.lora_slots for n in (s["down"], s["up"])]
        if sorted(self._engine_inputs) != sorted([*self._inputs, *slot_inputs]) or not outputs:
            raise ArtifactError(f"{plan}: engine inputs {self._engine_inputs} do not match "
                                f"the export spec's {sorted([*self._inputs, *slot_inputs])}",
                                hint=f"rebuild it: build_engine('{export_dir}', overwrite=True)")
        self._output = OUTPUT if OUTPUT in outputs else outputs[0]
        self._dtypes = {n: self._torch_dtype(n) for n in self._engine_inputs}  # the engine's types win
        self._out_dtype = self._torch_dtype(self._output)
        self._profile = {n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)] for n in self._engine_inputs}
        self._lora_feeds: dict[str, torch.Tensor] = {}
        self.set_lora(lora)

    def set_lora(self, lora: Any = None) -> None:
        """Run the engine's LoRA slots with ``lora`` (``FILE``, ``(FILE, scale)`` or a list of them; ``None``: no
        adapter). No rebuild: the adapters' ranks must be within the engine's profile (``build_engine(lora_rank=)``)."""
        from .lora_feeds import adapter_feeds

        arrays = adapter_feeds(self.spec, lora, str(self.source))
        for name, array in arrays.items():
            lo, _, hi = self._profile[name]
            if any(s < a or s > b for s, a, b in zip(array.shape, lo, hi)):
                raise RuntimeInputError(
                    f"{name}: the adapters' shape {tuple(array.shape)} (their ranks added up) is outside the engine's "
                    f"profile {tuple(lo)}..{tuple(hi)}",
                    hint="use fewer or lower-rank adapters, or rebuild with build_engine(DIR, lora_rank=(min, opt, "
                         "max), overwrite=True)")
        self._lora_feeds = {n: torch.from_numpy(a).to(self._device, self._dtypes[n]) for n, a in arrays.items()}

    def _torch_dtype(self, name: str) -> torch.dtype:
        dtype = self.engine.get_tensor_dtype(name)
        key = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
        if key not in TORCH_OF_TRT:
            raise ArtifactError(f"engine tensor {name} has TensorRT type {key}, which this runtime cannot bind")
        return TORCH_OF_TRT[key]

    def _check_shapes(self, feeds: Mapping[str, torch.Tensor]) -> None:
        super()._check_shapes(feeds)
        for name, value in feeds.items():
            lo, _, hi = self._profile[name]
            shape = tuple(value.shape)
            if any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                cfg = " (classifier-free guidance doubles the batch: build with cfg=True)" if shape[0] > hi[0] else ""
                raise RuntimeInputError(
                    f"{name}: shape {shape} is outside the engine's optimization profile {tuple(lo)}..{tuple(hi)}{cfg}",
                    hint="rebuild the engine with a wider profile: "
                         "build_engine(DIR, batch=(min, opt, max), overwrite=True)",
                )

    def bind(self, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Set input shapes and addresses for validated CUDA ``feeds``; allocate and bind the output.

        The tensors must stay alive until the work enqueued by :meth:`enqueue` has run.
        """
        ctx = self.context
        for name, tensor in feeds.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeInputError(f"TensorRT refused shape {tuple(tensor.shape)} for {name}")
            ctx.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(ctx.get_tensor_shape(self._output))
        if any(d < 0 for d in shape):
            raise DQDeployError(f"TensorRT could not infer the output shape {shape} from the input shapes")
        out = torch.empty(shape, dtype=self._out_dtype, device=self._device)
        ctx.set_tensor_address(self._output, out.data_ptr())
        return out

    def enqueue(self, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueue the bound engine on ``stream`` (default: torch's current stream on this device)."""
        stream = stream or torch.cuda.current_stream(self._device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise DQDeployError("TensorRT's execute_async_v3 failed (its log above says why)")

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.cuda.device(self._device):
            out = self.bind({**feeds, **self._lora_feeds})
            self.enqueue()
        return out


if not TYPE_CHECKING:  # old names, kept for one release (mypy sees only the new ones)
    __getattr__ = renamed(__name__, {"TrtUNet": "TrtDenoiser"})
