"""A diffusion transformer at a real width on ONNX Runtime CPU: int8 against FP32, and where the time goes.

Model: PixArt-Sigma's transformer width (``PixArtTransformer2DModel``: 16 heads x 72 = hidden 1152, T5-XXL
captions of 4096 channels, 120 text tokens, learned sigma), ``--blocks`` of its 28 blocks (the per-block cost
is what matters; all 28 would not leave the machine time for the rest), random weights, a 64x64 latent with
patch 2: 1024 image tokens. Quantized with the README's W8A8 recipe at the smallest calibration budget (PTQ:
no distillation, no fallback -- speed does not depend on the scales' quality), exported as

  fp32            ``--target float`` of the artifact (its dequantized weights, no Q/DQ)
  int8 vnni       ``--target ort --cpu vnni``      (exact on CPUs with VNNI)
  int8 portable   ``--target ort --cpu portable``  (exact on every CPU)
  ... + int8 attention   the same from an artifact quantized with ``--attention int8`` (both batched matmuls of
                  every attention on integer kernels, ``MatMulIntegerToFloat``, instead of the float
                  ``MultiHeadAttention``)

Latency: one forward at batch 2 (one CFG pair), one thread, interleaved rounds, medians; on a CPU without
VNNI the vnni row is not run (it would not be exact there). Profile: ONNX Runtime's own profiler on one
more call of each graph, kernel time summed per op type, as a share of the call (the float graph's attention
is plain MatMul + Softmax: ONNX Runtime's CPU session does not fuse it, while the ort layout carries
``com.microsoft.MultiHeadAttention``, ``exporters/ort_attention.py``). Every row holds only for this CPU
(``machine.int8_class``).

Usage: python bench/transformer_width.py [--blocks 4] [--tokens 1024] [--repeats 5]
Writes bench/results/transformer_width.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_ms, write_results  # noqa: E402  (first: one thread before torch)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

TEXT_TOKENS, CAPTION_CHANNELS = 120, 4096
ATTENTION = ("float", "int8")  # quantize --attention: both artifacts of the same model and calibration


def pixart_sigma_width(blocks: int, sample_size: int) -> dict:
    """PixArt-Sigma's transformer config with ``blocks`` blocks and a ``sample_size`` latent."""
    return dict(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=8, num_layers=blocks,
                attention_head_dim=72, num_attention_heads=16, cross_attention_dim=1152,
                caption_channels=CAPTION_CHANNELS, norm_type="ada_norm_single", use_additional_conditions=False,
                norm_elementwise_affine=False, norm_eps=1e-6, dropout=0.0, attention_bias=True)


def write_folder(config: dict, path: Path) -> Path:
    """A PixArt pipeline folder (transformer/, scheduler/) with random weights and its ``--cond`` file."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    PixArtTransformer2DModel(**config).eval().save_pretrained(str(path / "transformer"))
    DPMSolverMultistepScheduler(num_train_timesteps=1000).save_pretrained(str(path / "scheduler"))
    index = {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index))
    g = torch.Generator().manual_seed(0)
    cond = path.parent / "cond.safetensors"
    save_file({"encoder_hidden_states": torch.randn(2, TEXT_TOKENS, CAPTION_CHANNELS, generator=g),
               "uncond_encoder_hidden_states": torch.randn(1, TEXT_TOKENS, CAPTION_CHANNELS, generator=g)}, str(cond))
    return cond


def feeds(session, sample_size: int) -> dict[str, np.ndarray]:
    """Batch-2 inputs for the graph's own input names (a noisy latent, a middle time step, captions)."""
    rng = np.random.default_rng(0)
    shapes = {"hidden_states": (2, 4, sample_size, sample_size),
              "encoder_hidden_states": (2, TEXT_TOKENS, CAPTION_CHANNELS), "timestep": (2,)}
    out = {}
    for i in session.get_inputs():
        dtype = np.int64 if "int64" in i.type else np.float32
        value = np.full(shapes[i.name], 500) if i.name == "timestep" else rng.standard_normal(shapes[i.name])
        out[i.name] = value.astype(dtype)
    return out


def profile(path: Path, feed: dict[str, np.ndarray], work: Path) -> dict[str, dict[str, float]]:
    """Kernel milliseconds per op type of one call and their share of the call's kernel time (ORT's profiler,
    after one warm-up call)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.enable_profiling, opts.profile_file_prefix = True, str(work / f"profile-{path.parent.parent.name}")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    calls = [e for e in events if e.get("cat") == "Model" and e.get("name") == "model_run"]
    last_start = calls[-1]["ts"] if calls else 0
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
            per_op[e["args"]["op_name"]] += e["dur"] / 1000.0
    total = sum(per_op.values())
    return {op: {"ms": ms, "share": ms / total} for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024, choices=(256, 1024, 4096), help="image tokens")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from bench.common import machine, ort_session
    from dqdeploy import W8A8, CalibrationConfig, export, quantize

    sample_size = 2 * int(args.tokens ** 0.5)
    work = Path(tempfile.mkdtemp(prefix="dqdeploy-width-"))
    cond = write_folder(pixart_sigma_width(args.blocks, sample_size), work / "model")
    calib = CalibrationConfig(steps=4, samples=8, trajectories=2, batch_size=2, guidance=4.5)
    ptq = W8A8.replace(distill="none", fallback="none")
    for attention in ATTENTION:
        quantize(work / "model", ptq.replace(attention=attention), calib, work / f"q-{attention}", cond_file=cond)
    export(work / "q-float", work / "fp32", target="float")  # the artifact's text length (the FP folder's is 8)
    graphs = {"fp32": work / "fp32/transformer/model.onnx"}
    formats = ["portable"] if machine()["int8_class"] == "avx2" else ["vnni", "portable"]
    for fmt in formats:
        for attention in ATTENTION:
            name = f"int8 {fmt}" + (" + int8 attention" if attention == "int8" else "")
            export(work / f"q-{attention}", work / name, target="ort", cpu=fmt)
            graphs[name] = work / name / "transformer/model.onnx"
    sessions = {name: ort_session(path) for name, path in graphs.items()}
    feed = feeds(sessions["fp32"], sample_size)
    times = interleaved_ms({name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}, args.repeats)
    fp = float(np.median(times["fp32"]))
    rows = {name: {"median_ms": float(np.median(t)), "ms": t, "speedup": fp / float(np.median(t))}
            for name, t in times.items()}
    profiles = {name: profile(path, feed, work) for name, path in graphs.items()}
    entry = {"command": "python bench/transformer_width.py " + " ".join(sys.argv[1:]),
             "model": {"class": "PixArtTransformer2DModel", "hidden": 1152, "heads": 16, "blocks": args.blocks,
                       "image_tokens": args.tokens, "text_tokens": TEXT_TOKENS, "batch": 2,
                       "parameters": sum(p.numel() for p in _params(work / "model"))},
             "rows": rows, "profile_ms": profiles}
    path = write_results("transformer_width", entry)
    for name, row in rows.items():
        top = ", ".join(f"{op} {p['share']:.0%}" for op, p in list(profiles[name].items())[:6])
        print(f"{name:>32}: {row['median_ms']:8.1f} ms  {row['speedup']:.2f}x FP32   [{top}]")
    print(f"wrote {path}")


def _params(folder: Path):
    from dqdeploy.io.tensorfile import read_tensors

    return read_tensors(folder / "transformer" / "diffusion_pytorch_model.safetensors").values()


if __name__ == "__main__":
    main()
