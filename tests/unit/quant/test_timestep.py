"""TimestepTable (nearest calibrated step, collapsed mode) and StepIndex (explicit, re-entrant binding)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from dqdeploy.quant.timestep import StepIndex, TimestepTable


def _ddim_steps(n: int) -> list[float]:
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(n)
    return [float(t) for t in sched.timesteps]


def test_every_calibrated_step_maps_to_its_own_row():
    steps = _ddim_steps(10)  # [900, 800, ..., 0] in sampling order
    table = TimestepTable(steps)
    assert len(table) == table.n_rows == 10
    assert table.tolist() == steps
    assert torch.equal(table.index(torch.tensor(steps), 10), torch.arange(10))
    for row, t in enumerate(steps):  # scalar timesteps (float, int, 0-dim tensor) expand to the batch
        assert table.index(t, 3).tolist() == [row] * 3
        assert table.index(int(t), 1).tolist() == [row]
        assert table.index(torch.tensor(t), 2).tolist() == [row] * 2
    assert table.is_calibrated(torch.tensor(steps))


def test_in_between_timesteps_go_to_the_nearest_row():
    table = TimestepTable([900.0, 600.0, 300.0, 0.0])
    # 999 -> 900 (row 0); 760 -> 900 (|760-900| = 140 < |760-600| = 160, row 0);
    # 740 -> 600 (row 1); 420 -> 300 (row 2); 20 -> 0 (row 3); -5 (below every step) -> row 3
    t = torch.tensor([999.0, 760.0, 740.0, 420.0, 20.0, -5.0])
    assert table.index(t, 6).tolist() == [0, 0, 1, 2, 3, 3]
    assert not table.is_calibrated(t)
    # a sampler with another step count lands on the nearest calibrated steps
    rows = table.index(torch.tensor(_ddim_steps(7)), 7)
    assert rows.tolist() == sorted(rows.tolist())  # monotone along the trajectory
    assert rows[0] == 0 and rows[-1] == 3


def test_collapsed_table_always_gives_row_zero():
    table = TimestepTable([900.0, 600.0, 300.0, 0.0], collapsed=True)
    assert table.n_rows == 1 and len(table) == 4
    assert table.index(torch.tensor([900.0, 0.0, 451.0]), 3).tolist() == [0, 0, 0]
    assert table.index(300, 2).tolist() == [0, 0]


def test_table_input_errors():
    with pytest.raises(ValueError, match="at least one"):
        TimestepTable([])
    table = TimestepTable([10.0, 5.0])
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        table.index(torch.tensor([10.0, 5.0, 1.0]), 2)


def test_step_index_binding_is_explicit_and_reentrant():
    idx = StepIndex()
    with pytest.raises(RuntimeError, match="no time step is bound"):
        idx.value
    outer, inner = torch.tensor([0, 1]), torch.tensor([2, 2, 3])
    with idx.bound(outer):
        assert idx.value is outer
        with idx.bound(inner):
            assert idx.value is inner
        assert idx.value is outer  # restored after the nested call
    with pytest.raises(RuntimeError):
        idx.value


def test_step_index_is_released_when_the_call_fails():
    idx = StepIndex()
    with pytest.raises(ZeroDivisionError), idx.bound(torch.tensor([1])):
        1 / 0
    with pytest.raises(RuntimeError, match="no time step is bound"):
        idx.value


def test_flow_matching_float_timesteps_round_trip_and_map_to_their_rows():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(7)
    steps = [float(t) for t in sched.timesteps]  # sigma x 1000: floats such as 857.69...
    assert any(t != round(t) for t in steps)
    table = TimestepTable(steps)
    assert torch.equal(table.index(sched.timesteps, 7), torch.arange(7))  # the scheduler's own float32 values
    assert table.is_calibrated(sched.timesteps)
    sigmas = TimestepTable([t / 1000 for t in steps])  # Flux: the transformer sees sigma in [0, 1]
    assert torch.equal(sigmas.index(sched.timesteps / 1000, 7), torch.arange(7))
    # between two steps: the nearer one, also at this scale
    mid = (steps[2] * 0.6 + steps[3] * 0.4) / 1000
    assert sigmas.index(mid, 1).tolist() == [2]
