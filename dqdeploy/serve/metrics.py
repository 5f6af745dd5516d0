"""The server's counters for ``GET /metrics``: requests, errors, batch sizes, latency percentiles over the last
requests, resident memory. Bounded: the latency window keeps a fixed number of samples."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import numpy as np

from ..system.progress import peak_rss_gb, rss_gb

LATENCY_WINDOW = 10_000  # requests whose latency the percentiles cover


class Metrics:
    """Counters the app and the batcher update (on the event loop's thread only)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests = 0  # answered with an image
        self.client_errors = 0  # 4xx, the queue's 503 included
        self.server_errors = 0  # 5xx: a batch that failed
        self.batch_sizes: Counter[int] = Counter()  # jobs per model call -> calls
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)  # seconds, request in to response out

    def batch(self, size: int) -> None:
        """A model call of ``size`` jobs ran."""
        self.batch_sizes[size] += 1

    def answered(self, seconds: float) -> None:
        """A request got its image after ``seconds``."""
        self.requests += 1
        self.latencies.append(seconds)

    def snapshot(self, queued: int) -> dict[str, Any]:
        """The JSON of ``/metrics`` (``queued``: jobs waiting now)."""
        batches = sum(self.batch_sizes.values())
        jobs = sum(size * calls for size, calls in self.batch_sizes.items())
        window = np.asarray(self.latencies, dtype=np.float64) * 1000
        latency = ({"p50": round(float(np.percentile(window, 50)), 2),
                    "p99": round(float(np.percentile(window, 99)), 2), "window": len(window)}
                   if len(window) else {"p50": None, "p99": None, "window": 0})
        rss = rss_gb()
        return {
            "uptime_s": round(time.monotonic() - self.started, 1),
            "requests": self.requests,
            "errors": {"client": self.client_errors, "server": self.server_errors},
            "queued": queued,
            "batches": batches,
            "batch_sizes": {str(size): calls for size, calls in sorted(self.batch_sizes.items())},
            "mean_batch": round(jobs / batches, 2) if batches else None,
            "latency_ms": latency,
            "rss_mb": None if rss is None else round(rss * 1000, 1),
            "peak_rss_mb": round(peak_rss_gb() * 1000, 1),
        }
