"""The drop-in adaptor shared by every runtime: diffusers call signature -> backend -> output.

A :class:`DenoiserRuntime` looks enough like a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` for
``DDPMPipeline``, ``DDIMPipeline``, ``StableDiffusionPipeline`` and :func:`dqdeploy.core.sampling.denoise`:
it has ``.config`` (the exported model's config), ``.dtype``, ``.device`` and
``__call__(sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs)``. An exported
diffusion transformer (SD3, PixArt, Flux) takes its class's own call instead
(:mod:`dqdeploy.runtimes.transformer`), as ``pipe.transformer`` of the matching pipeline.

It is deliberately *not* a ``torch.nn.Module``: pipelines only read ``config``/``dtype`` from their
``unet`` (``transformer``) and skip non-modules in ``.to()`` / offloading, and a module would pretend to own
parameters it does not have. Inputs are validated against the export folder's
:class:`~dqdeploy.runtimes.spec.ExportSpec` before the backend sees them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.denoisers import spec_for
from ..core.deprecation import renamed
from ..core.errors import ArtifactError, RuntimeInputError
from ..core.inputs import CONTEXT, OUTPUT, SAMPLE, TIMESTEP  # noqa: F401  (re-exported to the runtimes)
from ..core.vocab import TEXT_MASK
from .dynamic import TEXT_AXES
from .spec import ExportSpec, TensorSpec
from .transformer import as_tensor, call_transformer

DIM_LABELS = {SAMPLE: ("batch", "channels", "height", "width"), TIMESTEP: ("batch",),
              CONTEXT: ("batch", "sequence", "hidden size"), TEXT_MASK: ("batch", "sequence")}
TIMESTEP_ATOL = 1e-3
# inputs beyond this magnitude are not latents or embeddings: a quantized graph would clip them to a
# finite but meaningless output (the simulation returns NaN/Inf), so they are refused
MAX_ABS_INPUT = 1e4
# diffusers keyword arguments that change the result and that an exported graph cannot honour
UNSUPPORTED_KWARGS = (
    "class_labels", "timestep_cond", "attention_mask", "encoder_attention_mask", "added_cond_kwargs",
    "down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals",
)
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}


class CalibratedStepWarning(UserWarning):
    """A timestep that is not one of the export's calibrated steps was given to a quantized graph."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a numpy dtype name as stored in an :class:`ExportSpec`."""
    if name not in TORCH_DTYPES:
        raise ArtifactError(f"unsupported tensor dtype {name!r} in the export spec "
                            f"(expected one of {', '.join(TORCH_DTYPES)})")
    return TORCH_DTYPES[name]


def _check_values(name: str, value: torch.Tensor) -> None:
    """NaN, Inf and absurd magnitudes are refused (a quantized graph would turn them into finite noise)."""
    v = value.detach()
    if not v.is_floating_point():
        v = v.double()
    peak = float(v.abs().amax()) if v.numel() else 0.0  # one pass: NaN and Inf both reach the peak
    if not math.isfinite(peak):
        raise RuntimeInputError(f"{name}: holds {int((~torch.isfinite(v)).sum())} NaN/Inf value(s)",
                                hint="check the scheduler and the previous step's output "
                                     "(runtime check_values=False skips this check)")
    limit = 1e6 if name == TIMESTEP else MAX_ABS_INPUT
    if peak > limit:
        raise RuntimeInputError(f"{name}: magnitude {peak:.3g} exceeds {limit:g}, far outside what a UNet is given",
                                hint="check the latents' scaling (scheduler.scale_model_input) or the embeddings")


def frozen_config(model_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """diffusers' ``FrozenDict`` of ``model_config``: ``config.sample_size`` and ``config["sample_size"]``."""
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(dict(model_config))


class DenoiserRuntime:
    """Base of the ONNX Runtime and TensorRT drop-ins: validation, casting, output wrapping.

    Subclasses set ``self._device`` and implement :meth:`_run`, which receives validated tensors on
    that device in the graph's dtypes and returns ``out_sample`` on that device.
    """

    backend = "base"
    #: refuse NaN/Inf and out-of-range values at the boundary (one pass over the inputs; set False for speed)
    check_values: bool = True

    def __init__(self, spec: ExportSpec, source: str = "") -> None:
        self.spec = spec
        self.source = source
        self.config = frozen_config(spec.model_config)
        self._inputs: dict[str, TensorSpec] = {t.name: t for t in spec.inputs}
        self._dtypes = {t.name: torch_dtype(t.dtype) for t in spec.inputs}
        self._device = torch.device("cpu")
        self._calibrated = np.asarray(spec.timesteps, np.float64)
        self._warned_timestep = False
        self.denoiser = spec_for(spec.model_class, source or "the export")
        missing = [n for n in (self.denoiser.sample, TIMESTEP) if n not in self._inputs]
        if missing or not spec.outputs:
            raise ArtifactError(
                f"{source or 'the export'}: expected inputs {self.denoiser.sample} and timestep and one output, "
                f"found inputs {sorted(self._inputs)} and outputs {[t.name for t in spec.outputs]}",
                hint="export with `dqdeploy export`, which writes optimum's I/O names",
            )

    # -- what pipelines read ------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """``torch.float32``: what pipelines should create latents in (DDPM/DDIM pipelines make their
        noise in ``unet.dtype``). The adaptor casts to the graph's dtype at the boundary, so an FP16
        engine still gets FP32 scheduler arithmetic and FP32 VAEs still get FP32 latents."""
        return torch.float32

    @property
    def graph_dtype(self) -> torch.dtype:
        """The graph's own ``sample`` dtype (``torch.float16`` for FP16 exports and engines)."""
        return self._dtypes[self.denoiser.sample]

    @property
    def device(self) -> torch.device:
        """Where the backend runs; inputs from anywhere are accepted, outputs follow the input."""
        return self._device

    @property
    def conditional(self) -> bool:
        return self.spec.conditional

    def __getattr__(self, key: str) -> Any:
        # diffusers models also answer config keys as attributes (``unet.in_channels``)
        config = self.__dict__.get("config")
        if config is not None and not key.startswith("_") and key in config:
            return config[key]
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def to(self, *args: Any, **kwargs: Any) -> "DenoiserRuntime":
        """No-op (the backend's device is fixed at load time); returns ``self`` like ``nn.Module.to``."""
        return self

    def eval(self) -> "DenoiserRuntime":
        return self

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """No-op (Flux pipelines open a cache context around each transformer call)."""
        yield

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, {self.spec.model_class}, "
                f"{self.spec.target}/{self.spec.precision})")

    # -- the call -----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any):
        """Run one denoising step with the call signature of the exported class; returns its output
        dataclass (``UNet2DOutput``, ``UNet2DConditionOutput``, ``Transformer2DModelOutput``) or a 1-tuple."""
        if self.denoiser.is_transformer:
            return call_transformer(self, args, kwargs)
        return self._call_denoiser(*args, **kwargs)

    forward = __call__

    def _call_denoiser(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        for key in UNSUPPORTED_KWARGS:
            value = kwargs.get(key)
            if value is not None and not (isinstance(value, Mapping | list | tuple) and len(value) == 0):
                raise RuntimeInputError(
                    f"{key} was given, but the exported graph has no input for it (inputs: {', '.join(self._inputs)})",
                    hint=f"call without {key}, or export a model whose graph takes it",
                )
        sample = as_tensor(SAMPLE, sample)
        out_device, out_dtype = sample.device, sample.dtype
        feeds = self.prepare_inputs(sample, timestep, encoder_hidden_states)
        self._warn_uncalibrated(timestep)  # the caller's tensor (usually on the CPU): no device sync
        with torch.no_grad():
            out = self._run(feeds)
        out = out.to(device=out_device, dtype=out_dtype)
        if not return_dict:
            return (out,)
        return self._output_class()(sample=out)

    def prepare_inputs(self, sample: Any, timestep: Any, encoder_hidden_states: Any = None) -> dict[str, torch.Tensor]:
        """Validated graph inputs ``{name: tensor}`` on :attr:`device`, in the graph's dtypes, with the
        timestep expanded to ``[batch]``: what :meth:`__call__` hands the backend."""
        sample, context = as_tensor(SAMPLE, sample), encoder_hidden_states
        if not sample.is_floating_point():
            raise RuntimeInputError(f"sample: expected a floating-point tensor, found dtype {sample.dtype}",
                                    hint="pass the latents as float32 (or float16)")
        if sample.dim() != 4:
            raise RuntimeInputError(
                f"sample: expected a 4-D tensor [batch, channels, height, width], found shape {tuple(sample.shape)}",
                hint="unbatched latents need a leading batch axis: sample[None]",
            )
        batch = sample.shape[0]
        if batch == 0 or sample.numel() == 0:
            raise RuntimeInputError(f"sample: empty batch (shape {tuple(sample.shape)})",
                                    hint="pass at least one latent")
        t = self._timestep(timestep, batch)
        feeds = {SAMPLE: sample, TIMESTEP: t}
        if self.conditional:
            if context is None:
                raise RuntimeInputError(
                    "encoder_hidden_states is missing: this exported UNet is conditional "
                    f"(expected a tensor of shape {self._inputs[CONTEXT].shape})",
                    hint="pass encoder_hidden_states=prompt embeddings (for classifier-free guidance, the "
                         "[uncond; cond] batch)",
                )
            context = as_tensor(CONTEXT, context)
            if not context.is_floating_point():
                raise RuntimeInputError("encoder_hidden_states: expected a floating-point tensor, "
                                        f"found {context.dtype}")
            feeds[CONTEXT] = context
        elif context is not None:
            raise RuntimeInputError(
                "encoder_hidden_states was given, but this exported UNet is unconditional (it has no such input)",
                hint="call it as unet(sample, timestep)",
            )
        extra = [n for n in self._inputs if n not in feeds]
        if extra:
            raise RuntimeInputError(f"the graph needs inputs this adaptor cannot fill: {', '.join(extra)}",
                                    hint="run the ONNX file with onnxruntime directly")
        self._check_shapes(feeds)
        if self.check_values:
            for name, value in feeds.items():
                _check_values(name, value)
        return {n: v.to(device=self._device, dtype=self._dtypes[n]).contiguous() for n, v in feeds.items()}

    def _timestep(self, timestep: Any, batch: int) -> torch.Tensor:
        t = as_tensor(TIMESTEP, timestep)
        if t.dtype == torch.bool or t.is_complex():
            raise RuntimeInputError(f"timestep: expected a real number or a [batch] tensor, found dtype {t.dtype}")
        if t.dim() == 0:
            return t.reshape(1).expand(batch)
        if t.dim() == 1 and t.shape[0] in (1, batch):
            return t.expand(batch)
        raise RuntimeInputError(
            f"timestep: expected a scalar or a tensor of shape [{batch}] (one step per sample), "
            f"found shape {tuple(t.shape)}",
            hint="pass one timestep for the whole batch, or one per sample",
        )

    def _check_shapes(self, feeds: Mapping[str, torch.Tensor]) -> None:
        """Ranks, static dims and consistent symbolic dims (the batch) against the export spec."""
        symbols: dict[str, tuple[str, int]] = {}
        for name, value in feeds.items():
            spec = self._inputs[name]
            labels = DIM_LABELS.get(name, ())
            if value.dim() != len(spec.shape):
                raise RuntimeInputError(
                    f"{name}: expected rank {len(spec.shape)} (shape {spec.shape}), found shape {tuple(value.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
                label = labels[axis] if axis < len(labels) else f"dim {axis}"
                if isinstance(want, int) and want > 0 and want != got:
                    raise RuntimeInputError(
                        f"{name}: expected {label} {want} (shape {spec.shape}), "
                        f"found {got} (shape {tuple(value.shape)})",
                        hint=self._shape_hint(name, axis, want, got),
                    )
                if isinstance(want, str) and want and name == self.denoiser.sample and axis >= 2:
                    self._check_resolution(name, label, got)
                if isinstance(want, str) and want and TEXT_AXES.get(name) == axis:
                    self._check_text_length(name, got)
                if isinstance(want, str) and want:
                    seen = symbols.setdefault(want, (name, got))
                    if seen[1] != got:
                        raise RuntimeInputError(
                            f"{name}: {label} is {got}, but {seen[0]} has {seen[1]} for the same axis '{want}'",
                            hint="sample, timestep and encoder_hidden_states must share the batch size",
                        )

    def _check_resolution(self, name: str, label: str, got: int) -> None:
        """A dynamic-resolution graph takes the latent sizes its export asked for (``--dynamic-resolution``)."""
        from .dynamic import resolution_step

        bounds = self.spec.resolution_range
        if bounds and not bounds[0] <= got <= bounds[1]:
            raise RuntimeInputError(f"{name}: {label} {got} is outside the range {bounds[0]}..{bounds[1]} "
                                    "the graph was exported for",
                                    hint=f"re-export with --dynamic-resolution covering {got}")
        step = resolution_step(self.denoiser, self.spec.model_config) if bounds else 1
        if got % step:
            raise RuntimeInputError(f"{name}: {label} {got} is not a multiple of {step}, the model's resolution step",
                                    hint=f"use {got // step * step} or {(got // step + 1) * step}")

    def _check_text_length(self, name: str, got: int) -> None:
        """A dynamic-text-length graph takes the token counts its export asked for (``--dynamic-text-length``)."""
        bounds = self.spec.text_length_range
        if bounds and not bounds[0] <= got <= bounds[1]:
            raise RuntimeInputError(f"{name}: sequence {got} is outside the range {bounds[0]}..{bounds[1]} text tokens "
                                    "the graph was exported for",
                                    hint=f"re-export with --dynamic-text-length {min(bounds[0], got)}:"
                                         f"{max(bounds[1], got)}, or encode the prompts to {bounds[0]}..{bounds[1]} "
                                         f"tokens (e.g. {self.denoiser.text_length_call(bounds[1])})")

    def _shape_hint(self, name: str, axis: int, want: int = 0, got: int = 0) -> str:
        if name == SAMPLE and axis == 1:
            return "the latents' channel count is fixed by the model (config.in_channels)"
        if name == SAMPLE:
            return "the graph was exported at a fixed resolution; re-export at the resolution you sample at"
        if TEXT_AXES.get(name) == axis:
            return (f"the graph takes the {want} text tokens of its calibration conditioning (not a text encoder "
                    f"fault): export with --dynamic-text-length {min(want, got)}:{max(want, got)} (dqdeploy export "
                    f"QUANT_DIR --dynamic-text-length ...) to take {got}, or encode the prompts to {want} tokens "
                    f"({self.denoiser.text_length_call(want)})")
        if name == CONTEXT:
            return "encoder_hidden_states must come from the text encoder the model was exported for"
        return "check the inputs against `dqdeploy inspect EXPORT_DIR`"

    def _warn_uncalibrated(self, timestep: Any) -> None:
        if self._warned_timestep or self._calibrated.size == 0:
            return
        values = np.unique(as_tensor(TIMESTEP, timestep).detach().double().cpu().numpy().reshape(-1))
        dist = np.abs(values[:, None] - self._calibrated[None, :]).min(axis=1)
        off = values[dist > TIMESTEP_ATOL]
        if off.size:
            self._warned_timestep = True
            nearest = self._calibrated[np.abs(off[0] - self._calibrated).argmin()]
            warnings.warn(
                f"timestep {off[0]:g} is not one of the {self._calibrated.size} calibrated steps of this export: "
                f"the graph uses the nearest calibrated step ({nearest:g}) for its activation scales. "
                "Sample with the scheduler and step count used for calibration for the calibrated accuracy "
                "(warned once per runtime).",
                CalibratedStepWarning,
                stacklevel=3,
            )

    def _output_class(self):
        if self.conditional:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        """Execute the backend on validated inputs; return ``out_sample`` on :attr:`device`."""
        raise NotImplementedError


if not TYPE_CHECKING:  # old names, kept for one release (mypy sees only the new ones)
    __getattr__ = renamed(__name__, {"UNetRuntime": "DenoiserRuntime"})
