"""Inputs for ``run_engine`` and the check of its output against ONNX Runtime.

    python examples/cpp/save_inputs.py save EXPORT_DIR IN_DIR [--batch 2] [--timestep 501] [--seed 0]
    ./build/cpp/run_engine EXPORT_DIR/unet/model.plan IN_DIR OUT_DIR
    python examples/cpp/save_inputs.py compare EXPORT_DIR IN_DIR OUT_DIR [--onnx OTHER_EXPORT_DIR]

Tensors are raw little-endian row-major ``.bin`` files listed in ``tensors.txt``, one line each:
``<name> <dtype> <rank> <d0> ... <file>``. ``save`` writes the engine's input dtypes (from
``unet/engine.json``, else the export spec). ``compare`` runs the export's ONNX graph (or the one
given with ``--onnx``, e.g. an FP32 export of the same model) on ONNX Runtime and prints the error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

LIST_FILE = "tensors.txt"
DTYPES = ("float32", "float16", "int32", "int64")


def write_tensors(folder: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write each array as ``<name>.bin`` plus the ``tensors.txt`` list."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in DTYPES:
            raise ValueError(f"{name}: dtype {array.dtype} is not one of {DTYPES}")
        file = f"{name}.bin"
        (folder / file).write_bytes(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        lines.append(" ".join([name, array.dtype.name, str(array.ndim), *map(str, array.shape), file]))
    (folder / LIST_FILE).write_text("\n".join(lines) + "\n")
    return folder / LIST_FILE


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Read the arrays listed in ``folder/tensors.txt``."""
    out = {}
    for line in (folder / LIST_FILE).read_text().splitlines():
        if not line.strip():
            continue
        name, dtype, rank, *rest = line.split()
        shape, file = tuple(int(d) for d in rest[: int(rank)]), rest[int(rank)]
        out[name] = np.fromfile(folder / file, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return out


def make_inputs(export_dir: Path, batch: int, timestep: float, seed: int) -> dict[str, np.ndarray]:
    """Random ``sample`` / ``encoder_hidden_states`` and a constant ``timestep`` in the engine's dtypes."""
    spec = json.loads((export_dir / "dqdeploy_export.json").read_text())
    engine = export_dir / "unet" / "engine.json"
    dtypes = {t["name"]: t["dtype"] for t in spec["inputs"]}
    if engine.is_file():
        dtypes.update({t["name"]: t["dtype"] for t in json.loads(engine.read_text())["inputs"]})
    rng = np.random.default_rng(seed)
    out = {}
    for t in spec["inputs"]:
        shape = [batch if not isinstance(d, int) or d <= 0 else d for d in t["shape"]]
        if t["name"] == "timestep":
            out[t["name"]] = np.full(shape, timestep, dtypes[t["name"]])
        else:
            out[t["name"]] = rng.standard_normal(shape).astype(dtypes[t["name"]])
    return out


def compare(export_dir: Path, in_dir: Path, out_dir: Path, onnx_source: Path | None = None) -> dict[str, float]:
    """Error of ``out_dir/out_sample.bin`` against ONNX Runtime on the same inputs."""
    from dqdeploy import load_runtime
    from dqdeploy.core.inputs import DenoiserInputs

    inputs = DenoiserInputs.from_dict({k: v.astype(np.float32) for k, v in read_tensors(in_dir).items()})
    reference = inputs.call(load_runtime(onnx_source or export_dir, "ort")).numpy()
    got = read_tensors(out_dir)["out_sample"].astype(np.float32)
    if got.shape != reference.shape:
        raise SystemExit(f"out_sample shape {got.shape} differs from ONNX Runtime's {reference.shape}")
    diff = got - reference
    return {
        "max_abs_error": float(np.abs(diff).max()),
        "relative_l2_error": float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-12)),
        "finite": bool(np.isfinite(got).all()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="write random inputs for run_engine")
    s.add_argument("export_dir", type=Path)
    s.add_argument("in_dir", type=Path)
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--timestep", type=float, default=501.0)
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare", help="compare run_engine's output with ONNX Runtime")
    c.add_argument("export_dir", type=Path)
    c.add_argument("in_dir", type=Path)
    c.add_argument("out_dir", type=Path)
    c.add_argument("--onnx", type=Path, help="reference export folder or .onnx (default: EXPORT_DIR)")
    c.add_argument("--tolerance", type=float, default=0.05, help="largest accepted relative L2 error")
    args = ap.parse_args(argv)
    if args.cmd == "save":
        path = write_tensors(args.in_dir, make_inputs(args.export_dir, args.batch, args.timestep, args.seed))
        print(f"wrote {path}")
        return 0
    result = compare(args.export_dir, args.in_dir, args.out_dir, args.onnx)
    print(json.dumps(result, indent=2))
    return 0 if result["finite"] and result["relative_l2_error"] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
