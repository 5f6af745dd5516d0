"""The HTTP side: a Starlette app (``POST /generate``, ``GET /health``, ``GET /metrics``) on uvicorn. Every refusal is
a JSON ``{"error", "hint"}`` with a 4xx status, every failure a JSON 500: a client never sees a traceback and no
request stops the server. SIGINT/SIGTERM: uvicorn stops taking connections, finishes the requests in flight,
then the batcher stops."""

from __future__ import annotations

import base64
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ..core.errors import DQDeployError, require
from .batcher import Batcher
from .metrics import Metrics
from .models import ServedModel
from .requests import MAX_BODY_BYTES, RequestError, parse_job

log = logging.getLogger(__name__)
GRACE_S = 30  # SIGTERM: how long requests in flight may take to finish


@dataclass(frozen=True)
class Settings:
    """How the server batches: up to ``max_batch`` jobs arriving within ``window_ms``; ``max_queue`` waiting."""

    max_batch: int = 8
    window_ms: float = 10.0
    max_queue: int = 256


def make_app(model: ServedModel, settings: Settings) -> Any:
    """The Starlette app serving ``model``."""
    require("starlette", "serve", "`dqdeploy serve`")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = Metrics()
    batcher = Batcher(model, metrics, max_batch=settings.max_batch, window_s=settings.window_ms / 1000,
                      max_queue=settings.max_queue)

    def refuse(error: RequestError) -> JSONResponse:
        metrics.client_errors += 1
        return JSONResponse(error.to_json(), status_code=error.status)

    async def generate(request: Request) -> Response:
        start = time.perf_counter()
        try:
            job = parse_job(await _body(request), model.rules)
            result = await batcher.submit(job)
        except RequestError as error:
            return refuse(error)
        except ClientDisconnect:  # gone before its body arrived: nobody to answer
            metrics.client_errors += 1
            return Response(status_code=400)
        except Exception as exc:  # a failed batch: the server stays up, the client gets the reason
            metrics.server_errors += 1
            log.error("a batch failed: %s: %s", type(exc).__name__, exc)
            what = str(exc) if isinstance(exc, DQDeployError) else f"{type(exc).__name__}: {str(exc)[:300]}"
            return JSONResponse({"error": f"generation failed: {what}"}, status_code=500)
        metrics.answered(time.perf_counter() - start)
        headers = {"X-Seed": str(job.seed), "X-Steps": str(job.steps), "X-Batch-Size": str(result.batch_size)}
        if job.format == "json":
            return JSONResponse({"seed": job.seed, "steps": job.steps, "batch_size": result.batch_size,
                                 "png_base64": base64.b64encode(result.png).decode("ascii")})
        return Response(result.png, media_type="image/png", headers=headers)

    async def health(request: Request) -> Response:
        return JSONResponse(_health(model, settings))

    async def metrics_route(request: Request) -> Response:
        return JSONResponse(metrics.snapshot(batcher.waiting))

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        metrics.client_errors += status < 500
        return JSONResponse({"error": f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'error')}",
                             "hint": "POST /generate, GET /health, GET /metrics"}, status_code=status)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    routes = [Route("/generate", generate, methods=["POST"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_route, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def _health(model: ServedModel, settings: Settings) -> dict[str, Any]:
    """The JSON of ``/health``: what is served (a pipeline's default guidance and whether it is classifier-free too)
    and whether torch was imported (it never is)."""
    rules = model.rules
    guidance = {"default_guidance": rules.guidance, "classifier_free": rules.cfg} if rules.conditional else {}
    return {"status": "ok", "kind": model.kind, "model": rules.model, "conditional": rules.conditional,
            "default_steps": rules.default_steps, "max_steps": rules.max_steps, **guidance,
            "max_batch": settings.max_batch, "fields": list(rules.fields), "torch_imported": "torch" in sys.modules}


async def _body(request: Any) -> bytes:
    """The request body, refused (413) as soon as it passes :data:`MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"a body of {declared} bytes: expected at most {MAX_BODY_BYTES}",
                           hint="send one request per image with a short prompt")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"a body of more than {MAX_BODY_BYTES} bytes",
                               hint="send one request per image with a short prompt")
        chunks.append(chunk)
    return b"".join(chunks)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (``port`` 0: a free one), so the address is known before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DQDeployError(f"cannot listen on {host}:{port}: {exc.strerror}",
                            hint="choose another --port (0: any free one), or stop what holds it") from None
    sock.listen(2048)
    return sock


def run(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM (which then surface as the process's signal handlers raise)."""
    uvicorn = require("uvicorn", "serve", "`dqdeploy serve`")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=GRACE_S)
    uvicorn.Server(config).run(sockets=[sock])
