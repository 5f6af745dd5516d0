"""The denoiser kinds dqdeploy handles, one :class:`DenoiserSpec` each: diffusers class, folder,
call signature, ONNX I/O names (optimum's), the blocks of block-wise distillation, and how a
sampling loop feeds it (latent shape, timestep scale, position ids).

UNets (``UNet2DModel``, ``UNet2DConditionModel``) take ``sample``; the diffusion transformers
(``SD3Transformer2DModel``, ``PixArtTransformer2DModel``, ``FluxTransformer2DModel``) take
``hidden_states``. Every graph input is named like the keyword argument of the diffusers call, so
one ``{name: tensor}`` mapping drives the PyTorch model and the exported graph alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError
from .vocab import CONTEXT, SAMPLE, TEXT_MASK, TIMESTEP

if TYPE_CHECKING:  # torch is imported where it is used: the export contract (runtimes/spec.py) reads this module
    import torch

    from .inputs import DenoiserInputs

HIDDEN = "hidden_states"
POOLED = "pooled_projections"
GUIDANCE = "guidance"
IMG_IDS, TXT_IDS = "img_ids", "txt_ids"


@dataclass(frozen=True)
class DenoiserSpec:
    """How one diffusers denoiser class is loaded, called, exported and distilled."""

    class_name: str
    subfolder: str  # the pipeline folder's subfolder: "unet" | "transformer"
    sample: str  # the main input's keyword: "sample" | "hidden_states"
    output: str  # the graph output: "out_sample" | "out_hidden_states"
    inputs: tuple[str, ...]  # graph inputs in optimum's order (optional ones filtered by ``input_names``)
    blocks: tuple[str, ...] = ()  # module classes distilled as one block (besides the UNet blocks)
    shared: tuple[str, ...] = ()  # inputs without a batch axis (Flux position ids)
    timestep_scale: float = 1.0  # model timestep = scheduler timestep * scale (Flux pipelines pass t / 1000)
    packed: bool = False  # latents are token sequences [B, N, C] (Flux), not images [B, C, H, W]
    ends: tuple[str, str] = ("conv_in", "conv_out")  # first and last layer (kept at first_last_bits by recipes)
    conditioning: tuple[tuple[str, str], ...] = ()  # (input, config key of its last-axis width)
    learns_sigma: bool = False  # the output may stack a variance prediction the scheduler does not take
    # (config flag, why, hint): a configuration the graphs cannot carry
    unsupported: tuple[str, str, str] = ("", "", "")
    fixed_resolution: str = ""  # why a traced graph cannot take another height/width ("": it can)
    # inputs of ``inputs`` the graph takes only when the calibration data has them (PixArt's text mask)
    optional: tuple[str, ...] = ()
    text_prefix: int = 0  # text tokens before the T5 sequence, whose length is the pipeline's max_sequence_length

    def text_length_call(self, tokens: int) -> str:
        """How a diffusers pipeline call gets ``tokens`` text tokens (for error hints)."""
        if not self.is_transformer:
            return "the text encoder's token count (its tokenizer's model_max_length)"
        if tokens <= self.text_prefix:
            return f"at least {self.text_prefix + 1} tokens ({self.text_prefix} before T5's)"
        return f"max_sequence_length={tokens - self.text_prefix}" + (
            f" ({self.text_prefix} CLIP tokens + {tokens - self.text_prefix} T5 tokens)" if self.text_prefix else "")

    @property
    def is_transformer(self) -> bool:
        return self.sample == HIDDEN

    def input_names(self, config: Any) -> list[str]:
        """The graph inputs a model with ``config`` always takes (Flux's ``guidance`` only with guidance embeds; the
        ``optional`` ones, present only where the data has them, left out)."""
        names = [n for n in self.inputs if (n != GUIDANCE or config.get("guidance_embeds")) and n not in self.optional]
        if CONTEXT in names and not conditional(self, config):
            names.remove(CONTEXT)
        return names

    def conditioning_names(self, config: Any) -> list[str]:
        """Per-sample conditioning inputs read from a conditioning file (``guidance`` is a scale, not a file entry)."""
        return [n for n in self.input_names(config)
                if n not in (self.sample, TIMESTEP, GUIDANCE) and n not in self.shared]

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the model is called with for scheduler timestep ``t`` (float)."""
        import torch

        t = torch.as_tensor(t, dtype=torch.float32)
        return t * self.timestep_scale if self.timestep_scale != 1.0 else t

    def inputs_from_dict(self, tensors: Mapping[str, Any]) -> DenoiserInputs:
        """:class:`DenoiserInputs` from graph-named tensors (an artifact's calibration inputs, a feed)."""
        from .inputs import DenoiserInputs

        return DenoiserInputs.from_dict(tensors, self.sample, self.shared)

    def check_supported(self, config: Any, where: object = "the model") -> None:
        """Refuse configurations whose extra inputs the graphs do not carry."""
        flag, why, hint = self.unsupported
        if flag and config.get(flag):
            raise ModelLoadError(f"{where}: {why}", hint=hint)

    def learned_sigma(self, config: Any) -> bool:
        """True when the output stacks a variance prediction the scheduler does not take (PixArt)."""
        out = config.get("out_channels")
        return self.learns_sigma and out is not None and out == 2 * config["in_channels"]


_UNET_BLOCKS = ("ResnetBlock2D", "Attention", "Transformer2DModel", "Downsample2D", "Upsample2D", "TimestepEmbedding")
_EMBEDDERS = (
    "PatchEmbed", "TimestepEmbedding", "PixArtAlphaTextProjection", "CombinedTimestepTextProjEmbeddings",
    "CombinedTimestepGuidanceTextProjEmbeddings", "AdaLayerNormSingle",
)

_PATCH_ENDS = ("pos_embed.proj", "proj_out")

SPECS: dict[str, DenoiserSpec] = {
    s.class_name: s
    for s in (
        DenoiserSpec("UNet2DModel", "unet", SAMPLE, "out_sample", (SAMPLE, TIMESTEP), _UNET_BLOCKS),
        DenoiserSpec("UNet2DConditionModel", "unet", SAMPLE, "out_sample", (SAMPLE, TIMESTEP, CONTEXT), _UNET_BLOCKS,
                     conditioning=((CONTEXT, "cross_attention_dim"),)),
        DenoiserSpec(
            "SD3Transformer2DModel", "transformer", HIDDEN, "out_hidden_states", (HIDDEN, CONTEXT, POOLED, TIMESTEP),
            ("JointTransformerBlock", *_EMBEDDERS), ends=_PATCH_ENDS,
            conditioning=((CONTEXT, "joint_attention_dim"), (POOLED, "pooled_projection_dim")), text_prefix=77,
        ),
        DenoiserSpec(
            "PixArtTransformer2DModel", "transformer", HIDDEN, "out_hidden_states",
            (HIDDEN, CONTEXT, TEXT_MASK, TIMESTEP),
            ("BasicTransformerBlock", *_EMBEDDERS), ends=_PATCH_ENDS,
            conditioning=((CONTEXT, "caption_channels"),), learns_sigma=True,
            unsupported=("use_additional_conditions",
                         "PixArt with resolution/aspect-ratio conditions (use_additional_conditions, the 1024px "
                         "models) is not supported: its added_cond_kwargs are not graph inputs yet",
                         "use a PixArt model without additional conditions (256/512px, PixArt-Sigma)"),
            fixed_resolution="PixArt's patch embedding recomputes its sin-cos position table in Python when the size "
                             "differs from sample_size: a traced graph keeps the table of one size, so a dynamic "
                             "height/width would be silently wrong",
            optional=(TEXT_MASK,),
        ),
        DenoiserSpec(
            "FluxTransformer2DModel", "transformer", HIDDEN, "out_hidden_states",
            (HIDDEN, CONTEXT, POOLED, TIMESTEP, IMG_IDS, TXT_IDS, GUIDANCE),
            ("FluxTransformerBlock", "FluxSingleTransformerBlock", *_EMBEDDERS),
            shared=(IMG_IDS, TXT_IDS), timestep_scale=1e-3, packed=True, ends=("x_embedder", "proj_out"),
            conditioning=((CONTEXT, "joint_attention_dim"), (POOLED, "pooled_projection_dim")),
        ),
    )
}
SUPPORTED = tuple(SPECS)


def spec_for(class_name: str | None, where: object = "the model") -> DenoiserSpec:
    """The spec of a diffusers class name, or :class:`ModelLoadError` naming the supported ones."""
    if class_name not in SPECS:
        raise ModelLoadError(
            f"{where}: unsupported model class {class_name!r}; dqdeploy quantizes {', '.join(SUPPORTED)}",
            hint="point at the unet/ or transformer/ of a DDPM/LDM, Stable Diffusion, SD3, PixArt or Flux pipeline",
        )
    return SPECS[class_name]


def spec_of(model: Any, fallback: str | None = None) -> DenoiserSpec:
    """The spec of a model object (a diffusers model, a quantized wrapper, or a runtime with ``spec``);
    other modules get the spec of class ``fallback`` when given (callables with its signature)."""
    inner = getattr(model, "denoiser", model)
    name = getattr(getattr(model, "spec", None), "model_class", None) or type(inner).__name__
    return spec_for(fallback if name not in SPECS and fallback else name)


def conditional(spec: DenoiserSpec, config: Any) -> bool:
    """Whether a model takes text conditioning (``encoder_hidden_states``)."""
    if spec.is_transformer:
        return True
    return config.get("cross_attention_dim") is not None


def latent_shape(spec: DenoiserSpec, config: Any, batch: int, size: int | None = None) -> tuple[int, ...]:
    """Shape of the initial noise: [B, C, H, W], or [B, N, C] tokens for packed (Flux) latents.

    ``size``: the latent height and width (default: the config's ``sample_size``; Flux has none and
    needs it). For Flux it is the latent grid of 2x2 patches, ``N = (size // 2) ** 2``.
    """
    size = size or config.get("sample_size")
    if size is None:
        raise ModelLoadError(f"{spec.class_name} has no sample_size in its config: the latent size must be given",
                             hint="pass --resolution (latent height = width)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if spec.packed:
        return (batch, (h // 2) * (w // 2), int(config["in_channels"]))
    return (batch, int(config["in_channels"]), h, w)


def flux_position_ids(tokens: int, text_tokens: int) -> dict[str, torch.Tensor]:
    """Flux's ``img_ids`` [N, 3] (row, column of each 2x2 patch on a square grid) and ``txt_ids`` [S, 3] (zeros)."""
    import torch

    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ModelLoadError(f"Flux latents with {tokens} tokens are not a square grid", hint="use a square resolution")
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return {IMG_IDS: ids.reshape(tokens, 3), TXT_IDS: torch.zeros(text_tokens, 3)}


def conditioning_dims(spec: DenoiserSpec, config: Any) -> dict[str, int]:
    """Last-axis width of each conditioning input the model takes (what a conditioning file must hold)."""
    dims = {name: config.get(key) for name, key in spec.conditioning}
    return {k: int(v) for k, v in dims.items() if v is not None}
