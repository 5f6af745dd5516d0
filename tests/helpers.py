"""Tiny real diffusers models built in code, and folders in the layouts users have."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import save_file

CROSS_DIM = 24
SEQ_LEN = 5


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    ).eval()


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM, attention_head_dim=4,
    ).eval()


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def write_pipeline(unet: UNet2DModel, path: Path) -> Path:
    """A DDPM pipeline folder (model_index.json, unet/, scheduler/)."""
    DDPMPipeline(unet=unet, scheduler=scheduler()).save_pretrained(str(path), safe_serialization=True)
    return path


def write_bare_unet(unet: torch.nn.Module, path: Path) -> tuple[Path, Path]:
    """A bare UNet folder and a separate scheduler folder."""
    unet.save_pretrained(str(path / "unet_only"))
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(str(path / "sched"))
    return path / "unet_only", path / "sched"


def write_cond_file(path: Path, prompts: int = 3, uncond: bool = True, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder_hidden_states": torch.randn(prompts, SEQ_LEN, CROSS_DIM, generator=g)}
    if uncond:
        tensors["uncond_encoder_hidden_states"] = torch.randn(1, SEQ_LEN, CROSS_DIM, generator=g)
    save_file(tensors, str(path))
    return path


def random_calib(unet: torch.nn.Module, n: int = 8, timesteps=(901.0, 601.0, 301.0, 1.0), seed: int = 0):
    """A CalibrationSet of random UNet inputs spread over ``timesteps`` (no sampling run): enough for
    building a quantized model or checking wiring; use ``collect`` where real activations matter."""
    from dqdeploy.core.inputs import DenoiserInputs
    from dqdeploy.quant.trajectories import CalibrationSet

    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    rows = torch.arange(n) % len(timesteps)
    t = torch.tensor(timesteps, dtype=torch.float32)[rows]
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = None
    if getattr(cfg, "cross_attention_dim", None) is not None:
        cond = torch.randn(n, SEQ_LEN, cfg.cross_attention_dim, generator=g)
    return CalibrationSet(DenoiserInputs.create(x, t, encoder_hidden_states=cond), rows, list(timesteps))


# -- diffusion transformers ------------------------------------------------------------------------
TEXT_DIM, POOLED_DIM = 16, 12  # tiny text-encoder widths of the transformer configs below


def tiny_sd3(seed: int = 0):
    """A two-block SD3 MMDiT (the second block context_pre_only, as in SD3)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16,
    ).eval()


def tiny_pixart(seed: int = 0):
    """A two-block PixArt-alpha DiT with learned sigma (out_channels = 2 x in_channels)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, cross_attention_dim=16, caption_channels=TEXT_DIM, norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()


def tiny_flux(seed: int = 0, guidance: bool = True):
    """One double-stream and one single-stream Flux block (packed latents of 16 channels)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def transformer_scheduler(kind: str):
    """The scheduler each pipeline ships: flow matching for SD3 (shift 3) and Flux (dynamic shift), DPM for PixArt."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "pixart":
        return DPMSolverMultistepScheduler(num_train_timesteps=1000)
    if kind == "flux":
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                               max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


PIPELINES = {"sd3": "StableDiffusion3Pipeline", "pixart": "PixArtAlphaPipeline", "flux": "FluxPipeline"}


def write_transformer_pipeline(kind: str, path: Path, seed: int = 0, text: bool = False, vae: bool = False) -> Path:
    """A pipeline folder (model_index.json, transformer/, scheduler/) of a tiny transformer ``kind``; with ``text``,
    also its family's tiny text encoders and tokenizers (SD3: two CLIPs with projections and T5; PixArt: T5; Flux:
    CLIP and T5), sized for the transformer (TEXT_DIM, POOLED_DIM); with ``vae``, a tiny AutoencoderKL of the
    transformer's latent channels (SD3 and Flux: with their VAE's shift and scaling factors)."""
    import json

    model = {"sd3": tiny_sd3, "pixart": tiny_pixart, "flux": tiny_flux}[kind](seed)
    sched = transformer_scheduler(kind)
    model.save_pretrained(str(path / "transformer"))
    sched.save_pretrained(str(path / "scheduler"))
    index = {"_class_name": PIPELINES[kind], "transformer": ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", type(sched).__name__]}
    parts = _text_stack(kind, path, seed) if text else {}
    if vae:
        factors = {"sd3": {"shift_factor": 0.0609, "scaling_factor": 1.5305},
                   "flux": {"shift_factor": 0.1159, "scaling_factor": 0.3611}}.get(kind, {})
        parts["vae"] = tiny_vae(seed, latent_channels=model.config.in_channels // (4 if kind == "flux" else 1),
                                **factors)
    for name, part in parts.items():
        part.save_pretrained(str(path / name))
        index[name] = ["diffusers" if name == "vae" else "transformers", type(part).__name__]
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def _text_stack(kind: str, path: Path, seed: int) -> dict:
    """The text encoders and tokenizers of a tiny ``kind`` pipeline, by folder name."""
    clip_tokenizer = tiny_tokenizer(path.parent / f".{path.name}-vocab")
    t5 = {"text_encoder": tiny_t5(TEXT_DIM, seed), "tokenizer": tiny_t5_tokenizer(path.parent / f".{path.name}-t5")}
    if kind == "pixart":
        return t5
    if kind == "flux":  # CLIP's pooled output is the pooled projection; T5 the sequence
        return {"text_encoder": tiny_text_encoder(len(clip_tokenizer), seed, width=POOLED_DIM),
                "tokenizer": clip_tokenizer, "text_encoder_2": t5["text_encoder"], "tokenizer_2": t5["tokenizer"]}
    half = TEXT_DIM // 2  # SD3: the two CLIPs' sequences side by side, padded to T5's width; pooled side by side
    return {"text_encoder": tiny_text_encoder(len(clip_tokenizer), seed, width=half, projection=POOLED_DIM // 2),
            "tokenizer": clip_tokenizer,
            "text_encoder_2": tiny_text_encoder(len(clip_tokenizer), seed + 1, width=half,
                                                projection=POOLED_DIM - POOLED_DIM // 2),
            "tokenizer_2": clip_tokenizer, "text_encoder_3": t5["text_encoder"], "tokenizer_3": t5["tokenizer"]}


def tiny_t5(width: int, seed: int = 0):
    """A two-layer T5EncoderModel of ``width`` over the tiny T5 vocabulary."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(T5_PIECES) + 3, d_model=width, d_kv=4, d_ff=2 * width, num_layers=2,
                      num_heads=2, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


T5_PIECES = ["\u2581a", "\u2581cat", "\u2581dog", "\u2581hello", "\u2581the", *"abcdefghijklmnopqrstuvwxyz\u2581"]


def tiny_t5_tokenizer(path: Path):
    """A T5TokenizerFast (Unigram, sentencepiece-style) over a few words and the letters, built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 if len(p) > 1 else -2.0) for p in T5_PIECES]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(path / "tokenizer.json"), pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0)


def write_transformer_cond(path: Path, pooled: bool = True, uncond: bool = True, prompts: int = 3,
                           seed: int = 0) -> Path:
    """A conditioning file for the tiny transformers (sequence length SEQ_LEN)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder_hidden_states": torch.randn(prompts, SEQ_LEN, TEXT_DIM, generator=g)}
    if pooled:
        tensors["pooled_projections"] = torch.randn(prompts, POOLED_DIM, generator=g)
    if uncond:
        tensors["uncond_encoder_hidden_states"] = torch.randn(1, SEQ_LEN, TEXT_DIM, generator=g)
        if pooled:
            tensors["uncond_pooled_projections"] = torch.randn(1, POOLED_DIM, generator=g)
    save_file(tensors, str(path))
    return path


def distill(qmodel, fp, blocks, calib, recipe, workdir=None):
    """Block-wise distillation of ``qmodel`` against the float ``fp`` (targets captured from ``fp``)."""
    from dqdeploy.quant.distill import block_targets, distill_blocks, open_store

    with open_store(workdir) as store:
        return distill_blocks(qmodel, blocks, calib, recipe, block_targets(fp, blocks, calib, recipe, store))


# -- a whole Stable-Diffusion-like pipeline (text encoder, tokenizer, VAE) --------------------------------------
TOKENS = 8  # the tiny tokenizer's model_max_length and the text encoder's positions


def tiny_vae(seed: int = 0, **config):
    """4 latent channels, one downsampling: 8x8 latents decode to 16x16 RGB images (``config``: other values)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   latent_channels=4, norm_num_groups=8, sample_size=16, layers_per_block=1),
                            **config}).eval()


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def tiny_tokenizer(path: Path):
    """A CLIPTokenizer over the 256 byte symbols (alone and word-final) and a few merges, ``TOKENS`` long."""
    import json

    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = ["h e", "l l", "ll o</w>", "he llo</w>", "c a", "ca t</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=TOKENS)


def tiny_text_encoder(vocab_size: int, seed: int = 0, width: int = CROSS_DIM, projection: int | None = None):
    """A two-layer CLIPTextModel of ``width`` (default: the tiny conditional UNet's cross-attention width); with
    ``projection``, a CLIPTextModelWithProjection (SD3's pooled text embeddings)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKENS,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            projection_dim=projection or width)
    return (CLIPTextModel if projection is None else CLIPTextModelWithProjection)(config).eval()


def write_sd_pipeline(path: Path, scheduler=None, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder of tiny parts (unet/, vae/, text_encoder/, tokenizer/, scheduler/; PNDM as
    Stable Diffusion ships it unless ``scheduler`` is given)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = tiny_tokenizer(path.parent / f".{path.name}-vocab")
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(len(tokenizer), seed), tokenizer=tokenizer,
        unet=tiny_cond_unet(seed), scheduler=scheduler or PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True,
                                                                       steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def random_lora(model: torch.nn.Module, layers: list[str], path, *, prefix: str = "unet", rank: int = 2,
                seed: int = 0, size: float = 0.5, alpha: float | None = None):
    """A peft-format LoRA file for ``layers`` of ``model`` whose update is a sizeable change of each layer (a conv's:
    ``lora_A`` [r, in, kh, kw], ``lora_B`` [out, r, 1, 1])."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in layers:
        out_f, in_f, *kernel = model.get_submodule(name).weight.shape
        fan_in = in_f * math.prod(kernel)
        tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, in_f, *kernel, generator=g) / fan_in ** 0.5
        tensors[f"{prefix}.{name}.lora_B.weight"] = size * torch.randn(out_f, rank, *[1] * len(kernel), generator=g)
        if alpha is not None:
            tensors[f"{prefix}.{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path
