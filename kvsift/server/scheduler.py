"""The request queue in front of the (synchronous, PyTorch) engine.

The engine runs one forward at a time per model (``LLM.lock``; it also switches the model's attention
implementation for the duration of a call), so the server runs one engine job at a time, in a
worker thread, and queues the others FIFO. A job's thread pushes its events into an
``asyncio.Queue`` on the event loop; cancelling a job (client gone) sets a flag the engine checks at
every decode step, so the decode loop stops and the job's KV is freed when its generator closes.

Limits, checked when a job is admitted (before the request does any work), each a 429
(:class:`~kvsift.errors.RateLimitError`) with a ``Retry-After`` estimate:

* ``max_waiting``: most jobs waiting (:class:`~kvsift.errors.QueueFullError`);
* ``max_queue_s``: most expected wait (:class:`~kvsift.errors.QueueWaitError`);
* ``max_per_key``: most jobs of one API key queued or running, or the key's own ``max_concurrent``
  (:class:`~kvsift.errors.ConcurrencyLimitError`).

``max_run_s`` bounds a job's run time: past it, the engine's ``cancel`` check answers True (the
decode loop stops at its next step) and the job is marked ``timed_out``.

The estimates come from an exponential moving average of the recent jobs' run times
(``avg_job_s``, :data:`DEFAULT_JOB_S` before the first job finished): a running job is expected to
end at that average (or its time limit), each waiting job to take that long.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvsift.errors import ConcurrencyLimitError, QueueFullError, QueueWaitError
from kvsift.server.auth import Principal

_END = object()
DEFAULT_JOB_S = 1.0     # a job's expected run time before any job finished (Retry-After only)
_AVG_WEIGHT = 0.3       # weight of the latest job in the moving average of run times
ANONYMOUS_BUCKET = ""   # the requests of a server without keys are counted together


class JobFailed(Exception):
    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


class Job:
    """One unit of engine work. ``work(job)`` runs in the worker thread and calls ``job.emit(item)``.

    ``bucket``: the API key it is counted against; ``t_start`` / ``deadline``: when it started and
    when its run time is up (on the scheduler's clock); ``timed_out``: it was stopped at its deadline;
    ``ended``: set once the scheduler no longer counts it (running, waiting, its key's count)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bucket: str = ANONYMOUS_BUCKET,
                 clock: Callable[[], float] = time.monotonic):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.arrived = time.perf_counter()
        self.started: float | None = None
        self.admitted = False
        self.bucket = bucket
        self.clock = clock
        self.t_start: float | None = None
        self.deadline: float | None = None
        self.timed_out = False
        self.ended = asyncio.Event()

    # called from the worker thread
    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self) -> None:
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        """The engine's ``cancel`` callback (checked once per decode step): the client left, or the
        job's run time is up (then ``timed_out`` is set)."""
        if self._cancelled.is_set():
            return True
        if self.deadline is not None and self.clock() >= self.deadline:
            self.timed_out = True
            self._cancelled.set()
            return True
        return False

    async def items(self) -> AsyncIterator[Any]:
        """The items the work emits, in order; re-raises the work's exception as ``JobFailed``. The
        end (or the error) comes once the scheduler has let the job go, so a client that has its
        whole answer has its key's slot back."""
        while True:
            item = await self.queue.get()
            if item is _END:
                await self.ended.wait()
                return
            if isinstance(item, JobFailed):
                await self.ended.wait()
                raise item
            yield item


class Scheduler:
    """One engine job at a time, the others waiting FIFO; admission limits (see the module)."""

    def __init__(self, max_waiting: int, metrics=None, *, max_run_s: float | None = None,
                 max_queue_s: float | None = None, max_per_key: int | None = None):
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.max_run_s, self.max_queue_s, self.max_per_key = max_run_s, max_queue_s, max_per_key
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvsift-engine")
        self._sem: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0
        self.jobs: dict[Job, None] = {}          # admitted and not finished, in arrival order
        self.per_key: dict[str, int] = {}        # bucket -> its jobs queued or running
        self.avg_job_s: float | None = None      # moving average of run times (None: no job finished yet)
        self.clock: Callable[[], float] = time.monotonic  # run times, deadlines, estimates (a test hook)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(1)
        return self._sem

    def new_job(self, who: Principal | None = None) -> Job:
        """Admit a job for ``who`` to the queue now, before the request does any work (so a refusal
        is a 429 before any response starts): its key's limit, then the queue's length and wait."""
        bucket = (who.key_id if who is not None else None) or ANONYMOUS_BUCKET
        own = who is not None and who.max_concurrent is not None
        limit = who.max_concurrent if own else self.max_per_key
        held = self.per_key.get(bucket, 0)
        if limit is not None and held >= limit:
            where = "its max_concurrent in the keys file" if own else "--max-concurrent-per-key"
            raise ConcurrencyLimitError(f"this API key already has {held} requests queued or running, its limit "
                                        f"({where}: {limit}); retry when one of them has finished",
                                        retry_after=self._bucket_free_in(bucket))
        busy = self.running or self.waiting
        if self.waiting >= self.max_waiting and busy:
            raise QueueFullError(f"the server is busy: {self.running} running and {self.waiting} waiting requests, "
                                 f"the queue's limit (--max-waiting {self.max_waiting}); retry later",
                                 retry_after=self._running_left())
        if self.max_queue_s is not None and busy and self.avg_job_s is not None:
            wait = self.expected_wait()
            if wait > self.max_queue_s:
                raise QueueWaitError(f"the expected wait in the queue ({wait:.1f}s: {self.running} running and "
                                     f"{self.waiting} waiting requests) is over this server's limit of "
                                     f"{self.max_queue_s:g}s (--max-queue-seconds); retry later",
                                     retry_after=wait - self.max_queue_s)
        job = Job(asyncio.get_running_loop(), bucket, self.clock)
        job.admitted = True
        self.waiting += 1
        self.jobs[job] = None
        self.per_key[bucket] = held + 1
        self._update()
        return job

    # ---- estimates (seconds) ------------------------------------------------------------------
    def job_seconds(self) -> float:
        """A job's expected run time: the moving average, bounded by the run-time limit."""
        avg = self.avg_job_s if self.avg_job_s is not None else DEFAULT_JOB_S
        return min(avg, self.max_run_s) if self.max_run_s is not None else avg

    def _left(self, job: Job, now: float) -> float:
        return max(self.job_seconds() - (now - job.t_start), 0.0)

    def _running_left(self) -> float:
        """Until the first running job is expected to end (0 if none runs)."""
        now = self.clock()
        return min((self._left(j, now) for j in self.jobs if j.t_start is not None), default=0.0)

    def expected_wait(self) -> float:
        """How long a job admitted now is expected to wait before it runs."""
        return self._running_left() + self.waiting * self.job_seconds()

    def _bucket_free_in(self, bucket: str) -> float:
        """Until the first job of ``bucket`` is expected to end (its own run time, or its place in
        the queue after the running job)."""
        now = self.clock()
        mine = [self._left(j, now) for j in self.jobs if j.t_start is not None and j.bucket == bucket]
        if mine:
            return min(mine)
        waiting = [j for j in self.jobs if j.t_start is None]
        place = next((i for i, j in enumerate(waiting) if j.bucket == bucket), len(waiting))
        return self._running_left() + (place + 1) * self.job_seconds()

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
        if job not in self.jobs:  # abandoned while it waited (already out of the counts)
            sem.release()
            job.queue.put_nowait(_END)
            return
        self.waiting -= 1
        if job.is_cancelled():  # the client left while queued
            sem.release()
            self._forget(job)
            self._update()
            job.queue.put_nowait(_END)
            return
        self.running += 1
        job.started = time.perf_counter()
        job.t_start = self.clock()
        if self.max_run_s is not None:
            job.deadline = job.t_start + self.max_run_s
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

    def _forget(self, job: Job) -> None:
        """The job leaves the admitted set and its key's count (once)."""
        job.ended.set()
        if self.jobs.pop(job, _END) is _END:
            return
        n = self.per_key.get(job.bucket, 0) - 1
        if n > 0:
            self.per_key[job.bucket] = n
        else:
            self.per_key.pop(job.bucket, None)

    def _leave(self, job: Job) -> None:
        if job in self.jobs and job.t_start is None:
            self._forget(job)
            self.waiting -= 1
            self._update()

    def abandon(self, job: Job) -> None:
        """A request ended before its job ran (e.g. a validation error after admission)."""
        job.cancel()
        if job.started is None:
            self._leave(job)

    def _finish(self, job: Job) -> None:
        took = self.clock() - job.t_start
        self.avg_job_s = took if self.avg_job_s is None else (1 - _AVG_WEIGHT) * self.avg_job_s + _AVG_WEIGHT * took
        self.running -= 1
        self._forget(job)
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
