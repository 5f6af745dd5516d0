"""Samplers in numpy, for running an exported pipeline without PyTorch: diffusers' ``DDIMScheduler``,
``PNDMScheduler`` (PLMS, ``skip_prk_steps`` as Stable Diffusion ships it), ``EulerDiscreteScheduler`` and
``FlowMatchEulerDiscreteScheduler`` (SD3, Flux), read from the same ``scheduler_config.json`` and computing the same
updates (float32 samples; the schedule in float64, so values agree with diffusers' to float32 rounding). Options they
do not implement are refused, never ignored.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.errors import PipelineError

HINT = ("edit scheduler/scheduler_config.json of the export to DDIMScheduler, PNDMScheduler (skip_prk_steps), "
        "EulerDiscreteScheduler or FlowMatchEulerDiscreteScheduler with default options, or sample with diffusers' "
        "pipeline instead")


def _alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    n, start, end = int(config.get("num_train_timesteps", 1000)), config.get("beta_start", 1e-4), config.get(
        "beta_end", 0.02)
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    else:
        raise PipelineError(f"beta_schedule {schedule!r} is not one the numpy samplers compute "
                            "(linear, scaled_linear, squaredcos_cap_v2)", hint=HINT)
    return np.cumprod(1 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)  # diffusers' float32 product


def _spaced(config: dict[str, Any], steps: int, default: str) -> np.ndarray:
    """The descending training timesteps of ``steps`` sampling steps, by ``timestep_spacing`` (diffusers' rules)."""
    n, spacing = int(config.get("num_train_timesteps", 1000)), config.get("timestep_spacing", default)
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps)[::-1].copy()
    if spacing == "leading":
        offset = int(config.get("steps_offset", 0))
        return (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.float64) + offset
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)).astype(np.float64) - 1
    raise PipelineError(f"timestep_spacing {spacing!r} (expected linspace, leading or trailing)", hint=HINT)


def _refuse(config: dict[str, Any], **defaults: Any) -> None:
    for key, value in defaults.items():
        if config.get(key, value) != value:
            raise PipelineError(f"{config.get('_class_name')} with {key}={config.get(key)!r}: the numpy sampler "
                                f"implements {key}={value!r} only", hint=HINT)


class NumpyScheduler:
    """The part of diffusers' scheduler interface a text-to-image loop uses, on numpy arrays."""

    init_noise_sigma = 1.0

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.train_steps = int(config.get("num_train_timesteps", 1000))
        self.timesteps = np.zeros(0)
        self.steps = 0

    def set_timesteps(self, steps: int, tokens: int | None = None) -> None:
        """Prepare ``steps`` sampling steps (``self.timesteps``: the denoiser calls' timesteps, in order);
        ``tokens``: the denoiser's image tokens, which only resolution-dependent (dynamic) shifting reads."""
        raise NotImplementedError

    def calls(self, steps: int) -> int:
        """Denoiser calls of ``steps`` sampling steps."""
        return steps

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """The denoiser's input at ``timestep`` (the sample itself, except for sigma-scaled samplers)."""
        return sample

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        """The sample one step later."""
        raise NotImplementedError


class DiscreteScheduler(NumpyScheduler):
    """The noise-prediction samplers over a table of ``alphas_cumprod`` (epsilon or v prediction)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.prediction = config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise PipelineError(f"prediction_type {self.prediction!r} (the numpy samplers take epsilon or "
                                "v_prediction)", hint=HINT)
        _refuse(config, rescale_betas_zero_snr=False, thresholding=False)
        self.alphas_cumprod = _alphas_cumprod(config)

    def _prev_alpha(self, prev: int) -> float:
        return float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha

    @property
    def final_alpha(self) -> float:
        """The alpha product after the last step (1 with ``set_alpha_to_one``)."""
        return 1.0 if self.config.get("set_alpha_to_one", False) else float(self.alphas_cumprod[0])


class DDIM(DiscreteScheduler):
    """``DDIMScheduler`` with ``eta = 0`` (deterministic)."""

    def set_timesteps(self, steps: int, tokens: int | None = None) -> None:  # noqa: D102
        self.steps, self.timesteps = steps, np.round(_spaced(self.config, steps, "leading")).astype(np.int64)

    @property
    def final_alpha(self) -> float:  # noqa: D102
        return 1.0 if self.config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:  # noqa: D102
        t = int(timestep)
        a, a_prev = float(self.alphas_cumprod[t]), self._prev_alpha(t - self.train_steps // self.steps)
        if self.prediction == "epsilon":
            x0, eps = (sample - (1 - a) ** 0.5 * model_output) / a ** 0.5, model_output
        else:
            x0 = a ** 0.5 * sample - (1 - a) ** 0.5 * model_output
            eps = a ** 0.5 * model_output + (1 - a) ** 0.5 * sample
        if self.config.get("clip_sample", True):
            bound = float(self.config.get("clip_sample_range", 1.0))
            x0 = np.clip(x0, -bound, bound)
        return (a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps).astype(np.float32)


class PNDM(DiscreteScheduler):
    """``PNDMScheduler`` with ``skip_prk_steps`` (PLMS: linear multistep, one more denoiser call than steps)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        _refuse(config, skip_prk_steps=True)
        self.ets: list[np.ndarray] = []
        self.counter, self.cur_sample = 0, np.zeros(0, np.float32)

    def set_timesteps(self, steps: int, tokens: int | None = None) -> None:  # noqa: D102
        base = np.round(_spaced(self.config, steps, "leading"))[::-1].astype(np.int64)
        self.steps, self.timesteps = steps, np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        self.ets, self.counter = [], 0

    def calls(self, steps: int) -> int:  # noqa: D102
        return steps + 1

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:  # noqa: D102
        t, delta = int(timestep), self.train_steps // self.steps
        prev = t - delta
        if self.counter != 1:
            self.ets = [*self.ets[-3:], model_output]
        else:
            prev, t = t, t + delta
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output, sample = (model_output + ets[-1]) / 2, self.cur_sample
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self.counter += 1
        a, a_prev = float(self.alphas_cumprod[t]), self._prev_alpha(prev)
        if self.prediction == "v_prediction":
            model_output = a ** 0.5 * model_output + (1 - a) ** 0.5 * sample
        denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        return ((a_prev / a) ** 0.5 * sample - (a_prev - a) * model_output / denom).astype(np.float32)


class EulerDiscrete(DiscreteScheduler):
    """``EulerDiscreteScheduler`` without churn (deterministic), linear sigma interpolation."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        _refuse(config, interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
                use_beta_sigmas=False, timestep_type="discrete", final_sigmas_type="zero")
        self.sigmas, self.index = np.zeros(1), 0

    def set_timesteps(self, steps: int, tokens: int | None = None) -> None:  # noqa: D102
        timesteps = _spaced(self.config, steps, "linspace")
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        self.steps, self.timesteps, self.index = steps, timesteps.astype(np.float32), 0
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]  # noqa: D102
        top = float(self.sigmas.max())
        spacing = self.config.get("timestep_spacing", "linspace")
        return top if spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:  # noqa: D102
        return (sample / (float(self.sigmas[self.index]) ** 2 + 1) ** 0.5).astype(np.float32)

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:  # noqa: D102
        sigma, after = float(self.sigmas[self.index]), float(self.sigmas[self.index + 1])
        if self.prediction == "epsilon":
            x0 = sample - sigma * model_output
        else:
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        self.index += 1
        return (sample + (sample - x0) / sigma * (after - sigma)).astype(np.float32)


class FlowMatchEuler(NumpyScheduler):
    """``FlowMatchEulerDiscreteScheduler`` (SD3, Flux): Euler steps of the predicted velocity over sigmas shifted by
    ``shift``, or by ``mu`` from the image tokens with ``use_dynamic_shifting``; deterministic."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        _refuse(config, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False)
        if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise PipelineError(f"time_shift_type {config.get('time_shift_type')!r} (expected exponential or "
                                "linear)", hint=HINT)
        n, shift = self.train_steps, float(config.get("shift", 1.0))
        table = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)  # diffusers' float32 training sigmas
        if not config.get("use_dynamic_shifting", False):
            table = np.float32(shift) * table / (np.float32(1) + np.float32(shift - 1) * table)
        self.sigma_max, self.sigma_min = float(table[0]), float(table[-1])
        self.sigmas, self.index = np.zeros(1, np.float32), 0

    def mu(self, tokens: int | None) -> float:
        """The dynamic shift of ``tokens`` image tokens: linear between (base_image_seq_len, base_shift) and
        (max_image_seq_len, max_shift), as diffusers' pipelines compute it."""
        if tokens is None:
            raise PipelineError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting needs the image's token "
                                "count", hint="pass tokens= to set_timesteps")
        c = self.config
        lo, hi = int(c.get("base_image_seq_len", 256)), int(c.get("max_image_seq_len", 4096))
        base, top = float(c.get("base_shift", 0.5)), float(c.get("max_shift", 1.15))
        slope = (top - base) / (hi - lo)
        return tokens * slope + (base - slope * lo)

    def set_timesteps(self, steps: int, tokens: int | None = None) -> None:  # noqa: D102
        n = self.train_steps
        self._shifted(np.linspace(self.sigma_max * n, self.sigma_min * n, steps) / n, tokens)

    def set_sigmas(self, sigmas: np.ndarray, tokens: int | None = None) -> None:
        """Prepare the steps of the given unshifted ``sigmas`` (``set_timesteps(sigmas=...)``, as Flux pipelines
        call it: float32 from the start)."""
        self._shifted(np.asarray(sigmas).astype(np.float32), tokens)

    def _shifted(self, sigmas: np.ndarray, tokens: int | None) -> None:
        """The schedule of ``sigmas`` shifted (in their own precision, as diffusers shifts them)."""
        n = self.train_steps
        if self.config.get("use_dynamic_shifting", False):
            mu = self.mu(tokens)
            factor = math.exp(mu) if self.config.get("time_shift_type", "exponential") == "exponential" else mu
            sigmas = factor / (factor + (1 / sigmas - 1))
        else:
            shift = float(self.config.get("shift", 1.0))
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        shifted = sigmas.astype(np.float32)
        self.steps, self.index = len(shifted), 0
        self.timesteps = shifted * np.float32(n)
        self.sigmas = np.concatenate([shifted, np.zeros(1, np.float32)])

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:  # noqa: D102
        dt = self.sigmas[self.index + 1] - self.sigmas[self.index]
        self.index += 1
        return (sample.astype(np.float32) + dt * model_output).astype(np.float32)


SCHEDULERS: dict[str, type[NumpyScheduler]] = {
    "DDIMScheduler": DDIM, "PNDMScheduler": PNDM, "EulerDiscreteScheduler": EulerDiscrete,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEuler}


def numpy_scheduler(config: dict[str, Any]) -> NumpyScheduler:
    """The numpy sampler of a diffusers ``scheduler_config.json`` (its ``_class_name``), or :class:`PipelineError`."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise PipelineError(f"scheduler {name!r}: the pipeline without PyTorch samples with {', '.join(SCHEDULERS)}",
                            hint=HINT)
    return SCHEDULERS[name](config)


def calibrated_steps(config: dict[str, Any], calls: int) -> int:
    """The step count whose sampler (``config``'s) calls the denoiser ``calls`` times, once per calibrated timestep
    (PNDM calls it once more than its steps); 50 where nothing was calibrated (``calls`` 0)."""
    if not calls:
        return 50
    scheduler = numpy_scheduler(config)
    return next((s for s in range(1, calls + 1) if scheduler.calls(s) == calls), calls)
