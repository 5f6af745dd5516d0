"""Upper bounds per candidate cause: how much of a quantized artifact's error would go away if a
group of layers stayed in float (all of it, only its weights, only its activations). A fix aimed at a
group (split quantization of the skip-concat inputs, time-embedding handling, attention, first/last
layers) can save at most this much.

Usage: python bench/groups.py Q NAME   (writes bench/results/groups-NAME.json)
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import zoo  # noqa: E402
from bench.common import write_results  # noqa: E402
from dqdeploy.io.artifact import load_calibration_inputs, load_quantized, read_manifest  # noqa: E402
from dqdeploy.io.models import make_scheduler  # noqa: E402
from dqdeploy.quant.modules import quant_layers  # noqa: E402
from dqdeploy.quant.sensitivity import ErrorMeter, scheduler_weights  # noqa: E402

GROUPS = {
    "skip-concat readers (up-block conv_shortcut)": ["up_blocks.*.resnets.*.conv_shortcut"],
    "skip-concat readers (up-block conv1 + conv_shortcut)": ["up_blocks.*.resnets.*.conv_shortcut",
                                                             "up_blocks.*.resnets.*.conv1"],
    "time-embedding MLP + time_emb_proj": ["time_embedding.*", "*time_emb_proj"],
    "attention projections": ["*attentions*"],
    "conv_in": ["conv_in"],
    "conv_out": ["conv_out"],
    "first + last": ["conv_in", "conv_out"],
}


def main() -> None:
    quant_dir, name = sys.argv[1], sys.argv[2]
    zoo.refuse_held_out(quant_dir, "group ablations")
    manifest = read_manifest(quant_dir)
    model, inputs = load_quantized(quant_dir), load_calibration_inputs(quant_dir)
    weights = scheduler_weights(make_scheduler(manifest.calibration.get("scheduler", "ddim"),
                                               manifest.scheduler_config), manifest.timesteps)

    meter = ErrorMeter(model, inputs, 32, weights)
    names = list(quant_layers(model.denoiser))
    full = meter.mean(None, None)
    result = {"command": "python bench/groups.py " + " ".join(sys.argv[1:]), "artifact": quant_dir,
              "recipe": manifest.recipe.to_dict(), "full": full, "groups": {}}
    for group, patterns in GROUPS.items():
        members = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        others = [n for n in names if n not in members]
        result["groups"][group] = {
            "layers": len(members), "error_if_float": meter.mean(others, others),
            "gain": full - meter.mean(others, others),
            "gain_weights_float": full - meter.mean(others, None), "gain_acts_float": full - meter.mean(None, others),
        }
        print(group, result["groups"][group], flush=True)
    write_results(f"groups-{name}", result)


if __name__ == "__main__":
    main()
