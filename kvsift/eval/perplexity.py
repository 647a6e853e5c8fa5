"""Teacher-forced scoring over a compressed cache (PG-19-style long-text perplexity).

The context is prefilled through kvsift's engine with the method (so it is compressed exactly as
for generation); then the continuation is fed one token at a time through the decode path (where
decode-time methods select and rolling methods evict), and the log-likelihood of each true next
token is read from the logits.

The engine has no public scoring call yet, so this drives its prefill/forward steps
(``LLM._prefill`` / ``LLM._forward``) the same way ``LLM.stream`` does.
"""

from __future__ import annotations

import time

import torch

from kvsift.eval.runner import Budget, Scored


def score_continuation(llm, context_ids: list[int], continuation_ids: list[int], method: str = "full",
                       budget: Budget = None, method_kwargs: dict | None = None) -> Scored:
    """Sum of ``-log p(continuation_ids[i] | context, continuation[:i])`` under ``method``'s cache.

    ``context_ids``: the prefilled (compressed) tokens; ``continuation_ids``: scored tokens, fed one
    per decode step. Returns :class:`~kvsift.eval.runner.Scored` (KV bytes measured after prefill)."""
    from kvsift.methods import build_method

    context_ids = [int(t) for t in context_ids]
    continuation_ids = [int(t) for t in continuation_ids]
    if not context_ids or not continuation_ids:
        raise ValueError("score_continuation needs a non-empty context and continuation")
    total = len(context_ids) + len(continuation_ids)
    if total > llm.info.max_positions:
        raise ValueError(f"context + continuation = {total} tokens exceeds the model's limit of "
                         f"{llm.info.max_positions}")
    m = build_method(method, budget, **(method_kwargs or {}))
    m.setup(None, len(context_ids), llm.info.num_layers)
    nll = 0.0
    with llm.lock:
        cache, stats, (ctx, logits) = llm._prefill([context_ids], m, None, False, reserve=len(continuation_ids) + 1)
        ctx.decoding = True
        next_pos = ctx.info["next_pos"]
        t0 = time.perf_counter()
        for i, tok in enumerate(continuation_ids):
            nll -= float(torch.log_softmax(logits[0].float(), dim=-1)[tok])
            if i == len(continuation_ids) - 1:
                break
            x = torch.tensor([[tok]], dtype=torch.long, device=llm.device)
            logits = llm._forward(ctx, x, next_pos[:, None])
            next_pos = next_pos + 1
        decode_s = time.perf_counter() - t0
    steps = len(continuation_ids) - 1
    return Scored(nll_sum=nll, n_tokens=len(continuation_ids), prompt_tokens=len(context_ids),
                  kv_device_bytes=stats.kv_device_bytes, kv_host_bytes=stats.kv_host_bytes,
                  kv_kept_bytes=stats.kv_kept_bytes, kv_full_bytes=stats.kv_full_bytes, prefill_s=stats.prefill_s,
                  decode_ms_per_token=1000.0 * decode_s / steps if steps else 0.0)
