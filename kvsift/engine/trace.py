"""What each decode-step boundary of a running batch spent its time on, for finding what makes a
stream's slow inter-token gaps (``kvsift serve --step-trace N``, ``GET /debug/steps``,
``bench/serve_load.py --step-trace``).

A :class:`StepRecord` covers one gap: from the moment one step's tokens went out to the moment the
next step's tokens went out (what every row running in both waited), split into what the engine's
loop did in it on the host: the wait for the step's tokens, chunks of joining prompts' prefill
(and whether one of them ended), a change of the batch's rows (stacking joiners, dropping finished
rows) and decode-step setup (a new batch's static warm-up step and its CUDA graph recordings).
``LLM.step_trace`` (None: off, the default) holds the last ``keep`` records; ``LLM.run_batch`` writes
them, other threads read :meth:`StepTrace.snapshot`. Off, the loop pays one ``is None`` test per
step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, fields


@dataclass(slots=True)
class StepRecord:
    """One gap of a running batch (times in milliseconds, host clock).

    ``batch``: which ``run_batch`` call (records of one batch are consecutive gaps); ``t``: seconds
    since the trace began when this step's tokens went out; ``rows``: the rows whose tokens went
    out and that waited the whole gap (rows that joined or came back from preemption within it are
    not counted: their tokens before it went out elsewhere); ``first``: the batch's first tokens
    (not an inter-token time: its rows waited their prefill before it); ``gap_ms``: since the
    batch's previous tokens; ``wait_ms``: of it, from the loop's turn to the tokens on the host
    (the step's device time that was not hidden, queueing the next step included); ``join_ms`` /
    ``join_chunks``: joining prompts' prefill chunks run in the gap (the call that ends a prefill
    counts in ``join_ms`` only); ``prefill_done``: joining requests whose prefill ended in it;
    ``held``: joiners waited for their state's writes; ``rebuild_ms`` / ``stacked`` / ``kept``: a
    change of the rows (requests stacked, rows kept), its setup apart; ``setup_ms``: static
    warm-up steps and CUDA graph recordings."""

    batch: int
    t: float
    rows: int
    first: bool = False
    gap_ms: float = 0.0
    wait_ms: float = 0.0
    join_ms: float = 0.0
    join_chunks: int = 0
    prefill_done: int = 0
    held: bool = False
    rebuild_ms: float = 0.0
    stacked: int = 0
    kept: int = 0
    setup_ms: float = 0.0


_PARTS = ("wait_ms", "join_ms", "rebuild_ms", "setup_ms")


class StepTrace:
    """The last ``keep`` :class:`StepRecord` s of every batch the engine ran (a ring: older ones
    drop out). :meth:`begin` starts a batch: its ``_Gap`` accumulates one gap's parts (``add``) and
    closes it when its tokens go out (``tokens``); one writer, the engine's loop; readers take
    :meth:`snapshot`."""

    def __init__(self, keep: int = 100_000):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"step trace keep must be an integer >= 1, got {keep!r}")
        self.records: deque[StepRecord] = deque(maxlen=keep)
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._batches = 0

    def begin(self) -> "_Gap":
        """A new batch: its first gap (ending at its first tokens) starts now."""
        with self._lock:
            self._batches += 1
            return _Gap(self, self._batches, time.perf_counter())

    def snapshot(self, since: float | None = None) -> list[dict]:
        """The records (as dicts) whose tokens went out at ``t >= since`` (all: ``None``)."""
        with self._lock:
            recs = list(self.records)
        return [asdict(r) for r in recs if since is None or r.t >= since]

    def now(self) -> float:
        """Seconds since the trace began (the clock of ``StepRecord.t``)."""
        return time.perf_counter() - self.t0

    def _add(self, rec: StepRecord) -> None:
        with self._lock:
            self.records.append(rec)


class _Gap:
    """One batch's gap in progress: parts accumulated until its tokens go out."""

    __slots__ = ("trace", "batch", "start", "turn", "first", "parts", "fresh")

    def __init__(self, trace: StepTrace, batch: int, start: float):
        self.trace, self.batch, self.start, self.turn, self.first = trace, batch, start, start, True
        self.parts: dict = {}
        self.fresh = 0   # rows that joined within this gap (their first token went out in it)

    def add(self, **parts) -> None:
        """Add to this gap's parts (``join_ms=...``, ``join_chunks=...``, ``held=True``, ...)."""
        for k, v in parts.items():
            self.parts[k] = (self.parts.get(k, 0) + v) if not isinstance(v, bool) else (self.parts.get(k, False) or v)

    def loop_turn(self) -> None:
        """The engine's loop starts a turn (``wait_ms`` counts from here to the tokens)."""
        self.turn = time.perf_counter()

    def joined(self, rows: int) -> None:
        """``rows`` rows joined within this gap: their first tokens went out in it, so they did not
        wait the whole of it (their first gap is the client's to measure, not counted here)."""
        self.fresh += rows

    def tokens(self, rows: int) -> None:
        """This step's tokens went out for ``rows`` rows (the ones that joined within the gap
        included): the gap is recorded for the rows that waited all of it, the next one starts."""
        now = time.perf_counter()
        rec = StepRecord(self.batch, now - self.trace.t0, max(0, rows - self.fresh), first=self.first,
                         gap_ms=1000 * (now - self.start), wait_ms=1000 * (now - self.turn), **self.parts)
        self.trace._add(rec)
        self.start, self.first, self.parts, self.fresh = now, False, {}, 0


def _weighted_quantile(values: list[tuple[float, int]], q: float) -> float | None:
    """The ``q`` quantile of values each counted ``weight`` times (nearest rank)."""
    vals = sorted((v, w) for v, w in values if w > 0)
    total = sum(w for _, w in vals)
    if not total:
        return None
    rank, seen = q * (total - 1), 0
    for v, w in vals:
        seen += w
        if seen > rank:
            return v
    return vals[-1][0]


def waited(record: dict) -> bool:
    """A record that is an inter-token gap some stream waited: not a batch's first tokens, and at
    least one row waited all of it (a change of rows after every row had finished is none)."""
    return not record.get("first") and record.get("rows", 0) > 0


def summarize(records: list[dict], factor: float = 2.0) -> dict:
    """Where the slow gaps' time went. Every gap (not a batch's ``first``) counts once per row that
    waited it (a stream's inter-token time); ``p50`` / ``p99`` over those; ``slow``: the gaps over
    ``factor`` x the p50 (issue #16's bound is 2x): how many stream-gaps, their share, and for them
    the mean gap and parts, and how many had a joining chunk, a prefill ending, a change of rows,
    setup (warm-up or recording), joiners held, or none of these (``plain``: the step itself)."""
    gaps = [r for r in records if waited(r)]
    out = {"gaps": len(gaps), "stream_gaps": sum(r["rows"] for r in gaps)}
    if not gaps:
        return out
    weighted = [(r["gap_ms"], r["rows"]) for r in gaps]
    p50, p99 = _weighted_quantile(weighted, 0.5), _weighted_quantile(weighted, 0.99)
    slow = [r for r in gaps if r["gap_ms"] > factor * p50]
    n_slow = sum(r["rows"] for r in slow)

    def mean(rs, key):
        w = sum(r["rows"] for r in rs)
        return round(sum(r[key] * r["rows"] for r in rs) / w, 2) if w else None

    def count(pred):
        return sum(r["rows"] for r in slow if pred(r))

    holds = {"join_chunk": lambda r: r["join_chunks"] > 0, "prefill_done": lambda r: r["prefill_done"] > 0,
             "rows_changed": lambda r: r["rebuild_ms"] > 0, "setup": lambda r: r["setup_ms"] > 0,
             "held": lambda r: bool(r["held"])}
    out.update(p50_ms=round(p50, 2), p99_ms=round(p99, 2), factor=factor, slow_stream_gaps=n_slow,
               slow_share=round(n_slow / out["stream_gaps"], 4),
               all_mean={k: mean(gaps, k) for k in ("gap_ms",) + _PARTS},
               slow_mean={k: mean(slow, k) for k in ("gap_ms",) + _PARTS},
               slow_with={**{k: count(p) for k, p in holds.items()},
                          "plain": count(lambda r: not any(p(r) for p in holds.values()))})
    return out


RECORD_FIELDS = tuple(f.name for f in fields(StepRecord))
