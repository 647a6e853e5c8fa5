"""Benchmark runner: tasks x methods x budgets x context lengths x seeds -> JSONL, one row per cell.

A *cell* is ``(task, method, budget, length, seed)``; it runs all samples of that task for that
length and seed (e.g. every NIAH depth) and appends one JSON line with the mean score, the per-sample
results, KV bytes and timings. Reruns skip the cells already in the file (resumable), and a run can
be cut into parts (``max_minutes``: stop after the cell in flight).

The samples of a cell go to the backend in batches of equal prompt length
(:meth:`BaseBackend.generate_batch`; the kvsift backend runs a batch as one ``LLM.generate``
call). Perplexity samples of equal context and continuation lengths are scored in batches the
same way (:meth:`BaseBackend.score_batch`; the kvsift backend: one ``LLM.score_batch`` call).
Batch size ``None`` is automatic: 1 on CPU, on CUDA as many sequences as a KV-memory estimate
allows (:func:`estimate_batch_size`).

``compress`` picks what a method compresses: ``"prompt"`` (the default, the query-aware setting)
the whole rendered prompt, question included; ``"context"`` (the query-agnostic setting) only the
sample's context: each sample is split once (:func:`kvsift.eval.tasks.split_context_question`)
and the backend's ``generate_context`` compresses the context ids, then answers the question ids
uncompressed over that cache, one sample at a time. Context-mode rows carry ``compress:
"context"`` (and ``settings.compress``) and a key ending in ``|context``.

Backends drive a model: :class:`KvsiftBackend` (kvsift's engine) here; ``bench/vs_kvpress.py``
adds a kvpress backend writing the same schema. This module imports no engine code at import time
so that the kvpress worker (another transformers version) can use it.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import os
import time
import traceback
import zlib
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from kvsift.eval.labels import split_label
from kvsift.eval.scoring import perplexity, score
from kvsift.eval.tasks import (Sample, TaskBuilder, TaskConfig, TaskUnavailable, check_task_names,
                               split_context_question)

from kvsift.budget import FULL, Budget, budget_label, resolve_budget
from kvsift.budget import parse_budget as _parse_budget


def parse_budget(text: str | int | float | None) -> Budget:
    """``"full"``/None -> None, ``"256"`` -> 256 tokens, ``"0.25"``/``"25%"`` -> ratio 0.25."""
    return _parse_budget(text, allow_full=True)


def budget_kind(budget: Budget) -> str:
    return FULL if budget is None else ("tokens" if isinstance(budget, int) else "ratio")


def kept_tokens(budget: Budget, prompt_len: int) -> int:
    """Tokens kept per layer and KV head for ``budget`` on a prompt of ``prompt_len`` tokens (one
    grid budget serves every length, so a token budget is capped at the prompt)."""
    return resolve_budget(budget, prompt_len, clamp=True)


def method_options(method: str, method_kwargs: dict[str, dict] | None = None) -> tuple[str, dict[str, Any]]:
    """The spec and options that build a grid method: ``--method-opt`` options given for the label
    (or its spec), overridden by the label's own bracketed ones."""
    spec, own = split_label(method)
    kw = method_kwargs or {}
    return spec, {**kw.get(spec, {}), **kw.get(method, {}), **own}


def budgetless(method: str) -> bool:
    """Whether a grid method runs once per prompt set, at no budget: ``full`` (``kvpress:full``) and
    methods whose every stage keeps every token, so a budget would change nothing: codecs (``kivi``
    alone) and attention-only stages (``minference``). ``duo`` needs no budget but uses one when
    given, so it runs at every budget."""
    if method == FULL or method.endswith(":" + FULL):
        return True
    from kvsift.errors import UnknownMethodError
    from kvsift.methods.base import spec_classes

    spec = split_label(method)[0]
    try:
        return all(c.name == FULL or c.codec or c.attention_only for c in spec_classes(spec))
    except UnknownMethodError:  # another backend's name (kvpress:snapkv)
        return False


COMPRESS_MODES = ("prompt", "context")


def check_compress(compress: str) -> str:
    if compress not in COMPRESS_MODES:
        raise ValueError(f"compress must be one of {COMPRESS_MODES}, got {compress!r}")
    return compress


def cell_key(task: str, method: str, budget: Budget | str, length: int, seed: int, compress: str = "prompt") -> str:
    """``task|method|budget|length|seed``, plus ``|context`` for a ``compress="context"`` cell (so
    both settings of one cell can share a results file; prompt-mode keys are unchanged)."""
    b = budget if isinstance(budget, str) else budget_label(budget)
    key = f"{task}|{method}|{b}|{length}|{seed}"
    return key if check_compress(compress) == "prompt" else f"{key}|{compress}"


# ----------------------------------------------------------------------------------------------
# backends


@dataclass(slots=True)
class Generation:
    """What a backend reports for one generated answer."""

    text: str
    prompt_tokens: int
    new_tokens: int
    kv_device_bytes: int
    kv_host_bytes: int
    kv_kept_bytes: int
    kv_full_bytes: int
    prefill_s: float
    decode_ms_per_token: float   # the decode's wall time per step, its setup (warm-up, CUDA graph recording) included
    batch: int = 1  # sequences in the backend call that produced it
    steady_ms_per_token: float | None = None   # ...without that setup (None: the backend does not tell them apart)
    method_stats: dict[str, Any] | None = None   # the method's own counters for the call (e.g. TokenSelect's reuse_rate)


@dataclass(slots=True)
class Scored:
    """What a backend reports for one teacher-forced continuation (perplexity)."""

    nll_sum: float
    n_tokens: int
    prompt_tokens: int
    kv_device_bytes: int
    kv_host_bytes: int
    kv_kept_bytes: int
    kv_full_bytes: int
    prefill_s: float
    decode_ms_per_token: float   # the (batched) decode's wall time per step
    batch: int = 1  # samples in the backend call that scored it


class Backend(Protocol):
    name: str          # "kvsift" | "kvpress"
    model_name: str
    tokenizer: Any

    def generate(self, prompt_ids: list[int], method: str, budget: Budget, max_new_tokens: int) -> Generation: ...

    def score(self, context_ids: list[int], continuation_ids: list[int], method: str, budget: Budget) -> Scored: ...

    # optional (see BaseBackend): generate_context(context_ids, question_ids, method, budget,
    # max_new_tokens) -> Generation (``--compress context``); context_settings(method) -> dict;
    # prompt_settings(method) -> dict (what a prompt-mode row adds to its settings);
    # generate_batch(list_of_prompt_ids, method, budget, max_new_tokens)
    # -> list[Generation]; score_batch(list_of_context_ids, list_of_continuation_ids, method, budget)
    # -> list[Scored] (contexts of one length, continuations of one length);
    # auto_batch_size(prompt_tokens, max_new_tokens, method, budget) -> int;
    # free_memory() after an out-of-memory error


class BaseBackend:
    """Defaults for backends: a batch is generated (scored) one prompt at a time, the automatic
    batch size is 1. Backends that batch for real override :meth:`generate_batch`,
    :meth:`score_batch` and :meth:`auto_batch_size`."""

    name = "backend"
    model_name = "model"
    tokenizer: Any = None

    def generate(self, prompt_ids, method, budget, max_new_tokens) -> Generation:
        raise NotImplementedError

    def score(self, context_ids, continuation_ids, method, budget) -> Scored:
        raise NotImplementedError

    def generate_batch(self, prompts: list[list[int]], method: str, budget: Budget,
                       max_new_tokens: int) -> list[Generation]:
        return [self.generate(p, method, budget, max_new_tokens) for p in prompts]

    def score_batch(self, contexts: list[list[int]], continuations: list[list[int]], method: str,
                    budget: Budget) -> list[Scored]:
        """One :class:`Scored` per ``(context, continuation)`` pair, in order (the runner passes
        contexts of one length and continuations of one length)."""
        return [self.score(c, x, method, budget) for c, x in zip(contexts, continuations)]

    def auto_batch_size(self, prompt_tokens: int, max_new_tokens: int, method: str, budget: Budget) -> int:
        return 1

    def free_memory(self) -> None:
        """Called after an out-of-memory error, before the batch is retried in halves."""

    def generate_context(self, context_ids: list[int], question_ids: list[int], method: str, budget: Budget,
                         max_new_tokens: int) -> Generation:
        """The query-agnostic setting: compress ``context_ids`` with ``method`` to ``budget`` (resolved
        against the context's length), then feed ``question_ids`` uncompressed and decode greedily.
        KV bytes are the context cache's."""
        raise NotImplementedError(f"backend {self.name!r} does not support --compress context")


class ContextModeError(RuntimeError):
    """A method that cannot run in the query-agnostic setting (the cell's error row says which step)."""


def generate_context(backend, context_ids: list[int], question_ids: list[int], method: str, budget: Budget,
                     max_new_tokens: int) -> Generation:
    """``backend.generate_context``, or a clear error for a backend without it."""
    fn = getattr(backend, "generate_context", None)
    if fn is None:
        raise NotImplementedError(f"backend {getattr(backend, 'name', type(backend).__name__)!r} does not support "
                                  f"--compress context (no generate_context)")
    return fn(list(context_ids), list(question_ids), method, budget, max_new_tokens)


def generate_batch(backend, prompts: list[list[int]], method: str, budget: Budget,
                   max_new_tokens: int) -> list[Generation]:
    """``backend.generate_batch`` where the backend has one, else one ``generate`` per prompt."""
    fn = getattr(backend, "generate_batch", None)
    if fn is None:
        return [backend.generate(p, method, budget, max_new_tokens) for p in prompts]
    out = fn(prompts, method, budget, max_new_tokens)
    if len(out) != len(prompts):
        raise RuntimeError(f"{type(backend).__name__}.generate_batch returned {len(out)} results for "
                           f"{len(prompts)} prompts")
    return out


def score_batch(backend, contexts: list[list[int]], continuations: list[list[int]], method: str,
                budget: Budget) -> list[Scored]:
    """``backend.score_batch`` where the backend has one, else one ``score`` per sample."""
    fn = getattr(backend, "score_batch", None)
    if fn is None:
        return [backend.score(c, x, method, budget) for c, x in zip(contexts, continuations)]
    out = fn(contexts, continuations, method, budget)
    if len(out) != len(contexts):
        raise RuntimeError(f"{type(backend).__name__}.score_batch returned {len(out)} results for "
                           f"{len(contexts)} samples")
    return out


def estimate_batch_size(free_bytes: int, prompt_tokens: int, max_new_tokens: int, *, num_layers: int,
                        num_kv_heads: int, head_dim: int, dtype_bytes: int, num_q_heads: int | None = None,
                        chunk_size: int = 512, fraction: float = 0.5, cap: int = 64,
                        kv_bytes: Callable[[int], tuple[int, int, bool]] | None = None,
                        free_host: int = 0) -> int:
    """How many sequences of ``prompt_tokens`` (+ ``max_new_tokens``) fit: the batch's bytes at most
    ``fraction`` of ``free_bytes``. Per sequence it counts the full KV of the whole sequence (what
    the full cache and the decode-time methods hold) and the activations of one prefill chunk (about
    16 hidden-size vectors per token: q/k/v/o, the MLP's gate and up projections, residuals). Once
    per batch it counts the largest masked attention call (a padded batch's mask blocks, at most
    :data:`~kvsift.engine.attention.MASK_ELEMENTS` booleans and their additive fp16 copy; an
    unpadded batch builds none). Clamped to ``[1, cap]``.

    ``kv_bytes(rows) -> (device, host, row_prefill)``: the method's own KV for a batch of ``rows``
    (the engine's admission estimate, ``LLM.kv_estimate``) in place of every row's full KV: an
    eviction method prefilled one row at a time holds one row's whole prompt beside the others'
    kept tokens, so far more rows fit; the activations are then one row's, and the batch's host KV
    (an offloading method's) must fit in ``fraction`` of ``free_host`` too."""
    from kvsift.engine.attention import MASK_ELEMENTS

    if prompt_tokens < 1 or free_bytes <= 0:
        return 1
    n = prompt_tokens + max_new_tokens + 1
    kv = 2 * num_layers * num_kv_heads * head_dim * dtype_bytes * n
    act = 16 * (num_q_heads or num_kv_heads) * head_dim * dtype_bytes * min(chunk_size, prompt_tokens)
    room = fraction * free_bytes - 3 * MASK_ELEMENTS
    if kv_bytes is None:
        return int(max(1, min(cap, room // (kv + act))))

    def fits(rows: int) -> bool:
        dev, host, row_prefill = kv_bytes(rows)
        return dev + (1 if row_prefill else rows) * act <= room and host <= fraction * free_host

    lo, hi = 1, max(1, cap)   # the largest batch that fits (bytes grow with the rows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def _generation(out, prompt_tokens: int, rows: int = 1, kv_full_bytes: int | None = None, prefill_rows: int = 1,
                batch: int = 1) -> Generation:
    """One sequence's :class:`Generation` from the engine's output: its stats' KV bytes over ``rows``
    (the rows they cover), its prefill time over ``prefill_rows``."""
    st = out.stats
    return Generation(text=out.text, prompt_tokens=prompt_tokens, new_tokens=st.generated_tokens,
                      kv_device_bytes=round(st.kv_device_bytes / rows), kv_host_bytes=round(st.kv_host_bytes / rows),
                      kv_kept_bytes=round(st.kv_kept_bytes / rows),
                      kv_full_bytes=st.kv_full_bytes if kv_full_bytes is None else kv_full_bytes,
                      prefill_s=st.prefill_s / prefill_rows, decode_ms_per_token=st.decode_ms_per_token, batch=batch,
                      steady_ms_per_token=st.steady_ms_per_token, method_stats=dict(st.method_stats) or None)


class KvsiftBackend(BaseBackend):
    """kvsift's engine (``kvsift.LLM``). Prompts are passed as token ids (the chat template is
    already in the sample's rendered prompt), so every backend sees the same tokens.

    A batch is one ``LLM.generate`` call (greedy). Its stats are for the whole batch; each sample
    gets its own prompt length and full-cache bytes, and an equal share of the batch's KV bytes and
    prefill time (``decode_ms_per_token`` is the batch's time per decode step). Perplexity samples
    batch the same way (:meth:`score_batch`: one ``LLM.score_batch`` call). ``mem_fraction`` and
    ``max_batch`` bound the automatic batch size on CUDA (:func:`estimate_batch_size`)."""

    name = "kvsift"

    def __init__(self, llm=None, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 method_kwargs: dict[str, dict] | None = None, mem_fraction: float = 0.5, max_batch: int = 64,
                 chunk_size: int = 512, prefill_mode: str = "auto", share_prefix_bytes: int = 0):
        if isinstance(share_prefix_bytes, bool) or not isinstance(share_prefix_bytes, int) or share_prefix_bytes < 0:
            raise ValueError(f"share_prefix_bytes must be an integer >= 0, got {share_prefix_bytes!r}")
        if llm is None:
            from kvsift.engine import LLM

            llm = LLM(model, device=device, dtype=dtype, chunk_size=chunk_size, prefill_mode=prefill_mode)
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_name = llm.info.name
        self.method_kwargs = method_kwargs or {}
        if not 0 < mem_fraction <= 1:
            raise ValueError(f"mem_fraction must be in (0, 1], got {mem_fraction}")
        self.mem_fraction, self.max_batch = mem_fraction, max(1, int(max_batch))
        self._answered_with: dict[str, str] = {}  # method -> the method that answered over its contexts
        self.share_prefix_bytes = share_prefix_bytes
        if share_prefix_bytes:  # prompts' full-cache KV before their last chunk, shared by the methods that allow it
            from kvsift.engine.prefix import PrefixStore

            self.llm.runner.prefix_store = PrefixStore(share_prefix_bytes)

    @property
    def settings(self) -> dict[str, Any]:
        """Engine settings recorded in every row (they can change answers or timings)."""
        from kvsift.engine.attention import prefill_attention_backend

        llm = self.llm
        return {"chunk_size": llm.chunk_size, "prefill_mode": llm.prefill_mode, "decode_mode": llm.decode_mode,
                "dtype": str(llm.info.dtype).replace("torch.", ""), "device": llm.device.type,
                "prefill_attention": prefill_attention_backend(llm.device, llm.info.dtype, llm.info.head_dim),
                **({"share_prefix_gib": round(self.share_prefix_bytes / 2**30, 3)} if self.share_prefix_bytes else {})}

    def new_prompt_set(self) -> None:
        """The grid moved on to other prompts: the stored prefixes of the last ones are of no more use."""
        store = self.llm.runner.prefix_store
        if store is not None:
            store.clear()

    def _kv_bytes_per_token(self) -> int:
        import torch

        info = self.llm.info
        elt = torch.tensor([], dtype=info.dtype).element_size()
        return 2 * info.num_layers * info.num_kv_heads * info.head_dim * elt

    def generate(self, prompt_ids, method, budget, max_new_tokens):
        return self.generate_batch([list(prompt_ids)], method, budget, max_new_tokens)[0]

    def generate_batch(self, prompts, method, budget, max_new_tokens):
        from kvsift.engine import SamplingParams

        prompts = [list(p) for p in prompts]
        spec, kw = method_options(method, self.method_kwargs)
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0),
                                 method=spec, budget=budget, method_kwargs=kw, progress=False)
        b = len(prompts)
        per_tok = self._kv_bytes_per_token()
        if b == 1:
            return [_generation(outs[0], outs[0].stats.prompt_tokens)]
        return [_generation(out, len(p), rows=b, kv_full_bytes=per_tok * len(p), prefill_rows=b, batch=b)
                for p, out in zip(prompts, outs)]

    def generate_many(self, items: list[tuple[list[int], Budget, int]], method: str) -> list[Generation]:
        """``items`` ``(prompt ids, budget, max_new_tokens)``, one request each, through the engine's
        offline continuous batching (``LLM.generate_requests``): requests that may share a batch
        (a method whose state after the prefill is its kept KV: any budget and prompt length) decode
        together, each prefilled on its own as it would run alone; at most ``max_batch`` sequences
        and, on CUDA, ``mem_fraction`` of the free device memory of expected KV. Each answer's
        ``prefill_s`` is its prefill's time over the rows prefilled with it, ``batch`` the rows
        decoding with it when it finished, ``steady_ms_per_token`` its decode per step without the
        set-up and the joiners' prefills it waited on (``decode_ms_per_token`` includes them). A call
        that runs out of device memory (the admission's KV estimate was short) is freed and run
        again with half the sequences at a time, down to one."""
        from kvsift.engine import SamplingParams

        spec, kw = method_options(method, self.method_kwargs)
        llm = self.llm
        rows = self.max_batch
        while True:
            reqs = [llm.request([list(ids)], SamplingParams(max_tokens=n, temperature=0.0), method=spec, budget=b,
                                method_kwargs=kw) for ids, b, n in items]
            try:
                outs = llm.generate_requests(reqs, max_batch=rows, kv_memory=self._kv_memory(), progress=False)
                break
            except Exception as e:  # noqa: BLE001 - out of memory: free it, half the batch
                if rows < 2 or not _is_oom(e):
                    raise
                self.free_memory()
                rows = (rows + 1) // 2
        return [_generation(out, len(ids), prefill_rows=max(1, out.stats.prefill_rows), batch=out.stats.batch_rows)
                for (ids, _, _), (out,) in zip(items, outs)]

    def _kv_memory(self) -> int | None:
        """``mem_fraction`` of the device memory free now, on CUDA; None (unbounded) elsewhere."""
        return max(1, int(self._free_bytes() * self.mem_fraction)) if self.llm.device.type == "cuda" else None

    def _free_bytes(self) -> int:
        """CUDA device memory free now, torch's cached blocks (reusable) counted free."""
        import torch

        dev = self.llm.device
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)

    def auto_batch_size(self, prompt_tokens, max_new_tokens, method, budget):
        import torch

        dev = self.llm.device
        if dev.type != "cuda":
            return 1
        from kvsift.budget import available_host_bytes

        free = self._free_bytes()
        info = self.llm.info
        cfg = getattr(self.llm.model.config, "text_config", None) or self.llm.model.config
        spec, kw = method_options(method, self.method_kwargs)
        estimate = getattr(self.llm, "kv_estimate", None)
        kv_bytes = None if estimate is None else (
            lambda rows: estimate(rows, prompt_tokens, max_new_tokens, method=spec, budget=budget, method_kwargs=kw))
        return estimate_batch_size(free, prompt_tokens, max_new_tokens, num_layers=info.num_layers,
                                   num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
                                   dtype_bytes=torch.tensor([], dtype=info.dtype).element_size(),
                                   num_q_heads=getattr(cfg, "num_attention_heads", None),
                                   chunk_size=self.llm.chunk_size, fraction=self.mem_fraction, cap=self.max_batch,
                                   kv_bytes=kv_bytes, free_host=available_host_bytes() if kv_bytes else 0)

    def free_memory(self):
        import gc

        import torch

        gc.collect()
        if self.llm.device.type == "cuda":
            torch.cuda.empty_cache()

    def score(self, context_ids, continuation_ids, method, budget):
        from kvsift.eval.perplexity import score_continuation

        spec, kw = method_options(method, self.method_kwargs)
        return score_continuation(self.llm, context_ids, continuation_ids, spec, budget, method_kwargs=kw)

    def score_batch(self, contexts, continuations, method, budget):
        """The samples as one ``LLM.score_batch`` (contexts of one length, continuations of one
        length): each gets ``1/B`` of the batch's KV bytes and prefill time, and ``batch=B``."""
        from kvsift.eval.perplexity import score_continuations

        spec, kw = method_options(method, self.method_kwargs)
        return score_continuations(self.llm, contexts, continuations, spec, budget, method_kwargs=kw)

    # ---- the query-agnostic setting (--compress context)
    def answer_method(self, method: str, ctx=None) -> str | None:
        """The method that answers a question over a context prefilled by ``method``: the method
        itself where it works at answer time (decode-time selection, ``decode_only``: Quest,
        TokenSelect, which keep the whole context and select per decode step; or a context whose
        KV needs its own method, ``Context.needs_planner``: SentenceKV's host chunks, Squeezed's
        clusters), else None: the compressed context is read as it is, the question's tokens are
        not compressed and decoding does not evict (kvpress's pipeline semantics)."""
        from kvsift.methods import build_method

        if method == FULL:
            return None
        spec, kw = method_options(method, self.method_kwargs)
        m = build_method(spec, 0.5, **kw)
        stages = getattr(m, "stages", None) or [m]
        own = any(getattr(st, "decode_only", False) for st in stages) or (ctx is not None and ctx.needs_planner)
        return method if own else None

    def context_settings(self, method: str) -> dict[str, Any]:
        """What a ``--compress context`` row adds to its settings."""
        used = self._answered_with.get(method)  # what the cell's samples really used
        return {"answer_method": used or self.answer_method(method) or FULL,
                "kv_bytes": "the context's compressed cache after its prefill; nothing counted for the question"}

    def generate_context(self, context_ids, question_ids, method, budget, max_new_tokens):
        """``LLM.prefill_context(context_ids, method, budget)`` (a ratio resolves against the context),
        then ``LLM.generate(question_ids, greedy, context=ctx)`` with :meth:`answer_method` (its budget:
        the tokens the context's budget keeps, ``kept_tokens(budget, len(context_ids))``). KV bytes are
        the context cache's (``ctx.stats``); prefill time is the context's plus the question's."""
        from kvsift.engine import SamplingParams

        spec, kw = method_options(method, self.method_kwargs)
        try:
            ctx = self.llm.prefill_context(list(context_ids), method=spec, budget=budget, method_kwargs=kw,
                                           progress=False)
        except Exception as e:
            raise ContextModeError(f"--compress context: prefill_context with method {method!r} failed "
                                   f"({type(e).__name__}: {e})") from e
        answer = self.answer_method(method, ctx)
        self._answered_with[method] = answer or FULL
        a_budget = None if answer is None else kept_tokens(budget, len(context_ids))
        try:
            out = self.llm.generate([list(question_ids)], SamplingParams(max_tokens=max_new_tokens, temperature=0.0),
                                    method=spec if answer else None, budget=a_budget,
                                    method_kwargs=kw if answer else None,
                                    context=ctx, progress=False)[0]
        except Exception as e:
            raise ContextModeError(f"--compress context: answering over a {method!r} context (answer method "
                                   f"{answer or FULL!r}) failed ({type(e).__name__}: {e})") from e
        cs, st = ctx.stats, out.stats
        return Generation(text=out.text, prompt_tokens=len(context_ids) + len(question_ids),
                          new_tokens=st.generated_tokens, kv_device_bytes=cs.kv_device_bytes,
                          kv_host_bytes=cs.kv_host_bytes, kv_kept_bytes=cs.kv_kept_bytes,
                          kv_full_bytes=cs.kv_full_bytes, prefill_s=cs.prefill_s + st.prefill_s,
                          decode_ms_per_token=st.decode_ms_per_token, steady_ms_per_token=st.steady_ms_per_token,
                          method_stats=dict(st.method_stats) or None)


# ----------------------------------------------------------------------------------------------
# runner


@dataclass(slots=True)
class BenchConfig:
    """The grid. ``budgets`` apply to every compressing method; ``full`` runs once per
    (task, length, seed) whatever the budgets."""

    tasks: list[str]
    methods: list[str]
    budgets: list[Budget]
    lengths: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    task_config: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self):
        for name in ("tasks", "methods", "lengths", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        check_task_names(self.tasks)
        self.budgets = [parse_budget(b) for b in self.budgets]
        if not all(budgetless(m) for m in self.methods) and not any(b is not None for b in self.budgets):
            raise ValueError("compressing methods need at least one budget (e.g. 0.25 or 256)")
        for n in self.lengths:
            if not isinstance(n, int) or n < 16:
                raise ValueError(f"lengths must be integers >= 16, got {n!r}")

    def cells(self) -> list[tuple[str, int, int, str, Budget]]:
        """``(task, length, seed, method, budget)`` in run order (grouped by prompt set)."""
        out = []
        for task, length, seed in product(self.tasks, self.lengths, self.seeds):
            for method in self.methods:
                if budgetless(method):
                    out.append((task, length, seed, method, None))
                else:
                    out.extend((task, length, seed, method, b) for b in self.budgets if b is not None)
        return out


_GZ_SLICE = 1 << 14


def _gz_members(data: bytes) -> tuple[str, int]:
    """The text of the complete gzip members at the start of ``data`` and the byte offset where
    they end: a member cut short by an interrupted append (or bytes that are no gzip member) ends
    the read, and what came before it is kept."""
    out, end, n, view = [], 0, len(data), memoryview(data)
    while end < n and data[end:end + 2] == b"\x1f\x8b":
        d, member, pos = zlib.decompressobj(16 + zlib.MAX_WBITS), [], end
        try:
            while not d.eof and pos < n:   # in slices: a file of many small members stays linear
                member.append(d.decompress(view[pos:pos + _GZ_SLICE]))
                pos += min(_GZ_SLICE, n - pos)
        except zlib.error:
            break
        if not d.eof:            # torn: the member's end never arrived
            break
        out.extend(member)
        end = pos - len(d.unused_data)
    return b"".join(out).decode("utf-8", errors="replace"), end


def _gz_end(p: Path, data: bytes) -> int:
    """Where the complete members of the ``.gz`` file ``p`` (bytes ``data``) end; ``ValueError``
    when what follows them is not a torn member (so appending would cut other data)."""
    end = _gz_members(data)[1]
    tail = data[end:]
    if tail and not tail.startswith(b"\x1f\x8b"[:len(tail)]):
        raise ValueError(f"results file {p}: {len(tail)} bytes after its last gzip member are not gzip data "
                         f"(plain rows appended by an older kvsift?); decompress it (gunzip -c) to a .jsonl "
                         f"file and write there, or move it away")
    return end


def check_results_file(path: str | Path) -> None:
    """Before any work: ``ValueError`` unless rows can be appended to ``path`` (a missing file is
    fine; a ``.gz`` one must hold gzip members, a torn last one allowed)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"results file {p} is a directory")
    if p.suffix == ".gz" and p.exists():
        _gz_end(p, p.read_bytes())


def read_text(path: str | Path) -> str:
    """A results file's text; ``.gz`` files (how large committed results are kept, and what ``--out
    x.jsonl.gz`` appends to, one gzip member per row) decompressed, up to a member torn by an
    interrupted write."""
    p = Path(path)
    if p.suffix == ".gz":
        return _gz_members(p.read_bytes())[0]
    return p.read_text(encoding="utf-8")


def load_rows(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows of one or more JSONL result files, plain or gzip-compressed (``.jsonl.gz``; unreadable
    trailing lines from an interrupted write are skipped); the last row of a key wins."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: dict[str, dict[str, Any]] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"no results file {p}")
        for line in read_text(p).splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row:
                rows[row["key"]] = row
    return list(rows.values())


LEGACY_PPL_TEXT = "alice_ch1_3.txt"   # what ppl rows without settings.ppl_text were scored on


def done_keys(path: str | Path, ppl_text: str | None = None) -> set[str]:
    """The keys of the cells in ``path`` that finished without an error; with ``ppl_text``, a ppl row
    counts only if it was scored on that text (``settings.ppl_text``; rows older than the field were
    scored on :data:`LEGACY_PPL_TEXT`)."""
    p = Path(path)
    if not p.exists():
        return set()
    return {r["key"] for r in load_rows(p) if not r.get("error")
            and (ppl_text is None or r.get("task") != "ppl"
                 or (r.get("settings") or {}).get("ppl_text", LEGACY_PPL_TEXT) == ppl_text)}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _entry_measures(r) -> dict[str, Any]:
    return dict(prompt_tokens=r.prompt_tokens, kv_device_bytes=r.kv_device_bytes, kv_host_bytes=r.kv_host_bytes,
                kv_kept_bytes=r.kv_kept_bytes, kv_full_bytes=r.kv_full_bytes, prefill_s=r.prefill_s,
                decode_ms_per_token=r.decode_ms_per_token, batch=getattr(r, "batch", 1),
                steady_ms_per_token=getattr(r, "steady_ms_per_token", None),
                **({"method_stats": ms} if (ms := getattr(r, "method_stats", None)) else {}))


def _method_stats(per: list[dict[str, Any]]) -> dict[str, float]:
    """A cell's method counters: each numeric one of the samples' ``method_stats`` averaged over
    the samples that report it (a batch's counters are reported by each of its rows, so a cell's
    figure is weighted by the rows each batch decoded)."""
    vals: dict[str, list[float]] = {}
    for e in per:
        for k, v in (e.get("method_stats") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in vals.items()}


@dataclass(slots=True)
class _Group:
    """Samples of a cell that may share a backend call: ``items`` ``(sample index, what the call
    takes for it)``; ``call(list of those) -> one result per item``; ``prompt_tokens`` and
    ``max_new_tokens`` are what ``auto_batch_size`` is asked with; ``batch_size`` overrides the
    cell's (e.g. 1: the backend has no batched call for these samples)."""

    items: list[tuple[int, Any]]
    prompt_tokens: int
    max_new_tokens: int
    call: Callable[[list[Any]], list[Any]]
    batch_size: int | None = None


def _run_batches(backend: Backend, groups: list[_Group], batch_size: int | None, method: str,
                 budget: Budget) -> tuple[dict[int, Any], list[int]]:
    """Run ``groups`` (largest first) in batches of ``batch_size`` (``None``: the backend's
    ``auto_batch_size(prompt_tokens, max_new_tokens, method, budget)``, 1 if it has none). A batch
    that runs out of memory is retried in halves (after ``backend.free_memory()``), and the smaller
    size is kept for the rest of the groups. Returns ``({sample index: result}, batch sizes run)``."""
    results: dict[int, Any] = {}
    sizes: list[int] = []
    cap = None  # after an out-of-memory error: the largest batch to try for the rest of the cell
    for g in sorted(groups, key=lambda g: -len(g.items)):
        if g.batch_size is not None:
            bs = g.batch_size
        elif batch_size is not None:
            bs = batch_size
        else:
            auto = getattr(backend, "auto_batch_size", None)
            bs = auto(g.prompt_tokens, g.max_new_tokens, method, budget) if auto else 1
        pos = 0
        while pos < len(g.items):
            n = max(1, min(bs, cap or bs, len(g.items) - pos))
            chunk = g.items[pos:pos + n]
            try:
                outs = g.call([x for _, x in chunk])
            except Exception as e:  # noqa: BLE001 - out of memory: free it and retry with half the batch
                if n < 2 or not _is_oom(e):
                    raise
                getattr(backend, "free_memory", lambda: None)()
                cap = (n + 1) // 2
                continue
            sizes.append(n)
            for (i, _), r in zip(chunk, outs):
                results[i] = r
            pos += n
    return results, sizes


def run_cell(backend: Backend, samples: list[Sample], task: str, method: str, budget: Budget, length: int,
             seed: int, batch_size: int | None = None, pad: bool = False, compress: str = "prompt",
             ids_cache: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Run every sample of one cell and return its row (not yet written).

    Generation samples go to the backend in batches of ``batch_size`` (``None``: the backend's
    ``auto_batch_size``, 1 if it has none) of equal ``max_new_tokens`` and, unless ``pad``, equal
    prompt length, so that no batch is padded and a sample's answer does not depend on its batch
    mates (in a padded batch the engine resolves a ratio budget against the longest prompt; the
    prompts of a cell mostly have exactly ``length`` tokens, a few one or two fewer). Per-sample
    entries keep the sample order. Perplexity samples are batched the same way
    (``backend.score_batch``; ``auto_batch_size`` asked with the context and continuation lengths),
    grouped by equal context and continuation lengths whatever ``pad`` says (one backend call
    scores only rows of one shape); a backend without ``score_batch`` scores them one at a time. A
    batch that runs out of memory is retried in halves (after ``backend.free_memory()``), and the
    smaller size is kept for the rest of the cell.

    ``compress="context"``: each generation sample is split into ``(context_ids, question_ids)``
    (:func:`split_context_question`) and run alone through ``backend.generate_context`` (the
    budget resolves against the context; different contexts do not batch); its prompt length is
    ``len(context_ids) + len(question_ids)``. Perplexity samples run as in prompt mode (they always
    compress the context only). The row gets ``compress`` and ``settings.compress`` (plus the
    backend's ``context_settings(method)``) and a key ending in ``|context``.

    ``ids_cache``: prompt token ids by ``sample_id``, filled here and read by later cells of the same
    samples (a grid runs every method and budget over one prompt set: a 30k-token prompt takes
    ~70 ms to encode, 2 s per cell of 30)."""
    check_compress(compress)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (auto), got {batch_size}")
    t0 = time.perf_counter()
    tok = backend.tokenizer
    per: list[dict[str, Any] | None] = [None] * len(samples)
    groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
    ppl_groups: dict[tuple[int, int], list[tuple[int, tuple[list[int], list[int]]]]] = {}
    for i, s in enumerate(samples):
        if s.metric == "ppl":  # batched by equal (context, continuation) lengths, padding or not
            pair = (list(s.context_ids), list(s.continuation_ids))
            ppl_groups.setdefault((len(pair[0]), len(pair[1])), []).append((i, pair))
        elif compress == "context":
            ctx_ids, q_ids = split_context_question(tok, s)
            r = generate_context(backend, ctx_ids, q_ids, method, budget, s.max_new_tokens)
            per[i] = {"sample_id": s.sample_id, "score": score(s.metric, r.text, s.answers),
                      "prediction": r.text, "answers": s.answers, **_entry_measures(r),
                      "context_tokens": len(ctx_ids), "question_tokens": len(q_ids)}
        else:
            ids = _prompt_ids(tok, s, ids_cache)
            groups.setdefault((s.max_new_tokens, 0 if pad else len(ids)), []).append((i, ids))
    jobs = [_Group(items, max(len(ids) for _, ids in items), max_new,
                   lambda chunk, n=max_new: generate_batch(backend, chunk, method, budget, n))
            for (max_new, _), items in groups.items()]
    # a backend without score_batch scores one sample at a time: its rows say batch 1
    one = None if hasattr(backend, "score_batch") else 1
    jobs += [_Group(items, n_ctx, n_cont, lambda chunk: score_batch(backend, [c for c, _ in chunk],
                                                                    [x for _, x in chunk], method, budget), one)
             for (n_ctx, n_cont), items in ppl_groups.items()]
    results, sizes = _run_batches(backend, jobs, batch_size, method, budget)
    return _cell_row(backend, samples, per, results, sizes, task, method, budget, length, seed, pad, compress,
                     time.perf_counter() - t0)


def _prompt_ids(tok, s: Sample, ids_cache: dict[str, list[int]] | None) -> list[int]:
    """``s``'s prompt token ids, from ``ids_cache`` (by sample id) or encoded (and kept there)."""
    ids = ids_cache.get(s.sample_id) if ids_cache is not None else None
    if ids is None:
        ids = list(tok.encode(s.prompt, add_special_tokens=False))
        if ids_cache is not None:
            ids_cache[s.sample_id] = ids
    return ids


def _cell_row(backend: Backend, samples: list[Sample], per: list[dict[str, Any] | None], results: dict[int, Any],
              sizes: list[int], task: str, method: str, budget: Budget, length: int, seed: int, pad: bool,
              compress: str, wall_s: float) -> dict[str, Any]:
    """A cell's row from its samples' results (``results[i]``: sample ``i``'s Generation or
    Scored; ``per``: entries already made, context mode's) and the batch sizes it ran."""
    for i, r in results.items():
        s = samples[i]
        if s.metric == "ppl":
            per[i] = {"sample_id": s.sample_id, "nll_sum": r.nll_sum, "n_tokens": r.n_tokens,
                      "ppl": perplexity(r.nll_sum, r.n_tokens), **_entry_measures(r)}
        else:
            per[i] = {"sample_id": s.sample_id, "score": score(s.metric, r.text, s.answers),
                      "prediction": r.text, "answers": s.answers, **_entry_measures(r)}
    for i, s in enumerate(samples):
        if "depth" in s.meta:
            per[i]["depth"] = s.meta["depth"]
    row: dict[str, Any] = {
        "key": cell_key(task, method, budget, length, seed, compress), "task": task, "method": method,
        "budget": budget_label(budget), "budget_value": budget, "budget_kind": budget_kind(budget),
        "length": length, "seed": seed, "compress": compress, "backend": backend.name, "model": backend.model_name,
        "n_samples": len(per), "batch_size": max(sizes, default=1),
    }
    settings = dict(getattr(backend, "settings", None) or {})
    if settings:
        settings["batch_padding"] = pad
    settings["compress"] = compress
    if compress == "context" and hasattr(backend, "context_settings"):
        settings.update(backend.context_settings(method.split(":", 1)[-1]))
    if compress == "prompt" and hasattr(backend, "prompt_settings"):
        settings.update(backend.prompt_settings(method.split(":", 1)[-1]))
    row["settings"] = settings
    if samples and samples[0].metric == "ppl":
        settings["ppl_text"] = samples[0].meta.get("text")
        nll, n = sum(e["nll_sum"] for e in per), sum(e["n_tokens"] for e in per)
        row["ppl"] = perplexity(nll, n)
        row["nll"] = nll / n
        row["score"] = None
    else:
        row["score"] = _mean([e["score"] for e in per])
    for k in ("prompt_tokens", "kv_device_bytes", "kv_host_bytes", "kv_kept_bytes", "kv_full_bytes", "prefill_s",
              "decode_ms_per_token", "steady_ms_per_token"):
        row[k] = _mean([e.get(k) for e in per])
    if ms := _method_stats(per):
        row["method_stats"] = ms
    row["wall_s"] = wall_s
    row["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    row["samples"] = per
    return row


def groupable(backend: Backend, samples: list[Sample], compress: str = "prompt", pad: bool = False) -> bool:
    """Whether :func:`run_cells` can run these samples' cells together: a backend with
    ``generate_many``, generation samples only (``ppl`` is scored per cell), prompt mode, no padding."""
    return (hasattr(backend, "generate_many") and compress == "prompt" and not pad
            and all(s.metric != "ppl" for s in samples))


def run_cells(backend: Backend, samples: list[Sample], task: str, method: str, budgets: list[Budget], length: int,
              seed: int, ids_cache: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """The cells of one method at several ``budgets`` over one prompt set (:func:`groupable`), as
    one call of ``backend.generate_many``: every (sample, budget) is a request, and the engine's
    continuous batching decodes together those that may share a batch (for methods whose state
    after the prefill is their kept KV: all of them, whatever the budget and prompt length; each
    request is prefilled on its own, as alone). One row per budget, as :func:`run_cell` makes it,
    with ``batch_size`` the most rows any of its samples decoded with, ``wall_s`` the call's wall
    time over the cells, ``group_wall_s`` the whole call's and ``settings.grouped_cells`` the cells
    it ran."""
    t0 = time.perf_counter()
    ids = [_prompt_ids(backend.tokenizer, s, ids_cache) for s in samples]
    n = len(samples)
    gens = backend.generate_many([(ids[i], b, s.max_new_tokens) for b in budgets for i, s in enumerate(samples)],
                                 method)
    wall = time.perf_counter() - t0
    rows = []
    for k, b in enumerate(budgets):
        res = {i: gens[k * n + i] for i in range(n)}
        row = _cell_row(backend, samples, [None] * n, res, [g.batch for g in res.values()], task, method, b, length,
                        seed, False, "prompt", wall / len(budgets))
        row["group_wall_s"] = wall
        row["settings"]["grouped_cells"] = len(budgets)
        rows.append(row)
    return rows


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row to a JSONL results file, durably (flushed and synced). A ``.gz`` path gets the
    row as one more gzip member (so a committed compressed file resumes in place); a torn tail
    (an interrupted write) is cut first, in either format, so it never swallows the new row."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row) + "\n"
    if p.suffix == ".gz":
        data = p.read_bytes() if p.exists() else b""
        end = _gz_end(p, data)
        with p.open("r+b" if data else "wb") as f:
            f.truncate(end)
            f.seek(end)
            f.write(gzip.compress(line.encode("utf-8"), mtime=0))
            f.flush()
            os.fsync(f.fileno())
        return
    torn = False
    if p.exists() and p.stat().st_size > 0:
        with p.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with p.open("a", encoding="utf-8") as f:
        # after an interrupted write the file may end mid-line: start a fresh line
        f.write(("\n" if torn else "") + line)
        f.flush()
        os.fsync(f.fileno())


def _fmt_min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_grid(backend: Backend, config: BenchConfig, out: str | Path, progress: bool = True,
             method_prefix: str = "", log=print, batch_size: int | None = None, max_minutes: float | None = None,
             clock=time.monotonic, pad: bool = False, compress: str = "prompt",
             group_budgets: bool = False) -> dict[str, Any]:
    """Run every cell of ``config`` not already in ``out``; returns counts ``{"run", "skipped",
    "errors", "unavailable", "left", "stopped", "wall_s", "model_s"}``.

    ``method_prefix`` is prepended to method names in the rows (``"kvpress:"`` for the peer).
    ``batch_size``: samples per backend call (None: automatic); ``pad``: let a batch mix prompt
    lengths (see :func:`run_cell`). ``compress``: ``"prompt"`` (compress the whole prompt) or
    ``"context"`` (the context only, the question answered uncompressed; see :func:`run_cell`).
    ``max_minutes``: stop cleanly once that much time has passed, after the cell in flight (and
    before a cell that would likely end past the limit, judged by the slowest cell so far); a
    rerun of the same grid continues where this one stopped. Every finished cell is logged with
    its wall time. Cells a task cannot build with the data at hand (``TaskUnavailable``, e.g. ppl
    longer than its text) are logged and left out (no row, not an error).

    ``group_budgets``: a method's cells at several budgets over one prompt set run as one
    continuous batch (:func:`run_cells`, where :func:`groupable`: the kvsift backend, generation
    samples, prompt mode, no padding), one row each; should that call fail (out of memory, a method
    error), the cells run one by one as without it. The time limit then counts such a group as one
    unit (stopping before a group that would likely end past it)."""
    check_compress(compress)
    t_start = clock()
    builder = TaskBuilder(backend.tokenizer, config.task_config)
    done = done_keys(out, ppl_text=builder.ppl_text)
    cells = config.cells()
    todo = [c for c in cells if cell_key(c[0], method_prefix + c[3], c[4], c[1], c[2], compress) not in done]
    counts: dict[str, Any] = {"run": 0, "skipped": len(cells) - len(todo), "errors": 0, "unavailable": 0,
                              "left": 0, "stopped": False, "wall_s": 0.0, "model_s": 0.0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="bench", unit="cell")

    def say(msg: str) -> None:
        if log is None:
            return
        if bar is not None:
            bar.write(msg)
        else:
            log(msg)

    samples_cache: dict[tuple[str, int, int], list[Sample] | Exception] = {}
    ids_cache: dict[str, list[int]] = {}  # the prompt set's token ids, encoded once for all its cells
    slowest = 0.0
    n_done = 0

    def samples_of(task: str, length: int, seed: int) -> list[Sample] | Exception:
        key = (task, length, seed)
        if key not in samples_cache:
            if samples_cache:  # cells are grouped by prompt set: keep one set in memory (the backend too)
                getattr(backend, "new_prompt_set", lambda: None)()
            samples_cache.clear()
            ids_cache.clear()
            try:
                samples_cache[key] = builder.build(task, length, seed)
            except ValueError as e:
                samples_cache[key] = e
        return samples_cache[key]

    def label_of(task, length, seed, name, budget) -> str:
        return f"{task} L={length} s{seed} {name} {budget_label(budget)}" + (" [ctx]" if compress == "context" else "")

    def record(row: dict[str, Any], label: str, cell_s: float) -> None:
        if row.get("error"):
            counts["errors"] += 1
            msg = f"ERROR {row['error']}"
        else:
            counts["run"] += 1
            what = f"score {row['score']:.3f}" if row["score"] is not None else f"ppl {row['ppl']:.3f}"
            msg = f"{what} ({row['n_samples']} samples, batch {row['batch_size']})"
        append_row(out, row)
        say(f"[bench] {n_done}/{len(todo)} {label}: {msg} {cell_s:.1f} s")
        if bar is not None:
            bar.update(1)

    i = 0
    while i < len(todo):
        task, length, seed, method, budget = todo[i]
        # with group_budgets: this method's other budgets over the same prompt set run with it
        unit = [todo[i]]
        if group_budgets and budget is not None:
            while (i + len(unit) < len(todo) and todo[i + len(unit)][:4] == (task, length, seed, method)
                   and todo[i + len(unit)][4] is not None):
                unit.append(todo[i + len(unit)])
        if max_minutes is not None and n_done > 0:
            elapsed = clock() - t_start
            if elapsed >= 60 * max_minutes or elapsed + slowest > 60 * max_minutes:
                counts["stopped"] = True
                counts["left"] = len(todo) - n_done
                break
        i += len(unit)
        name = method_prefix + method
        samples = samples_of(task, length, seed)
        if isinstance(samples, TaskUnavailable):
            for c in unit:
                n_done += 1
                counts["unavailable"] += 1
                say(f"[bench] {n_done}/{len(todo)} {label_of(*c[:3], name, c[4])}: not available ({samples})")
                if bar is not None:
                    bar.update(1)
            continue
        if bar is not None:
            more = f" +{len(unit) - 1}" if len(unit) > 1 else ""
            bar.set_postfix_str(label_of(task, length, seed, name, budget) + more)
        t_unit = clock()
        rows = None
        if len(unit) > 1 and not isinstance(samples, Exception) and groupable(backend, samples, compress, pad):
            try:
                rows = run_cells(backend, samples, task, name, [c[4] for c in unit], length, seed, ids_cache=ids_cache)
            except Exception as e:  # noqa: BLE001 - out of memory or a method error: the cells one by one
                getattr(backend, "free_memory", lambda: None)()
                say(f"[bench] {label_of(task, length, seed, name, budget)} and {len(unit) - 1} more budget(s) "
                    f"together failed ({type(e).__name__}: {e}); running them one by one")
        if rows is not None:
            unit_s = clock() - t_unit
            counts["model_s"] += unit_s
            slowest = max(slowest, unit_s)
            for c, row in zip(unit, rows):
                n_done += 1
                record(row, label_of(task, length, seed, name, c[4]), unit_s / len(unit))
            continue
        for c in unit:
            budget = c[4]
            t_cell = clock()
            try:
                if isinstance(samples, Exception):
                    raise samples
                row = run_cell(backend, samples, task, name, budget, length, seed, batch_size=batch_size, pad=pad,
                               compress=compress, ids_cache=ids_cache)
            except Exception as e:  # noqa: BLE001 - a bad combination (budget larger than the prompt) or a
                # broken method must not end a long run: record the error (reruns retry it) and go on
                row = {"key": cell_key(task, name, budget, length, seed, compress), "task": task, "method": name,
                       "budget": budget_label(budget), "budget_value": budget, "budget_kind": budget_kind(budget),
                       "length": length, "seed": seed, "compress": compress, "backend": backend.name,
                       "model": backend.model_name, "settings": {"compress": compress},
                       "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=-4)}
            cell_s = clock() - t_cell
            counts["model_s"] += cell_s
            slowest = max(slowest, cell_s)
            n_done += 1
            record(row, label_of(task, length, seed, name, budget), cell_s)
        if len(unit) > 1:  # a group run one by one: the next group may take as long
            slowest = max(slowest, clock() - t_unit)
    if bar is not None:
        bar.close()
    counts["wall_s"] = clock() - t_start
    if counts["stopped"] and log is not None:
        ran = counts["run"] + counts["errors"]
        per_cell = counts["model_s"] / ran if ran else 0.0
        log(f"[bench] stopped after --max-minutes {max_minutes:g}: {ran} cell(s) in {_fmt_min(counts['wall_s'])} wall "
            f"({_fmt_min(counts['model_s'])} running cells, on the GPU when the model is on CUDA); "
            f"{counts['left']} cell(s) left (~{_fmt_min(per_cell * counts['left'])} at "
            f"{per_cell:.1f} s/cell); rerun the same command to continue")
    return counts
