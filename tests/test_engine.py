"""The generation loop on tiny random models: exactness against transformers, batching, chunking,
sampling, stop strings, streaming, reusable contexts."""

import pytest
import torch

from kvsift import SamplingParams
from tests.conftest import random_prompt


def hf_greedy(llm, ids, n):
    with torch.inference_mode():
        out = llm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                                 pad_token_id=llm.pad_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_matches_transformers_greedy(tiny_llms, family):
    llm = tiny_llms[family]
    ids = random_prompt(200, seed=3)
    ours = llm.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert ours.token_ids == hf_greedy(llm, ids, 16)
    assert ours.finish_reason == "length"


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_other_families_match_transformers(default_tokenizer, family):
    """Mistral, and Gemma 3 with its sliding-window layers (window 32 < prompt), prefilled in chunks."""
    from kvsift import LLM
    from kvsift.models import tiny_model

    llm = LLM.from_model(tiny_model(family, seed=2, layers=4), default_tokenizer, chunk_size=48)
    ids = random_prompt(150, seed=15)
    assert llm.generate(ids, SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids == hf_greedy(llm, ids, 10)


def test_prefill_logits_match_transformers(tiny_llm):
    """Chunked prefill over our cache gives the same next-token logits as one HF forward."""
    from kvsift.engine.llm import ForwardContext  # noqa: F401  (engine internals are importable)
    from kvsift.methods import build_method

    ids = random_prompt(150, seed=4)
    with torch.inference_mode():
        ref = tiny_llm.model(torch.tensor([ids])).logits[0, -1]
    m = build_method("full")
    run = m.start(len(ids), tiny_llm.info.num_layers)
    _, _, (_, logits) = tiny_llm.runner.prefill([ids], m, run, None, progress=False)
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)


def test_batch_with_padding_equals_single(tiny_llm):
    a, b = random_prompt(120, seed=5), random_prompt(70, seed=6)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    batch = tiny_llm.generate([a, b], p)
    assert [o.token_ids for o in batch] == [tiny_llm.generate(x, p)[0].token_ids for x in (a, b)]


@pytest.mark.parametrize("method,budget", [("snapkv", 48), ("streaming", 40), ("pyramidkv", 48)])
def test_batch_with_padding_equals_single_compressed(tiny_llm, method, budget):
    a, b = random_prompt(130, seed=7), random_prompt(90, seed=8)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    batch = tiny_llm.generate([a, b], p, method=method, budget=budget)
    single = [tiny_llm.generate(x, p, method=method, budget=budget)[0].token_ids for x in (a, b)]
    assert [o.token_ids for o in batch] == single


def test_chunk_size_does_not_change_output(tiny_llm, default_tokenizer):
    from kvsift import LLM

    ids = random_prompt(300, seed=9)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    other = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=1024)
    assert tiny_llm.generate(ids, p)[0].token_ids == other.generate(ids, p)[0].token_ids


def test_cpu_default_chunking_takes_a_long_first_chunk(tiny_llm, default_tokenizer):
    """Default chunking on CPU: a fresh prompt's first chunk is up to CPU_FIRST_CHUNK tokens (one
    causal pass, no mask), later chunks 512; same tokens as uniform small chunks, also with a
    context and with a padded batch (which keep uniform chunks)."""
    from kvsift import LLM
    from kvsift.engine.llm import CPU_FIRST_CHUNK
    from kvsift.methods import build_method

    auto = LLM.from_model(tiny_llm.model, default_tokenizer)
    assert auto.chunk_size == 512 and auto.first_chunk == CPU_FIRST_CHUNK and tiny_llm.first_chunk is None
    full = build_method("full", None)
    bounds = auto.runner.chunk_bounds(5000, full)
    assert bounds[0] == (0, CPU_FIRST_CHUNK) and bounds[1][0] == CPU_FIRST_CHUNK and bounds[-1][1] == 5000
    assert auto.runner.chunk_bounds(5000, full, fresh=False)[0] == (0, 512)
    assert auto.runner.chunk_bounds(300, full) == [(0, 300)]
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    ids, other = random_prompt(700, seed=11), random_prompt(500, seed=12)
    assert auto.generate(ids, p)[0].token_ids == tiny_llm.generate(ids, p)[0].token_ids
    assert [o.token_ids for o in auto.generate([ids, other], p)] == \
        [o.token_ids for o in tiny_llm.generate([ids, other], p)]
    ctx_a, ctx_b = auto.prefill_context(ids[:600]), tiny_llm.prefill_context(ids[:600])
    assert auto.generate(ids[600:], p, context=ctx_a)[0].token_ids == \
        tiny_llm.generate(ids[600:], p, context=ctx_b)[0].token_ids


def test_a_wide_batch_prefill_takes_at_most_max_batched_tokens_per_forward(tiny_llm, default_tokenizer, monkeypatch):
    """Many prompts prefilled together get chunks of ``max_batched_tokens // rows`` tokens (at least
    16, a multiple of 16; the method's last-chunk minimum wins), so one forward never holds more;
    the tokens are those of the default chunking."""
    from kvsift import LLM
    from kvsift.methods import build_method

    narrow = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, max_batched_tokens=96)
    r, full = narrow.runner, build_method("full", None)
    assert r.chunk_bounds(200, full)[0] == (0, 64)                  # one row: chunk_size
    assert r.chunk_bounds(200, full, rows=2)[0] == (0, 48)          # 96 // 2
    assert r.chunk_bounds(200, full, rows=4)[:2] == [(0, 16), (16, 32)]  # 24 -> 16
    assert r.chunk_bounds(200, full, rows=50)[0] == (0, 16)         # never below 16
    # a joining group's width is the tokens of one forward over all its rows (join_chunk_size)
    assert r.chunk_bounds(200, full, width=32)[:2] == [(0, 32), (32, 64)]
    assert r.chunk_bounds(200, full, rows=2, width=64)[:2] == [(0, 32), (32, 64)]   # 64 // 2
    assert r.chunk_bounds(200, full, rows=3, width=64)[0] == (0, 16)                # 21 -> 16
    assert r.chunk_bounds(200, full, rows=8, width=64)[0] == (0, 16)                # never below 16
    widths = []
    real = r.forward
    monkeypatch.setattr(r, "forward", lambda ctx, ids, pos: widths.append(ids.shape) or real(ctx, ids, pos))
    prompts = [random_prompt(n, seed=40 + n) for n in (90, 120, 70)]
    p = SamplingParams(max_tokens=5, ignore_eos=True)
    got = narrow.generate(prompts, p)  # full prefills a batch together
    prefill = [s for s in widths if s[1] > 1]
    assert prefill and all(b * q <= 96 for b, q in prefill) and prefill[0] == (3, 32)
    assert [o.token_ids for o in got] == [o.token_ids for o in tiny_llm.generate(prompts, p)]
    with pytest.raises(ValueError, match="max_batched_tokens"):
        LLM.from_model(tiny_llm.model, default_tokenizer, max_batched_tokens=8)


def test_sampling_seeded_reproducible_and_top_p(tiny_llm):
    ids = random_prompt(50, seed=10)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a = tiny_llm.generate(ids, p)[0].token_ids
    b = tiny_llm.generate(ids, p)[0].token_ids
    c = tiny_llm.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, seed=124, ignore_eos=True))[0].token_ids
    assert a == b and len(a) == 12
    assert a != c


def test_top_p_keeps_smallest_nucleus():
    from kvsift.engine.llm import _sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(_sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert seen == {0, 1}


def test_stop_string_and_streaming_deltas(tiny_llm):
    ids = random_prompt(60, seed=11)
    full = tiny_llm.generate(ids, SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    events = list(tiny_llm.stream(ids, SamplingParams(max_tokens=20, stop=[stop], ignore_eos=True)))
    final = events[-1].output
    assert final.finish_reason == "stop"
    assert final.text == full.text[: full.text.find(stop)]
    assert "".join(e.text for e in events) == final.text


def test_context_reuse_matches_full_prompt(tiny_llm):
    doc, question = random_prompt(180, seed=12), random_prompt(20, seed=13)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    ctx = tiny_llm.prefill_context(doc)
    via_ctx = tiny_llm.generate(question, p, context=ctx)[0].token_ids
    assert via_ctx == tiny_llm.generate(doc + question, p)[0].token_ids
    # the context is not consumed: a second question works too and the first answer repeats
    assert tiny_llm.generate(question, p, context=ctx)[0].token_ids == via_ctx


def test_stats_report_real_bytes(tiny_llm):
    ids = random_prompt(256, seed=14)
    full = tiny_llm.generate(ids, SamplingParams(max_tokens=4))[0].stats
    snap = tiny_llm.generate(ids, SamplingParams(max_tokens=4), method="snapkv", budget=64)[0].stats
    info = tiny_llm.info
    assert full.kv_full_bytes == 2 * info.num_layers * info.num_kv_heads * 256 * info.head_dim * 4
    assert full.kv_kept_bytes == full.kv_full_bytes
    assert snap.kv_kept_bytes == full.kv_full_bytes * 64 // 256
    assert snap.kv_device_bytes < full.kv_device_bytes
    assert "ms/token" in snap.summary()


@pytest.mark.parametrize("kwargs,msg", [
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(method="snapkv", budget=0), "budget must be >= 1"),
    (dict(method="snapkv", budget=1.5), "ratio must be in"),
    (dict(method="snapkv", budget=10_000), "larger than the context"),
    (dict(method="snapkv"), "needs a budget"),
    (dict(method="snapkv", budget=16, method_kwargs={"windw": 3}), "unknown option"),
    (dict(method="snapkv+nope", budget=16), "unknown method 'nope'"),
])
def test_bad_input_is_rejected_before_compute(tiny_llm, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_llm.stream(random_prompt(100), SamplingParams(max_tokens=2), **kwargs)


def test_prompt_longer_than_model_limit(tiny_llm):
    n = tiny_llm.info.max_positions
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        tiny_llm.generate(random_prompt(n), SamplingParams(max_tokens=2))


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop=[""]),
                                    dict(min_tokens=-1), dict(max_tokens=2, min_tokens=3)])
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_generation_stops_at_model_limit(tiny_llm):
    n = tiny_llm.info.max_positions
    out = tiny_llm.generate(random_prompt(n - 3), SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_cancel_stops_generation(tiny_llm):
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3

    out = tiny_llm.generate(random_prompt(40), SamplingParams(max_tokens=50, ignore_eos=True), cancel=cancel)[0]
    assert out.finish_reason == "cancelled" and len(out.token_ids) == 3


def test_score_full_equals_plain_forward_nll(tiny_llm):
    ctx, cont = random_prompt(90, seed=16), random_prompt(12, seed=17)
    nll, st = tiny_llm.score(ctx, cont)
    with torch.inference_mode():
        logp = torch.log_softmax(tiny_llm.model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    ref = -sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert abs(nll - ref) < 1e-3 * len(cont)
    assert st.prompt_tokens == 90 and st.decode_steps == 11
    # compression changes the likelihood, and the stats say how much was kept
    nll_c, st_c = tiny_llm.score(ctx, cont, method="streaming", budget=16)
    assert nll_c != nll and st_c.kv_kept_bytes < st.kv_kept_bytes


def test_min_tokens_holds_eos_like_hf_min_new_tokens(tiny_llm):
    """``min_tokens`` masks end-of-sequence until that many tokens (HF's ``min_new_tokens``);
    ``ignore_eos`` alone samples it and goes on, which is a different sequence."""
    ids = random_prompt(120, seed=21)
    free = tiny_llm.generate(ids, SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    saved = tiny_llm.eos_ids
    try:
        tiny_llm.eos_ids = [free[0]]  # the greedy first token is now the end of sequence
        out = tiny_llm.generate(ids, SamplingParams(max_tokens=6))[0]
        assert out.token_ids == [] and out.finish_reason == "stop"
        held = tiny_llm.generate(ids, SamplingParams(max_tokens=6, min_tokens=6))[0]
        assert len(held.token_ids) == 6 and free[0] not in held.token_ids and held.finish_reason == "length"
        with torch.inference_mode():
            ref = tiny_llm.model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                          eos_token_id=free[0], pad_token_id=tiny_llm.pad_id)
        assert held.token_ids == ref[0, len(ids):].tolist()
        # past min_tokens the end of sequence may come again
        some = tiny_llm.generate(ids, SamplingParams(max_tokens=6, min_tokens=2))[0]
        assert held.token_ids[:2] == some.token_ids[:2] and free[0] not in some.token_ids
    finally:
        tiny_llm.eos_ids = saved


def _bottom_right(q, k, v, scale):
    """Reference: float32 softmax with the chunk's queries as the last of the keys."""
    L, n, g = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    s = (q.float() @ k.repeat_interleave(g, 1).float().transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(L, n, dtype=torch.bool).triu(n - L + 1), float("-inf"))
    return torch.softmax(s, -1) @ v.repeat_interleave(g, 1).float()


def _math_half(q, k, v, causal, scale, lse=True):
    # a kernel like cuDNN's: unmasked or square causal only
    assert not causal or q.shape[2] == k.shape[2]
    g = q.shape[1] // k.shape[1]
    s = (q.float() @ k.repeat_interleave(g, 1).float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    out = (torch.softmax(s, -1) @ v.repeat_interleave(g, 1).float()).to(q.dtype)
    return out, (torch.logsumexp(s, -1) if lse else None)


@pytest.mark.parametrize("n,L,align", [(40, 7, 1), (40, 7, 8), (33, 32, 1), (9, 1, 4), (12, 12, 1), (13, 13, 8)])
def test_split_chunk_attention_merges_past_and_own_keys_exactly(n, L, align):
    # the cuDNN path's split (past keys unmasked, own keys square causal, merged by log-sum-exp,
    # queries padded to ``align``), here with a float32 math half: equal to one bottom-right causal
    # softmax over all keys
    from kvsift.engine.attention import causal_chunk_attention, split_chunk_attention

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, h, m, 16, generator=g) for h, m in ((4, L), (2, n), (2, n)))
    want = _bottom_right(q, k, v, 0.25)
    got = split_chunk_attention(q, k, v, 0.25, _math_half, align)
    assert got.shape == q.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_chunk_attention(q, k, v, 0.25), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN attention)")
@pytest.mark.parametrize("n,L", [(4096, 4096), (4000, 4000), (8192, 4096), (6120, 1000)])
def test_cuda_cudnn_chunk_attention_matches_flash(monkeypatch, n, L):
    import kvsift.engine.attention as A

    monkeypatch.setattr(A, "CUDNN_MIN_PAIRS", 1)
    monkeypatch.setattr(A, "CUDNN_MIN_QUERIES", 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    # the engine's layouts: queries (batch, L, heads, dim) transposed, keys a prefix of a longer buffer
    q = torch.randn(1, L, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, 2, n + 300, 128, generator=g, device="cuda", dtype=torch.bfloat16)[:, :, :n]
            for _ in range(2))
    got = A.causal_chunk_attention(q, k, v, 128 ** -0.5)
    assert A._CUDNN_STATE["ok"], "cuDNN attention did not run"
    monkeypatch.setenv("KVSIFT_PREFILL_CUDNN", "0")
    flash = A.causal_chunk_attention(q, k, v, 128 ** -0.5)
    torch.testing.assert_close(got.float(), flash.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), _bottom_right(q.cpu(), k.cpu(), v.cpu(), 128 ** -0.5).cuda(),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN attention)")
def test_cuda_prefill_through_cudnn_matches_flash_end_to_end(monkeypatch):
    # a small random bf16 Llama on CUDA, 5,992 context tokens in chunks of 2,048, per layer: every
    # chunk goes through cuDNN (the earlier keys are multiples of 256; the last queries are padded)
    import kvsift.engine.attention as A
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvsift import LLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (6000,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = LLM.from_model(model, None, chunk_size=2048)
    calls = []
    real = A._cudnn_half
    monkeypatch.setattr(A, "_cudnn_half", lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
    monkeypatch.setattr(A, "CUDNN_MIN_PAIRS", 1 << 22)
    got = llm.score(ids[:-8], ids[-8:])
    # chunks of 2,048, 2,048 and 1,896 tokens: the first one causal alone, each later one two calls
    # (the last one's 1,896 queries padded to 2,048), per layer: every call holds 2,048 queries
    assert len(calls) == 2 * 5 and set(calls) == {2048}, calls   # 2 layers
    monkeypatch.setenv("KVSIFT_PREFILL_CUDNN", "0")
    flash = llm.score(ids[:-8], ids[-8:])
    assert abs(got[0] - flash[0]) / abs(flash[0]) < 2e-2
