"""Prometheus metrics of one server (own registry: several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_TIME = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_BYTES = tuple(float(2**k) for k in range(10, 36, 2))
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, model: str):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.running = Gauge("kvsift_requests_running", "Generations holding the engine", registry=r)
        self.waiting = Gauge("kvsift_requests_waiting", "Requests queued for the engine", registry=r)
        self.requests = Counter("kvsift_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        self.finished = Counter("kvsift_generations", "Finished generations by finish reason", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("kvsift_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.context_tokens = Counter("kvsift_context_tokens_reused",
                                      "Context tokens reused without prefill", registry=r)
        self.generation_tokens = Counter("kvsift_generation_tokens", "Tokens generated", registry=r)
        self.kv_bytes = Gauge("kvsift_kv_bytes", "KV bytes allocated by the reusable contexts kept in memory",
                              ["location", "pool"], registry=r)
        self.contexts = Gauge("kvsift_contexts", "Reusable contexts", ["state"], registry=r)
        self.contexts_evicted = Counter("kvsift_contexts_evicted", "Contexts evicted from memory (persisted ones "
                                        "stay on disk; the others are gone)", ["persisted"], registry=r)
        self.contexts_disk_bytes = Gauge("kvsift_contexts_disk_bytes", "Bytes of the persisted contexts", registry=r)
        self.persist_errors = Counter("kvsift_context_persist_errors", "Context writes that failed (kept in memory)",
                                      registry=r)
        self.rejected = Counter("kvsift_requests_rejected", "Requests refused before any engine work, by error code",
                                ["code"], registry=r)
        self.request_kv = Histogram("kvsift_request_kv_bytes", "KV bytes one generation allocated after its prefill",
                                    ["location"], buckets=_BYTES, registry=r)
        self.latency = Histogram("kvsift_request_latency_seconds", "End-to-end request latency", ["endpoint"],
                                 buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("kvsift_queue_wait_seconds", "Time waiting for the engine",
                                    buckets=_LATENCY, registry=r)
        self.ttft = Histogram("kvsift_time_to_first_token_seconds", "Time to first token (from arrival)",
                              buckets=_LATENCY, registry=r)
        self.prefill = Histogram("kvsift_prefill_seconds", "Prefill time per generation", buckets=_LATENCY,
                                 registry=r)
        self.tpot = Histogram("kvsift_time_per_output_token_seconds", "Decode time per output token",
                              buckets=_TOKEN_TIME, registry=r)
        self.batch_requests = Histogram("kvsift_batch_requests", "Requests served by one engine batch",
                                        buckets=_BATCH, registry=r)
        self.batch_sequences = Histogram("kvsift_batch_sequences", "Sequences (prompts) in one engine batch",
                                         buckets=_BATCH, registry=r)
        self.batch_joins = Counter("kvsift_batch_joins", "Requests that joined a running batch at a decode step",
                                   registry=r)
        self.batch_rebuild = Histogram("kvsift_batch_rebuild_seconds", "Host time of a change of a running "
                                       "batch's rows that running rows waited on (joins, leaves, preemption)",
                                       buckets=_LATENCY, registry=r)
        self.batch_rebuild_max = Gauge("kvsift_batch_rebuild_seconds_max", "The longest such change so far",
                                       registry=r)
        self.device_memory = Gauge("kvsift_device_memory_bytes", "The engine's device memory held by PyTorch "
                                   "(CUDA only): allocated now, the peak allocated since start, reserved by the "
                                   "caching allocator", ["kind"], registry=r)
        self.preemptions = Counter("kvsift_preemptions", "Requests whose KV was swapped to host memory to make "
                                   "room (--preempt), each time", registry=r)
        self._preemptions_seen = 0
        self._rebuild_max = 0.0
        info = Gauge("kvsift_model_info", "Served model", ["model"], registry=r)
        info.labels(model=model).set(1)
        for loc in ("device", "host"):
            self.kv_bytes.labels(location=loc, pool="contexts").set(0)
        for reason in ("stop", "length", "cancelled", "error"):
            self.finished.labels(reason=reason)
        for p in ("true", "false"):
            self.contexts_evicted.labels(persisted=p)

    def observe_preemptions(self, total: int) -> None:
        """The engine scheduler's preemption count so far (it counts; the counter follows)."""
        if total > self._preemptions_seen:
            self.preemptions.inc(total - self._preemptions_seen)
            self._preemptions_seen = total

    def observe_rebuild(self, seconds: float) -> None:
        """One change of a running batch's rows (``LLM.run_batch``'s ``on_rows_changed``; the
        engine's worker thread: prometheus_client's metrics are thread-safe)."""
        self.batch_rebuild.observe(seconds)
        if seconds > self._rebuild_max:
            self._rebuild_max = seconds
            self.batch_rebuild_max.set(seconds)

    def observe_device(self, device) -> None:
        """The engine device's memory now (``torch.cuda`` counters; nothing on another device)."""
        if getattr(device, "type", None) != "cuda":
            return
        import torch

        self.device_memory.labels(kind="allocated").set(torch.cuda.memory_allocated(device))
        self.device_memory.labels(kind="peak_allocated").set(torch.cuda.max_memory_allocated(device))
        self.device_memory.labels(kind="reserved").set(torch.cuda.memory_reserved(device))

    def render(self) -> bytes:
        return generate_latest(self.registry)
