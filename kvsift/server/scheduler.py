"""The request queue in front of the (synchronous, PyTorch) engine.

The engine runs one forward at a time per model (``LLM.lock``; it also switches the model's attention
implementation for the duration of a call), so the server runs one engine batch at a time, in a
worker thread. Which requests form that batch is the engine's
:class:`~kvsift.engine.scheduler.Scheduler`'s (``engine``): the oldest waiting request plus the
waiting requests compatible with it (same method, options and context, greedy or unseeded sampling
alike, and for compressing methods the same prompt length), up to ``max_batch`` sequences and the
KV memory (``--max-batch``, ``--kv-memory``, ``--host-memory``); where the engine allows it
(``full``, no context, eager decode), waiting requests of the running batch's kind join it at its
next decode step, in arrival order (continuous batching). A batch's events go to each
request's own ``asyncio.Queue`` as they come (streams stream per request); a request whose
sequences are done ends at once, while the others of its batch go on. A context's prefill runs
alone. Cancelling a job (client gone) sets a flag its request's ``cancel`` reads at every decode
step, so its sequences end there (the others continue); a job that leaves while queued is dropped
before it runs.

Limits, checked when a job is admitted (before the request does any work), each a 429
(:class:`~kvsift.errors.RateLimitError`) with a ``Retry-After`` estimate:

* ``max_waiting``: most jobs waiting (:class:`~kvsift.errors.QueueFullError`);
* ``max_queue_s``: most expected wait (:class:`~kvsift.errors.QueueWaitError`);
* ``max_per_key``: most jobs of one API key queued or running, or the key's own ``max_concurrent``
  (:class:`~kvsift.errors.ConcurrencyLimitError`).

``max_run_s`` bounds a job's run time: past it, the engine's ``cancel`` check answers True (the
decode loop stops that job's sequences at its next step) and the job is marked ``timed_out``.

The estimates come from an exponential moving average of the recent jobs' run times
(``avg_job_s``, :data:`DEFAULT_JOB_S` before the first job finished): a running job is expected to
end at that average (or its time limit), each waiting job to take that long (batching only makes
the real wait shorter).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvsift.engine.scheduler import Request, Scheduler as EngineScheduler, SchedulerConfig
from kvsift.errors import ConcurrencyLimitError, QueueFullError, QueueWaitError
from kvsift.server.auth import Principal

_END = object()
DEFAULT_JOB_S = 1.0     # a job's expected run time before any job finished (Retry-After only)
_AVG_WEIGHT = 0.3       # weight of the latest job in the moving average of run times
ANONYMOUS_BUCKET = ""   # the requests of a server without keys are counted together
_JOIN_WAIT_S = 10.0     # most the worker waits for the event loop to hand it joining requests


class JobFailed(Exception):
    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


class Job:
    """One unit of engine work: a generation (events from a batch) or ``work(job)`` (runs in the
    worker thread and calls ``job.emit(item)``).

    ``bucket``: the API key it is counted against; ``t_start`` / ``deadline``: when it started and
    when its run time is up (on the scheduler's clock); ``timed_out``: it was stopped at its deadline;
    ``ended``: set once the scheduler no longer counts it (running, waiting, its key's count).
    ``request``: its engine request (a generation's runs in a batch; a context prefill's ``work``
    runs alone)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bucket: str = ANONYMOUS_BUCKET,
                 clock: Callable[[], float] = time.monotonic):
        self.loop = loop
        self.request: Request | None = None        # its engine request (once it queues for the engine)
        self.work: Callable[[Job], None] | None = None  # a context prefill's work (runs alone)
        self.on_item: Callable[[Any], Any] | None = None  # the worker thread hands each event through it
        self.dispatched: asyncio.Future | None = None
        self.done = False
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
        """The engine's ``cancel`` callback (checked at every prefill chunk boundary and decode
        step): the client left, or the job's run time is up (then ``timed_out`` is set)."""
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


class _Joiner:
    """A running batch's ``join`` callback (called on the worker thread at each decode-step
    boundary), ``idle()``: no request is waiting, so none can join it now (the engine then
    records a new batch's CUDA graph before streaming its first tokens, ``LLM.run_batch``), and
    ``waiting_tokens()``: the shortest waiting prompt (longer than a step's prefill: the same)."""

    __slots__ = ("sched", "loop")

    def __init__(self, sched: "Scheduler", loop: asyncio.AbstractEventLoop):
        self.sched, self.loop = sched, loop

    def __call__(self, running: list[Request], rows: int) -> list[Request]:
        return self.sched._join_from_worker(self.loop, running, rows)

    def idle(self) -> bool:
        return not self.sched.engine.waiting or self.sched.closing

    def waiting_tokens(self) -> int | None:
        """The shortest waiting prompt (``None``: none waits, or closing): a joiner with a longer
        prompt cannot finish its prefill within one decode step, so the engine may record a new
        batch's graph before its first tokens while such requests wait."""
        return None if self.sched.closing else self.sched.engine.shortest_waiting()


class Scheduler:
    """Engine batches one at a time, the jobs waiting FIFO; admission limits (see the module).

    ``engine``: the engine scheduler that groups the waiting requests (default: no batching across
    requests); ``run_batch(group, join)``: runs a group, yielding ``(request, event)``, and asks
    ``join`` at each decode step for requests joining it (:meth:`LLM.run_batch
    <kvsift.engine.llm.LLM.run_batch>`; not asked without ``join_running``)."""

    def __init__(self, max_waiting: int, metrics=None, *, max_run_s: float | None = None,
                 max_queue_s: float | None = None, max_per_key: int | None = None,
                 engine: EngineScheduler | None = None,
                 run_batch: Callable[..., Iterator[tuple[Request, Any]]] | None = None, join_running: bool = True):
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.max_run_s, self.max_queue_s, self.max_per_key = max_run_s, max_queue_s, max_per_key
        self.engine = engine if engine is not None else EngineScheduler(SchedulerConfig(max_batch=1))
        self.run_batch = run_batch
        self.join_running = join_running
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvsift-engine")
        self.busy = False                        # a batch holds the engine
        self.batches = 0                         # engine batches started
        self.joined = 0                          # requests that joined a running batch
        self.closing = False                     # shutting down: nothing joins (the loop waits for the worker)
        self.waiting = 0
        self.running = 0
        self.jobs: dict[Job, None] = {}          # admitted and not finished, in arrival order
        self.per_key: dict[str, int] = {}        # bucket -> its jobs queued or running
        self.avg_job_s: float | None = None      # moving average of run times (None: no job finished yet)
        self.clock: Callable[[], float] = time.monotonic  # run times, deadlines, estimates (a test hook)

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

    async def run(self, job: Job, request: Request, work: Callable[[Job], None] | None = None) -> None:
        """Queue ``request`` for the engine (``work``: a context prefill's, run alone in the worker
        thread) and wait until its batch starts (read its output with ``job.items()``). If the
        caller is cancelled while waiting, the job leaves the queue; a job whose client left before
        its turn is dropped (its items end at once)."""
        if job not in self.jobs or job.dispatched is not None:  # abandoned (out of the counts), or queued twice
            job.queue.put_nowait(_END)
            return
        request.tag, job.request, job.work = job, request, work
        self.engine.add(request)  # a request too large for the KV memory: KVMemoryError (checked before)
        job.dispatched = job.loop.create_future()
        self._dispatch()
        try:
            await asyncio.shield(job.dispatched)
        except BaseException:
            if job.started is None:
                self.engine.remove(request)
                self._leave(job)
            raise

    def _drop(self, job: Job) -> None:
        """A queued job that will not run (its client left): out of the queue and the counts."""
        if job in self.jobs and job.t_start is None:
            self.waiting -= 1
            self._forget(job)
            self._update()
        job.queue.put_nowait(_END)
        if job.dispatched is not None and not job.dispatched.done():
            job.dispatched.set_result(None)

    def _purge(self) -> None:
        """Drop the queued requests whose clients left."""
        for r in list(self.engine.waiting):
            j = r.tag
            if j.is_cancelled() or j not in self.jobs:
                self.engine.remove(r)
                self._drop(j)

    def _dispatch(self) -> None:
        """Start the next batch when the engine is free (on the event loop)."""
        while not self.busy:
            self._purge()
            group = self.engine.schedule()
            if not group:
                return
            self._start(group)

    def _join(self, group: list[Request], rows: int) -> list[Request]:
        """On the event loop: the waiting requests that join the running ``group`` now (continuous
        batching), counted as started."""
        self._purge()
        new = self.engine.join(group, rows)
        if new:
            self.joined += len(new)
            if self.metrics is not None:
                self.metrics.batch_joins.inc(len(new))
            self._begin([r.tag for r in new])
        return new

    def _join_from_worker(self, loop: asyncio.AbstractEventLoop, group: list[Request], rows: int) -> list[Request]:
        """The engine's ``join`` callback (worker thread, at each decode-step boundary)."""
        if not self.engine.waiting or self.closing:  # the common case, without a trip to the event loop
            return []

        async def join():
            return self._join(group, rows)

        fut = asyncio.run_coroutine_threadsafe(join(), loop)
        try:
            return fut.result(timeout=_JOIN_WAIT_S)
        except concurrent.futures.TimeoutError:  # the loop is busy or closing: no one joins this step...
            if fut.cancel():
                return []
            return fut.result()  # ...unless it had started (it never waits once started)

    def _start(self, group: list[Request]) -> None:
        jobs = [r.tag for r in group]
        self.busy = True
        self.batches += 1
        self._begin(jobs)
        if self.metrics is not None:
            self.metrics.batch_requests.observe(len(group))
            self.metrics.batch_sequences.observe(sum(r.rows for r in group))
        loop = jobs[0].loop
        if group[0].kind == "prefill":
            job = jobs[0]

            def thread_main():
                try:
                    job.work(job)
                except BaseException as e:  # noqa: BLE001 - handed to the request
                    job.emit(JobFailed(e))
                finally:
                    job.emit(_END)
                    loop.call_soon_threadsafe(self._finish, job)
        else:
            def thread_main():
                self._run_group(group, loop)

        fut = loop.run_in_executor(self.executor, thread_main)
        fut.add_done_callback(lambda _f: self._batch_done(group))

    def _begin(self, jobs: list[Job]) -> None:
        """The jobs leave the queue and start (their run time counts from now)."""
        now, t = self.clock(), time.perf_counter()
        for job in jobs:
            self.waiting -= 1
            self.running += 1
            job.started, job.t_start = t, now
            if self.max_run_s is not None:
                job.deadline = now + self.max_run_s
            if self.metrics is not None:
                self.metrics.queue_time.observe(t - job.arrived)
            job.dispatched.set_result(None)
        self._update()

    def _run_group(self, group: list[Request], loop: asyncio.AbstractEventLoop) -> None:
        """The worker thread's part of a generation batch: each event to its job; a job ends as soon
        as its request is finished (its client has its answer while the others go on)."""
        done: set[Job] = set()

        def end(job: Job) -> None:
            done.add(job)
            job.emit(_END)
            loop.call_soon_threadsafe(self._finish, job)

        join = _Joiner(self, loop) if self.join_running else None
        events = self.run_batch(group, join)
        try:
            for req, ev in events:
                job = req.tag
                if job in done:
                    continue
                if getattr(ev, "error", None) is not None:  # this request failed alone; the batch goes on
                    job.emit(JobFailed(ev.error))
                    end(job)
                    continue
                job.emit(job.on_item(ev) if job.on_item is not None else ev)
                if req.finished:
                    end(job)
        except BaseException as e:  # noqa: BLE001 - handed to the requests still waiting for it
            for r in group:
                if r.tag not in done:
                    r.tag.emit(JobFailed(e))
        finally:
            try:
                events.close()  # the batch's KV and the engine lock are released now
            finally:
                for r in group:
                    if r.tag not in done:
                        end(r.tag)

    def _batch_done(self, group: list[Request]) -> None:
        self.engine.finish(group)
        self.busy = False
        self._dispatch()

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
            if job.request is not None:
                self.engine.remove(job.request)
            self._leave(job)

    def _finish(self, job: Job) -> None:
        if job.done:
            return
        job.done = True
        took = self.clock() - job.t_start
        self.avg_job_s = took if self.avg_job_s is None else (1 - _AVG_WEIGHT) * self.avg_job_s + _AVG_WEIGHT * took
        self.running -= 1
        self._forget(job)
        self._update()

    def _update(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting)

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.cancel()

    def shutdown(self) -> None:
        self.closing = True
        self.cancel_all()
        self.executor.shutdown(wait=True, cancel_futures=True)
