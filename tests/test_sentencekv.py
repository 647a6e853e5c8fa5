"""sentencekv: exactness at full budget, real offload accounting, LRU == direct fetch, composition."""

import pytest
import torch

from kvsift.engine.params import SamplingParams
from kvsift.methods import build_method
from kvsift.methods._offload import ChunkStore, FetchStats
from kvsift.methods.sentencekv import SentenceKV
from tests.logit_recorder import GREEDY, check_padded_batch_exact, prompt, recording_llm, run


@pytest.fixture(scope="module")
def tiny():
    return recording_llm()


@pytest.fixture(scope="module")
def full_ref(tiny):
    ids = prompt()
    return (ids, *run(tiny, ids))


@pytest.mark.parametrize("kw", [{}, {"cache_chunks": 3}, {"summary": "quest", "fingerprint": "token"},
                                {"sinks": 0, "recent": 0, "max_chunk": 16}])
def test_full_budget_is_exact(tiny, full_ref, kw):
    ids, ref, ref_logits = full_ref
    out, logits = run(tiny, ids, "sentencekv", 1.0, **kw)
    assert out[0].token_ids == ref[0].token_ids
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    ms = out[0].stats.method_stats
    assert ms["chunks_selected_per_head"] >= (len(ids) - 68) / 32  # every chunk selected
    assert out[0].stats.kv_host_bytes > 0


def test_small_budget_really_offloads_and_selects(tiny):
    ids = prompt(320, seed=1)
    ref, ref_logits = run(tiny, ids)
    out, logits = run(tiny, ids, "sentencekv", 96, sinks=4, recent=32, max_chunk=16)
    st = out[0].stats
    # the test above is not vacuous: a small budget changes the logits
    assert (logits - ref_logits).abs().max() > 1e-3
    # device keeps sinks + recent (+ decode room) and small summaries; the host holds the rest
    assert st.kv_device_bytes < 0.35 * ref[0].stats.kv_device_bytes
    per_token = 2 * 2 * 16 * 4 * 2  # k+v, kv_heads, head_dim, fp32, layers
    assert st.kv_host_bytes >= (320 - 36) * per_token
    ms = st.method_stats
    assert 0 < ms["chunks_selected_per_head"] <= 60 / 1  # 60 tokens of chunk budget
    assert ms["fetch_mib_per_step"] > 0 and ms["fetch_ms_per_step"] >= 0


def test_device_cache_matches_direct_fetch(tiny):
    ids = prompt(320, seed=2)
    a, la = run(tiny, ids, "sentencekv", 100, max_chunk=16)
    b, lb = run(tiny, ids, "sentencekv", 100, max_chunk=16, cache_chunks=4)
    assert a[0].token_ids == b[0].token_ids
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    ms = b[0].stats.method_stats
    assert 0 <= ms["device_cache_hit_rate"] <= 1
    assert ms["chunks_copied_per_step"] < a[0].stats.method_stats["chunks_copied_per_step"]


@pytest.mark.parametrize("prefill_mode", ["batch", "rows"])
def test_batch_with_padding_is_exact(tiny, prefill_mode):
    """Left-padded batch prefill, or one row at a time into one host store: both equal full."""
    check_padded_batch_exact(tiny, "sentencekv", prefill_mode, max_chunk=16)


def test_compose_snapkv_then_offload(tiny):
    ids = prompt(400, seed=5)
    snap, snap_logits = run(tiny, ids, "snapkv", 200)
    # decode budget covers everything SnapKV kept: same attention as SnapKV alone
    out, logits = run(tiny, ids, "snapkv+sentencekv", 200, max_chunk=16)
    assert out[0].token_ids == snap[0].token_ids
    torch.testing.assert_close(logits, snap_logits, atol=1e-4, rtol=1e-4)
    assert out[0].stats.method == "snapkv+sentencekv"
    # a smaller decode budget: SnapKV's kept tokens live on the host, a few chunks come back
    small, _ = run(tiny, ids, "snapkv+sentencekv", 200, max_chunk=16, decode_budget=64, recent=16)
    assert small[0].stats.kv_device_bytes < 0.5 * snap[0].stats.kv_device_bytes
    assert small[0].stats.kv_host_bytes > 0
    assert small[0].stats.method_stats["chunks_selected_per_head"] < 200 / 16


def test_context_reuse(tiny):
    doc, question = prompt(300, seed=6), prompt(20, seed=7)
    ref, ref_logits = run(tiny, doc + question)
    tiny.logits.clear()
    ctx = tiny.prefill_context(doc, method="sentencekv", budget=1.0, method_kwargs={"max_chunk": 16})
    assert ctx.cache.memory()["host"] > 0
    tiny.logits.clear()
    out = tiny.generate(question, GREEDY, method="sentencekv", budget=1.0, method_kwargs={"max_chunk": 16},
                        context=ctx)
    assert out[0].token_ids == ref[0].token_ids
    n = GREEDY.max_tokens  # the last prefill chunk's logits and the decode steps
    torch.testing.assert_close(torch.stack(tiny.logits)[-n:], ref_logits[-n:], atol=1e-4, rtol=1e-4)
    # the context's KV partly lives on the host: a method that cannot fetch it must not run silently
    with pytest.raises(RuntimeError, match="sentencekv"):
        tiny.generate(question, GREEDY, method="full", context=ctx)


@pytest.mark.parametrize("cache_chunks", [0, 2, 8])
def test_chunk_store_fetch_returns_the_right_tokens(cache_chunks):
    """Random ragged chunks (different per head, as after eviction) round-trip exactly."""
    g = torch.Generator().manual_seed(0)
    b, hk, L, d, n_chunks = 2, 3, 5, 4, 7
    lens = torch.randint(0, L + 1, (b, hk, n_chunks), generator=g)
    toks = []
    for bi in range(b):
        for h in range(hk):
            for c in range(n_chunks):
                for r in range(int(lens[bi, h, c])):
                    toks.append((bi * hk + h, c, r))
    bh, ch, rk = (torch.tensor(x) for x in zip(*toks))
    pos = ch * 10 + rk
    keys = torch.randn(len(toks), d, generator=g)
    store = ChunkStore(b, hk, L, d, torch.float32, "cpu", bounds=True, cache_chunks=cache_chunks)
    store.append(keys, -keys, pos, bh, ch, rk, n_chunks)
    assert torch.equal(store.lens, lens.to(torch.int32))
    for _ in range(6):
        k = 2
        idx = torch.stack([torch.randperm(n_chunks, generator=g)[:k] for _ in range(b * hk)]).view(b, hk, k)
        idx[0, 0, 1] = -1
        st = FetchStats()
        fk, fv, fp = store.fetch(idx, st)
        assert fk.shape == (b, hk, k * L, d) and fp.shape == (b, hk, k * L)
        for bi in range(b):
            for h in range(hk):
                want = [(int(c), r) for c in idx[bi, h] if c >= 0 for r in range(int(lens[bi, h, c]))]
                got = fp[bi, h][fp[bi, h] >= 0]
                assert got.tolist() == [c * 10 + r for c, r in want]
                sel = (bh == bi * hk + h)
                for j, (c, r) in enumerate(want):
                    t = int(((ch == c) & (rk == r) & sel).nonzero())
                    row = (fp[bi, h] == c * 10 + r).nonzero().item()
                    assert torch.equal(fk[bi, h, row], keys[t]) and torch.equal(fv[bi, h, row], -keys[t])
    dev, host = store.kv_nbytes()
    T = int(lens.sum(-1).max())  # compact host layout: no chunk padding, one pad row in all
    assert host == (b * hk * T + 1) * (2 * d * 4 + 4) and dev > 0


@pytest.mark.parametrize("bounds", [False, True])
def test_chunk_store_rows_written_one_at_a_time_match_one_batch_write(bounds):
    """``append(..., row=i)`` (sequences prefilled one by one into one batch store, in any order,
    with different chunk counts) gives the same chunks, summaries and fetches as one batch write."""
    g = torch.Generator().manual_seed(1)
    b, hk, L, d = 3, 2, 4, 8
    n_rows = [5, 2, 4]                      # chunks per batch row
    toks = []
    for bi in range(b):
        for h in range(hk):
            for c in range(n_rows[bi]):
                for r in range(int(torch.randint(1, L + 1, (1,), generator=g))):
                    toks.append((bi, h, c, r))
    bi_t, h_t, ch, rk = (torch.tensor(x) for x in zip(*toks))
    keys = torch.randn(len(toks), d, generator=g)
    pos = bi_t * 1000 + ch * 10 + rk
    whole = ChunkStore(b, hk, L, d, torch.float32, "cpu", bounds=bounds)
    whole.append(keys, -keys, pos, bi_t * hk + h_t, ch, rk, max(n_rows))
    rows = ChunkStore(b, hk, L, d, torch.float32, "cpu", bounds=bounds, capacity=64)
    for bi in (2, 0, 1):
        m = bi_t == bi
        rows.append(keys[m], -keys[m], pos[m], bi_t[m] * hk + h_t[m], ch[m], rk[m], n_rows[bi], row=bi)
    assert rows.n == whole.n and rows.T == 64
    assert torch.equal(rows.lens, whole.lens) and torch.equal(rows.mean, whole.mean)
    if bounds:
        assert torch.equal(rows.kmin, whole.kmin) and torch.equal(rows.kmax, whole.kmax)
    idx = torch.stack([torch.randperm(whole.n, generator=g)[:3] for _ in range(b * hk)]).view(b, hk, 3)
    for got, want in zip(rows.fetch(idx), whole.fetch(idx)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="already holds chunks"):
        m = bi_t == 0
        rows.append(keys[m], -keys[m], pos[m], bi_t[m] * hk + h_t[m], ch[m], rk[m], n_rows[0], row=0)
    with pytest.raises(ValueError, match="outside"):
        rows.append(keys[:1], keys[:1], pos[:1], bi_t[:1], ch[:1], rk[:1], 1, row=3)


def test_fingerprint_resets_after_sentence_end():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t)

    from kvsift.engine.attention import ForwardContext
    from kvsift.methods.sentencekv import SentenceKVState

    m = SentenceKV(budget=8)
    run = m.start(16, 1)
    state = SentenceKVState()
    ctx = ForwardContext(cache=None, method=m, run=run, tokenizer=tok)
    q1, q2, q3 = torch.ones(1, 2, 4), 3 * torch.ones(1, 2, 4), 10 * torch.ones(1, 2, 4)
    ctx.input_ids = torch.tensor([[tok.convert_tokens_to_ids("a")]])
    assert torch.equal(m._fingerprint(run, state, q1, ctx), q1)
    assert torch.equal(m._fingerprint(run, state, q2, ctx), 2 * torch.ones(1, 2, 4))  # mean of the sentence
    ctx.input_ids = torch.tensor([[tok.convert_tokens_to_ids(".")]])
    assert torch.equal(m._fingerprint(run, state, q3, ctx), q3)  # "." ended the sentence: reset
    assert state.fp_count is not None and state.store is None and not state.offloaded


def test_bad_options():
    for kw, msg in [({"fingerprint": "x"}, "fingerprint"), ({"summary": "x"}, "summary"), ({"sinks": -1}, "sinks"),
                    ({"min_chunk": 9, "max_chunk": 4}, "max_len"), ({"splitter": "nltk"}, "splitter"),
                    ({"cache_chunks": -2}, "cache_chunks"), ({"decode_budget": 0}, "budget")]:
        with pytest.raises(ValueError, match=msg):
            build_method("sentencekv", 64, **kw)
    with pytest.raises(ValueError, match="budget"):
        build_method("sentencekv", None)


@pytest.mark.real
def test_default_model_exact_at_full_budget(real_llm):
    from importlib.resources import files

    text = files("kvsift").joinpath("data/alice_ch1_3.txt").read_text()[:1500]
    p = text + "\n\nQuestion: who is the main character? Answer in one sentence."
    params = SamplingParams(max_tokens=6)
    ref = real_llm.generate(p, params)[0]
    out = real_llm.generate(p, params, method="sentencekv", budget=1.0)[0]
    assert out.token_ids == ref.token_ids
    st = out.stats
    assert st.kv_host_bytes > 0.8 * ref.stats.kv_device_bytes  # the prompt's KV really moved to the host
    assert st.kv_device_bytes < 0.3 * ref.stats.kv_device_bytes


def test_sentencekv_context_answers_with_default_method(tiny_llm):
    """A question over a sentencekv context needs no method argument: the context's own is used."""
    from kvsift import SamplingParams
    from tests.conftest import random_prompt

    doc, q = random_prompt(200, seed=41), random_prompt(12, seed=42)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    ctx = tiny_llm.prefill_context(doc, method="sentencekv", budget=200)
    assert ctx.needs_planner
    assert tiny_llm.generate(q, p, context=ctx)[0].token_ids == tiny_llm.generate(doc + q, p)[0].token_ids
