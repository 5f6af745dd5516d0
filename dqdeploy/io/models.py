"""Loading diffusers model folders: a pipeline folder (``model_index.json`` with ``unet/`` or
``transformer/``, and ``scheduler/``) or a bare denoiser folder plus a scheduler folder. Supported
denoisers (:mod:`dqdeploy.core.denoisers`): ``UNet2DModel`` (DDPM/LDM), ``UNet2DConditionModel``
(Stable-Diffusion style), ``SD3Transformer2DModel``, ``PixArtTransformer2DModel`` and
``FluxTransformer2DModel``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.denoisers import conditional, spec_for, spec_of
from ..core.denoisers import latent_shape as spec_latent_shape
from ..core.deprecation import deprecated_alias, renamed
from ..core.errors import ModelLoadError
from .tensorfile import DTYPES, TensorFileError, read_tensors

SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "flow": "FlowMatchEulerDiscreteScheduler",
}
# the samplers of diffusers' Stable-Diffusion family (KarrasDiffusionSchedulers) and flow matching, each
# tested in calibration and sampling. Left out: EDMEulerScheduler (needs an EDM-trained model) and
# the second-order samplers (Heun, KDPM2), which call the model more than once per step
SUPPORTED_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "FlowMatchEulerDiscreteScheduler",
)


@dataclass
class LoadedModel:
    """A denoiser (a UNet or a diffusion transformer) with the scheduler config it came
    with and (for full Stable Diffusion pipelines) the text stack."""

    denoiser: torch.nn.Module
    scheduler_config: dict[str, Any]
    model_dir: Path
    weight_files: dict[str, Path] = field(default_factory=dict)  # tensor name -> the safetensors file it was read from

    unet = deprecated_alias("LoadedModel", "unet", "denoiser")

    @property
    def conditional(self) -> bool:
        return conditional(spec_for(type(self.denoiser).__name__), self.denoiser.config)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {str(exc)[:200]}",
                             hint="restore the file written by diffusers' save_pretrained") from None
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, expected an object of settings",
                             hint="restore the file written by diffusers' save_pretrained")
    return data


def read_config(path: Path) -> dict[str, Any]:
    """A diffusers JSON file (a component's config, model_index.json) as a dict, or :class:`ModelLoadError`."""
    return _read_json(path)


def _denoiser_dir(model_dir: Path) -> Path:
    for sub in ("unet", "transformer"):
        if (model_dir / sub / "config.json").is_file():
            return model_dir / sub
    if (model_dir / "config.json").is_file():
        return model_dir
    raise ModelLoadError(
        f"{model_dir} holds neither unet/config.json nor transformer/config.json (a pipeline folder) "
        "nor config.json (a bare denoiser folder)",
        hint="pass a diffusers folder written by save_pretrained",
    )


def denoiser_config(model_dir: str | Path) -> dict[str, Any]:
    """The config of a model folder's denoiser (pipeline or bare folder), without loading it."""
    return _read_json(_denoiser_dir(Path(model_dir)) / "config.json")


def denoiser_class_name(model_dir: str | Path) -> str | None:
    """The diffusers class of a model folder's denoiser (its config's ``_class_name``), without loading it."""
    return denoiser_config(model_dir).get("_class_name")


def portable_config(model: Any) -> dict[str, Any]:
    """A diffusers model's config without the machine-specific ``_name_or_path`` (a local path)."""
    config = json.loads(model.to_json_string())
    config.pop("_name_or_path", None)
    return config


def denoiser_class(config: dict[str, Any], where: Path) -> Any:
    """The diffusers class named by a denoiser config, refusing unsupported ones."""
    import diffusers

    return getattr(diffusers, spec_for(config.get("_class_name"), where).class_name)


def load_denoiser(model_dir: str | Path, *, allow_pickle: bool = False) -> torch.nn.Module:
    """Load the denoiser (UNet or transformer) of a pipeline folder or a bare folder, in FP32 eval mode.

    Weights are read from safetensors only; ``allow_pickle`` also accepts ``.bin`` (pickle) files,
    which can run code when loaded: only for folders you trust.
    """
    return _load_denoiser(Path(model_dir), allow_pickle)[0]


def _load_denoiser(model_dir: Path, allow_pickle: bool) -> tuple[torch.nn.Module, dict[str, Path]]:
    """The denoiser, and the file each tensor was read from (:func:`own_weights`)."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist", hint="check the path")
    udir = _denoiser_dir(model_dir)
    config = _read_json(udir / "config.json")
    cls = denoiser_class(config, udir)
    spec_for(config.get("_class_name"), udir).check_supported(config, udir)
    if not allow_pickle and not any(udir.glob("*.safetensors")):
        raise ModelLoadError(
            f"{udir} holds no .safetensors weights; loading pickled .bin weights can run arbitrary code",
            hint="convert the weights to safetensors, or pass --allow-pickle if you trust this folder",
        )
    try:
        denoiser = cls.from_pretrained(str(udir), torch_dtype=torch.float32, low_cpu_mem_usage=False,
                                   use_safetensors=None if allow_pickle else True)
    except Exception as exc:  # diffusers raises OSError/ValueError/TypeError/KeyError for malformed folders
        raise ModelLoadError(f"could not load {cls.__name__} from {udir}: {type(exc).__name__}: {str(exc)[:400]}",
                             hint="check config.json (field types) and the weights, "
                                  "or re-save with save_pretrained") from None
    files = own_weights(denoiser, udir)
    return denoiser.eval(), files


def own_weights(model: torch.nn.Module, folder: Path) -> dict[str, Path]:
    """Give ``model`` its own memory for every parameter and buffer stored with the same name,
    dtype and shape in ``folder``'s safetensors weights, read with file reads (``from_pretrained``
    maps the file, and the pages the model touches then stay resident for the life of the process,
    see :mod:`dqdeploy.io.tensorfile`). A tensor the loader converted (another dtype or name) is left as
    it is. Returns the file each replaced tensor was read from, by tensor name."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["diffusion_pytorch_model.safetensors"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # from_pretrained read it: whatever it found stays as loaded

    def same(name: str, entry: dict) -> bool:
        t = tensors.get(name)
        return t is not None and DTYPES[entry["dtype"]] == t.dtype and list(t.shape) == entry["shape"]

    found: dict[str, Path] = {}
    for fname in files:
        path = folder / str(fname)
        if not path.is_file():
            continue
        try:
            read = read_tensors(path, same)
        except (OSError, TensorFileError):
            continue
        for name, value in read.items():
            tensors[name].data = value
            found[name] = path
    return found


def load_scheduler_config(model_dir: Path, scheduler_dir: str | Path | None = None) -> dict[str, Any]:
    """The scheduler config of a pipeline folder, or of ``scheduler_dir`` when given."""
    candidates = [Path(scheduler_dir)] if scheduler_dir else [model_dir / "scheduler"]
    for d in candidates:
        for name in ("scheduler_config.json", "config.json"):
            if (d / name).is_file():
                return _read_json(d / name)
    raise ModelLoadError(
        f"no scheduler config found in {candidates[0]}",
        hint="pass a pipeline folder with scheduler/, or --scheduler-dir pointing at a scheduler folder",
    )


def load_model(model_dir: str | Path, scheduler_dir: str | Path | None = None, *,
               allow_pickle: bool = False) -> LoadedModel:
    """Load the denoiser and scheduler config (safetensors only unless ``allow_pickle``; text encoders are loaded
    only to encode prompts: :mod:`dqdeploy.io.prompts`)."""
    model_dir = Path(model_dir)
    denoiser, files = _load_denoiser(model_dir, allow_pickle)
    loaded = LoadedModel(denoiser, load_scheduler_config(model_dir, scheduler_dir), model_dir, weight_files=files)
    return loaded


def make_scheduler(name: str | None, config: dict[str, Any], steps: int | None = None) -> Any:
    """A diffusers scheduler by alias (ddim, ddpm, pndm, euler, dpm) or class name, from ``config``;
    with ``steps``, also checked to accept that many sampling steps (before any work)."""
    import diffusers

    from ..core.errors import MissingDependencyError

    if name is None:  # the class the config names (the model folder's own scheduler)
        name = config.get("_class_name") or "DDIMScheduler"
    cls_name = SCHEDULER_ALIASES.get(str(name).lower(), name)
    if cls_name not in SUPPORTED_SCHEDULERS:
        raise ModelLoadError(
            f"unknown or unsupported scheduler {name!r}",
            hint=f"use one of {', '.join(SCHEDULER_ALIASES)} or {', '.join(SUPPORTED_SCHEDULERS)}",
        )
    cls = getattr(diffusers, cls_name)
    if not isinstance(config, dict):
        raise ModelLoadError(f"the scheduler config is a JSON {type(config).__name__}, expected an object",
                             hint="point at a scheduler folder written by save_pretrained")
    try:
        scheduler = cls.from_config(config)
    except ImportError as exc:  # diffusers' placeholder for a class whose backend is missing
        raise MissingDependencyError(f"{cls_name} cannot be used: {str(exc).strip()}",
                                     hint="install the package it names, or choose another --scheduler") from None
    except Exception as exc:  # diffusers raises NotImplementedError/ValueError/TypeError for bad configs
        raise ModelLoadError(f"the scheduler config does not make a {cls_name}: {type(exc).__name__}: {str(exc)[:300]}",
                             hint="check scheduler_config.json (e.g. beta_schedule, num_train_timesteps)") from None
    if steps is not None:
        check_steps(scheduler, steps)
    return scheduler


def check_steps(scheduler: Any, steps: int) -> None:
    """Refuse a step count the scheduler cannot sample with (e.g. more than its training steps)."""
    train = scheduler.config.get("num_train_timesteps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ModelLoadError(f"--steps {steps!r}: expected a whole number >= 1")
    if isinstance(train, int) and steps > train:
        raise ModelLoadError(f"--steps {steps} exceeds the scheduler's {train} training time steps",
                             hint=f"use --steps {train} or fewer")
    if scheduler.config.get("use_dynamic_shifting"):
        return  # its timesteps depend on the token count (sampling.set_timesteps passes mu)
    try:
        scheduler.set_timesteps(steps)
    except Exception as exc:
        raise ModelLoadError(f"{type(scheduler).__name__} cannot sample in {steps} steps: {str(exc)[:300]}",
                             hint="choose another --steps or --scheduler") from None


@torch.no_grad()
def latent_shape(denoiser: Any) -> tuple[int, ...]:
    """The shape of one noise sample for a diffusers denoiser (``(C, H, W)``; Flux: ``(N, C)``)."""
    return spec_latent_shape(spec_of(denoiser), denoiser.config, 1)[1:]


if not TYPE_CHECKING:  # old names, kept for one release (mypy sees only the new ones)
    __getattr__ = renamed(__name__, {"load_unet": "load_denoiser", "unet_class": "denoiser_class"})
