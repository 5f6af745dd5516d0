"""scikit-learn's digits as diffusion training data, and a small CNN classifier whose penultimate
features give the digits-FID (the role Inception-v3 plays for CIFAR/ImageNet FID).

Images are the 1797 8x8 digits, upsampled (bilinear, deterministic) to ``size`` x ``size`` and
mapped from [0, 16] to [-1, 1]: background -1, ink +1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..core.errors import DQDeployError, ModelLoadError

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DIGITS_MODEL_NAME = "digits-ddpm"
CLASSIFIER_NAME = "digits-classifier"
CLASSIFIER_FORMAT_VERSION = 1
TRAIN_COMMAND = "python scripts/train_digits.py"


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32)  # [N, 8, 8] in [0, 16]
    labels = torch.as_tensor(data.target, dtype=torch.long)
    return images, labels


def load_digits_images(size: int = 16) -> torch.Tensor:
    """All 1797 digits as float32 ``[N, 1, size, size]`` in [-1, 1] (bilinear upsampling from 8x8)."""
    if not isinstance(size, int) or size < 8:
        raise DQDeployError(f"digits image size must be an int >= 8, found {size!r}")
    raw, _ = _raw_digits()
    x = raw.unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).contiguous()


def load_digits_labels() -> torch.Tensor:
    """Class labels (0-9) of the 1797 digits, int64 ``[N]``, in the order of :func:`load_digits_images`."""
    return _raw_digits()[1].clone()


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train / held-out index split of the digits (the split the shipped classifier used)."""
    if not 0.0 < test_fraction < 1.0:
        raise DQDeployError(f"test_fraction must lie in (0, 1), found {test_fraction}")
    n = _raw_digits()[1].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of :class:`DigitsClassifier` (stored as ``config.json`` next to the weights)."""

    image_size: int = 16
    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 64
    num_classes: int = 10
    dropout: float = 0.3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "channels" in kw:
            kw["channels"] = tuple(int(c) for c in kw["channels"])
        return cls(**kw)


class DigitsClassifier(nn.Module):
    """Small CNN for 1x``image_size``x``image_size`` digits in [-1, 1]; ``features`` gives the FID embedding."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        if config.image_size % 4:
            raise DQDeployError(f"classifier image_size must be a multiple of 4, found {config.image_size}")
        c1, c2 = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (config.image_size // 4) ** 2, config.feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, config.num_classes))

    def _check(self, x: torch.Tensor) -> None:
        s = self.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise DQDeployError(f"digits classifier expects images [N, 1, {s}, {s}], found {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[N, feature_dim]``."""
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.features(x))


def classifier_dir() -> Path:
    """Folder of the shipped digits classifier (``model.safetensors`` + ``config.json``)."""
    return ASSETS_DIR / CLASSIFIER_NAME


def digits_model_dir() -> Path:
    """Folder of the shipped digits DDPM pipeline; raises :class:`ModelLoadError` if it was never trained."""
    path = ASSETS_DIR / DIGITS_MODEL_NAME
    if not (path / "unet" / "config.json").is_file() or not (path / "scheduler" / "scheduler_config.json").is_file():
        raise ModelLoadError(f"the digits DDPM is missing: expected a diffusers pipeline folder at {path}",
                             hint=f"train it with `{TRAIN_COMMAND}`")
    return path


def save_classifier(model: DigitsClassifier, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + ``extra`` metadata) into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    meta = {"format_version": CLASSIFIER_FORMAT_VERSION, "architecture": "DigitsClassifier",
            "config": model.config.to_dict(), **(extra or {})}
    (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """Load a classifier folder (default: the shipped asset) in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else classifier_dir()
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ModelLoadError(f"no digits classifier at {path} (needs config.json and model.safetensors)",
                             hint=f"train it with `{TRAIN_COMMAND}`")
    try:
        meta = json.loads(cfg_file.read_text())
        if meta.get("format_version") != CLASSIFIER_FORMAT_VERSION:
            raise ModelLoadError(f"classifier at {path} has format_version {meta.get('format_version')!r}, "
                                 f"expected {CLASSIFIER_FORMAT_VERSION}", hint=f"retrain it with `{TRAIN_COMMAND}`")
        model = DigitsClassifier(ClassifierConfig.from_dict(meta["config"]))
        model.load_state_dict(load_file(str(weights)), strict=True)
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"could not load the digits classifier at {path}: {exc}",
                             hint=f"retrain it with `{TRAIN_COMMAND}`") from exc
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> float:
    """Fraction of ``images`` that ``model`` labels correctly."""
    if images.shape[0] != labels.shape[0]:
        raise DQDeployError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    was_training = model.training
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, images.shape[0], batch_size))
    model.train(was_training)
    return correct / max(1, images.shape[0])
