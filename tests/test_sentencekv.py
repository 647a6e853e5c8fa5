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


def test_warm_cache_fills_the_cache_first_and_keeps_the_tokens(tiny):
    """warm_cache: the first decode step fills the whole device cache (8 slots per row and head)
    with the best-scored chunks, not only its selection (2-3 chunks), so the next steps copy fewer
    chunks; the attended chunks, and so the tokens and logits, are the same as without it."""
    import kvsift.kernels.chunk_cache as cc
    from kvsift.methods.sentencekv import SentenceKV

    ids = prompt(480, seed=3)
    runs = {}
    for warm in (False, True):
        per_step, real_plan, real = [], SentenceKV.plan, cc.lru_plan_ref

        def plan(self, run_, layer, query, ctx):
            if ctx.decoding and layer.layer_idx == 0:
                per_step.append(0)
            return real_plan(self, run_, layer, query, ctx)

        def spy(idx, *a, **k):
            out = real(idx, *a, **k)
            per_step[-1] += int((out[1] >= 0).sum())   # chunks copied (cache misses)
            return out

        SentenceKV.plan, cc.lru_plan_ref = plan, spy
        try:
            out, logits = run(tiny, ids, "sentencekv", 80, SamplingParams(max_tokens=12, ignore_eos=True),
                              max_chunk=16, recent=16, cache_chunks=8, warm_cache=warm)
        finally:
            SentenceKV.plan, cc.lru_plan_ref = real_plan, real
        runs[warm] = (out[0].token_ids, logits, per_step)
    (t_cold, l_cold, m_cold), (t_warm, l_warm, m_warm) = runs[False], runs[True]
    assert t_cold == t_warm
    torch.testing.assert_close(l_cold, l_warm, atol=1e-5, rtol=1e-5)
    assert m_warm[0] > m_cold[0]                       # the fill: more chunks at the first step
    assert sum(m_warm[1:]) < sum(m_cold[1:]), (m_cold, m_warm)
    on, off = build_method("sentencekv", 80, warm_cache=True), build_method("sentencekv", 80)
    assert on.warm_cache and not off.warm_cache


def test_stack_marks_the_rows_that_came_in_without_a_cache():
    """A stack of a store whose device cache holds chunks and a fresh one carries the first's cache
    and marks the second row cold (warm_cache fills that row only); a cached fetch clears it."""
    g = torch.Generator().manual_seed(5)
    stores = []
    for _ in range(2):
        st = ChunkStore(1, 2, 4, 8, torch.float32, "cpu", cache_chunks=4)
        n = 6
        bh = torch.arange(2).repeat_interleave(n * 4)
        ch = torch.arange(n).repeat_interleave(4).repeat(2)
        rk = torch.arange(4).repeat(2 * n)
        keys = torch.randn(bh.numel(), 8, generator=g)
        st.append(keys, -keys, ch * 10 + rk, bh, ch, rk, n)
        stores.append(st)
    assert stores[0].cache_cold and stores[0].cold_rows is None       # no cache made yet: every row
    stores[0].fetch(torch.tensor([[[0, 1], [2, 3]]]), FetchStats())
    assert not stores[0].cache_cold
    both = ChunkStore.stack([(stores[0], 0), (stores[1], 0)])
    assert both.cache_cold and both.cold_rows == [1]
    both.fetch(torch.tensor([[[0, 1], [2, 3]], [[4, 5], [1, -1]]]), FetchStats())
    assert not both.cache_cold and both.cold_rows == []
    fresh = ChunkStore.stack([(stores[1], 0)])
    assert fresh.cache_cold and fresh.cold_rows is None


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
        # compact=True (a CPU store without a device cache): the same tokens in the same order, each
        # (batch, kv_head)'s first, no chunk's pad slots; with a device cache it changes nothing
        ck, cv, cp, cs = store.fetch(idx, slots=True, compact=True)
        valid = fp >= 0
        width = int(valid.sum(-1).max())
        if cache_chunks == 0:
            assert cp.shape == (b, hk, width) and ck.shape == (b, hk, width, d) and cs.shape == (b, hk, width)
        for bi in range(b):
            for h in range(hk):
                got = cs[bi, h] >= 0                         # the slots read (a device cache: its slots)
                kk, vv, pp = (t[bi, h][cs[bi, h][got].long()] for t in (ck, cv, cp))
                assert pp.tolist() == fp[bi, h][valid[bi, h]].tolist()
                assert torch.equal(kk, fk[bi, h][valid[bi, h]]) and torch.equal(vv, fv[bi, h][valid[bi, h]])
                if cache_chunks == 0 and width < k * L:
                    assert got[: int(got.sum())].all()       # the tokens first, then padding
                    assert torch.equal(cs[bi, h], torch.where(got, torch.arange(width), -1).to(cs.dtype))
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
                    ({"cache_chunks": -2}, "cache_chunks"), ({"decode_budget": 0}, "budget"),
                    ({"warm_cache": "yes"}, "warm_cache")]:
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


# ---- prefill_offload: prompts longer than device memory ---------------------------------------------
def _device_lengths_during_prefill(llm, monkeypatch):
    """Record every layer's device slot count and store chunk count after each prefill chunk."""
    seen = []
    orig = SentenceKV._offload

    def spy(self, run, layer, state, ctx, row, final):
        seen.append((final, layer.length, state.store.n if state.store is not None else 0))
        return orig(self, run, layer, state, ctx, row, final)

    monkeypatch.setattr(SentenceKV, "_offload", spy)
    return seen


def test_prefill_offload_is_exact_and_holds_one_chunk(tiny, monkeypatch):
    """Offloading after every prefill chunk, with every stored chunk attended (no prefill_budget):
    the same tokens and logits as full, while a layer's device buffer never held more than sinks +
    recent + a straddling sentence chunk + one prefill chunk (64), and the store grew chunk by chunk."""
    ids = prompt(480, seed=11)
    ref, ref_logits = run(tiny, ids)
    seen = _device_lengths_during_prefill(tiny, monkeypatch)
    out, logits = run(tiny, ids, "sentencekv", 1.0, max_chunk=16, recent=32, prefill_offload=True)
    assert out[0].token_ids == ref[0].token_ids
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    mid = [s for s in seen if not s[0]]
    assert len(mid) == 2 * (480 // 64)                      # every layer after every chunk but the last
    hold = 4 + 32 + 16
    assert max(n for _, n, _ in mid) <= hold + 64             # never the whole prompt on the device
    counts = [c for _, _, c in mid[::2]]                      # layer 0's store, chunk after chunk
    assert counts == sorted(counts) and counts[-1] > counts[0] >= 0
    assert out[0].stats.kv_host_bytes > 0


def test_prefill_offload_matches_the_offload_at_the_end(tiny):
    """At a small decode budget the decode attends to the same chunks either way (the exact prefill
    under prefill_offload gives the same KV and the same chunk layout)."""
    ids = prompt(400, seed=12)
    a, la = run(tiny, ids, "sentencekv", 96, max_chunk=16, recent=32)
    b, lb = run(tiny, ids, "sentencekv", 96, max_chunk=16, recent=32, prefill_offload=True)
    assert a[0].token_ids == b[0].token_ids
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert a[0].stats.method_stats["chunks_selected_per_head"] == b[0].stats.method_stats["chunks_selected_per_head"]


def test_prefill_budget_selects_stored_chunks_per_prefill_chunk(tiny):
    """prefill_budget: a later prefill chunk attends to the stored chunks its mean query selects
    (InfLLM-style): not exact at a small budget; exact again when the budget covers the store."""
    ids = prompt(480, seed=13)
    ref, ref_logits = run(tiny, ids)
    small, ls = run(tiny, ids, "sentencekv", 1.0, max_chunk=16, prefill_offload=True, prefill_budget=48)
    assert torch.equal(ls[0], ref_logits[0])                  # the first chunk has nothing stored yet
    assert (ls[-4] - ref_logits[-4]).abs().max() > 1e-3      # the last chunk's prefill attended to less
    win, lw = run(tiny, ids, "sentencekv", 1.0, max_chunk=16, prefill_offload=True, prefill_budget=48,
                  prefill_window=8)                       # the chunk's last 8 queries choose instead
    assert (lw[-4] - ls[-4]).abs().max() > 1e-4 and torch.equal(lw[0], ref_logits[0])
    big, lb = run(tiny, ids, "sentencekv", 1.0, max_chunk=16, prefill_offload=True, prefill_budget=480)
    assert big[0].token_ids == ref[0].token_ids
    torch.testing.assert_close(lb, ref_logits, atol=1e-4, rtol=1e-4)


def test_prefill_offload_padded_batch_and_kivi(tiny):
    """A left-padded batch prefilled together (rows are not prefilled one by one under
    prefill_offload) equals full; sentencekv+kivi offloads quantized chunks as it goes."""
    check_padded_batch_exact(tiny, "sentencekv", "auto", max_chunk=16, prefill_offload=True)
    ids = prompt(400, seed=14)
    a, _ = run(tiny, ids, "sentencekv+kivi", 96, max_chunk=16, prefill_offload=True)
    b, _ = run(tiny, ids, "sentencekv+kivi", 96, max_chunk=16)
    assert a[0].stats.kv_host_bytes == b[0].stats.kv_host_bytes > 0   # the same quantized chunks
    assert a[0].token_ids == b[0].token_ids


def test_prefill_offload_options():
    m = build_method("sentencekv", 128, prefill_offload=True, prefill_budget=0.25)
    assert m.prefill_hold(m.start(1000, 2)) == 4 + 64 + 32 and not m.row_prefill_ok()
    assert m.start(1000, 2).prefill_tokens == 250
    assert build_method("sentencekv", 64).prefill_hold(None) is None
    with pytest.raises(ValueError, match="prefill_offload"):
        build_method("sentencekv", 64, prefill_budget=128)
    with pytest.raises(ValueError, match="prefill_budget"):
        build_method("sentencekv", 64, prefill_offload=True, prefill_budget=0)
    with pytest.raises(ValueError, match="prefill_offload"):
        build_method("sentencekv", 64, prefill_offload="yes")
    with pytest.raises(ValueError, match="prefill_window"):
        build_method("sentencekv", 64, prefill_offload=True, prefill_window=8)
    with pytest.raises(ValueError, match="prefill_window"):
        build_method("sentencekv", 64, prefill_offload=True, prefill_budget=64, prefill_window=0)
    with pytest.raises(ValueError, match="prefill_block"):
        build_method("sentencekv", 64, prefill_offload=True, prefill_block=16)
    with pytest.raises(ValueError, match="prefill_block"):
        build_method("sentencekv", 64, prefill_offload=True, prefill_budget=64, prefill_block=0)


def test_prefill_block_selects_per_block_of_queries(tiny, monkeypatch):
    """prefill_block: each block of a prefill chunk's queries selects its own stored chunks. One
    block as wide as the chunk is the whole-chunk selection; narrower blocks select apart (other
    logits at a small budget, and each block's fetch is its own); a budget that covers the store is
    exact again."""
    from kvsift.methods import base

    ids = prompt(480, seed=31)
    ref, ref_logits = run(tiny, ids)
    whole, lw = run(tiny, ids, "sentencekv", 1.0, max_chunk=16, prefill_offload=True, prefill_budget=48)
    one, lo = run(tiny, ids, "sentencekv", 1.0, max_chunk=16, prefill_offload=True, prefill_budget=48,
                  prefill_block=64)                               # the chunk size: one block
    assert one[0].token_ids == whole[0].token_ids and torch.equal(lo, lw)
    made = []
    real = base.Selection.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        if self.blocks:
            made.append([s for s, _ in self.blocks])

    monkeypatch.setattr(base.Selection, "__init__", spy)
    small, ls = run(tiny, ids, "sentencekv", 1.0, max_chunk=16, prefill_offload=True, prefill_budget=48,
                    prefill_block=16)
    assert made and all(m == list(range(0, 16 * len(m), 16)) for m in made)   # blocks of 16 rows
    assert {len(m) for m in made} == {4, 2}                   # 64-token chunks, and the last one of 32
    assert torch.equal(ls[0], ref_logits[0])                  # the first chunk has nothing stored yet
    assert (ls[-4] - lw[-4]).abs().max() > 1e-4              # the blocks chose other chunks
    big, lb = run(tiny, ids, "sentencekv", 1.0, max_chunk=16, prefill_offload=True, prefill_budget=480,
                  prefill_block=16)
    assert big[0].token_ids == ref[0].token_ids
    torch.testing.assert_close(lb, ref_logits, atol=1e-4, rtol=1e-4)


def test_selection_blocks_are_validated():
    from kvsift.methods.base import Selection, SlotSource

    z = torch.zeros(1, 1, 2, 4)
    src = SlotSource(z, z, torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, dtype=torch.int64))
    assert Selection(blocks=[(0, src), (8, src)]).blocks
    for bad in ([], [(4, src)], [(0, src), (0, src)]):
        with pytest.raises(ValueError, match="blocks"):
            Selection(blocks=bad)
    with pytest.raises(ValueError, match="blocks"):
        Selection(extra=src, blocks=[(0, src)])


def test_chunk_store_appended_in_parts_matches_one_write():
    """Chunks appended over several calls (a prompt offloaded chunk by chunk) read back as one write."""
    g = torch.Generator().manual_seed(2)
    b, hk, L, d, n = 1, 2, 4, 8, 9
    toks = [(h, c, r) for h in range(hk) for c in range(n) for r in range(L)]
    bh, ch, rk = (torch.tensor(x) for x in zip(*toks))
    keys = torch.randn(len(toks), d, generator=g)
    pos = ch * L + rk
    whole = ChunkStore(b, hk, L, d, torch.float32, "cpu", bounds=True)
    whole.append(keys, -keys, pos, bh, ch, rk, n)
    parts = ChunkStore(b, hk, L, d, torch.float32, "cpu", bounds=True, capacity=n * L)
    for lo, hi in ((0, 2), (2, 7), (7, 9)):
        m = (ch >= lo) & (ch < hi)
        parts.append(keys[m], -keys[m], pos[m], bh[m], ch[m] - lo, rk[m], hi - lo)
    assert parts.n == n and parts.T == n * L
    assert torch.equal(parts.lens, whole.lens) and torch.equal(parts.mean, whole.mean)
    idx = torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(b * hk)]).view(b, hk, 4)
    for got, want in zip(parts.fetch(idx), whole.fetch(idx)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefill_offload_exact_under_graphs():
    """On CUDA the chunks go to pinned host memory as the prefill goes (asynchronous copies of each
    head's new rows); graph decode over them equals full, and sentencekv+kivi's quantized store
    written in parts decodes as the one written at the end."""
    from kvsift.engine.llm import LLM
    from kvsift.models.tiny import tiny_model

    m = tiny_model("llama", seed=1).to("cuda")
    llm = LLM.from_model(m, None, chunk_size=64, decode_mode="graph")
    ids = [prompt(300, seed=8), prompt(260, seed=9)]
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = llm.generate(ids, p, method="full")
    out = llm.generate(ids, p, method="sentencekv", budget=1.0, method_kwargs={"prefill_offload": True})
    assert [x.token_ids for x in out] == [x.token_ids for x in ref] and out[0].stats.decode_mode == "graph"
    a = llm.generate(ids[0], p, method="sentencekv+kivi", budget=96, method_kwargs={"prefill_offload": True})
    b = llm.generate(ids[0], p, method="sentencekv+kivi", budget=96)
    assert a[0].token_ids == b[0].token_ids and a[0].stats.kv_host_bytes == b[0].stats.kv_host_bytes


# ---- a context's host store read by reference ---------------------------------------------------------
def test_context_questions_read_the_host_store_by_reference(tiny):
    """Questions over a sentencekv context, batched: every row reads the context's host rows (no
    copy: the same host tensors, counted once); each question's tokens stay on its
    row's device buffer; the answers equal each question asked alone, and at a full budget the
    uncompressed document + question."""
    doc, qs = prompt(300, seed=6), [prompt(20, seed=s) for s in (7, 8, 9)]
    kw = {"max_chunk": 16}
    ctx = tiny.prefill_context(doc, method="sentencekv", budget=1.0, method_kwargs=kw)
    m = build_method("sentencekv", 96, **kw)
    with tiny.lock:
        cache, stats, _ = tiny.runner.prefill(qs, m, m.start(ctx.length + 20, 2), ctx, False, reserve=4)
    for src, dst in zip(ctx.cache.layers, cache.layers):
        a, b = src.state["sentencekv"].store, dst.state["sentencekv"].store
        assert b.b == 3 and b.shared and b.k.data_ptr() == a.k.data_ptr() and b.pos.data_ptr() == a.pos.data_ptr()
        assert b.n == a.n                                       # the questions added no chunks
        assert int(dst.positions.max()) == ctx.length + 19      # ... their tokens are on the device
    assert stats.kv_host_bytes == ctx.cache.memory()["host"]     # the context's, counted once
    for budget in (96, 1.0):
        together = tiny.generate(qs, GREEDY, method="sentencekv", budget=budget, method_kwargs=kw, context=ctx)
        alone = [tiny.generate(q, GREEDY, method="sentencekv", budget=budget, method_kwargs=kw, context=ctx)[0]
                 for q in qs]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.token_ids for o in together] == [run(tiny, doc + q)[0][0].token_ids for q in qs]


@pytest.mark.parametrize("bits", [0, 4])
def test_repeated_store_reads_the_context_rows_and_copies_them_before_a_write(bits):
    """repeat_batch maps every new row onto the batch-1 store's rows: fetches read what a copy
    would hold; an append first makes the rows its own (own_host) and leaves the original intact."""
    g = torch.Generator().manual_seed(3)
    hk, L, d, n = 2, 4, 8, 5
    toks = [(h, c, r) for h in range(hk) for c in range(n) for r in range(L - (c % 2))]
    bh, ch, rk = (torch.tensor(x) for x in zip(*toks))
    keys = torch.randn(len(toks), d, generator=g)
    one = ChunkStore(1, hk, L, d, torch.float32, "cpu", bits=bits, vgroup=8 if bits else 0)
    one.append(keys, -keys, ch * L + rk, bh, ch, rk, n)
    ref = [one.fetch(torch.tensor([[[c, (c + 1) % n]] for c in range(hk)]).view(1, hk, 2))]
    rep = one.clone()
    rep.repeat_batch(3)
    assert rep.shared and rep.k.data_ptr() == one.k.data_ptr() and rep.kv_nbytes()[1] == one.kv_nbytes()[1]
    idx = torch.tensor([[c, (c + 1) % n] for c in range(hk)]).view(1, hk, 2).repeat(3, 1, 1)
    got = rep.fetch(idx)
    for t, want in zip(got, ref[0]):
        assert torch.equal(t, want.expand_as(t))
    before = one.k.clone()
    rep.append(keys[:3], -keys[:3], torch.tensor([100, 101, 102]), torch.tensor([0, 0, 5]),
               torch.tensor([0, 0, 0]), torch.tensor([0, 1, 0]), 1)
    assert not rep.shared and rep.k.data_ptr() != one.k.data_ptr() and torch.equal(one.k, before)
    for t, want in zip(rep.fetch(idx), ref[0]):      # the chunks read before are still there
        assert torch.equal(t, want.expand_as(t))
    new = rep.fetch(torch.full((3, hk, 1), n, dtype=torch.int64))[2]
    assert new[0, 0, :2].tolist() == [100, 101] and new[2, 1, 0].item() == 102 and new[1, 0, 0].item() == -1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["sentencekv", "sentencekv+kivi"])
def test_cuda_context_questions_share_the_pinned_store(spec):
    """On CUDA (pinned host store, UVA fetch kernels, device chunk cache, CUDA graphs) batched
    questions over a context read its host rows by reference and answer as each alone."""
    from kvsift.engine.llm import LLM
    from kvsift.models.tiny import tiny_model

    llm = LLM.from_model(tiny_model("llama", seed=1).to("cuda"), None, chunk_size=64, decode_mode="graph")
    doc, qs = prompt(400, seed=6), [prompt(20, seed=s) for s in (7, 8, 9)]
    ctx = llm.prefill_context(doc, method=spec, budget=96)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    together = llm.generate(qs, p, method=spec, budget=96, context=ctx)
    alone = [llm.generate(q, p, method=spec, budget=96, context=ctx)[0] for q in qs]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert together[0].stats.decode_mode == "graph"
    store = ctx.cache.layers[0].state["sentencekv"].store
    assert together[0].stats.kv_host_bytes == ctx.cache.memory()["host"] and store.k.is_pinned()


@pytest.mark.parametrize("bits", [0, 4])
def test_stacked_stores_read_each_row_where_it_is_and_copy_it_on_a_write(bits):
    """ChunkStore.stack over rows of two stores (two host segments, different chunk counts, a row
    that stored nothing): each row fetches what its own store gives; own_host copies every row into
    one block and the fetches do not change."""
    g = torch.Generator().manual_seed(4)
    hk, L, d = 2, 4, 8

    def store(b, n, seed):
        toks = [(bi * hk + h, c, r) for bi in range(b) for h in range(hk) for c in range(n) for r in range(L - c % 2)]
        bh, ch, rk = (torch.tensor(x) for x in zip(*toks))
        keys = torch.randn(len(toks), d, generator=g)
        st = ChunkStore(b, hk, L, d, torch.float32, "cpu", bits=bits, vgroup=8 if bits else 0)
        st.append(keys, -keys, seed * 1000 + ch * L + rk, bh, ch, rk, n)
        return st

    s1, s2 = store(2, 5, 1), store(1, 3, 2)
    stacked = ChunkStore.stack([(s1, 1), (None, 0), (s2, 0), (s1, 0)])
    assert stacked.b == 4 and stacked.n == 5 and stacked.shared and len(stacked._segs) == 2
    idx = torch.tensor([[[0, 2], [1, 3]], [[0, 1], [0, 1]], [[0, 2], [1, 2]], [[4, 3], [2, 0]]])
    want = []
    for (src, row), ix in zip([(s1, 1), (None, 0), (s2, 0), (s1, 0)], idx):
        if src is None:
            want.append(None)
            continue
        want.append(src.fetch(torch.full((src.b, hk, 2), -1, dtype=torch.int64).index_copy_(
            0, torch.tensor([row]), ix[None]))[2][row])
    got = stacked.fetch(idx)[2]
    for i, w in enumerate(want):
        if w is None:
            assert bool((got[i] == -1).all())              # no chunks: nothing comes back
        else:
            assert torch.equal(got[i], w)
    full = [t.clone() for t in stacked.fetch(idx)]
    stacked.own_host()
    assert not stacked.shared and stacked._segs is None and stacked.T == int(stacked.used.max())
    for a, b in zip(stacked.fetch(idx), full):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [0, 4])
def test_stacked_store_keeps_the_rows_device_chunk_caches(bits):
    """A join restacks the running rows' stores: each row's device chunk cache comes along (its
    slots, LRU stamps and chunk map), so the chunks it held are hits on the next step, not copies
    from the host; the KV fetched is the same as without the caches."""
    g = torch.Generator().manual_seed(6)
    hk, L, d = 2, 4, 8

    def store(b, n, seed, cache):
        toks = [(bi * hk + h, c, r) for bi in range(b) for h in range(hk) for c in range(n) for r in range(L - c % 2)]
        bh, ch, rk = (torch.tensor(x) for x in zip(*toks))
        keys = torch.randn(len(toks), d, generator=g)
        st = ChunkStore(b, hk, L, d, torch.float32, "cpu", cache_chunks=cache, bits=bits, vgroup=8 if bits else 0)
        st.append(keys, -keys, seed * 1000 + ch * L + rk, bh, ch, rk, n)
        return st

    s1, s2 = store(2, 5, 1, 4), store(1, 3, 2, 6)
    s1.fetch(torch.tensor([[[0, 2], [1, 3]], [[4, 3], [2, 0]]]))       # rows cache what they read
    s2.fetch(torch.tensor([[[0, 2], [1, 2]]]))
    sources = [(s1, 1), (None, 0), (s2, 0), (s1, 0)]
    stacked = ChunkStore.stack(sources)
    idx = torch.tensor([[[4, 3], [2, 0]], [[-1, -1], [-1, -1]], [[0, 2], [1, 2]], [[0, 2], [1, 3]]])
    assert stacked._dev is not None and stacked._dev["owner"].shape[1] == 6 + 1   # the largest source cache
    got = stacked.fetch(idx)
    lookups, misses = stacked._dev["counts"].tolist()
    assert lookups == 12 and misses == 0                                 # every chunk asked was cached
    cold = ChunkStore.stack(sources)
    cold._dev = None                                                     # as before: an empty cache
    ref = cold.fetch(idx)
    assert cold._dev["counts"].tolist() == [12, 12]
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    # a row's LRU clock goes on: a new chunk takes the least recently used slot of that row only
    more = stacked.fetch(torch.tensor([[[1, -1], [4, -1]], [[-1, -1], [-1, -1]], [[-1, -1], [-1, -1]],
                                       [[4, -1], [3, -1]]]))
    assert stacked._dev["counts"].tolist() == [12 + 4, 3]               # row 3 head 1 had chunk 3 cached
    assert torch.equal(more[2][0, 0, :L], s1.fetch(torch.tensor([[[-1], [-1]], [[1], [-1]]]))[2][1, 0, :L])


def test_prompt_is_segmented_beside_its_prefill(tiny):
    """The prompt's sentence chunks are computed on a worker thread from the first prefill layer on,
    and the offload uses them (the same spans as segmenting at the end)."""
    from kvsift.segment import SegmentConfig, segment_tokens

    ids = [prompt(400, seed=15)]
    m = build_method("sentencekv", 96, max_chunk=16)
    run_ = m.start(400, 2)
    with tiny.lock:
        tiny.runner.prefill(ids, m, run_, None, False, reserve=4)
    assert run_.segments is not None and run_.segments[0] is not None and run_.segments[2].done()
    assert run_.segments[2].result() == [segment_tokens(ids[0], None, SegmentConfig(8, 16, "rules"))]
    assert run_.chunk_map is not None


def test_stacked_store_compacts_when_rows_that_left_hold_most_of_its_bytes(monkeypatch):
    """Stacking one row of a store whose other rows are gone: once the host segments hold more than
    twice what the stacked rows use (plus COMPACT_SLACK), the rows are copied into one block of
    their own; the fetches do not change."""
    import kvsift.methods._offload as off

    g = torch.Generator().manual_seed(5)
    hk, L, d, b, n = 2, 4, 8, 6, 5
    toks = [(r, c, t) for r in range(b * hk) for c in range(n) for t in range(L)]
    bh, ch, rk = (torch.tensor(x) for x in zip(*toks))
    keys = torch.randn(len(toks), d, generator=g)
    big = ChunkStore(b, hk, L, d, torch.float32, "cpu")
    big.append(keys, -keys, ch * L + rk, bh, ch, rk, n)
    idx = torch.tensor([[[0, 3], [1, 4]]])
    want = [t[2:3] for t in big.fetch(idx.repeat(b, 1, 1))]
    kept = ChunkStore.stack([(big, 2)])
    assert kept.shared and kept.k.data_ptr() == big.k.data_ptr()    # within the slack: read in place
    monkeypatch.setattr(off, "COMPACT_SLACK", 0)
    small = ChunkStore.stack([(big, 2)])
    assert not small.shared and small.k.data_ptr() != big.k.data_ptr() and small.k.shape[0] == hk * n * L + 1
    for x in (kept, small):
        for a, w in zip(x.fetch(idx), want):
            assert torch.equal(a, w)


def test_context_prefilled_with_prefill_offload_answers_questions_exactly(tiny):
    """A reusable context prefilled with prefill_offload (its store filled chunk by chunk) answers a
    batch of questions exactly at a full budget, reading its host store by reference."""
    doc, qs = prompt(300, seed=16), [prompt(20, seed=s) for s in (17, 18)]
    kw = {"max_chunk": 16, "prefill_offload": True}
    ctx = tiny.prefill_context(doc, method="sentencekv", budget=1.0, method_kwargs=kw)
    assert ctx.cache.memory()["host"] > 0
    out = tiny.generate(qs, GREEDY, method="sentencekv", budget=1.0, method_kwargs=kw, context=ctx)
    assert [o.token_ids for o in out] == [run(tiny, doc + q)[0][0].token_ids for q in qs]


# ---- the host store's page-locked blocks reserved at the first prefill layer ----------------------------
def _reservation_and_store_shapes(llm, monkeypatch, ids, spec, context=None, **kw):
    """What ``_host_reservation`` asks for at the first prefill layer, and the ``(shape, dtype)`` of
    every layer's host tensors after the final offload (on the CPU the reservation itself is not
    made: page-locked memory is CUDA's)."""
    asked, stores = [], {}
    orig_off = SentenceKV._offload

    def reserve(self, run, layer, ctx):
        run.host_reserved = True
        asked.append(self._host_reservation(run, layer, ctx))

    def offload(self, run, layer, state, ctx, row, final):
        orig_off(self, run, layer, state, ctx, row, final)
        st = state.store
        if final and st is not None and st.n:
            stores[layer.layer_idx] = [(tuple(t.shape), t.dtype) for t in (st.k, st.v, st.pos, st.vsz) if t is not None]

    monkeypatch.setattr(SentenceKV, "_reserve_host", reserve)
    monkeypatch.setattr(SentenceKV, "_offload", offload)
    llm.generate(ids, GREEDY, method=spec, budget=96, method_kwargs=kw or None, context=context)
    return asked, [x for i in sorted(stores) for x in stores[i]]


@pytest.mark.parametrize("spec,kw", [("sentencekv", {}), ("sentencekv+kivi", {}),
                                     ("sentencekv", {"prefill_offload": True}), ("minference+sentencekv", {})])
def test_host_reservation_is_what_the_offload_allocates(tiny, monkeypatch, spec, kw):
    """The blocks reserved while the prefill runs have the shapes the offload then allocates (so
    the pool hands them over), alone, quantized, offloaded as it goes, and in a padded batch."""
    for ids in ([prompt(400, seed=21)], [prompt(400, seed=22), prompt(300, seed=23)]):
        asked, shapes = _reservation_and_store_shapes(tiny, monkeypatch, ids, spec, max_chunk=16, **kw)
        assert len(asked) == 1 and asked[0] is not None
        assert [(tuple(s), d) for s, d in asked[0]] == shapes


def test_no_host_reservation_after_an_eviction_or_over_a_context(tiny, monkeypatch):
    asked, shapes = _reservation_and_store_shapes(tiny, monkeypatch, [prompt(400, seed=24)], "snapkv+sentencekv")
    assert asked == [None] and shapes                       # snapkv leaves fewer tokens to offload
    ctx = tiny.prefill_context(prompt(300, seed=25), method="sentencekv", budget=96)
    asked, _ = _reservation_and_store_shapes(tiny, monkeypatch, [prompt(20, seed=26)], "sentencekv", context=ctx)
    assert asked == [None]                                  # a question reads the context's store


# ---- the final offload of a batch prefill: the dense path against the general one -----------------------
def _final_offloads(llm, monkeypatch, ids, spec, dense: bool, **kw):
    """Every layer's store and device KV right after its final offload, with the dense path
    (``_offload_dense``) on or off; the tokens; and what the dense path answered per layer."""
    snaps, took = [], []
    orig_off, orig_dense = SentenceKV._offload, SentenceKV._offload_dense

    def dense_path(self, *a):
        took.append(orig_dense(self, *a) if dense else False)
        return took[-1]

    def offload(self, run, layer, state, ctx, row, final):
        orig_off(self, run, layer, state, ctx, row, final)
        if not final:
            return
        st = state.store
        snap = {"pos": layer.positions.clone(), "dev_tokens": state.dev_tokens, "holes": layer.holes}
        valid = layer.positions >= 0                                     # masked filler slots may differ
        snap["k"] = torch.where(valid[..., None], layer.keys, 0).clone()
        snap["v"] = torch.where(valid[..., None], layer.values, 0).clone()
        if st is not None:
            BH = st.b * st.hk
            rows = torch.cat([torch.arange(i * st.T, i * st.T + int(st.used[i])) for i in range(BH)])
            snap["store"] = {"n": st.n, "T": st.T, "max_tokens": st.max_tokens, "used": st.used.clone(),
                             "starts": st.starts.clone(), "lens": st.lens.clone(), "mean": st.mean.clone(),
                             **{name: getattr(st, name).clone() for name in ("kmin", "kmax", "ksz")
                                if getattr(st, name, None) is not None},
                             **{f"host_{name}": getattr(st, name)[rows].clone() for name in ("k", "v", "pos", "vsz")
                                if getattr(st, name, None) is not None}}
        snaps.append(snap)

    monkeypatch.setattr(SentenceKV, "_offload_dense", dense_path)
    monkeypatch.setattr(SentenceKV, "_offload", offload)
    monkeypatch.setattr(llm.runner, "prefill_mode", "batch")   # a batch's rows in one padded prefill
    out = llm.generate(ids, GREEDY, method=spec, budget=96, method_kwargs=kw or None)
    monkeypatch.undo()
    return snaps, [o.token_ids for o in out], took


@pytest.mark.parametrize("spec,kw", [("sentencekv", {"max_chunk": 16}), ("sentencekv", {"summary": "quest"}),
                                     ("sentencekv+kivi", {}), ("sentencekv", {"sinks": 0, "recent": 0})])
def test_dense_final_offload_equals_the_general_path(tiny, monkeypatch, spec, kw):
    """At the end of a batch prefill the dense path (slices and host arithmetic, one device sync)
    leaves every layer with the store and device KV the general path (sorts, gathers, host syncs)
    leaves: one prompt, and a padded batch (prefilled together) with a row too short to offload
    anything."""
    for ids in ([prompt(400, seed=31)], [prompt(400, seed=32), prompt(260, seed=33), prompt(20, seed=34)]):
        fast, tok_fast, took = _final_offloads(tiny, monkeypatch, ids, spec, True, **kw)
        slow, tok_slow, took_slow = _final_offloads(tiny, monkeypatch, ids, spec, False, **kw)
        assert took and all(took) and not any(took_slow)
        assert tok_fast == tok_slow and len(fast) == len(slow) > 0
        for a, b in zip(fast, slow):
            assert a.keys() == b.keys() and a["dev_tokens"] == b["dev_tokens"] and a["holes"] == b["holes"]
            for name in ("pos", "k", "v"):
                assert torch.equal(a[name], b[name]), name
            if "store" in a:
                sa, sb = a["store"], b["store"]
                assert sa.keys() == sb.keys()
                for name in sa:
                    va, vb = sa[name], sb[name]
                    assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), name


def test_dense_final_offload_declines_other_layouts(tiny, monkeypatch):
    """Not the engine's batch layout (a prompt over a reused context: positions start past it) or
    no offload at all: the dense path declines or does nothing, and the answers are unchanged."""
    ctx = tiny.prefill_context(prompt(300, seed=35), method="full")
    took = []
    orig = SentenceKV._offload_dense
    monkeypatch.setattr(SentenceKV, "_offload_dense", lambda self, *a: took.append(orig(self, *a)) or took[-1])
    tiny.generate([prompt(200, seed=36)], GREEDY, method="sentencekv", budget=96, context=ctx)
    assert took and not any(took)


def test_dense_final_offload_plans_once_and_checks_the_layout_once(tiny, monkeypatch):
    """The per-prompt plan is made once for all layers, and the engine's layout is checked (a device
    sync) on the first layer only when every stage before sentencekv only changes how the prefill
    attends (``minference``); a stage that may change the KV makes every layer check (here
    minference marked as one); after an eviction (``snapkv+sentencekv``) the layers decline on the
    host (fewer slots than the prompt) and go the general way, with its answer."""
    from kvsift.methods.minference import MInference

    plans, checks = [], []
    orig_plan, orig_equal = SentenceKV._dense_plan, torch.equal
    monkeypatch.setattr(SentenceKV, "_dense_plan", lambda self, *a: plans.append(1) or orig_plan(self, *a))
    monkeypatch.setattr(torch, "equal", lambda a, b: checks.append(a.shape) or orig_equal(a, b))
    layers = tiny.info.num_layers
    for spec, want_plans, want_checks, dense, kv_stage in (
            ("sentencekv", 1, 1, True, False), ("minference+sentencekv", 1, 1, True, False),
            ("minference+sentencekv", 1, layers, True, True), ("snapkv+sentencekv", 0, 0, False, False)):
        plans.clear(), checks.clear()
        took = []
        orig = SentenceKV._offload_dense
        with monkeypatch.context() as mp:
            mp.setattr(SentenceKV, "_offload_dense", lambda self, *a: took.append(orig(self, *a)) or took[-1])
            mp.setattr(tiny.runner, "prefill_mode", "batch")
            if kv_stage:
                mp.setattr(MInference, "attention_only", False)
            out = tiny.generate([prompt(400, seed=37), prompt(300, seed=38)], GREEDY, method=spec, budget=96)
        assert len(took) == layers and all(x == dense for x in took), spec
        assert (len(plans), len(checks)) == (want_plans, want_checks), (spec, kv_stage, len(plans), len(checks))
        if not dense:   # the general path's answer, as with the dense path turned off
            with monkeypatch.context() as mp:
                mp.setattr(SentenceKV, "_offload_dense", lambda self, *a: False)
                mp.setattr(tiny.runner, "prefill_mode", "batch")
                ref = tiny.generate([prompt(400, seed=37), prompt(300, seed=38)], GREEDY, method=spec, budget=96)
            assert [o.token_ids for o in out] == [o.token_ids for o in ref]


def test_a_copied_fetch_is_read_whole_not_gathered_again():
    """A fetch that copies the chunks (no device cache) returns them in order with identity slots:
    the selection marks itself ``dense``, the attention reads the buffers whole masked by position
    (no second copy) with the same result as through the slot table, and ``gather`` returns the
    buffers themselves."""
    from kvsift.kernels.sparse_decode_attention import sparse_decode_attention_ref
    from kvsift.methods.base import SlotSource

    torch.manual_seed(0)
    b, hk, g, n, d = 2, 2, 3, 12, 8
    k, v = torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    pos = torch.arange(n, dtype=torch.int32).expand(b, hk, n).clone()
    pos[0, 1, 9:] = -1                                  # a shorter row: pad slots at its end
    pos[1, 0, 5:] = -1
    slots = torch.where(pos >= 0, torch.arange(n, dtype=torch.int32), -1)
    q = torch.randn(b, hk * g, d)
    qp = torch.full((b,), 100, dtype=torch.int64)
    table, whole = SlotSource(k, v, pos, slots), SlotSource(k, v, pos, slots, dense=True)
    assert table.read_slots is slots and whole.read_slots is None
    a = sparse_decode_attention_ref(q, k, v, table.read_slots, d ** -0.5, key_pos=pos, query_pos=qp)
    c = sparse_decode_attention_ref(q, k, v, whole.read_slots, d ** -0.5, key_pos=pos, query_pos=qp)
    torch.testing.assert_close(a, c)
    gk, gv, gp = whole.gather()
    assert gk is k and gv is v and torch.equal(gp, table.gather()[2])
    torch.testing.assert_close(table.gather()[0][pos >= 0], k[pos >= 0])
    empty = SlotSource(k[:, :, :0], v[:, :, :0], pos[:, :, :0], slots[:, :, :0], dense=True)
    assert empty.read_slots is not None                  # an empty selection keeps its (empty) table


@pytest.mark.parametrize("kw,dense", [({}, True), ({"cache_chunks": 3}, False)])
def test_sentencekv_decode_reads_a_copied_fetch_whole(tiny, monkeypatch, kw, dense):
    """Without a device chunk cache, sentencekv's decode selection is the fetched copy itself
    (``dense``); with one, a slot table over the cache."""
    seen = []
    plan = SentenceKV.plan

    def spy(self, run_, layer, query, ctx):
        sel = plan(self, run_, layer, query, ctx)
        if ctx.decoding and sel is not None and sel.extra is not None:
            seen.append(sel.extra.dense)
        return sel

    monkeypatch.setattr(SentenceKV, "plan", spy)
    run(tiny, prompt(300, seed=3), "sentencekv", 0.3, **kw)
    assert seen and set(seen) == {dense}
