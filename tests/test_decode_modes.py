"""Decode modes (kvsift/engine/decode.py): static decode (fixed buffers, device-side writes, index
tables, log-sum-exp merge of a method's selection) gives the eager loop's tokens; CUDA graphs give
them too (CUDA only)."""

import pytest
import torch

from kvsift import LLM, SamplingParams
from kvsift.cache import SiftCache
from kvsift.methods import build_method
from kvsift.models import tiny_model
from tests.conftest import random_prompt

SPECS = [("full", None), ("snapkv", 64), ("pyramidkv", 64), ("sentencekv", 96), ("snapkv+sentencekv", 96),
         ("sentencekv", 1.0), ("sentencekv:reselect", 96), ("quest", 64), ("quest:dense", 64), ("quest:refine", 64), ("quest:votes", 64), ("snapkv+quest", 96),
         ("tokenselect", 48), ("tokenselect:reuse", 48), ("squeezed", 64), ("expected_attention", 64),
         ("h2o:noevict", 64), ("tova:noevict", 64), ("adakv", 64), ("duo", 96),
         ("kvzip", 64), ("kivi", None), ("kivi:int2", None), ("snapkv+kivi", 64), ("quest+kivi", 64),
         ("sentencekv+kivi", 96), ("minference+snapkv", 64), ("minference+sentencekv", 96), ("shadowkv", 96),
         ("shadowkv:lowrank", 64), ("chunked", 64)]
KW = {"sentencekv:reselect": {"reselect_every": 3}, "snapkv+quest": {"decode_budget": 48},
      "tokenselect:reuse": {"reuse_threshold": 0.5}, "h2o:noevict": {"decode_evict": False},
      "tova:noevict": {"decode_evict": False}, "duo": {"sinks": 4, "recent": 28},
      # windows of 8 tokens: the 8 decode steps quantize a window (a flush inside the static step)
      "kivi": {"group": 8, "residual": 8}, "kivi:int2": {"bits": 2, "group": 8, "residual": 16},
      "snapkv+kivi": {"group": 8, "residual": 8}, "quest+kivi": {"group": 8, "residual": 8, "decode_budget": 48},
      "sentencekv+kivi": {"group": 8, "residual": 8},
      "minference+snapkv": {"min_len": 0, "vertical": 16, "slash": 16, "block": 16, "max_density": 1.0},
      # the first layer dense, GQA groups averaged: a plan of None in some layers, pages in others
      "quest:dense": {"dense_layers": 1, "reduce": "mean"},
      "quest:refine": {"refine": 3},
      "quest:votes": {"refine": 3, "refine_rank": "votes"},
      # the index from covered shares and rows spread through the chunk (#14's suite setting)
      "minference+sentencekv": {"min_len": 0, "coverage": 0.8, "sample_q": 16, "block": 16, "max_density": 1.0,
                                "dense_tail": 16},
      "shadowkv:lowrank": {"rank": 8, "window": 16, "outliers": 1}}


@pytest.fixture(scope="module")
def pairs(default_tokenizer):
    """family -> (eager LLM, static LLM) over the same tiny model; gemma3 has sliding-window layers."""
    out = {}
    for fam in ("llama", "qwen2", "gemma3"):
        m = tiny_model(fam, seed=1)
        out[fam] = tuple(LLM.from_model(m, default_tokenizer, name=f"tiny-{fam}", chunk_size=64, decode_mode=mode)
                         for mode in ("eager", "static"))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("spec,budget", SPECS)
def test_static_decode_gives_the_eager_tokens(pairs, family, spec, budget):
    eager, static = pairs[family]
    ids = [random_prompt(200, seed=3), random_prompt(150, seed=4)]  # left padding in the batch
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    kw = KW.get(spec)
    spec = spec.partition(":")[0]
    a = eager.generate(ids, p, method=spec, budget=budget, method_kwargs=kw)
    b = static.generate(ids, p, method=spec, budget=budget, method_kwargs=kw)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert a[0].stats.decode_mode == "eager" and b[0].stats.decode_mode == "static"
    assert b[0].stats.decode_steps == 7
    if "sentencekv" in spec:
        sa, sb = a[0].stats.method_stats, b[0].stats.method_stats
        assert sb["chunks_selected_per_head"] == sa["chunks_selected_per_head"]


def test_static_sentencekv_with_a_device_chunk_cache_and_a_reused_context(pairs):
    eager, static = pairs["llama"]
    doc, q = random_prompt(300, seed=5), random_prompt(12, seed=6)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    kw = {"cache_chunks": 6, "recent": 16}   # the LRU chunk cache path (host copies on the CPU)
    a = eager.generate(doc, p, method="sentencekv", budget=120, method_kwargs=kw)[0]
    b = static.generate(doc, p, method="sentencekv", budget=120, method_kwargs=kw)[0]
    assert a.token_ids == b.token_ids
    sa, sb = a.stats.method_stats, b.stats.method_stats
    assert sb["chunks_selected_per_head"] == sa["chunks_selected_per_head"] > 0
    assert sb["device_cache_hit_rate"] == sa["device_cache_hit_rate"]
    ctx_e = eager.prefill_context(doc, method="sentencekv", budget=120)
    ctx_s = static.prefill_context(doc, method="sentencekv", budget=120)
    outs = [llm.generate(q, p, context=c)[0] for llm, c in ((eager, ctx_e), (static, ctx_s))]
    assert outs[0].token_ids == outs[1].token_ids and outs[1].stats.decode_mode == "static"
    # the context itself is untouched by a static generation: it answers again, the same way
    assert static.generate(q, p, context=ctx_s)[0].token_ids == outs[1].token_ids


def test_rolling_window_falls_back_to_eager_and_bad_modes_are_rejected(pairs, default_tokenizer, monkeypatch):
    eager, static = pairs["llama"]
    ids = random_prompt(120, seed=7)
    p = SamplingParams(max_tokens=5, ignore_eos=True)
    out = static.generate(ids, p, method="streaming", budget=32)[0]
    assert out.stats.decode_mode == "eager"
    assert out.token_ids == eager.generate(ids, p, method="streaming", budget=32)[0].token_ids
    with pytest.raises(ValueError, match="decode_mode"):
        LLM.from_model(tiny_model("llama"), default_tokenizer, decode_mode="fast")
    with pytest.raises(ValueError, match="CUDA"):
        LLM.from_model(tiny_model("llama"), default_tokenizer, decode_mode="graph")
    auto = LLM.from_model(tiny_model("llama"), default_tokenizer)
    assert auto.generate(ids, p)[0].stats.decode_mode == "eager"      # CPU: auto is eager
    monkeypatch.setenv("KVSIFT_DECODE", "static")
    assert auto.generate(ids, p)[0].stats.decode_mode == "static"
    monkeypatch.setenv("KVSIFT_DECODE", "turbo")
    with pytest.raises(ValueError, match="KVSIFT_DECODE"):
        auto.generate(ids, p)


def test_cache_static_writes_at_a_device_slot_and_catches_up_its_length():
    cache = SiftCache(1, capacity_hint=6)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 4, 8)
    cache.step_positions = torch.arange(4, dtype=torch.int32)[None]
    layer.update(k, k + 1)
    cache.begin_static(3)
    assert cache.static and layer.wslot.tolist() == [4] and layer.k_buf.shape[2] >= 7
    new = torch.randn(1, 2, 1, 8)
    for i in range(2):
        cache.step_positions = torch.tensor([[4 + i]], dtype=torch.int32)
        keys, values = layer.update(new + i, new + i + 1)
        assert keys.shape[2] == layer.k_buf.shape[2]          # whole buffers: fixed shapes
    assert layer.length == 4 and layer.wslot.tolist() == [6]  # host length untouched while static
    cache.end_static(2)
    assert not cache.static and layer.length == 6 and layer.wslot is None
    assert torch.equal(layer.keys[:, :, 4:5], new) and torch.equal(layer.values[:, :, 5:6], new + 1 + 1)
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_fetch_counters_live_on_the_device():
    """Counters are device tensors bumped in place (a replayed CUDA graph keeps counting); no
    host-side capture fix-ups exist any more."""
    from kvsift.methods._offload import FetchStats

    f = FetchStats()
    for _ in range(3):
        f.count_call(8, torch.device("cpu"))
    assert (f.value("calls"), f.value("head_calls")) == (3, 24)
    m = build_method("snapkv+sentencekv", 64)
    for hook in ("before_capture", "after_capture", "replayed"):
        assert not hasattr(m, hook)
    assert m.static_ok() and build_method("sentencekv", 64, reselect_every=4).static_ok()
    assert not build_method("snapkv+streaming", 64).static_ok()


def test_reselect_every_gives_two_kinds_of_step():
    """reselect_every=3: steps 0, 3, 6, ... select (and fetch), the others keep the selection; the
    kind is a function of the engine's step index alone."""
    m = build_method("sentencekv", 64, reselect_every=3)
    run = m.start(256, 2)
    assert [m.decode_variant(run, s) for s in range(7)] == [True, False, False, True, False, False, True]
    assert build_method("sentencekv", 64).decode_variant(run, 5) is True
    c = build_method("snapkv+sentencekv", 64, reselect_every=2)
    crun = c.start(256, 2)
    assert c.decode_variant(crun, 1) == (0, False) and c.decode_variant(crun, 2) == (0, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,budget,kw", [("sentencekv", 96, {"reselect_every": 3}),
                                            ("sentencekv", 96, {"reselect_every": 2, "cache_chunks": 0})])
def test_cuda_graphs_per_kind_of_step_give_the_eager_tokens(spec, budget, kw):
    """reselect_every > 1 under graphs: one graph for the selecting steps, one for the keeping
    steps, with the device chunk cache or without (held copies)."""
    m = tiny_model("llama", seed=1).to("cuda")
    ids = [random_prompt(300, seed=8), random_prompt(260, seed=9)]
    p = SamplingParams(max_tokens=14, ignore_eos=True)
    a = LLM.from_model(m, None, chunk_size=64, decode_mode="eager").generate(ids, p, method=spec, budget=budget,
                                                                          method_kwargs=kw)
    b = LLM.from_model(m, None, chunk_size=64, decode_mode="graph").generate(ids, p, method=spec, budget=budget,
                                                                          method_kwargs=kw)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    st = b[0].stats
    assert st.decode_mode == "graph" and st.decode_setup_steps == 2  # one warm-up step per kind
    assert st.method_stats["chunks_selected_per_head"] == a[0].stats.method_stats["chunks_selected_per_head"]
    assert st.method_stats["chunks_copied_per_step"] == pytest.approx(a[0].stats.method_stats["chunks_copied_per_step"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,budget", [("full", None), ("snapkv", 64), ("sentencekv", 96), ("sentencekv", 1.0),
                                         ("quest", 64), ("quest:dense", 64), ("quest:refine", 64), ("quest:votes", 64),
                                         ("snapkv+quest", 128),
                                         ("tokenselect", 64),
                                         ("squeezed", 64), ("adakv", 64), ("duo", 96), ("kivi", None),
                                         ("snapkv+kivi", 64), ("quest+kivi", 64), ("expected_attention", 64),
                                         ("kvzip", 64), ("minference+snapkv", 64), ("sentencekv+kivi", 96),
                                         ("chunked", 64)])
def test_cuda_graph_decode_gives_the_eager_tokens(spec, budget):
    kw = KW.get(spec) if ":" in spec else None  # quest:dense's options; the others their defaults
    spec = spec.partition(":")[0]
    m = tiny_model("llama", seed=1).to("cuda")  # no tokenizer needed: token-id prompts
    eager = LLM.from_model(m, None, chunk_size=64, decode_mode="eager")
    graph = LLM.from_model(m, None, chunk_size=64, decode_mode="graph")
    ids = [random_prompt(300, seed=8), random_prompt(260, seed=9)]
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    a = eager.generate(ids, p, method=spec, budget=budget, method_kwargs=kw)
    b = graph.generate(ids, p, method=spec, budget=budget, method_kwargs=kw)
    assert b[0].stats.decode_mode == "graph"
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    if "sentencekv" in spec:
        assert b[0].stats.method_stats["chunks_selected_per_head"] == a[0].stats.method_stats["chunks_selected_per_head"]
    # one unpadded prompt: later prefill chunks take the bottom-right causal flash path on CUDA
    one = random_prompt(300, seed=10)
    assert graph.generate(one, p, method=spec, budget=budget, method_kwargs=kw)[0].token_ids == \
        LLM.from_model(m, None, chunk_size=320, decode_mode="eager").generate(
            one, p, method=spec, budget=budget, method_kwargs=kw)[0].token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,kw", [("h2o", {}), ("tova", {}), ("decoding", {"interval": 4})])
def test_cuda_methods_that_evict_while_decoding_run_eager_under_a_graph_request(spec, kw):
    """Methods that reshape the cache at decode steps (h2o and tova evict one token a step,
    decoding(...) re-compresses every few steps) cannot replay a graph: asked for graph mode on
    CUDA they decode eagerly, with the eager tokens, and their device KV stays at the budget."""
    m = tiny_model("llama", seed=1).to("cuda")
    ids = [random_prompt(300, seed=8), random_prompt(260, seed=9)]
    p = SamplingParams(max_tokens=12, ignore_eos=True)
    a = LLM.from_model(m, None, chunk_size=64, decode_mode="eager").generate(ids, p, method=spec, budget=64,
                                                                           method_kwargs=kw or None)
    b = LLM.from_model(m, None, chunk_size=64, decode_mode="graph").generate(ids, p, method=spec, budget=64,
                                                                           method_kwargs=kw or None)
    assert b[0].stats.decode_mode == "eager"
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    full = LLM.from_model(m, None, chunk_size=64).generate(ids, p)[0].stats
    assert b[0].stats.kv_device_bytes_end < full.kv_device_bytes_end / 2


@pytest.mark.parametrize("lens", [(40, 97), (90, 97)])
def test_per_head_kept_lengths_in_every_mode(pairs, lens):
    """keep_top with a per-(batch, kv_head) count: ``head_lengths`` reports the counts; very
    different lengths move to the compact per-head layout (``layer.ragged``: fewer bytes than
    padding to the longest head), close ones leave holes (position -1); eager and static decode
    attend alike either way."""
    from kvsift.methods.base import keep_top

    eager, static = pairs["llama"]
    doc, q = random_prompt(160, seed=12), random_prompt(8, seed=13)
    ctx = eager.prefill_context(doc, method="full")
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([lens])                                           # (batch, kv_heads): different per head
    for layer in ctx.cache.layers:
        d, elt = layer.k_buf.shape[-1], layer.k_buf.element_size()
        keep_top(layer, torch.rand(layer.positions.shape, generator=g), k)
        assert torch.equal(layer.head_lengths(), k)
        if lens == (40, 97):
            assert layer.ragged is not None and layer.length == 0
            assert layer.used_bytes() == 2 * sum(lens) * d * elt       # no padding to the longest head
            assert layer.nbytes() < 2 * 2 * max(lens) * d * elt
        else:
            assert layer.ragged is None and layer.length == 97
            assert bool((layer.positions[0, 0, 90:] == -1).all())    # the shorter head's holes
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    a = eager.generate(q, p, context=ctx)[0]
    b = static.generate(q, p, context=ctx)[0]
    assert a.token_ids == b.token_ids and b.stats.decode_mode == "static"


def test_decode_mode_picked_per_method_without_recording_what_a_graph_cannot_hold(monkeypatch):
    """A step with a host round trip is run static, not recorded: a method that fetches host KV
    (sentencekv, sentencekv+kivi, shadowkv) when the UVA copy kernel is off (``KVSIFT_NO_UVA``:
    the host path syncs), asked for a graph or by ``auto`` on CUDA with Triton; methods that
    reshape the cache at decode steps run eager; the rest get their graph."""
    import kvsift.engine.decode as dec
    import kvsift.methods._offload as off
    from kvsift.engine.decode import pick_decode_mode
    from kvsift.methods import build_method

    cuda = torch.device("cuda")   # a device object only: nothing runs on it
    for mod in (dec, off):
        monkeypatch.setattr(mod, "HAS_TRITON", True)
        monkeypatch.setattr(mod, "triton_disabled", lambda: False)
    monkeypatch.delenv("KVSIFT_DECODE", raising=False)
    for no_uva in (False, True):
        if no_uva:
            monkeypatch.setenv("KVSIFT_NO_UVA", "1")
        host = "static" if no_uva else "graph"
        cases = {"sentencekv+kivi": host, "sentencekv": host, "shadowkv": host, "kivi": "graph",
                 "snapkv+kivi": "graph", "full": "graph", "tova": "eager", "streaming": "eager"}
        for spec, want in cases.items():
            m = build_method(spec, None if spec in ("full", "kivi") else 96)
            assert m.graph_ok() == (want == "graph"), (spec, no_uva)
            assert pick_decode_mode("graph", m, cuda) == want, (spec, no_uva)
            assert pick_decode_mode("auto", m, cuda) == want, (spec, no_uva)
            assert pick_decode_mode("auto", m, torch.device("cpu")) == "eager"   # no Triton graph off CUDA
    dec._reset_cuda_rng(torch.device("cpu"))   # nothing to reset off CUDA
