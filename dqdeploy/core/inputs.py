"""One typed container for a denoiser's inputs, and a context manager for temporary forward hooks.

``DenoiserInputs`` holds one batch of what a diffusers denoiser takes: the noisy latent (``sample``
for UNets; ``hidden_states`` for diffusion transformers -- ``sample_name`` says which), the time
step, the model-specific conditioning by keyword name (``encoder_hidden_states``,
``pooled_projections``, ``class_labels``, ``guidance``, ...), and ``shared`` inputs without a batch
axis (Flux's ``img_ids``/``txt_ids``: one tensor serves every row, so slicing leaves them whole). The same
names are the exported graph's input names, the keys of ``calibration_inputs.safetensors`` and of
the numpy feeds of checks, so one object moves between all of them without per-model code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .vocab import CONTEXT, SAMPLE, TIMESTEP

Hook = tuple[nn.Module, Literal["pre", "post"], Callable[..., Any]]  # (module, kind, function)
PreHook = Callable[[nn.Module, tuple], None]

OUTPUT = "out_sample"  # the exported graph's output name


@dataclass(frozen=True)
class DenoiserInputs:
    """One batch of denoiser inputs: ``sample`` [B, ...], ``timestep`` [B], named ``conditioning``
    ([B, ...] each) and named ``shared`` inputs (no batch axis)."""

    sample: torch.Tensor
    timestep: torch.Tensor
    conditioning: Mapping[str, torch.Tensor] = field(default_factory=dict)
    sample_name: str = SAMPLE  # the model's keyword for the noisy latent ("hidden_states" for transformers)
    shared: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def create(cls, sample: torch.Tensor, timestep: torch.Tensor, *, sample_name: str = SAMPLE,
               **conditioning: torch.Tensor | None) -> DenoiserInputs:
        """Inputs from keyword conditioning; ``None`` values (absent conditioning) are dropped."""
        return cls(sample, timestep, {k: v for k, v in conditioning.items() if v is not None}, sample_name)

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    @property
    def context(self) -> torch.Tensor | None:
        """``encoder_hidden_states`` (text conditioning of cross-attention models), if any."""
        return self.conditioning.get(CONTEXT)

    @property
    def names(self) -> list[str]:
        """Input names: the latent, the time step, the conditioning, then the shared inputs."""
        return [self.sample_name, TIMESTEP, *self.conditioning, *self.shared]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors in :attr:`names` order (positional export arguments)."""
        return (self.sample, self.timestep, *self.conditioning.values(), *self.shared.values())

    def kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a diffusers denoiser call (without ``return_dict``)."""
        return {self.sample_name: self.sample, TIMESTEP: self.timestep, **self.conditioning, **self.shared}

    def call(self, model: Callable[..., Any]) -> torch.Tensor:
        """``model(**inputs, return_dict=False)[0]``: the denoiser's output tensor."""
        out = model(**self.kwargs(), return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DenoiserInputs:
        """Apply ``fn`` to every batched tensor (slicing, moving); ``shared`` inputs stay as they are."""
        return replace(self, sample=fn(self.sample), timestep=fn(self.timestep),
                       conditioning={k: fn(v) for k, v in self.conditioning.items()})

    def slice(self, idx: torch.Tensor | slice | int) -> DenoiserInputs:
        """The rows ``idx`` of every tensor (the batch axis)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return self.map(lambda t: t[idx])

    def half(self) -> DenoiserInputs:
        """FP16 latent and floating-point conditioning; the time step and integer inputs keep their dtype."""
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.half() if t.is_floating_point() else t

        return replace(self, sample=self.sample.half(), conditioning={k: cast(v) for k, v in self.conditioning.items()})

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Named tensors (graph input names): what safetensors files and feeds hold."""
        return self.kwargs()

    @classmethod
    def from_dict(cls, tensors: Mapping[str, Any], sample_name: str = SAMPLE,
                  shared: Iterable[str] = ()) -> DenoiserInputs:
        """From named tensors (numpy arrays are converted; floating arrays become float32); the names in
        ``shared`` have no batch axis."""
        def tensor(v: Any) -> torch.Tensor:
            if isinstance(v, torch.Tensor):
                return v
            t = torch.from_numpy(np.asarray(v))
            return t.float() if t.is_floating_point() else t

        unbatched = set(shared)
        rest = {k: tensor(v) for k, v in tensors.items() if k not in (sample_name, TIMESTEP, *unbatched)}
        common = {k: tensor(v) for k, v in tensors.items() if k in unbatched}
        return cls(tensor(tensors[sample_name]), tensor(tensors[TIMESTEP]), rest, sample_name, common)

    def numpy(self, dtypes: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """A numpy feed by input name, cast to ``dtypes[name]`` where given (float32 otherwise)."""
        dtypes = dtypes or {}
        return {k: v.detach().cpu().numpy().astype(dtypes.get(k, np.float32)) for k, v in self.to_dict().items()}


def cat(batches: Iterable[DenoiserInputs]) -> DenoiserInputs:
    """Concatenate batches with the same names along the batch axis."""
    items = list(batches)
    first = items[0]
    return replace(first, sample=torch.cat([b.sample for b in items]), timestep=torch.cat([b.timestep for b in items]),
                   conditioning={k: torch.cat([b.conditioning[k] for b in items]) for k in first.conditioning})


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[Hook], **options: Any) -> Iterator[None]:
    """Register ``(module, kind, fn)`` hooks (``kind``: ``"pre"`` or ``"post"``) for the ``with`` body.

    Every hook is removed on exit, also when the body raises. ``options`` go to every registration
    (e.g. ``with_kwargs=True``).
    """
    handles = []
    try:
        for module, kind, fn in hooks:
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(fn, **options))
        yield
    finally:
        for h in handles:
            h.remove()
