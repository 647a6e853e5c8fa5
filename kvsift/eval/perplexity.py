"""Teacher-forced scoring over a compressed cache (PG-19-style long-text perplexity).

The context is prefilled through kvsift's engine with the method (so it is compressed exactly as
for generation); then the continuation is fed one token at a time through the decode path (where
decode-time methods select and rolling methods evict), and the log-likelihood of each true next
token is read from the logits. Samples of equal context and continuation lengths are scored as one
batch (one batched prefill, then one ``(B, 1)`` decode step per continuation token).

The engine does the work (``LLM.score_batch``); this adapts it to the runner's ``Scored`` rows.
"""

from __future__ import annotations

from kvsift.eval.runner import Budget, Scored


def score_continuation(llm, context_ids: list[int], continuation_ids: list[int], method: str = "full",
                       budget: Budget = None, method_kwargs: dict | None = None) -> Scored:
    """Sum of ``-log p(continuation_ids[i] | context, continuation[:i])`` under ``method``'s cache.

    ``context_ids``: the prefilled (compressed) tokens; ``continuation_ids``: scored tokens, fed one
    per decode step. Returns :class:`~kvsift.eval.runner.Scored` (KV bytes measured after prefill)."""
    return score_continuations(llm, [context_ids], [continuation_ids], method, budget, method_kwargs)[0]


def score_continuations(llm, contexts: list[list[int]], continuations: list[list[int]], method: str = "full",
                        budget: Budget = None, method_kwargs: dict | None = None) -> list[Scored]:
    """:func:`score_continuation` for ``B`` samples as one batch (``LLM.score_batch``): contexts of
    one length, continuations of one length (else ``ValueError`` before any compute). Each sample's
    :class:`~kvsift.eval.runner.Scored` holds ``1/B`` of the batch's KV bytes and prefill time, the
    batch's decode time per step, and ``batch=B``."""
    outs = llm.score_batch([list(c) for c in contexts], [list(c) for c in continuations], method=method,
                           budget=budget, method_kwargs=method_kwargs)
    b = len(outs)
    return [Scored(nll_sum=nll, n_tokens=st.generated_tokens, prompt_tokens=st.prompt_tokens,
                   kv_device_bytes=st.kv_device_bytes, kv_host_bytes=st.kv_host_bytes,
                   kv_kept_bytes=st.kv_kept_bytes, kv_full_bytes=st.kv_full_bytes, prefill_s=st.prefill_s,
                   decode_ms_per_token=st.decode_ms_per_token, batch=b)
            for nll, st in outs]
