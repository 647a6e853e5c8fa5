"""Typed errors, shared by the library, the CLI (``kvsift: error: ...``, exit 2) and the server
(mapped to an OpenAI-shaped HTTP error by type in :mod:`kvsift.server.errors`, never by message text).

Every input error is also a ``ValueError`` (and a missing model a ``FileNotFoundError``), so code
that caught those before keeps working.
"""

from __future__ import annotations

import math


class KVSiftError(Exception):
    """Base of kvsift's own errors. ``status``: the HTTP status the server answers with; ``code``:
    the OpenAI error ``code``; ``param``: the request field at fault, when known."""

    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InputError(KVSiftError, ValueError):
    """Bad input, detected before any expensive work."""


class BudgetError(InputError):
    """A KV budget that is not a token count >= 1 or a ratio in (0, 1], or larger than the context."""

    code = "invalid_budget"


class UnknownMethodError(InputError):
    """A method name that is not registered."""

    code = "unknown_method"


class MethodOptionError(InputError):
    """An unknown method option, or a value of the wrong type or out of range."""

    code = "invalid_method_option"


class ContextLengthError(InputError):
    """A prompt (or document) longer than the model allows."""

    code = "context_length_exceeded"


class TensorParallelError(InputError):
    """A tensor-parallel setup that cannot work, detected before the weights load: a size that is
    not an integer >= 1, ``tensor_parallel > 1`` outside a distributed launch (no process group, or
    one of another size), attention or KV heads not divisible by the size, a model without a tensor
    parallel plan, a method whose per-model data is not sharded."""

    code = "invalid_tensor_parallel"


class ModelNotFoundError(KVSiftError, FileNotFoundError):
    """A model name or path that cannot be resolved, or a named model whose packages are missing."""

    status = 404
    code = "model_not_found"


class ModelIntegrityError(KVSiftError):
    """A named model's joined file does not match its pinned sha256 (or cannot be written whole:
    not enough disk space). Nothing is left in the cache then."""

    status = 500
    code = "model_integrity"


# ---- server-side errors (contexts, limits, storage) ----------------------------------------------
class ContextNotFoundError(KVSiftError, KeyError):
    """No context with this id (or not one the caller may see: another owner's is not found either)."""

    status = 404
    code = "context_not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class ContextEvictedError(ContextNotFoundError):
    """The context existed but was not persisted and left memory to make room for newer ones."""

    status = 410
    code = "context_evicted"


class ContextUnavailableError(KVSiftError):
    """The context's files could not be read now (an I/O error): retrying may work."""

    status = 503
    code = "context_unavailable"


class ContextCorruptedError(ContextUnavailableError):
    """The context's files are damaged (checksum mismatch, truncated or malformed data, missing
    file): it will not load again; delete it and create it anew."""

    status = 500
    code = "context_corrupted"


class ContextLimitError(KVSiftError):
    """The server holds its maximum number of contexts (``--max-contexts``)."""

    status = 409
    code = "too_many_contexts"


class ContextTooLargeError(InputError):
    """A context whose KV would not fit the server's context memory (``--context-memory``)."""

    code = "context_too_large"


class StorageQuotaError(KVSiftError):
    """Persisting the context would pass the contexts' disk quota or the free disk space."""

    status = 507
    code = "storage_quota_exceeded"


class IdempotencyKeyReusedError(KVSiftError):
    """An ``Idempotency-Key`` already used for a different request body."""

    status = 422
    code = "idempotency_key_reused"


# ---- limits (429 Too Many Requests, with a Retry-After estimate) --------------------------------------
class RateLimitError(KVSiftError):
    """Refused for now, before any work: the server answers 429 with ``Retry-After: retry_after``,
    a whole number of seconds (at least 1) after which a retry is expected to get through (an
    estimate from the queue and the recent jobs' durations)."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = max(1, math.ceil(retry_after)) if math.isfinite(retry_after) else 1


class QueueFullError(RateLimitError):
    """The waiting queue holds its maximum (``--max-waiting``)."""

    code = "server_busy"


class QueueWaitError(RateLimitError):
    """The expected wait in the queue is longer than the server allows (``--max-queue-seconds``)."""

    code = "queue_wait_too_long"


class ConcurrencyLimitError(RateLimitError):
    """The API key already has its maximum of requests queued or running (``--max-concurrent-per-key``
    or the key's ``max_concurrent``)."""

    code = "too_many_concurrent_requests"


class KVMemoryError(InputError):
    """A request whose KV would not fit the engine's KV memory (``kv_memory`` / ``host_memory`` of the
    scheduler, ``--kv-memory`` / ``--host-memory`` of the server) even with nothing else running."""

    code = "kv_memory_exceeded"
