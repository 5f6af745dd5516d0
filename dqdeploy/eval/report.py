"""``dqdeploy eval``: the quality report of a quantized artifact or exported folder against its
full-precision model -- for any supported denoiser, with no dataset-specific classifier needed.

Sections of the JSON report:

* ``per_step``: denoiser output error (relative error, SNR, cosine) at every sampling step along real
  FP trajectories (:func:`dqdeploy.eval.compare.step_errors`), plus its summary.
* ``images``: PSNR / SSIM / relative error of the quantized images against the FP images drawn from
  the same noise (and the same prompts), with ``space`` saying what was compared: the samples themselves
  (1 or 3 channels), or latents decoded by the pipeline's VAE (``vae/`` beside the FP folder, or
  ``EvalConfig.vae``) -- both models' final latents through the same decoder.
* ``latents``: latent models only, the same measures on the final latents (data range: the FP latents'
  range); the only figures where no VAE is found.
* ``verdict``: one line a person reads (:mod:`dqdeploy.eval.verdict`: a level with its thresholds).
* ``fid``: when a feature extractor or reference images are given, the Frechet distance of FP and
  quantized samples to the reference (a folder of images, else the FP samples themselves).
* ``digits``: the digits-FID of both, for 1x16x16 models (the digits family).

A PNG shows FP and quantized samples side by side. Both files are written atomically.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import DQDeployError
from ..core.terminal import say
from ..core.vocab import Runtime
from ..io.atomic import atomic_write_bytes
from ..io.models import latent_shape
from ..stages.generate import choose_sampler, generate_from, load_cond
from ..stages.sources import OpenedModel, open_model
from ..stages.vae import IMAGE_CHANNELS, VaeDecoder, image_decoder
from .compare import image_errors, step_errors, summarize_steps
from .features import check_extractor, extract, load_extractor, load_reference_images
from .verdict import verdict

DIGITS_SHAPE = (1, 16, 16)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Sampling and metric settings of a quality report."""

    n: int = 64  # samples per model for the image metrics (and FID)
    steps: int | None = None  # default: the calibrated step count, else 50
    scheduler: str | None = None  # default: the calibrated one (generate.choose_sampler)
    seed: int = 0
    batch_size: int = 64
    runtime: Runtime = "auto"  # of the evaluated model: torch (simulation) | ort | trt | auto
    cond_file: str | Path | None = None
    guidance: float = 1.0
    step_samples: int = 8  # FP trajectories for the per-step errors
    fid_ref: str | Path | None = None  # folder of reference images
    fid_extractor: str | None = None  # see dqdeploy.eval.features.load_extractor
    scheduler_dir: str | Path | None = None  # when --fp is a bare denoiser folder
    vae: str | Path | None = None  # latent models: the VAE folder (default: the vae/ beside the FP folder)

    def __post_init__(self) -> None:
        if self.n < 2 or self.step_samples < 1 or self.batch_size < 1:
            raise DQDeployError(f"eval needs n >= 2, step_samples >= 1, batch_size >= 1; found n={self.n}, "
                                f"step_samples={self.step_samples}, batch_size={self.batch_size}")


def _check_same_model(fp: OpenedModel, test: OpenedModel, fp_dir: Path, path: Path) -> None:
    if latent_shape(fp.denoiser) != latent_shape(test.denoiser) or fp.conditional != test.conditional:
        raise DQDeployError(
            f"{path} makes samples {latent_shape(test.denoiser)} (conditional: {test.conditional}) but the FP model "
            f"{fp_dir} makes {latent_shape(fp.denoiser)} (conditional: {fp.conditional})",
            hint="pass with --fp the diffusers folder the artifact was quantized from")


@dataclass(frozen=True)
class FidSetup:
    """The Frechet distance's extractor and reference features, prepared (and checked) before any sampling."""

    spec: str
    extractor: Any
    reference: torch.Tensor | None  # features of the reference images; None: the FP samples are the reference
    ref_name: str


def fid_setup(fid_ref: str | Path | None, fid_extractor: str | None, shape: tuple[int, ...]) -> FidSetup:
    """Load and try the extractor on two random images, read the reference images and their features: a broken
    extractor or an unreadable image fails here, not after minutes of sampling."""
    if len(shape) != 3:
        raise DQDeployError(f"a Frechet distance compares images; this model makes packed latents {shape}",
                            hint="leave out --fid-ref / --fid-extractor for this model")
    spec = fid_extractor or ("digits" if tuple(shape) == DIGITS_SHAPE else "pixels")
    extractor = load_extractor(spec)
    check_extractor(extractor, shape)
    if fid_ref is None:
        return FidSetup(spec, extractor, None, "fp samples")
    return FidSetup(spec, extractor, extract(extractor, load_reference_images(fid_ref, shape[0], (shape[1], shape[2]))),
                    str(fid_ref))


def _fid_section(setup: FidSetup | None, fp_images: torch.Tensor, test_images: torch.Tensor) -> dict[str, Any] | None:
    from .fid import feature_stats, frechet_distance

    if setup is None:
        return None
    reference = extract(setup.extractor, fp_images) if setup.reference is None else setup.reference
    ref_stats = feature_stats(reference)
    fid = {name: frechet_distance(*feature_stats(extract(setup.extractor, imgs)), *ref_stats)
           for name, imgs in (("fp", fp_images), ("quantized", test_images))}
    out = {"extractor": setup.spec, "reference": setup.ref_name, "n_reference": int(reference.shape[0]), **fid}
    if setup.reference is not None and fid["fp"] > 0:
        out["ratio"] = fid["quantized"] / fid["fp"]
    return out


SOURCE_REL_ERR = 1.0  # a mean per-step relative error above this is no quantization error: another model


def _source_warnings(summary: dict[str, float], path: Path, fp_dir: Path) -> list[str]:
    """A warning when ``fp_dir`` is probably not the model ``path`` was quantized from (same config, other weights)."""
    if summary["mean_rel_err"] <= SOURCE_REL_ERR and summary["mean_cosine"] >= 0.5:
        return []
    text = (f"{path} and --fp {fp_dir} disagree far beyond any quantization error (mean per-step relative error "
            f"{summary['mean_rel_err']:.3g}, cosine {summary['mean_cosine']:.3g}): --fp is probably not the folder "
            "it was quantized from")
    log.warning(text)
    return [text]


def _decoder(path: Path, opened: OpenedModel, shape: tuple[int, ...], vae: str | Path | None) -> VaeDecoder | None:
    """The VAE that turns latents into images: ``vae``, else the ``vae/`` beside the diffusers folder ``path``; None
    for models that make images, and for latent models without a VAE (their figures stay on latents)."""
    if len(shape) != 3:
        return None  # packed latents (Flux): not decoded here
    return image_decoder(path, opened.kind, opened.denoiser, vae, required=False)


def _images(opened: OpenedModel, sample: dict[str, Any], decoder: VaeDecoder | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, final latents)`` of one model: the images clamped to [-1, 1] (decoded where ``decoder``), the
    latents as the sampler left them (not clamped)."""
    latents: list[torch.Tensor] = []

    def decode(batch: torch.Tensor) -> torch.Tensor:
        latents.append(batch)
        return batch if decoder is None else decoder(batch)

    images = generate_from(opened, decode=decode, **sample)
    return images, torch.cat(latents)


def _image_figures(shape: tuple[int, ...], decoder: VaeDecoder | None, fp: tuple[torch.Tensor, torch.Tensor],
                   test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """``images`` (samples that are images, or latents decoded by ``decoder``) and, for latent models, ``latents``:
    PSNR / SSIM / relative error of the quantized model's vs the FP model's, each labelled with what it compares.
    ``fp`` and ``test``: (images, final latents)."""
    out: dict[str, Any] = {}
    if decoder is not None:
        out["vae"] = str(decoder.folder)
        out["images"] = image_errors(fp[0], test[0]) | {"space": f"VAE-decoded images ({decoder.folder})"}
    elif shape[0] in IMAGE_CHANNELS:
        out["images"] = image_errors(fp[0], test[0]) | {"space": "samples"}
    if shape[0] not in IMAGE_CHANNELS:  # latent models: the latent figures too, labelled as such
        data_range = float(fp[1].max() - fp[1].min()) or 1.0
        out["latents"] = image_errors(fp[1], test[1], data_range) | {"space": "final latents (not images)",
                                                                     "data_range": data_range}
    return out


def _side_by_side(png: str | Path, panels: dict[str, torch.Tensor], limit: int = 64) -> Path:
    """At most ``limit`` images of each panel side by side (latents without a VAE: their first channel(s))."""
    from .grid import save_side_by_side

    c, h, w = next(iter(panels.values())).shape[1:]
    shown = slice(0, 1) if c < 3 else slice(0, 3)
    return save_side_by_side({k: v[:limit, shown] for k, v in panels.items()}, png, scale=max(1, 64 // max(h, w)))


def quality_report(path: str | Path, fp_dir: str | Path, cfg: EvalConfig = EvalConfig(),
                   png: str | Path | None = None) -> dict[str, Any]:
    """Compare the model at ``path`` (artifact or export folder, run by ``cfg.runtime``) with the FP
    diffusers folder ``fp_dir``; returns the report dict (and writes the side-by-side PNG)."""
    path, fp_dir = Path(path), Path(fp_dir)
    start = time.perf_counter()
    test = open_model(path, cfg.runtime)
    fp = open_model(fp_dir, "torch", scheduler_dir=cfg.scheduler_dir)
    if fp.kind != "fp":
        raise DQDeployError(f"--fp must be a diffusers model folder; {fp_dir} is a {fp.kind} folder",
                            hint="pass the full-precision model the artifact was made from")
    _check_same_model(fp, test, fp_dir, path)
    shape = latent_shape(fp.denoiser)
    if png is not None and len(shape) != 3:
        raise DQDeployError(f"--png shows latents as images; {fp_dir} makes packed latents {shape}",
                            hint="leave out --png for this model")
    decoder = _decoder(fp_dir, fp, shape, cfg.vae)  # loaded and checked before any sampling
    image_shape = shape if decoder is None else decoder.image_shape(shape)
    conditioning = load_cond(test, cfg.cond_file, cfg.guidance)
    fid = (None if cfg.fid_ref is None and cfg.fid_extractor is None
           else fid_setup(cfg.fid_ref, cfg.fid_extractor, image_shape))
    # the calibrated sampler and step count unless asked (an export without a scheduler: the FP folder's)
    sampler = choose_sampler(test, cfg.scheduler, cfg.steps, fallback_config=fp.scheduler_config)
    say(sampler.describe())
    sample: dict[str, Any] = dict(n=cfg.n, sampler=sampler, seed=cfg.seed, batch_size=cfg.batch_size,
                                  conditioning=conditioning, guidance=cfg.guidance)
    noise = torch.randn(cfg.step_samples, *shape, generator=torch.Generator().manual_seed(cfg.seed))
    step_cond, uncond = ((None, None) if conditioning is None
                         else (conditioning.for_batch(0, cfg.step_samples), conditioning.unconditional()))
    per_step = step_errors(fp.denoiser, test.denoiser, sampler.make(), noise, sampler.steps,
                           cond=step_cond, uncond=uncond, guidance=cfg.guidance)
    warnings = _source_warnings(summarize_steps(per_step), path, fp_dir)  # said before the sampling, not after
    (fp_images, fp_latents), (test_images, test_latents) = (_images(m, sample, decoder) for m in (fp, test))
    report: dict[str, Any] = {
        "path": str(path), "fp": str(fp_dir), "kind": test.kind, "runtime": cfg.runtime,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
                  | {"steps": sampler.steps, "scheduler": type(sampler.make()).__name__},
        "per_step_summary": summarize_steps(per_step),
        "per_step": per_step,
    }
    report |= _image_figures(shape, decoder, (fp_images, fp_latents), (test_images, test_latents))
    if shape[0] not in IMAGE_CHANNELS and decoder is None and len(shape) == 3:
        warnings.append(f"{fp_dir} has no vae/ beside its denoiser: PSNR/SSIM are on latents, not images "
                        "(pass --vae DIR for image-space figures)")
        log.warning(warnings[-1])
    report["verdict"] = verdict(report.get("images"), "VAE-decoded images" if decoder else "the samples",
                                report["per_step_summary"])
    if warnings:
        report["warnings"] = warnings
    if fid is not None:
        report["fid"] = _fid_section(fid, fp_images, test_images)
    if image_shape == DIGITS_SHAPE:
        from .fid import digits_fid

        report["digits"] = {"fp": digits_fid(fp_images), "quantized": digits_fid(test_images)}
        report["digits"]["ratio"] = report["digits"]["quantized"] / max(report["digits"]["fp"], 1e-12)
    if png is not None:
        report["png"] = str(_side_by_side(png, {"FP": fp_images, f"{test.kind} ({cfg.runtime})": test_images}))
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def sample_quality(path: str | Path, *, fid_ref: str | Path | None = None, fid_extractor: str | None = None,
                   grid: str | Path | None = None, runtime: Runtime = "auto", cond_file: str | Path | None = None,
                   vae: str | Path | None = None, **sample: Any) -> dict[str, Any]:
    """Quality of one model's own samples, no FP model needed: the digits-FID for 1x16x16 models,
    and/or the Frechet distance to ``fid_ref`` images (features by ``fid_extractor``). A latent model's samples are
    decoded by ``vae`` (or the ``vae/`` beside a diffusers folder) first, so they compare with reference images."""
    from .fid import feature_stats, frechet_distance

    opened = open_model(path, runtime)
    shape = latent_shape(opened.denoiser)
    if grid and len(shape) != 3:
        raise DQDeployError(f"--grid shows latents as images; {path} makes packed latents {shape}",
                            hint="leave out --grid for this model")
    decoder = _decoder(Path(path), opened, shape, vae)
    shape = shape if decoder is None else decoder.image_shape(shape)
    digits = shape == DIGITS_SHAPE
    if not digits and (fid_ref is None or len(shape) != 3 or shape[0] not in IMAGE_CHANNELS):
        raise DQDeployError(
            f"{path} is not a digits model (its samples are {'x'.join(map(str, shape))}), "
            "so there is nothing to score it against"
            + ("" if len(shape) == 3 else " (packed latents cannot be compared with reference images)")
            + (" (latents: pass --vae DIR to compare decoded images)" if len(shape) == 3
               and shape[0] not in IMAGE_CHANNELS else ""),
            hint="pass --fp MODEL_DIR for the full report against the FP model, "
                 "or --fid-ref FOLDER of reference images")
    setup = None if fid_ref is None else fid_setup(fid_ref, fid_extractor, shape)  # before sampling
    images = generate_from(opened, conditioning=load_cond(opened, cond_file, sample.get("guidance", 1.0)),
                           decode=decoder, **sample)
    report: dict[str, Any] = {"path": str(path), "kind": opened.kind, "runtime": runtime, "n": int(images.shape[0])}
    if decoder is not None:
        report["vae"] = str(decoder.folder)
    if digits and fid_ref is None and fid_extractor in (None, "digits"):
        from .fid import digits_fid

        report["digits_fid"] = round(digits_fid(images), 4)
    if setup is not None and setup.reference is not None:
        report["fid"] = {"extractor": setup.spec, "reference": setup.ref_name,
                         "n_reference": int(setup.reference.shape[0]),
                         "value": frechet_distance(*feature_stats(extract(setup.extractor, images)),
                                                   *feature_stats(setup.reference))}
    if grid:
        from .grid import save_grid

        c, h, w = shape
        save_grid(images[:, : (1 if c < 3 else 3)], grid, scale=max(1, 64 // max(h, w)))
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON, atomically (tagged as dqdeploy's, so ``--overwrite`` may replace it)."""
    return atomic_write_bytes(Path(path),
                              (json.dumps({"format": "dqdeploy-eval-report", **report}, indent=2) + "\n").encode())
