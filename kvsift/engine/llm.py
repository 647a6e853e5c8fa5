"""The LLM facade: prompts in, outputs out, over a :class:`~kvsift.engine.runner.ModelRunner` (the
model and its forward passes) and a :class:`~kvsift.engine.scheduler.Scheduler` (which requests run
together, admission by KV memory).

    llm = LLM()                                          # the default model (qwen2.5-coder-0.5b)
    out = llm.generate("…long document… Question?", SamplingParams(max_tokens=64), method="snapkv", budget=512)
    print(out[0].text, out[0].stats.summary())

The LLM validates and encodes (``request``), runs a scheduled group of requests as one batched
generation (``run_batch``: sampling, stop strings, per-request cancellation and outputs) and
answers the offline API (``generate``, ``stream``, ``prefill_context``) through its own scheduler,
one request per call; ``score`` / ``score_batch`` (teacher-forced NLL, perplexity) run under the
runner's lock.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvsift.budget import kv_bytes_per_token, prefill_kv_bytes, request_kv_bytes
from kvsift.cache import SiftCache
from kvsift.cache.host import pinned_empty
from kvsift.cache.layer import shared_rows
from kvsift.cache.quant import QuantKV
from kvsift.engine.attention import ForwardContext  # noqa: F401  (re-exported: engine internals are importable)
from kvsift.engine.decode import check_decode_mode
from kvsift.engine.params import GenerationStats, RequestOutput, SamplingParams, StreamEvent
from kvsift.engine.runner import (CPU_FIRST_CHUNK, DEFAULT_CHUNK, MAX_BATCHED_TOKENS, Context, ModelRunner,
                                  PrefillCancelled, sync)
from kvsift.engine.runner import check_prefill_mode as _check_prefill_mode
from kvsift.engine.scheduler import Request, Scheduler, SchedulerConfig, at_budget
from kvsift.engine.trace import StepTrace
from kvsift.methods import KVMethod, build_method
from kvsift.errors import UnknownMethodError
from kvsift.methods.base import Budget, Run
from kvsift.models.loader import ModelInfo, load_model, model_info
from kvsift.tp import agree

Prompt = str | Sequence[int]

__all__ = ["LLM", "Context", "Prompt", "CPU_FIRST_CHUNK", "DEFAULT_CHUNK", "MAX_BATCHED_TOKENS"]


class LLM:
    """A model plus kvsift's generation loop. ``model``: None (the default model), a named model
    (``kvsift models``, e.g. ``'smollm2'``), an HF directory or a ``.gguf`` file. ``chunk_size``:
    prefill chunk length (bounds activation memory); None: 512, and on CPU a first chunk of up to
    :data:`CPU_FIRST_CHUNK` tokens for a fresh prompt.
    ``decode_mode``: ``auto`` (CUDA graphs on CUDA where the method allows, else eager), ``eager``,
    ``static`` or ``graph`` (see :mod:`kvsift.engine.decode`). ``prefill_mode``: ``rows`` prefills a
    batch one sequence at a time, each compressed (and offloaded) before the next starts, so only
    one sequence's full KV is ever on the device; ``batch`` prefills all rows together; ``auto``:
    rows when the method shrinks the KV at prefill end (``row_prefill_ok``), else batch.
    ``kv_arena``: static and graph decoding of ``full`` run over runner-owned KV arenas (one per
    batch-size and capacity bucket, at most two kept), so that CUDA graphs recorded by one
    generation are replayed by the next ones instead of recorded again (at the cost of a copy of
    the prompt's KV into the arena and the arenas' memory). Requests join a batch decoding over an
    arena too: at a change of rows the rows are read from the arena and the new batch is loaded
    into the arena of its shape.
    ``tensor_parallel``: N > 1 shards the model over the N ranks of a ``torchrun`` launch
    (transformers' ``tp_plan="auto"``; create the LLM inside ``with kvsift.tensor_parallel(N):``,
    see :mod:`kvsift.tp`): each rank's cache holds its own KV heads and methods select per head on
    each rank; every rank makes the same calls and gets the same tokens (sampled ones are rank 0's).
    ``join_chunks``: prefill chunks of requests joining a running batch (continuous batching) run
    between two of its decode steps (default 1: a running sequence waits at most one chunk per
    token; 0: a joining prompt's whole prefill at once). ``join_chunk_size``: tokens per such chunk
    over all the prompts joining together (each gets ``join_chunk_size // prompts``, at least 16;
    default: ``chunk_size`` each); narrower chunks shorten the running rows' inter-token time at
    some prefill speed; used only for methods whose prefill does not depend on its chunking,
    ``KVMethod.chunk_invariant``: full, the decode-time selections, sentencekv without
    prefill_offload). ``join_order``: requests that join at one step boundary are prefilled as one
    group and stacked into the running batch together once the last is prefilled (``together``,
    the default: one change of rows per group; ``full`` prefills such a group as padded batches of
    similar lengths, each prompt getting a share of ``join_chunk_size``), or one at a time in arrival order, each
    stacked as soon as its own prefill ends (``fcfs``: each prompt gets the whole
    ``join_chunk_size`` and the first ones start streaming without waiting for the group's last,
    at one change of rows per joiner), or as ``fcfs`` with the group's shortest prompts first
    (``shortest``: a short question that joins beside a long document does not wait for the
    document's prefill; a later group is admitted only once this one is in, so no prompt waits
    behind more than its own group). ``max_batched_tokens``: prompt tokens one
    prefill forward takes over all rows of a batch (default 16,384): many long prompts prefilled
    together (requests joining at once) get narrower chunks, so activation memory stays bounded.

    ``runner`` (the model, its forward passes and CUDA graphs) and ``scheduler`` (this LLM's
    offline queue) are its two parts; ``model``, ``info``, ``device``, ``chunk_size`` and the modes
    are read from the runner."""

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 chunk_size: int | None = None, decode_mode: str = "auto", prefill_mode: str = "auto",
                 kv_arena: bool = False, tensor_parallel: int = 1, join_chunks: int = 1,
                 max_batched_tokens: int = MAX_BATCHED_TOKENS, join_chunk_size: int | None = None,
                 join_order: str = "together"):
        check_decode_mode(decode_mode)
        _check_prefill_mode(prefill_mode)
        _check_join_chunks(join_chunks)
        _check_join_chunk_size(join_chunk_size)
        _check_join_order(join_order)
        if max_batched_tokens < 16:  # before the model loads
            raise ValueError(f"max_batched_tokens must be >= 16, got {max_batched_tokens}")
        mdl, tok, info = load_model(model, device, dtype, tensor_parallel=tensor_parallel)
        self._init(mdl, tok, info, chunk_size, decode_mode, prefill_mode, kv_arena, join_chunks, max_batched_tokens,
                   join_chunk_size, join_order)

    @classmethod
    def from_model(cls, model, tokenizer, name: str = "model", chunk_size: int | None = None,
                   decode_mode: str = "auto", prefill_mode: str = "auto", kv_arena: bool = False,
                   join_chunks: int = 1, max_batched_tokens: int = MAX_BATCHED_TOKENS,
                   join_chunk_size: int | None = None, join_order: str = "together") -> "LLM":
        """Wrap an already loaded transformers model (e.g. a tiny random one in tests; a model
        loaded tensor-parallel runs as one rank of it)."""
        self = cls.__new__(cls)
        self._init(model.eval(), tokenizer, model_info(model, tokenizer, name), chunk_size, decode_mode,
                   prefill_mode, kv_arena, _check_join_chunks(join_chunks), max_batched_tokens,
                   _check_join_chunk_size(join_chunk_size), _check_join_order(join_order))
        return self

    def _init(self, model, tokenizer, info: ModelInfo, chunk_size: int | None, decode_mode: str = "auto",
              prefill_mode: str = "auto", kv_arena: bool = False, join_chunks: int = 1,
              max_batched_tokens: int = MAX_BATCHED_TOKENS, join_chunk_size: int | None = None,
              join_order: str = "together"):
        eos = set()
        for src in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(src)
        self.eos_ids = sorted(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.runner = ModelRunner(model, tokenizer, info, chunk_size, decode_mode, prefill_mode, pad_id, kv_arena,
                                  max_batched_tokens=max_batched_tokens)
        self.scheduler = Scheduler(self.scheduler_config())
        # prefill chunks of requests joining a running batch run between two of its decode steps
        # (0: a joining prompt's whole prefill at once): the bound on a running row's inter-token time
        self.join_chunks = join_chunks
        # and at most this many tokens each, for methods whose prefill does not depend on its chunking
        # (None: chunk_size): a running row then waits for a shorter forward per token
        self.join_chunk_size = join_chunk_size
        # requests that join at one boundary: "together" (prefilled as a group, stacked into the
        # running batch at once when the last is prefilled), "fcfs" (prefilled one at a time in
        # arrival order, each stacked as soon as its own prefill ends) or "shortest" (as fcfs,
        # shortest prompt first)
        self.join_order = join_order
        # what each decode-step boundary spent its time on (a StepTrace, kvsift.engine.trace; None: off)
        self.step_trace: StepTrace | None = None
        self.tp_size = info.tp_size  # tensor-parallel ranks (1: none); KV figures below are this rank's
        item = info.dtype.itemsize if hasattr(info.dtype, "itemsize") else 2
        self.kv_bytes_per_token = kv_bytes_per_token(info.num_layers, info.num_kv_heads, info.head_dim, item)

    def scheduler_config(self, **kw) -> SchedulerConfig:
        """A :class:`SchedulerConfig` for this model (its ``max_positions``), e.g. for a server's scheduler."""
        return SchedulerConfig(max_positions=self.info.max_positions, **kw)

    # the runner's, read here (one owner)
    model = property(lambda self: self.runner.model)
    tokenizer = property(lambda self: self.runner.tokenizer)
    info = property(lambda self: self.runner.info)
    device = property(lambda self: self.runner.device)
    chunk_size = property(lambda self: self.runner.chunk_size)
    first_chunk = property(lambda self: self.runner.first_chunk)

    @property
    def decode_mode(self) -> str:
        return self.runner.decode_mode

    @decode_mode.setter
    def decode_mode(self, mode: str) -> None:  # the runner's, checked
        mode = check_decode_mode(mode)
        if mode == "graph" and self.device.type != "cuda":
            raise ValueError(f"decode_mode='graph' needs a CUDA device, this model is on {self.device}")
        self.runner.decode_mode = mode

    @property
    def prefill_mode(self) -> str:
        return self.runner.prefill_mode

    @prefill_mode.setter
    def prefill_mode(self, mode: str) -> None:  # the runner's, checked
        self.runner.prefill_mode = _check_prefill_mode(mode)
    pad_id = property(lambda self: self.runner.pad_id)
    lock = property(lambda self: self.runner.lock)

    # ---- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids of a prompt; text goes through the chat template of instruct models."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError("empty prompt")
            return ids
        if not prompt:
            raise ValueError("empty prompt")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids")
        if chat is None:
            chat = self.info.is_chat
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.encode_chat(msgs)
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.tokenizer is not None else ""

    def check_length(self, n: int, what: str = "prompt") -> None:
        """Raise ``ValueError`` unless ``n`` prompt tokens leave room for one new token."""
        if n >= self.info.max_positions:
            raise ValueError(f"{what} of {n} tokens exceeds the model's limit of "
                             f"{self.info.max_positions - 1} tokens (leaving room for one new token)")

    # ---- public API --------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None, *,
                 method: str | KVMethod | None = None, budget: Budget = None, method_kwargs: dict | None = None,
                 chat: bool | None = None, context: Context | None = None, progress: bool | None = None,
                 cancel: Callable[[], bool] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a batch (text or token ids). Returns one output per prompt."""
        outs: dict[int, RequestOutput] = {}
        for ev in self.stream(prompts, params, method=method, budget=budget, method_kwargs=method_kwargs,
                              chat=chat, context=context, progress=progress, cancel=cancel):
            if ev.output is not None:
                outs[ev.index] = ev.output
        return [outs[i] for i in sorted(outs)]

    def stream(self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None, *,
               method: str | KVMethod | None = None, budget: Budget = None, method_kwargs: dict | None = None,
               chat: bool | None = None, context: Context | None = None, progress: bool | None = None,
               cancel: Callable[[], bool] | None = None) -> Iterator[StreamEvent]:
        """Like ``generate`` but yields ``StreamEvent`` text deltas as tokens are produced.

        ``method=None`` means ``full``, or with a ``context`` whose KV lives partly off the device
        (sentencekv's host chunks) the context's own method, which knows how to fetch it back.

        Everything is validated before any compute: a bad method, budget or length raises
        ``ValueError`` and nothing is half-done."""
        params = params or SamplingParams()
        ids = [self.encode(p, chat) for p in _as_batch(prompts)]
        req = self.request(ids, params, method=method, budget=budget, method_kwargs=method_kwargs,
                           context=context, cancel=cancel)
        self.scheduler.check(req)
        return self._offline(req, progress)

    def request(self, ids: list[list[int]], params: SamplingParams, *, method: str | KVMethod | None = None,
                budget: Budget = None, method_kwargs: dict | None = None, context: Context | None = None,
                cancel: Callable[[], bool] | None = None, tag: Any = None) -> Request:
        """A validated engine :class:`Request` for token-id prompts (not queued): the method is built
        and started for them (budget vs. length), the length and decode mode checked, and its KV
        estimated for the scheduler's admission. Raises ``ValueError`` subclasses before any compute."""
        if method is None and context is not None and context.needs_planner:
            method, budget = context.method, context.budget if budget is None else budget
            method_kwargs = context.method_kwargs if method_kwargs is None else method_kwargs
        m = build_method(method or "full", budget, **(method_kwargs or {}))
        if context is not None and not m.quantized_ok() and any(ly.quant is not None for ly in context.cache.layers):
            raise UnknownMethodError(f"this context holds quantized KV ({context.method}): {m.spec!r} evicts or "
                                     f"reads the KV buffer at decode and cannot answer from it", param="kv_method")
        m.check_model(self.info)  # per-model method data (minference's patterns) fits
        base = context.length if context is not None else 0
        longest = max(len(x) for x in ids)
        self.check_length(base + longest, "prompt")
        run = m.start(base + longest, self.info.num_layers)
        self.runner.decode_mode_for(m)  # a bad KVSIFT_DECODE: an error now, before any compute
        new = min(params.max_tokens, self.info.max_positions - base - longest)
        kv, host, prefill, kept = self._charge(m, run, len(ids), longest, new, context,
                                               uniform=len({len(x) for x in ids}) == 1)
        return Request([list(x) for x in ids], params, m, run, context, cancel, kv, host, tag=tag,
                       prefill_bytes=prefill, token_bytes=len(ids) * self.kv_bytes_per_token, kept_tokens=kept,
                       width_tokens=kept + m.decode_kv_tokens(run, new))

    def _charge(self, m: KVMethod, run, rows: int, longest: int, new: int, context: Context | None,
                uniform: bool) -> tuple[int, int, int, int]:
        """``(device, host, prefill peak device, kept tokens per row)`` KV bytes a generation of
        ``rows`` prompts of at most ``longest`` tokens (after ``context``) and ``new`` decode steps
        is expected to hold (:func:`kvsift.budget.request_kv_bytes`; kept: the method's
        ``device_tokens``)."""
        ctx_bytes = context.cache.memory()["device"] if context is not None else 0
        row_prefill = self.runner.rows_prefill(m, rows, context)
        share = m.device_share(self.info.head_dim)
        row_share = share[0] if m.codec and uniform else 1.0  # kivi: each row at its end
        kept = min(m.device_tokens(run, longest, self.info), longest)
        kv, host = request_kv_bytes(self.kv_bytes_per_token, rows, longest, kept,
                                    m.decode_kv_tokens(run, new), context_bytes=ctx_bytes,
                                    offloads=m.host_share(self.info.head_dim), row_prefill=row_prefill,
                                    context_shared=self.runner.shares_context(m, context), device_share=share,
                                    row_share=row_share)
        prefill = prefill_kv_bytes(self.kv_bytes_per_token, rows, longest, kept, row_prefill=row_prefill,
                                   row_share=row_share)
        return kv, host, prefill, kept

    def kv_estimate(self, rows: int, prompt_tokens: int, max_new_tokens: int, *, method: str | KVMethod | None = None,
                    budget: Budget = None, method_kwargs: dict | None = None) -> tuple[int, int, bool]:
        """What the scheduler would charge a generation of ``rows`` fresh prompts of
        ``prompt_tokens`` tokens each and ``max_new_tokens`` decode steps under ``method``:
        ``(device KV bytes at its peak, host KV bytes, prefilled one row at a time)``. No compute;
        ``ValueError`` for a bad method, budget or length, as :meth:`request` raises it."""
        if rows < 1 or prompt_tokens < 1:
            raise ValueError(f"kv_estimate needs rows >= 1 and prompt_tokens >= 1, got {rows}, {prompt_tokens}")
        m = build_method(method or "full", budget, **(method_kwargs or {}))
        self.check_length(prompt_tokens, "prompt")
        run = m.start(prompt_tokens, self.info.num_layers)
        new = min(max_new_tokens, self.info.max_positions - prompt_tokens)
        kv, host, _, _ = self._charge(m, run, rows, prompt_tokens, new, None, uniform=True)
        return kv, host, self.runner.rows_prefill(m, rows, None)

    def _offline(self, req: Request, progress: bool | None) -> Iterator[StreamEvent]:
        """Run one request through this LLM's scheduler (the calls of one LLM run one at a time)."""
        with self.lock:
            self.scheduler.add(req)
            group = self.scheduler.schedule(head=req)
            events = self.run_batch(group, progress)
            try:
                for _, ev in events:
                    if ev.error is not None:
                        raise ev.error
                    yield ev
            finally:
                events.close()  # the decode loop's own cleanup (KV, graphs) runs now, not at collection
                self.scheduler.remove(req)
                self.scheduler.finish(group)

    def generate_requests(self, requests: Sequence[Request], *, max_batch: int = 64, kv_memory: int | None = None,
                          progress: bool | None = None) -> list[list[RequestOutput]]:
        """Offline continuous batching: run many validated requests (:meth:`request`, each with its
        own prompts, sampling, method options and budget) to completion and return each one's
        outputs (one per prompt), in order.

        A scheduler of its own (``max_batch`` sequences, ``kv_memory`` bytes of expected device KV;
        None: unbounded) starts the oldest waiting request with the ones it batches with
        (:func:`~kvsift.engine.scheduler.batch_key`), and at every decode-step boundary the waiting
        requests that may join the running batch do (:func:`~kvsift.engine.scheduler.join_key`:
        for a method whose state after the prefill is its kept KV, any budget and prompt length),
        each prefilled on its own with its own run, as it would run alone, their whole prefill at
        once (no one here waits on a token). So a grid's cells of one method at several budgets,
        or prompts of a few different lengths, decode as one batch instead of one batch each.
        Raises the first request's error, after the batch's memory is released."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        sched = Scheduler(SchedulerConfig(max_batch=max_batch, kv_memory=kv_memory,
                                          max_positions=self.info.max_positions))
        for r in requests:
            sched.add(r)   # one that could never fit: KVMemoryError before any compute
        outs: dict[Request, list[RequestOutput | None]] = {r: [None] * r.rows for r in requests}   # by identity
        join = _OfflineJoin(sched)
        with self.lock:
            while sched.waiting:
                group = sched.schedule()
                if not group:  # nothing runs here between groups, so the oldest always fits
                    raise RuntimeError("the scheduler started no request with nothing running")
                events = self.run_batch(group, progress, join=join, memory=sched, join_chunks=0)
                try:
                    for r, ev in events:
                        if ev.error is not None:
                            raise ev.error
                        if ev.finished:
                            outs[r][ev.index] = ev.output
                finally:
                    events.close()
                    sched.finish(group)   # the joiners too: run_batch appended them to the group
        return [outs[r] for r in requests]

    def prefill_context(self, document: Prompt, *, method: str | KVMethod = "full", budget: Budget = None,
                        method_kwargs: dict | None = None, chat: bool | None = None,
                        progress: bool | None = None) -> Context:
        """Prefill a document once and keep its (compressed) KV; answer questions with
        ``generate(question, context=ctx)``. With a chat model the document opens the user turn
        and each question closes it (see ``encode_question``)."""
        ids = self.encode_document(document, chat) if isinstance(document, str) else self.encode(document)
        self.check_length(len(ids), "document")
        m = build_method(method, budget, **(method_kwargs or {}))
        m.check_model(self.info)  # per-model method data (minference's patterns) fits
        run = m.start(len(ids), self.info.num_layers)
        kv, host = request_kv_bytes(self.kv_bytes_per_token, 1, len(ids), run.tokens, 0,
                                    offloads=m.host_share(self.info.head_dim))
        req = Request([ids], None, m, run, kv_bytes=kv, host_bytes=host, kind="prefill")
        self.scheduler.check(req)
        with self.lock:
            self.scheduler.add(req)
            group = self.scheduler.schedule(head=req)
            try:
                cache, stats, _ = self.runner.prefill([ids], m, run, None, progress)
            finally:
                self.scheduler.remove(req)
                self.scheduler.finish(group)
        stats.method_stats = m.stats(run)  # e.g. kvzip's reread passes
        # a method instance carries its own budget (its options: pass method_kwargs, or set them on the
        # context, so that answers that must re-build the method, e.g. sentencekv's, get them)
        return Context(cache=cache, token_ids=ids, method=m.spec, budget=m.budget if budget is None else budget,
                       stats=stats, method_kwargs=dict(method_kwargs or {}))

    def score(self, context: Prompt, continuation: Sequence[int], *, method: str | KVMethod | None = None,
              budget: Budget = None, method_kwargs: dict | None = None) -> tuple[float, GenerationStats]:
        """Teacher-forced log-likelihood over the compressed cache (long-text perplexity).

        ``context`` is prefilled (and compressed) by ``method``; then ``continuation`` is fed one
        token per decode step, so decode-time selection and rolling eviction act as in generation.
        Returns ``(sum of -log p(continuation[i] | context, continuation[:i]), stats)``: one row of
        :meth:`score_batch`."""
        return self.score_batch([context], [continuation], method=method, budget=budget,
                                method_kwargs=method_kwargs)[0]

    def score_batch(self, contexts: Sequence[Prompt], continuations: Sequence[Sequence[int]], *,
                    method: str | KVMethod | None = None, budget: Budget = None,
                    method_kwargs: dict | None = None) -> list[tuple[float, GenerationStats]]:
        """:meth:`score` for ``B`` rows at once: the contexts are prefilled as one batch (or row by
        row, as :meth:`ModelRunner.rows_prefill` says), each compressed by ``method`` as in a
        batched generation, then the continuations are fed together, one ``(B, 1)`` token column
        per decode step; the NLL is summed on the device (float64, ``(B,)``) and read once at the end.

        The contexts must have one length and the continuations one length (no padding, so a row's
        score does not depend on its batch mates: a ratio budget resolves against that length),
        every continuation non-empty and context + continuation within ``info.max_positions``;
        otherwise ``ValueError`` before any compute. Returns one ``(nll_sum, stats)`` per row, in
        order; each row's stats hold ``1/B`` of the batch's KV bytes and prefill time, and the
        batch's decode time (``decode_ms_per_token``: per batched step)."""
        ctx_ids = [self.encode(c, chat=False) for c in contexts]
        conts = [[int(t) for t in c] for c in continuations]
        b = len(ctx_ids)
        if b == 0:
            raise ValueError("score_batch needs at least one context")
        if len(conts) != b:
            raise ValueError(f"score_batch got {b} contexts but {len(conts)} continuations")
        if len({len(x) for x in ctx_ids}) > 1:
            raise ValueError(f"score_batch needs contexts of one length, got lengths "
                             f"{sorted({len(x) for x in ctx_ids})}")
        if len({len(x) for x in conts}) > 1:
            raise ValueError(f"score_batch needs continuations of one length, got lengths "
                             f"{sorted({len(x) for x in conts})}")
        n_ctx, n_cont = len(ctx_ids[0]), len(conts[0])
        if not n_cont:
            raise ValueError("score needs a non-empty continuation")
        total = n_ctx + n_cont
        if total > self.info.max_positions:
            raise ValueError(f"context + continuation = {total} tokens exceeds the model's limit of "
                             f"{self.info.max_positions}")
        m = build_method(method or "full", budget, **(method_kwargs or {}))
        m.check_model(self.info)  # per-model method data (minference's patterns) fits
        run = m.start(n_ctx, self.info.num_layers)
        runner = self.runner
        with self.lock:
            cache, stats, (ctx, logits) = runner.prefill(ctx_ids, m, run, None, False, reserve=n_cont + 1)
            ctx.decoding = True
            next_pos = ctx.next_pos                                            # (B,)
            targets = torch.tensor(conts, dtype=torch.long, device=self.device)  # (B, n_cont)
            # fp64, as the host sum of fp32 log-probabilities was: one row's result is what score gave
            nll = torch.zeros(b, dtype=torch.float64, device=self.device)     # (B,)
            t0 = time.perf_counter()
            for i in range(n_cont):
                logp = torch.log_softmax(logits, dim=-1)                       # (B, vocab) fp32
                nll -= logp.gather(1, targets[:, i:i + 1])[:, 0].double()
                if i == n_cont - 1:
                    break
                ctx.step = i
                logits = runner.forward(ctx, targets[:, i].view(b, 1), next_pos[:, None])
                next_pos = next_pos + 1
            sums = nll.tolist()  # the one device-to-host transfer (it waits for the last step)
            decode_s = time.perf_counter() - t0
        out = []
        for x in sums:
            st = _copy_stats(stats, cache, m, run, n_cont, n_cont - 1, decode_s, share=(1, b))
            st.prefill_s = stats.prefill_s / b
            out.append((x, st))
        return out

    def encode_document(self, document: str, chat: bool | None = None) -> list[int]:
        """The prefix of a chat prompt up to the end of ``document`` (the question follows)."""
        chat = self.info.is_chat if chat is None else chat
        if not chat:
            return self.encode(document, chat=False)
        marker = "\x00KVSIFT\x00"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": document + marker}],
                                                  add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"])

    def encode_question(self, question: str, chat: bool | None = None) -> list[int]:
        """The rest of a chat prompt after a context: the question and the assistant turn opener."""
        chat = self.info.is_chat if chat is None else chat
        if not chat:
            return list(self.tokenizer("\n\n" + question, add_special_tokens=False)["input_ids"])
        marker = "\x00KVSIFT\x00"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": marker + "\n\n" + question}],
                                                  add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"])

    # ---- one batched generation ---------------------------------------------------------------
    def run_batch(self, requests: list[Request], progress: bool | None = None,
                  join: Callable[[list[Request], int], list[Request]] | None = None,
                  memory: Scheduler | None = None, join_chunks: int | None = None,
                  on_rows_changed: Callable[[float], None] | None = None) -> Iterator[tuple[Request, StreamEvent]]:
        """Run a scheduled group of compatible requests (:func:`~kvsift.engine.scheduler.batch_key`)
        as one batched generation: their prompts are prefilled and decoded together. Yields
        ``(request, event)``, the event's ``index`` local to its request; a request's last event
        comes with ``request.finished`` set. Each request's ``cancel`` is read once per decode step:
        a cancelled request's sequences end (``"cancelled"``) while the others go on; during the
        prefill it is read at every chunk boundary, and once all of the group's requests are
        cancelled the prefill stops there (their sequences end ``"cancelled"`` with no token); each sequence
        stops at its own ``max_tokens``, stop strings and end of sequence. Holds the runner's lock.

        ``join(requests, rows)``: asked at every decode-step boundary for requests to add to the
        running batch (continuous batching; ``rows``: the batch's rows now); an optional
        ``join.idle()`` says no request is waiting that could join (then, as without ``join``, a
        new batch's CUDA graph is recorded before its rows' first tokens are streamed), and an
        optional ``join.waiting_tokens()`` the shortest waiting prompt (``None``: none waits): when
        that is longer than a joining prefill gets through between two steps, no joiner can change
        the rows before the next step either, so the graph is recorded before the first tokens
        too (a prefix found in a store may make a prefill shorter: then at worst that recording is
        thrown away when the rows change). They are appended to
        ``requests``, prefilled on their own, then their KV is stacked with the running rows (left
        padding by position) and they decode with the others from the next step; rows whose
        sequence is done leave the batch the same way. Only where that is exact and keeps shapes
        free: a method whose state is only its kept KV (``full``, the prefill eviction methods), no
        reused context but one read by reference (:meth:`joins_running`); elsewhere
        the batch keeps its rows to the end (done rows computed and ignored).

        ``memory``: the scheduler that admitted the requests. Where requests may join (no reused
        context, no KV arena), each (re)built batch's measured device KV becomes its requests'
        charge (:meth:`Scheduler.settle`), so a compressing method's requests hold what they keep,
        not their prompts, and more of them join. When its config preempts
        (``SchedulerConfig.preempt``): every preemptible request is charged ``headroom`` decode
        tokens ahead (:meth:`Scheduler.ensure`); when a charge does not fit, the newest preemptible
        request's rows are copied to host memory and leave the batch (it is preempted: its stream
        pauses), and once there is room again, before any new request joins, they come back with
        their KV, their next token and their sequences' state, and go on where they stopped.

        ``join_chunks``: joining prompts' prefill chunks between two decode steps (None: the LLM's
        ``join_chunks``; 0: their whole prefill at once, for offline work where no one waits on
        a token, :meth:`generate_requests`). ``on_rows_changed(seconds)``: called at each change of
        the running batch's rows that running rows wait on (rows joining or leaving, preempted or
        resumed), with the host time it took: the new batch built, its step runner started and,
        with joiners, its first step and any CUDA graph recorded before their first tokens (the
        server observes it as ``kvsift_batch_rebuild_seconds``)."""
        if not requests:
            return
        chunks_per_step = self.join_chunks if join_chunks is None else _check_join_chunks(join_chunks)
        head = requests[0]
        method, context, params = head.method, head.context, head.params
        owners = [(r, j) for r in requests for j in range(r.rows)]
        ids = [p for r in requests for p in r.prompts]
        base = head.base
        longest = max(len(x) for x in ids)
        # one request runs as it was validated; a group starts the method once over its longest prompt
        run = head.run if len(requests) == 1 and head.run is not None else method.start(base + longest,
                                                                                        self.info.num_layers)
        limits = [r.room(longest, self.info.max_positions) for r, _ in owners]
        max_new = max(limits)
        runner = self.runner
        mode = runner.decode_mode_for(method)
        compact = self.joins_running(head)  # rows may change between steps
        can_join = join is not None and compact
        # the prefill stops at a chunk boundary once every request of the group is cancelled
        gone = ((lambda: all(r.cancel() for r in requests)) if all(r.cancel is not None for r in requests)
                else None)
        with self.lock:
            try:
                cache, stats, (ctx, logits) = runner.prefill(ids, method, run, context, progress,
                                                             reserve=max_new + 1, cancel=gone)
            except PrefillCancelled:  # every sequence ends, cancelled, with no token
                for r in requests:
                    yield from _cancelled_events(r)
                return
            ctx.decoding = True
            next_pos = ctx.next_pos
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed() % 2**63)
            seqs = [_Seq(j, self, r.params, limit) for (r, j), limit in zip(owners, limits)]
            left = {r: r.rows for r in requests}   # sequences of each request still running
            # each request's prefill stats, the rows of that prefill, when its decode started
            # (and the method and run of that prefill: a joined request's own, for its stats)
            base_stats = {r: (stats, len(ids), 0.0, method, run) for r in requests}
            # seconds the running rows waited on joining prefills, in all and when each request started
            # (a sequence's stats.decode_wait_s: what of its decode_s went to others' prefills)
            waited = 0.0
            wait_from = {r: 0.0 for r in requests}
            # preemption: decode tokens per row each request is charged for (inf: all of them)
            preempt = (memory is not None and compact and memory.config.preempt
                       and any(memory.preemptible(r) for r in requests))
            def ahead(r: Request) -> float:  # decode tokens per row a request is first charged for
                return memory.headroom if preempt and memory.preemptible(r) else math.inf

            covered = {r: ahead(r) for r in requests}
            if memory is not None and not preempt:  # admitted for less than its tokens, but this batch cannot
                for r in requests:                   # change rows (a KV arena): charged for all of them now
                    if memory.preemptible(r):
                        memory.ensure(r, max(r.room(len(p), self.info.max_positions) for p in r.prompts))
            swapped: list[_Swapped] = []  # preempted requests' rows on the host, oldest first
            pending = None  # joining requests and their prefill in flight, one chunk per decode step
            prefilled: set[Request] = set()   # joiners whose prefill ended (stacked, or held for it)
            held = None  # joiners prefilled whose method state still writes (see below): (new, parts, firsts)
            stepped = False  # this boundary already ran the next step (a new batch's first, see below)
            eos = torch.tensor(self.eos_ids, device=self.device) if self.eos_ids else None
            # on CUDA the host reads step t's tokens while step t+1 already runs (no stall per step)
            lag = self.device.type == "cuda"
            b = len(ids)
            host = torch.empty(2, b, dtype=torch.long, pin_memory=lag)
            ready = torch.cuda.Event() if lag else None
            decoder = runner.decoder(ctx, mode, max_new)
            settles = memory is not None and can_join and context is None

            def settle() -> None:
                """The batch just built: its requests charged its measured KV by their rows in it
                (0 for one whose rows all finished), room for joiners; a joiner whose prefill is in
                flight or held keeps its join charge until its rows are in."""
                if settles and decoder.arena is None:
                    rows = Counter(r for r, _ in owners)
                    memory.settle({r: rows[r] for r in requests if rows[r] or r.finished},
                                  ctx.cache.memory()["device"], self.kv_bytes_per_token)

            settle()
            stats.decode_mode = decoder.mode
            t0 = time.perf_counter()
            # the step trace's gap in progress (None: tracing off, ``LLM.step_trace``)
            gap = self.step_trace.begin() if self.step_trace is not None else None
            setup_seen = [0.0]   # the decoder's setup seconds already put in a gap

            def note_setup() -> float:
                """The current decoder's warm-up and recording time since the last call, into the
                trace's gap (ms)."""
                ms = 1000 * (decoder.setup_s - setup_seen[0])
                setup_seen[0] = decoder.setup_s
                if ms > 0:
                    gap.add(setup_ms=ms)
                return ms

            def push(i: int, tok_i: int, eos_i: bool, cancelled: set) -> Iterator[tuple[Request, StreamEvent]]:
                s, (r, j) = seqs[i], owners[i]
                ev = s.push(tok_i, eos_i and not r.params.ignore_eos, s.steps == s.limit - 1,
                            "cancelled" if r in cancelled else None)
                if ev.finished:
                    st, rows_st, t_r, method_r, run_r = base_stats[r]
                    st.decode_mode, st.decode_setup_s = decoder.mode, decoder.setup_s
                    st.decode_setup_steps = decoder.setup_steps
                    stats_i = _copy_stats(st, ctx.cache, method_r, run_r, len(s.ids), s.steps - 1,
                                          time.perf_counter() - t0 - t_r, share=(r.rows, rows_st),
                                          end_share=(r.rows, len(seqs)), waited=waited - wait_from[r])
                    ev.output = RequestOutput(s.text, s.ids, r.prompts[j], s.reason, stats_i)
                    left[r] -= 1
                    r.finished = left[r] == 0
                # without a tokenizer there is no text: every token is an event (token ids out)
                if ev.text or ev.finished or (ev.token_id is not None and self.tokenizer is None):
                    yield r, ev

            join_idle = getattr(join, "idle", None) if can_join else None
            join_tokens = getattr(join, "waiting_tokens", None) if can_join else None
            # the most prompt tokens a joining request's prefill gets through between two decode
            # steps (its chunks are at most a chunk, or a longer first chunk, plus a merged last one)
            step_tokens = chunks_per_step * (max(runner.chunk_size, runner.first_chunk or 0)
                                             + method.min_last_chunk())

            def rows_hold() -> bool:
                """The rows cannot change before the decoder's next step: no request can join
                (no joining, or ``join.idle()``), or none could finish its prefill by then (no join
                prefill under way, and ``join.waiting_tokens()``, the shortest waiting prompt, is
                longer than ``step_tokens``: a joiner's prefill then takes more than one step)."""
                if not can_join or (join_idle is not None and join_idle()):
                    return True
                if join_tokens is None or not chunks_per_step or pending is not None or held is not None:
                    return False
                n = join_tokens()
                return n is None or n > step_tokens

            def prime() -> None:
                """Right after a decoder's first step, record the graph its next step would record
                (``DecodeRunner.prepare``) before any token goes out, where that step will run on
                this decoder: rows left to decode, and the rows cannot change first
                (:func:`rows_hold`). A new batch's recording then delays its rows' first tokens
                (rows already running wait for it in the same gap anyway) instead of sitting
                between their first and second tokens."""
                if (decoder.steps == 1 and rows_hold()
                        and max((s.limit - s.steps for s in seqs if not s.done), default=0) >= 3):
                    decoder.prepare(tok, next_pos)

            try:
                while True:
                    if gap is not None:
                        gap.loop_turn()
                    # the last step of every running sequence: nothing to queue after it
                    last = all(s.done or s.steps == s.limit - 1 for s in seqs) and not swapped
                    tok = self._sample(_hold_eos(logits, seqs, eos), params, gen)
                    is_eos = torch.isin(tok, eos) if eos is not None else torch.zeros_like(tok, dtype=torch.bool)
                    if pending is None and held is None and can_join and not last and not swapped:  # preempted first
                        joining = join(requests, len(seqs))
                        for r in joining:  # in the group from now on (its caller finishes them with it)
                            requests.append(r)
                            left[r] = 0     # no running sequence until their prefill is done
                            covered[r] = ahead(r)
                        if joining:  # their prompts are prefilled a chunk per decode step of the others
                            room = max([ctx.cache.reserve] + [r.room(len(p), self.info.max_positions) + 1
                                                              for r in joining for p in r.prompts])
                            order = (sorted(joining, key=lambda r: r.longest) if self.join_order == "shortest"
                                     else joining)
                            pending = (joining, self._prefill_joining(
                                order, method, run, room, progress, alone=lambda: all(s.done for s in seqs),
                                fcfs=self.join_order != "together"))
                    # rows change before the next step (new ones, or rows done since the last step):
                    # nothing may be queued ahead of that
                    # a charge to grow, or preempted rows waiting to come back: rows may change
                    mem_due = preempt and (bool(swapped) or any(
                        not s.done and s.steps + 2 > covered[owners[i][0]] for i, s in enumerate(seqs)))
                    # (joiners held for their state's writes: rows change once those are done)
                    synced = (not lag or pending is not None or held is not None
                              or (compact and any(s.done for s in seqs)) or mem_due)
                    if not synced:
                        host.copy_(torch.stack((tok, is_eos.long())), non_blocking=True)
                        ready.record()
                        if not last:  # queue the next step before waiting for this one's tokens
                            logits = decoder.step(tok, next_pos)
                            next_pos = next_pos + 1
                            prime()  # a new batch's graph: recorded before its first tokens go out
                        ready.synchronize()
                        toks, eos_l = host.tolist()
                    else:
                        toks, eos_l = tok.tolist(), is_eos.tolist()
                    if gap is not None:
                        note_setup()
                        gap.tokens(sum(1 for s in seqs if not s.done))
                    cancelled = {r for r in requests if left[r] and r.cancel is not None and r.cancel()}
                    for i, s in enumerate(seqs):
                        if not s.done:
                            yield from push(i, toks[i], bool(eos_l[i]), cancelled)
                    done = [s.done for s in seqs]
                    new, parts = [], []
                    if pending is not None:
                        # one chunk of the joining prompts before the next step (all that is left when
                        # no running row needs a step): a long prompt never stalls the batch for more
                        joining, steps = pending
                        t_join = time.perf_counter()
                        try:
                            n = 0
                            while True:
                                out = next(steps)
                                n += 1
                                if out is not None and out[1] is None:  # join_order fcfs: its client left
                                    prefilled.update(out[0])            # during its prefill, or it failed
                                    for r in out[0]:
                                        yield from (_cancelled_events(r) if out[2] is None
                                                    else _failed_events(r, out[2]))
                                elif out is not None:  # join_order fcfs: one joiner's prefill ended, it
                                    new, parts, firsts = out   # joins at this boundary, the next goes on
                                    break
                                if not all(done) and chunks_per_step and n >= chunks_per_step:
                                    break
                        except StopIteration as fin:
                            parts, firsts = fin.value
                            new = list(firsts)   # in the order of the parts' rows
                            pending = None
                        except PrefillCancelled:  # every joining request not prefilled yet left during its prefill
                            pending = None
                            for r in joining:
                                if r not in prefilled:
                                    yield from _cancelled_events(r)
                        except Exception as e:  # noqa: BLE001 - the joiners fail, the running rows go on
                            pending = None
                            steps.close()
                            del steps
                            _release_memory(self.device, e)
                            for r in joining:
                                if r not in prefilled:
                                    yield from _failed_events(r, e)
                        prefilled.update(new)
                        join_s = time.perf_counter() - t_join   # what the joining chunks took
                        if not all(done):
                            waited += join_s
                        if gap is not None:
                            gap.add(join_ms=1000 * join_s, join_chunks=n, prefill_done=len(new))
                    if new and held is not None:  # join_order fcfs: one more prefilled while earlier ones are held
                        held, new, parts = (held[0] + new, held[1] + parts, {**held[2], **firsts}), [], []
                    if new and not all(done) and not _states_ready(parts):
                        # the joiners' method state is still being written asynchronously (sentencekv's
                        # chunks on their way to host memory): stacking them now would wait for those
                        # writes between two steps of every running row; the rows take steps meanwhile
                        held, new, parts = (new, parts, firsts), [], []
                    elif held is not None and (all(done) or _states_ready(held[1])):
                        (new, parts, firsts), held = held, None
                    if gap is not None and held is not None:
                        gap.add(held=True)
                    out_rows: set[int] = set()
                    resumed: list[_Swapped] = []
                    # the KV the steps wrote: the runner's arena when the decode runs over one
                    live = decoder.ctx if decoder.arena is not None else ctx
                    if preempt and synced:
                        out_rows = self._preempt(memory, live, requests, seqs, owners, covered, swapped, tok, next_pos)
                        if swapped and not out_rows and pending is None:
                            idle = all(d for d in done)  # nothing runs: the oldest comes back whatever it costs
                            while swapped and memory.swap_in(swapped[0].req, swapped[0].tokens + memory.headroom,
                                                             force=idle and not resumed):
                                covered[swapped[0].req] = swapped[0].tokens + memory.headroom
                                resumed.append(swapped.pop(0))
                    if all(done) and not new and pending is None and held is None and not resumed and not swapped:
                        break
                    if synced and compact and (new or any(done) or out_rows or resumed):
                        # continuous batching: done rows leave, new requests join, before the next step
                        # (and preempted rows leave, resumed ones come back)
                        t_change = time.perf_counter()
                        keep = [i for i, d in enumerate(done) if not d and i not in out_rows]
                        if gap is not None:
                            note_setup()
                        decoder.close()
                        left_steps = max([seqs[i].limit - seqs[i].steps for i in keep]
                                         + [r.room(len(p), self.info.max_positions) for r in new for p in r.prompts]
                                         + [0])
                        ctx, t_new = self._rebuild(ctx, next_pos, keep, new, parts, run, resumed,
                                                   rows_from=live.cache if live is not ctx else None,
                                                   steps_left=left_steps + 1)
                        seqs, owners = [seqs[i] for i in keep], [owners[i] for i in keep]
                        tok, next_pos = tok[keep], next_pos[keep]
                        for r in new:
                            left[r] = r.rows
                            st_r, rows_r, method_r, run_r = firsts[r]
                            base_stats[r] = (st_r, rows_r, time.perf_counter() - t0, method_r, run_r)
                            wait_from[r] = waited
                            for j in range(r.rows):
                                owners.append((r, j))
                                seqs.append(_Seq(j, self, r.params, r.room(len(r.prompts[j]), self.info.max_positions)))
                        firsts_new = []
                        if new:
                            tok_new = self._sample(_hold_eos(t_new.logits, seqs[len(keep):], eos), params, gen)
                            eos_new = (torch.isin(tok_new, eos) if eos is not None
                                       else torch.zeros_like(tok_new, dtype=torch.bool))
                            firsts_new = list(zip(tok_new.tolist(), eos_new.tolist()))
                            tok = torch.cat([tok, tok_new])
                            next_pos = torch.cat([next_pos, t_new.next_pos])
                        for sw in resumed:  # their next token was sampled before they left: no new one
                            seqs.extend(sw.seqs)
                            owners.extend(sw.owners)
                            tok = torch.cat([tok, sw.tok.to(self.device)])
                            next_pos = torch.cat([next_pos, sw.next_pos.to(self.device)])
                        host = torch.empty(2, len(seqs), dtype=torch.long, pin_memory=lag)
                        # room for every row's steps (a joiner's first token, streamed below, is one)
                        first_rows = range(len(keep), len(keep) + len(firsts_new))
                        decoder = runner.decoder(ctx, mode, max(s.limit - s.steps - (i in first_rows)
                                                                for i, s in enumerate(seqs)) + 1)
                        setup_seen[0] = 0.0
                        if firsts_new and any(seqs[i].limit > 1 for i in first_rows):
                            # the new batch's first step, and its graph recorded, before the joiners'
                            # first tokens go out: that time is in their first token's wait, not
                            # between their first and second (the rows already running wait for it
                            # either way)
                            logits = decoder.step(tok, next_pos)
                            next_pos = next_pos + 1
                            prime()
                            stepped = True
                        settle()
                        if on_rows_changed is not None and keep:   # rows that waited on it
                            on_rows_changed(time.perf_counter() - t_change)
                        if gap is not None:
                            in_setup = note_setup()
                            gap.add(rebuild_ms=max(0.0, 1000 * (time.perf_counter() - t_change) - in_setup),
                                    stacked=len(new), kept=len(keep))
                            # rows that came in (joiners, and preempted rows back) did not wait this gap
                            gap.joined(len(firsts_new) + sum(len(sw.seqs) for sw in resumed))
                        for k, (t_k, e_k) in enumerate(firsts_new):
                            yield from push(len(keep) + k, t_k, bool(e_k), set())
                        if all(s.done for s in seqs) and pending is None and held is None:
                            break   # (join_order fcfs: later joiners may still be prefilling)
                    if synced and not stepped:
                        logits = decoder.step(tok, next_pos)
                        next_pos = next_pos + 1
                        prime()
                        if gap is not None:
                            note_setup()
                    stepped = False
            finally:
                if lag:
                    sync(self.device)  # a queued step may still write the cache
                decoder.close()

    def _sample(self, logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> torch.Tensor:
        """The next tokens; under tensor parallel a sampled draw is rank 0's on every rank (greedy
        needs no collective: every rank has the same logits)."""
        tok = _sample(logits, params, gen)
        return tok if params.temperature == 0 else agree(tok, self.tp_size)

    def joins_running(self, req: Request) -> bool:
        """Whether a running batch of ``req``'s kind may change its rows at decode-step boundaries
        (requests join, finished rows leave): a method whose state after the prefill is only its kept
        KV (:meth:`KVMethod.joins_rows <kvsift.methods.base.KVMethod.joins_rows>`: ``full``, the
        prefill eviction methods; each joining request is prefilled on its own, so it gets exactly
        what it gets alone), no reused context or one read by reference
        (``ModelRunner.shares_context``: the rows' own tokens are stacked, the context stays one
        shared copy). Any decode mode: a change of rows closes the step runner and starts one over
        the new cache (static buffers again; in graph mode its steps are recorded again, one warm-up
        step per kind first); over the runner's KV arenas (``kv_arena``, ``full``) the rows are read
        from the arena the steps wrote, and the new batch is loaded into the arena of its shape,
        whose recorded graphs it replays (no recording when the batch bucket and the capacity
        bucket stay). A method that evicts
        while decoding (streaming, tova, h2o) joins where every row holds exactly its budget
        (:func:`~kvsift.engine.scheduler.at_budget`): such rows evict in lockstep."""
        return (req.kind == "generate" and (req.context is None or self.runner.shares_context(req.method, req.context))
                and (req.method.joins_rows() or at_budget(req)))

    def _prefill_joining(self, new: list[Request], method: KVMethod, run: Run, reserve: int,
                         progress: bool | None, alone: Callable[[], bool] | None = None, fcfs: bool = False):
        """Prefill the requests ``new`` that join a running batch, as a generator that yields after
        every prefill chunk (the caller decodes its running batch in between, so a long prompt
        does not stall it). ``full``'s requests are prefilled as one batch (left padding is exact
        for it); a compressing method's one request at a time, each with its own run (its budget
        resolved against its own prompt), as it would run alone; prompts of very different lengths
        go in separate padded batches (:func:`_length_groups`), not padding a short one to a long
        one. Stops at a chunk boundary with
        :class:`PrefillCancelled` once every one of them is cancelled. ``alone()``: true once no
        running row waits for them (a narrow ``join_chunk_size`` then widens to the chunk size).
        Returns ``(parts, per_req)``: ``parts`` one ``(cache, ctx, logits, rows)`` per prefill,
        ``per_req[r] = (stats, rows of its prefill, method, run)``.

        ``fcfs`` (``join_order``): one request at a time whatever the method, in the order of
        ``new``; each prefill but the last is yielded as ``(requests, parts, per_req)`` of its own
        as soon as it ends (the caller stacks it while the next one prefills), and the return value
        holds the last one's only. A request whose client leaves during its own prefill stops there
        and is yielded as ``(requests, None, None)``, one whose prefill raises as ``(requests, None,
        exception)``; the next one goes on."""
        runner = self.runner
        context = new[0].context
        if method.pads_exactly() and not fcfs:   # padded batches of similar lengths
            groups = [(g, run, method) for g in _length_groups(new)]
        else:
            groups = [([r], r.run if r.run is not None else r.method.start(r.base + r.longest, self.info.num_layers),
                       r.method) for r in new]
        gone = ((lambda: all(r.cancel() for r in new)) if all(r.cancel is not None for r in new) else None)
        parts, per_req = [], {}
        for k, (reqs, run_p, method_p) in enumerate(groups):
            ids_p = [p for r in reqs for p in r.prompts]
            width = self.join_chunk_size if method_p.chunk_invariant() else None
            if fcfs:   # this request's own client
                gone = reqs[0].cancel
            try:
                cache_p, stats_p, (ctx_p, logits_p) = yield from runner.prefill_steps(
                    ids_p, method_p, run_p, context, progress, reserve=reserve, cancel=gone, width=width,
                    alone=alone)
            except PrefillCancelled:
                if not fcfs:
                    raise
                yield reqs, None, None
                continue
            except Exception as e:  # noqa: BLE001 - fcfs: this joiner fails, the next one goes on
                if not fcfs:
                    raise
                _release_memory(self.device, e)
                yield reqs, None, e
                continue
            part = (cache_p, ctx_p, logits_p, len(ids_p))
            mine = {r: (stats_p, len(ids_p), method_p, run_p) for r in reqs}
            if fcfs:
                if k + 1 < len(groups):
                    yield reqs, [part], mine
                    continue
                return [part], mine
            parts.append(part)
            per_req.update(mine)
            if k + 1 < len(groups):
                yield
        return parts, per_req

    def _preempt(self, memory: Scheduler, ctx: ForwardContext, requests: list[Request], seqs: list["_Seq"],
                 owners: list, covered: dict, swapped: list["_Swapped"], tok: torch.Tensor,
                 next_pos: torch.Tensor) -> set[int]:
        """At a decode-step boundary: charge each running preemptible request for ``headroom`` more
        decode tokens once it has used what it was charged for; where that does not fit, swap the
        newest preemptible request's running rows out to host memory (appended to ``swapped``)
        until it does, or until the request itself was swapped out. Returns the rows that leave.
        A request alone with nothing to preempt goes on past its charge."""
        live = [r for r in requests if covered.get(r, math.inf) != math.inf
                and any(o[0] is r and not seqs[i].done for i, o in enumerate(owners))]
        out: set[int] = set()
        gone: set = set()
        for r in list(live):
            if r in gone:
                continue
            steps = max(seqs[i].steps for i, o in enumerate(owners) if o[0] is r)
            if steps + 1 <= covered[r]:
                continue
            while not memory.ensure(r, steps + memory.headroom):
                victims = [v for v in live if v not in gone]
                if len(victims) < 2:  # nothing else to preempt: it runs past its charge
                    break
                v = victims[-1]
                idx = [i for i, o in enumerate(owners) if o[0] is v and not seqs[i].done]
                made = max(seqs[i].steps for i in idx)
                swapped.append(_Swapped(v, _rows_to_host(ctx.cache, idx, self.device.type == "cuda"),
                                        [seqs[i] for i in idx], [owners[i] for i in idx], tok[idx].cpu(),
                                        next_pos[idx].cpu(),
                                        [ctx.prompt_ids[i] for i in idx] if ctx.prompt_ids is not None else None,
                                        made))
                memory.swap_out(v, made)
                out.update(idx)
                gone.add(v)
                if v is r:
                    break
            else:
                covered[r] = steps + memory.headroom
        return out

    def _rebuild(self, ctx: ForwardContext, next_pos: torch.Tensor, keep: list[int], new: list[Request],
                 parts: list, run: Run, resumed: list["_Swapped"] | None = None, rows_from=None,
                 steps_left: int | None = None):
        """The running batch with only its rows ``keep`` plus the rows of ``new`` (prefilled by
        :meth:`_prefill_joining` into ``parts``): every row's used slots (its own positions; slots
        no head uses dropped) are stacked into a new cache, shorter rows padded with position -1,
        compact per-head rows (``layer.ragged``) into one compact store. Returns the new batch's
        context and the new rows' first logits and next positions (None without ``new``). Over a
        context read by reference (one batch's requests share it) only the rows' own tokens are
        stacked; every row of the new batch reads the context's one copy. ``rows_from``: the cache the
        steps wrote when it is not the batch's own (the runner's KV arena, see :class:`KVArena
        <kvsift.engine.graphs.KVArena>`): the running rows are read there, the batch's own (stale)
        cache is freed, the arena stays the runner's; the next decoder loads the new batch into an
        arena of its shape and replays the graphs recorded there. When the new batch stays in that
        arena's bucket and fits its capacity for ``steps_left`` more steps, its rows change in place
        instead (:meth:`KVArena.restack <kvsift.engine.graphs.KVArena.restack>`: rows that stay are
        not copied, joiners' rows are copied once) and the arena's cache becomes the batch's."""
        method = ctx.method
        old = ctx.cache
        src = rows_from if rows_from is not None else old
        arena = self.runner.arena_of(src) if rows_from is not None else None
        ids = [p for r in new for p in r.prompts]
        prompts = ([ctx.prompt_ids[i] for i in keep] + ids + [p for sw in resumed or () for p in sw.prompts]
                   if ctx.prompt_ids is not None and all(sw.prompts is not None for sw in resumed or ()) else None)
        joined = None
        if parts:
            joined = _Joined(torch.cat([lg for _, _, lg, _ in parts]), torch.cat([c.next_pos for _, c, _, _ in parts]))
        if arena is not None and not resumed and steps_left is not None:
            in_place = self._restack_arena(arena, ctx, next_pos, keep, parts, run, prompts, steps_left)
            if in_place is not None:
                return in_place, joined
        if not keep and len(parts) == 1 and not resumed and old.layers[0].prefix is None \
                and parts[0][0].layers[0].prefix is None:
            return self._adopt(ctx, parts[0], run)
        room = max([old.reserve] + [c.reserve for c, _, _, _ in parts])
        merged = SiftCache(self.info.num_layers, reserve=room)
        sources = [(src, i) for i in keep] + [(c, i) for c, _, _, n in parts for i in range(n)]
        back = [row for sw in resumed or () for row in sw.rows]  # preempted rows coming back, on the host
        with torch.inference_mode():
            for li, lm in enumerate(merged.layers):
                shared = old.layers[li].prefix or next(
                    (c.layers[li].prefix for c, _, _, _ in parts if c.layers[li].prefix is not None), None)
                lm.set_rows([_row_kv(cache.layers[li], i) for cache, i in sources]
                            + [_row_to(row[li], self.device) for row in back])
                method.restack_state(lm, [(cache.layers[li], i) for cache, i in sources])
                if shared is not None:  # the context, one copy for the new batch's rows
                    lm.prefix = tuple(shared_rows(t, len(sources)) for t in shared)
                # this layer's old buffers go now, not after the last layer: the batch's KV is held
                # about once (plus a layer) while it is rebuilt, not twice (an arena's stay the runner's)
                if self.runner.arena_of(old) is None:
                    old.layers[li].reset()
                for c, _, _, _ in parts:
                    c.layers[li].reset()
        merged.seen = max([src.seen] + [c.seen for c, _, _, _ in parts])
        pos = [next_pos[keep]] + [c.next_pos for _, c, _, _ in parts] + [sw.next_pos.to(self.device)
                                                                           for sw in resumed or ()]
        merged_ctx = self._batch_ctx(ctx, merged, run, True, prompts, torch.cat(pos))
        return merged_ctx, joined

    def _restack_arena(self, arena, ctx: ForwardContext, next_pos: torch.Tensor, keep: list[int], parts: list,
                       run: Run, prompts, steps_left: int):
        """:meth:`_rebuild` in place in ``arena`` (the running batch decodes there), or None (nothing
        done) when the new batch would leave its bucket, a joining row is longer than the slots
        written so far or is not plain dense KV, or the arena lacks room for ``steps_left`` steps."""
        n_new = len(keep) + sum(n for _, _, _, n in parts)
        if self.runner.graphs.bucket(n_new) != arena.bucket:
            return None   # a smaller (or larger) bucket: its own arena, not this one's padding rows
        if any(ly.ragged is not None or ly.quant is not None or ly.state or ly.prefix is not None or ly.k_buf is None
               for c, _, _, _ in parts for ly in c.layers):
            return None
        w = arena.write_slot()
        if w + steps_left + 1 > arena.capacity:
            return None
        with torch.inference_mode():
            rows = [[_row_kv(c.layers[li], i) for li in range(self.info.num_layers)]
                    for c, _, _, n in parts for i in range(n)]
            if any(r[0][0].shape[2] > w for r in rows):
                return None
            arena.restack(keep, rows, next_pos.shape[0], w)
            self.runner.arena_restacks += 1
            if ctx.cache is not arena.cache:   # the batch's own copy, stale since the arena decodes
                for layer in ctx.cache.layers:
                    layer.reset()
            for c, _, _, _ in parts:
                for layer in c.layers:
                    layer.reset()
        arena.cache.seen = max([arena.cache.seen] + [c.seen for c, _, _, _ in parts])
        pos = torch.cat([next_pos[keep]] + [c.next_pos for _, c, _, _ in parts])
        return self._batch_ctx(ctx, arena.cache, run, True, prompts, pos)


    def _adopt(self, ctx: ForwardContext, part: tuple, run: Run):
        """:meth:`_rebuild` when no running row stays and one prefill joins (the running rows
        finished while a burst of prompts was prefilled): that prefill's own cache becomes the
        batch, as in a generation of those prompts alone; no row is copied."""
        cache, ctx_p, logits, _ = part
        with torch.inference_mode():
            if self.runner.arena_of(ctx.cache) is None:   # (an arena's buffers stay the runner's)
                for layer in ctx.cache.layers:
                    layer.reset()
        merged_ctx = self._batch_ctx(ctx, cache, run, ctx_p.has_padding, ctx_p.prompt_ids, ctx_p.next_pos)
        return merged_ctx, _Joined(logits, ctx_p.next_pos)

    def _batch_ctx(self, ctx: ForwardContext, cache, run: Run, has_padding: bool, prompt_ids, next_pos):
        """The running batch's context over its new ``cache`` (rows changed), decoding on from
        ``ctx``'s step."""
        out = ForwardContext(cache=cache, method=ctx.method, run=run, has_padding=has_padding, prompt_ids=prompt_ids,
                             tokenizer=self.tokenizer, next_pos=next_pos, rope=self.runner.rope)
        out.decoding, out.step = True, ctx.step
        return out


@dataclass(slots=True)
class _Swapped:
    """A preempted request's running rows, off the batch: per row and layer its KV as
    :func:`_row_kv` gives it, copied to host memory; its sequences' state, the tokens sampled for
    them but not yet fed, their next positions and prompts, and the decode tokens per row made."""

    req: Request
    rows: list[list]
    seqs: list["_Seq"]
    owners: list[tuple[Request, int]]
    tok: torch.Tensor
    next_pos: torch.Tensor
    prompts: list[list[int]] | None
    tokens: int


def _rows_to_host(cache: SiftCache, idx: list[int], pin: bool) -> list[list]:
    """Rows ``idx`` of ``cache``, per row a list over layers of :func:`_row_kv`'s tuple (a quantized
    layer's row: its :meth:`QuantKV.tensors <kvsift.cache.quant.QuantKV.tensors>`), copied to host
    memory (pinned when ``pin``)."""
    def host(t: torch.Tensor) -> torch.Tensor:
        if not pin:
            return t.to("cpu", copy=True)
        # page-locked, from the host pool for large rows (their locked bytes count against its limit
        # with the offloaded KV's, and are reused by the next swap or offload)
        return pinned_empty(tuple(t.shape), t.dtype, t.device).copy_(t)

    def row_host(row):
        if isinstance(row, QuantKV):   # a quantized row: its used codes, scales, window and positions
            return {n: t if n == "meta" else host(t) for n, t in row.tensors().items()}
        k, v, p, rag = row
        return host(k), host(v), host(p), None if rag is None else rag.to("cpu")

    with torch.inference_mode():
        return [[row_host(_row_kv(layer, i)) for layer in cache.layers] for i in idx]


def _row_to(row: "tuple | dict", device: torch.device) -> "tuple | QuantKV":
    if isinstance(row, dict):   # a quantized row's tensors (:func:`_rows_to_host`)
        return QuantKV.from_tensors(row, device=device)
    k, v, p, rag = row
    return (k.to(device, non_blocking=True), v.to(device, non_blocking=True), p.to(device, non_blocking=True),
            None if rag is None else rag.to(device))


def _row_kv(layer, i: int) -> tuple:
    """Row ``i`` of a running batch's ``layer`` as :meth:`SiftLayer.set_rows` stacks it: its dense
    slots that some KV head uses (left padding and slots every head evicted dropped; a head's own
    holes stay, masked by position -1), or its compact per-head store (``layer.ragged``), or its
    quantized store alone (``layer.quant``: :meth:`QuantKV.row <kvsift.cache.quant.QuantKV.row>`)."""
    if layer.quant is not None:
        return layer.quant.row(i)
    if layer.ragged is not None:
        if layer.length:
            raise RuntimeError("a layer holds both compact per-head KV and buffered KV")
        e = slice(0, 0)
        return (layer.keys[i:i + 1, :, e], layer.values[i:i + 1, :, e], layer.positions[i:i + 1, :, e],
                layer.ragged.rows([i]))
    # during static decode (and in a KV arena) the steps write at the device slot ``wslot``; the
    # host-side ``length`` catches up only at ``end_static``, so read up to the slot (one sync)
    n = int(layer.wslot) if layer.wslot is not None else layer.length
    pos = layer.pos_buf[i:i + 1, :, :n]
    real = (pos[0] >= 0).any(0)
    return (layer.k_buf[i:i + 1, :, :n][:, :, real], layer.v_buf[i:i + 1, :, :n][:, :, real], pos[:, :, real], None)


def _as_batch(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if isinstance(prompts, Sequence) and len(prompts) > 0:
        return list(prompts)
    raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")


def _states_ready(parts: list) -> bool:
    """Whether the method state in the caches of joining ``parts`` (``(cache, ctx, logits, rows)``
    from :meth:`LLM._prefill_joining`) can be stacked without waiting (:meth:`LayerState.ready
    <kvsift.methods.base.LayerState.ready>`: no asynchronous write of it still in flight)."""
    return all(st.ready() for cache, *_ in parts for ly in cache.layers for st in ly.state.values()
               if hasattr(st, "ready"))


def _hold_eos(logits: torch.Tensor, seqs: list["_Seq"], eos: torch.Tensor | None) -> torch.Tensor:
    """``logits (batch, vocab)`` with the end-of-sequence tokens at ``-inf`` in the rows of sequences
    that have not yet made their ``min_tokens`` (``seqs[i]`` owns row ``i``); unchanged (no copy)
    when none is held."""
    if eos is None:
        return logits
    rows = [i for i, s in enumerate(seqs) if not s.done and s.steps < s.params.min_tokens]
    if not rows:
        return logits
    held = torch.zeros(logits.shape[0], 1, dtype=torch.bool, device=logits.device)
    held[rows] = True
    hit = torch.zeros(1, logits.shape[1], dtype=torch.bool, device=logits.device)
    hit[0, eos] = True
    return logits.masked_fill(held & hit, float("-inf"))


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """``logits (batch, vocab)`` -> token ids ``(batch,)``: greedy, or temperature + top-p."""
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > p.top_p  # keep the smallest prefix with mass >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _release_memory(device: torch.device, exc: BaseException) -> None:
    """After a failed joining prefill: its partial KV is garbage now; on CUDA, out of memory, hand
    the cached blocks back so the running batch's next steps find room."""
    if device.type == "cuda" and isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _check_join_chunk_size(n) -> int | None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 16):
        raise ValueError(f"join_chunk_size must be None (the prefill chunk size) or an int >= 16 tokens, got {n!r}")
    return n


JOIN_ORDERS = ("together", "fcfs", "shortest")
PAD_RATIO = 1.5   # a padded joining batch's longest prompt over its shortest, at most


def _length_groups(reqs: list[Request]) -> list[list[Request]]:
    """``reqs`` (of a method that pads exactly) as the padded batches they are prefilled in when
    they join together: by prompt length, a new batch wherever a prompt is more than
    :data:`PAD_RATIO` times the batch's shortest, so that a short question joining beside a long
    document is not padded to the document's length (at most about a third of a batch's tokens
    are padding). Requests of one length stay one batch, in arrival order."""
    groups: list[list[Request]] = []
    for r in sorted(reqs, key=lambda r: r.longest):
        if groups and r.longest <= PAD_RATIO * groups[-1][0].longest:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _check_join_order(order) -> str:
    if order not in JOIN_ORDERS:
        raise ValueError(f"join_order must be one of {', '.join(JOIN_ORDERS)}, got {order!r}")
    return order


def _check_join_chunks(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"join_chunks must be an int >= 0 (0: a joining prompt's whole prefill at once), got {n!r}")
    return n


def _failed_events(r: Request, e: BaseException):
    """The event of a request whose prefill raised ``e``: it ends, finished, with the error."""
    r.finished = True
    yield r, StreamEvent(0, "", None, finished=True, error=e)


def _cancelled_events(r: Request):
    """The events of a request cancelled before its first token: each of its sequences ends,
    ``"cancelled"``, with no token (the last one marks the request finished)."""
    for j in range(r.rows):
        r.finished = j == r.rows - 1
        st = GenerationStats(method=r.method.spec, budget=r.method.budget, prompt_tokens=len(r.prompts[j]))
        yield r, StreamEvent(j, "", None, True, RequestOutput("", [], r.prompts[j], "cancelled", st))


class _OfflineJoin:
    """:meth:`LLM.generate_requests`'s ``join`` for :meth:`LLM.run_batch`: its scheduler's waiting
    requests that may join, ``idle()`` once none waits, and ``waiting_tokens()`` the shortest
    waiting prompt."""

    __slots__ = ("sched",)

    def __init__(self, sched: Scheduler):
        self.sched = sched

    def __call__(self, running: list[Request], rows: int) -> list[Request]:
        return self.sched.join(running, rows)

    def idle(self) -> bool:
        return not self.sched.waiting

    def waiting_tokens(self) -> int | None:
        return self.sched.shortest_waiting()


@dataclass(slots=True)
class _Joined:
    """The first logits and next positions of requests that joined a running batch."""

    logits: torch.Tensor
    next_pos: torch.Tensor


class _Seq:
    """Per-sequence detokenization, stop strings and finish state (``limit``: its most new tokens;
    ``steps``: tokens pushed so far)."""

    def __init__(self, index: int, llm: LLM, params: SamplingParams, limit: int | None = None):
        self.index, self.llm, self.params = index, llm, params
        self.limit = params.max_tokens if limit is None else limit
        self.steps = 0
        self.ids: list[int] = []
        self.text, self.emitted, self.done, self.reason = "", 0, False, "length"
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def push(self, tok: int, is_eos: bool, last: bool, reason: str | None) -> StreamEvent:
        self.steps += 1
        appended = None
        if reason is not None:
            self.done, self.reason = True, reason
        elif is_eos:
            self.done, self.reason = True, "stop"
        else:
            self.ids.append(tok)
            appended = tok
            text = self.llm.decode(self.ids)
            cut = min((i for i in (text.find(s) for s in self.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, self.done, self.reason = text[:cut], True, "stop"
            elif last:
                self.done, self.reason = True, "length"
            self.text = text
        safe = len(self.text) if self.done else len(self.text) - self.hold
        if not self.done:
            while safe > self.emitted and self.text[safe - 1] == "\ufffd":
                safe -= 1
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted += len(delta)
        return StreamEvent(self.index, delta, appended, finished=self.done)


def _copy_stats(stats: GenerationStats, cache: SiftCache, method: KVMethod, run: Run, n_gen: int, steps: int,
                decode_s: float, share: tuple[int, int] = (1, 1), end_share: tuple[int, int] | None = None,
                waited: float = 0.0):
    """One sequence's stats; ``share = (rows, batch)``: its request's part of the prefill's batch,
    ``end_share`` of the batch at its end (the KV bytes of a batch shared with other requests are
    split by rows); ``waited``: seconds of ``decode_s`` spent on joining requests' prefills."""
    mem = cache.memory()

    def part(n: int, sh: tuple[int, int] = share) -> int:
        rows, b = sh
        return n if rows == b else n * rows // b

    def end(n: int) -> int:
        return part(n, end_share or share)

    return GenerationStats(method=stats.method, budget=stats.budget, prompt_tokens=stats.prompt_tokens,
                           decode_mode=stats.decode_mode, decode_setup_s=stats.decode_setup_s,
                           decode_setup_steps=stats.decode_setup_steps, prefill_rows=share[1],
                           batch_rows=(end_share or share)[1], decode_wait_s=waited, generated_tokens=n_gen,
                           decode_steps=steps, prefill_s=stats.prefill_s, decode_s=decode_s,
                           kv_device_bytes=part(stats.kv_device_bytes), kv_host_bytes=part(stats.kv_host_bytes),
                           kv_kept_bytes=part(stats.kv_kept_bytes), kv_full_bytes=part(stats.kv_full_bytes),
                           kv_device_bytes_end=end(mem["device"]), kv_host_bytes_end=end(mem["host"]),
                           method_stats=method.stats(run))
