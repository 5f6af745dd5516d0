"""Block-wise distillation by propagation (one FP forward per batch for all targets, replays answered
from cached block outputs, data on disk) gives what the original algorithm gave: every block's
inputs captured by running the quantized model from the start and its targets by running the FP
model from the start, per block (O(blocks^2) forwards, all in memory). That algorithm is kept here,
as the reference."""

from __future__ import annotations

import copy

import pytest
import torch

from dqdeploy.core.inputs import forward_hooks
from dqdeploy.core.recipe import W4A8
from dqdeploy.quant.blocks import partition
from dqdeploy.quant.blockstore import BlockStore, flatten, unflatten
from dqdeploy.quant.calibrate import init_activation_scales
from dqdeploy.quant.distill import _train, block_loss, output_tensors
from dqdeploy.quant.timestep import TimestepTable
from dqdeploy.stages.quantize import build_quantized, example_forward
from tests.helpers import distill, random_calib, tiny_cond_unet, tiny_pixart, tiny_unet

RECIPE = W4A8.replace(iters=4, batch_size=3, lr_weight=1e-4)


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_from_start(model, module, calib, batches, want):
    seen = []

    def pre(mod, args, kwargs):
        seen.append(([a.detach().contiguous() if isinstance(a, torch.Tensor) else a for a in args],
                     {k: v.detach().contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        raise _Stop

    def post(mod, args, kwargs, out):
        seen.append([o.detach() for o in output_tensors(out)])
        raise _Stop

    with forward_hooks([(module, "pre" if want == "inputs" else "post", pre if want == "inputs" else post)],
                       with_kwargs=True):
        for idx in batches:
            try:
                calib.batch(idx).call(model)
            except _Stop:
                pass
    return seen


def _reference_distill(qmodel, fp, blocks, calib, recipe, seed=0):
    """The original BKD loop: per block, both models re-run from the start."""
    batches = list(torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed)).split(recipe.batch_size))
    rows = [qmodel.table.index(calib.inputs.timestep[b], len(b)) for b in batches]
    reports = []
    for k, block in enumerate(blocks):
        qblock = qmodel.denoiser.get_submodule(block.name)
        inputs = _capture_from_start(qmodel, qblock, calib, batches, "inputs")
        targets = _capture_from_start(fp, fp.get_submodule(block.name), calib, batches, "output")
        layers = [qmodel.denoiser.get_submodule(n) for n in block.layers]

        def forward(i):
            args, kwargs = inputs[i]
            return block_loss(qmodel.run_rows(rows[i], qblock, *args, **kwargs), targets[i])

        qblock.train()
        reports.append(_train(block.name, lambda i: iter([forward(i)]), layers, len(inputs), recipe, recipe.iters,
                              seed + k))
        qblock.eval()
    return reports


def _calibrated(fp, calib):
    model, _ = build_quantized(fp, RECIPE, TimestepTable(calib.timesteps), calib)
    init_activation_scales(model, calib, batch_size=RECIPE.batch_size)
    return model


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet, tiny_pixart],
                         ids=["UNet2DModel", "UNet2DConditionModel", "PixArt"])
def test_propagation_equals_running_from_the_start(make, tmp_path):
    from dqdeploy.core.denoisers import spec_for

    fp = make()
    calib = random_calib(fp, n=8) if make is not tiny_pixart else _pixart_calib(fp)
    model = _calibrated(fp, calib)
    blocks = partition(model.denoiser, example_forward(model, calib), spec_for(type(fp).__name__).blocks)
    assert len(blocks) >= 4
    reference = copy.deepcopy(model)
    new_reports = distill(model, fp, blocks, calib, RECIPE, workdir=tmp_path / "work")
    old_reports = _reference_distill(reference, fp, blocks, calib, RECIPE)
    assert not (tmp_path / "work").exists()  # the data folder is removed
    for new, old in zip(new_reports, old_reports, strict=True):
        assert new.name == old.name
        assert new.loss_before == pytest.approx(old.loss_before, rel=1e-5, abs=1e-9)
        assert new.loss_after == pytest.approx(old.loss_after, rel=1e-5, abs=1e-9)
    old_state = reference.state_dict()
    changed = 0
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, old_state[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(tensor, fp.state_dict().get(name.removeprefix("denoiser."), tensor))
    assert changed  # distillation moved the weights


def _pixart_calib(fp):
    from dqdeploy.core.inputs import DenoiserInputs
    from dqdeploy.quant.trajectories import CalibrationSet

    g = torch.Generator().manual_seed(0)
    steps = [901.0, 501.0, 1.0]
    rows = torch.arange(8) % len(steps)
    inputs = DenoiserInputs.create(torch.randn(8, 4, 8, 8, generator=g), torch.tensor(steps)[rows],
                                   sample_name="hidden_states",
                                   encoder_hidden_states=torch.randn(8, 5, 16, generator=g))
    return CalibrationSet(inputs, rows, steps)


def test_store_round_trips_structures_and_removes_only_its_shards(tmp_path):
    store = BlockStore(tmp_path / "s")
    t = torch.arange(6.0).view(2, 3)
    value = ((t, None, t.t()), {"temb": t[0], "scale": 1.5, "mask": None}, [t])
    skeleton, tensors = flatten(value)
    assert len(tensors) == 3 and all(x.is_contiguous() for x in tensors)  # t stored once
    assert unflatten(skeleton, tensors)[1]["scale"] == 1.5
    store.put("inputs", 0, 0, value)
    back = store.get("inputs", 0, 0)
    assert torch.equal(back[0][0], t) and back[0][1] is None and torch.equal(back[0][2], t.t())
    assert back[0][2].stride() == t.t().stride()  # the layout comes back (kernels round by it)
    assert torch.equal(back[1]["temb"], t[0]) and back[1]["mask"] is None and torch.equal(back[2][0], t)
    (tmp_path / "s" / "user-file.txt").write_text("keep me")
    store.clear()
    assert (tmp_path / "s" / "user-file.txt").read_text() == "keep me"
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["user-file.txt"]
