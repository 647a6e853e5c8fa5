"""The model runner: owns the model and runs its forward passes (chunked prefill, decode steps,
CUDA-graph recording); nothing else calls the model.

    runner = ModelRunner(model, tokenizer, info)
    cache, stats, (ctx, logits) = runner.prefill([ids], method, run, None, progress=False)
    logits = runner.forward(ctx, tok[:, None], pos[:, None])

It keeps what is the model's: the attention configs, the rotary function, the cache argument's
name, the prefill chunking, the decode and prefill modes, the lock (one forward at a time per model:
a forward also switches the model's attention implementation) and the CUDA-graph cache
(:class:`~kvsift.engine.graphs.GraphCache`, kept across generations). What to run and when is the
:class:`~kvsift.engine.scheduler.Scheduler`'s; sampling, stop strings and outputs are the
:class:`~kvsift.engine.llm.LLM`'s.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from kvsift.cache import SiftCache
from kvsift.cache.quant import QuantKV
from kvsift.engine.attention import (ForwardContext, forward_context, model_configs, rope_function,
                                     use_kvsift_attention)
from kvsift.engine.decode import DecodeRunner, check_decode_mode, pick_decode_mode
from kvsift.engine.fusion import fused_decode
from kvsift.engine.graphs import GraphCache, GraphEntry, KVArena, capacity_bucket, layout_token
from kvsift.engine.params import GenerationStats
from kvsift.engine.prefix import PrefixStore
from kvsift.methods import KVMethod
from kvsift.methods.base import Budget, Run
from kvsift.models.loader import ModelInfo

DEFAULT_CHUNK = 512
# prompt tokens one batched prefill forward may take over all its rows (nano-vllm's
# max_num_batched_tokens): a batch of many long prompts (32 joiners of 32k tokens) is cut into
# narrower chunks rather than one chunk_size-wide slice per row, which bounds activation memory
MAX_BATCHED_TOKENS = 16384
CPU_FIRST_CHUNK = 4096
"""On CPU, with the default chunking, a fresh unpadded prompt's first prefill chunk takes up to
this many tokens. That chunk attends only to itself, so it runs as one causal SDPA call (the same
as ``transformers``' own single-pass prefill) while later chunks need a position mask over all
earlier keys, which costs about twice as much per key on CPU (docs/models.md, CPU speed). 4096
bounds the activations (~0.3 GB of MLP intermediates for a 0.5B model) and later chunks' masks."""


@dataclass
class Context:
    """A prefilled, compressed document to answer many questions from (see ``LLM.prefill_context``).

    ``cache`` holds the document's KV for one sequence; ``token_ids`` the document's tokens."""

    cache: SiftCache
    token_ids: list[int]
    method: str
    budget: Budget
    stats: GenerationStats
    method_kwargs: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.cache.seen

    @property
    def needs_planner(self) -> bool:
        """Answering needs the context's own method: part of the KV lives off the device (it
        fetches it back), or the method keeps state made for decoding (e.g. squeezed's clusters)."""
        return any(layer.offloaded or any(s.planner for s in layer.state.values()) for layer in self.cache.layers)


class ModelRunner:
    """A transformers model behind kvsift's cache and attention. ``chunk_size``: prefill chunk length
    (None: 512, and on CPU a first chunk of up to :data:`CPU_FIRST_CHUNK` tokens for a fresh
    prompt); ``max_batched_tokens``: prompt tokens one prefill forward takes over all rows of a
    batch (a wide batch gets chunks of ``max_batched_tokens // rows``, at least 16 tokens and the
    method's last-chunk minimum); ``decode_mode`` / ``prefill_mode``: see :class:`~kvsift.engine.llm.LLM`."""

    def __init__(self, model, tokenizer, info: ModelInfo, chunk_size: int | None = None, decode_mode: str = "auto",
                 prefill_mode: str = "auto", pad_id: int = 0, kv_arena: bool = False, max_arenas: int = 2,
                 max_batched_tokens: int = MAX_BATCHED_TOKENS):
        self.first_chunk = None  # a longer first prefill chunk (CPU, default chunking)
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK
            if info.device.type == "cpu":
                self.first_chunk = CPU_FIRST_CHUNK
        if chunk_size < 16:
            raise ValueError(f"chunk_size must be >= 16, got {chunk_size}")
        if max_batched_tokens < 16:
            raise ValueError(f"max_batched_tokens must be >= 16, got {max_batched_tokens}")
        self.max_batched_tokens = max_batched_tokens
        self.decode_mode = check_decode_mode(decode_mode)
        self.prefill_mode = check_prefill_mode(prefill_mode)
        if decode_mode == "graph" and info.device.type != "cuda":
            raise ValueError(f"decode_mode='graph' needs a CUDA device, this model is on {info.device} "
                             f"(use 'static' or 'eager')")
        self.model, self.tokenizer, self.info, self.chunk_size = model, tokenizer, info, chunk_size
        self.device = info.device
        self.pad_id = pad_id
        self.configs = model_configs(model)
        self.rope = rope_function(model)  # ForwardContext.rope: methods that move queries between positions
        # the cache argument's name: ``cache`` from transformers 5.x (``past_key_values`` is deprecated
        # there, removed in 5.40), ``past_key_values`` before
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.lock = threading.RLock()  # one forward at a time per model
        self.graphs = GraphCache()     # decode-step CUDA graphs, kept across generations
        # static / graph decoding of plain dense KV (``full``) over runner-owned arenas, one per
        # (batch bucket, capacity bucket), so graphs recorded by one generation serve the next ones
        self.kv_arena = bool(kv_arena)
        if isinstance(max_arenas, bool) or not isinstance(max_arenas, int) or max_arenas < 1:
            raise ValueError(f"max_arenas must be an integer >= 1, got {max_arenas!r}")
        self.max_arenas = max_arenas
        self.arenas: dict[tuple[int, int], KVArena] = {}
        self.arena_loads = 0      # batches loaded into an arena (a copy of their KV), over the runner's life
        self.arena_restacks = 0   # changes of a running batch's rows made in an arena in place
        # CUDA decode steps run the model's RMSNorms and rotary embeddings as one kernel each
        # (engine/fusion.py; on by default since the H200 run of 2026-12-02: 12-15% less per token at
        # 128k; KVSIFT_FUSED_DECODE=0 turns it off). Fixed per runner: its CUDA graphs are recorded
        # with or without
        self.fused_decode = os.environ.get("KVSIFT_FUSED_DECODE", "").strip().lower() not in {"0", "false", "no", "off"}
        # full-cache KV of prompt prefixes shared by the methods that allow it (engine/prefix.py);
        # None: off. Set it to a PrefixStore to turn it on (the eval harness's --share-prefix-gib)
        self.prefix_store: PrefixStore | None = None

    # ---- decode ------------------------------------------------------------------------------
    def decode_mode_for(self, method: KVMethod) -> str:
        """The mode a generation with ``method`` decodes in (a bad ``KVSIFT_DECODE`` raises here,
        before any compute)."""
        return pick_decode_mode(self.decode_mode, method, self.device)

    def decoder(self, ctx: ForwardContext, mode: str, max_steps: int) -> DecodeRunner:
        """The decode steps of one generation over ``ctx`` (``close()`` it at the end)."""
        return DecodeRunner(self, ctx, mode, max_steps)

    def arena_for(self, ctx: ForwardContext, mode: str, steps: int) -> KVArena | None:
        """The arena a generation over ``ctx`` decodes in (its KV loaded there), or None: arenas off,
        eager mode, a method other than ``full``, KV that is not plain dense, a batch over every
        bucket. The least recently used arenas (and their graphs) go past ``max_arenas``."""
        if not self.kv_arena or mode == "eager" or ctx.method.name != "full" or ctx.next_pos is None:
            return None
        rows = ctx.next_pos.shape[0]
        bucket = self.graphs.bucket(rows)
        held = self.arena_of(ctx.cache)
        if held is not None:   # a batch changed in place (KVArena.restack): the arena holds it already
            key = (held.bucket, held.capacity)
            self.arenas[key] = self.arenas.pop(key)   # most recently used last
            return held
        length = max((ly.length for ly in ctx.cache.layers), default=0)
        if bucket is None or length == 0:
            return None
        capacity = capacity_bucket(length + steps + 1)
        if not KVArena.fits(ctx.cache, rows, bucket, capacity):
            return None
        key = (bucket, capacity)
        arena = self.arenas.pop(key, None)
        if arena is None:
            k0 = ctx.cache.layers[0].k_buf
            arena = KVArena(len(ctx.cache.layers), bucket, capacity, k0.shape[1], k0.shape[3], k0.dtype, k0.device)
        self.arenas[key] = arena  # most recently used last
        while len(self.arenas) > self.max_arenas:
            _, old = next(iter(self.arenas.items()))
            del self.arenas[next(iter(self.arenas))]
            self.graphs.release(layout_token(old))
        arena.load(ctx.cache, rows)
        self.arena_loads += 1
        return arena

    def arena_of(self, cache) -> KVArena | None:
        """The arena whose own cache ``cache`` is (a batch restacked in place), or None."""
        return next((a for a in self.arenas.values() if a.cache is cache), None)

    def capture(self, ctx: ForwardContext, tok: torch.Tensor, pos: torch.Tensor) -> GraphEntry:
        """Record one decode step over the static inputs ``tok (batch, 1)``, ``pos (batch, 1)`` int32
        in a CUDA graph (not run: replay it). The cache's logical length is left as it was."""
        graph = torch.cuda.CUDAGraph()
        seen = ctx.cache.seen
        try:
            torch.cuda.synchronize(self.device)
            ctx.cache.step_positions = pos
            ctx.input_ids = tok
            with self.forward_mode(ctx), torch.cuda.graph(graph):
                out = self.model(input_ids=tok, position_ids=pos.long().clamp(min=0),
                                 **{self.cache_kw: ctx.cache}, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1].float()
        finally:
            ctx.cache.seen = seen
        return GraphEntry(graph, logits)

    # ---- forward passes ----------------------------------------------------------------------
    def rows_prefill(self, method: KVMethod, rows: int, context: Context | None, rereads: bool = False) -> bool:
        """Whether a batch of ``rows`` prompts is prefilled one sequence at a time (see ``prefill_mode``;
        always with reread passes, never over a reused context; always for a method that shares
        prefixes while the runner has a :attr:`prefix_store`)."""
        if context is None and self.prefix_store is not None and method.shares_prefix():
            return True   # per-row prefixes from the store (engine/prefix.py), even for one row
        return rows > 1 and context is None and (
            self.prefill_mode == "rows" or (self.prefill_mode == "auto" and method.row_prefill_ok()) or rereads)

    @contextlib.contextmanager
    def forward_mode(self, ctx: ForwardContext):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.device.type == "cuda":
                # cuDNN's SDPA rebuilds its plan for every new KV length (measured: 57 vs 11 ms/token
                # decode on an H100); the flash / memory-efficient kernels do not
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.MATH]))
            stack.enter_context(use_kvsift_attention(self.model, self.configs))
            stack.enter_context(forward_context(ctx))
            if self.fused_decode and ctx.decoding and self.device.type == "cuda":   # (no kernels on the CPU)
                stack.enter_context(fused_decode(self.model))
            yield

    def forward(self, ctx: ForwardContext, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One model call over ``input_ids (batch, q)`` at ``positions (batch, q)``; returns the
        last logits ``(batch, vocab)`` in fp32."""
        ctx.cache.step_positions = positions.to(torch.int32)
        ctx.input_ids = input_ids  # token ids in flight (sentencekv resets its query fingerprint)
        with self.forward_mode(ctx):
            out = self.model(input_ids=input_ids, position_ids=positions.clamp(min=0), **{self.cache_kw: ctx.cache},
                             use_cache=True, logits_to_keep=1)
        ctx.cache.seen += input_ids.shape[1]
        return out.logits[:, -1].float()

    def prefill(self, ids: list[list[int]], method: KVMethod, run: Run, context: Context | None,
                 progress: bool | None, reserve: int = 0, cancel: Callable[[], bool] | None = None):
        """Prefill ``ids`` (a batch, or row by row where :meth:`rows_prefill` says so). ``cancel`` is
        asked before every chunk but the first: True stops the prefill there
        (:class:`PrefillCancelled`; nothing of it is kept). Returns ``(cache, stats, (ctx, logits))``."""
        steps = self.prefill_steps(ids, method, run, context, progress, reserve, cancel)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, ids: list[list[int]], method: KVMethod, run: Run, context: Context | None,
                      progress: bool | None, reserve: int = 0, cancel: Callable[[], bool] | None = None,
                      width: int | None = None, alone: Callable[[], bool] | None = None):
        """:meth:`prefill` as a generator that yields (None) after every prefill chunk, so a caller
        can run other work between chunks (the engine decodes its running batch while a joining
        request's prompt is prefilled); its return value is :meth:`prefill`'s. ``width``: forwards
        of at most that many tokens over all the prompts instead of ``chunk_size`` per prompt
        (joining prompts', so a running row's inter-token time stays short however many join at
        once; only for a method whose prefill does not depend on its chunking,
        :meth:`KVMethod.chunk_invariant`). ``alone()``, asked before each narrow chunk: true once
        nothing else waits for these forwards (the running rows are done), and the rest of the
        prompt then goes at the usual chunk width."""
        # each fresh sequence's reread passes, asked once (methods may count them); none for a context
        passes = [method.reread_passes(run, x, self.tokenizer) for x in ids] if context is None else [[] for _ in ids]
        if self.rows_prefill(method, len(ids), context, rereads=any(passes)):
            return (yield from self._prefill_rows(ids, method, run, progress, reserve, passes, cancel, width, alone))
        b, L = len(ids), max(len(x) for x in ids)
        dev = self.device
        tokens = torch.full((b, L), self.pad_id, dtype=torch.long, device=dev)
        valid = torch.zeros((b, L), dtype=torch.bool, device=dev)
        for i, x in enumerate(ids):
            tokens[i, L - len(x):] = torch.tensor(x, device=dev)
            valid[i, L - len(x):] = True
        base = context.length if context is not None else 0
        pos = torch.where(valid, base + valid.cumsum(1) - 1, -1)
        if context is not None:
            # the context's KV read by reference when the method attends to it as it is (full):
            # one copy for every question of the batch, none made; otherwise a copy per row
            cache = (context.cache.share(batch_repeat=b) if self.shares_context(method, context)
                     else context.cache.clone(batch_repeat=b, room=L + reserve))
            cache.reserve = reserve
        else:
            cache = SiftCache(self.info.num_layers, capacity_hint=self._prefill_tokens(L, method, run) + reserve
                              + _longest(passes[0]), reserve=reserve)
        ctx = ForwardContext(cache=cache, method=method, run=run, has_padding=bool((~valid).any()),
                             prompt_ids=ids, tokenizer=self.tokenizer,  # sentencekv segments the prompt
                             rope=self.rope, model_name=self.info.name)
        bounds = self.chunk_bounds(L, method, fresh=context is None and not ctx.has_padding
                                   and method.prefill_hold(run) is None, rows=b, width=width)
        bar = self._prefill_bar(progress, L, len(bounds), f"prefill {L} tokens")
        t0 = time.perf_counter()
        logits = None
        try:
            for s, e in _widening(bounds, alone if width is not None else None,
                                  lambda s: self.chunk_bounds(L - s, method, fresh=False, rows=b)):
                _check_cancel(cancel, s)
                ctx.prefill_end = e == L
                logits = self.forward(ctx, tokens[:, s:e], pos[:, s:e])
                if bar is not None:
                    bar.update(1)
                if e < L:
                    yield
        finally:
            if bar is not None:
                bar.close()
        if context is None:  # a batch here has no reread passes (those go row by row)
            self._finish_prefill(ctx, method, run, passes[0])
        ctx.next_pos = pos[:, -1] + 1
        return self._prefilled(ctx, method, base + L, t0, logits)

    def _finish_prefill(self, ctx: ForwardContext, method: KVMethod, run: Run, passes: list[list[int]],
                        memo: tuple | None = None) -> None:
        """After a fresh prompt's prefill (one sequence, or a batch without reread passes): run the
        method's reread ``passes`` (from ``method.reread_passes``), each at the positions after the
        prompt, attending to the prompt's KV through the prefill path and then dropped from the cache;
        ``ctx.reread_s`` is their time; then the method's deferred compression (``finish_prefill``).
        The cache reserved room for the longest pass (no buffer growth while they run); layers that
        keep more than they need afterwards (nothing evicted) are shrunk back. ``memo = (store,
        key)`` (a :class:`~kvsift.engine.prefix.PrefixStore`, for a method with a
        ``reread_state``): the layers' state after the passes is taken from the store when it holds
        it (the passes are not run), else stored after them."""
        cache = ctx.cache
        ctx.reread_s = 0.0
        with torch.inference_mode():  # the cache's tensors are inference tensors: edit them in the mode
            states = memo[0].get_reread(memo[1]) if memo is not None and passes else None
            if states is not None:
                for ly, st in zip(cache.layers, states):
                    ly.state.clear()
                    ly.state.update(st)
                passes = []   # (nor is the room reserved for them shrunk: the row is copied into the batch)
            if passes:
                sync(self.device)
                t0 = time.perf_counter()
                seen, lengths = cache.seen, [ly.length for ly in cache.layers]
                ctx.prefill_end, ctx.rereading = False, True
                try:
                    for p in passes:
                        toks = torch.tensor([p], dtype=torch.long, device=self.device)
                        pos = torch.arange(seen, seen + len(p), device=self.device)[None]
                        for s, e in _chunks(len(p), self.chunk_size, 0):
                            self.forward(ctx, toks[:, s:e], pos[:, s:e])
                        for ly, n in zip(cache.layers, lengths):
                            ly.truncate(n)
                        cache.seen = seen
                finally:
                    ctx.rereading = False
                sync(self.device)
                ctx.reread_s = time.perf_counter() - t0
                if memo is not None:
                    memo[0].put_reread(memo[1], [ly.state for ly in cache.layers])
            method.finish_prefill(run, cache.layers, ctx)
            if passes and ctx.row is None:  # (rows are copied into the batch cache anyway)
                for ly in cache.layers:  # the room reserved for the passes: not kept for decode
                    if ly.k_buf is not None and ly.k_buf.shape[2] > ly.length + cache.reserve:
                        ly.set_kv(ly.keys, ly.values, ly.positions)

    @staticmethod
    def shares_context(method: KVMethod, context: Context | None) -> bool:
        """Whether a generation over ``context`` reads its KV by reference (``SiftCache.share``: one
        copy for the whole batch, none made) rather than a copy per row: when the method attends to
        the context as it is (``reads_context_in_place``: full) and the context's KV is plain."""
        return context is not None and method.reads_context_in_place() and context.cache.shareable()

    def _prefill_tokens(self, n: int, method: KVMethod, run: Run) -> int:
        """Device KV slots per layer and KV head a prompt of ``n`` tokens needs during its prefill:
        all of them, or what a method that compresses as it goes holds plus one chunk."""
        hold = method.prefill_hold(run)
        return n if hold is None else min(n, hold + max(self.chunk_size, method.min_last_chunk()))

    def chunk_bounds(self, n: int, method: KVMethod, fresh: bool = True, rows: int = 1,
                     width: int | None = None) -> list[tuple[int, int]]:
        """Prefill chunks of a prompt of ``n`` tokens (the last one long enough for the method).
        ``fresh``: nothing cached before and no padding, so a longer first chunk needs no mask.
        ``rows``: prompts prefilled together; their chunks together take at most
        ``max_batched_tokens`` tokens (rounded down to 16, at least 16 per row). ``width``: at
        most this many tokens per forward over all the rows (``width // rows`` per row, rounded down
        to 16, at least 16; and no longer first chunk) instead of ``chunk_size`` (a joining group's
        prefill between two decode steps: what the running rows wait for per token)."""
        narrow = width is not None
        width = min(self.chunk_size, width) if narrow else self.chunk_size
        if narrow and rows > 1:
            width = max(16, (width // rows) // 16 * 16)
        if rows > 1:
            width = min(width, max(16, (self.max_batched_tokens // rows) // 16 * 16))
        chunk = max(width, method.min_last_chunk())
        first = chunk
        if fresh and not narrow and self.first_chunk and \
                rows * self.first_chunk <= max(self.max_batched_tokens, self.first_chunk):
            first = max(chunk, min(n, self.first_chunk))
        return _chunks(n, chunk, method.min_last_chunk(), first)

    def _prefill_bar(self, progress: bool | None, L: int, total: int, desc: str):
        """A tqdm bar over ``total`` prefill chunks, or None (default: shown for long prompts)."""
        if not (progress if progress is not None else L >= 8 * self.chunk_size):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="chunk", leave=False)

    def _prefilled(self, ctx: ForwardContext, method: KVMethod, tokens: int, t0: float, logits):
        """Prefill stats of ``ctx.cache`` (``tokens``: logical length incl. a reused context)."""
        sync(self.device)
        cache = ctx.cache
        b = ctx.next_pos.shape[0]
        mem = cache.memory()
        stats = GenerationStats(method=method.spec, budget=method.budget,
                                prompt_tokens=max(len(x) for x in ctx.prompt_ids),
                                prefill_s=time.perf_counter() - t0, kv_device_bytes=mem["device"],
                                kv_host_bytes=mem["host"], kv_kept_bytes=mem["device_used"],
                                kv_full_bytes=full_bytes(self.info, b, tokens))
        ctx.prefill_end = False
        return cache, stats, (ctx, logits)

    def _prefill_rows(self, ids: list[list[int]], method: KVMethod, run: Run, progress: bool | None, reserve: int,
                      passes: list[list[list[int]]], cancel: Callable[[], bool] | None = None,
                      width: int | None = None, alone: Callable[[], bool] | None = None):
        """Prefill one sequence at a time: each row's full KV is on the device only while that row
        runs; at its end the method compresses it (sentencekv writes the chunks into the batch's host
        store), then the rows' remaining device KV is stacked into one batch cache."""
        b, L, dev = len(ids), max(len(x) for x in ids), self.device
        cache = SiftCache(self.info.num_layers, capacity_hint=L + reserve, reserve=reserve)
        row_states = [layer.state for layer in cache.layers]
        plans = [self.chunk_bounds(len(x), method, fresh=method.prefill_hold(run) is None, width=width) for x in ids]
        uniform = len({len(x) for x in ids}) == 1
        bar = self._prefill_bar(progress, L, sum(len(p) for p in plans), f"prefill {b} x {L} tokens")
        t0 = time.perf_counter()
        store = self.prefix_store if method.shares_prefix() else None
        # a method that does not prefill row by row on its own (prefill_mode="rows", a prefix store)
        # may leave per-layer state in each row's layers (squeezed's clusters): it is restacked
        # over the batch as at a join (restack_state), from the rows' layers kept until then
        carry = not method.row_prefill_ok()
        parts, logits, row_layers = [], [], []
        try:
            for i, (row, plan) in enumerate(zip(ids, plans)):
                cap = self._prefill_tokens(len(row), method, run) + _longest(passes[i])
                rc = SiftCache(self.info.num_layers, capacity_hint=cap, reserve=0)
                # prefix sharing (engine/prefix.py): the row's KV before its last chunk, from the store
                # or into it; not with narrowed chunks (a joining prompt), whose bounds may change
                key, start = None, 0
                if store is not None and len(plan) > 1 and width is None:
                    key = store.key(row, plan[:-1], method.prefix_state())
                    hit = store.get(key, room=cap - plan[-1][0])
                    if hit is not None:
                        rc, start, key = hit, plan[-1][0], None
                ctx = ForwardContext(cache=rc, method=method, run=run, prompt_ids=[row], tokenizer=self.tokenizer,
                                     row=(i, b), row_states=row_states, uniform_rows=uniform, rope=self.rope,
                                     model_name=self.info.name)
                tokens = torch.tensor([row], dtype=torch.long, device=dev)
                pos = torch.arange(len(row), device=dev)[None]
                for s, e in _widening(plan, alone if width is not None else None,
                                      lambda s, n=len(row): self.chunk_bounds(n - s, method, fresh=False)):
                    if s < start:
                        continue
                    if key is not None and s == key[0]:
                        store.put(key, rc)   # the row's full-cache KV before its last chunk
                    _check_cancel(cancel, i + s)
                    ctx.prefill_end = e == len(row)
                    lg = self.forward(ctx, tokens[:, s:e], pos[:, s:e])
                    if bar is not None:
                        bar.update(1)
                    if e < len(row) or i + 1 < b:
                        yield
                memo = None   # the passes' state, kept for the next prefill of this prompt (another budget)
                if store is not None and passes[i] and width is None and method.reread_state() is not None:
                    memo = store, store.reread_key(row, plan, passes[i], method.reread_state())
                self._finish_prefill(ctx, method, run, passes[i], memo)
                logits.append(lg)
                parts.append([ly.quant if ly.quant is not None else
                              (ly.keys, ly.values, ly.positions, ly.ragged) if ly.k_buf is not None else None
                              for ly in rc.layers])   # a row quantized at its end (kivi) stays quantized
                if carry:
                    row_layers.append(list(rc.layers))   # (their KV is referenced by parts anyway)
                del rc, ctx  # the row's buffers live on only through the kept (compressed) views
        finally:
            if bar is not None:
                bar.close()
        padded = any(len(x) < L for x in ids)
        for li, layer in enumerate(cache.layers):
            rows = [p[li] for p in parts]
            for p in parts:
                p[li] = None
            if all(isinstance(r, QuantKV) for r in rows):
                layer.set_quant_rows(rows)
            elif all(r is not None for r in rows):
                padded |= layer.set_rows(rows)
        cache.seen = L
        ctx = ForwardContext(cache=cache, method=method, run=run, has_padding=padded, prompt_ids=ids,
                             tokenizer=self.tokenizer, next_pos=torch.tensor([len(x) for x in ids], device=dev),
                             rope=self.rope, model_name=self.info.name)
        with torch.inference_mode():
            if any(ly.state for rl in row_layers for ly in rl):
                for li, layer in enumerate(cache.layers):
                    method.restack_state(layer, [(rl[li], 0) for rl in row_layers])
            del row_layers
            method.rows_stacked(run, cache.layers, ctx)  # e.g. kivi quantizes the stacked batch
        return self._prefilled(ctx, method, L, t0, torch.cat(logits))


class PrefillCancelled(Exception):
    """A prefill stopped at a chunk boundary because its ``cancel`` said so."""


def _check_cancel(cancel: Callable[[], bool] | None, done: int) -> None:
    """Before a prefill chunk: stop if ``cancel()`` (not before the first chunk: ``done`` = 0)."""
    if done and cancel is not None and cancel():
        raise PrefillCancelled


def check_prefill_mode(mode: str) -> str:
    if mode not in ("auto", "batch", "rows"):
        raise ValueError(f"prefill_mode must be 'auto', 'batch' or 'rows', got {mode!r}")
    return mode


def _chunks(L: int, chunk: int, min_last: int, first: int | None = None) -> list[tuple[int, int]]:
    """Prefill chunk bounds (``first`` tokens, then ``chunk`` each); the last chunk holds at least
    ``min_last`` tokens (e.g. SnapKV's window)."""
    first = first or chunk
    bounds = [(0, min(first, L))] + [(s, min(s + chunk, L)) for s in range(first, L, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        bounds[-2:] = [(bounds[-2][0], L)]
    return bounds


def _widening(bounds: list[tuple[int, int]], alone: Callable[[], bool] | None,
              replan: Callable[[int], list[tuple[int, int]]]) -> Iterator[tuple[int, int]]:
    """``bounds`` one chunk at a time; once ``alone()`` holds before a chunk starting at ``s``, the
    rest of the prompt as ``replan(s)`` chunks it (bounds relative to ``s``) instead."""
    i = 0
    while i < len(bounds):
        if alone is not None and alone():
            s = bounds[i][0]
            bounds = bounds[:i] + [(s + a, s + z) for a, z in replan(s)]
            alone = None
        yield bounds[i]
        i += 1


def _longest(passes: list[list[int]]) -> int:
    return max((len(p) for p in passes), default=0)


def full_bytes(info: ModelInfo, batch: int, tokens: int) -> int:
    """KV bytes a full cache holds for ``batch`` rows of ``tokens`` tokens."""
    elt = torch.tensor([], dtype=info.dtype).element_size()
    return 2 * info.num_layers * batch * info.num_kv_heads * tokens * info.head_dim * elt


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
