"""``dqdeploy serve``: an export folder behind an HTTP server, concurrent requests batched (:mod:`dqdeploy.serve`)."""

from __future__ import annotations

from pathlib import Path

import click

from .params import POSITIVE

SAMPLERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler"}


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--max-batch", default=8, show_default=True, type=POSITIVE,
              help="Most requests in one model call (with classifier-free guidance, Stable Diffusion's and SD3's, "
                   "a guided prompt is 2 rows of the denoiser's batch; Flux's is 1).")
@click.option("--batch-window-ms", default=10.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="How long the first waiting request waits for others to join its batch.")
@click.option("--steps", type=POSITIVE, help="Default sampling steps of a request (default: the calibrated count).")
@click.option("--max-steps", default=100, show_default=True, type=POSITIVE,
              help="Most sampling steps a request may ask for (at least --steps).")
@click.option("--max-queue", default=256, show_default=True, type=POSITIVE,
              help="Requests waiting beyond this are refused with 503.")
@click.option("--scheduler", type=click.Choice(sorted(SAMPLERS)),
              help="Denoiser exports: sample with this numpy sampler on the recorded sampler config "
                   "(default: the calibrated sampler; DDPM-calibrated exports need one).")
@click.option("--threads", default=1, show_default=True, type=POSITIVE, help="ONNX Runtime intra-op threads.")
def serve(export_dir, host, port, max_batch, batch_window_ms, steps, max_steps, max_queue, scheduler,
          threads) -> None:
    """Serve an export folder over HTTP: POST /generate -> PNG, GET /health, GET /metrics.

    \b
    A pipeline export (`dqdeploy export Q --target ort --out E --pipeline MODEL_DIR`) takes
      {"prompt": "a cat", "negative_prompt": "", "seed": 0, "steps": 4, "guidance": 7.5}
    (default guidance: 7.5 Stable Diffusion, 7.0 SD3, 3.5 Flux; Flux takes no negative_prompt);
    an unconditional denoiser export (e.g. the digits DDPM) {"seed": 0, "steps": 10};
    "format": "json" returns {"png_base64": ...} instead of image/png. Requests arriving within
    --batch-window-ms run as one batch of up to --max-batch; each gets the image it would get alone.
    Both run on ONNX Runtime without PyTorch. Needs `pip install 'dqdeploy[serve]'`.

    \b
      dqdeploy serve E --port 8000 &
      curl -s localhost:8000/generate -d '{"prompt": "a cat", "seed": 1}' -o cat.png
    """
    from ..core.errors import require
    from ..serve.app import Settings, listening_socket, make_app, run
    from ..serve.models import open_served
    from ..system.interrupts import Terminated

    for module in ("starlette", "uvicorn"):  # said before the model loads
        require(module, "serve", "`dqdeploy serve`")
    model = open_served(export_dir, scheduler=SAMPLERS.get(scheduler), max_steps=max(max_steps, steps or 1),
                        default_steps=steps, threads=threads)
    app = make_app(model, Settings(max_batch, batch_window_ms, max_queue))
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    click.echo(f"serving {export_dir} ({model.describe()}) on http://{host}:{bound} -- batches of up to {max_batch} "
               f"within {batch_window_ms:g} ms; Ctrl-C stops", err=True)
    try:
        run(app, sock)
    except (KeyboardInterrupt, Terminated):  # uvicorn finished the requests in flight, then re-raised the signal
        click.echo("stopped", err=True)
    finally:
        sock.close()
