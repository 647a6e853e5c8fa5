"""The request queue in front of the (synchronous, PyTorch) engine.

The engine runs one forward at a time per model (``LLM.lock``; it also switches the model's attention
implementation for the duration of a call), so the server runs one engine job at a time, in a
worker thread, and queues the others FIFO (at most ``max_waiting``; beyond that requests get 503).
A job's thread pushes its events into an ``asyncio.Queue`` on the event loop; cancelling a job
(client gone) sets a flag the engine checks at every decode step, so the decode loop stops and the
job's KV is freed when its generator closes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvsift.server.errors import APIError

_END = object()


class JobFailed(Exception):
    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


class Job:
    """One unit of engine work. ``work(job)`` runs in the worker thread and calls ``job.emit(item)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.arrived = time.perf_counter()
        self.started: float | None = None
        self.admitted = False

    # called from the worker thread
    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self) -> None:
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        """The engine's ``cancel`` callback (checked once per decode step)."""
        return self._cancelled.is_set()

    async def items(self) -> AsyncIterator[Any]:
        """The items the work emits, in order; re-raises the work's exception as ``JobFailed``."""
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            if isinstance(item, JobFailed):
                raise item
            yield item


class Scheduler:
    def __init__(self, max_waiting: int, metrics=None):
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvsift-engine")
        self._sem: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0
        self.jobs: set[Job] = set()

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(1)
        return self._sem

    def new_job(self) -> Job:
        """Admit a job to the queue now (so a full queue is a 503 before any response starts)."""
        if self.waiting >= self.max_waiting and (self.running or self.waiting):
            raise APIError(503, f"the server is busy: {self.running} running and {self.waiting} waiting requests "
                                f"(limit {self.max_waiting}); retry later", code="server_busy")
        job = Job(asyncio.get_running_loop())
        job.admitted = True
        self.waiting += 1
        self.jobs.add(job)
        self._update()
        return job

    async def run(self, job: Job, work: Callable[[Job], None]) -> None:
        """Wait for the engine, then start ``work`` in the worker thread (returns once it has started;
        read its output with ``job.items()``). If the caller is cancelled while waiting, the job
        leaves the queue."""
        sem = self._semaphore()
        try:
            await sem.acquire()
        except BaseException:
            self._leave(job)
            raise
        self.waiting -= 1
        if job.is_cancelled():  # the client left while queued
            sem.release()
            self.jobs.discard(job)
            self._update()
            job.queue.put_nowait(_END)
            return
        self.running += 1
        job.started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.queue_time.observe(job.started - job.arrived)
        self._update()

        def thread_main():
            try:
                work(job)
            except BaseException as e:  # noqa: BLE001 - handed to the request
                job.emit(JobFailed(e))
            finally:
                job.emit(_END)

        fut = job.loop.run_in_executor(self.executor, thread_main)
        fut.add_done_callback(lambda _f: self._finish(job))

    def _leave(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.discard(job)
            self.waiting -= 1
            self._update()

    def abandon(self, job: Job) -> None:
        """A request ended before its job ran (e.g. a validation error after admission)."""
        job.cancel()
        if job.started is None:
            self._leave(job)

    def _finish(self, job: Job) -> None:
        self.running -= 1
        self.jobs.discard(job)
        self._semaphore().release()
        self._update()

    def _update(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting)

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.cancel()

    def shutdown(self) -> None:
        self.cancel_all()
        self.executor.shutdown(wait=True, cancel_futures=True)
