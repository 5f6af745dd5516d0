"""Issue 23, the server: `dqdeploy serve` started as a user starts it (a subprocess on a free localhost port) on tiny
Stable-Diffusion, SD3 and Flux pipeline exports and a tiny unconditional denoiser export, all quantized and exported
here (SD3's and Flux's: the pipeline tests' fixtures, conftest.py). Concurrent requests run as one batch and each gets
the image it gets alone, byte for byte, which is the library's image; hostile requests (a negative prompt to Flux
among them) get a 4xx JSON error and leave the server up; SIGTERM/SIGINT stop it cleanly."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from dqdeploy.core.errors import RuntimeInputError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.exporters.export import export
from dqdeploy.stages.quantize import quantize
from tests.helpers import tiny_unet, write_pipeline, write_sd_pipeline
from tests.integration.test_cli_errors import ROOT

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

RECIPE = W8A8.replace(distill="none", fallback="none", layout="ort")
SD_CALIB = CalibrationConfig(steps=4, samples=16, trajectories=2, batch_size=2)
DIGITS_CALIB = CalibrationConfig(steps=4, samples=16, trajectories=2, batch_size=4, scheduler="ddim")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-sd")
    pipe = write_sd_pipeline(root / "pipe")
    q = quantize(pipe, RECIPE, SD_CALIB, root / "q", prompts=["hello cat", "a cat"]).path
    return export(q, root / "e", target="ort", pipeline=pipe)


@pytest.fixture(scope="module")
def noise_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-uncond")
    q = quantize(write_pipeline(tiny_unet(), root / "pipe"), RECIPE, DIGITS_CALIB, root / "q").path
    return export(q, root / "e", target="ort")


class Server:
    """A running `dqdeploy serve` and a small HTTP client for it."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    def call(self, path: str, body: bytes | None = None, method: str | None = None) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def generate(self, **fields) -> tuple[int, dict, bytes]:
        return self.call("/generate", json.dumps(fields).encode())

    def json(self, path: str) -> dict:
        status, _, body = self.call(path)
        assert status == 200, body
        return json.loads(body)

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(signum)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@contextmanager
def serving(export_dir, *args: str):
    proc = subprocess.Popen([sys.executable, "-m", "dqdeploy", "serve", str(export_dir), "--port", "0", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert " on http://127.0.0.1:" in line, line + proc.stderr.read()
        server = Server(proc, line.split(" on ")[1].split()[0])
        for _ in range(100):  # the socket listens before uvicorn serves: wait for the first answer
            try:
                server.json("/health")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def concurrently(server: Server, bodies: list[dict]) -> list[tuple[int, dict, bytes]]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: server.generate(**body), bodies))


def test_pipeline_batches_concurrent_prompts_and_each_gets_its_own_image(sd_export):
    import dqdeploy

    bodies = [{"prompt": "a cat", "seed": 1}, {"prompt": "hello cat", "seed": 2, "guidance": 3.0},
              {"prompt": "a cat", "seed": 3, "negative_prompt": "hello"}, {"prompt": "a cat", "seed": 1}]
    with serving(sd_export, "--max-batch", "4", "--batch-window-ms", "500") as server:
        health = server.json("/health")
        assert (health["kind"], health["default_steps"], health["torch_imported"]) == ("pipeline", 4, False)
        assert (health["model"], health["default_guidance"]) == ("UNet2DConditionModel", 7.5)
        alone = [server.generate(**body) for body in bodies]  # one after the other: batches of one
        together = concurrently(server, bodies)
        metrics = server.json("/metrics")
        code, err = server.stop()
    assert code == 0 and "Traceback" not in err, err
    assert [(s, h["x-batch-size"], h["content-type"]) for s, h, _ in alone] == [(200, "1", "image/png")] * 4
    assert [(s, h["x-batch-size"]) for s, h, _ in together] == [(200, "4")] * 4  # one model call, CFG pairs: 8 rows
    assert metrics["batch_sizes"] == {"1": 4, "4": 1} and metrics["requests"] == 8
    assert metrics["errors"] == {"client": 0, "server": 0} and metrics["latency_ms"]["p99"] > 0
    images = [pixels(png) for _, _, png in together]
    assert images[0].shape == (16, 16, 3)
    assert [png for _, _, png in together] == [png for _, _, png in alone]  # batched == alone, byte for byte
    assert np.array_equal(images[0], images[3])  # same prompt and seed: same image
    assert np.abs(images[0] - images[2]).max() > 10  # another seed (and negative prompt): another image
    pipe = dqdeploy.load_pipeline(sd_export)  # the library's image for the same request
    library = pipe("hello cat", seed=2, guidance_scale=3.0, output_type="np").images[0]
    assert np.array_equal((library * 255).round(), pixels(alone[1][2]))
    with pytest.raises(RuntimeInputError, match="mixes scales above 1"):
        pipe(["a", "b"], seed=[1, 2], guidance_scale=[1.0, 7.5])
    with pytest.raises(RuntimeInputError, match="1 seeds for 2 prompts"):
        pipe(["a", "b"], seed=[1])


def test_a_batch_mixes_guided_and_unguided_requests_into_separate_calls(sd_export):
    bodies = [{"prompt": "a cat", "seed": 5, "guidance": 1.0}, {"prompt": "a cat", "seed": 5, "guidance": 7.5},
              {"prompt": "a cat", "seed": 6, "guidance": 1.0, "format": "json"}]
    with serving(sd_export, "--max-batch", "8", "--batch-window-ms", "500") as server:
        results = concurrently(server, bodies)
        alone = server.generate(prompt="a cat", seed=6, guidance=1.0)
        server.stop()
    sizes = sorted(int(h["x-batch-size"]) if "x-batch-size" in h else json.loads(b)["batch_size"]
                   for _, h, b in results)
    assert sizes == [1, 2, 2]  # the two unguided together, the guided one alone
    as_json = json.loads(results[2][2])
    assert results[2][1]["content-type"] == "application/json" and as_json["seed"] == 6
    assert base64.b64decode(as_json["png_base64"]) == alone[2]


HOSTILE_SD = [
    (b"not json", 400, "not JSON"), (b"[1, 2]", 400, "JSON list"), (b"\xff\xfe{}", 400, "not JSON"),
    (b'{"seed": 0}', 422, "no 'prompt'"), (b'{"prompt": 7}', 422, "expected a string"),
    (json.dumps({"prompt": ["a cat"] * 1000}).encode(), 422, "found a JSON list"),
    (json.dumps({"prompt": ["a cat"] * 10_000}).encode(), 413, "at most 65536"),
    (b'{"prompt": "a", "steps": 100000}', 422, "steps=100000"), (b'{"prompt": "a", "steps": 0}', 422, "steps=0"),
    (b'{"prompt": "a", "steps": "4"}', 422, 'steps="4"'), (b'{"prompt": "a", "seed": -1}', 422, "seed=-1"),
    (b'{"prompt": "a", "seed": 1.5}', 422, "seed=1.5"), (b'{"prompt": "a", "seed": true}', 422, "seed=true"),
    (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", 400, "not JSON"),
    (b'{"prompt": "a", "guidance": NaN}', 422, "guidance=nan"),
    (b'{"prompt": "a", "guidance": 1e300}', 422, "guidance"),
    (b'{"prompt": "a", "format": "gif"}', 422, "format"), (b'{"prompt": "a", "n": 10000}', 422, "unknown field"),
    (b'{"prompt": "a", "class_label": 3}', 422, "no class input"), (b"[" * 100_000, 413, "at most"),
    (b"[" * 60_000, 400, "not JSON"),
    (json.dumps({"prompt": "x" * 3000}).encode(), 422, "at most 2000 characters"),
]


def test_hostile_requests_get_a_4xx_json_error_and_the_server_stays_up(sd_export):
    with serving(sd_export) as server:
        answers = [server.call("/generate", body) for body, _, _ in HOSTILE_SD]
        other = [server.call("/nowhere")[0], server.call("/generate")[0], server.call("/health", b"{}")[0]]
        status, _, png = server.generate(prompt="a cat", seed=0)  # still serving
        metrics = server.json("/metrics")
        code, err = server.stop(signal.SIGINT)
    for (body, expected, needle), (got, headers, text) in zip(HOSTILE_SD, answers):
        assert got == expected and headers["content-type"] == "application/json", (body[:60], got, text)
        assert needle in json.loads(text)["error"], (body[:60], text)
        assert b"Traceback" not in text
    assert other == [404, 405, 405] and status == 200 and pixels(png).shape == (16, 16, 3)
    assert metrics["errors"] == {"client": len(HOSTILE_SD) + 3, "server": 0} and metrics["requests"] == 1
    assert code == 0 and "Traceback" not in err and "stopped" in err, err


def test_denoiser_export_serves_seeds_batched_and_alone_alike(noise_export):
    seeds = [0, 1, 2, 0]
    with serving(noise_export, "--max-batch", "4", "--batch-window-ms", "500") as server:
        health = server.json("/health")
        together = concurrently(server, [{"seed": s} for s in seeds])
        alone = [server.generate(seed=s) for s in seeds[:3]]
        refused = server.generate(prompt="a cat")
        in_flight = ThreadPoolExecutor(1).submit(server.generate, seed=9, steps=100)
        time.sleep(0.3)
        code, err = server.stop(signal.SIGTERM)  # lets the request in flight finish
    assert (health["kind"], health["fields"], health["torch_imported"]) == ("denoiser", ["seed", "steps", "format"],
                                                                             False)
    assert [(s, h["x-batch-size"]) for s, h, _ in together] == [(200, "4")] * 4
    images = [pixels(png) for _, _, png in together]
    assert images[0].shape == (8, 8)  # grayscale, the model's size
    for batched, (_, _, single) in zip(images, alone):
        assert np.abs(batched - pixels(single)).max() <= 1
    assert np.array_equal(images[0], images[3]) and not np.array_equal(images[0], images[1])
    assert refused[0] == 422 and "unconditional" in json.loads(refused[2])["error"]
    assert in_flight.result(timeout=60)[0] == 200
    assert code == 0 and "Traceback" not in err, err


def test_a_ddpm_calibrated_export_needs_a_numpy_sampler_named(tmp_path):
    from dqdeploy.core.errors import PipelineError
    from dqdeploy.runtimes.sampler import OrtSampler

    calib = CalibrationConfig(steps=4, samples=8, trajectories=2, batch_size=4)  # the folder's own DDPMScheduler
    q = quantize(write_pipeline(tiny_unet(), tmp_path / "pipe"), RECIPE, calib, tmp_path / "q").path
    e = export(q, tmp_path / "e", target="ort")
    with pytest.raises(PipelineError, match="DDPMScheduler") as refused:
        OrtSampler(e)
    assert "dqdeploy serve --scheduler" in str(refused.value)
    proc = subprocess.run([sys.executable, "-m", "dqdeploy", "serve", str(e)], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--scheduler" in proc.stderr, proc.stderr
    sampler = OrtSampler(e, "DDIMScheduler")  # the recorded config read as DDIM: the calibrated step count
    images = sampler([0, 1], sampler.default_steps)
    assert sampler.default_steps == 4 and images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert np.array_equal(images[1], sampler([1])[0])


def test_serve_without_its_extra_says_how_to_install_it(noise_export):
    code = "import sys; sys.modules['uvicorn'] = None; from dqdeploy.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "serve", str(noise_export)], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'dqdeploy[serve]'" in proc.stderr


def test_serve_refuses_a_taken_port_and_a_missing_export(noise_export, tmp_path):
    with serving(noise_export) as server:
        port = server.url.rsplit(":", 1)[1]
        proc = subprocess.run([sys.executable, "-m", "dqdeploy", "serve", str(noise_export), "--port", port],
                              env=ENV, capture_output=True, text=True, timeout=120)
        server.stop()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and f"cannot listen on 127.0.0.1:{port}" in \
        proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dqdeploy", "serve", str(tmp_path / "nothing")], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "error:" in proc.stderr, proc.stderr


# SD3 pairs CFG rows as Stable Diffusion does (guided and unguided requests run apart); Flux feeds each request's
# guidance to the transformer (one row per request: every scale runs in one batch).
TRANSFORMER_BODIES = {
    "sd3": ([{"prompt": "a cat", "seed": 1}, {"prompt": "hello cat", "seed": 2, "guidance": 3.0, "negative_prompt":
             "a dog"}, {"prompt": "a cat", "seed": 3, "guidance": 1.0}], ["2", "2", "1"], 7.0),
    "flux": ([{"prompt": "a cat", "seed": 1}, {"prompt": "hello cat", "seed": 2, "guidance": 1.0},
              {"prompt": "a cat", "seed": 3, "guidance": 5.0}], ["3", "3", "3"], 3.5),
}


@pytest.mark.parametrize("family", sorted(TRANSFORMER_BODIES))
def test_sd3_and_flux_exports_serve_the_pipeline_s_image_batched_or_alone(family, request):
    import dqdeploy

    e = request.getfixturevalue(family)[2]
    bodies, sizes, guidance = TRANSFORMER_BODIES[family]
    with serving(e, "--max-batch", "4", "--batch-window-ms", "500") as server:
        health = server.json("/health")
        alone = [server.generate(**body) for body in bodies]
        together = concurrently(server, bodies)
        code, err = server.stop()
    assert code == 0 and "Traceback" not in err, err
    assert (health["kind"], health["default_guidance"], health["torch_imported"]) == ("pipeline", guidance, False)
    assert [(s, h["x-batch-size"]) for s, h, _ in alone] == [(200, "1")] * len(bodies)
    assert [(s, h["x-batch-size"]) for s, h, _ in together] == [(200, size) for size in sizes]
    assert [png for _, _, png in together] == [png for _, _, png in alone]  # byte for byte
    pipe = dqdeploy.load_pipeline(e)  # the library's images: default guidance and steps, the request's seed
    for body, (_, _, png) in zip(bodies, alone):
        scale = body.get("guidance", guidance)
        image = pipe(body["prompt"], body.get("negative_prompt"), seed=body["seed"], output_type="np",
                     guidance_scale=None if "guidance" not in body else scale).images[0]
        assert np.array_equal((image * 255).round(), pixels(png)), body
    assert len({png for _, _, png in alone}) == len(bodies)  # another seed or guidance: another image


def test_flux_refuses_a_negative_prompt_with_a_422_and_its_batch_runs_on(flux):
    bodies = [{"prompt": "a cat", "seed": 1}, {"prompt": "a cat", "seed": 2, "negative_prompt": "a dog"},
              {"prompt": "a cat", "seed": 3, "negative_prompt": ""}]  # empty: no negative prompt, as the library
    with serving(flux[2], "--max-batch", "4", "--batch-window-ms", "500") as server:
        health = server.json("/health")
        answers = concurrently(server, bodies)
        metrics = server.json("/metrics")
        server.stop()
    assert health["fields"] == ["prompt", "guidance", "seed", "steps", "format"]
    (ok, _, _), (status, headers, body), (empty, _, _) = answers
    assert (ok, empty, status, headers["content-type"]) == (200, 200, 422, "application/json"), body
    error = json.loads(body)
    assert "guidance-distilled" in error["error"] and "FluxTransformer2DModel" in error["error"], error
    assert "leave out negative_prompt" in error["hint"], error
    assert metrics["errors"] == {"client": 1, "server": 0} and metrics["batch_sizes"] == {"2": 1}
