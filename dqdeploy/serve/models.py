"""What the server runs: an export folder opened once, as a prompt-to-image pipeline (``--pipeline`` exports) or a
noise-to-image sampler (unconditional denoiser exports), both on ONNX Runtime without PyTorch. ``run`` takes a
batch of :class:`~.requests.Job` that share a :meth:`key` and returns one PNG per job, each the image its job gets
alone."""

from __future__ import annotations

import io
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import PipelineError
from ..runtimes.pipeline import OrtPipeline
from ..runtimes.sampler import OrtSampler
from ..runtimes.spec import read_spec
from .requests import Job, Rules


def png(image: np.ndarray) -> bytes:
    """PNG bytes of an image [H, W, C] in [0, 1] (C 1: grayscale; rounded as diffusers rounds)."""
    from PIL import Image

    pixels = (image * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class ServedModel:
    """An export the server runs: ``kind`` (``pipeline`` | ``denoiser``), the request :class:`Rules`, the batch
    key (jobs with equal keys run as one batch) and ``run``."""

    kind = "model"
    rules: Rules

    def key(self, job: Job) -> Hashable:
        """Jobs with equal keys run in one batch (the same sampling steps)."""
        return job.steps

    def run(self, jobs: Sequence[Job]) -> list[bytes]:
        """One PNG per job (jobs of one key)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the log: what is served."""
        return f"{self.kind}, {self.rules.default_steps} steps by default"


class ServedPipeline(ServedModel):
    """A ``--pipeline`` export: prompt (+ guidance) to image. With classifier-free guidance (Stable Diffusion, SD3) a
    guided job runs two rows (unconditional, conditional) of the denoiser's batch, an unguided one a single row: guided
    and unguided jobs make separate batches, so k guided jobs make a batch of 2k. Flux feeds each job's scale to the
    transformer's guidance input: one row per job whatever its scale, and no negative prompt."""

    kind = "pipeline"

    def __init__(self, pipe: OrtPipeline, max_steps: int, default_steps: int | None = None) -> None:
        self.pipe = pipe
        steps = default_steps or pipe.default_steps
        encoder = pipe.prompt_encoder
        self.rules = Rules(True, steps, max(max_steps, steps), guidance=encoder.guidance, cfg=encoder.cfg,
                           model=pipe.spec.model_class)

    def key(self, job: Job) -> Hashable:
        """The steps; with classifier-free guidance also whether the job is guided (two rows) or not (one)."""
        return (job.steps, job.guidance > 1.0) if self.rules.cfg else job.steps

    def run(self, jobs: Sequence[Job]) -> list[bytes]:  # noqa: D102
        negatives = [j.negative_prompt for j in jobs] if self.rules.cfg else None
        out = self.pipe([str(j.prompt) for j in jobs], negatives, num_inference_steps=jobs[0].steps,
                        guidance_scale=[j.guidance for j in jobs], seed=[j.seed for j in jobs], output_type="np")
        return [png(image) for image in out.images]

    def describe(self) -> str:  # noqa: D102
        guidance = "classifier-free" if self.rules.cfg else "the transformer's input"
        return f"{self.rules.model} {super().describe()}, guidance {self.rules.guidance:g} ({guidance})"


class ServedSampler(ServedModel):
    """An unconditional denoiser export: seed to image."""

    kind = "denoiser"

    def __init__(self, sampler: OrtSampler, max_steps: int, default_steps: int | None = None) -> None:
        self.sampler = sampler
        steps = default_steps or sampler.default_steps
        self.rules = Rules(False, steps, max(max_steps, steps), model=sampler.spec.model_class)

    def run(self, jobs: Sequence[Job]) -> list[bytes]:  # noqa: D102
        return [png(image) for image in self.sampler([j.seed for j in jobs], jobs[0].steps)]


def open_served(export_dir: str | Path, *, scheduler: str | None = None, max_steps: int = 100,
                default_steps: int | None = None, **session: Any) -> ServedModel:
    """The export at ``export_dir`` as a :class:`ServedModel` (``session``: ``providers``, ``threads``, ...).
    ``scheduler`` re-reads a denoiser export's recorded sampler config as another numpy sampler class;
    ``default_steps``: a request's steps when it names none (default: the calibrated count)."""
    folder = Path(export_dir)
    if read_spec(folder, verify=False).pipeline_parts:
        if scheduler is not None:
            raise PipelineError(f"--scheduler {scheduler}: a pipeline export samples with its scheduler/ folder",
                                hint="leave out --scheduler, or edit scheduler/scheduler_config.json of the export")
        return ServedPipeline(OrtPipeline(folder, **session), max_steps, default_steps)
    return ServedSampler(OrtSampler(folder, scheduler, **session), max_steps, default_steps)
