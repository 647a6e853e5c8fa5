"""kvzip: reread passes (context reconstruction), max-attention scores against a dense reference,
deferred compression, stats, batches, reusable contexts, options."""

import math
from dataclasses import dataclass

import pytest
import torch

from kvsift import LLM, SamplingParams, build_method
from kvsift.errors import MethodOptionError
from kvsift.methods.base import EvictionMethod
from kvsift.methods.kvzip import FIRST_INSTRUCTION, KVzip, chat_parts
from kvsift.models import tiny_model
from tests.conftest import random_prompt

P = SamplingParams(max_tokens=8, ignore_eos=True)


def _capture_scores(monkeypatch):
    """Record every layer's deferred scores (before selection)."""
    seen: dict[int, torch.Tensor] = {}
    orig = KVzip.deferred_scores

    def spy(self, run, layer):
        s = orig(self, run, layer)
        seen[layer.layer_idx] = s.clone()
        return s

    monkeypatch.setattr(KVzip, "deferred_scores", spy)
    return seen


def _dense_reference(model, ids, passes, num_kv_heads):
    """Per layer ``(1, kv_heads, n)``: max over passes, pass queries and group heads of the model's
    own attention weights (transformers' eager attention, ``output_attentions``) over the sequence
    prompt + pass, restricted to the prompt's keys."""
    from kvsift.engine.attention import model_configs

    configs = model_configs(model)
    saved = [(c, c._attn_implementation) for c in configs]
    n = len(ids)
    ref = None
    try:
        for c in configs:
            c._attn_implementation = "eager"
        for p in passes:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids + p]), output_attentions=True, use_cache=False)
            per_layer = []
            for a in out.attentions:                                   # (1, q_heads, T, T)
                a = a[:, :, n:, :n]
                per_layer.append(a.reshape(1, num_kv_heads, -1, a.shape[-1]).amax(dim=2))
            s = torch.stack(per_layer)
            ref = s if ref is None else torch.maximum(ref, s)
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
    return ref


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: a sliding-window layer too
def test_scores_equal_a_dense_reference(default_tokenizer, monkeypatch, family):
    model = tiny_model(family, seed=1)
    llm = LLM.from_model(model, default_tokenizer, name=f"tiny-{family}", chunk_size=64)
    ids = random_prompt(150, seed=31)
    m = KVzip(budget=len(ids), chunk=64, sinks=0, overlap=8, softmax="full")
    seen = _capture_scores(monkeypatch)
    if family == "gemma3":  # score in blocks of a few query rows
        monkeypatch.setattr("kvsift.methods.kvzip.SCORE_BLOCK_BYTES", 4 * 4 * 200 * 5)
    ctx = llm.prefill_context(ids, method=m)
    passes = m.reread_passes(m.start(len(ids), llm.info.num_layers), ids, default_tokenizer)
    assert len(passes) == 3 and ctx.stats.prompt_tokens == len(ids)
    ref = _dense_reference(model, ids, passes, llm.info.num_kv_heads)
    assert sorted(seen) == list(range(llm.info.num_layers))
    for li in range(llm.info.num_layers):
        torch.testing.assert_close(seen[li], ref[li], rtol=1e-4, atol=1e-6)
    assert float(ref.max()) > 0.05  # the passes really attend to the prompt


def test_budget_of_the_whole_prompt_is_exact_and_the_passes_ran(tiny_llm):
    ids = random_prompt(300, seed=32)
    full = tiny_llm.generate(ids, P)[0]
    out = tiny_llm.generate(ids, P, method="kvzip", budget=len(ids), method_kwargs={"chunk": 100})[0]
    assert out.token_ids == full.token_ids
    ms = out.stats.method_stats
    assert ms["reread_passes"] == 3
    # each pass: the instruction (+ the previous chunk's last 8 tokens after the first) + "\n" + 100 tokens
    instr = len(default_instr(tiny_llm))
    assert ms["reread_tokens"] > 300 + instr
    assert 0 < ms["reread_s"] < out.stats.prefill_s
    # the room reserved for the passes is given back: the same device bytes as full
    assert out.stats.kv_device_bytes == full.stats.kv_device_bytes


def default_instr(llm):
    return llm.tokenizer(FIRST_INSTRUCTION, add_special_tokens=False)["input_ids"]


def test_budget_is_respected_and_device_bytes_drop(tiny_llm):
    ids = random_prompt(256, seed=33)
    ctx = tiny_llm.prefill_context(ids, method="kvzip", budget=48, method_kwargs={"chunk": 128, "allocation": "head"})
    st = ctx.stats
    assert st.kv_device_bytes < st.kv_full_bytes / 4
    assert st.method_stats["reread_passes"] == 2 and st.method_stats["reread_s"] > 0
    for layer in ctx.cache.layers:
        assert layer.length == 48
        assert "kvzip" not in layer.state      # the scores are dropped after compression
        for s in range(4):                     # the sinks are kept in every head
            assert bool((layer.positions == s).any(-1).all())
    assert ctx.cache.memory()["device"] == st.kv_device_bytes
    out = tiny_llm.generate(random_prompt(10, seed=34), P, context=ctx)[0]
    assert len(out.token_ids) == 8


def test_a_batch_of_two_lengths_prefills_row_by_row(tiny_llm):
    a, b = random_prompt(220, seed=35), random_prompt(150, seed=36)
    kw = {"chunk": 64}
    outs = tiny_llm.generate([a, b], P, method="kvzip", budget=64, method_kwargs=kw)
    singles = [tiny_llm.generate(x, P, method="kvzip", budget=64, method_kwargs=kw)[0] for x in (a, b)]
    assert [o.token_ids for o in outs] == [s.token_ids for s in singles]
    ms = outs[0].stats.method_stats
    assert ms["reread_passes"] == math.ceil(220 / 64) + math.ceil(150 / 64)
    assert ms["reread_tokens"] == sum(s.stats.method_stats["reread_tokens"] for s in singles)
    assert outs[0].stats.kv_device_bytes < outs[0].stats.kv_full_bytes


def test_a_context_answers_without_rerunning_the_passes(tiny_llm, monkeypatch):
    doc, q = random_prompt(200, seed=37), random_prompt(12, seed=38)
    full = tiny_llm.generate(doc + q, P)[0]
    ctx = tiny_llm.prefill_context(doc, method="kvzip", budget=len(doc), method_kwargs={"chunk": 64})
    calls = []
    orig = KVzip.reread_passes
    monkeypatch.setattr(KVzip, "reread_passes", lambda self, *a: calls.append(1) or orig(self, *a))
    assert tiny_llm.generate(q, P, context=ctx)[0].token_ids == full.token_ids
    again = tiny_llm.generate(q, P, context=ctx, method="kvzip", budget=len(doc) + len(q))[0]
    assert again.token_ids == full.token_ids
    assert again.stats.method_stats["reread_passes"] == 0 and not calls
    # a compressed context answers too, and stays within its budget
    small = tiny_llm.prefill_context(doc, method="kvzip", budget=40, method_kwargs={"chunk": 64})
    assert sum(int(ly.head_lengths().sum()) for ly in small.cache.layers) == 40 * 2 * len(small.cache.layers)
    assert len(tiny_llm.generate(q, P, context=small)[0].token_ids) == 8


def test_passes_follow_the_chat_template(default_tokenizer):
    tok = default_tokenizer
    pre, suf = chat_parts(tok)
    assert pre and suf
    doc = random_prompt(50, seed=39)
    m = KVzip(budget=16, chunk=20, overlap=4)
    run = m.start(100, 2)
    instr = tok(FIRST_INSTRUCTION, add_special_tokens=False)["input_ids"]
    # a chat prompt (prefix + document + assistant opener): the template is not repeated
    passes = m.reread_passes(run, pre + doc + suf, tok)
    assert len(passes) == 3
    assert passes[0] == instr + suf + doc[:20]
    assert passes[1][-(len(suf) + 20):] == suf + doc[20:40] and passes[1][-(len(suf) + 24):-(len(suf) + 20)] == doc[16:20]
    assert passes[2][-10:] == doc[40:]
    # plain token ids: the whole prompt, the instruction closed by a newline
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    assert m.reread_passes(run, doc, tok)[0] == instr + nl + doc[:20]
    # no tokenizer: the chunks alone
    assert m.reread_passes(run, doc, None)[0] == doc[:20]
    assert run.passes == 9


@dataclass(frozen=True)
class _HalfBudgetWrapper(EvictionMethod):
    """A wrapper using kvzip as a scorer with its own selection (like adakv(kvzip)): keeps half the
    budget."""

    scorer: KVzip = None
    deferred = True
    name = "half"

    def start(self, prompt_len, num_layers):
        return self.scorer.start(prompt_len, num_layers)

    def reread_passes(self, run, prompt_ids, tokenizer):
        return self.scorer.reread_passes(run, prompt_ids, tokenizer)

    def observe(self, run, layer, query, module, ctx):
        self.scorer.observe(run, layer, query, module, ctx)

    def deferred_scores(self, run, layer):
        return self.scorer.deferred_scores(run, layer)

    def layer_budget(self, run, layer_idx):
        return run.tokens // 2


def test_kvzip_works_as_a_scorer_inside_a_wrapper(tiny_llm):
    ids = random_prompt(200, seed=40)
    w = _HalfBudgetWrapper(budget=80, scorer=KVzip(budget=80, chunk=64))
    ctx = tiny_llm.prefill_context(ids, method=w)
    ref = tiny_llm.prefill_context(ids, method="kvzip", budget=40, method_kwargs={"chunk": 64, "allocation": "head"})
    for a, b in zip(ctx.cache.layers, ref.cache.layers):
        assert a.length == 40 and not a.state
        assert torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("kw,option", [({"chunk": 8}, "chunk"), ({"chunk": 1 << 21}, "chunk"), ({"sinks": -1}, "sinks"),
                                       ({"overlap": -1}, "overlap"), ({"chunk": 32, "overlap": 32}, "overlap"),
                                       ({"chunk": "64"}, "chunk"), ({"sinks": 1.5}, "sinks")])
def test_bad_options_are_value_errors_naming_the_option(kw, option):
    with pytest.raises(ValueError, match=option):
        build_method("kvzip", 64, **kw)
    with pytest.raises(ValueError, match=option):
        KVzip(budget=64, **kw)


def test_needs_a_budget_and_reports_option_type_errors():
    with pytest.raises(ValueError, match="budget"):
        build_method("kvzip")
    with pytest.raises(MethodOptionError):
        build_method("kvzip", 0.5, chunk="big")


@pytest.mark.parametrize("budget", [64, 1.0])  # 1.0: nothing evicted, the passes' room given back
def test_static_decode_after_the_passes_gives_the_eager_tokens(default_tokenizer, budget):
    m = tiny_model("qwen2", seed=1)
    eager, static = (LLM.from_model(m, default_tokenizer, name="tiny-qwen2", chunk_size=64, decode_mode=mode)
                     for mode in ("eager", "static"))
    ids = random_prompt(180, seed=41)
    kw = {"chunk": 64}
    a = eager.generate(ids, P, method="kvzip", budget=budget, method_kwargs=kw)[0]
    b = static.generate(ids, P, method="kvzip", budget=budget, method_kwargs=kw)[0]
    assert a.token_ids == b.token_ids and b.stats.decode_mode == "static"
    if budget == 1.0:
        assert a.token_ids == eager.generate(ids, P)[0].token_ids


def test_global_allocation_keeps_the_best_scores_of_any_layer_and_head(tiny_llm):
    """``allocation="global"`` (the default): the budget is a mean over layers and heads; the kept
    slots are the best reconstruction scores anywhere, so per-head counts differ (stored compactly)."""
    ids = random_prompt(200, seed=41)
    ctx = tiny_llm.prefill_context(ids, method="kvzip", budget=40, method_kwargs={"chunk": 64})
    lens = torch.stack([ly.head_lengths()[0] for ly in ctx.cache.layers])          # (layers, heads)
    assert int(lens.sum()) == 40 * lens.numel() and int(lens.max()) > int(lens.min())
    assert ctx.stats.kv_device_bytes < ctx.stats.kv_full_bytes / 3


def test_local_softmax_differs_from_full_and_both_are_exact_at_full_budget(tiny_llm):
    ids = random_prompt(150, seed=42)
    full = tiny_llm.generate(ids, P)[0].token_ids
    for sm in ("local", "full"):
        assert tiny_llm.generate(ids, P, method="kvzip", budget=len(ids),
                                 method_kwargs={"chunk": 64, "softmax": sm})[0].token_ids == full
    a = tiny_llm.prefill_context(ids, method="kvzip", budget=30, method_kwargs={"chunk": 64, "allocation": "head"})
    b = tiny_llm.prefill_context(ids, method="kvzip", budget=30,
                                 method_kwargs={"chunk": 64, "allocation": "head", "softmax": "full"})
    assert any(not torch.equal(x.positions, y.positions) for x, y in zip(a.cache.layers, b.cache.layers))


def _dense_local_scores(query, keys, key_pos, query_pos, n_ctx, scale, window, local):
    """Every logit, the prompt slots outside ``local``'s sinks and chunk masked: the max softmax
    weight per prompt slot over queries and each group's heads."""
    b, hq, L, d = query.shape
    hk = keys.shape[1]
    q = query.reshape(b, hk, hq // hk * L, d).float()
    w = q @ keys.float().transpose(-1, -2) * scale                              # (b, hk, g * L, n)
    qp = query_pos[:, None, None, :].expand(b, 1, hq // hk, L).reshape(b, 1, -1, 1)
    kp = key_pos[:, :, None, :]
    sl = torch.arange(keys.shape[2])
    outside = (sl < n_ctx) & ~((sl < local[0]) | ((sl >= local[1]) & (sl < local[2])))
    hide = (kp < 0) | (kp > qp) | outside
    if window is not None:
        hide |= kp <= qp - window
    return torch.softmax(w.masked_fill(hide, float("-inf")), dim=-1)[..., :n_ctx].amax(dim=2)


@pytest.mark.parametrize("local", [(4, 50, 120), (0, 0, 200), (8, 3, 60), (2, 190, 205), (300, 10, 20)])
@pytest.mark.parametrize("window", [None, 90])
def test_local_scores_read_only_the_chunk_and_equal_the_masked_dense_softmax(local, window):
    from kvsift.methods.kvzip import reconstruction_scores

    g = torch.Generator().manual_seed(sum(local) + (window or 0))
    n_ctx, L, b, hk, grp, d = 200, 17, 2, 2, 3, 16
    q = torch.randn(b, hk * grp, L, d, generator=g)
    k = torch.randn(b, hk, n_ctx + L, d, generator=g)
    pos = torch.arange(n_ctx + L).expand(b, hk, -1).clone()
    pos[1, :, :5] = -1                                                           # a padded row
    qpos = torch.arange(n_ctx, n_ctx + L).expand(b, L)
    got = reconstruction_scores(q, k, pos, qpos, n_ctx, 0.25, window, None, local)
    want = _dense_local_scores(q, k, pos, qpos, n_ctx, 0.25, window, local)
    assert torch.allclose(got, want, atol=1e-6)
    sl = torch.arange(n_ctx)
    inside = (sl < local[0]) | ((sl >= local[1]) & (sl < local[2]))
    assert (got[..., ~inside] == 0).all()
    assert window is not None or (got[..., inside] > 0).any()
