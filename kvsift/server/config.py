"""Server settings (validated once, at startup)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from kvsift.methods.base import Budget, validate_budget


@dataclass(slots=True)
class ServerConfig:
    """What ``kvsift serve`` needs besides the model.

    ``max_running``: generations holding the engine at once (the engine runs one forward at a time per
    model, so 1 is the honest default; the rest wait in a FIFO queue of at most ``max_waiting``).
    ``contexts_dir``: where reusable contexts are persisted (None = memory only).
    ``context_memory_bytes``: LRU limit on the KV bytes (device + host) of contexts kept in memory.
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
    context_memory_bytes: int = 2 * 2**30
    max_contexts: int = 1000

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
