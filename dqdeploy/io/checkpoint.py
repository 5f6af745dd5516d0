"""The checkpoint of a ``quantize`` run: ``OUT.checkpoint/`` next to the output folder ``OUT``.

It holds what an interrupted run (Ctrl-C, kill -9, a crashed machine) has finished, so that ``dqdeploy quantize
... --resume`` continues from there and writes the same artifact as an uninterrupted run:

* ``checkpoint.json``: format tag, the run's fingerprint (sha256 of the model folder's files, the scheduler folder
  and conditioning, recipe, calibration settings, dqdeploy version), the writer's pid, the fallback search's
  progress (the layers it scores, each scored layer's gain) and the report of every finished block; rewritten
  atomically after each step;
* ``calibration.safetensors``: the calibration set (FP trajectories);
* ``calibrated.safetensors``: the quantized model after per-step calibration and fallback, with its layer metadata;
* ``block-NNNNN.safetensors``: the parameters of each distilled block;
* ``data/``: distillation shards and the float layers fallback may put back (rebuilt on resume).

Every file is written under a temporary name and renamed, and its sha256 and size go into ``checkpoint.json``; a
resume verifies them (and the state's schema) before using a file, so a damaged, swapped or symlinked file is
refused, never resumed from. The folder is recognised by its ``checkpoint.json``; dqdeploy never writes into,
resumes from or deletes a folder without it, and when a run succeeds it deletes only the files it wrote there. Its
name never matches the ``.NAME.tmp-*`` / ``.NAME.old-*`` patterns :func:`dqdeploy.io.atomic.sweep_stale` removes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import DQDeployError
from ..core.inputs import DenoiserInputs
from ..core.version import __version__
from ..quant.distill import BlockReport
from ..quant.trajectories import CalibrationSet
from .artifact import LayerMeta
from .atomic import atomic_write_bytes, pid_alive
from .checkpoint_schema import schema_problems
from .integrity import file_record
from .tensorfile import read_tensors

SUFFIX = ".checkpoint"
STATE = "checkpoint.json"
CALIBRATION = "calibration.safetensors"
CALIBRATED = "calibrated.safetensors"
DATA = "data"
FORMAT = "dqdeploy-checkpoint"
FORMAT_VERSION = 2  # 2: sha256 and size of every file in "files"; 1 recorded none (not resumable: unverifiable)
_WRITER_TEMP = r"\.tmp[A-Za-z0-9]{6}$"  # safetensors' save_file writes .tmpXXXXXX, then renames it
_TEMP = re.compile(rf"\..+\.tmp-\d+$|\.checkpoint\.json\.\w+$|{_WRITER_TEMP}")  # ours, atomic_write_bytes', safetensors
_BLOCK = re.compile(r"block-\d{5}\.safetensors$")
_OWN_DATA = re.compile(rf"(fp|inputs|cached)-\d{{5}}-\d{{6}}\.safetensors$|float-\d{{5}}\.safetensors$"
                       rf"|{_WRITER_TEMP}")  # blockstore, float_layers


class CheckpointError(DQDeployError):
    """A quantize checkpoint exists where it should not, belongs to another run, or cannot be used."""


def checkpoint_path(out_dir: str | Path) -> Path:
    """``OUT.checkpoint`` next to the output folder ``OUT``."""
    out = Path(os.path.abspath(out_dir))
    return out.with_name(out.name + SUFFIX)


def refuse_with_checkpoint(out_dir: str | Path) -> None:
    """Many processes keep no checkpoint: refuse to start them next to the checkpoint of an interrupted
    one-process run (they would neither use nor remove it)."""
    folder = checkpoint_path(out_dir)
    if os.path.lexists(folder):
        raise CheckpointError(f"{folder} holds the checkpoint of an interrupted one-process run; --nproc runs keep "
                              "none and would ignore it",
                              hint=f"resume it with one process (--resume, no --nproc), or delete {folder}")


def _hash_tree(path: Path, h: Any) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def fingerprint(inputs: dict[str, str | Path | None], settings: dict[str, Any]) -> dict[str, str]:
    """Per part of a run, a sha256: of the content of every input file / folder (``None``: absent)
    and of each setting's canonical JSON."""
    out = {}
    for name, path in inputs.items():
        h = hashlib.sha256()
        if path is not None:
            _hash_tree(Path(path), h)
        out[name] = h.hexdigest()
    for name, value in {**settings, "dqdeploy": __version__}.items():
        out[name] = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    return out


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / STATE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _state_of_new_folder(folder: Path, wait_s: float = 5.0) -> dict[str, Any] | None:
    """The state of ``folder``; a folder another run has just created (mkdir, then its state) is given
    ``wait_s`` to receive its state, so a race between two runs ends in "in use", not "not a
    checkpoint"."""
    deadline = time.monotonic() + wait_s
    while ((state := _read_state(folder)) is None and time.monotonic() < deadline
           and all(p.name.startswith(f".{STATE}.") for p in folder.iterdir())):
        time.sleep(0.05)
    return state


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """Write a safetensors file under a temporary name, rename it; its ``{sha256, size}``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    record = file_record(tmp)
    os.replace(tmp, path)
    return record


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc), so a recycled pid is not taken for
    a writer."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _writer_alive(state: dict[str, Any]) -> int | None:
    """The pid of the live process that wrote ``state`` (None: it is gone, or the pid now names another
    process)."""
    pid, started = state.get("pid"), state.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid == os.getpid() or not pid_alive(pid):
        return None
    now = _process_start(pid)
    return None if started is not None and now is not None and now != started else pid


class RunCheckpoint:
    """The checkpoint folder of one quantize run (see the module docstring). Open it with :meth:`open`."""

    def __init__(self, folder: Path, state: dict[str, Any]) -> None:
        self.folder = folder
        self.state = state

    @classmethod
    def open(cls, out_dir: str | Path, run: dict[str, str], *, resume: bool) -> RunCheckpoint:
        """Create the checkpoint of a new run, or (``resume``) open the one of this same run ``run``
        (a :func:`fingerprint`); a missing checkpoint with ``resume`` starts a new one."""
        folder = checkpoint_path(out_dir)
        if os.path.lexists(folder):
            state = _state_of_new_folder(folder) if folder.is_dir() and not folder.is_symlink() else None
            if state is None:
                raise CheckpointError(f"{folder} exists and is not a dqdeploy checkpoint: dqdeploy keeps its "
                                      f"quantize checkpoint there and never touches what it did not write",
                                      hint="move that folder away or choose another --out")
            pid = _writer_alive(state)
            if pid is not None:
                raise CheckpointError(f"checkpoint {folder} already exists and is in use by another dqdeploy run "
                                      f"(pid {pid})",
                                      hint="run one writer per output folder; wait for that run or stop it")
            blocks = state.get("blocks")
            if not resume:
                raise CheckpointError(f"{folder} holds the checkpoint of an interrupted run "
                                      f"({len(blocks) if isinstance(blocks, list) else '?'} blocks distilled)",
                                      hint=f"add --resume to continue it, or delete {folder} to start over")
            cls._check_same_run(folder, state, run)
            ckpt = cls(folder, {**state, "pid": os.getpid(), "started": _process_start(os.getpid())})
            ckpt.verify()
            ckpt.clean_data()
        else:
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                raise CheckpointError(f"checkpoint {folder} already exists: another run created it at the same moment",
                                      hint="run one writer per output folder") from None
            ckpt = cls(folder, {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": run,
                                "pid": os.getpid(), "started": _process_start(os.getpid()), "blocks": [], "files": {}})
        try:
            ckpt._write_state()
        except BaseException:  # a signal while the state is written: a checkpoint of no work is not left behind
            if ckpt.is_empty():
                ckpt.remove()
            raise
        return ckpt

    @staticmethod
    def _check_same_run(folder: Path, state: dict[str, Any], run: dict[str, str]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{folder} is a checkpoint format version {state.get('format_version')}, "
                                  f"this dqdeploy reads version {FORMAT_VERSION}",
                                  hint=f"delete {folder} and run again without --resume")
        problems = schema_problems(state)
        if problems:
            raise CheckpointError(f"--resume refused: {folder / STATE} is damaged ({'; '.join(problems[:3])})",
                                  hint=f"delete {folder} and run again without --resume")
        saved = state["fingerprint"]
        differ = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        if differ:
            raise CheckpointError(f"--resume refused: {folder} is the checkpoint of another run "
                                  f"(different {', '.join(differ)})",
                                  hint=f"resume with the same model, inputs and settings as that run, "
                                       f"or delete {folder} and run again without --resume")

    def _write_state(self) -> None:
        atomic_write_bytes(self.folder / STATE, json.dumps(self.state, indent=1).encode())

    def _record(self, name: str, record: dict[str, Any]) -> None:
        self.state["files"][name] = record
        self._write_state()

    def verify(self) -> None:
        """Every file the state records is there, a regular file (no symlink), with its recorded size and
        sha256; ``data/`` is not a symlink. Raises :class:`CheckpointError` naming the first damaged file."""
        damaged = f"--resume refused: the checkpoint {self.folder} is damaged"
        hint = f"delete {self.folder} and run again without --resume (the same command starts over)"
        if self.data_dir.is_symlink():
            raise CheckpointError(f"{damaged}: {self.data_dir} is a symlink (dqdeploy writes only into its own folder)",
                                  hint=hint)
        for name, rec in self.state["files"].items():
            path = self.folder / name
            if path.is_symlink() or not path.is_file():
                raise CheckpointError(f"{damaged}: {name} is {'a symlink' if path.is_symlink() else 'missing'}",
                                      hint=hint)
            if file_record(path) != rec:
                raise CheckpointError(f"{damaged}: {name} differs from what was written (size or sha256)", hint=hint)
        for b in self.state["blocks"]:
            if self._block_file(b["index"]).name not in self.state["files"]:
                raise CheckpointError(f"{damaged}: block {b['index']} is recorded as finished "
                                      "but its file was never recorded", hint=hint)

    def _load(self, name: str, read):
        """``read(path)`` of a verified file, with a damaged file (truncated, no metadata) as
        :class:`CheckpointError`."""
        try:
            return read(self.folder / name)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"--resume refused: {self.folder / name} cannot be read "
                                  f"({type(exc).__name__}: {exc})",
                                  hint=f"delete {self.folder} and run again without --resume") from None
        except Exception as exc:  # safetensors' own error type
            if type(exc).__name__ != "SafetensorError":
                raise
            raise CheckpointError(f"--resume refused: {self.folder / name} is not a readable safetensors file "
                                  f"({exc})",
                                  hint=f"delete {self.folder} and run again without --resume") from None

    @property
    def data_dir(self) -> Path:
        """Where distillation keeps its shards."""
        return self.folder / DATA

    def clean_data(self) -> None:
        """Delete the distillation shards and temporary files a killed run left."""
        self._unlink_own(self.folder, _TEMP)
        self._unlink_own(self.data_dir, _OWN_DATA)

    @staticmethod
    def _unlink_own(folder: Path, pattern: re.Pattern[str]) -> None:
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                if pattern.match(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink()

    # -- calibration set ------------------------------------------------------------------------
    def save_calibration(self, calib: CalibrationSet) -> None:
        """Keep the calibration set."""
        meta = {"timesteps": json.dumps(calib.timesteps), "sample_name": calib.inputs.sample_name,
                "shared": json.dumps(list(calib.inputs.shared))}
        self._record(CALIBRATION, _save_tensors({**calib.inputs.to_dict(), "__rows__": calib.rows},
                                                self.folder / CALIBRATION, meta))

    def calibration(self) -> CalibrationSet | None:
        """The saved calibration set, or None."""
        if CALIBRATION not in self.state["files"]:
            return None

        def read(path: Path) -> CalibrationSet:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            tensors = load_file(str(path))
            rows = tensors.pop("__rows__")
            inputs = DenoiserInputs.from_dict(tensors, meta["sample_name"], json.loads(meta["shared"]))
            return CalibrationSet(inputs, rows, json.loads(meta["timesteps"]))

        return self._load(CALIBRATION, read)

    # -- calibrated model ---------------------------------------------------------------------
    def save_calibrated(self, denoiser: nn.Module, metas: dict[str, LayerMeta], fallback: list[str]) -> None:
        """Keep the calibrated quantized model (before distillation), its layer metadata and fallback."""
        meta = {"layers": json.dumps({k: asdict(v) for k, v in metas.items()}), "fallback": json.dumps(fallback)}
        self._record(CALIBRATED, _save_tensors(denoiser.state_dict(), self.folder / CALIBRATED, meta))

    def calibrated(self) -> tuple[dict[str, torch.Tensor], dict[str, LayerMeta], list[str]] | None:
        """The saved calibrated state, layer metadata and fallback layers, or None."""
        if CALIBRATED not in self.state["files"]:
            return None

        def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, LayerMeta], list[str]]:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            metas = {k: LayerMeta(**v) for k, v in json.loads(meta["layers"]).items()}
            # read, not mapped: loaded into the model, then freed
            return read_tensors(path), metas, json.loads(meta["fallback"])

        return self._load(CALIBRATED, read)

    # -- the fallback search (quant.fallback.SearchProgress) -------------------------------------------
    def save_search(self, order: list[str], gains: dict[str, float]) -> None:
        """The fallback search so far: the layers it scores in order, and each scored layer's gain."""
        self.state["search"] = {"order": list(order), "gains": dict(gains)}
        self._write_state()

    def search(self) -> tuple[list[str], dict[str, float]] | None:
        """The saved fallback search (order, gains; checked with the state's schema on resume), or None."""
        saved = self.state.get("search")
        return None if saved is None else (saved["order"], saved["gains"])

    # -- distilled blocks (distill.BlockCheckpoint) ----------------------------------------------
    def _block_file(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def restore(self, index: int, name: str, block: nn.Module) -> BlockReport | None:
        """Load block ``index``'s saved parameters into ``block``; its report, or None if not finished."""
        done = {b["index"]: b for b in self.state["blocks"]}
        if index not in done:
            return None
        if done[index]["name"] != name:
            raise CheckpointError(f"{self.folder}: block {index} is {done[index]['name']!r}, this run's is {name!r}",
                                  hint=f"delete {self.folder} and run again without --resume")
        state = self._load(self._block_file(index).name, lambda path: load_file(str(path)))
        try:
            block.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # another block's file: names or shapes differ
            raise CheckpointError(f"--resume refused: {self._block_file(index)} does not hold block {name} "
                                  f"({str(exc)[:200]})",
                                  hint=f"delete {self.folder} and run again without --resume") from None
        return BlockReport(**{k: v for k, v in done[index].items() if k != "index"})

    def save(self, index: int, name: str, block: nn.Module, report: BlockReport) -> None:
        """Record block ``index`` as finished: its parameters (and their hash), then its report."""
        self.state["files"][self._block_file(index).name] = _save_tensors(block.state_dict(), self._block_file(index),
                                                                          {"name": name})
        self.state["blocks"] = [b for b in self.state["blocks"] if b["index"] != index]
        self.state["blocks"].append({"index": index, **dataclasses.asdict(report)})
        self._write_state()

    def is_empty(self) -> bool:
        """Whether nothing worth resuming has been saved yet."""
        return CALIBRATION not in self.state["files"]

    def remove(self) -> bool:
        """Delete every file this checkpoint wrote, then the folder; True if it is gone (a file
        someone else put there is left, with the folder)."""
        self.clean_data()
        for name in (CALIBRATION, CALIBRATED):
            (self.folder / name).unlink(missing_ok=True)
        self._unlink_own(self.folder, _BLOCK)
        (self.folder / STATE).unlink(missing_ok=True)
        for folder in (self.data_dir, self.folder):
            try:
                folder.rmdir()
            except OSError:
                pass
        return not self.folder.exists()
