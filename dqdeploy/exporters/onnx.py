"""Float ONNX export of a diffusers UNet with optimum's I/O contract.

Inputs ``sample`` [B, C, H, W], ``timestep`` [B] (float32) and, for conditional UNets,
``encoder_hidden_states`` [B, S, D]; output ``out_sample``. The batch axis is dynamic. Q/DQ nodes
are added afterwards by graph surgery (:mod:`dqdeploy.exporters.qdq`), never by the exporter.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError, require
from ..inputs import OUTPUT, DenoiserInputs
from ..models import latent_shape

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes: protobuf's limit is 2 GiB


class _UNetGraph(torch.nn.Module):
    """Positional-argument adaptor for UNets: (sample, timestep[, context]) -> out_sample tensor.

    Its parameter names are the graph's input names (the exporter keys dynamic axes by them);
    denoisers with other inputs (diffusion transformers) need an adaptor with their names."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states=None):  # noqa: D401
        if encoder_hidden_states is None:
            return self.unet(sample, timestep, return_dict=False)[0]
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def example_inputs(unet: torch.nn.Module, batch: int = 2, seq_len: int = 77) -> DenoiserInputs:
    """Build example inputs from a diffusers UNet's config."""
    sample = torch.randn(batch, *latent_shape(unet))
    timestep = torch.linspace(1.0, 900.0, batch)
    context = None
    cross = getattr(unet.config, "cross_attention_dim", None)
    if cross is not None:
        context = torch.randn(batch, seq_len, int(cross))
    return DenoiserInputs.create(sample, timestep, encoder_hidden_states=context)


def export_float_onnx(
    unet: torch.nn.Module,
    path: str | Path,
    *,
    inputs: DenoiserInputs | None = None,
    opset: int = 20,
) -> Any:
    """Export ``unet`` (any module with the diffusers UNet call signature) to a float ONNX model.

    Returns the in-memory model; ``path`` is only a scratch location for the exporter.
    """
    onnx = require("onnx", "ort", "ONNX export")
    inputs = inputs or example_inputs(unet)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {name: {0: batch} for name in inputs.names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = unet.training
    unet.eval()
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" and similar noise
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _UNetGraph(unet),
                inputs.tensors(),
                str(path),
                input_names=inputs.names,
                output_names=[OUTPUT],
                dynamic_shapes=dynamic,
                opset_version=opset,
                dynamo=True,
                external_data=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; report them as one
        raise ExportError(
            f"torch.onnx.export failed for {type(unet).__name__}: {exc}",
            hint="check that the model runs in eval mode on the example inputs",
        ) from exc
    finally:
        unet.train(was_training)
        exporter_log.setLevel(level)
    return onnx.load(str(path), load_external_data=True)
