"""Request parameters and outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy. ``min_tokens``: end-of-sequence tokens are not
    sampled before this many new tokens (vLLM's ``min_tokens``, HF's ``min_new_tokens``); stop
    strings still stop. ``ignore_eos``: an end-of-sequence token does not stop the sequence (it is
    kept as a token)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")


@dataclass(slots=True)
class GenerationStats:
    """What one generation cost. KV bytes are measured from the cache's real allocations right
    after prefill (when compression has happened) and at the end."""

    method: str = "full"
    budget: Any = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0          # forward passes after the prefill
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_device_bytes: int = 0       # compute-device KV allocated after prefill
    kv_host_bytes: int = 0         # host store (offloaded KV) after prefill
    kv_kept_bytes: int = 0         # used KV slots on the device after prefill
    kv_full_bytes: int = 0         # what a full cache holds for the same prompt
    kv_device_bytes_end: int = 0
    kv_host_bytes_end: int = 0
    decode_mode: str = "eager"     # eager | static | graph (kvsift.engine.decode)
    decode_setup_s: float = 0.0    # part of decode_s spent on the warm-up steps + CUDA graph recordings
    decode_setup_steps: int = 0    # decode steps run outside a graph while graphs were set up
    prefill_rows: int = 1          # sequences prefilled together in the prefill prefill_s times
    batch_rows: int = 1            # sequences decoding together when this one finished
    decode_wait_s: float = 0.0     # part of decode_s spent on other requests' prefills (joining the batch)
    method_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_ms_per_token(self) -> float:
        return 1000.0 * self.decode_s / self.decode_steps if self.decode_steps else 0.0

    @property
    def steady_ms_per_token(self) -> float:
        """Decode ms/token once running: without the one-off warm-up step and graph recording, and
        without the time spent on joining requests' prefills (``decode_wait_s``)."""
        steps = self.decode_steps - (self.decode_setup_steps or (1 if self.decode_setup_s else 0))
        own = self.decode_s - self.decode_setup_s - self.decode_wait_s
        return 1000.0 * own / steps if steps > 0 else self.decode_ms_per_token

    @property
    def kv_ratio(self) -> float:
        return self.kv_kept_bytes / self.kv_full_bytes if self.kv_full_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode_ms_per_token"] = self.decode_ms_per_token
        d["steady_ms_per_token"] = self.steady_ms_per_token
        d["kv_ratio"] = self.kv_ratio
        return d

    def summary(self) -> str:
        mb = 1 / 2**20
        s = (f"{self.prompt_tokens} prompt + {self.generated_tokens} generated tokens | method {self.method}"
             f"{'' if self.budget is None else f' budget {self.budget}'} | KV kept {self.kv_kept_bytes * mb:.1f} MiB "
             f"of {self.kv_full_bytes * mb:.1f} MiB full ({100 * self.kv_ratio:.1f}%), device alloc "
             f"{self.kv_device_bytes * mb:.1f} MiB, host {self.kv_host_bytes * mb:.1f} MiB | prefill "
             f"{self.prefill_s:.2f}s, decode {self.decode_ms_per_token:.1f} ms/token ({self.decode_mode})")
        if self.method_stats:
            s += " | " + ", ".join(f"{k} {_fmt(v)}" for k, v in self.method_stats.items())
        return s


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@dataclass(slots=True)
class RequestOutput:
    """One finished sequence."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str            # "stop" (EOS or stop string) | "length" | "cancelled"
    stats: GenerationStats


@dataclass(slots=True)
class StreamEvent:
    """One streaming step for one sequence: a text delta (may be empty while a stop string or a
    multi-byte character is pending); ``output`` is set on the last event. ``error``: this
    request failed on its own while the batch it joined goes on (e.g. its prefill ran out of
    memory); the event is its last (``finished``, no ``output``)."""

    index: int
    text: str
    token_id: int | None
    finished: bool = False
    output: RequestOutput | None = None
    error: BaseException | None = None
