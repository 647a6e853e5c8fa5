"""h2o: accumulated attention equals a naive dense causal softmax over every prompt query (chunked,
padded, GQA), the recent window is always kept, decode eviction keeps each layer at its budget
(rows of a batch alike), exactness at a budget of the whole prompt, options."""

import pytest
import torch

from kvsift import SamplingParams
from kvsift.cache import SiftCache
from kvsift.engine.attention import ForwardContext
from kvsift.methods import build_method
from kvsift.methods.h2o import attention_received
from tests.conftest import check_exact_and_compressing, decode_greedy, random_prompt


def naive_received(q, k, qpos, kpos):
    """Column sums of the dense causal softmax, per query head, then the mean over each group:
    q (b, hq, L, d), k (b, hk, n, d), qpos (b, L), kpos (b, hk, n) -> (b, hk, n) float64."""
    b, hq, L, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    out = torch.zeros(b, hq, n, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(L):
                if qpos[bi, i] < 0:
                    continue
                vis = [j for j in range(n) if 0 <= kpos[bi, h // g, j] <= qpos[bi, i]]
                logits = torch.stack([q[bi, h, i].double() @ k[bi, h // g, j].double() for j in vis]) * d ** -0.5
                out[bi, h, vis] += torch.softmax(logits, 0)
    return out.view(b, hk, g, n).mean(2)


def test_attention_received_matches_naive_softmax_in_small_blocks():
    g = torch.Generator().manual_seed(0)
    b, hq, hk, L, n, d = 2, 4, 2, 5, 9, 8
    q, k = torch.randn(b, hq, L, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    kpos = torch.arange(n).expand(b, hk, n).clone()
    kpos[1, :, :3] = -1                                    # row 1: left padding
    kpos[0, 1, 6] = -1                                     # a hole in one head
    qpos = torch.arange(n - L, n).expand(b, L).clone()
    qpos[1, 0] = -1                                        # a padded query gives nothing
    got = attention_received(q, k, kpos, qpos, d ** -0.5, max_bytes=b * hq * n * 4 * 2)  # blocks of 2 queries
    torch.testing.assert_close(got.double(), naive_received(q, k, qpos, kpos), rtol=1e-5, atol=1e-6)
    assert got[1, :, :3].abs().max() == 0 and got[0, 1, 6] == 0


def _prefill(method, chunks, q, k, v, pos, budget):
    """Feed one layer chunk by chunk as the engine does (append, attend, hooks); returns the layer."""
    cache = SiftCache(1)
    layer = cache.layers[0]
    run = method.start(k.shape[2], 1)
    run.tokens = budget
    ctx = ForwardContext(cache=cache, method=method, run=run)
    s = 0
    for i, c in enumerate(chunks):
        cache.step_positions = pos[:, s : s + c].to(torch.int32)
        ctx.prefill_end = i == len(chunks) - 1
        layer.update(k[:, :, s : s + c], v[:, :, s : s + c])
        method.after_attend(run, layer, q[:, :, s : s + c], None, ctx)
        s += c
    return layer, run, ctx


def test_observed_chunks_accumulate_every_prompt_query():
    """Chunked prefill with a left-padded row: the state equals the column sums of the dense causal
    softmax of every prompt query (no compression at a budget of the whole prompt)."""
    g = torch.Generator().manual_seed(1)
    b, hq, hk, n, d = 2, 4, 2, 23, 8
    q, k, v = torch.randn(b, hq, n, d, generator=g), torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d)
    pos = torch.arange(n).expand(b, n).clone()
    pos[1, :6] = -1
    pos[1, 6:] -= 6
    m = build_method("h2o", n)
    with torch.inference_mode():
        layer, _, _ = _prefill(m, [10, 7, 6], q, k, v, pos, n)
        st = layer.state["h2o"]
        assert st.n == layer.length == n
        torch.testing.assert_close(st.acc[..., :n].double(), naive_received(q, k, pos, pos[:, None].expand(b, hk, n)),
                                   rtol=1e-5, atol=1e-6)


def test_prefill_keeps_recent_window_and_heavy_hitters_then_decode_evicts_the_lowest():
    g = torch.Generator().manual_seed(2)
    b, hq, hk, n, d, budget = 1, 4, 2, 40, 8, 12
    q, k, v = torch.randn(b, hq, n, d, generator=g), torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d)
    pos = torch.arange(n)[None]
    m = build_method("h2o", budget, recent=4)
    acc = naive_received(q, k, pos, pos[:, None].expand(b, hk, n))
    with torch.inference_mode():
        layer, run, ctx = _prefill(m, [16, 24], q, k, v, pos, budget)
        assert layer.length == budget
        for h in range(hk):
            kept = set(layer.positions[0, h].tolist())
            heavy = set(acc[0, h, : n - 4].topk(budget - 4).indices.tolist())
            assert kept == heavy | set(range(n - 4, n))
        # the scores followed the kept tokens
        torch.testing.assert_close(layer.state["h2o"].acc[..., :budget].double(),
                                   acc.gather(2, layer.positions.long()), rtol=1e-5, atol=1e-6)
        # one decode step: the new query adds its attention; the lowest outside the recent window goes
        ctx.decoding, ctx.prefill_end = True, False
        cache = ctx.cache
        cache.step_positions = torch.tensor([[n]], dtype=torch.int32)
        qn, kn = torch.randn(b, hq, 1, d, generator=g), torch.randn(b, hk, 1, d, generator=g)
        before = layer.state["h2o"].acc[..., :budget].clone()
        keys = torch.cat([layer.keys, kn], 2)
        kpos = torch.cat([layer.positions, torch.full((b, hk, 1), n, dtype=torch.int32)], 2)
        total = torch.cat([before, torch.zeros(b, hk, 1)], 2) + attention_received(qn, keys, kpos, torch.tensor([[n]]),
                                                                                   d ** -0.5)
        layer.update(kn, torch.randn(b, hk, 1, d))
        m.after_attend(run, layer, qn, None, ctx)
        assert layer.length == budget and layer.state["h2o"].n == budget
        for h in range(hk):
            outside = kpos[0, h] <= n - 4                                   # not among the 4 newest
            victim = int(kpos[0, h][outside][total[0, h][outside].argmin()])
            assert set(layer.positions[0, h].tolist()) == set(kpos[0, h].tolist()) - {victim}


def _decoded(llm, m, ids, steps):
    cache, run, ctx = decode_greedy(llm, m, ids, steps)
    return cache, run, ctx.next_pos + steps


def test_decode_stays_at_the_budget_and_keeps_the_recent_window(tiny_llm):
    m = build_method("h2o", 48, recent=0.25)
    cache, run, nxt = _decoded(tiny_llm, m, [random_prompt(150, seed=51)], steps=20)
    newest = int(nxt[0]) - 1
    for layer in cache.layers:
        assert layer.length == 48 and layer.state["h2o"].n == 48
        for h in range(layer.positions.shape[1]):
            kept = set(layer.positions[0, h].tolist())
            assert set(range(newest - 12 + 1, newest + 1)) <= kept     # 0.25 * 48 newest tokens


def test_batch_rows_keep_each_row_within_the_budget(tiny_llm):
    """Row-by-row prefill (a batch, auto mode): each row's scores reach the batch state; a row
    shorter than the budget keeps all its tokens until it fills the budget."""
    m = build_method("h2o", 64)
    cache, _, _ = _decoded(tiny_llm, m, [random_prompt(150, seed=52), random_prompt(40, seed=53)], steps=30)
    for layer in cache.layers:
        assert layer.length == 64 and layer.state["h2o"].n == 64
        lengths = layer.head_lengths()
        assert lengths.max() <= 64 and (lengths[1] == 64).all()     # 40 + 30 tokens > 64: padding went first
        assert set(range(40 + 30 - 32, 40 + 30)) <= set(layer.positions[1, 0].tolist())


@pytest.mark.parametrize("kw", [{}, {"decode_evict": False}, {"recent": 8}])
def test_budget_of_whole_prompt_equals_full_and_a_small_budget_saves_memory(tiny_llm, kw):
    check_exact_and_compressing(tiny_llm, "h2o", kw, seed=54)


def test_static_ok_only_without_decode_eviction():
    assert not build_method("h2o", 64).static_ok()
    assert build_method("h2o", 64, decode_evict=False).static_ok()
    assert build_method("h2o", 64, recent=0.5).recent_tokens(64) == 32
    assert build_method("h2o", 64, recent=100).recent_tokens(64) == 64


@pytest.mark.parametrize("kw,msg", [({"recent": -1}, "recent"), ({"recent": 1.5}, "recent"),
                                    ({"recent": "8"}, "recent"), ({"decode_evict": "yes"}, "decode_evict")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_method("h2o", 64, **kw)


def test_a_reused_context_keeps_its_scores_and_the_question_adds_to_them(tiny_llm):
    """The context's scores travel with its cache (clone, persisted fields); the question's chunks
    are appended after them, and compression and decode stay within the budget."""
    ctx = tiny_llm.prefill_context(random_prompt(200, seed=55), method="h2o", budget=64)
    st = ctx.cache.layers[0].state["h2o"]
    tensors, extra = st.kv_state_dict()
    again = type(st).kv_from_state_dict(tensors, extra, "cpu")
    assert again.n == st.n == 64 and torch.equal(again.acc, st.acc)
    out = tiny_llm.generate(random_prompt(30, seed=56), SamplingParams(max_tokens=5, ignore_eos=True), method="h2o",
                            budget=64, context=ctx)[0]
    assert len(out.token_ids) == 5 and out.stats.kv_device_bytes < out.stats.kv_full_bytes
    assert ctx.cache.layers[0].length == 64                                  # the context itself is untouched
