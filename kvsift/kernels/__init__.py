"""Decode-time kernels: each ``kvsift/kernels/<name>.py`` holds ``<name>_ref`` (PyTorch) and
``<name>`` (Triton) with one signature; ``kvsift.kernels.dispatch`` picks per call.

* ``chunk_scores(query, summaries, reduce)`` - score a decode query against chunk/page summaries
  (mean keys or Quest min/max bounds), GQA groups reduced -> ``(batch, kv_heads, n_chunks)``.
* ``sparse_decode_attention(q, k_cache, v_cache, slot_idx, scale)`` - attention over selected cache
  slots read in place, split-K with a log-sum-exp merge -> ``(batch, q_heads, head_dim)``.
* ``select_chunks`` / ``chunks_to_slots`` / ``page_summaries`` - budgeted top-k and index helpers.
* ``sparse_prefill_attention(q, k, v, block_idx, cols, scale, block)`` - a prefill chunk's attention
  over listed key blocks and columns per query block (minference) -> ``(batch, q_heads, L, head_dim)``.
* ``attention_received(query, keys, key_pos, query_pos, scale, ...)`` - the softmax attention each key
  receives from a block of queries, summed or maxed over the queries and the q heads of its KV group
  (H2O's and KVzip's scores), without materialising the weights -> ``(batch, kv_heads, n)``.

Import the dispatching functions from ``kvsift.kernels.dispatch`` (this package re-exports no
function under a module's name, so ``kvsift.kernels.chunk_scores`` stays the module).
"""

from kvsift.kernels._triton import HAS_TRITON

__all__ = ["HAS_TRITON"]
