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
