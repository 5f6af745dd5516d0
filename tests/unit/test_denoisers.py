"""The denoiser registry: specs of the five supported classes, graph inputs per config, latent shapes,
Flux position ids, conditioning widths, loading transformer folders with their own scheduler."""

from __future__ import annotations

import pytest
import torch

from dqdeploy.core.denoisers import SPECS, conditioning_dims, flux_position_ids, latent_shape, spec_for, spec_of
from dqdeploy.core.errors import ModelLoadError
from dqdeploy.io.models import load_model, make_scheduler
from tests.helpers import POOLED_DIM, TEXT_DIM, tiny_flux, tiny_pixart, tiny_sd3, tiny_unet, write_transformer_pipeline


def test_registry_covers_unets_and_the_three_transformers():
    assert set(SPECS) == {"UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "PixArtTransformer2DModel",
                          "FluxTransformer2DModel"}
    with pytest.raises(ModelLoadError, match="unsupported model class 'HunyuanDiT2DModel'"):
        spec_for("HunyuanDiT2DModel")
    assert spec_of(tiny_unet()).sample == "sample" and spec_of(tiny_sd3()).sample == "hidden_states"


def test_graph_inputs_follow_optimum_and_the_config():
    sd3, pixart = tiny_sd3(), tiny_pixart()
    assert spec_of(sd3).input_names(sd3.config) == ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                                    "timestep"]
    assert spec_of(pixart).input_names(pixart.config) == ["hidden_states", "encoder_hidden_states", "timestep"]
    flux, schnell = tiny_flux(), tiny_flux(guidance=False)
    full = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
            "guidance"]
    assert spec_of(flux).input_names(flux.config) == full
    assert spec_of(schnell).input_names(schnell.config) == full[:-1]  # no guidance embedding, no input
    assert spec_of(flux).conditioning_names(flux.config) == ["encoder_hidden_states", "pooled_projections"]
    assert all(spec.output == "out_hidden_states" for spec in SPECS.values() if spec.is_transformer)
    unet = tiny_unet()
    assert spec_of(unet).input_names(unet.config) == ["sample", "timestep"]


def test_latents_timesteps_and_ids():
    flux, sd3 = tiny_flux(), tiny_sd3()
    assert latent_shape(spec_of(sd3), sd3.config, 3) == (3, 4, 8, 8)
    assert latent_shape(spec_of(flux), flux.config, 2, 8) == (2, 16, 16)  # 8x8 latent -> 4x4 patches of 16 channels
    with pytest.raises(ModelLoadError, match="--resolution"):
        latent_shape(spec_of(flux), flux.config, 2)
    assert float(spec_of(flux).model_timestep(torch.tensor(750.0))) == pytest.approx(0.75)
    ids = flux_position_ids(16, 5)
    assert ids["img_ids"].shape == (16, 3) and ids["txt_ids"].shape == (5, 3) and not ids["txt_ids"].any()
    assert ids["img_ids"][5].tolist() == [0.0, 1.0, 1.0]  # row 1, column 1 of the 4x4 grid
    with pytest.raises(ModelLoadError, match="square"):
        flux_position_ids(12, 5)
    feeds = {"hidden_states": torch.zeros(4, 16, 16), "timestep": torch.ones(4), "img_ids": ids["img_ids"]}
    inputs = spec_of(flux).inputs_from_dict(feeds)
    picked = inputs.slice(torch.tensor([1, 3]))
    assert len(picked) == 2 and picked.shared["img_ids"] is ids["img_ids"]  # ids have no batch axis
    assert list(picked.to_dict()) == ["hidden_states", "timestep", "img_ids"]


def test_pixart_with_size_conditions_is_refused():
    pixart = tiny_pixart()
    with pytest.raises(ModelLoadError, match="use_additional_conditions"):
        spec_of(pixart).check_supported({**pixart.config, "use_additional_conditions": True})


def test_conditioning_widths_and_learned_sigma():
    sd3, pixart = tiny_sd3(), tiny_pixart()
    assert conditioning_dims(spec_of(sd3), sd3.config) == {"encoder_hidden_states": TEXT_DIM,
                                                           "pooled_projections": POOLED_DIM}
    assert conditioning_dims(spec_of(pixart), pixart.config) == {"encoder_hidden_states": TEXT_DIM}
    assert spec_of(pixart).learned_sigma(pixart.config) and not spec_of(sd3).learned_sigma(sd3.config)


@pytest.mark.parametrize("kind,cls,sched", [("sd3", "SD3Transformer2DModel", "FlowMatchEulerDiscreteScheduler"),
                                            ("pixart", "PixArtTransformer2DModel", "DPMSolverMultistepScheduler")])
def test_transformer_pipeline_folders_load_with_their_own_scheduler(tmp_path, kind, cls, sched):
    folder = write_transformer_pipeline(kind, tmp_path / kind)
    loaded = load_model(folder)
    assert type(loaded.denoiser).__name__ == cls and loaded.conditional
    assert type(make_scheduler(None, loaded.scheduler_config)).__name__ == sched
    assert type(make_scheduler("flow", loaded.scheduler_config)).__name__ == "FlowMatchEulerDiscreteScheduler"
    bare = load_model(folder / "transformer", scheduler_dir=folder / "scheduler")  # a bare transformer folder
    assert type(bare.denoiser).__name__ == cls
