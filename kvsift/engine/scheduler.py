"""The engine's scheduler: which requests run together, and when.

    sched = Scheduler(SchedulerConfig(max_batch=8, kv_memory=8 * 2**30))
    sched.add(req)                       # KVMemoryError if it could never fit
    group = sched.schedule()             # the oldest waiting request plus compatible ones
    for req, ev in llm.run_batch(group): ...
    sched.finish(group)

A :class:`Request` is one call's prompts (an API call's list of prompts is one request and never
split) with its sampling parameters, method and optional reused context. The scheduler keeps two
queues, ``waiting`` (FIFO) and ``running``, and admits by memory: the running requests' expected
device KV (and host KV, for methods that offload) stays within ``kv_memory`` / ``host_memory``,
estimated by :func:`kvsift.budget.request_kv_bytes`. A request that would not fit even alone is
refused when added (:class:`~kvsift.errors.KVMemoryError`).

``schedule()`` takes the oldest waiting request (or ``head``) and adds, in arrival order, the
waiting requests it may share one batched generation with (:func:`batch_key`), up to ``max_batch``
sequences and within memory. Two requests batch when their results do not depend on it:

* the same method (spec, budget and options: methods are frozen dataclasses, compared by value) and
  the same reused context (or none);
* greedy both, or both sampled without a seed at the same temperature and top-p (a seeded sample
  reproduces only alone: it never batches);
* prompts of one length, except for methods that pad exactly (``KVMethod.pads_exactly()``: ``full``,
  whose rows attend to their own tokens only; ``quest`` with token budgets, whose pages count each
  row's own tokens): their batches are left-padded. Other methods resolve a ratio budget against
  the batch's longest prompt (or depend on where padding sits), so their requests batch only with
  requests whose prompts have the same length;
* nobody's token limit shrinks: with padding the batch's longest prompt bounds every row's room
  before ``max_positions``.

``join(running, rows)`` lets waiting requests join the running group at a decode-step boundary
(continuous batching), in arrival order up to the first that cannot. Each joining request is
prefilled on its own and stacked with the running rows, so for methods whose state after the
prefill is only the kept KV (``full``, ``snapkv``, ``adakv``, ``duo``, ...) it may have any prompt
length and any budget of the same method (:func:`join_key`).

``max_tokens``, stop strings and ``ignore_eos`` are per sequence. The offline API
(:meth:`LLM.generate <kvsift.engine.llm.LLM.generate>`) and the server go through this class: the
LLM's own instance (one request per call) and the server's (``--max-batch``, ``--kv-memory``).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from kvsift.errors import KVMemoryError

if TYPE_CHECKING:
    from kvsift.engine.params import SamplingParams
    from kvsift.engine.runner import Context
    from kvsift.methods.base import KVMethod, Run

_ids = itertools.count()


@dataclass(slots=True)
class SchedulerConfig:
    """``max_batch``: most sequences in one batched generation made of several requests (a single
    request with more prompts still runs whole). ``kv_memory`` / ``host_memory``: bytes of expected
    KV the running requests may hold on the device / in host memory (None: unbounded).
    ``max_positions``: the model's positions (the token-room rule of batching; None: no rule).
    ``preempt``: a request that can leave and rejoin a running batch (:meth:`Scheduler.preemptible`)
    is admitted with the KV of its prompt and ``headroom`` decode tokens only, not of all its
    ``max_tokens``; its charge grows as it decodes (:meth:`Scheduler.ensure`), and when the device
    KV would pass ``kv_memory`` the engine swaps the newest such request's KV to host memory and
    resumes it once there is room again (:meth:`swap_out` / :meth:`swap_in`), instead of holding
    room for tokens most requests never make."""

    max_batch: int = 8
    kv_memory: int | None = None
    host_memory: int | None = None
    max_positions: int | None = None
    preempt: bool = False
    headroom: int = 16

    def __post_init__(self):
        v = self.max_batch
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {v!r}")
        for name in ("kv_memory", "host_memory", "max_positions"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {v!r}")
        if not isinstance(self.preempt, bool):
            raise ValueError(f"preempt must be a bool, got {self.preempt!r}")
        v = self.headroom
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"headroom must be an integer >= 1, got {v!r}")


@dataclass(slots=True, eq=False)
class Request:
    """One engine request: ``prompts`` (token ids, run together), how to sample them, the method
    (built) and its run for these prompts alone (built when the request was validated), an
    optional reused ``context``, a ``cancel`` callback (checked once per decode step) and the
    expected KV bytes (``kv_bytes`` on the device at its peak, ``host_bytes`` in host memory).
    ``prefill_bytes``: the device KV its prefill holds at its peak; ``token_bytes``: device bytes
    of one kept token on all its rows; ``kept_tokens``: tokens each row keeps after its prefill (a
    preempting scheduler admits it with its prefill and ``headroom`` decode tokens);
    ``width_tokens``: KV slots per row and layer it needs in a batch after its prefill (kept tokens
    and decode steps; 0: unknown), what a running batch's rows are padded to when it joins them.
    ``kind``: ``"generate"`` or ``"prefill"`` (a context's prefill: never batched). ``tag``: the
    caller's (the server's job). ``finished``: every sequence of it is done (set by the engine).
    ``charged`` / ``swapped_bytes``: what the scheduler counts for it now, on the device and, while
    it is preempted, in host memory (the scheduler's)."""

    prompts: list[list[int]]
    params: "SamplingParams | None"
    method: "KVMethod"
    run: "Run | None" = None
    context: "Context | None" = None
    cancel: Callable[[], bool] | None = None
    kv_bytes: int = 0
    host_bytes: int = 0
    kind: str = "generate"
    tag: Any = None
    finished: bool = False
    prefill_bytes: int = 0
    token_bytes: int = 0
    kept_tokens: int = 0
    width_tokens: int = 0
    charged: int = 0
    swapped_bytes: int = 0
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        if self.kind not in ("generate", "prefill"):
            raise ValueError(f"kind must be 'generate' or 'prefill', got {self.kind!r}")
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("a request needs at least one non-empty prompt")
        if self.kind == "generate" and self.params is None:
            raise ValueError("a generate request needs SamplingParams")

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def base(self) -> int:
        """Tokens of the reused context before every prompt."""
        return self.context.length if self.context is not None else 0

    @property
    def longest(self) -> int:
        return max(len(p) for p in self.prompts)

    def room(self, longest: int, max_positions: int | None) -> int:
        """New tokens each sequence may get when the batch's longest prompt has ``longest`` tokens."""
        n = self.params.max_tokens
        return n if max_positions is None else min(n, max_positions - self.base - longest)


def _sampling_key(req: Request) -> tuple | None:
    """Greedy, or unseeded sampling at one temperature and top-p; None for a seeded sample (it
    reproduces only alone) or a request that is no generation."""
    if req.kind != "generate":
        return None
    p = req.params
    if p.temperature == 0:
        return ("greedy",)
    if p.seed is None:
        return ("sample", float(p.temperature), float(p.top_p))
    return None


def method_family(method: "KVMethod") -> Hashable:
    """A method without its budget: its class and every other option (a composition's stages and a
    wrapper's scorer likewise)."""
    stages = getattr(method, "stages", None)
    if stages:
        return ("+",) + tuple(method_family(s) for s in stages)
    inner = getattr(method, "inner", None)
    opts = tuple((f.name, getattr(method, f.name)) for f in fields(method)
                 if f.compare and f.name not in ("budget", "inner", "scorer", "stages"))
    return (type(method), opts, None if inner is None else method_family(inner))


def batch_key(req: Request) -> Hashable | None:
    """What must be equal for two requests to share a batch (see the module), or None when ``req``
    runs alone (a context prefill, a seeded sample, mixed prompt lengths with a compressing method)."""
    sampling = _sampling_key(req)
    if sampling is None:
        return None
    if req.method.pads_exactly():
        length = None
    else:
        lengths = {len(x) for x in req.prompts}
        if len(lengths) != 1:
            return None
        length = lengths.pop()
    return (req.method, id(req.context) if req.context is not None else None, sampling, length)


def join_key(req: Request) -> Hashable | None:
    """What must be equal for a waiting request to join a running batch at a decode-step boundary.
    A request that joins is prefilled on its own (with its own run: a ratio budget resolves against
    its own prompt), so where the method's state after the prefill is only its kept KV
    (:meth:`KVMethod.joins_rows <kvsift.methods.base.KVMethod.joins_rows>`: full, snapkv, adakv,
    duo, kvzip, ...) neither its prompt length nor its budget matters: the method family
    (:func:`method_family`), the reused context and the sampling do. A method that evicts while
    decoding joins rows at its budget (:func:`at_budget`) of the same method and resolved budget
    (any prompt length); a method whose decode reads a per-batch value from its run names it
    (:meth:`KVMethod.join_token <kvsift.methods.base.KVMethod.join_token>`: sentencekv's tokens attended
    per step). Other methods: :func:`batch_key`."""
    sampling = _sampling_key(req)
    if sampling is None:
        return None
    if not req.method.joins_rows():
        if at_budget(req):  # evicts while decoding, every row at its budget: the same budget joins
            return ("join-at-budget", req.method, req.run.tokens, id(req.context) if req.context is not None else None,
                    sampling)
        return batch_key(req)
    return ("join", method_family(req.method), id(req.context) if req.context is not None else None, sampling,
            req.method.join_token(req.run) if req.run is not None else None)


def at_budget(req: Request) -> bool:
    """Whether ``req``'s method evicts while decoding and each of its rows holds exactly its budget
    after the prefill (:meth:`KVMethod.joins_at_budget <kvsift.methods.base.KVMethod.joins_at_budget>`):
    then its rows may join, or be joined by, rows of the same method and resolved budget."""
    return (req.kind == "generate" and req.run is not None
            and all(req.method.joins_at_budget(req.run, req.base + len(p)) for p in req.prompts))


class Scheduler:
    """Waiting and running requests, admission by KV memory, grouping (see the module). Thread-safe."""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.kv_used = 0     # expected device KV bytes of the running requests
        self.host_used = 0   # ... and host KV bytes (offloaded, and preempted requests' swapped KV)
        self.preemptions = 0
        self._batch: tuple[float, int] | None = None   # the running batch's (width in slots, bytes per slot), see settle
        self._lock = threading.Lock()

    # ---- admission -------------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Raise :class:`KVMemoryError` when ``req`` would not fit even with nothing else running."""
        cfg = self.config
        if cfg.kv_memory is not None and req.kv_bytes > cfg.kv_memory:
            raise KVMemoryError(f"this request's KV ({_mib(req.kv_bytes)} expected on the device: prompt, budget "
                                f"and max_tokens) does not fit the engine's KV memory ({_mib(cfg.kv_memory)}); "
                                f"send a shorter prompt, fewer prompts, a smaller budget or fewer max_tokens")
        if cfg.host_memory is not None and req.host_bytes > cfg.host_memory:
            raise KVMemoryError(f"this request's offloaded KV ({_mib(req.host_bytes)} expected in host memory) "
                                f"does not fit the engine's host memory ({_mib(cfg.host_memory)})")

    def preemptible(self, req: Request) -> bool:
        """Whether ``req`` is admitted with its prefill and ``headroom`` decode tokens and may be preempted: the
        config's ``preempt``, a generation whose method's state after the prefill is its kept KV
        (it can leave and rejoin a batch, its rows swapped to host memory: ``KVMethod.preemptible``)
        and no reused context."""
        return (self.config.preempt and req.kind == "generate" and req.context is None
                and req.token_bytes > 0 and req.method.preemptible())

    def _cost(self, req: Request) -> int:
        """Device bytes ``req`` is admitted with."""
        if not self.preemptible(req):
            return req.kv_bytes
        return min(req.kv_bytes, max(req.prefill_bytes, self._need(req, self.config.headroom)))

    def _fits(self, kv: int, host: int) -> bool:
        cfg = self.config
        return ((cfg.kv_memory is None or self.kv_used + kv <= cfg.kv_memory)
                and (cfg.host_memory is None or self.host_used + host <= cfg.host_memory))

    def add(self, req: Request) -> None:
        """Queue ``req`` (after :meth:`check`)."""
        self.check(req)
        with self._lock:
            self.waiting.append(req)

    def remove(self, req: Request) -> bool:
        """Take a waiting request out (its caller left); False if it was not waiting."""
        with self._lock:
            try:
                self.waiting.remove(req)
            except ValueError:
                return False
            return True

    def shortest_waiting(self) -> int | None:
        """The fewest prompt tokens of any waiting request's prompts (``None``: nothing waits): a
        bound on how soon a request that joins a running batch can finish its prefill
        (:meth:`LLM.run_batch <kvsift.engine.llm.LLM.run_batch>`'s graph prime)."""
        with self._lock:
            return min((len(p) for r in self.waiting for p in r.prompts), default=None)

    # ---- grouping ----------------------------------------------------------------------------------
    def _room_kept(self, group: list[Request], cand: Request) -> bool:
        """Adding ``cand`` changes no one's token room (the batch's longest prompt bounds every row)."""
        maxpos = self.config.max_positions
        if maxpos is None:
            return True
        longest = max(r.longest for r in (*group, cand))
        return all(r.room(longest, maxpos) == r.room(r.longest, maxpos) for r in (*group, cand))

    def schedule(self, head: Request | None = None) -> list[Request]:
        """Move the next group from ``waiting`` to ``running`` and return it (empty: nothing waits,
        ``head`` is not waiting, or the next request does not fit beside the running ones)."""
        with self._lock:
            if not self.waiting or (head is not None and head not in self.waiting):
                return []
            first = head if head is not None else self.waiting[0]
            if not self._fits(self._cost(first), first.host_bytes):
                return []
            group, rows = [first], first.rows
            kv, host = self._cost(first), first.host_bytes
            key = batch_key(first)
            if key is not None:
                for cand in self.waiting:
                    if cand is first or rows + cand.rows > self.config.max_batch:
                        continue
                    if batch_key(cand) != key or not self._room_kept(group, cand):
                        continue
                    if not self._fits(kv + self._cost(cand), host + cand.host_bytes):
                        continue
                    group.append(cand)
                    rows += cand.rows
                    kv += self._cost(cand)
                    host += cand.host_bytes
            for r in group:
                self.waiting.remove(r)
                self.running.append(r)
                r.charged = self._cost(r)
            self.kv_used += kv
            self.host_used += host
            return group

    def settle(self, rows_of: dict[Request, int], batch_bytes: int, per_token: int) -> None:
        """The running batch was (re)built: ``batch_bytes`` of device KV measured over its rows
        (``rows_of``: each request's rows in it, 0 for one whose rows have left), ``per_token`` the
        bytes of one full-precision slot over all layers. Each request is charged its rows' share of
        the measured bytes from now on, not its admission charge (the whole prompt's KV of its
        prefill, for a compressing method far more than it keeps), so more requests may join; and
        a request that joins is charged what the batch grows by as well (:meth:`join`: rows are
        padded to the widest one). Not with preemption (charges there follow the tokens, :meth:`ensure`)."""
        with self._lock:
            live = {r: n for r, n in rows_of.items() if r in self.running}
            rows = sum(live.values())
            if self.config.preempt or rows <= 0 or per_token <= 0:
                return
            for r, n in live.items():
                new = batch_bytes * n // rows
                self.kv_used += new - r.charged
                r.charged = new
            self._batch = (batch_bytes / (rows * per_token), per_token)

    def _join_cost(self, cand: Request, rows: int, width: float, per_token: int) -> tuple[int, float]:
        """What ``cand`` is charged to join a settled batch of ``rows`` rows ``width`` slots wide:
        its admission charge (its prefill runs beside the batch), or the batch's growth once its rows
        are stacked in (every row padded to the wider of the two), whichever is more; and the
        batch's width after it."""
        w = max(width, float(cand.width_tokens or 0))
        grow = per_token * ((rows + cand.rows) * w - rows * width)
        return max(self._cost(cand), int(grow + 0.5)), w

    def join(self, running: list[Request], rows: int) -> list[Request]:
        """Waiting requests that join the running group ``running`` (``rows`` sequences now) at a
        decode-step boundary (continuous batching; the engine decides whether its group can take
        any, :meth:`LLM.joins_running <kvsift.engine.llm.LLM.joins_running>`): in arrival order, the
        ones with the group's batch key, within ``max_batch`` rows and memory, stopping at the
        first waiting request that cannot join (it runs next: no one overtakes it). They move to
        ``running``."""
        with self._lock:
            key = join_key(running[0]) if running else None
            if key is None or not self.waiting:
                return []
            out = []
            width, per_token = self._batch if self._batch is not None else (0.0, 0)
            for cand in self.waiting:
                if rows + cand.rows > self.config.max_batch or join_key(cand) != key:
                    break
                if self._batch is not None:
                    cost, width_after = self._join_cost(cand, rows, width, per_token)
                else:
                    cost = self._cost(cand)
                if not self._fits(cost, cand.host_bytes):
                    break
                out.append(cand)
                rows += cand.rows
                if self._batch is not None:
                    width = width_after
                cand.charged = cost
                self.kv_used += cand.charged
                self.host_used += cand.host_bytes
            for r in out:
                self.waiting.remove(r)
                self.running.append(r)
            return out

    def finish(self, group: list[Request]) -> None:
        """The group's generation ended: its memory is free again."""
        with self._lock:
            for r in group:
                if r in self.running:
                    self.running.remove(r)
                    self.kv_used -= r.charged
                    self.host_used -= r.host_bytes + r.swapped_bytes
                    r.charged = r.swapped_bytes = 0
            if not self.running:
                self._batch = None

    # ---- preemption (config.preempt; the engine calls these at decode-step boundaries) -------------
    @property
    def headroom(self) -> int:
        """Decode tokens a preemptible request is charged ahead of the ones it has made."""
        return self.config.headroom

    def _need(self, req: Request, tokens: int) -> int:
        return req.token_bytes * (req.kept_tokens + tokens)

    def ensure(self, req: Request, tokens: int) -> bool:
        """Charge running ``req`` for ``tokens`` decode tokens per row (beyond its kept prompt);
        False, charging nothing, when that does not fit ``kv_memory``."""
        with self._lock:
            extra = self._need(req, tokens) - req.charged
            if extra <= 0:
                return True
            if not self._fits(extra, 0):
                return False
            req.charged += extra
            self.kv_used += extra
            return True

    def swap_out(self, req: Request, tokens: int) -> None:
        """Running ``req``'s KV (``tokens`` decode tokens per row made so far) moves to host
        memory: its device charge is freed, the bytes are counted on the host."""
        with self._lock:
            self.kv_used -= req.charged
            req.charged = 0
            req.swapped_bytes = self._need(req, tokens)
            self.host_used += req.swapped_bytes
            self.preemptions += 1

    def swap_in(self, req: Request, tokens: int, force: bool = False) -> bool:
        """Preempted ``req`` comes back to the device charged for ``tokens`` decode tokens per row;
        False when that does not fit (``force``: it is let in anyway, e.g. nothing else runs)."""
        with self._lock:
            need = self._need(req, tokens)
            if not force and not self._fits(need, 0):
                return False
            req.charged = need
            self.kv_used += need
            self.host_used -= req.swapped_bytes
            req.swapped_bytes = 0
            return True


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
