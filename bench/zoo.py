"""The development model zoo: digits diffusion models that differ in seed, training length, norm
groups, attention head size, width and conditioning, so that quality is never tuned on one model.

Every member except ``shipped`` is trained on CPU by ``scripts/train_digits.py --stage ddpm`` with
the arguments below (fixed seed, one thread) and cached outside git, under
``$DQDEPLOY_ZOO`` (default ``~/.cache/dqdeploy/zoo``)::

    ZOO_ROOT/NAME/digits-ddpm/   the diffusers pipeline folder (unet/, scheduler/, model_index.json
                                 [, class_cond.safetensors for the conditional member])
    ZOO_ROOT/NAME/run/           training summary.json, loss.png, samples.png
    ZOO_ROOT/NAME/train.log      the training log

API (small on purpose; part of the quality harness):

* ``ZOO`` -- ``{name: ZooModel}`` in benchmark order; ``names()`` lists them.
* ``get(name) -> ZooModel`` (raises ``DQDeployError`` for an unknown name).
* ``ZooModel.folder()`` -- where its pipeline folder is (trained or not); ``.available()``.
* ``ZooModel.cond_file()`` -- the ``--cond`` file (class prompts + null prompt) of a conditional
  member, else None; ``.guidance`` the classifier-free guidance scale to sample it with.
* ``ZooModel.train_command()`` -- the exact command (argv) that trains it.
* ``ensure(name) -> Path`` -- the folder, training the model first (minutes) if it is missing.

Train the whole zoo, one model at a time: ``python scripts/train_zoo.py`` (``--list`` shows state).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train_digits.py"
ALT_TRAIN_SCRIPT = ROOT / "scripts" / "train_digits_alt.py"  # the held-out members' independently written trainer
GROUPS = ("tuning", "held-out")
MODEL_SUBDIR = "digits-ddpm"
CLASS_COND_FILE = "class_cond.safetensors"  # written by scripts/train_digits.py --conditional


def zoo_root() -> Path:
    """Cache folder of the trained zoo models (``$DQDEPLOY_ZOO`` or ``~/.cache/dqdeploy/zoo``)."""
    return Path(os.environ.get("DQDEPLOY_ZOO", "~/.cache/dqdeploy/zoo")).expanduser()


@dataclass(frozen=True)
class ZooModel:
    """One zoo member: how it differs from the shipped model and how it is trained."""

    name: str
    description: str
    seed: int = 0
    train_args: tuple[str, ...] = ()  # extra arguments of scripts/train_digits.py --stage ddpm
    conditional: bool = False
    guidance: float = 1.0  # classifier-free guidance scale used when sampling it
    scheduler: str | None = "ddim"  # its sampler (None: the folder's own, e.g. the DiT's flow-matching Euler)
    steps: int = 50  # sampling (and calibration) steps
    shipped: bool = False
    group: str = "tuning"  # "held-out": only ever evaluated with the defaults, never used to choose them
    alt_trainer: bool = False  # trained by scripts/train_digits_alt.py instead of scripts/train_digits.py
    notes: dict = field(default_factory=dict, compare=False)

    def folder(self) -> Path:
        """The diffusers pipeline folder (may not exist yet: see :func:`ensure`)."""
        if self.shipped:
            from dqdeploy.eval.digits import ASSETS_DIR, DIGITS_MODEL_NAME

            return ASSETS_DIR / DIGITS_MODEL_NAME
        return zoo_root() / self.name / MODEL_SUBDIR

    def available(self) -> bool:
        """Whether the pipeline folder is complete (training writes it atomically)."""
        d = self.folder()
        denoiser = (d / "unet" / "config.json").is_file() or (d / "transformer" / "config.json").is_file()
        return denoiser and (d / "scheduler" / "scheduler_config.json").is_file()

    def cond_file(self) -> Path | None:
        """The class-prompt ``--cond`` file of a conditional member (sample i is digit i % 10)."""
        return self.folder() / CLASS_COND_FILE if self.conditional else None

    def train_command(self) -> list[str]:
        """argv that (re)trains this member into :meth:`folder` (the shipped one: its own script)."""
        if self.shipped:
            return [sys.executable, str(TRAIN_SCRIPT), "--stage", "ddpm"]
        base = zoo_root() / self.name
        if self.alt_trainer:
            return [sys.executable, str(ALT_TRAIN_SCRIPT), "--seed", str(self.seed), "--out", str(base),
                    *self.train_args]
        return [sys.executable, str(TRAIN_SCRIPT), "--stage", "ddpm", "--seed", str(self.seed),
                "--assets", str(base), "--out", str(base / "run"), *self.train_args]


def _member(name: str, description: str, *args: str, **kw) -> tuple[str, ZooModel]:
    return name, ZooModel(name, description, train_args=tuple(args), **kw)


ZOO: dict[str, ZooModel] = dict([
    _member("shipped", "dqdeploy/assets/digits-ddpm: 4000 iterations, seed 0, block_out (32, 64, 64), "
            "16 norm groups, attention head dim 32", shipped=True),
    _member("seed1", "shipped config and training, seed 1", seed=1),
    _member("early", "shipped config and seed, stopped after 1000 of its 4000 iterations (EMA weights)",
            "--stop-at", "1000"),
    _member("cond", "class-conditional UNet2DConditionModel (cross-attention on a learned 1-token class prompt, "
            "null prompt 10% of the time), 1500 iterations, CFG scale 2", "--conditional", "--iters", "1500",
            "--fid-samples", "200",
            conditional=True, guidance=2.0),
    _member("dit", "class-conditional SD3-style diffusion transformer (SD3Transformer2DModel, patch 2, "
            "4 joint blocks of width 96), rectified flow, fixed 2-token class prompt + pooled vector, null prompt 10%, "
            "4000 iterations of batch 32, flow-matching Euler 28 steps, CFG scale 2",
            "--transformer", "--iters", "4000", "--batch-size", "32", "--lr", "1e-3",
            "--sample-steps", "28", conditional=True, guidance=2.0, scheduler=None, steps=28),
    _member("narrow", "narrower (block_out (32, 48, 48)), 8 norm groups, attention head dim 16 (3 heads), "
            "1500 iterations", "--unet",
            '{"block_out_channels": [32, 48, 48], "norm_num_groups": 8, "attention_head_dim": 16}', "--iters", "1500",
            "--fid-samples", "200"),
    # held-out: trained by another script with another schedule, target, optimizer and attention layout;
    # evaluated only with the defaults (bench/zoo_quality.py refuses ablations on them)
    _member("heldout-vpred", "held-out: scripts/train_digits_alt.py, v-prediction, linear betas, Adam with constant "
            "LR after warm-up, EMA 0.999 (diffusers EMAModel), attention at 8x8 and 4x4 with head dim 8, 80 epochs "
            "(3040 iterations of batch 48)", "--prediction-type", "v_prediction", "--beta-schedule", "linear",
            "--optimizer", "adam", "--lr", "3e-4", "--lr-schedule", "constant_with_warmup", "--ema-max-decay",
            "0.999", "--epochs", "80", seed=5, group="held-out", alt_trainer=True),
    _member("heldout-large", "held-out: scripts/train_digits_alt.py, 3.8M parameters (block_out (48, 96, 96), "
            "16 norm groups, head dim 16), epsilon, linear betas, AdamW + cosine LR, EMA (diffusers EMAModel), "
            "50 epochs",
            "--config", '{"block_out_channels": [48, 96, 96], "attention_head_dim": 16, "norm_num_groups": 16}',
            "--epochs", "50",
            seed=7, group="held-out", alt_trainer=True),
])


def names(group: str | None = None) -> list[str]:
    """Zoo member names in benchmark order (only those of ``group``: "tuning" or "held-out", when given)."""
    return [n for n, m in ZOO.items() if group is None or m.group == group]


def get(name: str) -> ZooModel:
    """The zoo member called ``name``."""
    from dqdeploy.core.errors import DQDeployError

    if name not in ZOO:
        raise DQDeployError(f"unknown zoo model {name!r}; the zoo has {', '.join(ZOO)}",
                            hint="pick one of those names (bench/zoo.py defines them)")
    return ZOO[name]


def refuse_held_out(what: str | Path, purpose: str) -> None:
    """Raise ``DQDeployError`` if ``what`` -- a member name, or a path inside a member's folder or inside its
    benchmark cache -- belongs to a held-out member: those are only ever evaluated with the defaults, never
    used for ``purpose`` (an ablation, a screen, a tuning sweep), so that a default is judged on models it was
    not chosen on."""
    from dqdeploy.core.errors import DQDeployError

    name = str(what)
    if name not in ZOO:
        parts = Path(what).expanduser().resolve().parts
        root = zoo_root().expanduser().resolve().parts
        rest = parts[len(root):] if parts[:len(root)] == root else ()
        rest = rest[1:] if rest[:1] == ("bench",) else rest
        name = rest[0] if rest else ""
    if name in ZOO and ZOO[name].group == "held-out":
        raise DQDeployError(f"{what}: zoo member {name!r} is held out; it is not used for {purpose}",
                            hint=f"use a tuning member ({', '.join(names('tuning'))}); held-out members are "
                                 "evaluated with the defaults only (bench/zoo_quality.py --variants default)")


def train(name: str, nice: int = 10) -> Path:
    """Train ``name`` now (blocking; log in ZOO_ROOT/NAME/train.log) and return its folder."""
    from dqdeploy.core.errors import DQDeployError

    model = get(name)
    log = zoo_root() / name / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("ab") as fh:
        rc = subprocess.call(["nice", "-n", str(nice), *model.train_command()], stdout=fh, stderr=subprocess.STDOUT,
                             env=env, cwd=ROOT)
    if rc != 0 or not model.available():
        raise DQDeployError(f"training zoo model {name!r} failed (exit {rc}); no pipeline at {model.folder()}",
                            hint=f"read {log}")
    return model.folder()


def ensure(name: str) -> Path:
    """The pipeline folder of ``name``, trained first if it is missing (minutes on one CPU thread)."""
    model = get(name)
    return model.folder() if model.available() else train(name)
