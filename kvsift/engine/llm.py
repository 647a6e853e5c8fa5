"""The generation engine: our own chunked-prefill / decode loop over a transformers model.

    llm = LLM()                                          # the default model (qwen2.5-coder-0.5b)
    out = llm.generate("…long document… Question?", SamplingParams(max_tokens=64), method="snapkv", budget=512)
    print(out[0].text, out[0].stats.summary())
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvsift.cache import SiftCache
from kvsift.engine.attention import (ForwardContext, forward_context, model_configs, rope_function,
                                     use_kvsift_attention)
from kvsift.engine.decode import DecodeRunner, check_decode_mode, pick_decode_mode
from kvsift.engine.params import GenerationStats, RequestOutput, SamplingParams, StreamEvent
from kvsift.methods import KVMethod, build_method
from kvsift.methods.base import Budget, Run
from kvsift.models.loader import ModelInfo, load_model, model_info

Prompt = str | Sequence[int]

DEFAULT_CHUNK = 512
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


class LLM:
    """A model plus kvsift's generation loop. ``model``: None (the default model), a named model
    (``kvsift models``, e.g. ``'smollm2'``), an HF directory or a ``.gguf`` file. ``chunk_size``:
    prefill chunk length (bounds activation memory); None: 512, and on CPU a first chunk of up to
    :data:`CPU_FIRST_CHUNK` tokens for a fresh prompt.
    ``decode_mode``: ``auto`` (CUDA graphs on CUDA where the method allows, else eager), ``eager``,
    ``static`` or ``graph`` (see :mod:`kvsift.engine.decode`). ``prefill_mode``: ``rows`` prefills a
    batch one sequence at a time, each compressed (and offloaded) before the next starts, so only
    one sequence's full KV is ever on the device; ``batch`` prefills all rows together; ``auto``:
    rows when the method shrinks the KV at prefill end (``row_prefill_ok``), else batch."""

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 chunk_size: int | None = None, decode_mode: str = "auto", prefill_mode: str = "auto"):
        check_decode_mode(decode_mode)
        _check_prefill_mode(prefill_mode)
        mdl, tok, info = load_model(model, device, dtype)
        self._init(mdl, tok, info, chunk_size, decode_mode, prefill_mode)

    @classmethod
    def from_model(cls, model, tokenizer, name: str = "model", chunk_size: int | None = None,
                   decode_mode: str = "auto", prefill_mode: str = "auto") -> "LLM":
        """Wrap an already loaded transformers model (e.g. a tiny random one in tests)."""
        self = cls.__new__(cls)
        self._init(model.eval(), tokenizer, model_info(model, tokenizer, name), chunk_size, decode_mode,
                   prefill_mode)
        return self

    def _init(self, model, tokenizer, info: ModelInfo, chunk_size: int | None, decode_mode: str = "auto",
              prefill_mode: str = "auto"):
        self.first_chunk = None  # a longer first prefill chunk (CPU, default chunking)
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK
            if info.device.type == "cpu":
                self.first_chunk = CPU_FIRST_CHUNK
        if chunk_size < 16:
            raise ValueError(f"chunk_size must be >= 16, got {chunk_size}")
        self.decode_mode = check_decode_mode(decode_mode)
        self.prefill_mode = _check_prefill_mode(prefill_mode)
        if decode_mode == "graph" and info.device.type != "cuda":
            raise ValueError(f"decode_mode='graph' needs a CUDA device, this model is on {info.device} "
                             f"(use 'static' or 'eager')")
        self.model, self.tokenizer, self.info, self.chunk_size = model, tokenizer, info, chunk_size
        self.device = info.device
        self._configs = model_configs(model)
        self._rope = rope_function(model)  # ForwardContext.rope: methods that move queries between positions
        # the cache argument's name: ``cache`` from transformers 5.x (``past_key_values`` is deprecated
        # there, removed in 5.40), ``past_key_values`` before
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.lock = threading.Lock()  # one forward at a time per model
        eos = set()
        for src in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(src)
        self.eos_ids = sorted(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

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
        batch = _as_batch(prompts)
        ids = [self.encode(p, chat) for p in batch]
        if method is None and context is not None and context.needs_planner:
            method, budget = context.method, context.budget if budget is None else budget
            method_kwargs = context.method_kwargs if method_kwargs is None else method_kwargs
        m = build_method(method or "full", budget, **(method_kwargs or {}))
        m.check_model(self.info)  # per-model method data (minference's patterns) fits
        base = context.length if context is not None else 0
        longest = max(len(x) for x in ids)
        self.check_length(base + longest, "prompt")
        run = m.start(base + longest, self.info.num_layers)
        return self._run(ids, params, m, run, context, progress, cancel)

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
        with self.lock:
            cache, stats, _ = self._prefill([ids], m, run, None, progress)
        stats.method_stats = m.stats(run)  # e.g. kvzip's reread passes
        # a method instance carries its own budget (its options: pass method_kwargs, or set them on the
        # context, so that answers that must re-build the method, e.g. sentencekv's, get them)
        return Context(cache=cache, token_ids=ids, method=_spec(m), budget=m.budget if budget is None else budget,
                       stats=stats, method_kwargs=dict(method_kwargs or {}))

    def score(self, context: Prompt, continuation: Sequence[int], *, method: str | KVMethod | None = None,
              budget: Budget = None, method_kwargs: dict | None = None) -> tuple[float, GenerationStats]:
        """Teacher-forced log-likelihood over the compressed cache (long-text perplexity).

        ``context`` is prefilled (and compressed) by ``method``; then ``continuation`` is fed one
        token per decode step, so decode-time selection and rolling eviction act as in generation.
        Returns ``(sum of -log p(continuation[i] | context, continuation[:i]), stats)``."""
        ctx_ids = self.encode(context, chat=False)
        cont = [int(t) for t in continuation]
        if not cont:
            raise ValueError("score needs a non-empty continuation")
        total = len(ctx_ids) + len(cont)
        if total > self.info.max_positions:
            raise ValueError(f"context + continuation = {total} tokens exceeds the model's limit of "
                             f"{self.info.max_positions}")
        m = build_method(method or "full", budget, **(method_kwargs or {}))
        m.check_model(self.info)  # per-model method data (minference's patterns) fits
        run = m.start(len(ctx_ids), self.info.num_layers)
        nll = 0.0
        with self.lock:
            cache, stats, (ctx, logits) = self._prefill([ctx_ids], m, run, None, False, reserve=len(cont) + 1)
            ctx.decoding = True
            next_pos = ctx.next_pos
            targets = torch.tensor(cont, device=self.device)
            t0 = time.perf_counter()
            for i in range(len(cont)):
                nll -= float(torch.log_softmax(logits[0], dim=-1)[targets[i]])
                if i == len(cont) - 1:
                    break
                ctx.step = i
                logits = self._forward(ctx, targets[i].view(1, 1), next_pos[:, None])
                next_pos = next_pos + 1
            decode_s = time.perf_counter() - t0
        return nll, _copy_stats(stats, cache, m, run, len(cont), len(cont) - 1, decode_s)

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

    # ---- the loop ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _forward_mode(self, ctx: ForwardContext):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.device.type == "cuda":
                # cuDNN's SDPA rebuilds its plan for every new KV length (measured: 57 vs 11 ms/token
                # decode on an H100); the flash / memory-efficient kernels do not
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.MATH]))
            stack.enter_context(use_kvsift_attention(self.model, self._configs))
            stack.enter_context(forward_context(ctx))
            yield

    def _forward(self, ctx: ForwardContext, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One model call over ``input_ids (batch, q)`` at ``positions (batch, q)``; returns the
        last logits ``(batch, vocab)`` in fp32."""
        ctx.cache.step_positions = positions.to(torch.int32)
        ctx.input_ids = input_ids  # token ids in flight (sentencekv resets its query fingerprint)
        with self._forward_mode(ctx):
            out = self.model(input_ids=input_ids, position_ids=positions.clamp(min=0), **{self._cache_kw: ctx.cache},
                             use_cache=True, logits_to_keep=1)
        ctx.cache.seen += input_ids.shape[1]
        return out.logits[:, -1].float()

    def _prefill(self, ids: list[list[int]], method: KVMethod, run: Run, context: Context | None,
                 progress: bool | None, reserve: int = 0):
        # each fresh sequence's reread passes, asked once (methods may count them); none for a context
        passes = [method.reread_passes(run, x, self.tokenizer) for x in ids] if context is None else [[] for _ in ids]
        rereads = any(passes)
        rows = len(ids) > 1 and context is None and (
            self.prefill_mode == "rows" or (self.prefill_mode == "auto" and method.row_prefill_ok()) or rereads)
        if rows:
            return self._prefill_rows(ids, method, run, progress, reserve, passes)
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
            cache = context.cache.clone(batch_repeat=b)
            cache.reserve = reserve
        else:
            cache = SiftCache(self.info.num_layers, capacity_hint=L + reserve + _longest(passes[0]), reserve=reserve)
        ctx = ForwardContext(cache=cache, method=method, run=run, has_padding=bool((~valid).any()),
                             prompt_ids=ids, tokenizer=self.tokenizer,  # sentencekv segments the prompt
                             rope=self._rope, model_name=self.info.name)
        bounds = self._chunk_bounds(L, method, fresh=context is None and not ctx.has_padding)
        bar = self._prefill_bar(progress, L, len(bounds), f"prefill {L} tokens")
        t0 = time.perf_counter()
        logits = None
        try:
            for s, e in bounds:
                ctx.prefill_end = e == L
                logits = self._forward(ctx, tokens[:, s:e], pos[:, s:e])
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if context is None:  # a batch here has no reread passes (those go row by row)
            self._finish_prefill(ctx, method, run, passes[0])
        ctx.next_pos = pos[:, -1] + 1
        return self._prefilled(ctx, method, base + L, t0, logits)

    def _finish_prefill(self, ctx: ForwardContext, method: KVMethod, run: Run, passes: list[list[int]]) -> None:
        """After a fresh prompt's prefill (one sequence, or a batch without reread passes): run the
        method's reread ``passes`` (from ``method.reread_passes``), each at the positions after the
        prompt, attending to the prompt's KV through the prefill path and then dropped from the cache;
        ``ctx.reread_s`` is their time; then the method's deferred compression (``finish_prefill``).
        The cache reserved room for the longest pass (no buffer growth while they run); layers that
        keep more than they need afterwards (nothing evicted) are shrunk back."""
        cache = ctx.cache
        ctx.reread_s = 0.0
        with torch.inference_mode():  # the cache's tensors are inference tensors: edit them in the mode
            if passes:
                _sync(self.device)
                t0 = time.perf_counter()
                seen, lengths = cache.seen, [ly.length for ly in cache.layers]
                ctx.prefill_end, ctx.rereading = False, True
                try:
                    for p in passes:
                        toks = torch.tensor([p], dtype=torch.long, device=self.device)
                        pos = torch.arange(seen, seen + len(p), device=self.device)[None]
                        for s, e in _chunks(len(p), self.chunk_size, 0):
                            self._forward(ctx, toks[:, s:e], pos[:, s:e])
                        for ly, n in zip(cache.layers, lengths):
                            ly.truncate(n)
                        cache.seen = seen
                finally:
                    ctx.rereading = False
                _sync(self.device)
                ctx.reread_s = time.perf_counter() - t0
            method.finish_prefill(run, cache.layers, ctx)
            if passes and ctx.row is None:  # (rows are copied into the batch cache anyway)
                for ly in cache.layers:  # the room reserved for the passes: not kept for decode
                    if ly.k_buf is not None and ly.k_buf.shape[2] > ly.length + cache.reserve:
                        ly.set_kv(ly.keys, ly.values, ly.positions)

    def _chunk_bounds(self, n: int, method: KVMethod, fresh: bool = True) -> list[tuple[int, int]]:
        """Prefill chunks of a prompt of ``n`` tokens (the last one long enough for the method).
        ``fresh``: nothing cached before and no padding, so a longer first chunk needs no mask."""
        chunk = max(self.chunk_size, method.min_last_chunk())
        first = max(chunk, min(n, self.first_chunk)) if fresh and self.first_chunk else chunk
        return _chunks(n, chunk, method.min_last_chunk(), first)

    def _prefill_bar(self, progress: bool | None, L: int, total: int, desc: str):
        """A tqdm bar over ``total`` prefill chunks, or None (default: shown for long prompts)."""
        if not (progress if progress is not None else L >= 8 * self.chunk_size):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="chunk", leave=False)

    def _prefilled(self, ctx: ForwardContext, method: KVMethod, tokens: int, t0: float, logits):
        """Prefill stats of ``ctx.cache`` (``tokens``: logical length incl. a reused context)."""
        _sync(self.device)
        cache = ctx.cache
        b = ctx.next_pos.shape[0]
        mem = cache.memory()
        stats = GenerationStats(method=_spec(method), budget=method.budget,
                                prompt_tokens=max(len(x) for x in ctx.prompt_ids),
                                prefill_s=time.perf_counter() - t0, kv_device_bytes=mem["device"],
                                kv_host_bytes=mem["host"], kv_kept_bytes=mem["device_used"],
                                kv_full_bytes=_full_bytes(self.info, b, tokens))
        ctx.prefill_end = False
        return cache, stats, (ctx, logits)

    def _prefill_rows(self, ids: list[list[int]], method: KVMethod, run: Run, progress: bool | None, reserve: int,
                      passes: list[list[list[int]]]):
        """Prefill one sequence at a time: each row's full KV is on the device only while that row
        runs; at its end the method compresses it (sentencekv writes the chunks into the batch's host
        store), then the rows' remaining device KV is stacked into one batch cache."""
        b, L, dev = len(ids), max(len(x) for x in ids), self.device
        cache = SiftCache(self.info.num_layers, capacity_hint=L + reserve, reserve=reserve)
        row_states = [layer.state for layer in cache.layers]
        plans = [self._chunk_bounds(len(x), method) for x in ids]
        bar = self._prefill_bar(progress, L, sum(len(p) for p in plans), f"prefill {b} x {L} tokens")
        t0 = time.perf_counter()
        parts, logits = [], []
        try:
            for i, (row, plan) in enumerate(zip(ids, plans)):
                rc = SiftCache(self.info.num_layers, capacity_hint=len(row) + _longest(passes[i]), reserve=0)
                ctx = ForwardContext(cache=rc, method=method, run=run, prompt_ids=[row], tokenizer=self.tokenizer,
                                     row=(i, b), row_states=row_states, rope=self._rope, model_name=self.info.name)
                tokens = torch.tensor([row], dtype=torch.long, device=dev)
                pos = torch.arange(len(row), device=dev)[None]
                for s, e in plan:
                    ctx.prefill_end = e == len(row)
                    lg = self._forward(ctx, tokens[:, s:e], pos[:, s:e])
                    if bar is not None:
                        bar.update(1)
                self._finish_prefill(ctx, method, run, passes[i])
                logits.append(lg)
                parts.append([(ly.keys, ly.values, ly.positions, ly.ragged) if ly.k_buf is not None else None
                              for ly in rc.layers])
                del rc, ctx  # the row's buffers live on only through the kept (compressed) views
        finally:
            if bar is not None:
                bar.close()
        padded = any(len(x) < L for x in ids)
        for li, layer in enumerate(cache.layers):
            rows = [p[li] for p in parts]
            for p in parts:
                p[li] = None
            if all(r is not None for r in rows):
                padded |= layer.set_rows(rows)
        cache.seen = L
        ctx = ForwardContext(cache=cache, method=method, run=run, has_padding=padded, prompt_ids=ids,
                             tokenizer=self.tokenizer, next_pos=torch.tensor([len(x) for x in ids], device=dev),
                             rope=self._rope, model_name=self.info.name)
        return self._prefilled(ctx, method, L, t0, torch.cat(logits))

    def _run(self, ids: list[list[int]], params: SamplingParams, method: KVMethod, run: Run,
             context: Context | None, progress: bool | None,
             cancel: Callable[[], bool] | None) -> Iterator[StreamEvent]:
        b = len(ids)
        base = (context.length if context is not None else 0) + max(len(x) for x in ids)
        max_new = min(params.max_tokens, self.info.max_positions - base)
        mode = pick_decode_mode(self.decode_mode, method, self.device)  # bad KVSIFT_DECODE: error before compute
        with self.lock:
            cache, stats, (ctx, logits) = self._prefill(ids, method, run, context, progress, reserve=max_new + 1)
            ctx.decoding = True
            next_pos = ctx.next_pos
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed() % 2**63)
            seqs = [_Seq(i, self, params) for i in range(b)]
            eos = torch.tensor(self.eos_ids, device=self.device) if self.eos_ids and not params.ignore_eos else None
            # on CUDA the host reads step t's tokens while step t+1 already runs (no stall per step)
            lag = self.device.type == "cuda"
            host = torch.empty(2, b, dtype=torch.long, pin_memory=lag)
            ready = torch.cuda.Event() if lag else None
            runner = DecodeRunner(self, ctx, mode, max_new)
            stats.decode_mode = runner.mode
            t0 = time.perf_counter()
            try:
                for step in range(max_new):
                    last = step == max_new - 1
                    tok = _sample(logits, params, gen)
                    is_eos = torch.isin(tok, eos) if eos is not None else torch.zeros_like(tok, dtype=torch.bool)
                    if lag:
                        host.copy_(torch.stack((tok, is_eos.long())), non_blocking=True)
                        ready.record()
                        if not last:  # queue the next step before waiting for this one's tokens
                            logits = runner.step(tok, next_pos)
                            next_pos = next_pos + 1
                        ready.synchronize()
                        toks, eos_l = host.tolist()
                    else:
                        toks, eos_l = tok.tolist(), is_eos.tolist()
                    cancelled = cancel is not None and cancel()
                    for s in seqs:
                        if s.done:
                            continue
                        reason = "cancelled" if cancelled else None
                        ev = s.push(toks[s.index], bool(eos_l[s.index]), last, reason)
                        if ev.finished:
                            stats.decode_mode, stats.decode_setup_s = runner.mode, runner.setup_s
                            stats.decode_setup_steps = runner.setup_steps
                            stats_i = _copy_stats(stats, cache, method, run, len(s.ids), step,
                                                  time.perf_counter() - t0)
                            ev.output = RequestOutput(s.text, s.ids, ids[s.index], s.reason, stats_i)
                        if ev.text or ev.finished:
                            yield ev
                    if all(s.done for s in seqs):
                        break
                    if not lag:
                        logits = runner.step(tok, next_pos)
                        next_pos = next_pos + 1
            finally:
                if lag:
                    _sync(self.device)  # a queued step may still write the cache
                runner.close()


def _check_prefill_mode(mode: str) -> str:
    if mode not in ("auto", "batch", "rows"):
        raise ValueError(f"prefill_mode must be 'auto', 'batch' or 'rows', got {mode!r}")
    return mode


def _as_batch(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if isinstance(prompts, Sequence) and len(prompts) > 0:
        return list(prompts)
    raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")


def _chunks(L: int, chunk: int, min_last: int, first: int | None = None) -> list[tuple[int, int]]:
    """Prefill chunk bounds (``first`` tokens, then ``chunk`` each); the last chunk holds at least
    ``min_last`` tokens (e.g. SnapKV's window)."""
    first = first or chunk
    bounds = [(0, min(first, L))] + [(s, min(s + chunk, L)) for s in range(first, L, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        bounds[-2:] = [(bounds[-2][0], L)]
    return bounds


def _longest(passes: list[list[int]]) -> int:
    return max((len(p) for p in passes), default=0)


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


class _Seq:
    """Per-sequence detokenization, stop strings and finish state."""

    def __init__(self, index: int, llm: LLM, params: SamplingParams):
        self.index, self.llm, self.params = index, llm, params
        self.ids: list[int] = []
        self.text, self.emitted, self.done, self.reason = "", 0, False, "length"
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def push(self, tok: int, is_eos: bool, last: bool, reason: str | None) -> StreamEvent:
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


def _spec(m: KVMethod) -> str:
    return m.spec


def _full_bytes(info: ModelInfo, batch: int, tokens: int) -> int:
    elt = torch.tensor([], dtype=info.dtype).element_size()
    return 2 * info.num_layers * batch * info.num_kv_heads * tokens * info.head_dim * elt


def _copy_stats(stats: GenerationStats, cache: SiftCache, method: KVMethod, run: Run, n_gen: int, steps: int,
                decode_s: float):
    mem = cache.memory()
    return GenerationStats(method=stats.method, budget=stats.budget, prompt_tokens=stats.prompt_tokens,
                           decode_mode=stats.decode_mode, decode_setup_s=stats.decode_setup_s,
                           decode_setup_steps=stats.decode_setup_steps,
                           generated_tokens=n_gen, decode_steps=steps, prefill_s=stats.prefill_s, decode_s=decode_s,
                           kv_device_bytes=stats.kv_device_bytes, kv_host_bytes=stats.kv_host_bytes,
                           kv_kept_bytes=stats.kv_kept_bytes, kv_full_bytes=stats.kv_full_bytes,
                           kv_device_bytes_end=mem["device"], kv_host_bytes_end=mem["host"],
                           method_stats=method.stats(run))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
