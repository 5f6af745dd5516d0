"""Render BENCHMARKS.md from the JSON files in bench/results (run after any benchmark).

Every stored result is judged by its provenance (``bench/provenance.py``; ``bench/common.py`` writes it):
a result without its commit or its CPU (model, int8 flags) is refused -- not rendered, listed at the end
under "Not shown" and warned about on stderr; one measured on other code than this tree's dqdeploy/
(another code hash, or none recorded) is rendered and marked stale. The summary at the top quotes each
section's headline figure with its command and CPU, from rendered results only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
from bench import zoo  # noqa: E402
from bench.provenance import code_hash, verdict  # noqa: E402


class Ledger:
    """Judges results against the code hash of this tree: refused ones are kept aside, stale ones marked."""

    def __init__(self, current_hash: str) -> None:
        self.current = current_hash
        self.refused: list[tuple[str, str, str]] = []  # (where, command, why)

    def ok(self, entry: dict, where: str) -> bool:
        """Whether ``entry`` may be rendered as a measurement (else it is recorded as refused)."""
        state, why = verdict(entry, self.current)
        if state == "refused":
            self.refused.append((where, str(entry.get("command", "?")), why))
            print(f"report: not rendering {where}: {why} (no provenance)", file=sys.stderr)
            return False
        return True

    def stale(self, entry: dict) -> bool:
        return verdict(entry, self.current)[0] == "stale"


LEDGER = Ledger("")


def _load(name: str) -> dict | None:
    """A one-result file, if present and rendered."""
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else None
    return data if data is not None and LEDGER.ok(data, path.name) else None


def _load_keyed(name: str) -> dict | None:
    """A file of one result per label: the labels whose result is rendered."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    kept = {label: e for label, e in json.loads(path.read_text()).items() if LEDGER.ok(e, f"{path.name} [{label}]")}
    return kept or None


def _glob(pattern: str) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(RESULTS.glob(pattern)):
        data = json.loads(path.read_text())
        if LEDGER.ok(data, path.name):
            out.append((path, data))
    return out


def merged_quality() -> dict | None:
    """All ``quality*.json`` runs (parallel runs split the recipes) as one table, FP row first."""
    runs = [q for _, q in _glob("quality*.json")]
    if not runs:
        return None
    rows = [r for run in runs for r in run["rows"]]
    rows.sort(key=lambda r: r["model"] != "fp32")
    return runs[0] | {"rows": rows, "command": " ; ".join(run["command"] for run in runs), "runs": runs}


def quality_section(q: dict, title: str = "Image quality: digits-FID") -> list[str]:
    fp = next(r["digits_fid"] for r in q["rows"] if r["model"] == "fp32")
    out = [f"## {title}", "",
           f"`{q['command']}` — {q['n']} samples, DDIM {q['steps']} steps, seed {q['seed']}, "
           "the same noise for every row; one calibration set shared by all quantized rows. "
           "Lower is better; `vs FP` is the ratio to the FP32 FID.", "",
           "| model | runs on | digits-FID | vs FP | quantize time (s) |", "|---|---|---:|---:|---:|"]
    for r in q["rows"]:
        qt = f"{r['quantize_s']:.0f}" if "quantize_s" in r else ""
        out.append(f"| {r['model']} | {r['runtime']} | {r['digits_fid']:.3f} | {r['digits_fid'] / fp:.2f}x | {qt} |")
    return out + [""]


def _ci(lo: float | None, hi: float | None, fmt: str = "{:.2f}") -> str:
    return f" [{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None and hi is not None else ""


def zoo_rows(z: dict) -> dict:
    """``z`` with only the rows, and runs, that carry their provenance (each row is stamped on its own)."""
    refused = {k: verdict(r, LEDGER.current)[1] for k, r in z["rows"].items()
               if verdict(r, LEDGER.current)[0] == "refused"}
    if refused:
        runs = "; ".join(dict.fromkeys(r["command"] for r in z["runs"] if verdict(r, "")[0] == "refused"))
        LEDGER.refused.append((f"zoo_quality.json ({len(refused)} of {len(z['rows'])} rows)", runs,
                               "; ".join(sorted(set(refused.values())))))
        print(f"report: not rendering {len(refused)} zoo_quality.json rows: no provenance", file=sys.stderr)
    return z | {"rows": {k: r for k, r in z["rows"].items() if k not in refused},
                "runs": [r for r in z["runs"] if verdict(r, "")[0] != "refused"]}


def _load_zoo() -> dict | None:
    """zoo_quality.json with the rows that carry their provenance (its rows are stamped one by one)."""
    path = RESULTS / "zoo_quality.json"
    if not path.is_file():
        return None
    z = zoo_rows(json.loads(path.read_text()))
    return z if z["rows"] else None


def zoo_quality_section(z: dict) -> list[str]:
    """The zoo-wide table (bench/zoo_quality.py): per model, every row; then the worst case per recipe."""
    rows = list(z["rows"].values())
    if not rows:
        return []
    commands = "; ".join(dict.fromkeys(f"`{r['command']}`" for r in z["runs"]))
    n = sorted({r["n"] for r in rows})
    samplers = sorted({f"{r['model']}: its own flow-matching Euler, {r['steps']} steps" for r in rows
                       if r.get("sampler", "ddim") != "ddim"})
    out = ["## Zoo-wide image quality: digits-FID on every zoo model", "",
           f"{commands} — {'/'.join(map(str, n))} samples per row, DDIM {z['steps']} steps"
           + "".join(f" ({s})" for s in samplers) + ", one noise seed per row "
           "(the same noise for every model and recipe). "
           "Models: `bench/zoo.py` (trained by `python scripts/train_zoo.py`). "
           "`vs FP` is the ratio to the FP row of the same model and seed; `[..]` is its paired 95% bootstrap "
           "interval over samples (the FID difference on the same resampled indices, mapped to a ratio; "
           "the seed-to-seed noise below is the other yardstick). `vs sim`: exported graph on ONNX "
           "Runtime vs its own simulation. `step err`: mean relative error of the denoiser output vs FP along FP "
           "trajectories (16 trajectories, every sampling step) / worst step.", ""]
    order = {"fp32": 0, "w8a8": 1, "w4a8": 2, "w4a4": 3}
    fl = {"sim": 0, "onnx": 1, "ort": 2}
    rows.sort(key=lambda r: (r["model"], order.get(r["recipe"], 9), r["variant"], fl[r["flavour"]], r["seed"]))
    out += ["| model | recipe | variant | runs | seed | digits-FID | vs FP | vs sim "
            "| step err (mean / worst) | class acc |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs_fp = ("" if r.get("vs_fp") is None
                 else f"{r['vs_fp']:.3f}x" + _ci(r.get("fp_ratio_lo"), r.get("fp_ratio_hi"), "{:.3f}"))
        vs_sim = ("" if r.get("vs_sim") is None
                  else f"{r['vs_sim']:.3f}x" + _ci(r.get("sim_ratio_lo"), r.get("sim_ratio_hi"), "{:.3f}"))
        se = r.get("step_error")
        step = f"{se['mean_rel_err']:.4f} / {se['worst_rel_err']:.4f}" if se else ""
        acc = f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else ""
        runs = {"sim": "simulation" if r["recipe"] != "fp32" else "torch", "onnx": "onnx graph, ORT",
                "ort": "ort graph, ORT"}[r["flavour"]]
        model = r["model"] + (" (held-out)" if _group(r["model"]) == "held-out" else "") \
            + (f" (stale: {r['commit']})" if LEDGER.stale(r) else "")
        out.append(f"| {model} | {r['recipe']} | {r['variant']} | {runs} | {r['seed']} | "
                   f"{r['digits_fid']:.2f} | {vs_fp} | {vs_sim} | {step} | {acc} |")
    out += _guidance_one_table(rows)
    out += ["", "**Noise** (FP vs FP with another noise seed, same model):", ""]
    for model in sorted({r["model"] for r in rows}):
        fps = sorted((r for r in rows if r["model"] == model and r["recipe"] == "fp32"), key=lambda r: r["seed"])
        if len(fps) >= 2:
            out.append(f"* {model}: seed {fps[0]['seed']} {fps[0]['digits_fid']:.2f}, seed {fps[1]['seed']} "
                       f"{fps[1]['digits_fid']:.2f} (ratio {fps[1]['digits_fid'] / fps[0]['digits_fid']:.3f})")
    out += ["", "**Worst case over the zoo**, per group (seed 0; models measured / models in the group). "
            "*tuning*: the members defaults were chosen on; *held-out*: members trained by another script "
            "(`scripts/train_digits_alt.py`), only ever evaluated with the defaults:", "",
            "| group | recipe | variant | runs | worst vs FP | on model | worst vs sim | on model | models |",
            "|---|---|---|---|---:|---|---:|---|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["recipe"] != "fp32" and r["seed"] == 0 and r.get("vs_fp") is not None:
            groups.setdefault((_group(r["model"]), r["recipe"], r["variant"], r["flavour"]), []).append(r)
    if not groups:
        return out[:-5] + ["", "**Worst case over the zoo**: no quantized row measured yet.", ""]
    for (group, recipe, variant, flavour), members in sorted(
            groups.items(), key=lambda kv: (kv[0][0] != "tuning", order.get(kv[0][1], 9), kv[0][2], fl[kv[0][3]])):
        worst = max(members, key=lambda r: r["vs_fp"])
        vs_sim = [r for r in members if r.get("vs_sim") is not None]
        far = max(vs_sim, key=lambda r: abs(r["vs_sim"] - 1)) if vs_sim else None
        sim_cells = (f"{far['vs_sim']:.3f}x{_ci(far.get('sim_ratio_lo'), far.get('sim_ratio_hi'), '{:.3f}')}"
                     f" | {far['model']}" if far else " | ")
        out.append(f"| {group} | {recipe} | {variant} | {flavour} | "
                   f"{worst['vs_fp']:.3f}x{_ci(worst.get('fp_ratio_lo'), worst.get('fp_ratio_hi'), '{:.3f}')} "
                   f"| {worst['model']} | {sim_cells} | {len(members)}/{len(zoo.names(group))} |")
    cpus = sorted({f"{r['machine']['cpu']} ({r['machine']['int8_class']})" for r in rows})
    return out + ["", f"Rows measured on: {', '.join(cpus)}; "
                      f"commits {', '.join(sorted({r['commit'] for r in rows}))}.", ""] + \
        _ablation_table(z["rows"], order)


def _group(model: str) -> str:
    """The zoo group of a member (``tuning`` for a name the registry no longer has)."""
    return zoo.ZOO[model].group if model in zoo.ZOO else "tuning"


def _ablation_table(rows: dict, order: dict[str, int]) -> list[str]:
    """Each ablation's row next to the default recipe's on the same model, noise and runtime."""
    def key(r: dict) -> tuple:
        return r["model"], r["recipe"], r["flavour"], r["seed"]

    defaults = {key(r): r for r in rows.values() if r["variant"] == "default"}
    pairs = []
    for r in rows.values():
        default = defaults.get(key(r))
        if (r["variant"] not in ("default", "legacy") and r["recipe"] != "fp32" and r.get("vs_default") is not None
                and default):
            pairs.append((r, default))
    if not pairs:
        return []
    out = ["**Ablations** (the default recipe with one part changed; `vs default`: FID ratio to the default "
           "recipe's row of the same model and noise, paired 95% bootstrap interval; > 1 means the part helps; "
           "`calib-seed1` is the default recipe calibrated with another seed, "
           "the quantizer's own run-to-run noise):", "",
           "| recipe | ablation | model | runs | vs FP | default vs FP | vs default | step err (ablation / default) |",
           "|---|---|---|---|---:|---:|---:|---:|"]
    pairs.sort(key=lambda p: (order.get(p[0]["recipe"], 9), p[0]["variant"], p[0]["model"], p[0]["flavour"],
                              p[0]["seed"]))
    for r, d in pairs:
        se, de = r.get("step_error"), d.get("step_error")
        step = f"{se['mean_rel_err']:.4f} / {de['mean_rel_err']:.4f}" if se and de else ""
        out.append(f"| {r['recipe']} | {r['variant']} | {r['model']} | {r['flavour']}, seed {r['seed']} | "
                   f"{r['vs_fp']:.3f}x | {d['vs_fp']:.3f}x | "
                   f"{r['vs_default']:.3f}x{_ci(r.get('default_ratio_lo'), r.get('default_ratio_hi'), '{:.3f}')} "
                   f"| {step} |")
    return out + [""]


def latency_section(lat: dict) -> list[str]:
    out = ["## ONNX Runtime CPU latency", "",
           f"`{lat['command']}` — {lat['model']}, batch {lat['batch']}, one thread, "
           f"{lat['repeats']} interleaved rounds; medians.", "",
           "| graph | median (ms) | speed-up vs FP32 |", "|---|---:|---:|"]
    for name, ms in lat["median_ms"].items():
        out.append(f"| {name} | {ms:.1f} | {lat['speedup_vs_fp32'][name]:.2f}x |")
    out += ["", f"dqdeploy per-step vs ORT's own quantize_static: {lat['dq_per_step_vs_peer']:.2f}x "
            "(>1 means dqdeploy is faster); "
            f"per-step scale overhead vs constant scales: {lat['per_step_overhead']:+.1%}.", ""]
    return out


def dit_latency_section(lat: dict) -> list[str]:
    out = ["## ONNX Runtime CPU latency: digits diffusion transformer", "",
           f"`{lat['command']}` — {lat['model']}; batch {lat['batch']}, one thread, "
           f"{lat['repeats']} interleaved rounds; "
           "medians.", "", "| graph | median (ms) | speed-up vs FP32 |", "|---|---:|---:|"]
    out += [f"| {name} | {ms:.2f} | {lat['speedup_vs_fp32'][name]:.2f}x |"
            for name, ms in lat["median_ms"].items()]
    return out + [""]


def transformer_width_section(res: dict) -> list[str]:
    m = res["model"]
    out = ["## ONNX Runtime CPU latency: a transformer at PixArt-Sigma's width", "",
           f"`{res['command']}` — {m['class']}, hidden {m['hidden']} ({m['heads']} heads), {m['blocks']} blocks "
           f"({m['parameters'] / 1e6:.0f}M parameters), {m['image_tokens']} image + {m['text_tokens']} text tokens, "
           f"batch {m['batch']}, one thread; interleaved rounds, medians. Profile: share of one call's kernel time "
           "per op type (ONNX Runtime's profiler).", "",
           "| graph | median (ms) | speed-up vs FP32 | where the time goes |", "|---|---:|---:|---|"]
    for name, row in res["rows"].items():
        top = ", ".join(f"{op} {p['share']:.0%}" for op, p in list(res["profile_ms"][name].items())[:5])
        out.append(f"| {name} | {row['median_ms']:.1f} | {row['speedup']:.2f}x | {top} |")
    return out + [""]


def lora_quality_section(res: dict) -> list[str]:
    out = ["## LoRA on a quantized artifact: digits-FID", "",
           f"`{res['command']}` — the shipped digits model with {res['lora']['what']} ({res['lora']['layers']} "
           f"layers), {res['n']} samples, DDIM 50, the same noise for every row. `vs fp + lora`: digits-FID ratio to "
           "the float model with the same LoRA merged (a 0-4 model scores worse than the base model against all "
           "digits, so LoRA rows compare with that row); `0-4`: share of samples the classifier reads as 0-4.", "",
           "| row | digits-FID | vs fp + lora | 0-4 |", "|---|---:|---:|---:|"]
    for name, r in res["rows"].items():
        out.append(f"| {name} | {r['digits_fid']:.2f} | {r['vs_fp_lora']:.3f}x | {r['share_0_to_4']:.1%} |")
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in res["fold_seconds"].items()) or "not reached"
    swaps = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in res.get("swap_seconds", {}).items()) or "not reached"
    noise = ", ".join(f"{r['vs_fp_lora']:.3f}x" for k, r in res["rows"].items() if k.startswith("fp + lora, seed"))
    return out + ["", *([f"The FID's noise: fp + lora with other noise seeds reads {noise} of itself; read the "
                         "ratios against that.", ""] if noise else []),
                  *(["**Partial run**: stopped before its last rows (the script writes each row as it is measured).",
                     ""] if res.get("complete") is False else []),
                  f"`dqdeploy lora` (fold, including loading and saving the artifact): {secs}. Swapping the "
                  f"adapter on a loaded runtime with LoRA slots (`set_lora`, median of 6): {swaps}.", ""]


def lora_overhead_section(res: dict) -> list[str]:
    stages = ", ".join(f"{k} {r['seconds']:.0f} s / {r['peak_rss_gb']:.1f} GB" for k, r in res["stages"].items())
    out = [f"## LoRA branch latency ({res['config']} UNet)", "",
           f"`{res['command']}` — {res['config']} UNet config with random weights, W8A8 PTQ ({res['calibration']}), "
           f"exported `--target ort` without slots and with `--lora-slots attention` ({res['slots']} slots); "
           f"ONNX Runtime CPU, batch {res['batch']}, {res['latent']}x{res['latent']} latent, {res['tokens']} tokens, "
           f"{res['threads']} thread, the configurations in turn, {res['repeats']} repeats, medians. `overhead`: vs "
           "the export without slots.", "",
           "| configuration | median (s) | overhead |", "|---|---:|---:|"]
    for name, r in res["rows"].items():
        out.append(f"| {name} | {r['median_s']:.3f} | {r['overhead']:+.1%} |")
    return out + ["", f"Stages (wall time / peak RSS, each in its own process): {stages}.", ""]


def fallback_search_section(d: dict) -> list[str]:
    """Leave-one-out on every layer vs the first-order screen and leave-one-out on its top candidates."""
    out = ["## Fallback search", ""]
    for label, e in d.items():
        if label == "sd15":
            continue
        out += [f"`{e['command']}` — zoo member `{label}`, {e['layers']} quantized layers, W8A8 calibrated as "
                f"`quantize` does by default, no distillation; the search's subset ({e['subset_samples']} samples). "
                f"Leave-one-out on every layer {e['exhaustive_s']} s, the screen {e['screen_s']} s; rank agreement "
                f"(Spearman) of every layer's gain and the screen's estimate: {e['spearman']:.2f}. The exhaustive "
                f"search keeps {len(e['exhaustive_fallback'])} layers in float; the screen ranks them "
                f"{', '.join(map(str, e['screen_rank_of_exhaustive_fallback']))} (0 = first).", "",
                "| layer (top 10 by leave-one-out gain) | gain | screen estimate | screen rank |",
                "|---|---:|---:|---:|"]
        out += [f"| {r['layer']} | {r['gain']:.5f} | {r['estimate']:.5f} | {r['screen_rank']} |"
                for r in e["top10"]]
        out += ["", "Per candidate count, what fallback keeps in float and the error of the result on held-out FP "
                "trajectories (relative denoiser error, and relative error of final images from the same noise; "
                "lower is better):", "",
                "| candidates | float layers | held-out denoiser error | image error | quantize (s) |",
                "|---:|---:|---:|---:|---:|"]
        label = {0: "0 (the screen alone)", e["layers"]: f"{e['layers']} (every layer)"}
        out += [f"| {label.get(v['candidates'], v['candidates'])} | {len(v['fallback'])} | {v['heldout_error']:.5f} "
                f"| {v['image_error']:.4f} | {v['quantize_s']:.0f} |" for v in e["variants"]]
        out += ["", prov_line(e), ""]
    if "sd15" in d:
        e = d["sd15"]
        out += [f"`{e['command']}` — Stable Diffusion 1.5 size ({e['layers']} quantized layers, random weights, "
                f"64x64 latent, CFG pairs), the search's subset {e['subset_samples']} samples: the screen "
                f"{e['screen_s']:.0f} s (peak RSS {e['peak_rss_gb_before_screen']:.1f} GB before, "
                f"{e['peak_rss_gb_after_screen']:.1f} GB after), leave-one-out {e['leave_one_out_s_per_layer']:.1f} s "
                f"per layer plus {e['search_overhead_s']:.0f} s once; so the whole search: every layer about "
                f"{e['projected_exhaustive_s'] / 60:.0f} min, screen + {e['candidates']} candidates about "
                f"{e['projected_screened_s'] / 60:.0f} min (projected from the measured parts).", "", prov_line(e), ""]
    return out


def serve_load_section(results: dict) -> list[str]:
    out = ["## `dqdeploy serve`: load test on localhost", ""]
    for res in results.values():
        out += _serve_load_entry(res) + [prov_line(res), ""]
    return out


def _serve_load_entry(res: dict) -> list[str]:
    st, rss = res["settings"], res["rss"]
    out = [f"`{res['command']}` — {res['model']}; server `{res['serve_command']}` (ONNX Runtime, one thread), "
           f"{st['warmup']} warm-up requests at each level, then each level's clients send one request per image "
           "(a new seed each) over keep-alive connections; latency as the clients see it. Batch sizes: requests per "
           "model call (the server's /metrics). Export: " + ("; ".join(f"`{c}`" for c in res["export_commands"])
                                                    or "the folder given with --export") + ".", "",
           "| clients | requests | requests/s | p50 (ms) | p99 (ms) | errors | mean batch |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in res["levels"]:
        out.append(f"| {lv['clients']} | {lv['requests']} | {lv['requests_per_s']:.1f} | {lv['p50_ms']:.0f} "
                   f"| {lv['p99_ms']:.0f} | {lv['errors']} | {lv['mean_batch']:.2f} |")
    series = ", ".join(f"{n}: {mb:.1f}" for n, mb in res["rss_series"])
    return out + ["", f"{res['total_requests']} requests, {res['errors']} failed. Server RSS (MB) start / middle / "
                      f"end: {rss['start_mb']:.1f} / {rss['middle_mb']:.1f} / {rss['end_mb']:.1f} (growth "
                      f"{rss['growth_mb']:+.1f} MB; after N requests: {series}). SIGTERM at the end: exit "
                      f"{res['server_exit']}{', with a traceback' if res['server_traceback'] else ''}.", ""]


def _serve_level(lv: dict) -> str:
    clients = f"{lv['clients']} client" + ("s" if lv["clients"] > 1 else "")
    return f"{clients} {lv['requests_per_s']:.1f} req/s (p99 {lv['p99_ms']:.0f} ms)"


def memory_section(mem: dict) -> list[str]:
    out = ["## Distillation memory", "", f"`{mem['command']}` — recipe {mem['recipe']}, {mem['iters']} iterations, "
           f"{mem['calibration_samples']} calibration samples; "
           "peak RSS above the resident baseline during distillation.", "",
           "| mode | peak above baseline (MB) | time (s) | mean final loss |", "|---|---:|---:|---:|"]
    for r in mem["rows"]:
        out.append(f"| {r['mode']} | {r['distill_peak_above_baseline_mb']:.0f} | {r['distill_s']:.0f} "
                   f"| {r['final_loss_mean']:.3e} |")
    return out + ["", f"Block-wise / whole-model peak: {mem['block_vs_model_peak_ratio']:.2f}x "
                  "(paper, GPU: 0.34x).", ""]


def distill_scale_section(d: dict) -> list[str]:
    m = d["model"]
    out = ["## Distillation time per block", "",
           f"`{d['command']}` — {m['class']} {'/'.join(map(str, m['block_out_channels']))} wide (SD-1.5 block layout, "
           f"{d['before']['parameters_m']:.0f}M parameters, {d['before']['blocks']} blocks, "
           f"{m['sample_size']}x{m['sample_size']} latent, "
           f"{m['tokens']} tokens), {d['recipe']}, {d['iters']} iterations, {d['calibration_samples']} samples, "
           f"batch {d['batch_size']}.", "",
           "| code | distillation (s) | per block (s) | peak RSS above baseline (MB) | mean final block loss |",
           "|---|---:|---:|---:|---:|"]
    for name in ("before", "after"):
        r = d[name]
        out.append(f"| {name} | {r['distill_s']:.0f} | {r['per_block_s_mean']:.2f} | {r['peak_above_baseline_mb']:.0f} "
                   f"| {r['loss_after_mean']:.4e} |")
    return out + ["", f"Propagation vs re-running the model per block: {d['distill_speedup']:.2f}x faster.", ""]


def quantize_time_section(qt: dict) -> list[str]:
    """Quantize wall time of the README's plain command: today's defaults vs before issue 7 and vs the old defaults."""
    out = ["## Quantize time", "", f"`{qt['command']}` — `dqdeploy quantize {qt['model']} --recipe {qt['recipe']} "
           f"{' '.join(qt['args'])}`, each run a fresh one-thread process, configurations interleaved.", "",
           "| configuration | runs (s) | median (s) |", "|---|---|---:|"]
    for name, runs in qt["seconds"].items():
        out.append(f"| {name} | {', '.join(f'{s:.0f}' for s in runs)} | {qt['median_s'][name]:.0f} |")
    return out + ["", f"Today's defaults / the code before issue 7: {qt['default_vs_before']:.2f}x; "
                  "today's defaults / "
                  f"today's code with `{' '.join(qt['old_defaults_args'])}`: {qt['default_vs_old_defaults']:.2f}x.", ""]


def quick_preset_section(d: dict) -> list[str]:
    """``quantize --preset quick`` and what follows it on the shipped digits model: times, memory, the verdict."""
    out = ["## A first try: `quantize --preset quick`", "", f"`{d['command']}` — on `{d['model']}` "
           f"({d['scheduler']}), each command a fresh one-thread process; CPU = user + system seconds (the machine "
           "is shared: wall time includes the others' load).", "",
           "| command | wall (s) | CPU (s) | peak RSS (MB) |", "|---|---|---|---|"]
    for name, runs in d["rows"].items():
        wall, cpu = (", ".join(f"{r[k]:.1f}" for r in runs) for k in ("wall_s", "cpu_s"))
        out.append(f"| `{d['commands'][name]}` | {wall} | {cpu} | {max(r['peak_rss_mb'] for r in runs):.0f} |")
    q = d["quality"]
    return out + ["", f"`eval` of the last run: {q['verdict']['text']}; digits-FID {q['digits']['quantized']:.1f} vs "
                  f"FP {q['digits']['fp']:.1f} ({q['digits']['ratio']:.2f}x; both at the preset's 10 steps). "
                  f"quantize's closing check: mean per-step relative error {q['manifest']['mean_rel_err']:.4f}.", ""]


def storage_section(st: dict) -> list[str]:
    """Artifact size and load time, float weights (format 1) vs integer storage (format 2)."""
    m = st["model"]
    out = ["## Artifact storage and load time", "",
           f"`{st['command']}` — {m['class']} ({m['parameters'] / 1e6:.0f}M parameters, "
           f"FP32 {m['fp32_bytes'] / 1e6:.0f} MB; "
           f"reduced SD-1.5 layout, see `bench/storage.py`), W8A8; each load in a fresh process, medians of "
           f"{len(st['rows']['format2']['load_s'])}.", "",
           "| artifact | code | weights file (MB) | vs FP32 | load_quantized (s) |", "|---|---|---:|---:|---:|"]
    for label, name in (("format1", "format 1 (float weights)"), ("format2", "format 2 (integers + scales)")):
        r = st["rows"][label]
        out.append(f"| {name} | {'before' if label == 'format1' else 'this tree'} | "
                   f"{r['weights_file_bytes'] / 1e6:.1f} | "
                   f"{r['weights_file_bytes'] / m['fp32_bytes']:.2f}x | {r['load_median_s']:.1f} |")
    old = st["rows"]["format1_read_by_format2_code"]
    out.append(f"| format 1 (float weights) | this tree | {st['rows']['format1']['weights_file_bytes'] / 1e6:.1f} | | "
               f"{old['load_median_s']:.1f} |")
    search = st["weight_scale_search"]
    same = search["format1"]["scales_sha256"] == search["format2"]["scales_sha256"]
    return out + ["", f"Weight-scale search over every Conv2d/Linear weight (quantize time only now): "
                      f"{search['format1']['seconds']:.0f} s before, {search['format2']['seconds']:.0f} s now; "
                      f"same scales: {'yes' if same else 'NO'}.", ""]


def reliability_section(rel: dict) -> list[str]:
    """The hostile-input corpus: cases by category, what each expects, and what happened."""
    labels = {"cli": "CLI inputs and output paths", "artifact": "artifact tampering", "export": "export tampering",
              "runtime": "runtime calls", "interruption": "interruptions (real signals, real subprocesses)",
              "concurrency": "concurrent runs"}
    out = ["## Reliability: the hostile-input corpus", "",
           f"`{rel['command']}` runs `tests/hostile` ({rel['cases']} cases, "
           f"{rel['wall_s']:.0f} s wall on this machine). "
           "Each case asserts the exit code, no traceback, an error naming the problem and the fix, and that "
           "nothing was deleted or left half-written.", "",
           "| category | cases | passed | failed |", "|---|---:|---:|---:|"]
    for cat, n in rel["by_category"].items():
        outcome = rel["by_category_outcome"][cat]
        out.append(f"| {labels.get(cat, cat)} | {n} | {outcome.get('passed', 0)} | {outcome.get('failed', 0)} |")
    expected = ", ".join(f"{k}: {v}" for k, v in rel["by_expected"].items())
    out += ["", f"Expected behaviour per case: {expected}. Outcomes: "
            + ", ".join(f"{k} {v}" for k, v in rel["outcomes"].items()) + ".", ""]
    if rel.get("failed"):
        out += ["Failing cases: " + ", ".join(f"`{c}`" for c in rel["failed"]), ""]
    return out


def loss_section() -> list[str]:
    """Issue 7: where the quantization loss comes from (screens, group bounds) and the digits-FID that confirms it."""
    screens = [d for _, d in _glob("screen-*.json")]
    groups = [d for _, d in _glob("groups-*.json")]
    fids = [d for _, d in _glob("loss-fid-*.json")]
    if not (screens or groups or fids):
        return []
    out = ["## Where the quantization loss comes from (screens, then digits-FID)", ""]
    for g in groups:
        out += [f"`{g['command']}` — error saved if a group of layers stayed in float (upper bound of any fix "
                f"aimed at it); relative denoiser error vs FP on the artifact's calibration inputs, steps weighted by "
                f"their DDIM effect on the sample. Full model: {g['full']:.4f}.", "",
                "| group | layers | error if float | saved | saved (weights float) | saved (activations float) |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, r in g["groups"].items():
            out.append(f"| {name} | {r['layers']} | {r['error_if_float']:.4f} | {r['gain'] / g['full']:+.0%} | "
                       f"{r['gain_weights_float'] / g['full']:+.0%} | {r['gain_acts_float'] / g['full']:+.0%} |")
        out += ["", prov_line(g), ""]
    for sc in screens:
        out += [f"`{sc['command']}` — {sc['model']}: mean relative denoiser error vs FP on 16 held-out FP DDIM-50 "
                "trajectories (all steps), and relative error of the final samples from the same noise.", "",
                "| variant | denoiser error | final-sample error | kept in float | quantize (s) |",
                "|---|---:|---:|---|---:|"]
        for r in sc["rows"]:
            qs = f"{r['quantize_s']:.0f}" if "quantize_s" in r else ""
            out.append(f"| {r['variant']} | {r['error']:.4f} | {r.get('image_error', float('nan')):.4f} | "
                       f"{', '.join(r.get('fallback', [])) or '-'} | {qs} |")
        out += ["", prov_line(sc), ""]
    for q in fids:
        fp = next((r["digits_fid"] for r in q["rows"] if r["model"] == "fp32"), None)
        out += [f"`{q['command']}` — {q['model']}, {q['n']} samples, DDIM {q['steps']}, noise seed {q['seed']}.", "",
                "| model | runs on | digits-FID | vs FP |", "|---|---|---:|---:|"]
        for r in q["rows"]:
            ratio = f"{r['digits_fid'] / fp:.2f}x" if fp else ""
            out.append(f"| {r['model']} | {r['runtime']} | {r['digits_fid']:.3f} | {ratio} |")
        out += ["", prov_line(q), ""]
    return out


def ort_speed_section(res: dict) -> list[str]:
    """bench/ort_speed.py: FP32 vs the --target ort graph before/after a layout change, and where each spends time."""
    out = ["## ONNX Runtime CPU int8 speed: the `--target ort` layout before and after (issue 9, part 5)", ""]
    micro = res.get("attention micro")
    for label, e in res.items():
        if label == "attention micro":
            continue
        out += [f"**{label}** (`{e['command']}`; batch {e['batch']}, {e['tokens']} tokens; load average "
                f"{e['loadavg_before'][0]:.1f} before / {e['loadavg_after'][0]:.1f} after, 2 cores):", "",
                "| threads | FP32 (s) | int8 before (s) | int8 after (s) | speed-up before | speed-up after | "
                "CPU-time speed-up before / after |", "|---:|---:|---:|---:|---:|---:|---|"]
        for r in e["rows"]:
            w, sp, cs = r["wall_s"], r["speedup_wall"], r["speedup_cpu"]
            out.append(f"| {r['threads']} | {w['fp32']:.3f} | {w['before']:.3f} | {w['after']:.3f} | "
                       f"{sp['before']:.2f}x | "
                       f"{sp['after']:.2f}x | {cs['before']:.2f}x / {cs['after']:.2f}x |")
        prof = e.get("profile_1_thread") or {}
        if prof:
            groups = list(next(iter(prof.values()))["groups_ms"])
            out += ["", "ORT profile, one thread, sum of each node's minimum over the runs (ms):", "",
                    "| group | " + " | ".join(prof) + " |", "|---|" + "---:|" * len(prof)]
            for g in groups + ["total"]:
                cells = [f"{p['total_ms']:.1f}" if g == "total" else f"{p['groups_ms'][g]:.1f}"
                         for p in prof.values()]
                out.append(f"| {g} | " + " | ".join(cells) + " |")
        if e.get("note"):
            out += ["", e["note"]]
        out += ["", prov_line(e), ""]
    if micro:
        out += [f"One attention alone (`{micro['command']}`; batch {micro['batch']}, {micro['heads']} heads, "
                "one thread, median CPU ms): the exporter's float form, ONNX Runtime's MultiHeadAttention, "
                "int8 batched matmuls on inputs already quantized (QLinearMatMul, constant scales: a best case), "
                "and -- where measured -- what `quantize --attention int8` exports (Q/DQ in front of both "
                "products, run as MatMulIntegerToFloat; vnni: u8 x s8, portable: u8 x u8).", ""]
        ours = [k for k in ("int8 vnni", "int8 portable") if k in next(iter(micro["cpu_ms"].values()))]
        out += ["| attention | query x key tokens, channels | float | MultiHeadAttention | int8 QLinearMatMul |"
                + "".join(f" {k} (exported) |" for k in ours),
                "|---|---|---:|---:|---:|" + "---:|" * len(ours)]
        for name, r in micro["cpu_ms"].items():
            n, m, c = r["shape"]
            out.append(f"| {name} | {n} x {m}, {c} | {r['float']:.1f} | {r['mha']:.1f} | {r['int8']:.1f} |"
                       + "".join(f" {r[k]:.1f} |" for k in ours))
        out += ["", prov_line(micro), ""]
    return out


def scale_section(scale: dict) -> list[str]:
    """bench/scale.py: seconds and peak RSS per stage, per model size, and the ORT latency table."""
    out = ["## Stable Diffusion size: time and peak memory per stage, int8 latency", "",
           "`bench/scale.py` — random-weight UNet2DConditionModel configs built in code (`bench/scale_models.py`); "
           "each stage is the user's command in a fresh process, peak RSS from `wait4`. Calibration: the budget shown; "
           "latency: ORT CPU, batch 2 (CFG), 77 tokens, FP32 graph vs `--target ort` graph, runs interleaved, "
           "medians.", ""]
    for name, entry in scale.items():
        out += [f"**{name}** (`{entry['command']}`; calibration `{entry['calibration']}`):", "",
                "| stage | seconds | CPU seconds | peak RSS (GB) | longest silence (s) | exit | command |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for stage, r in entry.get("stages", {}).items():
            cpu, quiet = r.get("cpu_seconds"), r.get("longest_silence_s")  # (rows of earlier runs lack them)
            out.append(f"| {stage} | {r['seconds']:.0f} | {'' if cpu is None else f'{cpu:.0f}'} | "
                       f"{r['peak_rss_gb']:.2f} | {'' if quiet is None else f'{quiet:.0f}'} | {r['exit']} "
                       f"| `{r['command'][:90]}` |")
        out.append("")
        for stage, r in entry.get("stages", {}).items():
            if r.get("phases"):
                out += [f"{stage}, its steps (seconds / peak RSS so far, GB): " + ", ".join(
                    f"{k} {v['seconds']:.0f} / {v['peak_rss_gb']:.1f}" for k, v in r["phases"].items()), ""]
        if entry.get("latency"):
            out += ["| threads | FP32 (s) | int8 (s) | speed-up | session RSS FP32 / int8 (GB) |",
                    "|---:|---:|---:|---:|---|"]
            for r in entry["latency"]:
                out.append(f"| {r['threads']} | {r['fp32_s']:.3f} | {r['int8_s']:.3f} | {r['speedup']:.2f}x | "
                           f"{r['fp32_session_gb']:.2f} / {r['int8_session_gb']:.2f} |")
            out.append("")
        if entry.get("note"):
            out += [entry["note"], ""]
        if entry.get("skipped"):
            out += [f"Not measured by this run (`--skip`): {', '.join(entry['skipped'])}.", ""]
        out += [prov_line(entry), ""]
    return out


def cpu_line(machine: dict) -> str:
    """The CPU a result was measured on, with its int8 class and flags (rendered results always have them)."""
    return (f"CPU: {machine['cpu']}; int8 class **{machine['int8_class']}** "
            f"({machine.get('int8_flags') or 'no int8 flags'}).")


def prov_line(e: dict) -> str:
    """Where a rendered result comes from, and whether it measured the code of this tree."""
    state, why = verdict(e, LEDGER.current)
    code = f", code `{e['code_hash'][:12]}`" if e.get("code_hash") else ""
    line = (f"Measured at commit `{e['commit']}`{code}, {e.get('date', 'date not recorded')}. "
            f"{cpu_line(e['machine'])}")
    if state == "stale":
        line = f"**Stale (measured on {e['commit']})**: {why}; rerun its command to refresh. " + line
    return line


def int8_kernels_section(res: dict) -> list[str]:
    out = ["## Int8 kernels per CPU: exactness and speed per weight format", "",
           "Each op ONNX Runtime fuses the `--target ort` pattern into, with random full-range uint8 activations, "
           "against exact integer arithmetic (share of outputs that differ; power-of-two scales, so only the integer "
           "GEMM can differ). Formats: full-range int8 weights (`--cpu vnni`), uint8 weights (`--cpu portable` for "
           "layers whose weights leave [-64, 64]), int8 within [-64, 64] (4-bit layers; `portable` keeps those int8).",
           ""]
    for label, e in res.items():
        out += [f"### {label}: `{e['command']}`", "", prov_line(e), "",
                "| op | " + " | ".join(next(iter(e["exactness"].values()))) + " |", "|---|" + "---:|" * 3]
        for op, cols in e["exactness"].items():
            out.append(f"| {op} ({next(iter(cols.values()))['fused'] or 'not fused'}) | "
                       + " | ".join(f"{c['mismatch']:.1%} (max {c['max_diff']:g})" for c in cols.values()) + " |")
        sp = e.get("speed")
        if sp:
            out += ["", f"Speed, {sp['shape']}, one thread, {sp['repeats']} interleaved rounds, "
                    "median CPU time (IQR):", "",
                    "| graph | ms | vs FP32 |", "|---|---:|---:|"]
            for name, ms in sp["cpu_ms"].items():
                lo, hi = sp["cpu_ms_iqr"][name]
                out.append(f"| {name} | {ms:.2f} ({lo:.2f}-{hi:.2f}) "
                           f"| {sp['speedup_vs_fp32_cpu'].get(name, 1.0):.2f}x |")
        else:
            out += ["", "No timing: an emulated CPU runs the emulated CPU's integer kernels, not at its speed."]
        out.append("")
    return out


def cpu_emulation_section(res: dict) -> list[str]:
    out = ["## `make demo` on a CPU without VNNI (emulated)", ""]
    for label, e in res.items():
        emu = e["emulated_cpu"]
        out += [f"### {label}: `{e['command']}`", "", prov_line(e), "",
                f"Host {cpu_line(e['machine'])} Emulated (qemu-user): {emu['cpu']}, "
                f"int8 class **{emu['int8_class']}** "
                f"({emu['int8_flags'] or 'no int8 flags'}). The shipped digits model quantized as `make demo` does; "
                f"graphs exported on the host; `dqdeploy check` and digits-FID ({e['n']} samples, DDIM 50, "
                f"noise seed 0) under "
                "the emulator and on the host.", "", "| recipe | run | result |", "|---|---|---|"]
        for recipe, rows in e["recipes"].items():
            for name, r in rows.items():
                if not isinstance(r, dict):
                    continue
                if "digits_fid" in r:
                    res_text = (f"digits-FID {r['digits_fid']:.2f}" if r["digits_fid"] is not None
                                else f"error: {r['message']}")
                else:
                    worst, out_of = r.get("worst_fail"), r.get("steps_out_of_tolerance")
                    res_text = {0: "PASS", 1: "FAIL", 2: "REFUSED"}.get(r["exit"], f"exit {r['exit']}") + (
                        f" ({r['steps_checked']})" if r.get("steps_checked") else "") + (
                        f", {out_of} out of tolerance" if out_of else "") + (
                        f", worst t={worst['t']:g}: rel err {worst['rel_err']:.2e} > {worst['tolerance']:.2e}"
                        if worst else "")
                out.append(f"| {recipe} | {name} | {res_text} |")
        out.append("")
    return out


Headline = tuple[str, dict]  # (figure, the result it comes from)


def _cmd(command: str, limit: int = 0) -> str:
    """A command as a table cell: in backticks, ``|`` escaped, cut at ``limit`` characters."""
    if limit and len(command) > limit:
        command = command[:limit] + "..."
    return "`" + command.replace("|", "\\|") + "`"


def _speedups(d: dict) -> str:
    return ", ".join(f"{k} {v:.2f}x" for k, v in d.items() if k != "fp32")


def _int8_headlines(res: dict) -> list[Headline]:
    out = []
    for label, e in res.items():
        if e.get("speed"):
            out.append((f"{label}: int8 conv vs FP32 (CPU time): "
                        f"{_speedups(e['speed']['speedup_vs_fp32_cpu'])}", e))
        formats = list(next(iter(e["exactness"].values())))
        worst = ", ".join(f"{f} {max(op[f]['mismatch'] for op in e['exactness'].values()):.1%}"
                          for f in formats)
        out.append((f"{label}: outputs differing from exact integers, worst op: {worst}", e))
    return out


def _emulation_headlines(res: dict) -> list[Headline]:
    out = []
    for label, e in res.items():
        for recipe, rows in e["recipes"].items():
            cells = []
            for name, r in rows.items():
                if isinstance(r, dict) and "digits_fid" in r and r["digits_fid"] is not None:
                    cells.append(f"{name} FID {r['digits_fid']:.2f}")
                elif isinstance(r, dict) and name.startswith("check") and "(emulated)" in name:
                    cells.append(f"{name} {({0: 'PASS', 1: 'FAIL', 2: 'REFUSED'}).get(r['exit'], r['exit'])}")
            out.append((f"{label}, {recipe}: " + "; ".join(cells), e))
    return out


def _fid_ratios(q: dict, limit: int = 4) -> str:
    fp = next((r["digits_fid"] for r in q["rows"] if r["model"] == "fp32"), None)
    if not fp:
        return "no FP row"
    rows = [r for r in q["rows"] if r["model"] != "fp32"][:limit]
    return "digits-FID vs FP: " + "; ".join(f"{r['model']} {r['digits_fid'] / fp:.2f}x" for r in rows)


def _zoo_headlines(z: dict) -> list[Headline]:
    rows = [r for r in z["rows"].values() if r["recipe"] != "fp32" and r["variant"] == "default"
            and r["flavour"] == "sim" and r.get("vs_fp") is not None]
    out = []
    for group in zoo.GROUPS:
        for recipe in sorted({r["recipe"] for r in rows}):
            members = [r for r in rows if r["recipe"] == recipe and _group(r["model"]) == group]
            if members:
                worst = max(members, key=lambda r: r["vs_fp"])
                out.append((f"{recipe} (simulation): worst digits-FID vs FP, {group} members "
                            f"{worst['vs_fp']:.2f}x ({worst['model']})", worst | {"command": _zoo_command(z, worst)}))
    return out


def _zoo_command(z: dict, row: dict) -> str:
    """The harness command that measured ``row`` (rows are stamped one by one; the runs keep the commands): the last
    run naming its model, else the last run."""
    commands = [r["command"] for r in z["runs"]]
    return next((c for c in reversed(commands) if row["model"] in c), commands[-1] if commands else "")


def _scale_headlines(scale: dict) -> list[Headline]:
    out = []
    for name, e in scale.items():
        peak = max(e.get("stages", {}).items(), key=lambda kv: kv[1]["peak_rss_gb"], default=None)
        lat = (e.get("latency") or [{}])[0]
        text = (f"{name}: highest stage peak RSS {peak[1]['peak_rss_gb']:.2f} GB ({peak[0]})" if peak
                else f"{name}: no stage")
        out.append((text + (f"; int8 vs FP32, 1 thread: {lat['speedup']:.2f}x" if lat.get("speedup") else ""), e))
    return out


def _one(figure: Callable[[dict], str]) -> Callable[[dict], list[Headline]]:
    return lambda d: [(figure(d), d)]


def _flat(section: Callable[[dict], list[str]]) -> Callable[[dict], list[str]]:
    """A one-result section followed by its provenance line."""
    return lambda d: (lines + [prov_line(d), ""]) if (lines := section(d)) else []


def _precision(d: dict) -> list[str]:
    out = []
    for path, q in d["files"]:
        out += quality_section(q, f"Weight precision for CPUs without VNNI: {path.stem}") + [prov_line(q), ""]
    return out


def _guidance_one_table(rows: list[dict]) -> list[str]:
    """Conditional members scored where quantization differences show (issue 19 part 3): FID at guidance 1 and
    per-class FID, beside the class accuracy at the deployment guidance."""
    cond = [r for r in rows if "g1" in r]
    if not cond:
        return []
    out = ["", "**Conditional members where differences show**: digits-FID of the same noise sampled at guidance 1 "
           "(no guidance, so no loss of diversity hides the quantization error; `vs FP` paired to the FP row at "
           "guidance 1, 95% bootstrap interval), per-class FID (samples asked for digit c against the real c's, "
           "mean over classes) and class accuracy, at guidance 1 and at the member's deployment guidance:", "",
           "| model | recipe | runs | seed | n | FID at g1 | vs FP at g1 | per-class FID at g1 | class acc at g1 "
           "| per-class FID at deployment g | class acc at deployment g |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in cond:
        g1 = r["g1"]
        vs = "" if g1.get("vs_fp") is None else f"{g1['vs_fp']:.3f}x" + _ci(g1.get("fp_ratio_lo"),
                                                                              g1.get("fp_ratio_hi"), "{:.3f}")
        pc = lambda d: f"{d['per_class_fid']:.2f}" if "per_class_fid" in d else ""  # noqa: E731
        out.append(f"| {r['model']} | {r['recipe']} | {r['flavour']} | {r['seed']} | {r['n']} | {g1['digits_fid']:.2f} "
                   f"| {vs} | {pc(g1)} | {g1['class_accuracy']:.3f} | {pc(r)} | {r.get('class_accuracy', 0):.3f} |")
    return out


def quality_reference_section(d: dict) -> list[str]:
    """The levels `dqdeploy quantize`'s closing quality check compares with (bench/quality_reference.py)."""
    out = ["## Quality check reference levels", "",
           "`dqdeploy quantize` ends with the per-step denoiser error vs full precision on 4 held trajectories "
           "(the figure of `dqdeploy eval --fp`) and warns above twice the worst tuning member at the recipe "
           "(`dqdeploy/assets/quality_reference.json`, written by `bench/quality_reference.py`). `check s`: the "
           "check's time (recording the FP calls, with loading the FP folder, and the quantized model answering them); "
           "`quantize s`: the whole quantize of the member's cached default artifact, when it was made.", "",
           "| member | recipe | mean rel. error | worst-step error | check s | quantize s | commit |",
           "|---|---|---:|---:|---:|---:|---|"]
    for label, e in sorted(d.items()):
        f = e["figure"]
        out.append(f"| {e['model']} | {e['recipe']} | {f['mean_rel_err']:.4f} | {f['worst_rel_err']:.4f} | "
                   f"{sum(e['check_s'].values()):.1f} | {e.get('quantize_s') or ''} | {e['commit']} |")
    commands = sorted({f"`{e['command']}`" for e in d.values()})
    return out + ["", "Commands: " + "; ".join(commands), "", *sorted({prov_line(e) for e in d.values()}), ""]


def _sections() -> list[tuple[str, tuple[str, ...], Callable[[], dict | None], Callable[[dict], list[str]],
                              Callable[[dict], list[Headline]]]]:
    """Each section in BENCHMARKS.md's order: its title (as in the summary), the result files it reads, how they are
    loaded (only results with provenance), how they are rendered, and their headline figures."""
    speed = _one(lambda d: "vs FP32: " + _speedups(d["speedup_vs_fp32"]))
    files = lambda pattern: (lambda: {"files": f} if (f := _glob(pattern)) else None)  # noqa: E731
    return [
        ("Int8 kernels per CPU", ("int8_kernels.json",), lambda: _load_keyed("int8_kernels"), int8_kernels_section,
         _int8_headlines),
        ("`make demo` on a CPU without VNNI", ("cpu_emulation.json",), lambda: _load_keyed("cpu_emulation"),
         cpu_emulation_section, _emulation_headlines),
        ("Image quality: digits-FID", ("quality",), merged_quality,
         lambda d: quality_section(d) + [prov_line(q) for q in d["runs"]] + [""],
         lambda d: [(_fid_ratios(d, 6), d["runs"][0] | {"command": d["command"]})]),
        ("Weight precision for CPUs without VNNI", ("precision-",), files("precision-*.json"), _precision,
         lambda d: [(f"{p.stem}: {_fid_ratios(q)}", q) for p, q in d["files"]]),
        ("Zoo-wide image quality", ("zoo_quality",), _load_zoo, zoo_quality_section, _zoo_headlines),
        ("Quality check reference levels", ("quality_reference.json",), lambda: _load_keyed("quality_reference"),
         quality_reference_section,
         lambda d: [(f"{e['model']} {e['recipe']}: {e['figure']['mean_rel_err']:.4f}", e) for e in d.values()]),
        ("ONNX Runtime CPU latency", ("latency.json",), lambda: _load("latency"), _flat(latency_section), speed),
        ("ONNX Runtime CPU latency: digits diffusion transformer", ("latency_dit.json",), lambda: _load("latency_dit"),
         _flat(dit_latency_section), speed),
        ("ONNX Runtime CPU latency: a transformer at PixArt-Sigma's width", ("transformer_width.json",),
         lambda: _load("transformer_width"), _flat(transformer_width_section),
         _one(lambda d: "vs FP32: " + ", ".join(f"{k} {r['speedup']:.2f}x" for k, r in d["rows"].items()
                                                 if k != "fp32"))),
        ("LoRA on a quantized artifact", ("lora_quality.json",), lambda: _load("lora_quality"),
         _flat(lora_quality_section),
         lambda d: [(f"{k}: {r['vs_fp_lora']:.3f}x the digits-FID of fp + lora", d) for k, r in d["rows"].items()
                    if k.endswith(("branch", "fold, ort", "slots, ort"))]),
        ("LoRA branch latency", ("lora_overhead.json",), lambda: _load("lora_overhead"),
         _flat(lora_overhead_section),
         _one(lambda d: f"rank-16 branch {d['rows']['rank 16']['overhead']:+.1%} over no slots")),
        ("Fallback search", ("fallback_search.json",), lambda: _load_keyed("fallback_search"), fallback_search_section,
         lambda d: [(f"{k}: Spearman {e['spearman']:.2f}, screen {e['screen_s']:.0f} s vs every layer "
                     f"{e['exhaustive_s']:.0f} s" if k != "sd15" else
                     f"SD-1.5: screened search ~{e['projected_screened_s'] / 60:.0f} min vs every layer "
                     f"~{e['projected_exhaustive_s'] / 60:.0f} min", e) for k, e in d.items()]),
        ("`dqdeploy serve`: load test on localhost", ("serve_load.json",), lambda: _load_keyed("serve_load"),
         serve_load_section,
         lambda d: [(f"{label}: " + ", ".join(_serve_level(lv) for lv in e["levels"])
                     + f"; {e['errors']} errors in {e['total_requests']}; RSS {e['rss']['start_mb']:.1f} -> "
                     f"{e['rss']['end_mb']:.1f} MB", e) for label, e in d.items()]),
        ("Distillation memory", ("memory.json",), lambda: _load("memory"), _flat(memory_section),
         _one(lambda d: f"block-wise / whole-model peak {d['block_vs_model_peak_ratio']:.2f}x")),
        ("Distillation time per block", ("distill_scale.json",), lambda: _load("distill_scale"),
         _flat(distill_scale_section),
         _one(lambda d: f"distillation {d['distill_speedup']:.2f}x faster")),
        ("Artifact storage and load time", ("storage.json",), lambda: _load("storage"), _flat(storage_section),
         _one(lambda d: "W8A8 weights file "
              f"{d['rows']['format2']['weights_file_bytes'] / d['model']['fp32_bytes']:.2f}x FP32")),
        ("Quantize time", ("quantize_time_",), lambda: _load("quantize_time_w8a8"), _flat(quantize_time_section),
         _one(lambda d: f"default / before {d['default_vs_before']:.2f}x")),
        ("A first try: `quantize --preset quick`", ("quick_preset.json",), lambda: _load("quick_preset"),
         _flat(quick_preset_section),
         _one(lambda d: "quantize --preset quick "
              f"{min(r['wall_s'] for r in d['rows']['quantize']):.0f} s wall, "
              f"{min(r['cpu_s'] for r in d['rows']['quantize']):.0f} s CPU")),
        ("Reliability: the hostile-input corpus", ("reliability.json",), lambda: _load("reliability"),
         _flat(reliability_section),
         _one(lambda d: f"{d['outcomes'].get('passed', 0)} of {d['cases']} cases pass")),
        ("Stable Diffusion size", ("scale.json",), lambda: _load_keyed("scale"), scale_section, _scale_headlines),
        ("ONNX Runtime CPU int8 speed: the `--target ort` layout", ("ort_speed.json",),
         lambda: _load_keyed("ort_speed"),
         ort_speed_section,
         lambda d: [(f"{label}: int8 vs FP32, 1 thread, after {e['rows'][0]['speedup_wall']['after']:.2f}x", e)
                    for label, e in d.items() if label != "attention micro"]),
        ("Where the quantization loss comes from", ("screen-", "groups-", "loss-fid-"), lambda: {},
         lambda _: loss_section(),
         lambda _: []),
    ]


def summary(sections: list) -> list[str]:
    """One row per headline figure of a rendered result (its command, CPU, and whether it measured this code; a
    section with current results quotes only those), and one per section whose results were all refused."""
    out = ["## Summary", "", "Each headline figure, the command that measured it and the CPU it ran on; "
           "details in the section of the same name below. "
           "*Stale*: measured on other code than this tree's `dqdeploy/`.", "",
           "| section | figure | command | CPU (int8 class) | code |", "|---|---|---|---|---|"]
    for title, files, rows in sections:
        if any(not LEDGER.stale(e) for _, e in rows):  # a section re-measured on this code: its stale rows only below
            rows = [(figure, e) for figure, e in rows if not LEDGER.stale(e)]
        for figure, e in rows:
            state = f"stale ({e['commit']})" if LEDGER.stale(e) else f"current ({e['commit']})"
            out.append(f"| {title} | {figure} | {_cmd(e['command'])} | "
                       f"{e['machine']['cpu']} ({e['machine']['int8_class']}) | {state} |")
        if not rows:
            refused = [r for r in LEDGER.refused if r[0].startswith(files)]
            if refused:
                out.append(f"| {title} | not shown: no provenance (see \"Not shown\") "
                           f"| {_cmd(refused[0][1], 120)} | | |")
    return out + [""]


def not_shown() -> list[str]:
    if not LEDGER.refused:
        return []
    out = ["## Not shown: results without provenance", "",
           "Stored in `bench/results` without the commit or the CPU (model and int8 flags) they were measured on, "
           "so not rendered as measurements; rerun the command (every bench script now records both) "
           "to show them.", "",
           "| result | command | missing |", "|---|---|---|"]
    for where, command, why in LEDGER.refused:
        out.append(f"| `{where}` | {_cmd(command, 160)} | {why} |")
    return out + [""]


def render(current_hash: str) -> list[str]:
    """BENCHMARKS.md's lines, judged against ``current_hash`` (the code hash of the tree being described)."""
    global LEDGER
    LEDGER = Ledger(current_hash)
    body: list[str] = []
    heads = []
    for title, files, load, section, headline in _sections():
        data = load()
        if data is None:
            heads.append((title, files, []))
            continue
        body += section(data)
        heads.append((title, files, headline(data)))
    head = ["# Benchmarks", "", "Generated by `python bench/report.py` from `bench/results/*.json`, "
            "which only the bench scripts write (`bench/common.py`: each result carries its commit, "
            "a sha256 of the `dqdeploy/` code it measured, the date "
            "and the CPU). Results without that provenance are not shown as measurements (\"Not shown\", at the end); "
            f"results measured on other code than this tree's (code `{current_hash[:12]}`) are marked stale. "
            "One thread (`torch.set_num_threads(1)`, ORT `intra_op_num_threads=1`) on a shared machine: "
            "compare the ratios, measured side by side in one run, not absolute times. "
            "Int8 results hold only for CPUs of the int8 class named. How these figures "
            "were obtained, and what was tried: docs/notes/bench-notes.md.", ""]
    return head + summary(heads) + body + not_shown()


def main() -> None:
    lines = render(code_hash())
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print(f"wrote {ROOT / 'BENCHMARKS.md'} ({len(lines)} lines)", file=sys.stderr)


if __name__ == "__main__":
    main()
