"""The tiny method base, the shared selection code, composition and the registry.

A method is a small dataclass. It acts through three hooks, called by kvsift's attention function
for each layer (see ``kvsift/engine/attention.py``):

* ``prefill_end(layer, query, module, ctx)`` - after the last prefill chunk of ``layer`` attended.
  ``EvictionMethod`` implements it once for every scorer: ``score(...) -> (batch, kv_heads, n)``,
  keep the top ``layer_budget`` slots per (batch, kv_head), gather in place.
* ``plan(layer, query, ctx) -> (keys, values, positions) | None`` - decode-time, query-aware
  selection: the KV the new token attends to, computed once per layer per step.
* ``after_attend(layer, query, module, ctx)`` - runs after every attention call (e.g. rolling window).

Static decode (CUDA graphs): when every stage says ``static_ok()``, the engine fixes the cache's
shapes for the whole generation and may record one decode step in a CUDA graph and replay it. Then
``plan`` sees ``ctx.cache.static`` and returns a :class:`SlotSelection` (device buffers + an index table,
read in place by the sparse attention kernel) instead of gathered KV, and Python-side counters
touched while the step was recorded are fixed up through ``before_capture`` / ``after_capture`` /
``replayed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvsift.budget import Budget, parse_budget, resolve_budget, validate_budget  # noqa: F401 (re-exported)
from kvsift.errors import BudgetError, MethodOptionError, UnknownMethodError

if TYPE_CHECKING:
    from kvsift.cache import SiftCache, SiftLayer
    from kvsift.engine.attention import ForwardContext

@dataclass
class SlotSelection:
    """KV a decode step attends to besides the layer's own buffer, read in place: ``keys``/``values``
    ``(batch, kv_heads, slots, head_dim)`` device buffers, their token ``positions (batch, kv_heads,
    slots)``, and ``slots (batch, kv_heads, n)`` the indices to read (``-1`` = unused). The attention
    merges it with the layer's buffer by log-sum-exp (exact softmax over the union)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor

    def within(self, query_pos: torch.Tensor, window: int) -> "SlotSelection":
        """Only the slots whose token is inside a sliding ``window`` before ``query_pos (batch,)``."""
        pos = self.positions.gather(2, self.slots.to(torch.int64).clamp(min=0))
        keep = (self.slots >= 0) & (pos > query_pos[:, None, None] - window)
        return SlotSelection(self.keys, self.values, self.positions, torch.where(keep, self.slots, -1))

    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, positions)`` of the selected slots as copies (positions: 0 = valid, -1 =
        unused), for attention paths without the kernel (e.g. logit soft-capping)."""
        idx = self.slots.to(torch.int64)
        safe = idx.clamp(min=0)
        gi = safe[..., None].expand(*idx.shape, self.keys.shape[-1])
        pos = torch.where(idx >= 0, 0, -1).to(torch.int32)
        return self.keys.gather(2, gi), self.values.gather(2, gi), pos


@dataclass
class KVMethod:
    """Base of every method: budget handling and no-op hooks (which is exactly ``full``)."""

    budget: Budget = None
    name: ClassVar[str] = "base"
    needs_budget: ClassVar[bool] = True
    tokens: int = field(default=0, init=False, repr=False)        # resolved budget in tokens
    prompt_len: int = field(default=0, init=False, repr=False)
    num_layers: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        validate_budget(self.budget)
        if self.needs_budget and self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (tokens, e.g. 1024, or a ratio, e.g. 0.25)")

    # ---- lifecycle ---------------------------------------------------------------------------
    def resolve_budget(self, prompt_len: int) -> int:
        return resolve_budget(self.budget, prompt_len)

    def setup(self, cache: "SiftCache", prompt_len: int, num_layers: int) -> None:
        """Called once per generation before prefill."""
        self.prompt_len, self.num_layers = prompt_len, num_layers
        self.tokens = self.resolve_budget(prompt_len)

    def min_last_chunk(self) -> int:
        """Smallest last prefill chunk the method needs (e.g. SnapKV's observation window)."""
        return 0

    # ---- hooks -------------------------------------------------------------------------------
    def prefill_end(self, layer: "SiftLayer", query: torch.Tensor, module, ctx: "ForwardContext") -> None:
        pass

    def plan(self, layer: "SiftLayer", query: torch.Tensor, ctx: "ForwardContext"):
        return None

    def after_attend(self, layer: "SiftLayer", query: torch.Tensor, module, ctx: "ForwardContext") -> None:
        if ctx.prefill_end:
            self.prefill_end(layer, query, module, ctx)

    def stats(self) -> dict[str, Any]:
        """Method-specific counters for the generation summary."""
        return {}

    def row_prefill_ok(self) -> bool:
        """True when the engine may prefill a batch one sequence at a time and stack the compressed
        results, and it saves memory: the method shrinks the device KV at prefill end, and keeps no
        per-layer state or keeps it for the whole batch through ``ctx.info["row"] = (i, batch)`` and
        ``ctx.info["row_states"]`` (the batch cache's per-layer state dicts)."""
        return False

    # ---- static decode -----------------------------------------------------------------------
    def static_ok(self) -> bool:
        """True when a decode step keeps no per-step Python state and changes no shapes, so the
        engine may run it with fixed buffers and replay it from a CUDA graph. Methods whose decode
        hooks evict or reshape (e.g. a rolling window) say False."""
        return True

    def decode_variant(self):
        """The kind of the next decode step (hashable): steps of different kinds run different code
        (e.g. select chunks, or keep the last selection) and get one CUDA graph each."""
        return 0

    def before_capture(self) -> None:
        """A decode step is about to be recorded (not run) in a CUDA graph."""

    def after_capture(self) -> None:
        """The recording ended: undo Python-side effects of the recorded step."""

    def replayed(self, n: int = 1) -> None:
        """The recorded step ran ``n`` more times: Python-side counters catch up."""


@dataclass
class EvictionMethod(KVMethod):
    """Prefill eviction: subclasses write ``score``; selection and gather live here, once."""

    def score(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              module, layer_idx: int) -> torch.Tensor:
        """query ``(batch, q_heads, q, dim)`` of the last prefill chunk; keys/values
        ``(batch, kv_heads, n, dim)``; positions ``(batch, kv_heads, n)``. Returns scores
        ``(batch, kv_heads, n)``: higher = keep."""
        raise NotImplementedError

    def layer_budget(self, layer_idx: int) -> int:
        return self.tokens

    def row_prefill_ok(self) -> bool:
        return True  # keeps the top slots per row, no layer state

    def prefill_end(self, layer, query, module, ctx) -> None:
        k = self.layer_budget(layer.layer_idx)
        if layer.length <= k:
            return
        scores = self.score(query, layer.keys, layer.values, layer.positions, module, layer.layer_idx)
        keep_top(layer, scores, k)


def keep_top(layer: "SiftLayer", scores: torch.Tensor, k: int) -> None:
    """Keep the ``k`` best slots per (batch, kv_head) by ``scores (batch, kv_heads, n)``; padding
    slots (position -1) go first. Kept slots stay in their original order."""
    scores = scores.float().masked_fill(layer.positions < 0, float("-inf"))
    idx = scores.topk(min(k, scores.shape[-1]), dim=-1).indices.sort(dim=-1).values
    layer.keep(idx)


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(batch, q_heads, q, dim)`` -> ``(batch, kv_heads, group, q, dim)`` (q head i uses kv head i // group)."""
    b, hq, L, d = query.shape
    return query.reshape(b, kv_heads, hq // kv_heads, L, d)


@dataclass
class Compose(KVMethod):
    """``a+b``: hooks run in order (``a`` evicts at prefill, then ``b`` acts on what remains); the
    last stage that plans a decode selection wins."""

    stages: list[KVMethod] = field(default_factory=list)
    name: ClassVar[str] = "compose"
    needs_budget: ClassVar[bool] = False

    def __post_init__(self):
        if len(self.stages) < 2:
            raise ValueError("a composition needs at least two methods")

    @property
    def spec(self) -> str:
        return "+".join(s.name for s in self.stages)

    def setup(self, cache, prompt_len, num_layers):
        super().setup(cache, prompt_len, num_layers)
        for s in self.stages:
            s.setup(cache, prompt_len, num_layers)

    def min_last_chunk(self) -> int:
        return max(s.min_last_chunk() for s in self.stages)

    def plan(self, layer, query, ctx):
        for s in reversed(self.stages):
            sel = s.plan(layer, query, ctx)
            if sel is not None:
                return sel
        return None

    def after_attend(self, layer, query, module, ctx):
        for s in self.stages:
            s.after_attend(layer, query, module, ctx)

    def stats(self):
        out: dict[str, Any] = {}
        for s in self.stages:
            out.update(s.stats())
        return out

    def static_ok(self) -> bool:
        return all(s.static_ok() for s in self.stages)

    def row_prefill_ok(self) -> bool:
        return all(s.row_prefill_ok() for s in self.stages)

    def decode_variant(self):
        return tuple(s.decode_variant() for s in self.stages)

    def before_capture(self) -> None:
        for s in self.stages:
            s.before_capture()

    def after_capture(self) -> None:
        for s in self.stages:
            s.after_capture()

    def replayed(self, n: int = 1) -> None:
        for s in self.stages:
            s.replayed(n)


# ---- registry ----------------------------------------------------------------------------------
_REGISTRY: dict[str, type[KVMethod]] = {}


def register(name: str):
    """Class decorator: make a method available by ``name`` to the CLI, the server and eval."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    import kvsift.methods  # noqa: F401  (imports every method module, which registers itself)


def available_methods() -> dict[str, str]:
    """name -> one-line description."""
    _load_builtin()
    return {n: (c.__doc__ or "").strip().splitlines()[0] for n, c in sorted(_REGISTRY.items())}


def method_class(name: str) -> type[KVMethod]:
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_method(spec: "str | KVMethod", budget: Budget = None, **kwargs) -> KVMethod:
    """Build a method from a spec such as ``"snapkv"`` or ``"snapkv+sentencekv"``.

    ``kwargs`` go to every stage that has a field of that name (unknown names are an error).
    """
    if isinstance(spec, KVMethod):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownMethodError(f"method must be a non-empty name, got {spec!r}")
    names = [p.strip() for p in spec.split("+")]
    classes = [method_class(n) for n in names]
    known = {f.name for c in classes for f in fields(c) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise MethodOptionError(f"unknown option(s) {unknown} for method {spec!r}; options: {sorted(known - {'budget'})}")
    stages = []
    for c in classes:
        own = {f.name for f in fields(c) if f.init}
        stages.append(c(budget=budget, **{k: v for k, v in kwargs.items() if k in own}))
    return stages[0] if len(stages) == 1 else Compose(budget=budget, stages=stages)
