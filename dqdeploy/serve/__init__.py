"""``dqdeploy serve``: an export folder behind an HTTP server (Starlette on uvicorn), concurrent requests batched
into one ONNX Runtime call (:mod:`.batcher`), PNGs back (:mod:`.models`), requests checked before they queue
(:mod:`.requests`), counters at ``/metrics`` (:mod:`.metrics`), the app and its routes in :mod:`.app`."""
