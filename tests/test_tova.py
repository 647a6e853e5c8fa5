"""tova: scores equal the last row of a naive attention matrix averaged over the layer's heads (or
per KV group), prefill keeps the top keys, decode evicts the token the new query attends to least
and keeps each layer at its budget, exactness at a budget of the whole prompt, options."""

import pytest
import torch

from kvsift import SamplingParams
from kvsift.cache import SiftCache
from kvsift.engine.attention import ForwardContext
from kvsift.methods import build_method
from kvsift.methods.tova import last_query_attention
from tests.conftest import check_exact_and_compressing, decode_greedy, random_prompt


def naive_last_row(q, k, qpos, kpos):
    """Softmax of the last query over its visible keys, per query head: q (b, hq, L, d),
    k (b, hk, n, d), qpos (b, L), kpos (b, hk, n) -> (b, hq, n) float64 (0 where not visible)."""
    b, hq, _, d = q.shape
    n = k.shape[2]
    g = hq // k.shape[1]
    out = torch.zeros(b, hq, n, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            vis = [j for j in range(n) if 0 <= kpos[bi, h // g, j] <= qpos[bi, -1]]
            logits = torch.stack([q[bi, h, -1].double() @ k[bi, h // g, j].double() for j in vis]) * d ** -0.5
            out[bi, h, vis] = torch.softmax(logits, 0)
    return out


def test_scores_are_the_last_attention_row_averaged_over_heads():
    g = torch.Generator().manual_seed(0)
    b, hq, hk, L, n, d = 2, 4, 2, 3, 10, 8
    q, k = torch.randn(b, hq, L, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    kpos = torch.arange(n).expand(b, hk, n).clone()
    kpos[1, :, :4] = -1                                                  # row 1: left padding
    qpos = torch.arange(n - L, n).expand(b, L)
    ref = naive_last_row(q, k, qpos, kpos)
    layer_wide = last_query_attention(q, k, kpos, qpos, d ** -0.5)
    torch.testing.assert_close(layer_wide.masked_fill(kpos < 0, 0).double(), ref.mean(1, keepdim=True).expand(b, hk, n))
    per_head = last_query_attention(q, k, kpos, qpos, d ** -0.5, per_head=True)
    torch.testing.assert_close(per_head.masked_fill(kpos < 0, 0).double(), ref.view(b, hk, 2, n).mean(2))
    assert bool((layer_wide[1, :, :4] == float("-inf")).all())         # padding never wins


def _layer(method, q, k, v, budget):
    """One layer prefilled in one chunk (as the engine does); returns (layer, run, ctx)."""
    cache = SiftCache(1)
    layer = cache.layers[0]
    run = method.start(k.shape[2], 1)
    run.tokens = budget
    ctx = ForwardContext(cache=cache, method=method, run=run, prefill_end=True)
    cache.step_positions = torch.arange(k.shape[2], dtype=torch.int32)[None]
    layer.update(k, v)
    method.after_attend(run, layer, q, None, ctx)
    return layer, run, ctx


@pytest.mark.parametrize("per_head", [False, True])
def test_prefill_keeps_the_top_keys_and_decode_evicts_the_least_attended(per_head):
    g = torch.Generator().manual_seed(1)
    b, hq, hk, n, d, budget = 1, 4, 2, 30, 8, 10
    q, k, v = torch.randn(b, hq, n, d, generator=g), torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d)
    m = build_method("tova", budget, per_head=per_head)
    pos = torch.arange(n)
    ref = naive_last_row(q, k, pos[None], pos.expand(b, hk, n))
    ref = ref.view(b, hk, 2, n).mean(2) if per_head else ref.mean(1, keepdim=True).expand(b, hk, n)
    with torch.inference_mode():
        layer, run, ctx = _layer(m, q, k, v, budget)
        assert layer.length == budget
        for h in range(hk):
            assert set(layer.positions[0, h].tolist()) == set(ref[0, h].topk(budget).indices.tolist())
        if not per_head:  # one policy per layer: every KV head keeps the same tokens
            assert torch.equal(layer.positions[0, 0], layer.positions[0, 1])
        # decode steps: each evicts the token the new query attends to least (maybe itself)
        ctx.decoding, ctx.prefill_end = True, False
        for step in range(3):
            p = n + step
            ctx.cache.step_positions = torch.tensor([[p]], dtype=torch.int32)
            qn, kn = torch.randn(b, hq, 1, d, generator=g), torch.randn(b, hk, 1, d, generator=g)
            keys = torch.cat([layer.keys, kn], 2)
            kpos = torch.cat([layer.positions, torch.full((b, hk, 1), p, dtype=torch.int32)], 2)
            att = naive_last_row(qn, keys, torch.tensor([[p]]), kpos)
            att = att.view(b, hk, 2, -1).mean(2) if per_head else att.mean(1, keepdim=True).expand(b, hk, -1)
            layer.update(kn, torch.randn(b, hk, 1, d))
            m.after_attend(run, layer, qn, None, ctx)
            assert layer.length == budget
            for h in range(hk):
                victim = int(kpos[0, h, att[0, h].argmin()])
                assert set(layer.positions[0, h].tolist()) == set(kpos[0, h].tolist()) - {victim}


def test_decode_stays_at_the_budget_in_every_layer(tiny_llm):
    ids = random_prompt(150, seed=61)
    m = build_method("tova", 48)
    cache, _, _ = decode_greedy(tiny_llm, m, [ids], 20)
    for layer in cache.layers:
        assert layer.length == 48 and int(layer.head_lengths().min()) == 48        # 48 real tokens per head
        assert len(set(layer.positions[0, 0].tolist())) == 48                      # no token twice


@pytest.mark.parametrize("kw", [{}, {"per_head": True}, {"decode_evict": False}])
def test_budget_of_whole_prompt_equals_full_and_a_small_budget_saves_memory(tiny_llm, kw):
    check_exact_and_compressing(tiny_llm, "tova", kw, seed=62)


def test_static_ok_only_without_decode_eviction():
    assert not build_method("tova", 64).static_ok()
    assert build_method("tova", 64, decode_evict=False).static_ok()


@pytest.mark.parametrize("kw,msg", [({"per_head": "yes"}, "per_head"), ({"decode_evict": 1}, "decode_evict"),
                                    ({"window": 8}, "window")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_method("tova", 64, **kw)
