"""Per-method behaviour: streaming, snapkv, pyramidkv, composition."""

import pytest
import torch

from kvsift import SamplingParams, build_method
from kvsift.methods.snapkv import window_attention_scores
from tests.conftest import random_prompt


def test_streaming_keeps_sinks_and_recent_and_rolls(tiny_llm):
    ids = random_prompt(200, seed=31)
    ctx = tiny_llm.prefill_context(ids, method="streaming", budget=40)
    for layer in ctx.cache.layers:
        pos = sorted(layer.positions[0, 0].tolist())
        assert pos == list(range(4)) + list(range(200 - 36, 200))
    # during decode the window rolls: the cache never exceeds the budget and keeps the sinks
    m = build_method("streaming", 40)
    run = m.start(200, tiny_llm.info.num_layers)
    cache, _, (fctx, logits) = tiny_llm.runner.prefill([ids], m, run, None, False, reserve=10)
    fctx.decoding = True
    nxt = fctx.next_pos
    for _ in range(10):
        logits = tiny_llm.runner.forward(fctx, logits.argmax(-1, keepdim=True), nxt[:, None])
        nxt = nxt + 1
    for layer in cache.layers:
        assert layer.length == 40
        pos = sorted(layer.positions[0, 1].tolist())
        assert pos == list(range(4)) + list(range(210 - 36, 210))


def test_streaming_positions_continue_after_eviction(tiny_llm):
    """New tokens get their true positions (prompt length + step), not the cache length."""
    ids = random_prompt(100, seed=32)
    ctx = tiny_llm.prefill_context(ids, method="streaming", budget=20)
    assert ctx.cache.seen == 100
    assert max(ctx.cache.layers[0].positions[0, 0].tolist()) == 99


def test_snapkv_keeps_window_and_attended_keys():
    torch.manual_seed(0)
    b, hq, hk, n, d, w = 1, 4, 2, 64, 16, 8
    keys = torch.randn(b, hk, n, d)
    q = torch.randn(b, hq, w, d) * 0.1
    keys[:, :, 10] = q[:, ::2].mean(2) * 50  # key 10 strongly attended by every window query
    pos = torch.arange(n).expand(b, hk, n).to(torch.int32)
    s = window_attention_scores(q, keys, pos, w, d ** -0.5)
    assert s.shape == (b, hk, n)
    assert int(s[0, 0, : n - w].argmax()) == 10
    m = build_method("snapkv", 12, window=w)
    full = m.score(q, keys, keys, pos, None, 0)
    win = full[..., -w:]
    assert (win > full[..., :-w].amax(-1, keepdim=True)).all()      # the window outranks every other key
    assert (win.diff(dim=-1) > 0).all()                             # newest first when it must be cut
    top = full.topk(12, -1).indices
    assert (top == 10).any(-1).all()


def test_snapkv_gqa_scores_average_the_group():
    torch.manual_seed(1)
    keys = torch.randn(1, 2, 20, 8)
    q = torch.randn(1, 4, 4, 8)
    pos = torch.arange(20).expand(1, 2, 20).to(torch.int32)
    s = window_attention_scores(q, keys, pos, 4, 8 ** -0.5)
    # kv head 1 is used by q heads 2 and 3 only
    s1 = window_attention_scores(q[:, 2:4], keys[:, 1:2], pos[:, 1:2], 4, 8 ** -0.5)
    torch.testing.assert_close(s[:, 1:2], s1)


def test_pyramidkv_budgets_fall_and_average_to_budget():
    m = build_method("pyramidkv", 1000)          # 1000 / beta 20 = 50: over the 32-token window
    run = m.start(10000, 10)
    budgets = [m.layer_budget(run, i) for i in range(10)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 1000 > budgets[-1]
    assert budgets[-1] == 50 and budgets[0] == 1950
    assert abs(sum(budgets) / 10 - 1000) <= 1
    # the first layer keeps at most the prompt less the window; the mean stays the budget
    run = m.start(1500, 10)
    capped = [m.layer_budget(run, i) for i in range(10)]
    assert capped[0] == 1500 - 32 and capped[-1] == 2 * 1000 - (1500 - 32) and abs(sum(capped) / 10 - 1000) <= 1


def test_pyramidkv_falls_back_to_snapkv_below_the_window(tiny_llm):
    """Where the last layer would keep fewer tokens than the observation window (budget / beta <
    window), every layer keeps the budget, as the reference PyramidKV does: the output is SnapKV's
    token for token."""
    m = build_method("pyramidkv", 100)           # 100 / 20 = 5 < 32
    run = m.start(1000, 10)
    assert [m.layer_budget(run, i) for i in range(10)] == [100] * 10
    steep = build_method("pyramidkv", 100, beta=2.0)   # 100 / 2 = 50 >= 32: the pyramid
    assert steep.layer_budget(steep.start(1000, 10), 9) == 50
    ids = random_prompt(300, seed=5)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    pyr = tiny_llm.generate(ids, params, method=build_method("pyramidkv", 40))[0]
    snap = tiny_llm.generate(ids, params, method=build_method("snapkv", 40))[0]
    assert pyr.token_ids == snap.token_ids and pyr.stats.kv_kept_bytes == snap.stats.kv_kept_bytes


def test_compose_runs_stages_in_order(tiny_llm):
    ids = random_prompt(200, seed=33)
    m = build_method("snapkv+streaming", 50)
    assert m.spec == "snapkv+streaming"
    out = tiny_llm.generate(ids, SamplingParams(max_tokens=5, ignore_eos=True), method=m)[0]
    assert out.stats.method == "snapkv+streaming" and len(out.token_ids) == 5


@pytest.mark.parametrize("text,value", [("1024", 1024), ("0.25", 0.25), ("25%", 0.25), (None, None)])
def test_parse_budget(text, value):
    from kvsift.methods import parse_budget

    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "abc", "200%"])
def test_parse_budget_rejects(text):
    from kvsift.methods import parse_budget

    with pytest.raises(ValueError):
        parse_budget(text)
