"""The quantize checkpoint folder: recognised only by its own metadata, never swept, never deleted
with files it did not write, refused for another run or while another run uses it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dqdeploy.io.atomic import sweep_stale
from dqdeploy.io.checkpoint import (
    FORMAT,
    STATE,
    CheckpointError,
    RunCheckpoint,
    _process_start,
    checkpoint_path,
    fingerprint,
)
from dqdeploy.quant.distill import BlockReport
from tests.helpers import random_calib, tiny_unet

RUN = {"model": "a" * 64, "recipe": "b" * 64}


def test_foreign_folder_at_the_checkpoint_path_is_refused_and_untouched(tmp_path):
    theirs = checkpoint_path(tmp_path / "q")
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(CheckpointError, match="not a dqdeploy checkpoint"):
            RunCheckpoint.open(tmp_path / "q", RUN, resume=resume)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_existing_checkpoint_needs_resume_and_the_same_run(tmp_path):
    ckpt = RunCheckpoint.open(tmp_path / "q", RUN, resume=False)
    ckpt.state["pid"] = 2 ** 22 + 12345  # a dead writer (pid_max is at most 2**22)
    ckpt._write_state()
    with pytest.raises(CheckpointError, match="interrupted run") as err:
        RunCheckpoint.open(tmp_path / "q", RUN, resume=False)
    assert "--resume" in str(err.value)
    with pytest.raises(CheckpointError, match="another run .different recipe"):
        RunCheckpoint.open(tmp_path / "q", {**RUN, "recipe": "c" * 64}, resume=True)
    assert RunCheckpoint.open(tmp_path / "q", RUN, resume=True).folder == ckpt.folder


def test_checkpoint_in_use_by_a_live_process_is_refused(tmp_path):
    ckpt = RunCheckpoint.open(tmp_path / "q", RUN, resume=False)
    ckpt.state["pid"], ckpt.state["started"] = os.getppid(), _process_start(os.getppid())
    ckpt._write_state()
    with pytest.raises(CheckpointError, match="in use by another dqdeploy run"):
        RunCheckpoint.open(tmp_path / "q", RUN, resume=True)


def test_a_folder_another_run_has_just_created_is_in_use_not_foreign(tmp_path):
    """Two runs racing: the loser finds the winner's folder before its state is written, and waits for it."""
    import threading

    folder = checkpoint_path(tmp_path / "q")
    folder.mkdir(parents=True)
    state = {"format": FORMAT, "pid": os.getppid(), "started": _process_start(os.getppid())}
    writer = threading.Timer(0.5, lambda: (folder / STATE).write_text(json.dumps(state)))
    writer.start()
    with pytest.raises(CheckpointError, match="already exists and is in use by another dqdeploy run"):
        RunCheckpoint.open(tmp_path / "q", RUN, resume=False)
    writer.join()


def test_a_recycled_pid_does_not_block_resume(tmp_path):
    """The writer died and its pid now names another process (started at another time): not in use."""
    ckpt = RunCheckpoint.open(tmp_path / "q", RUN, resume=False)
    ckpt.state["pid"], ckpt.state["started"] = os.getppid(), "1"
    ckpt._write_state()
    assert RunCheckpoint.open(tmp_path / "q", RUN, resume=True).folder == ckpt.folder


def test_sweep_of_stale_temporaries_never_removes_a_checkpoint(tmp_path):
    ckpt = RunCheckpoint.open(tmp_path / "q", RUN, resume=False)
    ckpt.state["pid"] = 2 ** 22 + 12345
    ckpt._write_state()
    (tmp_path / f".q.tmp-{2 ** 22 + 12345}-x").mkdir()  # a dead run's temp folder, without dqdeploy's marker
    sweep_stale(tmp_path / "q")
    sweep_stale(tmp_path / "q.checkpoint")
    assert (ckpt.folder / "checkpoint.json").is_file()


def test_state_round_trips_and_remove_deletes_only_what_it_wrote(tmp_path):
    unet = tiny_unet()
    calib = random_calib(unet, n=4)
    ckpt = RunCheckpoint.open(tmp_path / "q", RUN, resume=False)
    assert ckpt.is_empty()
    ckpt.save_calibration(calib)
    back = ckpt.calibration()
    assert back is not None and back.timesteps == calib.timesteps and torch.equal(back.rows, calib.rows)
    assert all(torch.equal(back.inputs.to_dict()[k], v) for k, v in calib.inputs.to_dict().items())
    block = unet.get_submodule("conv_in")
    report = BlockReport("conv_in", 0.5, 0.25, [0.4, 0.1 + 0.2])
    ckpt.save(1, "conv_in", block, report)
    other = torch.nn.Conv2d(1, 16, 3, padding=1)
    assert ckpt.restore(0, "time_embedding", other) is None
    assert ckpt.restore(1, "conv_in", other) == report and torch.equal(other.weight, block.weight)
    (ckpt.data_dir).mkdir()
    (ckpt.data_dir / "fp-00000-000000.safetensors").write_bytes(b"partial")
    (ckpt.data_dir / ".tmpWDZek4").write_bytes(b"partial")  # safetensors' writer, killed before its rename
    (ckpt.folder / ".tmpQ3x9Za").write_bytes(b"partial")
    (ckpt.folder / "yours.txt").write_text("keep")
    assert not ckpt.remove()
    assert sorted(p.name for p in ckpt.folder.iterdir()) == ["yours.txt"]


def test_fingerprint_follows_file_content(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"1")
    first = fingerprint({"model": tmp_path / "m", "cond": None}, {"recipe": {"iters": 1}})
    (tmp_path / "m" / "w.bin").write_bytes(b"2")
    second = fingerprint({"model": tmp_path / "m", "cond": None}, {"recipe": {"iters": 1}})
    assert first["model"] != second["model"] and first["recipe"] == second["recipe"]
    assert json.dumps(first)  # plain JSON


def test_a_user_error_before_distillation_leaves_no_checkpoint(tmp_path):
    from dqdeploy.core.errors import CalibrationError
    from dqdeploy.core.recipe import W8A8, CalibrationConfig
    from dqdeploy.stages.quantize import quantize
    from tests.helpers import tiny_cond_unet, write_bare_unet

    unet_dir, sched = write_bare_unet(tiny_cond_unet(), tmp_path)
    with pytest.raises(CalibrationError, match="needs calibration conditioning"):
        quantize(unet_dir, W8A8, CalibrationConfig(steps=2, trajectories=2, samples=4), tmp_path / "q",
                 scheduler_dir=sched)
    assert not (tmp_path / "q").exists() and not checkpoint_path(tmp_path / "q").exists()


@pytest.mark.parametrize("where", ["writing the first state", "right after the checkpoint is made"])
def test_a_signal_as_the_checkpoint_is_made_leaves_nothing(tmp_path, monkeypatch, where):
    """SIGTERM lands wherever it lands: while the new checkpoint's first state is written, or just after the
    checkpoint exists but before the run holds it (what the hostile signal test hit on a loaded machine)."""
    from dqdeploy.core.recipe import W8A8, CalibrationConfig
    from dqdeploy.stages import quantize as stage
    from dqdeploy.system.interrupts import Terminated
    from tests.helpers import write_pipeline

    write_pipeline(tiny_unet(), tmp_path / "pipe")
    if where == "writing the first state":
        real = RunCheckpoint._write_state

        def write_then_signal(self):
            real(self)
            raise Terminated()

        monkeypatch.setattr(RunCheckpoint, "_write_state", write_then_signal)
    else:
        real_open = RunCheckpoint.open.__func__

        def open_then_signal(cls, *args, **kwargs):
            ckpt = real_open(cls, *args, **kwargs)
            assert ckpt.folder.is_dir()
            monkeypatch.setattr(stage.distributed, "agree", lambda *a, **k: (_ for _ in ()).throw(Terminated()))
            return ckpt

        monkeypatch.setattr(RunCheckpoint, "open", classmethod(open_then_signal))
    with pytest.raises(Terminated):
        stage.quantize(tmp_path / "pipe", W8A8, CalibrationConfig(steps=2, trajectories=2, samples=4), tmp_path / "q")
    assert not checkpoint_path(tmp_path / "q").exists() and not (tmp_path / "q").exists()
