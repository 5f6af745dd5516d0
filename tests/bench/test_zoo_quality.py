"""The zoo benchmark harness end to end on a tiny digits-shaped model: rows for FP (two seeds), the
simulation and both exported graphs on ORT, cached and resumable, ratios and paired intervals."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

from bench import zoo
from bench import zoo_quality as zq
from tests.helpers import write_pipeline


def tiny_digits_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("DQDEPLOY_ZOO", str(tmp_path / "zoo"))
    member = zoo.ZooModel("tiny", "test member", steps=3)  # DDIM 3 (sampling, step errors)
    write_pipeline(tiny_digits_unet(), member.folder())
    monkeypatch.setattr(zoo, "ZOO", {"tiny": member})
    monkeypatch.setattr(zq, "RESULTS_FILE", tmp_path / "results.json")
    monkeypatch.setattr(zq, "BOOTSTRAP", 10)
    monkeypatch.setattr(zq, "STEP_TRAJECTORIES", 2)
    monkeypatch.setitem(zq.VARIANTS, "fast", {"iters": 1, "batch_size": 8})
    monkeypatch.setattr(zq, "calibration_for",
                        lambda m, v="default": zq.CalibrationConfig(scheduler="ddim", steps=3, samples=16,
                                                                    trajectories=4, batch_size=4))
    return tmp_path


@pytest.mark.slow
def test_rows_cached_resumable_with_ratios(tiny_zoo, capsys):
    args = ["--models", "tiny", "--recipes", "fp32,w8a8", "--variants", "fast", "--n", "12"]
    zq.main(args)
    rows = json.loads(zq.RESULTS_FILE.read_text())["rows"]
    assert set(rows) == {"tiny|fp32|default|sim|seed0", "tiny|fp32|default|sim|seed1", "tiny|w8a8|fast|sim|seed0",
                         "tiny|w8a8|fast|onnx|seed0", "tiny|w8a8|fast|ort|seed0"}
    fp0, q = rows["tiny|fp32|default|sim|seed0"], rows["tiny|w8a8|fast|sim|seed0"]
    assert fp0["vs_fp"] == pytest.approx(1.0) and "fp_ratio_lo" not in fp0
    assert q["vs_fp"] == pytest.approx(q["digits_fid"] / fp0["digits_fid"])
    assert q["fp_ratio_lo"] <= q["fp_ratio_hi"] and q["quantize_s"] > 0
    assert len(q["step_error"]["per_step_rel_err"]) == 3 and q["step_error"]["mean_rel_err"] > 0
    ort = rows["tiny|w8a8|fast|ort|seed0"]
    assert ort["runtime"] == "ort" and ort["vs_sim"] == pytest.approx(ort["digits_fid"] / q["digits_fid"])
    assert ort["sim_ratio_lo"] <= ort["sim_ratio_hi"] and "sim_ratio_lo" not in q
    capsys.readouterr()
    q_before = dict(q)
    zq.main(["--rederive"])  # intervals recomputed from the cached features: same method, same seed -> same values
    again = json.loads(zq.RESULTS_FILE.read_text())["rows"]["tiny|w8a8|fast|sim|seed0"]
    assert again["fp_ratio_lo"] == pytest.approx(q_before["fp_ratio_lo"])
    zq.main(args)  # everything is cached now
    out = capsys.readouterr().out
    assert out.count("cached") == 5 and "done" not in out
    zq.VARIANTS["fast"] = {"iters": 2, "batch_size": 8}  # a changed recipe makes its rows stale
    zq.main(args + ["--dry-run"])
    assert capsys.readouterr().out.count("would run") == 3


def test_concurrent_harness_processes_keep_each_others_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("DQDEPLOY_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setattr(zq, "RESULTS_FILE", tmp_path / "results.json")
    fp = {"model": "m", "recipe": "fp32", "variant": "default", "flavour": "sim", "seed": 0, "digits_fid": 10.0}
    q = fp | {"recipe": "w8a8", "digits_fid": 11.0}
    zq.update_results(runs=[{"command": "a"}])
    stale = zq.load_results()  # a second process loaded the file before the first one added its row
    zq.update_results(rows={zq.fp_key("m", 0): fp})
    merged = zq.update_results(rows={zq.row_key("m", "w8a8", "default", "sim", 0): q}, runs=[{"command": "b"}])
    assert stale["rows"] == {} and len(merged["rows"]) == 2 and [r["command"] for r in merged["runs"]] == ["a", "b"]
    assert (json.loads(zq.RESULTS_FILE.read_text()) == merged
            and merged["rows"][zq.row_key("m", "w8a8", "default", "sim", 0)]["vs_fp"] == 1.1)
    ablation = zq.update_results(rows={zq.row_key("m", "w8a8", "no-dilation", "sim", 0):
                                       q | {"variant": "no-dilation", "digits_fid": 13.2}})
    assert ablation["rows"][zq.row_key("m", "w8a8", "no-dilation", "sim", 0)]["vs_default"] == pytest.approx(1.2)
    assert "vs_default" not in ablation["rows"][zq.row_key("m", "w8a8", "default", "sim", 0)]
    other = tmp_path / "other.json"  # rows measured in another checkout: --merge adds them once
    other.write_text(json.dumps({"rows": {zq.fp_key("m", 1): fp | {"seed": 1}},
                                 "runs": [{"command": "b"}, {"command": "c"}]}))
    zq.main(["--merge", str(other)])
    zq.main(["--merge", str(other)])
    final = zq.load_results()
    assert len(final["rows"]) == 4 and [r["command"] for r in final["runs"]] == ["a", "b", "c"]


def test_paired_bootstrap_ratio_of_identical_samples_is_exactly_one():
    feats = torch.randn(60, 64, generator=torch.Generator().manual_seed(0)).numpy()
    out = zq.bootstrap_fid(feats, {"fp": feats.copy()}, draws=20)
    assert out["fp_ratio_lo"] == pytest.approx(1.0) and out["fp_ratio_hi"] == pytest.approx(1.0)
    assert out["boot_bias"] > 0  # resampling with replacement inflates the FID: why the interval is on differences


def test_transformer_member_uses_its_own_sampler_cfg_and_pooled_prompts(tmp_path, monkeypatch):
    """A DiT member (SD3 transformer, flow-matching scheduler, 2-part class prompts) runs the same harness path:
    calibrated and sampled with its folder's scheduler and step count, class accuracy, per-step errors under CFG."""
    import dataclasses

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from tests.helpers import write_transformer_cond

    monkeypatch.setenv("DQDEPLOY_ZOO", str(tmp_path / "zoo"))
    member = zoo.ZooModel("tinydit", "test member", conditional=True, guidance=2.0, scheduler=None, steps=3)
    torch.manual_seed(0)
    dit = SD3Transformer2DModel(sample_size=16, patch_size=4, in_channels=1, out_channels=1, num_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=4)
    folder = member.folder()
    dit.save_pretrained(str(folder / "transformer"))
    FlowMatchEulerDiscreteScheduler().save_pretrained(str(folder / "scheduler"))
    write_transformer_cond(member.cond_file(), prompts=10)
    monkeypatch.setattr(zoo, "ZOO", {"tinydit": member})
    monkeypatch.setattr(zq, "RESULTS_FILE", tmp_path / "results.json")
    monkeypatch.setattr(zq, "BOOTSTRAP", 10)
    monkeypatch.setattr(zq, "STEP_TRAJECTORIES", 2)
    monkeypatch.setitem(zq.VARIANTS, "fast", {"iters": 1, "batch_size": 8, "fallback": "none"})
    real = zq.calibration_for
    assert real("tinydit") == zq.CalibrationConfig(scheduler=None, steps=3, guidance=2.0)
    monkeypatch.setattr(zq, "calibration_for",
                        lambda m, v="default": dataclasses.replace(real(m, v), samples=16, trajectories=4))
    zq.main(["--models", "tinydit", "--recipes", "fp32,w8a8", "--variants", "fast", "--flavours", "sim",
             "--fp-seeds", "0", "--n", "20"])
    rows = json.loads(zq.RESULTS_FILE.read_text())["rows"]
    q, fp = rows["tinydit|w8a8|fast|sim|seed0"], rows["tinydit|fp32|default|sim|seed0"]
    assert q["sampler"] == "folder" and q["steps"] == 3 and 0.0 <= q["class_accuracy"] <= 1.0
    # scored where quantization differences show: FID at guidance 1 (paired to FP at guidance 1), per-class FID
    g1 = q["g1"]
    assert g1["guidance"] == 1.0 and g1["digits_fid"] != q["digits_fid"] and 0.0 <= g1["class_accuracy"] <= 1.0
    assert g1["vs_fp"] == pytest.approx(g1["digits_fid"] / fp["g1"]["digits_fid"])
    assert g1["fp_ratio_lo"] <= g1["fp_ratio_hi"] and "fp_ratio_lo" not in fp["g1"]
    assert q["per_class_fid"] > 0 and g1["per_class_fid"] > 0
    assert len(q["step_error"]["per_step_rel_err"]) == 3 and q["step_error"]["mean_rel_err"] > 0
    manifest = json.loads((zq.artifact("tinydit", "w8a8", "fast") / "manifest.json").read_text())
    assert "FlowMatchEuler" in json.dumps(manifest["scheduler_config"])
