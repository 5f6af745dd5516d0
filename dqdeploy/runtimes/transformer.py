"""The drop-in call of an exported diffusion transformer (SD3, PixArt, Flux).

diffusers pipelines call ``pipe.transformer(hidden_states=..., timestep=..., encoder_hidden_states=...,
pooled_projections=..., [img_ids=..., txt_ids=..., guidance=...,] joint_attention_kwargs=None,
return_dict=False)``. The arguments are bound against the diffusers class's own ``forward``
signature, so positional and keyword calls are read exactly as the model would read them; the graph
inputs (named like those keywords: PixArt's ``encoder_attention_mask`` too where the graph takes it) are fed,
arguments that change nothing are accepted (``None``, empty attention kwargs, PixArt's ``added_cond_kwargs``
without size conditions, an all-ones text attention mask for a graph without a mask input), and anything else raises
:class:`~dqdeploy.core.errors.RuntimeInputError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..core.denoisers import DenoiserSpec
from ..core.errors import RuntimeInputError
from ..core.vocab import CONTEXT, TEXT_MASK

ATTENTION_KWARGS = ("joint_attention_kwargs", "cross_attention_kwargs", "attention_kwargs")


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` as a tensor (numpy arrays are copied: they may be read-only), or a typed error."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return torch.tensor(np.asarray(value))
    if isinstance(value, int | float):
        return torch.tensor(value)
    raise RuntimeInputError(f"{name}: expected a torch.Tensor or numpy array, found {type(value).__name__}")


@lru_cache(maxsize=None)
def _signature(class_name: str) -> inspect.Signature:
    import diffusers

    return inspect.signature(getattr(diffusers, class_name).forward)


def _harmless(name: str, value: Any) -> bool:
    """Arguments the exported graph can ignore without changing the result."""
    if value is None:
        return True
    if name in ATTENTION_KWARGS and isinstance(value, Mapping):
        return all(k == "scale" and v == 1.0 for k, v in value.items())
    if name == "added_cond_kwargs" and isinstance(value, Mapping):
        return all(v is None for v in value.values())
    if name == "encoder_attention_mask" and isinstance(value, torch.Tensor):
        return bool((value == 1).all())
    return False


def bind_call(spec: DenoiserSpec, names: list[str], args: tuple, kwargs: dict) -> tuple[dict[str, Any], bool]:
    """``({graph input: value}, return_dict)`` for a diffusers-style call of ``spec``'s class."""
    try:
        bound = _signature(spec.class_name).bind(None, *args, **kwargs)
    except TypeError as exc:
        raise RuntimeInputError(f"{spec.class_name} call: {exc}",
                                hint="call it as the diffusers model is called") from None
    values = dict(bound.arguments)
    values.pop(next(iter(values)))  # self
    return_dict = bool(values.pop("return_dict", True))
    extra = values.pop("kwargs", {})
    values.update(extra)
    feeds = {n: values.pop(n) for n in names if values.get(n) is not None}
    for name, value in values.items():
        if not _harmless(name, value):
            raise RuntimeInputError(
                f"{name} was given, but the exported graph has no input for it (inputs: {', '.join(names)})",
                hint=_missing_input_hint(spec, name),
            )
    return feeds, return_dict


def _missing_input_hint(spec: DenoiserSpec, name: str) -> str:
    """How to run a call whose ``name`` the graph lacks: PixArt's text mask is a graph input when calibrated with it."""
    if name == TEXT_MASK and name in spec.inputs:
        return ("quantize with a conditioning file that holds the text mask (dqdeploy encode-prompts or quantize "
                "--prompts write it) and export again; or call without the mask, or with an all-ones one")
    return f"call without {name}, or run the PyTorch model"


def prepare_transformer_inputs(runtime: Any, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Validated graph inputs on the runtime's device and dtypes: the timestep expanded to
    ``[batch]``, ``guidance`` likewise, position ids without a batch axis."""
    spec = runtime.denoiser
    names = list(runtime._inputs)
    feeds = _unmasked_default(names, feeds)
    missing = [n for n in names if n not in feeds]
    if missing:
        raise RuntimeInputError(f"{spec.class_name}: missing {', '.join(missing)} "
                                f"(the graph's inputs: {', '.join(names)})",
                                hint="pass every input the pipeline passes to its transformer")
    tensors = {n: as_tensor(n, v) for n, v in feeds.items()}
    sample = tensors[spec.sample]
    if not sample.is_floating_point():
        raise RuntimeInputError(f"{spec.sample}: expected a floating-point tensor, found dtype {sample.dtype}")
    batch = sample.shape[0]
    for name in ("timestep", "guidance"):
        if name in tensors:
            tensors[name] = (runtime._timestep(tensors[name], batch) if name == "timestep"
                             else _per_sample(name, tensors[name], batch))
    for name in spec.shared:
        if name in tensors and tensors[name].dim() == 3:  # the deprecated batched form: one row serves all
            tensors[name] = tensors[name][0]
    if TEXT_MASK in tensors:
        _check_mask(tensors[TEXT_MASK])
    runtime._check_shapes(tensors)
    return {n: v.to(device=runtime.device, dtype=runtime._dtypes[n]).contiguous() for n, v in tensors.items()}


def _unmasked_default(names: list[str], feeds: dict[str, Any]) -> dict[str, Any]:
    """``feeds`` with an all-ones text mask where the graph takes one and none was given: what the model does with
    ``encoder_attention_mask=None`` (every text token attended to)."""
    context = feeds.get(CONTEXT)
    if TEXT_MASK not in names or TEXT_MASK in feeds or not isinstance(context, torch.Tensor) or context.dim() != 3:
        return feeds
    return {**feeds, TEXT_MASK: torch.ones(context.shape[:2], dtype=torch.float32)}


def _check_mask(mask: torch.Tensor) -> None:
    """A text mask holds 0 (padding) and 1 (token) only: the graph's attention reads it as a key padding mask."""
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise RuntimeInputError(f"{TEXT_MASK}: expected 0 (padding) and 1 (text token) only, found other values "
                                f"(shape {tuple(mask.shape)}, dtype {mask.dtype})",
                                hint="pass the tokenizer's attention_mask, as the PixArt pipelines do")


def _per_sample(name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
    if value.dim() == 0 or value.numel() == 1:
        return value.reshape(1).expand(batch)
    if value.dim() == 1 and value.shape[0] == batch:
        return value
    raise RuntimeInputError(f"{name}: expected a scalar or a tensor of shape [{batch}], "
                            f"found shape {tuple(value.shape)}")


def call_transformer(runtime: Any, args: tuple, kwargs: dict):
    """One denoising step of an exported transformer; returns ``Transformer2DModelOutput`` or a 1-tuple."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    feeds, return_dict = bind_call(runtime.denoiser, list(runtime._inputs), args, kwargs)
    sample = feeds.get(runtime.denoiser.sample)
    if not isinstance(sample, torch.Tensor):
        raise RuntimeInputError(f"{runtime.denoiser.sample}: expected a torch.Tensor, found {type(sample).__name__}")
    prepared = prepare_transformer_inputs(runtime, feeds)
    runtime._warn_uncalibrated(feeds["timestep"])
    with torch.no_grad():
        out = runtime._run(prepared).to(device=sample.device, dtype=sample.dtype)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)
