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
