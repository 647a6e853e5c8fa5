"""Server settings (validated once, at startup)."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path

from kvsift.methods.base import Budget, validate_budget
from kvsift.server.auth import KeyRing

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class ServerConfig:
    """What ``kvsift serve`` needs besides the model.

    ``max_running``: engine batches at once (the engine runs one forward at a time per model, so 1 is
    the honest default; the rest wait in a FIFO queue of at most ``max_waiting``).
    ``max_batch``: most sequences of compatible queued requests served by one batched generation
    (1: one request at a time; a request with several prompts still runs whole).
    ``continuous_batching``: compatible requests that arrive while a batch runs join it at its
    next decode step (where the engine allows it: a method whose state after the prefill is its
    kept KV, no context or one read by reference, no KV arena; see ``LLM.joins_running``).
    ``kv_memory_bytes`` / ``host_memory_bytes``: expected KV bytes a batch may hold on the device /
    in host memory (None: on CUDA a share of the memory free once the model is loaded,
    ``budget.default_memory_limits``; elsewhere unbounded); a request that cannot fit alone is a
    400 ``kv_memory_exceeded``. ``preempt``: requests that can leave and rejoin a batch are
    admitted with their prompt's KV and a few decode tokens, not all of ``max_tokens``; when the
    device KV runs out, the newest is swapped to host memory and resumed later
    (``SchedulerConfig.preempt``).
    ``step_trace``: keep the engine's last N decode-step gaps and what each spent its time on
    (``kvsift.engine.trace``), served at ``GET /debug/steps`` (0: off, the default; the endpoint 404s).
    ``contexts_dir``: where reusable contexts are persisted (None = memory only).
    ``shared_contexts``: ``contexts_dir`` is shared with other servers (engine replicas): contexts
    they persist or delete are seen on their next use (see ``ContextStore``).
    ``context_memory_bytes``: LRU limit on the KV bytes (device + host) of contexts kept in memory.
    ``contexts_disk_bytes``: quota on the bytes of persisted contexts (None = only the free space).
    ``api_key`` / ``keys``: one key (its owner ``default``, an admin) or a key ring of tenants
    (:mod:`kvsift.server.auth`); with neither, every request is the anonymous admin.
    ``max_tokens_cap``: largest ``max_tokens`` a request may ask for (None = the model's context).
    ``public_health``: ``/health`` and ``/metrics`` answer without a key even when keys are set.
    ``insecure``: allow a non-loopback ``host`` without any key.

    Limits (None = none; a refused request gets 429 with ``Retry-After``, before any work):
    ``max_request_seconds``: a generation running longer (counted from when its job starts, not its
    time in the queue) stops at its next decode step with what it has (``finish_reason: "length"``
    and ``X-Kvsift-Stopped: time-limit``). ``max_queue_seconds``: refuse a request whose expected
    wait in the queue (from the recent jobs' durations) is longer. ``max_concurrent_per_key``: most
    requests of one API key queued or running at once (a key's own ``max_concurrent`` in the keys
    file overrides it; without keys, all requests share one anonymous bucket).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None         # served model id (default: the loaded model's name)
    api_key: str | None = None
    default_method: str = "full"
    default_budget: Budget = None
    default_max_tokens: int = 256
    max_running: int = 1
    max_waiting: int = 64
    max_body_bytes: int = 8 * 2**20
    contexts_dir: Path | None = None
    shared_contexts: bool = False
    context_memory_bytes: int = 2 * 2**30
    max_contexts: int = 1000
    contexts_disk_bytes: int | None = None
    keys: KeyRing | None = None
    max_tokens_cap: int | None = None
    public_health: bool = False
    insecure: bool = False
    max_request_seconds: float | None = None
    max_queue_seconds: float | None = None
    max_concurrent_per_key: int | None = None
    max_batch: int = 8
    continuous_batching: bool = True
    kv_memory_bytes: int | None = None
    host_memory_bytes: int | None = None
    preempt: bool = False
    step_trace: int = 0
    keep_ids: int = field(default=10000)   # evicted / known ids remembered for their 410 answers

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("host must be a non-empty string")
        if self.host != "localhost":
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                raise ValueError(f"host must be an IP address or 'localhost', got {self.host!r}") from None
        if not (0 <= int(self.port) <= 65535):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset to disable authentication)")
        validate_budget(self.default_budget)
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.context_memory_bytes < 0:
            raise ValueError(f"context_memory_bytes must be >= 0, got {self.context_memory_bytes}")
        if self.max_contexts < 1:
            raise ValueError(f"max_contexts must be >= 1, got {self.max_contexts}")
        if self.contexts_dir is not None:
            self.contexts_dir = Path(self.contexts_dir).expanduser()
        if self.contexts_disk_bytes is not None and self.contexts_disk_bytes < 0:
            raise ValueError(f"contexts_disk_bytes must be >= 0, got {self.contexts_disk_bytes}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be >= 1, got {self.max_tokens_cap}")
        for name, flag in (("max_request_seconds", "--max-request-seconds"),
                           ("max_queue_seconds", "--max-queue-seconds")):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise ValueError(f"{name} ({flag}) must be a number of seconds > 0, got {v!r}")
        v = self.max_concurrent_per_key
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"max_concurrent_per_key (--max-concurrent-per-key) must be an integer >= 1, got {v!r}")
        v = self.max_batch
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"max_batch (--max-batch) must be an integer >= 1, got {v!r}")
        if not isinstance(self.continuous_batching, bool):
            raise ValueError(f"continuous_batching must be a bool, got {self.continuous_batching!r}")
        if not isinstance(self.preempt, bool):
            raise ValueError(f"preempt must be a bool, got {self.preempt!r}")
        v = self.step_trace
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10_000_000:
            raise ValueError(f"step_trace (--step-trace) must be an integer in [0, 10000000], got {v!r}")
        for name, flag in (("kv_memory_bytes", "--kv-memory"), ("host_memory_bytes", "--host-memory")):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} ({flag}) must be a size >= 1 byte, got {v!r}")
        if self.api_key is not None and self.keys is not None:
            raise ValueError("give either one API key or a keys file, not both")
        if self.api_key is not None:
            self.keys = KeyRing.single(self.api_key)
        if self.keys is None and not is_loopback(self.host) and not self.insecure:
            raise ValueError(f"refusing to serve on {self.host} (not a loopback address) without an API key: "
                             f"set --api-key or --api-keys-file, or pass --insecure to serve it open")

    @property
    def auth_enabled(self) -> bool:
        return self.keys is not None
