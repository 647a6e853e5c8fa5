"""Prefix sharing (``kvsift/engine/prefix.py``): a method that does what ``full`` does until its
prefill's last chunk (``shares_prefix``) starts each prompt from the stored full-cache KV before that
chunk, and gives exactly the tokens it gives without the store (row-by-row prefill)."""

import pytest
import torch

from kvsift import LLM, SamplingParams, available_methods, build_method
from kvsift.engine.prefix import PrefixStore
from kvsift.models import tiny_model
from tests.conftest import random_prompt

BUDGET = 48
COMPOSED = ["snapkv+kivi", "snapkv+quest", "adakv(snapkv)", "minference+snapkv", "adakv(h2o)", "snapkv+sentencekv",
            "sentencekv+kivi", "decoding(h2o)", "snapkv+squeezed"]
OPTS: dict = {}   # options for the sharing check, per method (none needed so far)


def _budget(spec: str):
    return None if spec == "full" else BUDGET


@pytest.fixture(scope="module")
def pair(default_tokenizer):
    """Two engines over one tiny model: row-by-row prefill without a store, and one with a store."""
    m = tiny_model("llama", seed=3)
    plain = LLM.from_model(m, default_tokenizer, name="tiny", chunk_size=64, prefill_mode="rows")
    shared = LLM.from_model(m, default_tokenizer, name="tiny", chunk_size=64)
    shared.runner.prefix_store = PrefixStore(1 << 30)
    return plain, shared


def _ids():
    return [random_prompt(230, seed=31), random_prompt(230, seed=32)]


def test_sharing_methods_are_declared():
    """Every registered method says whether it shares prefixes; those that act during every chunk
    of the prefill do not."""
    says = {n: build_method(n, **OPTS.get(n, {}), budget=_budget(n)).shares_prefix() for n in available_methods()}
    assert says["full"] and says["snapkv"] and says["quest"] and says["tokenselect"] and says["kivi"]
    for n in ("chunked", "minference"):
        assert not says[n], n
    assert says["squeezed"] and says["h2o"] and says["expected_attention"]
    # h2o's accumulated attention and expected_attention's query statistics (window=0) are
    # carried with the prefix: one prefix per such state, shared by every budget
    assert build_method("h2o", BUDGET).prefix_state() == build_method("h2o", 2 * BUDGET, recent=3).prefix_state()
    assert build_method("expected_attention", budget=BUDGET).prefix_state() is not None
    assert build_method("expected_attention", budget=BUDGET, window=16).prefix_state() is None
    assert build_method("snapkv", BUDGET).prefix_state() is None and build_method("full").prefix_state() is None
    assert build_method("adakv(h2o)", BUDGET).prefix_state() == build_method("h2o", BUDGET).prefix_state()
    assert says["sentencekv"] and not build_method("sentencekv", BUDGET, prefill_offload=True).shares_prefix()
    assert build_method("snapkv+quest", BUDGET).shares_prefix()
    assert not build_method("minference+snapkv", BUDGET).shares_prefix()


@pytest.mark.parametrize("spec", sorted(available_methods()) + COMPOSED)
def test_shared_prefix_gives_the_tokens_of_a_prefill_without_it(pair, spec):
    plain, shared = pair
    store = shared.runner.prefix_store
    ids = _ids()
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    kw = dict(method=spec, budget=_budget(spec), method_kwargs=OPTS.get(spec))
    want = [o.token_ids for o in plain.generate(ids, p, **kw)]
    hits = store.stats.hits
    first = [o.token_ids for o in shared.generate(ids, p, **kw)]    # stores the prefixes (or uses them)
    second = [o.token_ids for o in shared.generate(ids, p, **kw)]   # uses them, if it shares
    assert first == want and second == want
    m = build_method(spec, _budget(spec), **OPTS.get(spec, {}))
    if m.shares_prefix():
        assert store.stats.hits >= hits + len(ids)   # the second call at least: every row from the store
    else:
        assert store.stats.hits == hits   # not asked


@pytest.mark.parametrize("spec", ["h2o", "expected_attention", "adakv(h2o)"])
def test_a_prefix_with_method_state_serves_every_budget(pair, spec):
    """h2o's accumulated attention (expected_attention's query statistics) travels with the
    prefix: stored by one budget, used by another, the tokens of a run without the store."""
    plain, shared = pair
    store = shared.runner.prefix_store
    store.clear()
    ids, p = _ids(), SamplingParams(max_tokens=6, ignore_eos=True)
    shared.generate(ids, p, method=spec, budget=BUDGET)
    hits = store.stats.hits
    for b in (BUDGET // 2, 3 * BUDGET):
        want = [o.token_ids for o in plain.generate(ids, p, method=spec, budget=b)]
        assert [o.token_ids for o in shared.generate(ids, p, method=spec, budget=b)] == want, b
    assert store.stats.hits == hits + 2 * len(ids)
    # the full cache's prefix is another entry: snapkv does not read h2o's
    shared.generate(ids, p, method="snapkv", budget=BUDGET)
    assert store.stats.hits == hits + 2 * len(ids) and len(store) == 2 * len(ids)


@pytest.mark.parametrize("spec", ["kvzip", "adakv(kvzip)"])
def test_reread_passes_run_once_per_prompt_for_every_budget(pair, spec):
    """kvzip's reconstruction passes (about one more prefill) leave budget-free scores
    (``reread_state``): with a store they run for a prompt's first budget only; later budgets
    install a copy, run no pass and give the tokens of a run without the store. Other pass options
    are another entry."""
    plain, shared = pair
    store = shared.runner.prefix_store
    store.clear()
    ids, p = _ids(), SamplingParams(max_tokens=6, ignore_eos=True)
    first = shared.generate(ids, p, method=spec, budget=BUDGET)
    misses, hits = store.stats.reread_misses, store.stats.reread_hits
    assert misses >= len(ids) and all(o.stats.method_stats["reread_s"] > 0 for o in first)
    for b in (BUDGET // 2, 3 * BUDGET):
        want = [o.token_ids for o in plain.generate(ids, p, method=spec, budget=b)]
        got = shared.generate(ids, p, method=spec, budget=b)
        assert [o.token_ids for o in got] == want, b
        assert all(o.stats.method_stats["reread_s"] == 0.0 for o in got)   # no pass ran
    assert store.stats.reread_hits == hits + 2 * len(ids) and store.stats.reread_misses == misses
    shared.generate(ids, p, method=spec, budget=BUDGET, method_kwargs={"chunk": 64})
    assert store.stats.reread_misses == misses + len(ids)
    assert build_method("kvzip", BUDGET).reread_state() == build_method("kvzip", 2 * BUDGET,
                                                                        allocation="head").reread_state()
    assert build_method("kvzip", BUDGET, chunk=64).reread_state() != build_method("kvzip", BUDGET).reread_state()
    # passes whose results are not declared budget-free run every time (duo's induction probe)
    assert build_method("duo", BUDGET, heads="induction").reread_state() is None


def test_a_hit_runs_only_the_last_chunk_and_counts_the_reused_tokens(pair):
    _, shared = pair
    store = shared.runner.prefix_store
    store.clear()
    ids = [random_prompt(300, seed=41)]
    p = SamplingParams(max_tokens=3, ignore_eos=True)
    miss = shared.generate(ids, p, method="snapkv", budget=BUDGET)[0]
    before = store.stats.tokens_reused
    hit = shared.generate(ids, p, method="tova", budget=BUDGET)[0]   # another method, same prompt
    assert miss.stats.prompt_tokens == hit.stats.prompt_tokens == 300
    # chunks of 64: the last chunk starts at 256 (snapkv's window fits in the 44 left)
    assert store.stats.tokens_reused - before == 256
    assert len(store) == 1 and store.nbytes > 0


def test_other_tokens_or_chunking_miss():
    k = PrefixStore.key(list(range(100)), [(0, 64)])
    assert PrefixStore.key(list(range(100)), [(0, 64)]) == k
    assert PrefixStore.key([1] + list(range(1, 100)), [(0, 64)]) != k
    assert PrefixStore.key(list(range(100)), [(0, 32), (32, 64)]) != k
    assert PrefixStore.key(list(range(64)) + [7] * 36, [(0, 64)]) == k   # tokens after the cut do not matter


def _row_cache(n: int, seed: int = 0):
    from kvsift.cache import SiftCache

    g = torch.Generator().manual_seed(seed)
    c = SiftCache(2)
    for ly in c.layers:
        k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
        ly.set_kv(k, v, torch.arange(n, dtype=torch.int32).expand(1, 2, n), reserve=0)
    c.seen = n
    return c


def test_store_keeps_copies_and_what_it_holds_until_cleared():
    one = _row_cache(10).memory()["device"]
    store = PrefixStore(2 * one)
    a, b, c = (PrefixStore.key([i] * 10, [(0, 10)]) for i in range(3))
    src = _row_cache(10, seed=1)
    assert store.put(a, src) and store.put(b, _row_cache(10, seed=2))
    src.layers[0].k_buf.zero_()                  # a copy was stored, not the caller's buffers
    got = store.get(a, room=5)
    assert got.seen == 10 and got.layers[0].k_buf.shape[2] == 15
    assert torch.equal(got.layers[0].keys, _row_cache(10, seed=1).layers[0].keys)
    # full: c is not stored, a and b stay (a grid's next cell asks for a and b again, in order)
    assert not store.put(c, _row_cache(10, seed=3))
    assert store.get(c, room=0) is None and store.get(b, room=0) is not None
    assert store.stats.refused == 1 and store.nbytes == 2 * one and len(store) == 2
    store.clear()
    assert len(store) == 0 and store.nbytes == 0 and store.put(c, _row_cache(10, seed=3))
    assert not PrefixStore(one - 1).put(a, _row_cache(10))   # larger than the whole store


def test_a_full_store_makes_room_from_other_kinds_only():
    """Full, a prefix of another kind (another method's ``prefix_state``) takes the room of the
    least recently used entries of other kinds; entries of its own kind are never evicted for it
    (a grid asks for them again in the same order), and it is refused when the others would not
    free enough."""
    one = _row_cache(10).memory()["device"]
    store = PrefixStore(2 * one)
    plain = [PrefixStore.key([i] * 10, [(0, 10)]) for i in range(3)]
    mine = [PrefixStore.key([i] * 10, [(0, 10)], state=("h2o", 1)) for i in range(3)]
    assert store.put(plain[0], _row_cache(10)) and store.put(plain[1], _row_cache(10, seed=1))
    assert store.get(plain[0], room=0) is not None           # plain[1] is now the least recently used
    assert store.put(mine[0], _row_cache(10, seed=2))        # evicts plain[1]
    assert store.get(plain[1], room=0) is None and store.get(plain[0], room=0) is not None
    assert store.put(mine[1], _row_cache(10, seed=3))        # evicts plain[0]
    assert not store.put(mine[2], _row_cache(10, seed=4))    # only its own kind left: refused
    assert store.stats.evicted == 2 and store.stats.refused == 1 and len(store) == 2
    assert store.nbytes == 2 * one and store.get(mine[0], room=0) is not None
    # and back: a plain prefix takes the room of the h2o ones, least recently used first (mine[1])
    assert store.put(plain[2], _row_cache(10, seed=5))
    assert store.get(mine[1], room=0) is None and store.get(mine[0], room=0) is not None
    big = PrefixStore(one + one // 2)
    assert big.put(plain[0], _row_cache(10)) and not big.put(mine[0], _row_cache(20))   # would not fit even alone
    assert big.get(plain[0], room=0) is not None and big.stats.evicted == 0


def test_store_refuses_what_is_not_one_plain_row():
    store = PrefixStore(1 << 20)
    key = PrefixStore.key([1] * 10, [(0, 10)])
    c = _row_cache(10)
    c.layers[1].state["x"] = object()           # method state: not the full cache's KV
    assert not store.put(key, c)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixStore(0)


@pytest.mark.parametrize("spec", ["full", "snapkv", "quest", "shadowkv"])
def test_sliding_window_family_shares_exactly(default_tokenizer, spec):
    """Gemma 3 (sliding-window layers beside global ones): the same tokens from a stored prefix."""
    m = tiny_model("gemma3", seed=3)
    plain = LLM.from_model(m, default_tokenizer, name="tiny-g3", chunk_size=64, prefill_mode="rows")
    shared = LLM.from_model(m, default_tokenizer, name="tiny-g3", chunk_size=64)
    shared.runner.prefix_store = PrefixStore(1 << 30)
    ids, p = _ids(), SamplingParams(max_tokens=5, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(ids, p, method=spec, budget=_budget(spec))]
    for _ in range(2):
        assert [o.token_ids for o in shared.generate(ids, p, method=spec, budget=_budget(spec))] == want
    assert shared.runner.prefix_store.stats.hits == len(ids)


def test_grid_with_shared_prefixes_gives_the_rows_of_one_without(default_tokenizer, tmp_path):
    """``kvsift bench run --share-prefix-gib``: the grid's answers are those of row-by-row prefill
    without sharing, each prompt set's prefixes are computed once (then reused by every sharing
    cell) and dropped when the grid moves to the next prompt set; rows say they shared."""
    from kvsift.eval.runner import BenchConfig, KvsiftBackend, load_rows, run_grid
    from kvsift.eval.tasks import TaskConfig

    m = tiny_model("llama", seed=4)
    cfg = BenchConfig(tasks=["niah", "vt"], methods=["full", "snapkv", "quest", "h2o", "chunked", "kvzip"],
                      budgets=["0.25", "0.5"],
                      lengths=[300], task_config=TaskConfig(depths=(0.0, 1.0), samples=2))
    plain = KvsiftBackend(LLM.from_model(m, default_tokenizer, name="tiny", chunk_size=64, prefill_mode="rows"))
    shared = KvsiftBackend(LLM.from_model(m, default_tokenizer, name="tiny", chunk_size=64),
                           share_prefix_bytes=1 << 30)
    run_grid(plain, cfg, tmp_path / "plain.jsonl", progress=False)
    cleared = []
    store = shared.llm.runner.prefix_store
    clear = store.clear
    store.clear = lambda: (cleared.append(len(store)), clear())[-1]
    run_grid(shared, cfg, tmp_path / "shared.jsonl", progress=False)
    a = {r["key"]: r for r in load_rows(tmp_path / "plain.jsonl")}
    b = {r["key"]: r for r in load_rows(tmp_path / "shared.jsonl")}
    assert a.keys() == b.keys() and len(a) == 2 * (1 + 2 * 5)
    for k in a:
        assert [e["prediction"] for e in a[k]["samples"]] == [e["prediction"] for e in b[k]["samples"]], k
        assert b[k]["settings"]["share_prefix_gib"] == 1.0 and "share_prefix_gib" not in a[k]["settings"]
    st = store.stats
    # per task: 2 prompts stored by full (the first cell), used by snapkv, quest and kvzip at two
    # budgets; h2o stores its own 2 (with its accumulated attention) at its first budget, uses them
    # at the second; chunked (it evicts as it goes) never asks. kvzip's reread passes run at its
    # first budget; the second installs their scores
    assert st.stored == 2 * (2 + 2) and st.hits == 2 * (6 + 1) * 2 and st.misses == 2 * (2 + 2)
    assert st.reread_misses == 2 * 2 and st.reread_hits == 2 * 2
    assert cleared == [4]   # the first task's prefixes, dropped when vt's prompts came
    with pytest.raises(ValueError, match="share_prefix_bytes"):
        KvsiftBackend(shared.llm, share_prefix_bytes=-1)


def test_bench_cli_checks_the_size(capsys):
    from kvsift.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "run", "--backend", "fake", "--share-prefix-gib", "-1", "--dry-run"])
    assert e.value.code == 2
    assert "kvsift bench run: error: argument --share-prefix-gib: expected a size in GiB >= 0" in capsys.readouterr().err
