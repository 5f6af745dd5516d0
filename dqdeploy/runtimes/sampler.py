"""Noise to image on ONNX Runtime without PyTorch: an unconditional denoiser export (e.g. the digits DDPM) sampled
with its calibrated sampler in numpy (:mod:`.schedulers`), one seed per image. Nothing here imports torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import PipelineError, RuntimeInputError
from ..core.vocab import SAMPLE, TIMESTEP, Inexact
from .schedulers import SCHEDULERS, calibrated_steps, numpy_scheduler
from .session import CPU, Provider, open_session
from .spec import read_spec

SCHEDULER_HINT = f"choose the sampler with scheduler= (`dqdeploy serve --scheduler`): one of {', '.join(SCHEDULERS)}"


class OrtSampler:
    """An unconditional denoiser export sampled from seeded noise: ``OrtSampler(E)([0, 1])`` -> images [2, H, W, C]
    in [0, 1].

    ``scheduler``: a numpy sampler's diffusers class name, read from the export's recorded sampler config (default:
    the calibrated class itself). ``providers``/``threads``/``options``/``inexact``: as :class:`~.ort.OrtDenoiser`."""

    def __init__(self, export_dir: str | Path, scheduler: str | None = None,
                 providers: Sequence[Provider] | str = (CPU,), threads: int = 1, options: Any = None,
                 inexact: Inexact = "refuse") -> None:
        self.folder = Path(export_dir)
        self.spec = read_spec(self.folder)
        extra = [t.name for t in self.spec.inputs if t.name not in (SAMPLE, TIMESTEP)]
        if extra:
            raise PipelineError(f"{self.folder}: sampling from noise alone takes a graph with inputs sample and "
                                f"timestep, found also {', '.join(extra)}",
                                hint="export a conditional model with its pipeline (`dqdeploy export Q --target ort "
                                     "--pipeline MODEL_DIR`) to run it from prompts")
        if not self.spec.scheduler_config:
            raise PipelineError(f"{self.folder}: the export records no sampler (a float export?)",
                                hint="export a quantized artifact, whose calibrated sampler the export records")
        self.scheduler_config = {**self.spec.scheduler_config, **({"_class_name": scheduler} if scheduler else {})}
        try:
            numpy_scheduler(self.scheduler_config)  # refused now, not at the first call
        except PipelineError as exc:
            raise PipelineError(str(exc).split("\n")[0], hint=SCHEDULER_HINT) from None
        self.session = open_session(self.folder / self.spec.onnx_file, self.spec, providers=providers,
                                    threads=threads, options=options, inexact=inexact)
        sample = next(t for t in self.spec.inputs if t.name == SAMPLE)
        self.dtypes = {t.name: np.dtype(t.dtype) for t in self.spec.inputs}  # float16 for an --fp16 graph
        self.shape = tuple(int(d) for d in sample.shape[1:])  # (C, H, W): a static graph's
        if not all(isinstance(d, int) for d in sample.shape[1:]):
            raise PipelineError(f"{self.folder}: the sample input {sample.shape} has dynamic sizes",
                                hint="export without --dynamic-resolution to sample from noise")

    @property
    def default_steps(self) -> int:
        """The calibrated step count (the one whose sampler calls the denoiser once per calibrated timestep)."""
        return calibrated_steps(self.scheduler_config, len(self.spec.timesteps))

    def __call__(self, seeds: Sequence[int], steps: int | None = None) -> np.ndarray:
        """Images [N, H, W, C] in [0, 1], image ``i`` from the noise of ``seeds[i]`` (the same alone or in a batch)."""
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise RuntimeInputError(f"steps={steps!r}: expected a whole number >= 1")
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise RuntimeInputError(f"seeds={seeds!r}: expected a non-empty list of whole numbers >= 0")
        scheduler = numpy_scheduler(self.scheduler_config)
        scheduler.set_timesteps(steps)
        x = np.concatenate([np.random.default_rng(s).standard_normal((1, *self.shape), np.float32) for s in seeds])
        x = x * np.float32(scheduler.init_noise_sigma)
        for t in scheduler.timesteps:
            feeds = {SAMPLE: scheduler.scale_model_input(x, float(t)).astype(self.dtypes[SAMPLE]),
                     TIMESTEP: np.full(len(x), float(t), self.dtypes[TIMESTEP])}
            (noise,) = self.session.run(None, feeds)
            x = scheduler.step(noise.astype(np.float32), float(t), x)
        return np.clip(x / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
