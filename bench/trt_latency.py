"""TensorRT latency and accuracy of one UNet as INT8-QDQ and FP16 engines (NVIDIA GPU + TensorRT only).

Engines, all of the same UNet and all built with the same batch profile:

  fp16            the float graph exported with --fp16 (no Q/DQ)
  int8-per-step   w8a8, per-time-step activation scales (constant Q/DQ scales + rescale multiplies)
  int8-constant   w8a8 with one activation scale per layer (--timestep-scales collapsed)

Latency: median (and p10/p90) over --iters CUDA-event timings of one engine launch on pre-bound
inputs ("engine_ms"), and of one full drop-in call from CUDA tensors, validation included ("call_ms").
Accuracy: Polygraphy's Comparator, each engine against ONNX Runtime (CPU, FP32 graph of the same
model or artifact) at a few calibrated time steps; plus relative L2 error and cosine per step.

Export folders are made with the CLI unless given:

  dqdeploy quantize MODEL --recipe w8a8 --out Q [--timestep-scales collapsed]
  dqdeploy export Q --target trt --out E          (FP16 QDQ graph + engine)
  dqdeploy export Q --target onnx --out R         (FP32 QDQ graph: the ONNX Runtime reference)
  dqdeploy export MODEL --target float --fp16 --out F  + build_engine(F)   (the FP16 engine)
  dqdeploy export MODEL --target float --out R32  (FP32 float reference)

Usage:
  python bench/trt_latency.py                            # a bench UNet made in code
  python bench/trt_latency.py --model DIFFUSERS_DIR [--cond EMB.safetensors]
  python bench/trt_latency.py --work DIR                  # reuse the folders of an earlier run
Writes bench/results/trt_latency.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def bench_unet_dir(path: Path, size: int) -> Path:
    """A conv-heavy diffusers UNet2DModel with attention at the lowest level (random weights: latency
    does not depend on training), saved as a DDPM pipeline folder. Small enough that calibration on
    the CPU (the quantize stage runs there) takes about a minute."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=size, in_channels=4, out_channels=4, block_out_channels=(128, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32,
    ).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(path))
    return path


def dqdeploy(*args: str) -> None:
    """Run one CLI command (the same commands a user types), failing loudly."""
    cmd = [sys.executable, "-m", "dqdeploy.cli", *args]
    print("$ dqdeploy " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def make_folders(args, work: Path) -> dict[str, dict[str, Path]]:
    """``{engine name: {"engine": export folder with a plan, "reference": FP32 export for ORT}}``."""
    from dqdeploy.exporters.engine import build_engine

    model = Path(args.model) if args.model else bench_unet_dir(work / "model", args.size)
    batch = f"1:{args.batch}:{args.batch}"
    calib = ["--steps", str(args.steps), "--calib-samples", str(args.calib_samples),
             "--trajectories", str(args.trajectories)]
    if not args.distill:
        calib.append("--no-distill")
    if args.cond:
        calib += ["--cond", str(args.cond)]
    folders: dict[str, dict[str, Path]] = {}
    for name, extra in (("int8-per-step", []), ("int8-constant", ["--timestep-scales", "collapsed"])):
        q, eng, ref = work / f"q-{name}", work / f"e-{name}", work / f"r-{name}"
        if not q.exists():
            dqdeploy("quantize", str(model), "--recipe", "w8a8", "--out", str(q), *calib, *extra)
        if not (eng / "unet" / "model.plan").exists():
            dqdeploy("export", str(q), "--target", "trt", "--out", str(eng), "--batch", batch, "--overwrite")
        if not ref.exists():
            dqdeploy("export", str(q), "--target", "onnx", "--out", str(ref))
        folders[name] = {"engine": eng, "reference": ref}
    fp16, ref32 = work / "e-fp16", work / "r-fp32"
    if not fp16.exists():
        dqdeploy("export", str(model), "--target", "float", "--fp16", "--out", str(fp16))
    if not (fp16 / "unet" / "model.plan").exists():
        build_engine(fp16, batch=(1, args.batch, args.batch))
    if not ref32.exists():
        dqdeploy("export", str(model), "--target", "float", "--out", str(ref32))
    folders["fp16"] = {"engine": fp16, "reference": ref32}
    return folders


def example_inputs(spec, batch: int, seed: int = 0, cond_file: str | None = None) -> dict[str, torch.Tensor]:
    """FP32 sample (and context) for ``spec``; the context comes from --cond when given."""
    g = torch.Generator().manual_seed(seed)
    shapes = {t.name: [batch if isinstance(d, str) else d for d in t.shape] for t in spec.inputs}
    feeds = {"sample": torch.randn(*shapes["sample"], generator=g)}
    if "encoder_hidden_states" in shapes:
        if cond_file:
            from safetensors.torch import load_file

            ctx = load_file(cond_file)["encoder_hidden_states"]
            feeds["encoder_hidden_states"] = ctx[torch.arange(batch) % ctx.shape[0]].float()
        else:
            feeds["encoder_hidden_states"] = torch.randn(*shapes["encoder_hidden_states"], generator=g)
    return feeds


def cuda_latency(fn, iters: int, warmup: int) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of ``fn`` between two CUDA events, one launch per sample."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = np.percentile(times, [10, 90])
    return {"median": statistics.median(times), "p10": float(q[0]), "p90": float(q[1])}


def measure_latency(engine_dir: Path, batch: int, iters: int, warmup: int, cond_file: str | None) -> dict:
    from dqdeploy import load_runtime

    unet = load_runtime(engine_dir, "trt")
    inputs = {k: v.cuda() for k, v in example_inputs(unet.spec, batch, cond_file=cond_file).items()}
    steps = unet.spec.timesteps or [500.0]
    t = torch.full((batch,), float(steps[len(steps) // 2]), device="cuda")
    feeds = unet.prepare_inputs(inputs["sample"], t, inputs.get("encoder_hidden_states"))
    unet.bind(feeds)  # the bound tensors stay alive in `feeds` for the whole loop
    engine = cuda_latency(unet.enqueue, iters, warmup)
    call = cuda_latency(lambda: unet(inputs["sample"], t, inputs.get("encoder_hidden_states"), return_dict=False),
                        iters, warmup)
    return {"engine_ms": engine, "call_ms": call, "engine_bytes": (engine_dir / "unet" / "model.plan").stat().st_size}


def comparator_accuracy(test_runner, test_feeds, ref_runner, ref_feeds, *, rtol: float, atol: float) -> dict:
    """Polygraphy: run both runners on their own feeds (the engine takes FP16, ONNX Runtime FP32),
    compare ``out_sample`` in FP32 with ``CompareFunc.simple`` (median error statistic), and report
    relative L2 error and cosine per iteration."""
    from polygraphy.comparator import Comparator, CompareFunc, RunResults
    from polygraphy.comparator.struct import IterationResult

    def as_fp32(results) -> RunResults:
        out = RunResults()
        for runner_name, iterations in results.items():
            converted = []
            for it in iterations:
                arrays = {}
                for k in it.keys():
                    v = it[k]
                    v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
                    arrays[k] = v.astype(np.float32)
                converted.append(IterationResult(arrays, runner_name=runner_name))
            out.append((runner_name, converted))
        return out

    combined = RunResults()
    for runner, feeds in ((test_runner, test_feeds), (ref_runner, ref_feeds)):
        for entry in as_fp32(Comparator.run([runner], data_loader=feeds)).items():
            combined.append(entry)
    accuracy = Comparator.compare_accuracy(
        combined, compare_func=CompareFunc.simple(rtol=rtol, atol=atol, check_error_stat="median"))
    (_, test_iters), (_, ref_iters) = combined.items()
    rel, cos = [], []
    for a_it, b_it in zip(test_iters, ref_iters):
        a, b = np.asarray(a_it["out_sample"], np.float64).ravel(), np.asarray(b_it["out_sample"], np.float64).ravel()
        rel.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)))
        cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
    return {"polygraphy_passed": bool(accuracy), "rtol": rtol, "atol": atol, "error_stat": "median",
            "rel_l2_per_step": rel, "cosine_per_step": cos, "rel_l2_median": float(np.median(rel))}


def feeds_for(spec_inputs, inputs: dict[str, torch.Tensor], timesteps: list[float]) -> list[dict[str, np.ndarray]]:
    """One feed dict per time step, in the dtypes of ``spec_inputs``."""
    dtypes = {t.name: np.dtype(t.dtype) for t in spec_inputs}
    batch = inputs["sample"].shape[0]
    feeds = []
    for t in timesteps:
        feed = {k: v.numpy().astype(dtypes[k]) for k, v in inputs.items()}
        feed["timestep"] = np.full((batch,), t, dtypes["timestep"])
        feeds.append(feed)
    return feeds


def measure_accuracy(engine_dir: Path, reference_dir: Path, batch: int, points: int, cond_file: str | None,
                     rtol: float, atol: float) -> dict:
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from dqdeploy.runtimes.spec import ENGINE_FILE, ONNX_FILE, read_spec

    spec, ref_spec = read_spec(engine_dir), read_spec(reference_dir)
    inputs = example_inputs(spec, batch, seed=1, cond_file=cond_file)
    steps = spec.timesteps or [999.0, 500.0, 1.0]
    picks = [steps[i] for i in np.linspace(0, len(steps) - 1, min(points, len(steps))).round().astype(int)]
    trt_runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_dir / ENGINE_FILE))), name="tensorrt")
    ort_runner = OnnxrtRunner(SessionFromOnnx(str(reference_dir / ONNX_FILE), providers=["CPUExecutionProvider"]),
                              name="onnxruntime-fp32")
    result = comparator_accuracy(trt_runner, feeds_for(spec.inputs, inputs, picks),
                                 ort_runner, feeds_for(ref_spec.inputs, inputs, picks), rtol=rtol, atol=atol)
    return {"timesteps": picks, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers folder (default: a bench UNet2DModel made in code)")
    ap.add_argument("--cond", help="conditional models: embeddings .safetensors (as for dqdeploy quantize)")
    ap.add_argument("--work", type=Path, help="folder for models, artifacts, exports (reused when present)")
    ap.add_argument("--size", type=int, default=64, help="bench UNet sample size (latent 64x64 as SD 1.5 at 512 px)")
    ap.add_argument("--batch", type=int, default=8, help="UNet batch rows (classifier-free guidance doubles images)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10, help="calibrated sampling steps")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--trajectories", type=int, default=8)
    ap.add_argument("--distill", action="store_true", help="run block-wise distillation (default: calibration only; "
                                                            "latency does not depend on it)")
    ap.add_argument("--points", type=int, default=4, help="time steps compared for accuracy")
    ap.add_argument("--rtol", type=float, default=0.05, help="Polygraphy median relative-error threshold")
    ap.add_argument("--atol", type=float, default=0.05, help="Polygraphy median absolute-error threshold")
    args = ap.parse_args()

    from dqdeploy.runtimes.engine_spec import read_engine_info
    from dqdeploy.system.trt_gate import require_tensorrt

    trt = require_tensorrt("the TensorRT latency benchmark")
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="dqdeploy-trt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folders = make_folders(args, work)
    engines = {}
    for name, f in folders.items():
        print(f"measuring {name}", flush=True)
        engines[name] = {
            "engine": str(f["engine"]),
            "latency": measure_latency(f["engine"], args.batch, args.iters, args.warmup, args.cond),
            "accuracy_vs_onnxruntime_fp32": measure_accuracy(f["engine"], f["reference"], args.batch, args.points,
                                                             args.cond, args.rtol, args.atol),
            "build": {k: read_engine_info(f["engine"]).get(k)
                      for k in ("build_seconds", "precision", "target", "batch")},
        }
    med = {n: e["latency"]["engine_ms"]["median"] for n, e in engines.items()}
    result = {
        "command": "python bench/trt_latency.py " + " ".join(sys.argv[1:]),
        "machine": {"gpu": torch.cuda.get_device_name(), "tensorrt": trt.__version__, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "python": platform.python_version()},
        "model": args.model or (f"bench UNet2DModel (128,256,256), 4ch, {args.size}x{args.size}, "
                                "attention at the lowest level"),
        "batch": args.batch,
        "iters": args.iters,
        "engines": engines,
        "speedup_vs_fp16": {n: med["fp16"] / m for n, m in med.items()},
        "per_step_vs_constant": med["int8-per-step"] / med["int8-constant"],
        "work": str(work),
    }
    from bench.common import write_results  # stamps commit, code hash, date and the host CPU next to the GPU

    path = write_results("trt_latency", result)
    print(json.dumps({"median_engine_ms": med, "speedup_vs_fp16": result["speedup_vs_fp16"]}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    from dqdeploy.core.errors import DQDeployError

    try:
        main()
    except DQDeployError as exc:
        sys.exit(f"error: {exc}")
