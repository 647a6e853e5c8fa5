"""``decoding(<scorer>)``: the scorer re-applied every ``interval`` generated tokens, so a long
generation's cache stays within ``budget + interval`` tokens per head."""

import pytest

from kvsift import SamplingParams, build_method
from kvsift.errors import MethodOptionError
from tests.conftest import decode_greedy, random_prompt


def _lengths_during(llm, ids, max_tokens, **kw):
    """Layer 0's used length after prefill and after every decode step of a generation."""
    m = build_method("decoding", kw.pop("budget"), **kw)
    seen = []
    decode_greedy(llm, m, [ids], max_tokens, each=lambda step, c: seen.append(c.layers[0].length))
    return seen


def test_cache_stays_within_budget_plus_interval(tiny_llm):
    ids = random_prompt(200, seed=1)
    seen = _lengths_during(tiny_llm, ids, 40, budget=48, interval=8)
    assert seen[0] == 48                                   # the prompt compressed at prefill end
    assert max(seen) <= 48 + 8
    assert seen[8] == 48 and seen[16] == 48                # each 8th step compresses back
    # kvpress's DecodingPress way: the prompt untouched, the first compression after `interval` steps
    seen = _lengths_during(tiny_llm, ids, 20, budget=48, interval=8, prefill=False)
    assert seen[0] == 200 and seen[7] == 207 and seen[8] == 48


def test_bytes_really_drop_and_whole_budget_is_exact(tiny_llm):
    ids = random_prompt(200, seed=2)
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    out = tiny_llm.generate(ids, p, method="decoding", budget=48, method_kwargs={"interval": 8, "prefill": False})[0]
    assert out.stats.kv_device_bytes_end < out.stats.kv_device_bytes / 2
    assert out.stats.decode_mode == "eager"
    short = SamplingParams(max_tokens=8, ignore_eos=True)
    full = tiny_llm.generate(ids, short)[0].token_ids
    assert tiny_llm.generate(ids, short, method="decoding(streaming)", budget=len(ids))[0].token_ids == full


def test_wraps_only_scorers_that_score_from_queries():
    assert build_method("decoding(pyramidkv)", 64).spec == "decoding(pyramidkv)"
    with pytest.raises(MethodOptionError, match="wraps a scorer"):
        build_method("decoding(sentencekv)", 64)
    with pytest.raises(MethodOptionError, match="wraps a scorer"):
        build_method("decoding(adakv(snapkv))", 64)
    for kw, word in [({"interval": 0}, "interval"), ({"query_window": 0}, "query_window")]:
        with pytest.raises(ValueError, match=word):
            build_method("decoding", 64, **kw)


@pytest.mark.parametrize("spec", ["decoding", "decoding(h2o)"])
def test_a_batch_prefilled_row_by_row_compresses_like_one_prefilled_at_once(spec):
    """Row-by-row prefill (each row's full KV on the device alone) keeps each row's query window in
    the batch cache, so the decode-time compressions that follow see the same queries as after a
    batch prefill: the same tokens (a KeyError at the first decode step before)."""
    from kvsift import LLM
    from kvsift.models import tiny_model

    m = tiny_model("llama", seed=1)
    ids = [random_prompt(300, seed=8), random_prompt(260, seed=9), random_prompt(20, seed=10)]
    p = SamplingParams(max_tokens=10, ignore_eos=True)
    kw = {"interval": 3, "query_window": 16}
    out = {mode: LLM.from_model(m, None, chunk_size=64, prefill_mode=mode).generate(
        ids, p, method=spec, budget=64, method_kwargs=kw) for mode in ("batch", "rows")}
    assert [x.token_ids for x in out["rows"]] == [x.token_ids for x in out["batch"]]


@pytest.mark.parametrize("spec,kw", [("decoding", {"interval": 3}), ("decoding", {"interval": 4, "prefill": False}),
                                     ("decoding(tova)", {"interval": 3, "query_window": 8})])
def test_requests_join_a_running_batch_and_compress_as_alone(tiny_llm, spec, kw):
    """decoding(...) joins: requests of other prompt lengths are stacked into a running batch (padding
    between each row's prompt and the common decode slots), each row counts its own steps and is
    scored over its own tokens in order, so every answer equals the request's alone; the joined
    rows compress at steps of their own (not the batch's), and a request whose prompt does not fill
    the query window, or of another budget, does not share the join key."""
    from kvsift.engine.scheduler import join_key
    from kvsift.methods import decoding as dec
    from tests.test_engine_scheduler import run_with_joins

    p_a, p_b, p_c = random_prompt(200, seed=81), random_prompt(90, seed=82), random_prompt(150, seed=83)
    pa, pb, pc = (SamplingParams(max_tokens=n, ignore_eos=True) for n in (14, 9, 8))
    want = [tiny_llm.generate(p, q, method=spec, budget=48, method_kwargs=kw)[0].token_ids
            for p, q in ((p_a, pa), (p_b, pb), (p_c, pc))]
    a, b, c = (tiny_llm.request([p], q, method=spec, budget=48, method_kwargs=kw)
               for p, q in ((p_a, pa), (p_b, pb), (p_c, pc)))
    assert tiny_llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c)
    assert join_key(tiny_llm.request([p_b], pb, method=spec, budget=40, method_kwargs=kw)) != join_key(a)
    qw = kw.get("query_window", 32)
    s1, s2 = (tiny_llm.request([p_a[:qw - 1]], pb, method=spec, budget=4, method_kwargs=kw) for _ in range(2))
    assert join_key(s1) != join_key(s2)        # a window shorter than query_window joins no one
    cuts = []
    real = dec.DecodingCompress._compress_rows

    def seen(self, layer, win, due, k, module):
        if layer.layer_idx == 0:
            cuts.append(due.tolist())
        return real(self, layer, win, due, k, module)

    dec.DecodingCompress._compress_rows = seen
    try:
        outs, steps = run_with_joins(tiny_llm, a, {2: [b], 4: [c]})
    finally:
        dec.DecodingCompress._compress_rows = real
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert max(steps) >= 2 and any(0 < sum(d) < len(d) for d in cuts)   # rows of a batch at other phases


@pytest.mark.parametrize("prefill", [True, False])
def test_joined_rows_keep_exactly_the_positions_they_keep_alone(tiny_llm, prefill):
    """Sharper than the answers: after every decode step and layer, each joined row holds exactly the
    positions (per KV head) that it holds alone after the same number of its own steps (fails when
    a joined row is scored over the padded slot order, or at the batch's step count)."""
    from kvsift.methods import decoding as dec
    from tests.test_engine_scheduler import run_with_joins

    kw = {"interval": 3, "query_window": 16, "prefill": prefill}
    prompts = [random_prompt(n, seed=300 + n) for n in (120, 60, 90)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (13, 8, 7)]
    held: dict = {}
    real = dec.DecodingCompress.after_attend

    def record(self, run, layer, query, module, ctx):
        real(self, run, layer, query, module, ctx)
        if not ctx.decoding:
            return
        win = layer.state[self.name]
        pos = layer.positions
        for i in range(pos.shape[0]):
            steps = win.steps[i] if win.steps is not None else win.decoded
            heads = tuple(tuple(sorted(p[p >= 0].tolist())) for p in pos[i])
            prompt_len = max(max(h) for h in heads) - steps + 1
            held.setdefault(record.phase, {})[(prompt_len, steps, layer.layer_idx)] = heads

    dec.DecodingCompress.after_attend = record
    try:
        record.phase = "alone"
        for x, q in zip(prompts, params):
            tiny_llm.generate(x, q, method="decoding", budget=32, method_kwargs=kw)
        record.phase = "joined"
        reqs = [tiny_llm.request([x], q, method="decoding", budget=32, method_kwargs=kw) for x, q in zip(prompts, params)]
        run_with_joins(tiny_llm, reqs[0], {2: [reqs[1]], 5: [reqs[2]]})
    finally:
        dec.DecodingCompress.after_attend = real
    joined = held["joined"]
    assert {k[0] for k in joined} == {120, 60, 90} and len(joined) >= 40
    assert all(joined[k] == held["alone"][k] for k in joined)
