"""Questions over a reusable context read its KV by reference (``SiftCache.share``): the batch's
rows all attend to the context's one stored copy (a stride-0 batch view), only each question's own
tokens are per row, and the answers are those of the whole prompt."""

import pytest
import torch

from kvsift import LLM, SamplingParams
from kvsift.models import tiny_model
from tests.conftest import random_prompt

DOC = random_prompt(500, seed=1)
QUESTIONS = [random_prompt(20, seed=2), random_prompt(35, seed=3), random_prompt(9, seed=4)]
P = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f, seed=1) for f in ("llama", "qwen2", "gemma3")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_a_batch_of_questions_reads_the_context_by_reference(models, family, mode):
    llm = LLM.from_model(models[family], None, chunk_size=64, decode_mode=mode)
    ctx = llm.prefill_context(DOC)
    before = {k: t.clone() for k, t in ctx.cache.state_dict().items()}
    out = llm.generate(QUESTIONS, P, context=ctx)
    # the whole prompt, prefilled and decoded alone: the same tokens
    assert [o.token_ids for o in out] == [llm.generate(DOC + q, P)[0].token_ids for q in QUESTIONS]
    assert out[0].stats.decode_mode == mode
    # the context is untouched (read-only), and can answer again
    after = ctx.cache.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert llm.generate(QUESTIONS[:1], P, context=ctx)[0].token_ids == out[0].token_ids


def test_the_context_is_held_once_whatever_the_batch(models, monkeypatch):
    import kvsift.methods.full as full

    llm = LLM.from_model(models["llama"], None, chunk_size=64)
    ctx = llm.prefill_context(DOC)
    qs = QUESTIONS * 2                                                   # 6 rows
    shared = llm.generate(qs, P, context=ctx)
    ctx_bytes = ctx.cache.memory()["device"]
    monkeypatch.setattr(full.Full, "reads_context_in_place", lambda self: False)   # a copy per row
    copied = llm.generate(qs, P, context=ctx)
    assert [o.token_ids for o in shared] == [o.token_ids for o in copied]
    # by reference: the context once plus the rows' own tokens; copied: the context six times
    assert shared[0].stats.kv_device_bytes < ctx_bytes + 0.5 * ctx_bytes
    assert copied[0].stats.kv_device_bytes > 5 * ctx_bytes


def test_no_copy_is_made_of_the_context(models):
    llm = LLM.from_model(models["llama"], None, chunk_size=64)
    ctx = llm.prefill_context(DOC)
    cache = ctx.cache.share(batch_repeat=4)
    for src, dst in zip(ctx.cache.layers, cache.layers):
        k, v, p = dst.prefix
        assert k.shape[0] == 4 and k.stride(0) == 0 and k.data_ptr() == src.keys.data_ptr()
        assert v.data_ptr() == src.values.data_ptr() and p.data_ptr() == src.positions.data_ptr()
        assert dst.length == 0
    assert cache.memory()["device"] < 1.1 * ctx.cache.memory()["device"]


def test_methods_that_act_on_the_context_still_get_their_own_copy(models):
    """A decode-time selection (quest) picks among the context's slots, and a context compressed by
    sentencekv keeps chunks in a host store: neither reads by reference; answers as before."""
    llm = LLM.from_model(models["llama"], None, chunk_size=64)
    ctx = llm.prefill_context(DOC)
    assert ctx.cache.shareable()
    out = llm.generate(QUESTIONS, P, context=ctx, method="quest", budget=64)
    assert [o.token_ids for o in out] == [llm.generate(DOC + q, P, method="quest", budget=64)[0].token_ids
                                          for q in QUESTIONS]
    skv = llm.prefill_context(DOC, method="sentencekv", budget=96)
    assert not skv.cache.shareable()
    with pytest.raises(ValueError, match="shared"):
        skv.cache.share(2)


def test_admission_counts_a_shared_context_once(models):
    llm = LLM.from_model(models["llama"], None, chunk_size=64)
    ctx = llm.prefill_context(DOC)
    ctx_bytes = ctx.cache.memory()["device"]
    full = llm.request(QUESTIONS * 2, P, context=ctx)
    quest = llm.request(QUESTIONS * 2, P, context=ctx, method="quest", budget=64)
    assert full.kv_bytes < ctx_bytes + 6 * 60 * llm.kv_bytes_per_token      # the context once, the rows' own
    assert quest.kv_bytes >= 6 * ctx_bytes                                  # a copy per row


@pytest.mark.parametrize("window", [None, 50])
def test_the_reference_over_kv_every_row_shares_equals_the_general_path(window):
    """sparse_decode_attention_ref over a stride-0 batch (the shared prefix) takes every row's
    queries against the one copy instead of gathering it per row: the same output and lse."""
    from kvsift.kernels.sparse_decode_attention import sparse_decode_attention_ref

    torch.manual_seed(0)
    b, hq, hk, n, d = 5, 8, 2, 300, 16
    k1, v1 = torch.randn(1, hk, n, d), torch.randn(1, hk, n, d)
    pos = torch.arange(n, dtype=torch.int32)[None, None].expand(1, hk, n).clone()
    pos[0, 1, 7] = -1                                                       # a hole
    q, qp = torch.randn(b, hq, d), torch.tensor([299, 350, 120, 299, 400])
    shared = [k1.expand(b, -1, -1, -1), v1.expand(b, -1, -1, -1), pos.expand(b, -1, -1)]
    got = sparse_decode_attention_ref(q, shared[0], shared[1], None, 0.3, key_pos=shared[2], query_pos=qp,
                                      window=window, return_lse=True)
    want = sparse_decode_attention_ref(q, *(t.contiguous() for t in shared[:2]), None, 0.3,
                                       key_pos=shared[2].contiguous(), query_pos=qp, window=window,
                                       return_lse=True)
    assert torch.allclose(got[0], want[0], atol=1e-6)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    assert torch.allclose(got[1][torch.isfinite(got[1])], want[1][torch.isfinite(want[1])], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_reference_ignores_whatever_empty_slots_hold(batch):
    """Every-slot reads take the buffers as they are (no gather): an empty slot (position -1) of a
    static buffer may hold any bits, NaN included, and must not reach the output (one row, or a
    batch of rows of their own; KV shared by stride 0, a context's, holds finite values only)."""
    from kvsift.kernels.sparse_decode_attention import sparse_decode_attention_ref

    torch.manual_seed(1)
    hq, hk, n, d = 4, 2, 64, 8
    k, v = torch.randn(1, hk, n, d), torch.randn(1, hk, n, d)
    pos = torch.arange(n, dtype=torch.int32)[None, None].expand(1, hk, n).clone()
    pos[..., 40:] = -1
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[..., 40:, :] = 0
    clean_v[..., 40:, :] = 0
    k[..., 40:, :], v[..., 40:, :] = float("nan"), float("nan")
    q, qp = torch.randn(batch, hq, d), torch.full((batch,), 63)
    ex = (lambda t: t.repeat(batch, *([1] * (t.dim() - 1)))) if batch > 1 else (lambda t: t)
    got = sparse_decode_attention_ref(q, ex(k), ex(v), None, 0.3, key_pos=ex(pos), query_pos=qp)
    want = sparse_decode_attention_ref(q, ex(clean_k), ex(clean_v), None, 0.3, key_pos=ex(pos), query_pos=qp)
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-6)
