"""Concurrent requests stacked into one model call: jobs that arrive within a short window of the first waiting job
and share its key (:meth:`~.models.ServedModel.key`) run as one batch of up to ``max_batch`` jobs; jobs of other
keys wait, in arrival order, for the next batch. The model runs in one worker thread, so the event loop keeps
answering (``/health``, ``/metrics``, refusals) while ONNX Runtime works, and jobs keep queueing for the next
batch meanwhile."""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .metrics import Metrics
from .models import ServedModel
from .requests import Job, RequestError


@dataclass
class Pending:
    """A queued job, its batch key, when it arrived, and the future its response waits on."""

    job: Job
    key: object
    arrived: float
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class Result:
    """A job's PNG and the size of the batch that made it."""

    png: bytes
    batch_size: int


class Batcher:
    """The queue between the routes and the model (start with :meth:`start` on the running loop)."""

    def __init__(self, model: ServedModel, metrics: Metrics, *, max_batch: int, window_s: float,
                 max_queue: int) -> None:
        self.model, self.metrics = model, metrics
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.held: deque[Pending] = deque()  # taken from the queue, of another key than the last batch's
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dqdeploy-serve")
        self.task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet running."""
        return self.queue.qsize() + len(self.held)

    def start(self) -> None:
        """Start taking batches (on the running event loop)."""
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop taking batches; waits for a running batch, fails the jobs still queued (503)."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        while self.waiting:
            pending = self.held.popleft() if self.held else self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RequestError(503, "the server is shutting down"))
        self.executor.shutdown(wait=True)

    async def submit(self, job: Job) -> Result:
        """Queue ``job`` and wait for its result (:class:`RequestError` 503 when the queue is full)."""
        if self.waiting >= self.max_queue:
            raise RequestError(503, f"{self.waiting} requests are waiting: the queue holds {self.max_queue}",
                               hint="retry later, or start the server with a larger --max-queue")
        loop = asyncio.get_running_loop()
        pending = Pending(job, self.model.key(job), loop.time(), loop.create_future())
        self.queue.put_nowait(pending)
        return await pending.future

    async def _loop(self) -> None:
        while True:
            batch = [p for p in await self._next_batch() if not p.future.done()]  # skips requests gone meanwhile
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[Pending]:
        """The first waiting job and those of its key that arrive within the window (or are waiting already)."""
        loop = asyncio.get_running_loop()
        if not self.held:
            self.held.append(await self.queue.get())
        key, deadline = self.held[0].key, self.held[0].arrived + self.window_s
        batch = [p for p in self.held if p.key == key][: self.max_batch]
        self.held = deque(p for p in self.held if all(p is not b for b in batch))
        while len(batch) < self.max_batch:
            try:
                pending = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if deadline <= loop.time():
                    break
                try:
                    pending = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            (batch if pending.key == key else self.held).append(pending)
        return batch

    async def _run(self, batch: list[Pending]) -> None:
        jobs = [p.job for p in batch]
        try:
            pngs = await asyncio.get_running_loop().run_in_executor(self.executor, self.model.run, jobs)
        except (Exception, asyncio.CancelledError) as exc:  # every job of the batch gets the error (the route: 500)
            error = RequestError(503, "the server is shutting down") if isinstance(exc, asyncio.CancelledError) else exc
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.metrics.batch(len(batch))
        for p, image in zip(batch, pngs):
            if not p.future.done():
                p.future.set_result(Result(image, len(batch)))
