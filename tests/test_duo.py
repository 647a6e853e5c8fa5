"""``duo``: training-free DuoAttention. Heads are ranked by the long-range attention mass of the
prompt's last queries over all layers at once; retrieval heads keep the whole prompt, streaming
heads sinks + a recent window, stored compactly: the KV bytes shrink by the streaming fraction."""

import pytest
import torch

from kvsift import SamplingParams, build_method
from kvsift.methods.duo import long_range_mass
from tests.conftest import random_prompt

OPTS = {"sinks": 4, "recent": 28}


def test_long_range_mass_counts_only_far_keys():
    pos = torch.arange(20, dtype=torch.int32).expand(1, 2, 20)
    attn = torch.zeros(1, 2, 20)
    attn[0, 0, [0, 1]] = 0.5          # head 0: sinks only -> a streaming head
    attn[0, 1, 7] = 0.6               # head 1: a far key -> a retrieval head
    attn[0, 1, 19] = 0.4
    m = long_range_mass(attn, pos, sinks=2, recent=5)
    assert m.tolist() == [[0.0, pytest.approx(0.6)]]


def test_budget_sets_the_retrieval_fraction_and_bytes_shrink_by_it(tiny_llm):
    ids = random_prompt(256, seed=1)
    m = build_method("duo", 96, **OPTS)
    run = m.start(len(ids), tiny_llm.info.num_layers)
    assert m.retrieval_fraction(run, 256) == pytest.approx((96 - 32) / (256 - 32))
    ctx = tiny_llm.prefill_context(ids, method="duo", budget=96, method_kwargs=OPTS)
    lens = torch.stack([ly.head_lengths()[0] for ly in ctx.cache.layers])   # (layers, kv_heads)
    heads = lens.numel()
    retrieval = int((lens == 256).sum())
    assert retrieval == round(m.retrieval_fraction(run, 256) * heads)
    assert bool(((lens == 256) | (lens == 32)).all())                       # whole, or sinks + recent
    # the bytes held are exactly the kept tokens: retrieval * n + streaming * (sinks + recent)
    d, elt = tiny_llm.info.head_dim, 4
    kept = sum(ly.used_bytes() for ly in ctx.cache.layers)
    assert kept == 2 * d * elt * (retrieval * 256 + (heads - retrieval) * 32)
    full = 2 * d * elt * 256 * heads
    assert kept < full * 0.5


def test_streaming_heads_keep_sinks_and_the_recent_window(tiny_llm):
    ids = random_prompt(200, seed=2)
    ctx = tiny_llm.prefill_context(ids, method="duo", method_kwargs={**OPTS, "retrieval_ratio": 0.25})
    n_stream = 0
    for layer in ctx.cache.layers:
        for h in range(layer.head_lengths().shape[1]):
            pos = _head_positions(layer, h)
            if len(pos) < 200:
                n_stream += 1
                assert pos == list(range(4)) + list(range(200 - 28, 200))
    assert n_stream == round(0.75 * sum(ly.head_lengths().numel() for ly in ctx.cache.layers))


def _head_positions(layer, h: int) -> list[int]:
    """Sorted positions one head of batch row 0 holds (buffer and compact part)."""
    p = layer.positions[0, h]
    out = p[p >= 0].tolist()
    if layer.ragged is not None:
        sl = layer.ragged.slots[0, h]
        out += layer.ragged.positions[sl[sl >= 0].long()].tolist()
    return sorted(out)


def test_whole_budget_is_exact_small_budget_is_streaming(tiny_llm):
    ids = random_prompt(200, seed=3)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    full = tiny_llm.generate(ids, p)[0].token_ids
    assert tiny_llm.generate(ids, p, method="duo", budget=len(ids))[0].token_ids == full
    out = tiny_llm.generate(ids, p, method="duo", budget=16)[0]                 # below sinks + recent
    assert out.stats.method_stats["retrieval_heads"] == 0.0
    ctx = tiny_llm.prefill_context(ids, method="duo", budget=16)
    assert all(bool((ly.head_lengths() == 16).all()) for ly in ctx.cache.layers)


def test_bad_options_are_clear():
    for kw, word in [({"retrieval_ratio": 1.5}, "retrieval_ratio"), ({"recent": 0}, "recent"),
                     ({"window": 0}, "window")]:
        with pytest.raises(ValueError, match=word):
            build_method("duo", None, **kw)


def test_induction_scores_match_a_naive_softmax_in_any_chunking():
    from kvsift.methods.duo import induction_scores

    g = torch.Generator().manual_seed(0)
    hq, hk, d, P, T = 4, 2, 8, 5, 6                   # 5 prompt slots, then the probe: T tokens twice
    n = P + 2 * T
    keys = torch.randn(1, hk, n, d, generator=g)
    pos = torch.arange(n).expand(1, hk, n).clone()
    q = torch.randn(1, hq, 2 * T, d, generator=g)
    want = torch.zeros(hk)
    for h in range(hq):
        for i in range(T):
            slot, target = P + T + i, P + i + 1         # R[i] seen again: attend to what followed it
            w = torch.softmax(keys[0, h // 2, :slot + 1] @ q[0, h, T + i] * 0.3, 0)
            want[h // 2] += w[target] / (hq // hk) / T
    whole, n_whole = induction_scores(q, keys, pos, P, T, 0.3, P)
    a, na = induction_scores(q[:, :, :7], keys[:, :, :P + 7], pos[:, :, :P + 7], P, T, 0.3, P)
    b, nb = induction_scores(q[:, :, 7:], keys, pos, P, T, 0.3, P + 7)
    torch.testing.assert_close(whole[0] / n_whole, want)
    torch.testing.assert_close((a + b)[0] / (na + nb), want)


def test_induction_probe_runs_once_and_is_dropped(tiny_llm):
    ids = random_prompt(200, seed=9)
    kw = {**OPTS, "heads": "induction", "probe": 40}       # 80 probe tokens: two 64-token chunks
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    assert tiny_llm.generate(ids, p, method="duo", budget=len(ids), method_kwargs=kw)[0].token_ids == \
        tiny_llm.generate(ids, p)[0].token_ids
    ctx = tiny_llm.prefill_context(ids, method="duo", budget=96, method_kwargs=kw)
    assert ctx.cache.seen == 200                             # the probe left no token behind
    lens = torch.stack([ly.head_lengths()[0] for ly in ctx.cache.layers])
    assert bool(((lens == 200) | (lens == 32)).all()) and int((lens == 200).sum()) >= 1
    assert all(int(_head_positions(ly, h)[-1]) == 199 for ly in ctx.cache.layers for h in range(lens.shape[1]))
