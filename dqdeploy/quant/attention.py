"""Quantized attention (DilateQuant's standard setting): the inputs of both batched matmuls on the integer grid.

``softmax(Qq(q * r) @ Qk(k * r)^T) -> Qp -> @ Qv(v)`` with ``r = sqrt(scale)`` (the ONNX exporter writes
scaled dot-product attention as ``MatMul(q * r, k^T * r)``, so the quantized tensors are exactly the graph's
MatMul inputs). ``Qq``, ``Qk``, ``Qv``: per-tensor activation quantizers with one step per time step (the
Temporal Parallel Quantizer's rows, repeated over heads), calibrated and distilled like every other step size.
``Qp``: the softmax output on the fixed grid ``k / 127``, ``k`` in ``[0, 127]``: 8-bit signed in TensorRT's
int8 Q/DQ, and in ONNX Runtime a uint8 operand that cannot saturate an int16 pair sum with any int8 ``v``.

Every diffusers attention processor that calls ``torch.nn.functional.scaled_dot_product_attention`` is covered
(UNet self- and cross-attention, SD3 joint, PixArt, Flux double and single blocks): while the attention module
runs, a :class:`~torch.overrides.TorchFunctionMode` routes that one call to :meth:`AttentionQuant.attention`.
The quantizers are a child module ``act_quant`` of the attention module, so they are in its state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .primitives import round_ste
from .quantizer import ActQuantizer
from .timestep import StepIndex

CHILD = "act_quant"  # the attention module's child holding its quantizers
PROB_LEVELS = 127  # softmax output grid: k / 127, k in [0, 127]
ROLES = ("query", "key", "value")


class _Route(TorchFunctionMode):
    """While active: ``scaled_dot_product_attention`` -> ``quant.attention``; every other call unchanged."""

    def __init__(self, quant: "AttentionQuant") -> None:
        super().__init__()
        self.quant = quant

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return self.quant.attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class AttentionQuant(nn.Module):
    """The quantizers of one attention's batched matmuls, and the quantized attention itself."""

    prob_step: torch.Tensor  # a buffer: the softmax output's fixed step 1/127

    def __init__(self, n_steps: int, bits: int, step_index: StepIndex) -> None:
        super().__init__()
        self.query = ActQuantizer(n_steps, bits, True, step_index)
        self.key = ActQuantizer(n_steps, bits, True, step_index)
        self.value = ActQuantizer(n_steps, bits, True, step_index)
        self.register_buffer("prob_step", torch.tensor(1.0 / PROB_LEVELS), persistent=False)
        self._routes: list[_Route] = []

    def quantizers(self) -> dict[str, ActQuantizer]:
        """``query``, ``key`` and ``value`` by role."""
        return {role: getattr(self, role) for role in ROLES}

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        """``scaled_dot_product_attention`` with quantized matmul inputs (same arguments, eval semantics)."""
        if dropout_p:
            raise NotImplementedError("quantized attention runs without attention dropout")
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        r = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
        # integer products scaled once, as the integer kernels compute them (float products when disabled)
        q, q_step = self.query(query * r, integer_form=True)
        k, k_step = self.key(key * r, integer_form=True)
        scores = (q @ k.transpose(-2, -1)) * (q_step * k_step)
        if is_causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
        probs = torch.softmax(scores, dim=-1)
        v, v_step = self.value(value, integer_form=True)
        if not self.query.enabled:
            return probs @ v
        p = torch.clamp(round_ste(probs / self.prob_step), 0, PROB_LEVELS)
        return (p @ v) * (self.prob_step * v_step)

    def enter(self) -> None:
        route = _Route(self)
        route.__enter__()
        self._routes.append(route)

    def leave(self) -> None:
        if self._routes:
            self._routes.pop().__exit__(None, None, None)

    def extra_repr(self) -> str:
        return f"bits={self.query.bits}, steps={self.query.n_steps}, softmax grid 1/{PROB_LEVELS}"


def _enter(module: nn.Module, args: tuple) -> None:
    quant = getattr(module, CHILD, None)
    if isinstance(quant, AttentionQuant):
        quant.enter()


def _leave(module: nn.Module, args: tuple, output: object) -> None:
    quant = getattr(module, CHILD, None)
    if isinstance(quant, AttentionQuant):
        quant.leave()


def is_attention(module: nn.Module) -> bool:
    """A diffusers attention module (``Attention``, ``FluxAttention``, ...): it owns a processor and heads."""
    return hasattr(module, "processor") and hasattr(module, "heads") and hasattr(module, "to_q")


def sdpa_attentions(denoiser: nn.Module, forward: Callable[[], object], selects: Callable[[str], bool]) -> list[str]:
    """The attention modules of ``denoiser`` that ``selects`` keeps and whose forward, in ``forward()`` (one
    example call), reaches ``scaled_dot_product_attention`` (the ones quantized attention can cover)."""
    names = {id(m): n for n, m in denoiser.named_modules() if is_attention(m) and selects(n)}
    stack: list[str] = []
    found: list[str] = []

    class _Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention and stack and stack[-1] not in found:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    def push(module: nn.Module, args: tuple) -> None:
        stack.append(names[id(module)])

    def pop(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    handles = []
    for m in denoiser.modules():
        if id(m) in names:
            handles += [m.register_forward_pre_hook(push), m.register_forward_hook(pop, always_call=True)]
    try:
        with torch.no_grad(), _Seen():
            forward()
    finally:
        for h in handles:
            h.remove()
    return found


def install_attention_quant(denoiser: nn.Module, names: list[str], n_steps: int, bits: int,
                            step_index: StepIndex) -> None:
    """Give each attention module ``names`` of ``denoiser`` its quantizers (child ``act_quant``) and the hooks
    that route its scaled dot-product attention through them."""
    for name in names:
        module = denoiser.get_submodule(name)
        module.add_module(CHILD, AttentionQuant(n_steps, bits, step_index))
        module.register_forward_pre_hook(_enter)
        module.register_forward_hook(_leave, always_call=True)


def remove_attention_quant(denoiser: nn.Module) -> None:
    """Take every attention's quantizers and hooks off again: float attention (what the exporter traces)."""
    for module in denoiser.modules():
        if isinstance(getattr(module, CHILD, None), AttentionQuant):
            delattr(module, CHILD)
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in [k for k, fn in hooks.items() if fn in (_enter, _leave)]:
                    del hooks[key]
                    module._forward_hooks_always_called.pop(key, None)


def attention_quants(model: nn.Module) -> dict[str, AttentionQuant]:
    """Every attention's quantizers in ``model``, by the attention module's qualified name."""
    return {name.rpartition(".")[0] if "." in name else "": m
            for name, m in model.named_modules() if isinstance(m, AttentionQuant)}


def attention_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """The query, key and value quantizers of every quantized attention in ``model`` (distillation trains them)."""
    return [q for quant in attention_quants(model).values() for q in quant.quantizers().values()]


def attention_in_state(state: Mapping[str, object]) -> list[str]:
    """The quantized attentions a state dict holds (a checkpoint's), by module name, in its order."""
    suffix = f".{CHILD}.query.scale"
    return [k[: -len(suffix)] for k in state if k.endswith(suffix)]


def attention_scale_keys(state: Mapping[str, object]) -> list[str]:
    """The step sizes of quantized attention in a state dict (``<attention>.act_quant.<role>.scale``)."""
    return [k for k in state if any(k.endswith(f".{CHILD}.{role}.scale") for role in ROLES)]
