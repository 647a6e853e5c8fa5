"""Fakes for tests and dry runs (``kvsift bench run --backend fake``): a word-level tokenizer and
a backend that answers the needle tasks by reading the part of the prompt its "cache" kept."""

from __future__ import annotations

import re

import dataclasses

from kvsift.eval.runner import BaseBackend, Generation, Scored, kept_tokens

_TOKEN = re.compile(r"\w+|[^\w\s]|\s+")


class WordTokenizer:
    """Words, punctuation and whitespace runs are tokens; ids are assigned on first sight."""

    chat_template = None
    eos_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {"<eos>": 0}
        self.inv: list[str] = ["<eos>"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for piece in _TOKEN.findall(text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.inv)
                self.inv.append(piece)
            out.append(self.vocab[piece])
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.inv[i] for i in ids if not (skip_special_tokens and i == 0))


class OutOfMemoryError(RuntimeError):
    """What :class:`ReadingBackend` raises for a batch past ``max_rows`` (the runner knows an
    out-of-memory error by this name, as torch's)."""


class ReadingBackend(BaseBackend):
    """Answers by reading the prompt, like a perfect model whose cache kept ``kept/full`` of the
    prompt: needles in the kept *tail* of the prompt are found (StreamingLLM-like), others not.
    ``calls`` counts generate/score calls (to check resumability); ``batches`` the size of each
    ``generate_batch`` call, ``score_batches`` of each ``score_batch`` call and ``many`` of each
    ``generate_many`` call (calls that ran);
    ``auto_batch`` is what ``auto_batch_size`` answers; a batch of more than ``max_rows`` rows fails
    as CUDA's out-of-memory error does (``freed`` counts the runner's ``free_memory`` calls after
    it). ``generate_context`` (``--compress context``) sees the kept tail of the context plus the
    whole question."""

    name = "fake"
    model_name = "fake-model"

    def __init__(self, tokenizer: WordTokenizer, auto_batch: int = 1, max_rows: int | None = None):
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.freed = 0
        self.calls = 0
        self.batches: list[int] = []
        self.score_batches: list[int] = []
        self.many: list[int] = []   # items of each generate_many call that ran
        self.context_calls: list[tuple[int, int]] = []  # (context, question) lengths of generate_context
        self.auto_batch = auto_batch

    def auto_batch_size(self, prompt_tokens, max_new_tokens, method, budget):
        return self.auto_batch

    def _fits(self, rows: int) -> None:
        if self.max_rows is not None and rows > self.max_rows:
            raise OutOfMemoryError("CUDA out of memory (fake)")

    def free_memory(self) -> None:
        self.freed += 1

    def generate_batch(self, prompts, method, budget, max_new_tokens):
        self._fits(len(prompts))
        self.batches.append(len(prompts))
        return [dataclasses.replace(self.generate(p, method, budget, max_new_tokens), batch=len(prompts))
                for p in prompts]

    def generate_many(self, items, method):
        """``items`` ``(prompt ids, budget, max_new_tokens)`` as one call (``many`` records its
        size); more than ``max_rows`` items fail as out of memory."""
        self._fits(len(items))
        self.many.append(len(items))
        return [dataclasses.replace(self.generate(p, method, b, n), batch=len(items)) for p, b, n in items]

    def score_batch(self, contexts, continuations, method, budget):
        if len({len(c) for c in contexts}) > 1 or len({len(x) for x in continuations}) > 1:
            raise ValueError("score_batch needs contexts of one length and continuations of one length")
        self._fits(len(contexts))
        self.score_batches.append(len(contexts))
        return [dataclasses.replace(self.score(c, x, method, budget), batch=len(contexts))
                for c, x in zip(contexts, continuations)]

    def _kv(self, n: int, budget) -> tuple[int, int]:
        k = kept_tokens(budget, n)
        return k * 100, n * 100

    def generate(self, prompt_ids, method, budget, max_new_tokens):
        self.calls += 1
        n = len(prompt_ids)
        kept, full = self._kv(n, budget)
        visible = self.tokenizer.decode(prompt_ids[n - kept // 100:])
        text = self.tokenizer.decode(prompt_ids)
        asked = re.findall(r"magic numbers? for ([\w-]+)", text)  # the last one is in the answer prefix
        vals = re.findall(rf"magic numbers for {re.escape(asked[-1])} is: (\d+)", visible) if asked else []
        answer = ", ".join(vals) if vals else "unknown"
        return Generation(text=" " + answer + ".", prompt_tokens=n, new_tokens=3, kv_device_bytes=kept,
                          kv_host_bytes=full - kept if method.endswith("offload") else 0, kv_kept_bytes=kept,
                          kv_full_bytes=full, prefill_s=0.01, decode_ms_per_token=1.0)

    def generate_context(self, context_ids, question_ids, method, budget, max_new_tokens):
        """The query-agnostic setting: the kept tail of the *context* (the budget resolved against the
        context's length) plus the whole question are visible; KV bytes are the context's."""
        self.calls += 1
        self.context_calls.append((len(context_ids), len(question_ids)))
        n = len(context_ids)
        kept, full = self._kv(n, budget)
        visible = self.tokenizer.decode(context_ids[n - kept // 100:]) + self.tokenizer.decode(question_ids)
        asked = re.findall(r"magic numbers? for ([\w-]+)", self.tokenizer.decode(question_ids))
        vals = re.findall(rf"magic numbers for {re.escape(asked[-1])} is: (\d+)", visible) if asked else []
        answer = ", ".join(vals) if vals else "unknown"
        return Generation(text=" " + answer + ".", prompt_tokens=n + len(question_ids), new_tokens=3,
                          kv_device_bytes=kept, kv_host_bytes=0, kv_kept_bytes=kept, kv_full_bytes=full,
                          prefill_s=0.01, decode_ms_per_token=1.0)

    def score(self, context_ids, continuation_ids, method, budget):
        self.calls += 1
        n = len(context_ids)
        kept, full = self._kv(n, budget)
        nll = 2.0 + (1.0 - kept / full)  # more compression, worse perplexity
        return Scored(nll_sum=nll * len(continuation_ids), n_tokens=len(continuation_ids), prompt_tokens=n,
                      kv_device_bytes=kept, kv_host_bytes=0, kv_kept_bytes=kept, kv_full_bytes=full, prefill_s=0.01,
                      decode_ms_per_token=1.0)
