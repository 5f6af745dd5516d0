"""The deployed int8 graphs on a CPU without VNNI, emulated: ``make demo``'s path for each recipe, with the graphs
checked and sampled under ``qemu-x86_64 -cpu Haswell`` (AVX2 + FMA, no AVX-512, no VNNI: ONNX Runtime's u8s8
kernel there is the saturating ``vpmaddubsw``) beside the same runs on this machine.

  python bench/cpu_emulation.py [--recipes w8a8,w4a8] [--n 1000] [--cpu-model Haswell] [--steps-checked 50] \
[--label KEY]

Per recipe: quantize the shipped digits model as ``make demo`` does (cached under ``$TMPDIR/dqdeploy-cpu-emulation``),
export ``--target ort --cpu portable`` (what ``--cpu auto`` picks on such a CPU), ``--cpu vnni`` and ``--target onnx``
on this machine; then ``dqdeploy check`` of each graph under the emulator (the vnni graph once as the guard
leaves it -- refused -- and once with ``--inexact allow``, the graph users got before the guard) and natively, and
the digits-FID of ``--n`` samples (DDIM 50, noise seed 0) of the portable graph emulated and native and of the
simulation. The emulator runs the integer kernels of the emulated CPU; its times are not a CPU's and are not
reported as latency. Results: ``bench/results/cpu_emulation.json`` (written after every step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import write_results  # noqa: E402

MODEL = ROOT / "dqdeploy" / "assets" / "digits-ddpm"
DEMO = ["--scheduler", "ddim", "--calib-samples", "512", "--iters", "100", "--layout", "ort"]  # the Makefile's demo
# check's exit codes: agreement, out of tolerance, a user error (the guard)
VERDICTS = {0: "PASS", 1: "FAIL", 2: "REFUSED"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def dq(args: list[str], emulate: str | None = None, timeout: int = 7200) -> tuple[int, str, float]:
    """Run ``python -m dqdeploy ARGS`` (under qemu-user emulating ``emulate``): exit code, output, seconds."""
    cmd = [sys.executable, "-m", "dqdeploy", *args]
    if emulate:
        cmd = [shutil.which("qemu-x86_64") or "qemu-x86_64", "-cpu", emulate, *cmd]
    start = time.perf_counter()
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    text = "\n".join(line for line in (run.stdout + run.stderr).splitlines() if "TCG doesn't support" not in line)
    return run.returncode, text, round(time.perf_counter() - start, 1)


def check_row(code: int, text: str, seconds: float) -> dict:
    worst = re.search(r"worst: t=([\d.]+), rel err ([\d.e+-]+) = [\d.]+x ([\d.e+-]+)", text)
    passed = re.search(r"(\d+) of (\d+) calibrated time steps checked", text)
    out = re.search(r"(\d+) of \d+ time steps out of tolerance", text)
    return {"exit": code, "verdict": VERDICTS.get(code, f"exit {code}"),
            "steps_checked": passed.group(0) if passed else None,
            "steps_out_of_tolerance": int(out.group(1)) if out else (0 if passed else None),
            "worst_fail": None if worst is None else {"t": float(worst.group(1)), "rel_err": float(worst.group(2)),
                                                      "tolerance": float(worst.group(3))},
            "message": text.strip().splitlines()[-1][:300] if text.strip() else "", "seconds": seconds}


def fid_row(code: int, text: str, seconds: float) -> dict:
    found = re.search(r'"digits_fid": ([\d.]+)', text)
    return {"exit": code, "digits_fid": float(found.group(1)) if found else None, "seconds": seconds,
            "message": "" if found else text.strip()[-300:]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="w8a8,w4a8")
    ap.add_argument("--n", type=int, default=1000, help="samples per digits-FID")
    ap.add_argument("--cpu-model", default="Haswell", help="qemu -cpu model without VNNI")
    ap.add_argument("--steps-checked", type=int, default=50)
    ap.add_argument("--label", help="key in cpu_emulation.json (default: CPU-MODEL-emulated)")
    ap.add_argument("--fid", choices=["all", "native", "none"], default="all",
                    help="which digits-FIDs to sample (the emulated one takes about two hours per recipe)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dqdeploy-cpu-emulation")
    args = ap.parse_args(argv)
    if shutil.which("qemu-x86_64") is None:
        sys.exit("needs qemu-user: apt-get install qemu-user")
    probe = subprocess.run([shutil.which("qemu-x86_64") or "", "-cpu", args.cpu_model, sys.executable, "-c",
                            "import json; from dqdeploy.system.cpu import cpu_info; "
                            "print(json.dumps(cpu_info().as_dict()))"],
                           env=ENV, capture_output=True, text=True, cwd=ROOT)
    entry: dict = {"command": "python bench/cpu_emulation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "emulated_cpu": json.loads(probe.stdout.strip().splitlines()[-1]), "n": args.n, "recipes": {}}
    label = args.label or f"{args.cpu_model.lower()}-emulated"

    def save() -> None:
        write_results("cpu_emulation", entry, label=label)

    sample = ["--n", str(args.n), "--steps", "50", "--scheduler", "ddim", "--seed", "0"]
    for recipe in args.recipes.split(","):
        work = args.work / recipe
        q, rows = work / "q", entry["recipes"].setdefault(recipe, {})
        if not (q / "manifest.json").is_file():
            work.mkdir(parents=True, exist_ok=True)
            code, text, sec = dq(["quantize", str(MODEL), "--recipe", recipe, "--out", str(q), *DEMO])
            assert code == 0, text[-2000:]
            rows["quantize_s"] = sec
        graphs = {"ort-portable": ["--target", "ort", "--cpu", "portable"],
                  "ort-vnni": ["--target", "ort", "--cpu", "vnni"], "onnx": ["--target", "onnx"]}
        for name, flags in graphs.items():
            if not (work / name / "dqdeploy_export.json").is_file():
                code, text, _ = dq(["export", str(q), "--out", str(work / name), *flags])
                assert code == 0, text[-2000:]
        checks = {"ort-portable": [], "onnx": [], "ort-vnni": [], "ort-vnni --inexact allow": ["--inexact", "allow"]}
        for check, extra in checks.items():
            graph = work / check.split()[0]
            for where, emulate in (("emulated", args.cpu_model), ("native", None)):
                if where == "native" and extra:
                    continue
                rows[f"check {check} ({where})"] = check_row(*dq(["check", str(q), str(graph),
                                                                  "--steps", str(args.steps_checked), *extra], emulate))
                save()
        if args.fid != "none":
            rows["fid simulation (native)"] = fid_row(*dq(["eval", str(q), *sample]))
            rows["fid ort-portable (native)"] = fid_row(*dq(["eval", str(work / "ort-portable"), *sample]))
            save()
        if args.fid == "all":
            rows["fid ort-portable (emulated)"] = fid_row(*dq(["eval", str(work / "ort-portable"), *sample],
                                                              args.cpu_model))
            save()
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
