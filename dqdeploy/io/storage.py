"""The artifact's tensor format (format version 2): quantized layers keep integer weights.

A quantized layer ``L`` stores its weight as integers plus its per-channel step sizes
(``L.weight_quantizer.scale``), never as float:

* 8-bit and 7-bit: ``L.weight_int8``, int8, the weight's shape;
* 4-bit: ``L.weight_int4``, uint8 ``[ceil(n / 2)]``: the ``n`` integers of the flattened weight in
  two's complement, two per byte, the even index in the low nibble (ONNX's INT4 order); an odd
  ``n`` leaves the last high nibble 0.

The simulation's weight is ``integers * scale``: re-quantizing it gives the same integers, so a
loaded artifact computes exactly what the quantized model did. Everything else (biases, ``1/s``,
activation step tables, norms, embeddings, layers kept in float) keeps its float tensor under its
module's name. Format version 1 stored the float weights; it is still read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..quant.attention import attention_scale_keys
from ..quant.modules import quant_layers

INT_KEYS = {8: "weight_int8", 7: "weight_int8", 4: "weight_int4"}  # 7-bit integers are held in int8, like 8-bit ones
INT_DTYPES = {8: torch.int8, 7: torch.int8, 4: torch.uint8}
# safetensors header names of the dtypes dqdeploy writes or may meet
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
               torch.bool: "BOOL"}
Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def int_key(layer: str, bits: int) -> str:
    """The name of a quantized layer's integer weight tensor."""
    return f"{layer}.{INT_KEYS[bits]}"


def packed_size(numel: int) -> int:
    """Bytes of ``numel`` 4-bit integers packed two per byte."""
    return (numel + 1) // 2


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-8, 7] (any shape) -> uint8 [ceil(n / 2)], two's complement nibbles, low first."""
    flat = q.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(n / 2)] -> int8 [n]: the inverse of :func:`pack_int4`."""
    b = packed.to(torch.int16)
    nibbles = torch.stack([b & 0xF, b >> 4], 1).reshape(-1)[:numel]
    return (nibbles - ((nibbles & 0x8) << 1)).to(torch.int8)


def padding_nibble(packed: torch.Tensor, numel: int) -> int:
    """The unused high nibble of an odd count (0 in a sound file; 0 when ``numel`` is even)."""
    return int(packed[-1]) >> 4 if numel % 2 and packed.numel() else 0


def stored_state(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """``denoiser``'s state dict in the artifact's format: each quantized layer's float weight
    replaced by its integers (``weight_quantizer.integers``), 4-bit ones packed; every step size stored
    positive (the quantizers use its magnitude)."""
    state = dict(denoiser.state_dict())
    for name, layer in quant_layers(denoiser).items():
        bits = layer.weight_quantizer.bits
        q = layer.weight_quantizer.integers(layer.weight)
        for key in (f"{name}.weight_quantizer.scale", f"{name}.input_quantizer.scale",
                    f"{name}.output_scale"):  # the quantizers use |scale|
            if key in state:
                state[key] = state[key].abs()
        del state[f"{name}.weight"]
        state[int_key(name, bits)] = pack_int4(q) if bits == 4 else q
    for key in attention_scale_keys(state):
        state[key] = state[key].abs()
    return state


def simulation_state(stored: Mapping[str, torch.Tensor], layer_bits: Mapping[str, int],
                     shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The state dict the simulation loads: integer weights of ``layer_bits`` (layer -> bits) turned
    into ``integers * scale`` of the shapes in ``shapes`` (``<layer>.weight`` -> shape)."""
    state = dict(stored)
    for name, bits in layer_bits.items():
        shape = shapes[f"{name}.weight"]
        q = state.pop(int_key(name, bits))
        if bits == 4:
            q = unpack_int4(q, math.prod(shape))
        scale = state[f"{name}.weight_quantizer.scale"]
        state[f"{name}.weight"] = q.reshape(shape).to(scale.dtype) * scale.view(-1, *([1] * (len(shape) - 1)))
    return state


def expected_header(state: Mapping[str, torch.Tensor], layer_bits: Mapping[str, int]) -> Header:
    """What the weights file must hold, from the (meta-device) state dict of the quantized model
    the manifest describes: dtype and shape per tensor, integer weights in place of float ones."""
    header = {k: (DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for k, t in state.items()}
    for name, bits in layer_bits.items():
        _, shape = header.pop(f"{name}.weight")
        stored = (packed_size(math.prod(shape)),) if bits == 4 else shape
        header[int_key(name, bits)] = (DTYPE_NAMES[INT_DTYPES[bits]], stored)
    return header


def file_header(path: Path) -> Header:
    """Dtype and shape of every tensor in a safetensors file, from its header (nothing loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return {k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()}


def weight_bytes(header: Header) -> dict[str, int]:
    """Bytes of a weights file's tensors by kind: ``int8``, ``int4`` (packed) and ``float``."""
    sizes = {"I8": 1, "U8": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8, "BOOL": 1}
    totals = {"int8": 0, "int4": 0, "float": 0}
    for key, (dtype, shape) in header.items():
        kind = "int8" if key.endswith("." + INT_KEYS[8]) else "int4" if key.endswith("." + INT_KEYS[4]) else "float"
        totals[kind] += math.prod(shape) * sizes.get(dtype, 4)
    return totals
