"""Every registered method on tiny models of two families: it runs and respects its budget; an
eviction method holds really fewer bytes than the full cache, a decode-time selection attends
really fewer slots per step; at a budget of the whole context every method equals ``full``, but
for a lossy storage codec (``kivi``, quantized KV), which comes close to it."""

import pytest
import torch

from kvsift import SamplingParams, available_methods, build_method
from kvsift.methods.base import DecodeSelect, spec_classes
from tests.conftest import random_prompt

PROMPT_LEN, BUDGET = 256, 64
METHODS = sorted(available_methods())
COMPOSED = ["snapkv+kivi", "sentencekv+kivi", "minference+snapkv",   # a codec after an eviction / an offload; a prefill stage
            "minference+shadowkv"]                                  # a prefill stage before low-rank keys


def lossy(spec: str) -> bool:
    """A stage stores the KV approximately (quantized): close to ``full``, not equal."""
    return any(c.codec for c in spec_classes(spec))


# options that make a method select everything (its "whole context" besides the budget): minference
# attends sparsely from the first token on, every column listed; shadowkv factorizes the keys at a full rank
# (its default, 160, is already more than the tiny models' kv_heads * head_dim: said here for clarity)
WHOLE = {"minference": {"min_len": 0, "vertical": 10 ** 6, "block": 16, "max_density": 1.0}, "shadowkv": {"rank": 2 * 16}}


def layer_budget(method, run, layer_idx):
    fn = getattr(method, "layer_budget", None)
    return fn(run, layer_idx) if fn is not None else run.tokens


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", METHODS + COMPOSED)
def test_method_runs_and_respects_budget(tiny_llms, family, name):
    llm = tiny_llms[family]
    ids = random_prompt(PROMPT_LEN, seed=21)
    budget = None if name == "full" else BUDGET
    out = llm.generate(ids, SamplingParams(max_tokens=6, ignore_eos=True), method=name, budget=budget)[0]
    assert len(out.token_ids) == 6
    st = out.stats
    m = build_method(name, budget)
    if name == "full" or m.attention_only:  # minference: sparse prefill attention, every token kept
        assert st.kv_kept_bytes == st.kv_full_bytes
        return
    if isinstance(m, DecodeSelect):
        _check_decode_selection(llm, m, ids)
        return
    assert st.kv_device_bytes < st.kv_full_bytes, "a compressing method must hold fewer device bytes"
    # after prefill every layer holds at most its budget on the device (per head; methods that share
    # a layer's budget over its heads, in all; methods with one budget over all layers, in all)
    run = m.start(PROMPT_LEN, llm.info.num_layers)
    ctx = llm.prefill_context(ids, method=name, budget=budget)
    kept = [layer.head_lengths() for layer in ctx.cache.layers]
    if m.codec:  # a storage codec alone keeps every token (stored smaller)
        assert all(bool((n == PROMPT_LEN).all()) for n in kept)
        return
    if m.ragged:  # per-head (and for duo, kvzip per-layer) lengths differ: the budget is a mean
        heads = len(kept) * kept[0].numel()
        assert float(torch.stack(kept).float().mean()) <= BUDGET + PROMPT_LEN / heads
        return
    for layer, n in zip(ctx.cache.layers, kept):
        k = layer_budget(m, run, layer.layer_idx)
        assert int(n.sum()) <= k * n.numel() and layer.length <= k


@pytest.mark.parametrize("name", [n for n in METHODS if n != "full"] + COMPOSED)
def test_method_with_budget_of_whole_context_is_exact(tiny_llm, name):
    ids = random_prompt(160, seed=22)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    full = tiny_llm.generate(ids, p)[0].token_ids
    kw = {k: v for part in name.split("+") for k, v in WHOLE.get(part, {}).items()}
    if name == "pyramidkv":  # pyramid budgets exceed the average on low layers: use the ratio 1.0
        assert tiny_llm.generate(ids, p, method=name, budget=1.0)[0].token_ids == full
    elif lossy(name):  # approximate: the first token (prefill) and the first decode step agree, most others
        got = tiny_llm.generate(ids, p, method=name, budget=len(ids))[0].token_ids
        assert got[:2] == full[:2] and sum(a == b for a, b in zip(got, full)) >= 6
    else:
        assert tiny_llm.generate(ids, p, method=name, budget=len(ids), method_kwargs=kw)[0].token_ids == full


@pytest.mark.parametrize("name", METHODS)
def test_method_has_doc_and_registered_name(name):
    from kvsift.methods import method_class

    from kvsift.methods.base import method_options

    cls = method_class(name)
    assert cls.name == name and cls.__doc__
    undocumented = [o for o, _, desc in method_options(name) if not desc]
    assert not undocumented, f"{name}: options without a Parameters entry: {undocumented}"


def _check_decode_selection(llm, m, ids):
    """A decode step attends at most the budget plus the method's always-attended tail (the page
    being filled / the local window / the tokens after the clustered context), in every layer."""
    run = m.start(len(ids), llm.info.num_layers)
    with llm.lock:
        cache, _, (ctx, logits) = llm.runner.prefill([ids], m, run, None, False, reserve=4)
        ctx.decoding = True
        llm.runner.forward(ctx, logits.argmax(-1, keepdim=True), ctx.next_pos[:, None])
    cfg = llm.model.config
    q = torch.randn(1, cfg.num_attention_heads, 1, llm.info.head_dim)
    tail = {"quest": m.__dict__.get("page", 0), "tokenselect": m.__dict__.get("local", 0), "squeezed": 1}[m.name]
    for layer in cache.layers:
        sel = m.plan(run, layer, q, ctx)
        own = sel.own_slots()                                              # slots (quest's pages expanded)
        valid = (own >= 0) & (own < layer.length)
        valid &= layer.positions.gather(2, own.clamp(min=0, max=layer.length - 1)) >= 0
        n_att = int(valid.sum(-1).max())
        assert n_att <= run.sel_tokens + tail < layer.length
