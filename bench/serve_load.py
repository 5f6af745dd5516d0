"""Load test of `dqdeploy serve` on localhost: the shipped digits DDPM quantized (W8A8, small calibration, DDIM) and
exported for ONNX Runtime, served by the real server in a subprocess, driven by 1, 4 and 16 concurrent clients
(keep-alive HTTP, one request per image, a new seed each), a bounded number of requests in all.

Records per concurrency level: requests/s, client-side p50/p99 latency, errors (any non-200 or non-PNG answer),
the batch sizes the server ran (its /metrics); and the server's resident memory (/proc/PID/status VmRSS) every
``--rss-every`` requests from start to end: flat means no growth beyond noise over the run.

    nice -n 5 python bench/serve_load.py --requests 200 300 500
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLI, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "dqdeploy" / "assets" / "digits-ddpm"
QUANTIZE = ["--scheduler", "ddim", "--steps", "10", "--calib-samples", "64", "--trajectories", "8",
            "--distill", "none", "--fallback", "none"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def build_export(work: Path) -> tuple[Path, list[str]]:
    """The digits export the server runs, and the commands that made it."""
    commands = [[*CLI, "quantize", str(DIGITS), "--out", str(work / "q"), *QUANTIZE],
                [*CLI, "export", str(work / "q"), "--target", "ort", "--out", str(work / "e")]]
    for command in commands:
        subprocess.run(command, env=ENV, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    shown = [" ".join(["dqdeploy", *c[len(CLI):]]).replace(str(work), "WORK").replace(str(ROOT) + "/", "")
             for c in commands]
    return work / "e", shown


def build_tiny_sd(work: Path) -> tuple[Path, list[str]]:
    """A tiny Stable-Diffusion pipeline (random weights; the tests' builder), quantized W8A8 and exported with
    ``--pipeline``: prompt to 16x16 image, PNDM 4 steps, guided (a batch of 2 rows per request)."""
    from tests.helpers import write_sd_pipeline

    write_sd_pipeline(work / "pipe")
    (work / "prompts.txt").write_text("hello cat\na cat\n")
    commands = [[*CLI, "quantize", str(work / "pipe"), "--out", str(work / "q"), "--prompts", str(work / "prompts.txt"),
                 "--steps", "4", "--calib-samples", "16", "--trajectories", "2", "--batch-size", "2",
                 "--distill", "none", "--fallback", "none"],
                [*CLI, "export", str(work / "q"), "--target", "ort", "--out", str(work / "e"), "--pipeline",
                 str(work / "pipe")]]
    for command in commands:
        subprocess.run(command, env=ENV, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    shown = ["tests.helpers.write_sd_pipeline(WORK/pipe)"] + [
        " ".join(["dqdeploy", *c[len(CLI):]]).replace(str(work), "WORK") for c in commands]
    return work / "e", shown


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` now (MB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for process {pid}")


class Client:
    """One keep-alive connection per thread."""

    def __init__(self, port: int) -> None:
        self.port, self.local = port, threading.local()

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body); -1 when the request failed on a fresh connection too (the server closes idle ones)."""
        for _ in range(2):
            conn = getattr(self.local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if fresh:
                    break
        return -1, b""

    def metrics(self) -> dict:
        status, body = self.call("GET", "/metrics")
        assert status == 200, body
        return json.loads(body)


def start_server(export: Path, max_batch: int, window_ms: float) -> tuple[subprocess.Popen, int, list[str]]:
    args = ["serve", str(export), "--port", "0", "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms)]
    proc = subprocess.Popen([*CLI, *args], env=ENV, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stderr.readline() if proc.stderr else ""
    if " on http://127.0.0.1:" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line}")
    return proc, int(line.split(" on http://127.0.0.1:")[1].split()[0]), ["dqdeploy", *args]


def drive(client: Client, clients: int, requests: int, first_seed: int, on_done, prompt: str | None) -> dict:
    """``requests`` requests from ``clients`` threads (with ``prompt`` where the export takes one); latency and
    errors seen by the clients."""
    latencies: list[float] = []
    errors: list[str] = []

    def one(seed: int) -> None:
        start = time.perf_counter()
        fields = {"seed": seed, **({"prompt": prompt} if prompt else {})}
        status, body = client.call("POST", "/generate", json.dumps(fields).encode())
        latencies.append(time.perf_counter() - start)
        if status != 200 or not body.startswith(PNG):
            errors.append(f"{status}: {body[:200]!r}")
        on_done()

    before = client.metrics()["batch_sizes"]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(first_seed, first_seed + requests)))
    seconds = time.perf_counter() - start
    after = client.metrics()["batch_sizes"]
    batches = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    jobs = sum(int(k) * v for k, v in batches.items())
    ms = sorted(x * 1000 for x in latencies)
    return {"clients": clients, "requests": requests, "seconds": round(seconds, 2),
            "requests_per_s": round(requests / seconds, 2), "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 1), "errors": len(errors),
            "error_samples": errors[:3], "batch_sizes": batches,
            "mean_batch": round(jobs / sum(batches.values()), 2) if batches else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, nargs="+", default=[200, 300, 500],
                        help="requests per concurrency level (1000 in all by default)")
    parser.add_argument("--warmup", type=int, default=32, help="requests at each level before measuring")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--rss-every", type=int, default=100)
    parser.add_argument("--export", type=Path, help="an export folder (default: the digits model, built here)")
    parser.add_argument("--tiny-sd", action="store_true",
                        help="serve a tiny Stable-Diffusion pipeline export built here instead (prompt to image)")
    parser.add_argument("--label", help="the entry of bench/results/serve_load.json (default: digits / tiny-sd)")
    args = parser.parse_args()
    if len(args.requests) != len(args.clients):
        parser.error("--requests takes one count per --clients level")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as work:
        export, built = ((args.export, []) if args.export else build_tiny_sd(Path(work)) if args.tiny_sd
                         else build_export(Path(work)))
        proc, port, serve_command = start_server(export, args.max_batch, args.batch_window_ms)
        try:
            result = measure(proc, Client(port), args)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=120)
    result |= {"command": shlex.join(["python", "bench/serve_load.py", *sys.argv[1:]]), "export_commands": built,
               "serve_command": " ".join(serve_command).replace(str(export), "E"),
               "server_exit": proc.returncode, "server_traceback": "Traceback" in err}
    print(json.dumps({k: v for k, v in result.items() if k != "rss_series"}, indent=1))
    write_results("serve_load", result, label=args.label or ("tiny-sd" if args.tiny_sd else "digits"))


def measure(proc: subprocess.Popen, client: Client, args: argparse.Namespace) -> dict:
    for _ in range(100):  # the socket listens before uvicorn answers
        if client.call("GET", "/health")[0] == 200:
            break
        time.sleep(0.1)
    health = json.loads(client.call("GET", "/health")[1])
    prompt = "a cat" if health["conditional"] else None
    for clients in args.clients:  # every level's batch pattern once: ONNX Runtime's arena sized before the start
        drive(client, clients, args.warmup, 10**6, lambda: None, prompt)
    series = [(0, round(rss_mb(proc.pid), 1))]
    done = [0]
    lock = threading.Lock()

    def on_done() -> None:
        with lock:
            done[0] += 1
            if done[0] % args.rss_every == 0:
                series.append((done[0], round(rss_mb(proc.pid), 1)))

    levels, seed = [], 0
    for clients, requests in zip(args.clients, args.requests):
        levels.append(drive(client, clients, requests, seed, on_done, prompt))
        seed += requests
    if series[-1][0] != done[0]:
        series.append((done[0], round(rss_mb(proc.pid), 1)))
    metrics = client.metrics()
    total = done[0]
    middle = min(series, key=lambda point: abs(point[0] - total / 2))
    rss = {"start_mb": series[0][1], "middle_mb": middle[1], "end_mb": series[-1][1],
           "growth_mb": round(series[-1][1] - series[0][1], 1), "max_mb": max(v for _, v in series),
           "min_mb": min(v for _, v in series)}
    model = (f"tiny Stable-Diffusion pipeline (random weights, 16x16 RGB), W8A8 ort export, PNDM "
             f"{health['default_steps']} steps, guidance {health['default_guidance']:g}" if health["conditional"] else
             f"digits DDPM (shipped, 16x16x1), W8A8 ort export, DDIM {health['default_steps']} steps")
    return {"model": model if not args.export else f"{args.export.name}: {model}", "health": health, "levels": levels,
            "total_requests": total, "errors": sum(level["errors"] for level in levels), "rss": rss,
            "rss_series": series, "server_metrics": metrics,
            "settings": {"max_batch": args.max_batch, "batch_window_ms": args.batch_window_ms,
                         "warmup": args.warmup, "ort_threads": 1}}


if __name__ == "__main__":
    main()
