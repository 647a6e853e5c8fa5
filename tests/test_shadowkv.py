"""shadowkv: the low-rank factorization (bounds, exact at full rank), RoPE at the right positions,
landmarks and outliers, the decode selection, exactness at a full budget, real device/host bytes,
the values-only host store, contexts (clone, batch, persisted), bad options."""

import pytest
import torch

from kvsift import SamplingParams, build_method
from kvsift.engine.llm import LLM
from kvsift.errors import MethodOptionError, UnknownMethodError
from kvsift.methods._offload import ChunkStore
from kvsift.methods.shadowkv import ShadowKV, apply_rope, low_rank, undo_rope
from kvsift.models.tiny import tiny_model
from tests.logit_recorder import GREEDY, VOCAB, check_padded_batch_exact, prompt, recording_llm, run


@pytest.fixture(scope="module")
def tiny():
    return recording_llm()


def prefill(llm, ids, method, budget=None, **kw):
    """The cache, run and forward context after the prefill of ``ids`` (one row)."""
    m = build_method(method, budget, **kw)
    r = m.start(len(ids), llm.info.num_layers)
    with llm.lock:
        cache, _, (ctx, logits) = llm.runner.prefill([ids], m, r, None, False, reserve=4)
    return m, r, cache, ctx


# ---- the factorization and RoPE ---------------------------------------------------------------------
def test_low_rank_is_the_best_approximation_and_exact_at_full_rank():
    g = torch.Generator().manual_seed(0)
    # a spectrum that decays, as keys' does
    x = torch.randn(2, 300, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 48, dtype=torch.float64)
    x[1, 250:] = 0  # padding rows change nothing
    sv = torch.linalg.svdvals(x)                                          # (2, 48) descending
    errs = []
    for rank in (4, 16, 40, 48, 200):
        a, b = low_rank(x, rank)
        r = min(rank, 48)
        assert a.shape == (2, 300, r) and b.shape == (2, r, 48)
        err = torch.linalg.matrix_norm(x - a @ b)                         # Frobenius, per row
        # Eckart-Young: the error of the best rank-r approximation is the tail of the spectrum
        torch.testing.assert_close(err, sv[:, r:].pow(2).sum(-1).sqrt(), atol=1e-9, rtol=1e-6)
        assert torch.allclose(b @ b.transpose(1, 2), torch.eye(r, dtype=torch.float64).expand(2, r, r), atol=1e-9)
        errs.append(float(err.sum()))
    assert errs == sorted(errs, reverse=True) and errs[0] > 1e-2 and errs[-1] < 1e-9
    assert torch.all(a[1, 250:] == 0)


def test_rope_round_trip_and_scaling():
    from kvsift.engine.attention import rope_function

    model = tiny_model("llama", seed=0, vocab_size=VOCAB)
    rope = rope_function(model)
    pos = torch.tensor([[0, 1, 7, 100, 3000]])
    cos, sin = rope(pos, 0)
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    y = apply_rope(x, cos, sin)
    assert not torch.allclose(y[:, 1:], x[:, 1:]) and torch.allclose(y[:, 0], x[:, 0])   # position 0: identity
    torch.testing.assert_close(undo_rope(y, cos, sin), x, atol=1e-5, rtol=1e-5)
    # a scaled rope (attention_scaling s): cos, sin scaled by s, the inverse divides it out
    torch.testing.assert_close(undo_rope(apply_rope(x, 2 * cos, 2 * sin), 2 * cos, 2 * sin), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rebuilt_keys_are_the_cache_keys_at_full_rank(tiny, family):
    """At a full rank the keys rebuilt from the factors, rotated at the chunks' positions, are the
    keys ``full`` caches at those positions; at a low rank they come close; at a shifted position they
    do not match (RoPE really is applied per position)."""
    llm = tiny if family == "llama" else LLM.from_model(tiny_model(family, seed=0, vocab_size=VOCAB), None, "t",
                                                        chunk_size=64)
    ids = prompt(200, seed=11)
    _, _, ref, _ = prefill(llm, ids, "full")
    for rank, tol in ((32, 1e-4), (12, None)):
        m, r, cache, ctx = prefill(llm, ids, "shadowkv", len(ids), rank=rank, outliers=0)
        for layer, full_layer in zip(cache.layers, ref.layers):
            st = layer.state["shadowkv"]
            assert st.rank == rank and st.first == m.sinks
            store = st.store
            idx = torch.arange(store.n).expand(1, 2, store.n)
            _, values, pos = store.fetch(idx)
            keys = st.keys(idx, pos, ctx.rope, layer.layer_idx)
            valid = pos >= 0
            assert int(valid.sum()) == 2 * (200 - m.sinks - m.window)
            want_k = full_layer.keys.gather(2, pos.clamp(min=0).long()[..., None].expand(-1, -1, -1, 16))
            want_v = full_layer.values.gather(2, pos.clamp(min=0).long()[..., None].expand(-1, -1, -1, 16))
            assert torch.equal(values[valid], want_v[valid])               # values come back as they were
            err = (keys - want_k)[valid].norm() / want_k[valid].norm()
            if tol is not None:
                assert err < tol
                shifted = st.keys(idx, torch.where(valid, pos + 1, -1), ctx.rope, layer.layer_idx)
                assert (shifted - want_k)[valid].norm() / want_k[valid].norm() > 0.05
            else:
                assert 1e-4 < err < 0.9


# ---- landmarks, outliers, selection ----------------------------------------------------------------
def test_landmarks_and_outliers(tiny):
    ids = prompt(260, seed=12)
    _, _, ref, _ = prefill(tiny, ids, "full")
    m, r, cache, ctx = prefill(tiny, ids, "shadowkv", 160, outliers=3, window=16, sinks=4)
    C = m.chunk
    mid = 260 - 4 - 16
    nc = -(-mid // C)
    for layer, full_layer in zip(cache.layers, ref.layers):
        st = layer.state["shadowkv"]
        store = st.store
        assert store.n == nc and not store.keys and store.k.shape[0] == 1    # no keys on the host
        # the cache's post-RoPE keys of every middle chunk, their mean and worst cosine similarity
        k = full_layer.keys[:, :, 4:4 + mid].float()
        k = torch.cat([k, k.new_zeros(1, 2, nc * C - mid, 16)], 2).view(1, 2, nc, C, 16)
        cnt = torch.tensor([min(C, mid - j * C) for j in range(nc)]).view(1, 1, nc, 1)
        mean = k.sum(3) / cnt
        sim = torch.nn.functional.cosine_similarity(k, mean[:, :, :, None], dim=-1)
        real = torch.arange(C).view(1, 1, 1, C) < cnt
        worst = torch.where(real, sim, float("inf")).amin(3)
        want_out = torch.zeros(1, 2, nc, dtype=torch.bool).scatter_(2, worst.topk(3, largest=False).indices, True)
        lens = store.lens[:, :, :nc]
        assert torch.equal(lens == 0, want_out)                            # outliers are not offloaded
        assert torch.equal(lens[~want_out], cnt.expand(1, 2, nc, 1)[..., 0][~want_out].int())
        torch.testing.assert_close(store.mean[:, :, :nc][~want_out], mean[~want_out], atol=1e-5, rtol=1e-5)
        # the device keeps sinks, window and the outlier chunks' tokens, nothing else
        for h in range(2):
            kept = set(layer.positions[0, h].tolist()) - {-1}
            outs = {4 + j * C + t for j in want_out[0, h].nonzero().flatten().tolist() for t in range(C)}
            assert kept == set(range(4)) | set(range(244, 260)) | {p for p in outs if p < 244}
            assert st.dev_tokens <= len(kept)


def test_decode_selects_the_best_landmarks_within_budget(tiny):
    ids = prompt(300, seed=13)
    budget = 96
    m, r, cache, ctx = prefill(tiny, ids, "shadowkv", budget, outliers=2, window=16, sinks=4)
    sinks, window, n_out = m.sizes(budget)
    assert (sinks, window, n_out) == (4, 16, 2)
    k = (budget - sinks - window - n_out * m.chunk) // m.chunk
    ctx.decoding = True
    q = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    for layer in cache.layers:
        st = layer.state["shadowkv"]
        assert st.dev_tokens == sinks + window + n_out * m.chunk
        sel = m.plan(r, layer, q, ctx)
        assert sel.own is None                                             # the whole device buffer, plus
        x = sel.extra                                                      # the rebuilt chunks
        chosen = sorted({int(p) - sinks for p in x.positions[0, 0].tolist() if p >= 0} )
        chunks = sorted({p // m.chunk for p in chosen})
        assert len(chunks) == k and len(chosen) == k * m.chunk <= budget - st.dev_tokens
        # the best landmarks by the group-mean score q . mean, outliers left out
        mean = st.store.mean[0, 0, : st.store.n]
        score = (q[0, :2, 0] @ mean.T).mean(0)
        score[st.store.lens[0, 0, : st.store.n] == 0] = float("-inf")
        assert chunks == sorted(score.topk(k).indices.tolist())
        assert torch.equal(x.slots[x.positions >= 0], torch.nonzero(x.positions[0, 0] >= 0).flatten().int().repeat(2))


def test_the_papers_scores_and_sparse_budget(tiny):
    """``score="softmax_max"``: each query head's softmax over the landmarks, the group's max (the
    paper's selection), checked against a naive computation; ``sparse_budget``: the budget is the
    selected chunks' tokens, with sinks, window and every outlier chunk on top of it."""
    from kvsift.methods.shadowkv import softmax_max_scores

    g = torch.Generator().manual_seed(5)
    q, lm = torch.randn(2, 4, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    empty = torch.zeros(2, 2, 9, dtype=torch.bool)
    empty[0, 1, 3] = True
    got = softmax_max_scores(q, lm, empty)
    for b in range(2):
        for h in range(2):
            keep = ~empty[b, h]
            per_head = [torch.softmax(q[b, 2 * h + j] @ lm[b, h, keep].T / 4.0, -1) for j in range(2)]
            torch.testing.assert_close(got[b, h, keep], torch.maximum(*per_head))
            assert bool((got[b, h, ~keep] == 0).all())
    ids = prompt(300, seed=13)
    budget = 40
    m, r, cache, ctx = prefill(tiny, ids, "shadowkv", budget, outliers=6, window=16, sinks=4, score="softmax_max",
                               sparse_budget=True)
    assert m.sizes(budget) == (4, 16, 6)                                   # not cut to fit the budget
    ctx.decoding = True
    qq = torch.randn(1, 4, 1, 16, generator=g)
    for layer in cache.layers:
        st = layer.state["shadowkv"]
        assert st.dev_tokens == 4 + 16 + 6 * m.chunk                       # sinks, window, outliers on top
        x = m.plan(r, layer, qq, ctx).extra
        chosen = sorted({(int(p) - 4) // m.chunk for p in x.positions[0, 0].tolist() if p >= 0})
        assert len(chosen) == budget // m.chunk                            # the whole budget selects chunks
        n = st.store.n
        score = softmax_max_scores(qq[:, :, -1], st.store.mean[:, :, :n], st.store.lens[:, :, :n] == 0)[0, 0]
        score[st.store.lens[0, 0, :n] == 0] = float("-inf")
        assert chosen == sorted(score.topk(budget // m.chunk).indices.tolist())


# ---- the method end to end -------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"outliers": 0, "chunk": 5}, {"sinks": 0, "window": 0, "outliers": 30},
                                {"score": "softmax_max", "sparse_budget": True, "outliers": 4}])
def test_full_budget_and_rank_is_exact(tiny, kw):
    ids = prompt(240)
    ref, ref_logits = run(tiny, ids)
    out, logits = run(tiny, ids, "shadowkv", len(ids), **kw)
    assert out[0].token_ids == ref[0].token_ids
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert out[0].stats.kv_host_bytes > 0 and out[0].stats.method_stats["chunks_selected_per_head"] > 0


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_full_budget_is_exact_on_other_families(family):
    """qwen2 (biased projections), gemma3 (sliding-window layers, one rope per attention type)."""
    llm = LLM.from_model(tiny_model(family, seed=2, vocab_size=VOCAB), None, "t", chunk_size=64)
    ids = prompt(220, seed=9)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    logits = {}
    for name, budget in (("full", None), ("shadowkv", len(ids))):
        got = []
        hook = llm.model.lm_head.register_forward_hook(lambda m, i, o: got.append(o[:, -1].detach().clone()))
        try:
            out = llm.generate(ids, p, method=name, budget=budget)[0]
        finally:
            hook.remove()
        logits[name] = (out.token_ids, torch.stack(got))
    assert logits["shadowkv"][0] == logits["full"][0]
    torch.testing.assert_close(logits["shadowkv"][1], logits["full"][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prefill_mode", ["batch", "rows"])
def test_batch_with_padding_is_exact(tiny, prefill_mode):
    """Left-padded batch prefill, or one row at a time into one state: both equal full."""
    check_padded_batch_exact(tiny, "shadowkv", prefill_mode, chunk=16)


def test_small_budget_and_rank_hold_fewer_device_bytes_values_on_the_host(tiny):
    ids = prompt(512, seed=1)
    ref, ref_logits = run(tiny, ids)
    rank, budget = 8, 96
    out, logits = run(tiny, ids, "shadowkv", budget, rank=rank, window=16, outliers=2)
    st = out[0].stats
    assert (logits - ref_logits).abs().max() > 1e-3                      # a small budget changes the logits
    layers, hk, d, item = 2, 2, 16, 4
    offloaded = 512 - 4 - 16 - 2 * 8                                       # middle tokens minus the outliers
    # the host holds the offloaded tokens' values and positions (no keys)
    assert offloaded * layers * hk * (d * item + 4) <= st.kv_host_bytes < 1.2 * offloaded * layers * hk * (d * item + 4)
    # the device: A (r per middle token), B, landmarks, sinks + window + outliers (+ decode room)
    mid = 512 - 4 - 16
    lowrank = layers * (mid * rank + hk * rank * d) * item
    landmarks = layers * hk * (mid // 8) * d * item
    buffers = layers * hk * (4 + 16 + 16 + 16) * (2 * d * item + 4)
    assert st.kv_device_bytes < lowrank + landmarks + buffers + layers * 8 * hk * (mid // 8 + 1)   # + chunk tables
    assert st.kv_device_bytes < 0.3 * ref[0].stats.kv_device_bytes
    ms = st.method_stats
    assert ms["chunks_selected_per_head"] == (budget - 4 - 16 - 16) // 8
    assert ms["fetch_mib_per_step"] > 0


def test_context_reuse_clone_batch_and_persist(tiny, tmp_path):
    from kvsift.server.contexts import load_context, save_context

    doc, question = prompt(300, seed=6), prompt(20, seed=7)
    ref, ref_logits = run(tiny, doc + question)
    ctx = tiny.prefill_context(doc, method="shadowkv", budget=1.0, method_kwargs={"chunk": 16})
    mem = ctx.cache.memory()
    assert mem["host"] > 0 and ctx.needs_planner
    tiny.logits.clear()
    out = tiny.generate(question, GREEDY, context=ctx)                    # its own method answers
    assert out[0].token_ids == ref[0].token_ids
    n = GREEDY.max_tokens  # the last prefill chunk's logits and the decode steps
    torch.testing.assert_close(torch.stack(tiny.logits)[-n:], ref_logits[-n:], atol=1e-4, rtol=1e-4)
    assert ctx.cache.memory() == mem                                      # answering works on a clone
    # a batch of questions over the context (its state repeated over the batch)
    q2 = prompt(9, seed=8)
    both = tiny.generate([question, q2], GREEDY, context=ctx)
    assert both[0].token_ids == out[0].token_ids
    assert both[1].token_ids == tiny.generate(q2, GREEDY, context=ctx)[0].token_ids
    # persisted and loaded: the same answer
    save_context(ctx, tmp_path / "s", {"kv_method": ctx.method, "kv_budget": 1.0, "kv_options": {"chunk": 16}})
    loaded, _ = load_context(tmp_path / "s", tiny)
    st, st2 = ctx.cache.layers[0].state["shadowkv"], loaded.cache.layers[0].state["shadowkv"]
    assert torch.equal(st.a, st2.a) and torch.equal(st.b, st2.b) and st2.store.keys is False
    assert tiny.generate(question, GREEDY, context=loaded)[0].token_ids == out[0].token_ids
    # the context's values live on the host: a method that cannot fetch them must not run silently
    with pytest.raises(RuntimeError, match="offloaded"):
        tiny.generate(question, GREEDY, method="full", context=ctx)


def test_values_only_chunk_store_fetches_the_values():
    g = torch.Generator().manual_seed(0)
    b, hk, L, d, n_chunks = 2, 3, 4, 8, 5
    toks = [(bi * hk + h, c, t) for bi in range(b) for h in range(hk) for c in range(n_chunks) for t in range(L)
            if (bi + h + c) % 4]                                           # some chunks empty per head
    bh, ch, rk = (torch.tensor(x) for x in zip(*toks))
    keys, values = torch.randn(len(toks), d, generator=g), torch.randn(len(toks), d, generator=g)
    pos = (ch * L + rk).int()
    both = ChunkStore(b, hk, L, d, torch.float32, "cpu")
    vals = ChunkStore(b, hk, L, d, torch.float32, "cpu", keys=False)
    for s in (both, vals):
        s.append(keys, values, pos, bh, ch, rk, n_chunks)
    assert torch.equal(vals.mean, both.mean)                               # summaries from the keys all the same
    idx = torch.tensor([[0, 2, -1], [1, 3, 4], [4, -1, -1]]).expand(b, hk, 3)
    (fk, fv, fp), (nk, nv, np_) = both.fetch(idx), vals.fetch(idx)
    assert nk is None and torch.equal(nv, fv) and torch.equal(np_, fp)
    (_, hb), (_, hv) = both.kv_nbytes(), vals.kv_nbytes()
    assert hv < 0.6 * hb
    t, extra = vals.kv_state_dict()
    again = ChunkStore.kv_from_state_dict({k: v.clone() for k, v in t.items()}, extra, "cpu")
    assert torch.equal(again.fetch(idx)[1], nv) and again.fetch(idx)[0] is None
    assert torch.equal(vals.clone().fetch(idx)[1], nv)
    with pytest.raises(ValueError, match="values-only"):
        ChunkStore(b, hk, L, d, torch.float32, "cpu", keys=False, cache_chunks=4)


# ---- options ---------------------------------------------------------------------------------------
def test_a_fractional_rank_is_a_share_of_the_key_width(tiny):
    """``rank=0.25`` over 2 KV heads of 16 channels is rank 8: the same factorization, bytes and
    logits as ``rank=8``; the paper's share (160 of 1,024) on the 0.5B's 128 channels is 20."""
    assert build_method("shadowkv", 64, rank=0.15625).key_rank(2 * 64) == 20
    assert build_method("shadowkv", 64, rank=0.001).key_rank(32) == 1 and build_method("shadowkv", 64).key_rank(32) == 32
    ids = prompt(512, seed=1)
    a, la = run(tiny, ids, "shadowkv", 96, rank=8, window=16, outliers=2)
    b, lb = run(tiny, ids, "shadowkv", 96, rank=0.25, window=16, outliers=2)
    assert torch.equal(la, lb) and a[0].token_ids == b[0].token_ids
    assert a[0].stats.kv_device_bytes == b[0].stats.kv_device_bytes


@pytest.mark.parametrize("kw,param", [({"rank": 0}, "rank"), ({"rank": 1.5}, "rank"), ({"rank": 0.0}, "rank"),
                                      ({"chunk": 0}, "chunk"), ({"chunk": 1024}, "chunk"),
                                      ({"outliers": -1}, "outliers"), ({"window": "32"}, "window"),
                                      ({"sinks": 1.5}, "sinks"), ({"rank": True}, "rank"), ({"score": "max"}, "score"),
                                      ({"sparse_budget": "yes"}, "sparse_budget")])
def test_bad_options_are_clear_errors(kw, param):
    with pytest.raises(MethodOptionError, match=param) as e:
        build_method("shadowkv", 64, **kw)
    assert e.value.param == param


@pytest.mark.parametrize("spec", ["snapkv+shadowkv", "shadowkv+quest", "shadowkv+kivi", "sentencekv+shadowkv"])
def test_compositions_are_refused(spec):
    with pytest.raises(UnknownMethodError, match="shadowkv"):
        build_method(spec, 64)


def test_composes_after_a_prefill_attention_stage():
    m = build_method("minference+shadowkv", 64, rank=16)
    assert m.spec == "minference+shadowkv" and m.offloads_to_host() and m.row_prefill_ok()


def test_budget_is_required_and_sizes_fit_it():
    from kvsift.errors import BudgetError

    with pytest.raises(BudgetError, match="needs a budget"):
        build_method("shadowkv")
    m = ShadowKV(budget=64)
    for tokens in (1, 10, 40, 64, 1000):
        s, w, o = m.sizes(tokens)
        assert s + w + o * m.chunk <= tokens and o * m.chunk <= max(0, tokens - s - w) // 2


def test_cli_and_server_refuse_bad_options(tmp_path, capsys, make_client):
    from kvsift.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("hello world")
    assert main(["generate", "--prompt-file", str(doc), "--method", "shadowkv", "--budget", "8",
                 "--method-opt", "rank=0"]) == 2
    assert "kvsift: error: method 'shadowkv': rank must be an int >= 1" in capsys.readouterr().err
    c = make_client()
    for opts, spec, word in [({"chunk": 0}, "shadowkv", "chunk must be"), ({}, "snapkv+shadowkv", "composes only")]:
        bad = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "kv_method": spec,
                                              "kv_budget": 0.5, "kv_options": opts})
        assert bad.status_code == 400 and word in bad.json()["error"]["message"], bad.text
    ok = c.post("/v1/completions", json={"prompt": list(range(1000, 1200)), "max_tokens": 3, "ignore_eos": True,
                                         "temperature": 0.0, "kv_method": "shadowkv", "kv_budget": 64,
                                         "kv_options": {"rank": 8}})
    assert ok.status_code == 200, ok.text
    stats = ok.json()["kvsift"]["stats"][0]
    assert stats["kv_host_bytes"] > 0 and stats["kv_device_bytes"] < stats["kv_full_bytes"]


# ---- the values-only copy (the UVA kernel on CUDA) ---------------------------------------------------
def test_copy_chunks_ref_values_only_matches_the_full_copy():
    from kvsift.kernels.chunk_fetch import copy_chunks_ref

    g = torch.Generator().manual_seed(4)
    R, d, C, L = 120, 8, 10, 4
    hk, hv, hp = torch.randn(R, d, generator=g), torch.randn(R, d, generator=g), torch.arange(R, dtype=torch.int32)
    src, ln = torch.randint(0, R - L, (6,), generator=g), torch.tensor([4, 2, -1, 0, 3, 4])
    dst = torch.randperm(C, generator=g)[:6]
    full = [torch.full((C, L, d), 7.0), torch.full((C, L, d), 7.0), torch.full((C, L), 99, dtype=torch.int32)]
    vals = [t.clone() for t in full[1:]]
    copy_chunks_ref(hk, hv, hp, src, ln, *full, dst)
    copy_chunks_ref(None, hv, hp, src, ln, None, *vals, dst)
    assert torch.equal(vals[0], full[1]) and torch.equal(vals[1], full[2])
    assert not torch.equal(full[1], torch.full_like(full[1], 7.0))
    with pytest.raises(ValueError, match="both"):
        copy_chunks_ref(None, hv, hp, src, ln, full[0], *vals, dst)


CUDA = torch.cuda.is_available() and __import__("kvsift.kernels._triton", fromlist=["HAS_TRITON"]).HAS_TRITON


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
def test_cuda_values_only_store_uva_matches_the_host_path():
    from kvsift.methods._offload import FetchStats

    g = torch.Generator().manual_seed(5)
    b, hk, L, d, n_chunks = 2, 2, 8, 64, 12
    toks = [(bi * hk + h, c, t) for bi in range(b) for h in range(hk) for c in range(n_chunks) for t in range(L)
            if (bi + h + c) % 5]
    bh, ch, rk = (torch.tensor(x, device="cuda") for x in zip(*toks))
    keys = torch.randn(len(toks), d, generator=g).cuda().bfloat16()
    stores = []
    for uva in (True, False):
        s = ChunkStore(b, hk, L, d, torch.bfloat16, "cuda", keys=False)
        s.append(keys, -keys, (ch * L + rk).int(), bh, ch, rk, n_chunks)
        s._uva = uva
        stores.append(s)
    for _ in range(3):
        idx = torch.stack([torch.randperm(n_chunks, generator=g)[:4] for _ in range(b * hk)]).view(b, hk, 4).cuda()
        idx[1, 0, 3] = -1
        ra, rb = stores[0].fetch(idx, FetchStats()), stores[1].fetch(idx, FetchStats())
        assert stores[0]._uva, "the UVA kernel was refused"
        assert ra[0] is None and rb[0] is None
        assert torch.equal(ra[1], rb[1]) and torch.equal(ra[2], rb[2]) and int((ra[2] >= 0).sum()) > 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_gives_the_eager_tokens(dtype):
    from tests.conftest import random_prompt

    m = tiny_model("llama", seed=1).to("cuda", dtype)
    ids = [random_prompt(300, seed=8), random_prompt(260, seed=9)]
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    kw = {"rank": 16, "window": 16, "outliers": 2}
    a = LLM.from_model(m, None, chunk_size=64, decode_mode="eager").generate(ids, p, method="shadowkv", budget=96,
                                                                          method_kwargs=kw)
    b = LLM.from_model(m, None, chunk_size=64, decode_mode="graph").generate(ids, p, method="shadowkv", budget=96,
                                                                          method_kwargs=kw)
    assert b[0].stats.decode_mode == "graph"
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert b[0].stats.kv_host_bytes > 0 and b[0].stats.kv_device_bytes < b[0].stats.kv_full_bytes
    if dtype == torch.float32:  # exact at a full budget and rank on the GPU too
        full = LLM.from_model(m, None, chunk_size=64).generate(ids, p)
        got = LLM.from_model(m, None, chunk_size=64).generate(ids, p, method="shadowkv", budget=1.0)
        assert [x.token_ids for x in got] == [y.token_ids for y in full]


# ---- a real model ----------------------------------------------------------------------------------
@pytest.mark.real
def test_real_model_pre_rope_keys_are_low_rank_and_full_rank_is_exact(real_llm):
    """SmolLM2 (3 KV heads of 64): the keys rotated back to pre-RoPE are much closer to low rank than
    the cached post-RoPE keys (what ShadowKV relies on, and a check that the rotation is undone at the
    right positions); at a full budget and rank the answer is ``full``'s."""
    from importlib.resources import files

    from kvsift.methods.shadowkv import rope_at

    text = files("kvsift").joinpath("data/alice_ch1_3.txt").read_text()[:1800]
    p = text + "\n\nQuestion: who is the main character? Answer in one sentence."
    ids = real_llm.encode(p, None)
    _, _, cache, ctx = prefill(real_llm, ids, "full")
    for li in (0, len(cache.layers) // 2, len(cache.layers) - 1):
        layer = cache.layers[li]
        post = layer.keys.float()
        cos, sin = rope_at(ctx.rope, layer.positions, li)
        pre = undo_rope(post, cos, sin)
        b, hk, n, d = post.shape
        err = {}
        for name, x in (("pre", pre), ("post", post)):
            x = x.permute(0, 2, 1, 3).reshape(b, n, hk * d)
            a, f = low_rank(x, hk * d // 6)
            err[name] = float((x - a @ f).norm() / x.norm())
        assert err["pre"] < 0.75 * err["post"], (li, err)
    params = SamplingParams(max_tokens=6)
    ref = real_llm.generate(p, params)[0]
    out = real_llm.generate(p, params, method="shadowkv", budget=1.0, method_kwargs={"rank": 3 * 64})[0]
    assert out.token_ids == ref.token_ids
    assert out.stats.kv_host_bytes > 0.3 * ref.stats.kv_device_bytes      # the values moved to the host
