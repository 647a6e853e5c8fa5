"""``adakv``: one budget per layer shared by its KV heads, allocated by the wrapped scorer's
scores; kept lengths differ per head and are stored compactly (real bytes freed)."""

import pytest
import torch

from kvsift import SamplingParams, build_method
from kvsift.errors import MethodOptionError, UnknownMethodError
from kvsift.methods.adakv import AdaKV
from kvsift.methods.base import head_budgets
from tests.conftest import random_prompt
from tests.test_ragged import lopsided_adakv


def test_allocation_follows_scores_with_a_floor_per_head():
    g = torch.Generator().manual_seed(0)
    # head 0: attention concentrated on 3 keys; head 1: spread evenly
    s0 = torch.full((40,), 1e-4)
    s0[[3, 17, 30]] = 0.33
    s1 = torch.softmax(torch.randn(40, generator=g) * 0.01, -1)
    scores = torch.stack([s0, s1])[None]
    valid = torch.ones_like(scores, dtype=torch.bool)
    s, counts = head_budgets(scores, valid, k=10, alpha=0.2)
    assert int(counts.sum()) == 20                         # the layer's budget, k * kv_heads
    assert counts[0, 0] >= 2 and counts[0, 1] >= 2         # alpha * k each at least
    assert counts[0, 0] < counts[0, 1]                     # the dispersed head gets more
    # the kept slots are the best scores overall (besides each head's guaranteed top 2)
    _, flat = head_budgets(scores, valid, k=10, alpha=0.0)
    assert int(flat.sum()) == 20 and flat[0, 0] == 3       # head 0 keeps only its 3 hits
    # padding never counts
    valid[..., :30] = False
    _, c = head_budgets(scores, valid, k=10, alpha=0.2)
    assert int(c.sum()) == 20 and int(c.max()) <= 10


def test_spec_wraps_any_scorer_and_refuses_what_is_not_one():
    assert build_method("adakv", 0.25).spec == "adakv(snapkv)"
    m = build_method("adakv(pyramidkv)", 0.25, window=8, alpha=0.5)
    assert m.spec == "adakv(pyramidkv)" and m.inner.window == 8 and m.alpha == 0.5
    assert build_method("adakv", 0.25, scorer="streaming").spec == "adakv(streaming)"
    with pytest.raises(MethodOptionError, match="wraps a scorer"):
        build_method("adakv(quest)", 0.25)
    with pytest.raises(UnknownMethodError, match="does not compose"):
        build_method("adakv(snapkv)+quest", 0.25)
    with pytest.raises(UnknownMethodError, match="wraps no other method"):
        build_method("snapkv(streaming)", 0.25)
    with pytest.raises(ValueError, match="alpha"):
        build_method("adakv", 0.25, alpha=1.5)


def test_whole_budget_is_exact_and_a_small_one_frees_bytes(tiny_llm):
    ids = random_prompt(240, seed=1)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    full = tiny_llm.generate(ids, p)[0]
    assert tiny_llm.generate(ids, p, method="adakv", budget=len(ids))[0].token_ids == full.token_ids
    out = tiny_llm.generate(ids, p, method=lopsided_adakv(32))[0]
    snap = tiny_llm.generate(ids, p, method="snapkv", budget=32)[0]
    # the same tokens in all as SnapKV at this budget (32 per head on average), and no padding: the
    # kept bytes are those of SnapKV's uniform 32 per head although head 0 keeps most of them
    assert out.stats.kv_kept_bytes == snap.stats.kv_kept_bytes
    assert out.stats.kv_device_bytes < out.stats.kv_full_bytes // 3
    ctx = tiny_llm.prefill_context(ids, method=lopsided_adakv(32))
    for layer in ctx.cache.layers:
        n = layer.head_lengths()[0]
        assert int(n.sum()) == 64 and n[0] > 2 * n[1]       # one budget of 2 x 32, shared unevenly
        assert layer.ragged is not None


def test_batch_of_different_lengths_and_decode_modes_agree(tiny_llms):
    from kvsift import LLM

    llm = tiny_llms["qwen2"]
    a, b = random_prompt(230, seed=2), random_prompt(170, seed=3)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    m = lopsided_adakv(24)
    batch = llm.generate([a, b], p, method=m)
    assert [o.token_ids for o in batch] == [llm.generate(x, p, method=m)[0].token_ids for x in (a, b)]
    static = LLM.from_model(llm.model, llm.tokenizer, chunk_size=64, decode_mode="static")
    assert static.generate(a, p, method=m)[0].token_ids == batch[0].token_ids


def test_per_head_lengths_survive_a_persisted_context(tiny_llm, tmp_path):
    from kvsift.server.contexts import load_context, save_context

    ids = random_prompt(200, seed=4)
    ctx = tiny_llm.prefill_context(ids, method=lopsided_adakv(24))
    save_context(ctx, tmp_path / "c", {"kv_method": ctx.method, "kv_budget": 24, "fingerprint": "fp",
                                       "stats": ctx.stats.to_dict()})
    back, _ = load_context(tmp_path / "c", tiny_llm, fingerprint="fp")
    for x, y in zip(ctx.cache.layers, back.cache.layers):
        assert torch.equal(x.head_lengths(), y.head_lengths()) and y.ragged is not None
        assert x.nbytes() == y.nbytes()
    q = random_prompt(7, seed=5)
    p = SamplingParams(max_tokens=5, ignore_eos=True)
    assert tiny_llm.generate(q, p, context=back)[0].token_ids == tiny_llm.generate(q, p, context=ctx)[0].token_ids


def test_adakv_is_a_wrapper_instance():
    m = AdaKV(budget=16)
    assert m.inner.name == "snapkv" and m.ragged


@pytest.mark.parametrize("scorer", ["h2o", "tova", "expected_attention", "kvzip"])
def test_wraps_every_scorer(tiny_llm, scorer):
    """Every scorer under adakv: exact at the whole prompt, one shared budget per layer below it
    (kvzip's reread passes run and are counted through the wrapper)."""
    ids = random_prompt(180, seed=6)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    spec = f"adakv({scorer})"
    assert tiny_llm.generate(ids, p, method=spec, budget=len(ids))[0].token_ids == tiny_llm.generate(ids, p)[0].token_ids
    out = tiny_llm.generate(ids, p, method=spec, budget=32)[0]
    assert out.stats.kv_device_bytes < out.stats.kv_full_bytes / 3
    ctx = tiny_llm.prefill_context(ids, method=spec, budget=32)
    for layer in ctx.cache.layers:
        assert int(layer.head_lengths().sum()) <= 32 * layer.head_lengths().numel()
    if scorer == "kvzip":
        assert out.stats.method_stats["reread_passes"] >= 1 and out.stats.method_stats["reread_s"] > 0
