"""Float ONNX export of a diffusers denoiser with optimum's I/O contract.

UNets: inputs ``sample`` [B, C, H, W], ``timestep`` [B] (float32) and, for conditional UNets,
``encoder_hidden_states`` [B, S, D]; output ``out_sample``. Diffusion transformers: ``hidden_states``,
``encoder_hidden_states``, [PixArt: ``encoder_attention_mask`` [B, S] where the calibration data has it,]
``pooled_projections`` (SD3, Flux), ``timestep`` [, ``img_ids``, ``txt_ids`` (no batch axis), ``guidance``] ->
``out_hidden_states`` (:mod:`dqdeploy.core.denoisers`).
The batch axis is dynamic (the latent height and width too with ``resolution_range``, the text length with
``text_length_range``). Q/DQ nodes are
added afterwards by graph surgery (:mod:`dqdeploy.exporters.qdq`), never by the exporter.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, cast

import torch

from ..core.denoisers import GUIDANCE, POOLED, conditioning_dims, latent_shape, spec_of
from ..core.errors import ExportError, require
from ..core.inputs import CONTEXT, DenoiserInputs
from ..core.sampling import shared_inputs
from ..runtimes.dynamic import sample_axes, text_axes
from .external import LOAD_BELOW, is_external, load_graph
from .graph_index import skeleton

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes: protobuf's limit is 2 GiB


class _DenoiserGraph(torch.nn.Module):
    """Keyword adaptor: the graph inputs (named like the diffusers call's keywords) -> output tensor.

    Its parameter names are the graph's input names (the exporter keys dynamic axes by them)."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__()
        # "unet" whatever the denoiser: the attribute name is the graph's node-name prefix, which Q/DQ surgery
        # (SurgeryOptions.scope_prefix) and existing export folders' graphs use -- not a claim about the model
        self.unet = denoiser

    def forward(self, sample=None, hidden_states=None, encoder_hidden_states=None, pooled_projections=None,
                timestep=None, img_ids=None, txt_ids=None, guidance=None, encoder_attention_mask=None):  # noqa: D401
        given = dict(sample=sample, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                     pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                     guidance=guidance, encoder_attention_mask=encoder_attention_mask)
        if encoder_attention_mask is not None:
            _same_batch(hidden_states, encoder_hidden_states, encoder_attention_mask)
        return self.unet(**{k: v for k, v in given.items() if v is not None}, return_dict=False)[0]


def _same_batch(first: torch.Tensor, *others: torch.Tensor) -> None:
    """Tell the tracer that the inputs share one batch size. The exporter traces size-obliviously, each input with
    its own batch symbol; PixArt reshapes the text with ``view(batch, -1, width)`` and its attention views the mask
    with ``-1``, so without this the mask's broadcast axis is an unknown quotient and the trace fails."""
    for other in others:
        torch._check(other.shape[0] == first.shape[0])


def drop_noop_squeezes(model: Any) -> int:
    """Turn ``Squeeze`` nodes whose axes have a known size other than 1 into ``Identity``.

    ``torch.squeeze(x, dim)`` is a no-op when that dim is not 1 (PixArt squeezes [B, N, C] on
    axis 1); the exporter writes it as an ONNX Squeeze, which ONNX Runtime then refuses to load.
    """
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(skeleton(model))  # large initializers stay out
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT64
              and not is_external(i)}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Squeeze" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        shape = shapes.get(node.input[0])
        axes = [int(a) for a in consts[node.input[1]].reshape(-1)]
        if shape and all(-len(shape) <= a < len(shape) and shape[a] not in (None, 1) for a in axes):
            node.op_type = "Identity"
            del node.input[1:]
            fixed += 1
    return fixed


def example_inputs(denoiser: torch.nn.Module, batch: int = 2, seq_len: int | None = None, size: int = 8
                   ) -> DenoiserInputs:
    """Random inputs for any diffusers denoiser, from its config and spec: the latent (``size`` x ``size`` where the
    config has no sample_size), the timestep in the model's scale, and the spec's conditioning inputs with
    ``seq_len`` text tokens (default: 77 for UNets, CLIP's length; 8 for transformers)."""
    spec, cfg = spec_of(denoiser), cast(Any, denoiser).config
    seq_len = seq_len or (8 if spec.is_transformer else 77)
    dims = conditioning_dims(spec, cfg)
    sample = torch.randn(*latent_shape(spec, cfg, batch, cfg.get("sample_size") or size))
    values = {GUIDANCE: torch.full((batch,), 3.5)}
    if CONTEXT in dims:
        values[CONTEXT] = torch.randn(batch, seq_len, dims[CONTEXT])
    if POOLED in dims:
        values[POOLED] = torch.randn(batch, dims[POOLED])
    conditioning = {n: values[n] for n in spec.input_names(cfg) if n in values}
    timestep = torch.linspace(1.0, 900.0, batch) * spec.timestep_scale
    return DenoiserInputs(sample, timestep, conditioning, spec.sample, shared_inputs(spec, sample, values))


def _dynamic_shapes(denoiser: torch.nn.Module, inputs: DenoiserInputs, names: list[str],
                    resolution_range: tuple[int, int] | None, text_length_range: tuple[int, int] | None = None
                    ) -> dict[str, Any]:
    """torch.export dims per input: the batch (not for shared inputs), the latent H/W and the text length on
    request."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic: dict[str, Any] = {name: (None if name in inputs.shared else {0: batch}) for name in names}
    spec = spec_of(denoiser, fallback="UNet2DConditionModel")
    if resolution_range is not None:
        size = (int(inputs.sample.shape[-2]), int(inputs.sample.shape[-1]))
        dynamic[inputs.sample_name] = {0: batch} | sample_axes(spec, cast(Any, denoiser).config, size,
                                                               *resolution_range)
    if text_length_range is not None:
        length = int(inputs.context.shape[1]) if inputs.context is not None else 0
        for name, axes in text_axes(spec, names, length, *text_length_range).items():
            dynamic[name] = {0: batch} | axes
    return dynamic


def export_module(module: torch.nn.Module, path: str | Path, *, inputs: dict[str, Any], outputs: list[str],
                  dynamic: dict[str, Any], opset: int = 20, what: str = "the model", hint: str | None = None) -> None:
    """``torch.onnx.export`` (dynamo) of ``module`` called with ``inputs`` as keywords (the graph's input names, in
    order) to ``path``, its weights as external data beside it; ``dynamic``: torch.export dims per input. The
    exporter's noise is silenced and its many exception types become one :class:`ExportError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = {m: m.training for m in module.modules()}  # restored as found (a wrapper's flag is not the model's)
    module.eval()
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" and similar noise
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (), str(path), kwargs=inputs, input_names=list(inputs), output_names=outputs,
                              dynamic_shapes=dynamic, opset_version=opset, dynamo=True, external_data=True,
                              verbose=False)
    except Exception as exc:  # the exporter raises many types; report them as one
        raise ExportError(f"torch.onnx.export failed for {what}: {exc}",
                          hint=hint or "check that the model runs in eval mode on the example inputs") from exc
    finally:
        for m, training in was_training.items():
            m.training = training
        exporter_log.setLevel(level)


def export_float_onnx(
    denoiser: torch.nn.Module,
    path: str | Path,
    *,
    inputs: DenoiserInputs | None = None,
    opset: int = 20,
    large_external: bool = False,
    resolution_range: tuple[int, int] | None = None,
    text_length_range: tuple[int, int] | None = None,
) -> Any:
    """Export ``denoiser`` (a diffusers UNet or diffusion transformer, or any module with one of their
    call signatures) to a float ONNX model; the graph inputs are ``inputs``' names in the order of
    the model's :class:`~dqdeploy.core.denoisers.DenoiserSpec` (optimum's).

    ``resolution_range`` = (MIN, MAX) makes the latent height and width dynamic, ``text_length_range`` the text
    tokens (:mod:`.dynamic`).
    Returns the model read back from ``path``: every tensor in memory, or with ``large_external``
    only those under :data:`~.external.LOAD_BELOW` bytes (the weights then stay in ``path``'s data
    file, which must outlive the model: :func:`~.external.write_graph` copies them from there).
    """
    require("onnx", "ort", "ONNX export")
    inputs = inputs or example_inputs(denoiser)
    spec = spec_of(denoiser, fallback="UNet2DConditionModel")  # other modules: the UNet call signature
    given = inputs.kwargs()
    feeds = {n: given[n] for n in spec.inputs if n in given} | given  # optimum's order first
    dynamic = _dynamic_shapes(denoiser, inputs, list(feeds), resolution_range, text_length_range)
    export_module(_DenoiserGraph(denoiser), path, inputs=feeds, outputs=[spec.output], dynamic=dynamic, opset=opset,
                  what=type(denoiser).__name__, hint="check that the model runs in eval mode on the example inputs")
    model = load_graph(path, load_below=LOAD_BELOW if large_external else None)
    drop_noop_squeezes(model)
    return model
