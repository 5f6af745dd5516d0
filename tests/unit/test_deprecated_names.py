"""The ``*UNet*`` names renamed ``*Denoiser*``: the old names still work for one release and warn, and no
class of the package is named after UNets (the same classes run diffusion transformers)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dqdeploy
from dqdeploy.io.models import LoadedModel
from dqdeploy.quant.modules import QuantizedDenoiser
from dqdeploy.quant.timestep import StepIndex, TimestepTable
from dqdeploy.stages.sources import OpenedModel

RENAMED = [
    ("dqdeploy.quant.modules", "QuantizedUNet", "QuantizedDenoiser"),
    ("dqdeploy.runtimes.base", "UNetRuntime", "DenoiserRuntime"),
    ("dqdeploy.runtimes.ort", "OrtUNet", "OrtDenoiser"),
    ("dqdeploy.runtimes.trt", "TrtUNet", "TrtDenoiser"),
    ("dqdeploy.exporters.dequantize", "dequantized_unet", "dequantized_denoiser"),
    ("dqdeploy.io.models", "load_unet", "load_denoiser"),
    ("dqdeploy.io.models", "unet_class", "denoiser_class"),
]


@pytest.mark.parametrize("module, old, new", RENAMED)
def test_old_names_import_and_warn(module, old, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*{new}"):
        value = getattr(mod, old)
    assert value is getattr(mod, new)
    with pytest.warns(DeprecationWarning):
        exec(f"from {module} import {old}", {})  # noqa: S102 -- the `from ... import` form users write
    with pytest.raises(AttributeError, match="no attribute"):
        getattr(mod, old + "Typo")


def test_quantize_unet_still_takes_its_unet_keyword(monkeypatch):
    import dqdeploy.stages.quantize as stage

    seen = []
    monkeypatch.setattr(stage, "quantize_denoiser", lambda *args, **kwargs: seen.append((args, kwargs)) or "result")
    with pytest.warns(DeprecationWarning, match="quantize_unet is deprecated.*quantize_denoiser"):
        old = stage.quantize_unet
    assert old("model", "recipe", calib="calib") == "result" and seen[-1] == (("model", "recipe"), {"calib": "calib"})
    assert old(unet="model", recipe="recipe") == "result" and seen[-1] == (("model",), {"recipe": "recipe"})


def test_old_attribute_names_warn_and_answer_the_denoiser():
    inner = torch.nn.Linear(2, 2)
    wrapped = QuantizedDenoiser(inner, TimestepTable([1.0]), StepIndex())
    loaded = LoadedModel(inner, {}, Path("."))
    opened = OpenedModel(inner, {}, "fp", False, [])
    for owner, obj in (("QuantizedDenoiser", wrapped), ("LoadedModel", loaded), ("OpenedModel", opened)):
        with pytest.warns(DeprecationWarning, match=f"{owner}.unet is deprecated.*{owner}.denoiser"):
            assert obj.unet is inner
    assert [n for n, _ in wrapped.named_children()] == ["denoiser"]  # state dict keys: denoiser.*


def test_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for module, _, new in RENAMED:
            getattr(importlib.import_module(module), new)
        importlib.import_module("dqdeploy.stages.quantize").quantize_denoiser


def test_no_class_is_named_after_unets():
    package = Path(dqdeploy.__file__).resolve().parent
    found = [f"{path.relative_to(package)}:{node.lineno} {node.name}"
             for path in package.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ClassDef) and "unet" in node.name.lower()]
    assert found == []


def test_moved_modules_import_under_their_old_path_and_warn():
    from dqdeploy.core.deprecation import MOVED

    for old, new in MOVED.items():
        assert importlib.util.find_spec(new) is not None, new
        parts = old.split(".")
        assert not Path(dqdeploy.__file__).parent.joinpath(*parts[1:]).with_suffix(".py").exists(), old
    code = ("import warnings, sys; warnings.simplefilter('error', DeprecationWarning)\n"
            "import dqdeploy.io.artifact as new\n"
            "try:\n    import dqdeploy.artifact\nexcept DeprecationWarning as w:\n    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\n"
            "from dqdeploy import artifact as old\n"
            "from dqdeploy.quantize_stage import quantize\n"
            "import dqdeploy.stages.quantize as q\n"
            "print(old is new, new.__spec__.name, quantize is q.quantize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "warned: dqdeploy.artifact is deprecated" in out and "import dqdeploy.io.artifact" in out
    assert out.strip().endswith("True dqdeploy.io.artifact True")
