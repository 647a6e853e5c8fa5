"""Row-by-row prefill (``LLM(prefill_mode=...)``): a batch prefilled one sequence at a time, each
compressed (sentencekv: written into one batch host store) before the next, then stacked, decodes
exactly like the batch prefilled at once."""

import pytest
import torch

from kvsift import LLM, SamplingParams
from kvsift.methods import build_method
from kvsift.models import tiny_model
from tests.conftest import random_prompt

SPECS = [("full", None), ("streaming", 48), ("snapkv", 64), ("pyramidkv", 64), ("sentencekv", 96),
         ("snapkv+sentencekv", 96)]


@pytest.fixture(scope="module")
def llms(default_tokenizer):
    out = {}
    for fam in ("llama", "gemma3"):
        m = tiny_model(fam, seed=2)
        out[fam] = {mode: LLM.from_model(m, default_tokenizer, name=f"tiny-{fam}", chunk_size=64, prefill_mode=mode)
                    for mode in ("batch", "rows", "auto")}
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("spec,budget", SPECS)
def test_rows_prefill_gives_the_batch_prefill_tokens(llms, family, spec, budget):
    ids = [random_prompt(210, seed=7), random_prompt(90, seed=8), random_prompt(160, seed=9)]
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    a = llms[family]["batch"].generate(ids, p, method=spec, budget=budget)
    b = llms[family]["rows"].generate(ids, p, method=spec, budget=budget)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert [len(x.token_ids) for x in b] == [6, 6, 6]
    sa, sb = a[0].stats, b[0].stats
    assert sb.prompt_tokens == sa.prompt_tokens == 210 and sb.kv_full_bytes == sa.kv_full_bytes
    if "sentencekv" in spec:
        ma, mb = sa.method_stats, sb.method_stats
        assert mb["chunks_selected_per_head"] == pytest.approx(ma["chunks_selected_per_head"])
        assert sb.kv_host_bytes > 0 and sb.kv_kept_bytes == sa.kv_kept_bytes


def test_auto_prefills_rows_only_for_methods_that_shrink_the_kv():
    assert not build_method("full").row_prefill_ok()
    for spec in ("snapkv", "streaming", "pyramidkv", "sentencekv", "snapkv+sentencekv"):
        assert build_method(spec, 64).row_prefill_ok(), spec


def test_rows_prefill_writes_every_row_into_one_host_store(llms):
    """The batch cache holds one ChunkStore per layer for all rows; each row's chunks are its own."""
    llm = llms["llama"]["rows"]
    ids = [random_prompt(200, seed=11), random_prompt(120, seed=12)]
    m = build_method("sentencekv", 64)
    run = m.start(200, llm.info.num_layers)
    with llm.lock:
        cache, stats, (ctx, logits) = llm.runner.prefill(ids, m, run, None, False, reserve=4)
    assert logits.shape[0] == 2 and ctx.next_pos.tolist() == [200, 120] and ctx.has_padding
    for layer in cache.layers:
        store = layer.state["sentencekv"].store
        # allocated once, for the longest row's tokens between its sinks and its recent window
        assert store.b == 2 and store.T == 200 - 4 - 60 == int(store.used.max())
        used = store.used.view(2, -1)
        assert bool((used[0] > used[1]).all())                     # row 0 offloaded more (longer prompt)
        assert layer.keys.shape[0] == 2
        pos = layer.positions
        assert int(pos[1].max()) == 119 and int(pos[0].max()) == 199  # recent window of each row
    # the host store is counted once (not per row)
    assert stats.kv_host_bytes == sum(ly.state["sentencekv"].store.kv_nbytes()[1] for ly in cache.layers)


def test_prefill_mode_is_validated(default_tokenizer):
    m = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="prefill_mode"):
        LLM.from_model(m, default_tokenizer, prefill_mode="sideways")


def test_a_batch_of_questions_over_a_sentencekv_context(llms):
    """A reused context is cloned (its host store repeated) for a batch of questions, which are
    prefilled together in either mode; the context itself stays batch 1."""
    llm = llms["llama"]["rows"]
    ctx = llm.prefill_context(random_prompt(180, seed=13), method="sentencekv", budget=80)
    qs = [random_prompt(10, seed=14), random_prompt(14, seed=15)]
    p = SamplingParams(max_tokens=4, ignore_eos=True)
    a = llm.generate(qs, p, context=ctx)
    b = llms["llama"]["batch"].generate(qs, p, context=ctx)
    assert [x.token_ids for x in a] == [y.token_ids for y in b] and len(a) == 2
    assert ctx.cache.layers[0].keys.shape[0] == 1 and ctx.cache.layers[0].state["sentencekv"].store.b == 1


def test_rows_prefill_carries_the_clusters_of_a_method_that_keeps_state(llms):
    """squeezed clusters each layer's keys at the prefill's end: prefilled row by row (which it
    does not ask for; ``prefill_mode="rows"`` or a prefix store does), each row's clusters are
    restacked over the batch as at a join, so decoding selects by them as after a batch prefill."""
    llm = llms["llama"]["rows"]
    ids = [random_prompt(200, seed=13), random_prompt(140, seed=14)]
    m = build_method("squeezed", 32)
    run = m.start(200, llm.info.num_layers)
    with llm.lock:
        cache, _, _ = llm.runner.prefill(ids, m, run, None, False, reserve=4)
    for layer in cache.layers:
        st = layer.state["squeezed"]
        assert st.row_n.tolist() == [200, 140] and st.labels.shape[:2] == (2, layer.k_buf.shape[1])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("spec", ["squeezed", "snapkv+squeezed"])
def test_rows_prefill_of_squeezed_gives_each_prompt_its_tokens_alone(llms, family, spec):
    """(Not against the padded batch prefill: squeezed's k-means puts keys that differ in the last
    bits into other clusters, and a padded batch's attention rounds differently.) Each row's
    tokens are those of its prompt alone."""
    ids = [random_prompt(210, seed=7), random_prompt(90, seed=8), random_prompt(160, seed=9)]
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    rows = llms[family]["rows"].generate(ids, p, method=spec, budget=48)
    alone = [llms[family]["batch"].generate([x], p, method=spec, budget=48)[0] for x in ids]
    assert [x.token_ids for x in rows] == [y.token_ids for y in alone]
