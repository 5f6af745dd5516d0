"""LoRA on a quantized artifact, measured on generated images: the shipped digits model with a LoRA trained to draw
the digits 0-4 only (``scripts/train_digits_lora.py``, cached outside git), against the float model with the same
LoRA merged into its weights.

Rows (DDIM 50, ``--n`` samples, the same noise for every row):

  fp                 the float model
  fp + lora          the float model with the LoRA merged (the reference of every LoRA row)
  RECIPE             the quantized artifact (the README's plain ``dqdeploy quantize``), no LoRA
  RECIPE branch      ``load_quantized(Q, lora=...)``: the LoRA as a float branch beside the quantized layers
  RECIPE fold        ``dqdeploy lora Q FILE --out Q2``: folded, the touched layers' weight step sizes searched again
  RECIPE fold, ort   Q2 exported with ``--target ort`` and run on ONNX Runtime
  RECIPE again       the float model with the LoRA merged, quantized from scratch (what the LoRA saves)
  RECIPE slots, ort  Q exported once with ``--lora-slots FILE`` (the branch in the graph), the adapter fed at run time
                     (``load_runtime(E, lora=...)``); also the seconds ``set_lora`` takes to swap it in
  fp + lora, seed S  the reference again with the noise of each further ``--seeds`` entry: how far the FID moves with
                     the noise alone (read the ratios against it)

Each row: digits-FID (against all real digits: a 0-4 model scores worse than the base model, so compare LoRA rows
with ``fp + lora``), its ratio to ``fp + lora``, and the share of samples the digits classifier reads as 0-4 (what the
LoRA teaches). Also the seconds ``dqdeploy lora`` takes to fold. Usage: python bench/lora_quality.py [--n 1000]
[--recipes w8a8,w4a8] [--seeds 0,1] (the first seed's noise for every row); writes bench/results/lora_quality.json
after every row (``complete``: false until the last).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_results  # noqa: E402  (first: one thread before torch)

# isort: split
import torch  # noqa: E402

from bench import zoo  # noqa: E402
from dqdeploy import CalibrationConfig, export, quantize  # noqa: E402
from dqdeploy.core.recipe import PRESETS  # noqa: E402
from dqdeploy.eval.digits import digits_model_dir  # noqa: E402
from dqdeploy.eval.fid import class_histogram, digits_fid  # noqa: E402
from dqdeploy.io.lora import apply_lora, read_lora  # noqa: E402
from dqdeploy.io.models import load_model  # noqa: E402
from dqdeploy.stages.generate import generate, generate_from  # noqa: E402
from dqdeploy.stages.lora import fold_lora_artifact  # noqa: E402
from dqdeploy.stages.sources import open_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = dict(steps=50, scheduler="ddim", batch_size=250)


def lora_file() -> Path:
    """The 0-4 LoRA of the shipped model, trained (about a minute) if it is not cached."""
    path = zoo.zoo_root() / "lora" / "digits-0to4.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "train_digits_lora.py"), "--out", str(path)],
                       check=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return path


def row(images: torch.Tensor) -> dict:
    counts = class_histogram(images)["counts"]
    return {"digits_fid": digits_fid(images), "share_0_to_4": sum(counts[:5]) / sum(counts), "counts": counts}


def merged_fp(lora: Path, work: Path) -> Path:
    """The float pipeline folder with the LoRA merged into its weights."""
    loaded = load_model(digits_model_dir())
    with torch.no_grad():
        for name, layer in read_lora(lora, loaded.denoiser).layers.items():
            loaded.denoiser.get_submodule(name).weight += layer.delta()
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=loaded.denoiser, scheduler=DDPMScheduler.from_config(loaded.scheduler_config)).save_pretrained(
        str(work / "fp-lora"), safe_serialization=True)
    return work / "fp-lora"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--recipes", default="w8a8,w4a8")
    ap.add_argument("--seeds", default="0", help="noise seeds: the first for every row, the others for fp + lora")
    args = ap.parse_args()
    seed, *more_seeds = (int(s) for s in args.seeds.split(","))
    sampling = {**SAMPLING, "seed": seed}
    lora, work = lora_file(), Path(tempfile.mkdtemp(prefix="dqdeploy-lora-"))
    fp_lora = merged_fp(lora, work)
    entry = {"command": "python bench/lora_quality.py " + " ".join(sys.argv[1:]), "n": args.n, "seed": seed,
             "lora": {"file": lora.name, "layers": len(read_lora(lora, load_model(digits_model_dir()).denoiser).layers),
                      "what": "rank-4 LoRA of the attention projections, trained on the digits 0-4"},
             "rows": {}, "fold_seconds": {}, "swap_seconds": {}, "complete": False}

    def add(name: str, images: torch.Tensor) -> None:
        """One row, written at once (a run stopped early keeps its rows, marked incomplete)."""
        rows = entry["rows"]
        rows[name] = row(images)
        ref = rows.get("fp + lora", {}).get("digits_fid")
        for r in rows.values():
            r["vs_fp_lora"] = None if ref is None else r["digits_fid"] / ref
        write_results("lora_quality", entry)
        print(f"{name:>18}: digits-FID {rows[name]['digits_fid']:7.2f}  0-4 {rows[name]['share_0_to_4']:.1%}",
              flush=True)

    add("fp + lora", generate(fp_lora, n=args.n, **sampling))
    add("fp", generate(digits_model_dir(), n=args.n, **sampling))
    for other in more_seeds:
        add(f"fp + lora, seed {other}", generate(fp_lora, n=args.n, **{**SAMPLING, "seed": other}))
    calibration = CalibrationConfig(scheduler="ddim", steps=50, samples=512)
    for recipe in args.recipes.split(","):  # cheapest rows first; quantizing from scratch again last
        q = quantize(digits_model_dir(), PRESETS[recipe], calibration, work / f"q-{recipe}").path
        add(recipe, generate(q, n=args.n, **sampling))
        with open_model(q) as opened:
            branches = apply_lora(opened.denoiser, lora)
            images = generate_from(opened, n=args.n, **sampling)
            branches.remove()
        add(f"{recipe} branch", images)
        export(q, work / f"e-{recipe}-slots", target="ort", lora_slots=lora)
        with open_model(work / f"e-{recipe}-slots") as opened:
            swaps = []
            for adapter in (None, lora) * 3:
                start = time.perf_counter()
                opened.denoiser.set_lora(adapter)
                swaps.append(time.perf_counter() - start)
            entry["swap_seconds"][recipe] = sorted(swaps)[len(swaps) // 2]
            images = generate_from(opened, n=args.n, **sampling)
        add(f"{recipe} slots, ort", images)
        start = time.perf_counter()
        fold_lora_artifact(q, lora, work / f"q-{recipe}-lora")
        entry["fold_seconds"][recipe] = time.perf_counter() - start
        add(f"{recipe} fold", generate(work / f"q-{recipe}-lora", n=args.n, **sampling))
        export(work / f"q-{recipe}-lora", work / f"e-{recipe}-lora", target="ort")
        add(f"{recipe} fold, ort", generate(work / f"e-{recipe}-lora", n=args.n, **sampling))
        again = quantize(fp_lora, PRESETS[recipe], calibration, work / f"q-{recipe}-again").path
        add(f"{recipe} again", generate(again, n=args.n, **sampling))
    entry["complete"] = True
    print(f"wrote {write_results('lora_quality', entry)}")


if __name__ == "__main__":
    main()
