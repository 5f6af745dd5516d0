"""The server's request rules per pipeline family, without a server or a model: Stable Diffusion and SD3 guide
classifier-free (negative prompt; guided and unguided jobs batch apart), Flux feeds the scale to its transformer (no
negative prompt; every scale batches together); each family's default guidance is its diffusers pipeline's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dqdeploy.runtimes.text import FAMILIES
from dqdeploy.serve.models import ServedPipeline
from dqdeploy.serve.requests import RequestError, parse_job

GUIDANCE = {"UNet2DConditionModel": 7.5, "SD3Transformer2DModel": 7.0, "FluxTransformer2DModel": 3.5}  # diffusers'


def served(model: str) -> ServedPipeline:
    """A ServedPipeline over a stand-in for OrtPipeline: what the rules read, the family's prompt encoder class."""
    pipe = SimpleNamespace(default_steps=4, spec=SimpleNamespace(model_class=model), prompt_encoder=FAMILIES[model])
    return ServedPipeline(pipe, max_steps=50)  # type: ignore[arg-type]


def job(model: str, **body):
    return parse_job(json.dumps(body).encode(), served(model).rules)


@pytest.mark.parametrize("model", sorted(GUIDANCE))
def test_a_request_without_guidance_gets_its_family_s_default(model):
    assert job(model, prompt="a cat").guidance == GUIDANCE[model]
    assert job(model, prompt="a cat", guidance=2).guidance == 2.0


def test_cfg_families_batch_guided_and_unguided_apart_flux_batches_every_scale_together():
    for model in ("UNet2DConditionModel", "SD3Transformer2DModel"):
        server = served(model)
        keys = {server.key(job(model, prompt="a", guidance=g)) for g in (1.0, 0.5)}
        assert len(keys) == 1 and server.key(job(model, prompt="a")) not in keys
    flux = served("FluxTransformer2DModel")
    assert len({flux.key(job("FluxTransformer2DModel", prompt="a", guidance=g)) for g in (0.0, 1.0, 3.5, 9)}) == 1
    assert flux.key(job("FluxTransformer2DModel", prompt="a", steps=3)) != flux.key(job("FluxTransformer2DModel",
                                                                                         prompt="a"))


def test_flux_refuses_a_negative_prompt_and_ignores_an_empty_one():
    rules = served("FluxTransformer2DModel").rules
    assert rules.fields == ("prompt", "guidance", "seed", "steps", "format")
    with pytest.raises(RequestError) as refused:
        job("FluxTransformer2DModel", prompt="a cat", negative_prompt="a dog")
    assert refused.value.status == 422
    assert "negative_prompt=\"a dog\": expected none, a FluxTransformer2DModel export is guidance-distilled" in \
        refused.value.message
    assert refused.value.hint == "leave out negative_prompt; steer with guidance (default 3.5)"
    assert job("FluxTransformer2DModel", prompt="a cat", negative_prompt="").negative_prompt == ""
    assert job("SD3Transformer2DModel", prompt="a cat", negative_prompt="a dog").negative_prompt == "a dog"


def test_a_refused_guidance_names_what_the_scale_does_for_the_family():
    with pytest.raises(RequestError, match="guidance=51") as flux:
        job("FluxTransformer2DModel", prompt="a", guidance=51)
    assert flux.value.hint == "e.g. 3.5, the default (the FluxTransformer2DModel's guidance input: no " \
                              "classifier-free guidance)"
    with pytest.raises(RequestError) as sd3:
        job("SD3Transformer2DModel", prompt="a", guidance=-1)
    assert "classifier-free guidance; at most 1: none" in str(sd3.value.hint)
