"""Artifact tampering: every hand-edited, damaged or hostile quantized artifact is refused before it is
used (by `dqdeploy export`, which loads it fully), with an error naming the problem, and nothing written."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dqdeploy.io.integrity import file_sha256, seal
from tests.hostile.runner import has_fix, refused, run

pytestmark = pytest.mark.hostile("artifact", "refused")


def _manifest(q: Path) -> dict:
    return json.loads((q / "manifest.json").read_text())


def _write(q: Path, data, *, reseal: bool = True) -> None:
    """Write a manifest; ``reseal`` recomputes the integrity seal as a careful attacker would."""
    (q / "manifest.json").write_text(json.dumps(seal(data) if reseal and isinstance(data, dict) else data))


def _edit(**changes):
    def apply(q: Path) -> None:
        data = _manifest(q)
        data.update(changes)
        _write(q, data)
    return apply


def _edit_layer(name: str, **changes):
    def apply(q: Path) -> None:
        data = _manifest(q)
        data["layers"][name].update(changes)
        _write(q, data)
    return apply


def _rename_layer(q: Path) -> None:
    data = _manifest(q)
    data["layers"][""] = data["layers"].pop("conv_in")
    _write(q, data)


def _unsealed_timestep(q: Path) -> None:
    data = _manifest(q)
    data["timesteps"][1] = 123.0
    _write(q, data, reseal=False)


def _no_seal(q: Path) -> None:
    data = _manifest(q)
    data.pop("integrity")
    _write(q, data, reseal=False)


def _retensor(fname: str, change, key: str | None = None):
    """Rewrite a tensor file and record its new sha256 in a resealed manifest (a careful attacker)."""
    def apply(q: Path) -> None:
        tensors = load_file(str(q / fname))
        change(tensors)
        save_file(tensors, str(q / fname))
        data = _manifest(q)
        data["files"][fname] = file_sha256(q / fname)
        _write(q, data)
    return apply


def _nan_weight(t):
    t["down_blocks.0.resnets.0.norm1.weight"][0] = float("nan")


def _wide_integers(t):
    t["conv_in.weight_int8"] = t["conv_in.weight_int8"].to(torch.int16) * 4


def _zero_scale(t):
    t["down_blocks.0.resnets.0.conv1.weight_quantizer.scale"][0] = 0.0


def _empty_calib(t):
    for k in list(t):
        t[k] = t[k][:0]


def _resized_calib(t):
    t["sample"] = torch.nn.functional.interpolate(t["sample"], scale_factor=2)


def _four_bit_relabel(q: Path) -> None:
    """8-bit weights declared 4-bit, recipe included (seal recomputed): the stored integers show it."""
    data = _manifest(q)
    data["recipe"]["weight_bits"] = 4
    for name, meta in data["layers"].items():
        if name not in ("conv_in", "conv_out"):
            meta["weight_bits"] = 4
    _write(q, data)


def _oversized_config(q: Path) -> None:
    data = _manifest(q)
    data["model_config"]["block_out_channels"] = [40000, 80000]
    _write(q, data)


def _truncate(fname: str):
    def apply(q: Path) -> None:
        path = q / fname
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return apply


def _symlink_weights(q: Path) -> None:
    (q / "model.safetensors").unlink()
    os.symlink("/etc/passwd", q / "model.safetensors")


def _deep(q: Path) -> None:
    (q / "manifest.json").write_text("[" * 100000 + "]" * 100000)


CASES = {
    "manifest is a JSON list": (lambda q: _write(q, [1, 2]), "JSON list"),
    "manifest nested 100000 deep": (_deep, "nested too deeply"),
    "manifest is binary": (lambda q: (q / "manifest.json").write_bytes(os.urandom(256) + b"\xff"), "not valid JSON"),
    "hand edit without the seal": (_unsealed_timestep, "integrity record"),
    "seal removed": (_no_seal, "no integrity record"),
    "unknown key": (_edit(surprise=1), "unknown keys"),
    "empty timesteps": (_edit(timesteps=[]), "timesteps is empty"),
    "string timesteps": (_edit(timesteps="901,601"), "list of numbers"),
    "NaN timestep": (_edit(timesteps=[901.0, float("nan"), 301.0, 1.0]), "finite numbers"),
    "layer named ''": (_rename_layer, "not a module name"),
    "weight_bits 99": (_edit_layer("conv_in", weight_bits=99), "expected 4, 7 or 8"),
    "weight_bits 8.0": (_edit_layer("conv_in", weight_bits=8.0), "expected 4, 7 or 8"),
    "one layer relabelled 4-bit": (_edit_layer("down_blocks.0.resnets.0.conv1", weight_bits=4),
                                   "contradicts the recipe"),
    "whole model relabelled 4-bit": (_four_bit_relabel, "the manifest says 4-bit weights"),
    "act_symmetric false": (_edit_layer("conv_in", act_symmetric=False), "contradicts the recipe"),
    "fold target missing": (_edit_layer("down_blocks.0.resnets.0.conv1", fold="norm:down_blocks.0.nothing"),
                            "fold target"),
    "kind swapped": (_edit_layer("conv_in", kind="linear"), "kind"),
    "file name ../../etc/passwd": (_edit(files={"../../etc/passwd": "0" * 64, "model.safetensors": "0" * 64}),
                                   "plain relative name"),
    "absolute file name": (_edit(files={"/etc/hostname": "0" * 64}), "plain relative name"),
    "oversized model_config": (_oversized_config, "expected [40000"),
    "model_class swapped": (_edit(model_class="UNet2DConditionModel"), ""),
    "NaN weight, sha256 recomputed": (_retensor("model.safetensors", _nan_weight), "NaN or Inf"),
    "int16 integer weights, sha256 recomputed": (_retensor("model.safetensors", _wide_integers), "is I16, expected I8"),
    "zero step size, sha256 recomputed": (_retensor("model.safetensors", _zero_scale), "step size"),
    "empty calibration inputs": (_retensor("calibration_inputs.safetensors", _empty_calib), "calibration inputs"),
    "resized calibration inputs": (_retensor("calibration_inputs.safetensors", _resized_calib), "calibration inputs"),
    "truncated weights": (_truncate("model.safetensors"), "sha256"),
    "weights symlinked to /etc/passwd": (_symlink_weights, "outside"),
    "weights missing": (lambda q: (q / "model.safetensors").unlink(), "missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_artifact_is_refused(case, artifact, copy_of, tmp_path):
    tamper, needle = CASES[case]
    q = copy_of(artifact)
    tamper(q)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run("export", q, "--out", tmp_path / "e", "--no-simplify")
    refused(result, needle)
    has_fix(result)
    assert not (tmp_path / "e").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # < 1 GB more: nothing big allocated


@pytest.mark.parametrize("case", ["manifest is a JSON list", "hand edit without the seal", "truncated weights"])
def test_inspect_reports_a_tampered_artifact_as_corrupt(case, artifact, copy_of):
    tamper, needle = CASES[case]
    q = copy_of(artifact)
    tamper(q)
    refused(run("inspect", q), needle)
