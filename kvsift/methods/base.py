"""The method contract: frozen configs, per-generation runs, typed per-layer state, one selection
type; the shared selection code, composition and the registry.

A method is a small frozen dataclass (its options, validated in ``__post_init__``). Per
generation, ``method.start(prompt_len, num_layers)`` returns a :class:`Run` (the resolved budget
and whatever the method counts); the engine passes it back to every hook. Per decoder layer, a
method keeps its state in ``layer.state[method.name]``, a :class:`LayerState` (typed: clone,
nbytes, repeat_batch, kv_state_dict / kv_from_state_dict, offloaded).

Hooks, called by kvsift's attention function for each layer (``kvsift/engine/attention.py``):

* ``on_append(run, layer, ctx)`` - a decode step wrote the new token's KV at
  ``layer.written_slots(1)`` (a ``(1,)`` int64 device tensor), e.g. to keep page summaries current;
* ``plan(run, layer, query, ctx) -> Selection | None`` - what the new token attends to (decode, and
  prefill over a layer whose KV is partly offloaded): slots of the layer's own buffer and/or KV
  from elsewhere (:class:`SlotSource`). The engine attends to it the same way in every decode
  mode: a gather in eager mode on the CPU, the sparse kernel through the slot table otherwise.
  Methods never see the mode;
* ``after_attend(run, layer, query, module, ctx)`` - after the layer attended; by default calls
  ``prefill_end(run, layer, query, module, ctx)`` after the last prefill chunk. ``EvictionMethod``
  implements ``prefill_end`` once for every scorer: ``score(...) -> (batch, kv_heads, n)``, keep the
  top ``layer_budget`` slots per (batch, kv_head), gather in place.

Static decode (CUDA graphs) needs no method cooperation beyond ``static_ok()``: a plan runs on the
device only, counters are device tensors (a replayed graph keeps counting), and the step index
the engine passes (``ctx.step``) is what a method may branch on (``decode_variant(run, step)``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvsift.budget import Budget, parse_budget, resolve_budget, validate_budget  # noqa: F401 (re-exported)
from kvsift.errors import BudgetError, MethodOptionError, UnknownMethodError
from kvsift.kernels.slot_scores import page_slots
from kvsift.kernels.sparse_decode_attention import slot_rows

if TYPE_CHECKING:
    from kvsift.cache import SiftLayer
    from kvsift.engine.attention import ForwardContext


# ---- selections ----------------------------------------------------------------------------------
@dataclass
class SlotSource:
    """KV outside the layer's own buffer, read in place: ``keys``/``values`` ``(batch, kv_heads,
    slots, head_dim)`` device buffers, their token ``positions (batch, kv_heads, slots)``, and
    ``slots (batch, kv_heads, n)`` the indices to read (``-1`` = unused). ``dense``: the buffers
    hold exactly the selection, in order (``slots`` is ``0 .. n-1`` where a position is valid, -1
    where it is ``-1``: a fetch that already copied the chunks), so the attention reads them whole,
    masked by position, and :meth:`gather` copies nothing."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    dense: bool = False

    @property
    def read_slots(self) -> torch.Tensor | None:
        """The slot table for the attention: None (every slot, masked by position) when ``dense``
        and there is a slot (an empty selection keeps its empty table)."""
        return None if self.dense and self.keys.shape[2] > 0 else self.slots

    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, positions)`` of the selected slots ``(batch, kv_heads, n, ...)``
        (position ``-1`` where unused): copies, or the buffers themselves when ``dense``."""
        if self.dense:
            return self.keys, self.values, self.positions.to(torch.int32)
        idx = self.slots.to(torch.int64)
        safe = idx.clamp(min=0)
        pos = torch.where(idx >= 0, self.positions.gather(2, safe), -1).to(torch.int32)
        return (*slot_rows(self.keys, self.values, idx=safe), pos)


@dataclass
class Selection:
    """What one layer attends to at one step.

    ``own``: ``(batch, kv_heads, k)`` int slots of the layer's own buffer (``-1`` = none), or None
    for every valid slot. ``extra``: KV kept elsewhere (e.g. chunks fetched from the host), attended
    in addition. Slots whose position is padding, in the future or outside a sliding window are
    masked by the engine, so a method may name slots freely (e.g. a whole page past the last
    token). ``page > 1``: each entry of ``own`` is a page index standing for the slots ``p * page
    .. p * page + page - 1`` (the kernel reads the pages whole: a table ``page`` times shorter).
    ``blocks`` (a prefill chunk only): ``(first query row, source)`` pairs, ascending from 0; the
    chunk's query rows from each first row to the next one's (or the chunk's end) attend to
    ``own`` plus that source, in place of ``extra`` (retrieval per block of queries)."""

    own: torch.Tensor | None = None
    extra: SlotSource | None = None
    page: int = 1
    blocks: list | None = None

    def __post_init__(self):
        if isinstance(self.page, bool) or not isinstance(self.page, int) or self.page < 1:
            raise ValueError(f"page must be a positive int, got {self.page!r}")
        if self.page > 1 and self.own is None:
            raise ValueError("a page selection needs own page indices")
        if self.blocks is not None and (self.extra is not None or not self.blocks or self.blocks[0][0] != 0
                                        or any(a[0] >= b[0] for a, b in zip(self.blocks, self.blocks[1:]))):
            raise ValueError("blocks must be (first query row, source) pairs ascending from row 0, without extra")

    def own_slots(self) -> torch.Tensor | None:
        """``own`` as slots ``(batch, kv_heads, k * page)`` (negative where unused)."""
        if self.own is None or self.page == 1:
            return self.own
        return page_slots(self.own, self.page)


# ---- per-layer state -------------------------------------------------------------------------------
STATE_MODULES = ("kvsift.",)  # layer-state classes are only ever imported from these packages


def state_path(cls: type) -> str:
    """``module:qualname`` of a layer-state class, as persisted."""
    return f"{cls.__module__}:{cls.__qualname__}"


def state_class(path: str) -> type:
    """The layer-state class named by :func:`state_path` (only from :data:`STATE_MODULES`; anything
    else is a ``ValueError``: persisted files must not import arbitrary code)."""
    import importlib

    module, _, qualname = path.partition(":")
    if not module.startswith(STATE_MODULES):
        raise ValueError(f"refusing to load method state class {path!r} (outside {STATE_MODULES})")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class LayerState:
    """Base of a method's per-layer state (``layer.state[method.name]``). The defaults walk the
    dataclass fields: tensors (batch-first, on the compute device) are cloned, counted, repeated
    over the batch and persisted; nested ``LayerState``s delegate; JSON scalars persist as they
    are; any other field is shared by clones and not persisted (caches, held selections)."""

    offloaded: ClassVar[bool] = False   # part of the layer's KV lives here, not in the buffer
    planner: ClassVar[bool] = False     # a reused context holding it is answered with its own method

    def clone(self) -> "LayerState":
        new = copy.copy(self)
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, LayerState)) or hasattr(v, "kv_state_dict"):
                setattr(new, f.name, v.clone())
        return new

    def ready(self) -> bool:
        """False while an asynchronous write of this state is still in flight (sentencekv's chunks
        on their way to host memory), so that reading it now (stacking rows at a join) would wait
        for it; the engine then lets a running batch take steps before it stacks the joiners. The
        default asks the fields that can say (nested states, a chunk store)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if callable(getattr(v, "ready", None)) and not v.ready():
                return False
        return True

    def nbytes(self) -> tuple[int, int]:
        """``(device bytes, host bytes)`` really allocated."""
        dev = host = 0
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                dev += v.numel() * v.element_size()
            elif hasattr(v, "nbytes") and callable(v.nbytes):
                d, h = v.nbytes()
                dev, host = dev + d, host + h
        return dev, host

    def repeat_batch(self, times: int) -> None:
        """Repeat every row ``times`` times (a context answering a batch of questions)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                setattr(self, f.name, v.repeat_interleave(times, 0))
            elif hasattr(v, "repeat_batch"):
                v.repeat_batch(times)

    def kv_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON extras to persist (``kv_from_state_dict`` rebuilds the state)."""
        tensors: dict[str, torch.Tensor] = {}
        extra: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                tensors[f.name] = v
            elif isinstance(v, (bool, int, float, str)) or v is None:
                extra[f.name] = v
            elif hasattr(v, "kv_state_dict"):
                t, e = v.kv_state_dict()
                tensors.update({f"{f.name}.{k}": x for k, x in t.items()})
                extra[f.name] = {"class": state_path(type(v)), "extra": e}
        return tensors, extra

    @classmethod
    def kv_from_state_dict(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], device) -> "LayerState":
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if not f.init:
                continue
            if f.name in tensors:
                kw[f.name] = tensors[f.name].to(device)
            elif isinstance((extra or {}).get(f.name), dict) and "class" in extra[f.name]:
                pre = f"{f.name}."
                kw[f.name] = state_class(extra[f.name]["class"]).kv_from_state_dict(
                    {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, extra[f.name]["extra"], device)
            elif f.name in (extra or {}):
                kw[f.name] = extra[f.name]
        return cls(**kw)


# ---- methods ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One generation's method state: the budget resolved for the prompt (``tokens`` per layer and
    KV head), the prompt length and the layer count. Methods that count things subclass it."""

    tokens: int
    prompt_len: int
    num_layers: int


@dataclass(frozen=True)
class KVMethod:
    """Base of every method: budget handling and no-op hooks (which is exactly ``full``).

    Parameters
    ----------
    budget : int | float | None
        Tokens kept per layer and KV head (``int``), or a ratio of the prompt (``float`` in (0, 1]).
    """

    budget: Budget = None
    name: ClassVar[str] = "base"
    needs_budget: ClassVar[bool] = True
    decode_only: ClassVar[bool] = False   # acts at decode only (no prefill-time state): Quest, TokenSelect
    ragged: ClassVar[bool] = False        # keeps per-head lengths compactly (``layer.ragged``): no '+'
    codec: ClassVar[bool] = False         # stores the kept KV in another form (kivi): a '+' ends with it
    attention_only: ClassVar[bool] = False  # only changes how prefill attends (no KV state): minference
    composes: ClassVar[bool] = True       # False: joins a '+' only after attention-only stages (shadowkv)

    def __post_init__(self):
        object.__setattr__(self, "budget", validate_budget(self.budget))
        if self.needs_budget and self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (tokens, e.g. 1024, or a ratio, e.g. 0.25)")

    @property
    def spec(self) -> str:
        return self.name

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, prompt_len: int, num_layers: int) -> Run:
        """Per-generation state for a prompt of ``prompt_len`` tokens (raises ``BudgetError`` when
        the budget does not fit it: the engine and the server call this before any compute)."""
        return Run(resolve_budget(self.budget, prompt_len), prompt_len, num_layers)

    def min_last_chunk(self) -> int:
        """Smallest last prefill chunk the method needs (e.g. SnapKV's observation window)."""
        return 0

    def check_model(self, info) -> None:
        """Raise (a ``ValueError``) before any compute when the method cannot run on the model
        described by ``info`` (a :class:`~kvsift.models.loader.ModelInfo`), e.g. per-model data made
        for another model. The engine calls it once per request. Default: any model."""

    def layer_state(self, layer: "SiftLayer"):
        """This method's state in ``layer`` (None until it made one)."""
        return layer.state.get(self.name)

    # ---- hooks -------------------------------------------------------------------------------
    def on_append(self, run: Run, layer: "SiftLayer", ctx: "ForwardContext") -> None:
        pass

    def prefill_end(self, run: Run, layer: "SiftLayer", query: torch.Tensor, module, ctx: "ForwardContext") -> None:
        pass

    def plan(self, run: Run, layer: "SiftLayer", query: torch.Tensor, ctx: "ForwardContext") -> Selection | None:
        return None

    def prefill_attention(self, run: Run, layer: "SiftLayer", query: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, scale: float, module, ctx: "ForwardContext") -> torch.Tensor | None:
        """The attention output of one prefill chunk, or None for the engine's dense attention.
        Asked only for a fresh, unpadded chunk over the layer's own KV (no sliding window, no soft
        cap, no holes): query ``(batch, q_heads, L, dim)`` post-RoPE, keys/values ``(batch, kv_heads,
        n, dim)`` every key of the layer, the chunk's tokens being the last ``L`` slots in order.
        Returns ``(batch, q_heads, L, dim)`` (MInference's sparse prefill). Default: None."""
        return None

    def after_attend(self, run: Run, layer: "SiftLayer", query: torch.Tensor, module, ctx: "ForwardContext") -> None:
        if ctx.prefill_end and not ctx.rereading:
            self.prefill_end(run, layer, query, module, ctx)

    def reread_passes(self, run: Run, prompt_ids: list[int], tokenizer) -> list[list[int]]:
        """Token sequences the engine feeds after the prefill of one sequence (``prompt_ids``), each
        attending to the prompt's KV and then dropped from the cache (``ctx.rereading`` is True
        while they run); e.g. KVzip's context reconstruction. Default: none."""
        return []

    def finish_prefill(self, run: Run, layers: list, ctx: "ForwardContext") -> None:
        """After the whole prefill of a sequence (and its reread passes), every layer at once:
        deferred compression (e.g. a global budget over layers and heads). Default: nothing."""

    def rows_stacked(self, run: Run, layers: list, ctx: "ForwardContext") -> None:
        """After a batch prefilled one sequence at a time was stacked into the batch cache (its
        ``layers``): what needs the whole batch, e.g. a codec storing it (kivi). Default: nothing."""

    def stats(self, run: Run) -> dict[str, Any]:
        """Method-specific counters for the generation summary (may read device counters)."""
        return {}

    def row_prefill_ok(self) -> bool:
        """True when the engine may prefill a batch one sequence at a time and stack the compressed
        results, and it saves memory: the method shrinks the device KV at prefill end, and keeps no
        per-layer state or keeps it for the whole batch through ``ctx.row = (i, batch)`` and
        ``ctx.row_states`` (the batch cache's per-layer state dicts)."""
        return False

    def offloads_to_host(self) -> bool:
        """True when the method keeps part of the prompt's KV in host memory (the scheduler's host
        memory admission counts it)."""
        return False

    def pads_exactly(self) -> bool:
        """True when a left-padded batch gives every row what it gets alone (nothing is resolved
        against the batch's longest prompt, and padding moves nothing the method reads), so requests
        of other prompt lengths may share a batch and joiners prefill as one padded batch.
        Default: False."""
        return False

    def joins_rows(self) -> bool:
        """True when a sequence's whole state after its prefill is its kept KV slots (the layers'
        keys, values and positions, dense or compact per head) and decoding does no method work:
        then sequences prefilled apart, each with its own run (budget resolved against its own
        prompt), may be stacked into one running batch and decode there exactly as alone
        (continuous batching, :meth:`LLM.joins_running <kvsift.engine.llm.LLM.joins_running>`).
        False for methods that evict, select or summarise at decode, offload or quantize.
        Default: False."""
        return False

    def chunk_invariant(self) -> bool:
        """True when a prompt's prefill gives the same KV and method state however it is cut into
        chunks (exact attention in every chunk; the method acts at the prefill's end or at decode
        only), so a joining prompt may be prefilled in narrower chunks than ``chunk_size``
        (``LLM(join_chunk_size=...)``) and still get what it gets alone. Default: False (e.g. an
        eviction scores with the last chunk's queries, minference's patterns are per chunk)."""
        return False

    def shares_prefix(self) -> bool:
        """True when, until its prefill's last chunk, the method does what ``full`` does: no
        eviction, no sparse attention, no counters in its run and no layer state but what
        :meth:`prefix_state` names; it acts with the
        last chunk's queries, after the prefill (reread passes, deferred compression) or at decode
        only. A prompt's KV before its last chunk is then the full cache's, and the engine may take
        it from the runner's :class:`~kvsift.engine.prefix.PrefixStore` (computed once for many
        methods and budgets: ``kvsift bench run --share-prefix-gib``) and prefill only the last
        chunk with the method. Default: False (e.g. sentencekv with prefill_offload evicts as it
        goes, minference attends sparsely)."""
        return False

    def prefix_state(self) -> Hashable | None:
        """For a method that :meth:`shares_prefix`: None when, before its last prefill chunk, it
        keeps no state of its own (the prefix is the full cache's KV alone, shared with every such
        method); else a hashable naming the per-layer state it has built by then, which must not
        depend on the budget (h2o's accumulated attention, expected_attention's query statistics):
        the stored prefix then carries a copy of that state and serves that method at every
        budget. Default: None."""
        return None

    def reread_state(self) -> Hashable | None:
        """For a method with :meth:`reread_passes` that :meth:`shares_prefix`: None (the default)
        when what its passes leave must be recomputed for every prefill; else a hashable naming
        what they depend on besides the prompt (kvzip: its pass chunking and softmax), promising
        that the per-layer state they leave (``layer.state``, all of it, before
        :meth:`finish_prefill`) does not depend on the budget and that nothing else they compute is
        needed later. The runner's :class:`~kvsift.engine.prefix.PrefixStore` then keeps a copy of
        that state per prompt, and a later prefill of the same prompt (another budget) installs it
        instead of running the passes again (they cost about one more prefill each time)."""
        return None

    def join_token(self, run: "Run") -> Any:
        """What else rows must share to be stacked into one running batch when :meth:`joins_rows`
        (besides the method family, the context and the sampling): None by default; a method whose
        decode reads a per-batch value from its run says which (sentencekv: the prompt tokens
        attended per step)."""
        return None

    def preemptible(self) -> bool:
        """True when a running sequence's state is only its device KV rows (:meth:`joins_rows` and
        nothing offloaded), so the engine may swap its rows to host memory and back (preemption)."""
        return self.joins_rows() and not self.offloads_to_host()

    def device_share(self, head_dim: int) -> tuple[float, int]:
        """``(share, window)`` for memory admission: the device bytes of a kept token after the
        prefill as a share of its KV at the model's dtype, and tokens per layer and KV head kept
        beside them at full precision. Default ``(1.0, 0)``; a composition with a storage codec
        (``snapkv+kivi``) answers with the codec's (kivi: codes and scales, its recent window)."""
        c = codec_stage(self)
        return c.device_share(head_dim) if c is not None and c is not self else (1.0, 0)

    def device_tokens(self, run: Run, prompt_len: int, info=None) -> int:
        """Prompt tokens per layer and KV head the method keeps on the device after the prefill (in
        tokens of full KV: a method keeping something else counts its bytes as that many tokens),
        for memory admission (:func:`kvsift.budget.request_kv_bytes`); ``info``: the model's
        :class:`~kvsift.models.loader.ModelInfo` where the answer depends on its shape. Default:
        the budget's, ``run.tokens``; a decode-time selection keeps the whole prompt (it selects
        from it at every step); shadowkv its factors and landmarks of every token besides."""
        return run.tokens

    def decode_kv_tokens(self, run: Run, new_tokens: int) -> int:
        """KV slots per layer and KV head that decoding ``new_tokens`` tokens adds at most, for memory
        admission (:func:`kvsift.budget.request_kv_bytes`). Default: all of them; a method that
        evicts one token per step once over its budget (streaming, tova, h2o) holds at most one
        more than its budget."""
        return new_tokens

    def joins_at_budget(self, run: "Run | None", prompt_len: int) -> bool:
        """True when this method evicts while decoding one token per step per row once a layer is
        over its budget (streaming, tova, h2o) and a sequence of ``prompt_len`` tokens (a reused
        context's included) holds exactly its budget in every layer after the prefill: such rows,
        with equal budgets (``run.tokens``), evict in lockstep, so they may be stacked into one
        running batch and decode there exactly as alone (:meth:`LLM.joins_running
        <kvsift.engine.llm.LLM.joins_running>`), their per-layer state restacked by
        :meth:`restack_state`. Default: False."""
        return False

    def restack_state(self, layer: "SiftLayer", sources: list) -> None:
        """A running batch's rows changed: ``layer`` (the new batch's) now holds, in order, the
        rows of ``sources`` (``(old_layer, row)`` pairs; the old layers still hold their state).
        Rebuild this method's per-layer state for them. Default: nothing to carry (the state of a
        method whose rows join is its KV)."""

    def reads_context_in_place(self) -> bool:
        """True when a generation over a reusable context may read the context's KV by reference
        (``SiftCache.share``: every row attends to it, nothing copied) instead of a copy per row: the
        method never evicts, selects or summarises the context's slots (``full``)."""
        return False

    def prefill_hold(self, run: Run) -> int | None:
        """Device KV tokens per layer and KV head the method keeps between prefill chunks when it
        compresses as it goes (``chunked``), or None: the prompt's whole KV is on the device until
        its prefill ends. The engine sizes the prefill buffers for this plus one chunk."""
        return None

    def host_share(self, head_dim: int | None = None) -> float:
        """The share of a prompt token's KV bytes (keys, values, position) the method keeps in host
        memory: what host memory admission counts per prompt token (1.0 for the whole KV).
        ``head_dim`` (the model's) lets a composition count a codec's smaller host rows."""
        return 1.0 if self.offloads_to_host() else 0.0

    def static_ok(self) -> bool:
        """True when a decode step keeps no per-step host state and changes no shapes, so the
        engine may run it with fixed buffers and replay it from a CUDA graph. Methods whose decode
        hooks evict or reshape (e.g. a rolling window) say False."""
        return True

    def graph_ok(self) -> bool:
        """True when a static decode step also makes no host round trip (no sync, no copy through
        pageable memory), so the engine may record it in a CUDA graph. Default: ``static_ok()``;
        methods that fetch host KV say so only where the UVA copy kernel fetches it
        (``KVSIFT_NO_UVA`` takes the host path, which syncs)."""
        if self.offloads_to_host():
            from kvsift.methods._offload import uva_enabled

            return self.static_ok() and uva_enabled()
        return self.static_ok()

    def quantized_ok(self) -> bool:
        """True when a storage codec (kivi) may follow this method in a composition: at decode it
        evicts nothing (quantized KV is append-only) and reads keys only through the layer's slot API
        (``layer.slot_capacity``, ``layer.slot_keys``). Default: what allows static decode."""
        return self.static_ok()

    def decode_variant(self, run: Run, step: int):
        """The kind of decode step ``step`` (hashable): steps of different kinds run different code
        (e.g. select chunks, or keep the last selection) and get one CUDA graph each."""
        return 0


@dataclass(frozen=True)
class EvictionMethod(KVMethod):
    """Prefill eviction: subclasses write ``score``; selection and gather live here, once.

    The steps, each overridable on its own so wrappers (``adakv(snapkv)``) reuse any scorer:

    * ``observe(run, layer, query, module, ctx)``: after every prefill chunk (and every reread pass)
      attended, e.g. to accumulate attention (H2O) or reconstruction scores (KVzip);
    * ``prefill_scores(run, layer, query, module, ctx) -> (batch, kv_heads, n)``: at the end of the
      prefill (default: ``score`` over the layer's KV with the last chunk's queries);
    * ``compress(run, layer, scores)``: keep the top ``layer_budget`` slots per (batch, kv_head).

    ``deferred`` methods compress after the whole prefill (``finish_prefill``, every layer at once,
    after any ``reread_passes`` ran) instead of per layer at its end, with ``deferred_scores``.
    """

    deferred: ClassVar[bool] = False
    slot_state: ClassVar[bool] = False   # keeps per-slot state across prefill chunks (H2O's accumulated attention)

    def score(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              module, layer_idx: int) -> torch.Tensor:
        """query ``(batch, q_heads, q, dim)`` of the last prefill chunk; keys/values
        ``(batch, kv_heads, n, dim)``; positions ``(batch, kv_heads, n)``. Returns scores
        ``(batch, kv_heads, n)``: higher = keep."""
        raise NotImplementedError

    def layer_budget(self, run: Run, layer_idx: int) -> int:
        return run.tokens

    def row_prefill_ok(self) -> bool:
        return True  # keeps the top slots per row, no layer state

    def evicts_while_decoding(self) -> bool:
        """True for a method that, at each decode step, evicts one token per row from a layer over
        its budget (streaming, tova, h2o): it joins running batches only at its budget, and decoding
        adds at most one slot. Default: False (evicts at prefill only)."""
        return False

    def joins_rows(self) -> bool:
        return not self.evicts_while_decoding()

    def decode_kv_tokens(self, run: Run, new_tokens: int) -> int:
        return min(new_tokens, 1) if self.evicts_while_decoding() else new_tokens  # one over the budget

    def joins_at_budget(self, run: "Run | None", prompt_len: int) -> bool:
        # every row at its budget evicts in lockstep with the others of that budget
        return self.evicts_while_decoding() and run is not None and prompt_len >= run.tokens

    def observe(self, run: Run, layer: "SiftLayer", query: torch.Tensor, module, ctx: "ForwardContext") -> None:
        """After each prefill chunk or reread pass attended (``ctx.rereading`` tells which)."""

    def prefill_scores(self, run: Run, layer: "SiftLayer", query: torch.Tensor, module,
                       ctx: "ForwardContext") -> torch.Tensor:
        """Scores ``(batch, kv_heads, n)`` of the layer's slots at the end of the prefill."""
        return self.score(query, layer.keys, layer.values, layer.positions, module, layer.layer_idx)

    def deferred_scores(self, run: Run, layer: "SiftLayer") -> torch.Tensor:
        """Scores ``(batch, kv_heads, n)`` of a deferred method, after the whole prefill; called once
        for every layer holding KV (within budget or not), so it may drop the layer's state."""
        raise NotImplementedError

    def compress(self, run: Run, layer: "SiftLayer", scores: torch.Tensor) -> None:
        """Keep the best ``layer_budget`` slots per (batch, kv_head) by ``scores``."""
        k = self.layer_budget(run, layer.layer_idx)
        if layer.length > k:
            keep_top(layer, scores, k)

    def after_attend(self, run, layer, query, module, ctx) -> None:
        if ctx.decoding:
            return
        self.observe(run, layer, query, module, ctx)
        if ctx.prefill_end and not ctx.rereading:
            self.prefill_end(run, layer, query, module, ctx)

    def prefill_end(self, run, layer, query, module, ctx) -> None:
        if self.deferred or layer.length <= self.layer_budget(run, layer.layer_idx):
            return
        self.compress(run, layer, self.prefill_scores(run, layer, query, module, ctx))

    def prefill_done(self, run: Run, ctx: "ForwardContext") -> None:
        """Start of ``finish_prefill``: count what the whole prefill did (e.g. the reread passes'
        time, ``ctx.reread_s``). Default: nothing."""

    def finish_prefill(self, run, layers, ctx) -> None:
        self.prefill_done(run, ctx)
        if not self.deferred:
            return
        for layer in layers:  # every layer: deferred_scores may free the state it scored from
            if layer.k_buf is not None:
                self.compress(run, layer, self.deferred_scores(run, layer))


@dataclass
class WrapRun(Run):
    """A wrapper's run: the wrapped scorer's own run in ``inner``."""

    inner: Run | None = None


@dataclass(frozen=True)
class ScorerWrapper(EvictionMethod):
    """Base of methods that wrap a scorer (an :class:`EvictionMethod`), written ``name(scorer)``,
    e.g. ``adakv(snapkv)``: the scorer's ``observe``, ``prefill_scores``, ``deferred_scores``,
    ``reread_passes`` and ``layer_budget`` run as they are; the wrapper changes the selection
    (``compress``) or when it happens. ``scorer`` is the wrapped spec; ``self.inner`` the built
    scorer (with the options it takes)."""

    scorer: str = "snapkv"
    inner: EvictionMethod | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.inner is None:
            self.wrap(build_method(self.scorer, self.budget))

    def wrap(self, inner: KVMethod) -> None:
        """Set the wrapped scorer (``build_method`` builds it with its options)."""
        if not isinstance(inner, EvictionMethod) or isinstance(inner, ScorerWrapper) or not inner.row_prefill_ok():
            raise MethodOptionError(f"{self.name}(...) wraps a scorer (an eviction method such as snapkv, h2o, "
                                    f"tova, expected_attention, kvzip), got {getattr(inner, 'spec', inner)!r}",
                                    param="scorer")
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "scorer", inner.spec)

    @property
    def spec(self) -> str:
        return f"{self.name}({self.inner.spec})"

    @property
    def deferred(self) -> bool:  # type: ignore[override]
        return self.inner.deferred

    def start(self, prompt_len, num_layers) -> WrapRun:
        inner = self.inner.start(prompt_len, num_layers)
        return WrapRun(inner.tokens, prompt_len, num_layers, inner)

    def min_last_chunk(self) -> int:
        return self.inner.min_last_chunk()

    def layer_budget(self, run, layer_idx):
        return self.inner.layer_budget(run.inner, layer_idx)

    def observe(self, run, layer, query, module, ctx):
        self.inner.observe(run.inner, layer, query, module, ctx)

    def prefill_scores(self, run, layer, query, module, ctx):
        return self.inner.prefill_scores(run.inner, layer, query, module, ctx)

    def deferred_scores(self, run, layer):
        return self.inner.deferred_scores(run.inner, layer)

    def reread_passes(self, run, prompt_ids, tokenizer):
        return self.inner.reread_passes(run.inner, prompt_ids, tokenizer)

    def prefill_done(self, run, ctx):
        self.inner.prefill_done(run.inner, ctx)

    def stats(self, run):
        return self.inner.stats(run.inner)


@dataclass
class SelectRun(Run):
    """A decode-time selection's run: ``sel_tokens`` attended per layer and KV head at each step."""

    sel_tokens: int = 0


@dataclass(frozen=True)
class DecodeSelect(KVMethod):
    """Base of decode-time selection methods (Quest, TokenSelect, Squeezed): ``plan`` names slots
    of the layer's buffer to attend; the budget is the tokens attended per step, and
    ``decode_budget`` sets it apart from the prefill budget when composed after an eviction
    (``snapkv+quest``)."""

    decode_budget: Budget = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "decode_budget", validate_budget(self.decode_budget, "decode_budget"))

    def chunk_invariant(self) -> bool:
        return True   # selects at decode (squeezed clusters at the prefill's end)

    def shares_prefix(self) -> bool:
        return self.decode_only   # quest, tokenselect: no prefill-time state (squeezed says so itself)

    def device_tokens(self, run, prompt_len: int, info=None) -> int:
        return prompt_len   # the budget is what a decode step reads, not what is kept

    def start(self, prompt_len: int, num_layers: int) -> SelectRun:
        tokens = resolve_budget(self.budget, prompt_len)
        return SelectRun(tokens, prompt_len, num_layers, decode_tokens(self.decode_budget, tokens, prompt_len))


def decode_tokens(decode_budget: Budget, tokens: int, prompt_len: int) -> int:
    """Prompt tokens attended per step at decode: ``decode_budget`` resolved over the prompt (a
    token count capped at it), or the prefill budget's ``tokens`` when there is none."""
    if decode_budget is None:
        return tokens
    return resolve_budget(decode_budget, prompt_len, clamp=True, what="decode_budget")


def keep_top(layer: "SiftLayer", scores: torch.Tensor, k: "int | torch.Tensor") -> None:
    """Keep the best slots per (batch, kv_head) by ``scores (batch, kv_heads, n)``: ``k`` of them, or
    ``k (batch, kv_heads)`` per head (kept lengths may differ per head: the shorter heads' tail
    slots become holes, position -1). Padding slots (position -1) go first. Kept slots stay in
    their original order."""
    scores = scores.float().masked_fill(layer.positions < 0, float("-inf"))
    width = int(k.max()) if isinstance(k, torch.Tensor) else k
    idx = scores.topk(min(width, scores.shape[-1]), dim=-1).indices
    if isinstance(k, torch.Tensor):  # rank r >= k[b, h] is a hole
        rank = torch.arange(idx.shape[-1], device=idx.device)
        idx = torch.where(rank < k.to(idx.device)[..., None], idx, -1)
    big = scores.shape[-1]
    idx = torch.where(idx < 0, big, idx).sort(dim=-1).values
    layer.keep(torch.where(idx >= big, -1, idx))


def head_budgets(scores: torch.Tensor, valid: torch.Tensor, k: int,
                 alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ada-KV's allocation of ``k * heads`` slots per batch row over its heads (a layer's KV heads;
    KVzip passes every layer's heads at once, ``(batch, layers * kv_heads, n)``).

    scores ``(batch, heads, n)`` (comparable across heads, e.g. attention weights), valid
    ``(batch, heads, n)`` bool (real tokens). Each head first gets its top ``floor(alpha * k)``
    slots; the rest of the layer's budget goes to the best remaining scores of any head. Returns
    ``(scores with the guaranteed slots raised to +inf, counts (batch, kv_heads) int64)``: keeping
    the top ``counts[b, h]`` of head ``h`` by those scores keeps exactly the allocated slots."""
    b, h, n = scores.shape
    s = scores.float().masked_fill(~valid, float("-inf"))
    floor = min(int(alpha * k), n)
    if floor > 0:
        top = s.topk(floor, dim=-1).indices
        s = s.scatter(-1, top, torch.where(valid.gather(-1, top), float("inf"), float("-inf")))
    total = min(k * h, h * n)
    flat = s.flatten(1)                                                     # (b, h * n)
    picked = flat.topk(total, dim=-1)
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, picked.indices, torch.isfinite(picked.values)
                                                               | (picked.values > 0))
    counts = chosen.view(b, h, n).sum(-1)
    return s, counts


def top_pages(scores: torch.Tensor, k: int, tail_page: "torch.Tensor | int | None" = None) -> torch.Tensor:
    """Page indices of the best ``k`` pages by ``scores (batch, kv_heads, n_pages)`` (``-inf`` = not
    a candidate; ``-1`` where fewer are), then ``tail_page`` (an int or a ``(1,)`` device tensor:
    always attended, e.g. the page being filled) when given. Returns ``(batch, kv_heads, k [+ 1])``
    int64 for a ``Selection(own=..., page=page)``; no host sync."""
    from kvsift.kernels.dispatch import topk_select

    b = scores.shape[0]
    tail = None
    if tail_page is not None:   # the top-k's launch writes it as its last column
        tail = torch.as_tensor(tail_page, device=scores.device).to(torch.int64).reshape(1).expand(b)
    return topk_select(scores, max(k, 0), torch.int64, tail=tail)


def select_pages(scores: torch.Tensor, k: int, page: int, tail_start: "torch.Tensor | int", tail_width: int) -> torch.Tensor:
    """Own slots of the best ``k`` uniform pages by ``scores (batch, kv_heads, n_pages)`` (``-inf`` =
    not a candidate), plus ``tail_width`` slots from ``tail_start`` (an int or a ``(1,)`` device
    tensor: always attended, e.g. the page being filled). Returns ``(batch, kv_heads, k * page +
    tail_width)`` int64, negative where unused; no host sync."""
    from kvsift.kernels.dispatch import topk_select

    b, h, _ = scores.shape
    pages = topk_select(scores, k, torch.int64) if k > 0 else scores.new_zeros((b, h, 0), dtype=torch.int64)
    ar = torch.arange(max(page, tail_width), device=scores.device)
    # page -1 (unused) expands to negative slots, which the attention skips like -1
    slots = (pages[..., None] * page + ar[:page]).view(b, h, k * page)
    if tail_width <= 0:
        return slots
    return torch.cat([slots, (tail_start + ar[:tail_width]).expand(b, h, tail_width)], dim=-1)


def check_int_options(method, lows: dict[str, int], prefix: str) -> None:
    """Each option ``name`` of ``method`` an int (not a bool) >= ``lows[name]``, else a
    :class:`MethodOptionError` that names it (``prefix`` leads the message)."""
    for name, low in lows.items():
        v = getattr(method, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise MethodOptionError(f"{prefix}{name} must be an int >= {low}, got {v!r}", param=name)


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(batch, q_heads, q, dim)`` -> ``(batch, kv_heads, group, q, dim)`` (q head i uses kv head i // group)."""
    b, hq, L, d = query.shape
    return query.reshape(b, kv_heads, hq // kv_heads, L, d)


SCORE_BLOCK_BYTES = 256 << 20
"""Bound on one fp32 block of attention weights that scorers compute (queries go in blocks)."""


def module_scale(module, keys: torch.Tensor) -> float:
    """The attention scale of a transformers attention module (``1/sqrt(head_dim)`` without one)."""
    return getattr(module, "scaling", None) or keys.shape[-1] ** -0.5


def attention_blocks(query: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                     scale: float, sliding_window: int | None = None, max_bytes: int = SCORE_BLOCK_BYTES):
    """The softmax attention weights of ``query (batch, q_heads, q, dim)`` at ``query_pos (batch,
    q)`` over ``keys (batch, kv_heads, n, dim)`` at ``key_pos (batch, kv_heads, n)``, in blocks of
    queries: yields ``(start, weights (batch, kv_heads, group, l, n) fp32)`` for queries ``start ..
    start + l - 1``, each block under ``max_bytes``. A key is visible iff ``0 <= key_pos <=
    query_pos`` (and ``key_pos > query_pos - sliding_window``); a padding query's row is zeros."""
    b, hq, L, d = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    g = hq // hk
    kt = keys.float().transpose(-1, -2)                                   # (b, hk, d, n)
    kp = key_pos[:, :, None, :].long()                                    # (b, hk, 1, n)
    step = max(1, max_bytes // max(1, b * hq * n * 4))
    for s in range(0, L, step):
        q = group_queries(query[:, :, s : s + step], hk).float()         # (b, hk, g, l, d)
        l = q.shape[3]
        qp = query_pos[:, None, s : s + step, None].long()                # (b, 1, l, 1)
        vis = (kp >= 0) & (kp <= qp)
        if sliding_window:
            vis &= kp > qp - sliding_window
        logits = torch.matmul(q.reshape(b, hk, g * l, d), kt).view(b, hk, g, l, n) * scale
        logits.masked_fill_(~vis[:, :, None], float("-inf"))
        yield s, torch.softmax(logits, dim=-1).nan_to_num_(0.0)           # padded query rows -> 0


@dataclass
class ComposeRun(Run):
    parts: list = field(default_factory=list)


@dataclass(frozen=True)
class Compose(KVMethod):
    """``a+b``: hooks run in order (``a`` evicts at prefill, then ``b`` acts on what remains); the
    last stage that plans a selection wins."""

    stages: tuple = ()
    name: ClassVar[str] = "compose"
    needs_budget: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if len(self.stages) < 2:
            raise UnknownMethodError("a composition needs at least two methods")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise UnknownMethodError(f"a composition names each method once, got {'+'.join(names)}")
        object.__setattr__(self, "stages", tuple(self.stages))
        ragged = [s.spec for s in self.stages if s.ragged]
        # a stage that only changes prefill attention (minference) reads no KV afterwards
        if ragged and (len(ragged) > 1 or any(not s.ragged and not s.attention_only for s in self.stages)):
            raise UnknownMethodError(f"{ragged[0]} keeps a different number of tokens per head in a compact layout "
                                     f"that other stages cannot read, so it does not compose with '+' ("
                                     f"{self.spec!r}); it wraps a scorer instead, e.g. adakv(h2o)")
        alone = [s for s in self.stages if not s.composes]
        if alone and any(s is not alone[0] and not s.attention_only for s in self.stages):
            raise UnknownMethodError(f"{alone[0].name} stores the keys of every KV head of a token together (and "
                                     f"its KV in its own layout), so it composes only after a prefill attention "
                                     f"stage (e.g. minference+{alone[0].name}), got {self.spec!r}")
        codecs = [i for i, s in enumerate(self.stages) if s.codec]
        if codecs and codecs != [len(self.stages) - 1]:
            raise UnknownMethodError(f"{self.stages[codecs[0]].name} stores the KV the other stages keep, so it is "
                                     f"the last stage of a composition, once (e.g. snapkv+{self.stages[codecs[0]].name}"
                                     f"), got {self.spec!r}")
        if codecs:
            bad = [s.spec for s in self.stages[:-1] if not s.quantized_ok()]
            if bad:
                raise UnknownMethodError(f"{bad[0]} evicts or reads the layer's KV buffer at decode, which "
                                         f"{self.stages[-1].name} stores quantized: {self.spec!r} is not supported")

    @property
    def spec(self) -> str:
        return "+".join(s.spec for s in self.stages)

    def start(self, prompt_len, num_layers):
        parts = [s.start(prompt_len, num_layers) for s in self.stages]
        return ComposeRun(resolve_budget(self.budget, prompt_len), prompt_len, num_layers, parts)

    def min_last_chunk(self) -> int:
        return max(s.min_last_chunk() for s in self.stages)

    def on_append(self, run, layer, ctx):
        for s, r in zip(self.stages, run.parts):
            s.on_append(r, layer, ctx)

    def check_model(self, info) -> None:
        for s in self.stages:
            s.check_model(info)

    def prefill_attention(self, run, layer, query, keys, values, scale, module, ctx):
        for s, r in zip(self.stages, run.parts):  # the first stage that computes it wins
            out = s.prefill_attention(r, layer, query, keys, values, scale, module, ctx)
            if out is not None:
                return out
        return None

    def plan(self, run, layer, query, ctx):
        for s, r in zip(reversed(self.stages), reversed(run.parts)):
            sel = s.plan(r, layer, query, ctx)
            if sel is not None:
                return sel
        return None

    def after_attend(self, run, layer, query, module, ctx):
        for s, r in zip(self.stages, run.parts):
            s.after_attend(r, layer, query, module, ctx)

    def reread_passes(self, run, prompt_ids, tokenizer):
        return [p for s, r in zip(self.stages, run.parts) for p in s.reread_passes(r, prompt_ids, tokenizer)]

    def finish_prefill(self, run, layers, ctx):
        for s, r in zip(self.stages, run.parts):
            s.finish_prefill(r, layers, ctx)

    def rows_stacked(self, run, layers, ctx):
        for s, r in zip(self.stages, run.parts):
            s.rows_stacked(r, layers, ctx)

    def stats(self, run):
        out: dict[str, Any] = {}
        for s, r in zip(self.stages, run.parts):
            out.update(s.stats(r))
        return out

    def static_ok(self) -> bool:
        return all(s.static_ok() for s in self.stages)

    def graph_ok(self) -> bool:
        return all(s.graph_ok() for s in self.stages)

    def quantized_ok(self) -> bool:
        return all(s.quantized_ok() for s in self.stages)

    def offloads_to_host(self) -> bool:
        return any(s.offloads_to_host() for s in self.stages)

    def device_tokens(self, run, prompt_len: int, info=None) -> int:
        # snapkv+quest: snapkv's kept tokens (quest selects among them)
        return min(s.device_tokens(r, prompt_len, info) for s, r in zip(self.stages, run.parts))

    def host_share(self, head_dim=None) -> float:
        share = max(s.host_share(head_dim) for s in self.stages)
        codec = codec_stage(self)
        if share and codec is not None and head_dim:  # the host store holds the codec's rows (sentencekv+kivi)
            share *= codec.store_share(head_dim)
        return share

    def prefill_hold(self, run):
        # the composition holds the prompt's whole KV unless its first KV-keeping stage compresses
        # as it goes (attention-only stages keep none)
        for s, r in zip(self.stages, run.parts):
            if not s.attention_only:
                return s.prefill_hold(r)
        return None

    def pads_exactly(self) -> bool:
        return all(s.pads_exactly() for s in self.stages)

    def joins_rows(self) -> bool:
        return all(s.joins_rows() or s.attention_only for s in self.stages)

    def preemptible(self) -> bool:
        return super().preemptible() and all(s.preemptible() or s.attention_only for s in self.stages)

    def chunk_invariant(self) -> bool:
        return all(s.chunk_invariant() for s in self.stages)

    def shares_prefix(self) -> bool:
        return all(s.shares_prefix() for s in self.stages)

    def prefix_state(self):
        parts = tuple(s.prefix_state() for s in self.stages)
        return None if all(p is None for p in parts) else parts

    def join_token(self, run):
        return tuple(s.join_token(r) for s, r in zip(self.stages, run.parts))

    def restack_state(self, layer, sources) -> None:
        for s in self.stages:
            s.restack_state(layer, sources)

    def row_prefill_ok(self) -> bool:
        # rows save memory when a stage shrinks the KV at prefill end; decode-only stages keep no
        # prefill state, a codec stores the stacked batch (rows_stacked) and attention-only stages
        # (minference) keep no state at all, so they never stand in the way
        return any(s.row_prefill_ok() and not s.codec for s in self.stages) and all(
            s.row_prefill_ok() or s.decode_only or s.codec or s.attention_only for s in self.stages)

    def decode_variant(self, run, step):
        return tuple(s.decode_variant(r, step) for s, r in zip(self.stages, run.parts))


def codec_stage(method: "KVMethod | None") -> "KVMethod | None":
    """The storage codec stage (``codec``, e.g. kivi) of a method or a composition, or None: a stage
    that keeps KV in a store of its own (sentencekv's host chunks) stores it in that form too
    (``codec.store_options(head_dim)``)."""
    for s in getattr(method, "stages", (method,)):
        if getattr(s, "codec", False):
            return s
    return None


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


def method_options(name: str) -> list[tuple[str, Any, str]]:
    """``(option, default, description)`` of a registered method's options (its dataclass fields,
    described by the Parameters block of its docstring; ``budget`` first)."""
    import inspect
    import re

    cls = method_class(name)
    doc = inspect.getdoc(cls) or ""
    desc: dict[str, str] = {}
    block = doc.split("Parameters\n----------\n", 1)[1] if "Parameters\n----------\n" in doc else ""
    current = None
    for line in block.splitlines():
        m = re.match(r"^(\w+) : ", line)
        if m:
            current = m.group(1)
            desc[current] = ""
        elif current and line.startswith("    "):
            desc[current] = (desc[current] + " " + line.strip()).strip()
    out = []
    for f in fields(cls):
        if f.init:
            out.append((f.name, f.default, desc.get(f.name, "")))
    return out


def method_class(name: str) -> type[KVMethod]:
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


_PART = re.compile(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*")


def split_spec(spec: str) -> list[tuple[str, str | None]]:
    """``"adakv(snapkv)+quest"`` -> ``[("adakv", "snapkv"), ("quest", None)]``: the ``+``-stages of a
    spec, each a method name and the spec it wraps (``name(inner)``) or None."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownMethodError(f"method must be a non-empty name, got {spec!r}")
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise UnknownMethodError(f"unbalanced parentheses in method spec {spec!r}")
        if ch == "+" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if depth != 0:
        raise UnknownMethodError(f"unbalanced parentheses in method spec {spec!r}")
    out = []
    for p in parts:
        m = _PART.fullmatch(p)
        if m is None:
            raise UnknownMethodError(f"bad method spec {spec!r}: expected names joined by '+', a wrapper as "
                                     f"name(method), e.g. 'adakv(snapkv)+quest'")
        out.append((m.group(1), m.group(2)))
    return out


def spec_classes(spec: str) -> list[type["KVMethod"]]:
    """Every method class a spec names, wrapped ones included (unknown names raise)."""
    out = []
    for name, inner in split_spec(spec):
        cls = method_class(name)
        out.append(cls)
        if inner is not None:
            out += spec_classes(inner)
        elif issubclass(cls, ScorerWrapper):
            out += spec_classes(cls.scorer)
    return out


def build_method(spec: "str | KVMethod", budget: Budget = None, **kwargs) -> KVMethod:
    """Build a method from a spec such as ``"snapkv"``, ``"snapkv+sentencekv"`` or a wrapper over a
    scorer, ``"adakv(snapkv)"`` (``"adakv"`` alone wraps its default scorer, or ``scorer=...``).

    ``kwargs`` go to every stage (and wrapped scorer) that has a field of that name (unknown names
    are an error).
    """
    if isinstance(spec, KVMethod):
        return spec
    classes = spec_classes(spec)
    known = {f.name for c in classes for f in fields(c) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise MethodOptionError(f"unknown option(s) {unknown} for method {spec!r}; options: {sorted(known - {'budget'})}")
    stages = [_build_stage(name, inner, budget, kwargs) for name, inner in split_spec(spec)]
    return stages[0] if len(stages) == 1 else Compose(budget=budget, stages=tuple(stages))


def _build_stage(name: str, inner_spec: str | None, budget: Budget, kwargs: dict) -> KVMethod:
    c = method_class(name)
    wrapper = issubclass(c, ScorerWrapper)
    if inner_spec is not None and not wrapper:
        raise UnknownMethodError(f"method {name!r} wraps no other method (wrappers: "
                                 f"{', '.join(sorted(n for n, k in _REGISTRY.items() if issubclass(k, ScorerWrapper)))})")
    own = {f.name: f for f in fields(c) if f.init}
    opts = {k: v for k, v in kwargs.items() if k in own}
    for k, v in opts.items():
        _check_option_type(c.name, k, own[k].type, v)
    inner = None
    if wrapper:
        spec = inner_spec if inner_spec is not None else opts.get("scorer", c.scorer)
        parts = split_spec(spec)
        if len(parts) != 1:
            raise UnknownMethodError(f"{name}(...) wraps one method, got {spec!r}")
        inner = _build_stage(parts[0][0], parts[0][1], budget, kwargs)
        opts["scorer"] = inner.spec
    try:
        m = c(budget=budget, **opts)
    except (TypeError, ValueError) as e:
        if isinstance(e, BudgetError | MethodOptionError | UnknownMethodError):
            raise
        raise MethodOptionError(f"method {c.name!r}: {e}") from None
    if inner is not None:
        m.wrap(inner)
    return m


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                              "None": (type(None),), "Budget": (int, float, type(None))}


def _check_option_type(method: str, name: str, annotation, value) -> None:
    """A clear error for an option of the wrong type (``window="8"``), before the method's own
    range checks compare it with numbers. Annotations made of simple types only are checked."""
    parts = [p.strip() for p in str(annotation).split("|")]
    if not all(p in _SIMPLE_TYPES for p in parts):
        return
    allowed = tuple(t for p in parts for t in _SIMPLE_TYPES[p])
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, allowed)
    if not ok:
        raise MethodOptionError(f"option {name!r} of method {method!r} must be {' or '.join(parts)}, "
                                f"got {type(value).__name__} {value!r}", param=name)
