"""safetensors read with file reads: the same tensors as safetensors' own loader, in memory the
process owns (not a mapping of the file), and malformed files refused with a typed error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dqdeploy.io.models import load_denoiser
from dqdeploy.io.tensorfile import TensorFileError, read_tensors
from tests.helpers import tiny_unet, write_pipeline


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_reads_every_dtype_as_safetensors_does(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i8": torch.randint(-128, 127, (7,), dtype=torch.int8),
               "u8": torch.randint(0, 255, (3,), dtype=torch.uint8),
               "i64": torch.arange(4), "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"kind": "test"})
    ours, theirs = read_tensors(path), load_file(str(path))
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape and torch.equal(ours[name], t), name
    assert sorted(read_tensors(path, lambda name, entry: entry["dtype"] == "F32")) == ["empty", "f32", "scalar"]


def _write(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header, data", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),  # data cut short
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16),  # offsets disagree with the shape
    ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),  # unknown dtype
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),  # negative size
    ({"a": [1, 2]}, b""),  # not an entry
], ids=["short", "offsets", "dtype", "negative", "entry"])
def test_malformed_files_are_refused(tmp_path, header, data):
    with pytest.raises(TensorFileError):
        read_tensors(_write(tmp_path / "bad.safetensors", header, data))


def test_truncated_and_non_json_headers_are_refused(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    bad = tmp_path / "json.safetensors"
    bad.write_bytes((5).to_bytes(8, "little") + b"{nope")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    for path in (tmp_path / "short.safetensors", bad, huge):
        with pytest.raises(TensorFileError):
            read_tensors(path)


def test_a_loaded_model_owns_its_weights(tmp_path):
    """load_denoiser re-reads the weights: none of them lies in a mapping of the weights file."""
    folder = write_pipeline(tiny_unet(), tmp_path / "model")
    weights = next((folder / "unet").glob("*.safetensors"))
    unet = load_denoiser(folder)
    reference = tiny_unet()
    for name, t in unet.state_dict().items():
        assert torch.equal(t, reference.state_dict()[name]), name
    mapped = _mapped_ranges(weights)
    for name, t in list(unet.named_parameters()) + list(unet.named_buffers()):
        ptr = t.untyped_storage().data_ptr()
        assert not any(lo <= ptr < hi for lo, hi in mapped), f"{name} still points into {weights.name}"
