"""ONNX Runtime CPU latency of the zoo's digits diffusion transformer (``bench/zoo.py`` member ``dit``,
an SD3Transformer2DModel): one forward at batch 2 (one CFG pair), one thread, side by side:

  fp32          ``dqdeploy export Q --target float``: the same transformer as an FP32 graph without Q/DQ
                (an export of the FP folder fixes the text length at its example's 8 tokens, the
                artifact's at the 2 of the class prompts)
  int8 (ort)    ``dqdeploy export Q --target ort``
both of the zoo benchmark's W8A8 artifact Q (``bench/zoo_quality.py``: the README's plain ``dqdeploy quantize``, \
cached).

Interleaved rounds, medians. The inputs are real ones: a noisy latent and the class prompts of the
member's ``--cond`` file (digit 3 and the null prompt), at the middle time step.
Usage: python bench/dit_latency.py [--repeats N] [--recipe w8a8]; writes bench/results/latency_dit.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_ms, ort_session, write_results  # noqa: E402  (first: one thread before torch)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import zoo  # noqa: E402
from bench import zoo_quality as zq  # noqa: E402

MODEL = "dit"


def feed(batch: int) -> dict[str, np.ndarray]:
    """One CFG pair per two rows: [null prompt, digit 3] repeated, noisy latent, timestep 500."""
    from dqdeploy.quant.trajectories import load_conditioning

    cond = load_conditioning(zoo.get(MODEL).cond_file())
    rows = [cond.unconditional(), cond.for_batch(3, 1)] * (batch // 2) or [cond.for_batch(3, 1)]
    out = {k: torch.cat([r[k] for r in rows]).numpy() for k in rows[0]}
    noise = torch.randn(len(rows), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return out | {"hidden_states": noise.numpy(), "timestep": np.full((len(rows),), 500.0, np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--recipe", default="w8a8")
    args = ap.parse_args()
    graphs = {"fp32": zq.exported(MODEL, args.recipe, "default", "float"),
              f"{args.recipe} ort": zq.exported(MODEL, args.recipe, "default", "ort")}
    sessions = {name: ort_session(path / "transformer" / "model.onnx") for name, path in graphs.items()}
    inputs = feed(args.batch)
    times = interleaved_ms({n: lambda s=s: s.run(None, inputs) for n, s in sessions.items()}, args.repeats)
    med = {n: float(np.median(v)) for n, v in times.items()}
    result = {
        "command": "python bench/dit_latency.py " + " ".join(sys.argv[1:]),
        "model": f"zoo member {MODEL}: {zoo.get(MODEL).description}",
        "batch": args.batch,
        "repeats": args.repeats,
        "median_ms": med,
        "speedup_vs_fp32": {n: med["fp32"] / med[n] for n in med},
        "samples_ms": times,
    }
    path = write_results("latency_dit", result)
    for n, ms in med.items():
        print(f"{n:12s} {ms:8.2f} ms  {med['fp32'] / ms:5.2f}x vs fp32")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
