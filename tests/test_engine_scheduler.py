"""The engine's parts: the Scheduler (queues, admission by KV memory, grouping rules), batched
generation of several requests (each gets what it gets alone), and the CUDA-graph cache's
bookkeeping (buckets, reuse, release), which needs no CUDA."""

from __future__ import annotations

import pytest
import torch

from kvsift import SamplingParams
from kvsift.budget import kv_bytes_per_token, request_kv_bytes
from kvsift.cache import SiftCache
from kvsift.engine.graphs import GraphCache, GraphEntry, batch_bucket, layout_token
from kvsift.engine.scheduler import Request, Scheduler, SchedulerConfig, batch_key, join_key
from kvsift.errors import InputError, KVMemoryError
from kvsift.methods import build_method
from tests.conftest import random_prompt

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)



def run_with_joins(llm, first, schedule: dict, see=None):
    """Run ``first`` alone, letting the requests of ``schedule[n]`` join when the engine asks for
    joiners the n-th time; ``see(cache)``, if given, gets the batch's cache after every stacking of
    rows (``LLM._rebuild``). Returns ``(outputs by request id, rows running at each ask)``."""
    steps, outs = [], {}
    if see is not None:
        real = llm._rebuild

        def rebuild(*args, **kwargs):
            out = real(*args, **kwargs)
            see(out[0].cache)
            return out

        llm._rebuild = rebuild
    try:
        for r, ev in llm.run_batch([first], join=lambda run, rows: steps.append(rows) or schedule.get(len(steps), [])):
            if ev.output is not None:
                outs[r.id] = ev.output
    finally:
        if see is not None:
            del llm._rebuild
    return outs, steps

def record_forward_widths(llm, monkeypatch) -> list[int]:
    """Every model call the runner makes from now on, as its width in tokens (1: a decode step)."""
    widths = []
    real = llm.runner.forward

    def forward(ctx, ids, pos):
        widths.append(ids.shape[1])
        return real(ctx, ids, pos)

    monkeypatch.setattr(llm.runner, "forward", forward)
    return widths


def record_forward_shapes(llm, monkeypatch) -> list[tuple[int, int]]:
    """Every model call the runner makes from now on, as its ``(rows, tokens)`` input shape."""
    shapes = []
    real = llm.runner.forward
    monkeypatch.setattr(llm.runner, "forward",
                        lambda ctx, ids, pos: shapes.append(tuple(ids.shape)) or real(ctx, ids, pos))
    return shapes


def req(prompts, params=GREEDY, method="full", budget=None, kv=0, host=0, context=None, kind="generate", **opts):
    return Request([list(p) for p in prompts], params if kind == "generate" else None,
                   build_method(method, budget, **opts), context=context, kv_bytes=kv, host_bytes=host, kind=kind)


# ---- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(max_batch=0), dict(max_batch=1.5), dict(max_batch=True), dict(kv_memory=0),
                                dict(host_memory=-1), dict(max_positions="8")])
def test_scheduler_config_is_validated(kw):
    with pytest.raises(ValueError):
        SchedulerConfig(**kw)


def test_request_is_validated():
    with pytest.raises(ValueError, match="non-empty prompt"):
        req([[]])
    with pytest.raises(ValueError, match="kind"):
        Request([[1]], GREEDY, build_method("full"), kind="decode")


# ---- grouping rules -------------------------------------------------------------------------------------
def test_batch_key_rules():
    a = req([[1, 2, 3]])
    assert batch_key(a) == batch_key(req([[4, 5]])) is not None        # full: any prompt lengths
    assert batch_key(a) == batch_key(req([[1]], SamplingParams(max_tokens=50, stop=["x"])))  # per-sequence params
    snap = req([[1] * 40], method="snapkv", budget=16)
    assert batch_key(snap) == batch_key(req([[2] * 40], method="snapkv", budget=16))
    assert batch_key(snap) != batch_key(req([[2] * 41], method="snapkv", budget=16))  # compressing: one length
    assert batch_key(snap) != batch_key(req([[2] * 40], method="snapkv", budget=17))  # budget
    assert batch_key(snap) != batch_key(req([[2] * 40], method="snapkv", budget=16, window=4))  # options
    assert batch_key(req([[1] * 40, [1] * 39], method="snapkv", budget=16)) is None  # mixed in itself: alone
    # quest pads exactly with token budgets (its pages count each row's own tokens), not with ratios
    q = req([[2] * 40], method="quest", budget=16)
    assert batch_key(q) == batch_key(req([[2] * 41], method="quest", budget=16)) is not None
    assert batch_key(req([[1] * 40, [1] * 39], method="quest", budget=16)) is not None
    assert batch_key(req([[2] * 40], method="quest", budget=0.5)) != batch_key(req([[2] * 41], method="quest", budget=0.5))
    hot = SamplingParams(max_tokens=4, temperature=0.7)
    assert batch_key(req([[1]], hot)) == batch_key(req([[2, 3]], hot)) != batch_key(a)
    assert batch_key(req([[1]], SamplingParams(max_tokens=4, temperature=0.8))) != batch_key(req([[1]], hot))
    assert batch_key(req([[1]], SamplingParams(max_tokens=4, temperature=0.7, seed=3))) is None  # seeded: alone
    assert batch_key(req([[1]], kind="prefill")) is None
    ctx1, ctx2 = object(), object()  # stand-ins: only their identity counts
    r1 = Request([[1]], GREEDY, build_method("full"), context=ctx1)
    assert batch_key(r1) == batch_key(Request([[2]], GREEDY, build_method("full"), context=ctx1))
    assert batch_key(r1) != batch_key(Request([[2]], GREEDY, build_method("full"), context=ctx2)) != batch_key(a)


def test_schedule_groups_compatible_requests_fifo_up_to_max_batch():
    s = Scheduler(SchedulerConfig(max_batch=4))
    a, b, c, d, e = req([[1]]), req([[1]] * 2), req([[1] * 40], method="snapkv", budget=8), req([[2]]), req([[3]])
    for r in (a, b, c, d, e):
        s.add(r)
    g = s.schedule()
    assert g == [a, b, d] and s.running == g          # 1 + 2 + 1 rows; snapkv's does not fit the key; e: over 4
    assert list(s.waiting) == [c, e]
    assert s.schedule() == [c] and s.schedule() == [e]  # nothing runs beside the others by memory: unbounded
    s.finish([a, b, d, c, e])
    assert s.running == [] and s.kv_used == 0 and s.schedule() == []


def test_one_request_runs_whole_above_max_batch_and_head_picks_the_group():
    s = Scheduler(SchedulerConfig(max_batch=1))
    big, small = req([[1]] * 5), req([[2]])
    s.add(big)
    s.add(small)
    assert s.schedule(head=small) == [small]  # max_batch 1: no merging
    assert s.schedule(head=small) == []       # not waiting any more
    assert s.schedule() == [big]              # a request is never split


def test_admission_by_device_and_host_memory():
    s = Scheduler(SchedulerConfig(max_batch=8, kv_memory=100, host_memory=50))
    with pytest.raises(KVMemoryError, match="does not fit the engine's KV memory") as e:
        s.add(req([[1]], kv=101))
    assert isinstance(e.value, InputError) and e.value.status == 400 and e.value.code == "kv_memory_exceeded"
    with pytest.raises(KVMemoryError, match="host memory"):
        s.check(req([[1]], kv=1, host=51))
    a, b, c = req([[1]], kv=60, host=10), req([[2]], kv=30, host=30), req([[3]], kv=20, host=0)
    for r in (a, b, c):
        s.add(r)
    assert s.schedule() == [a, b]                      # c would pass 100 device bytes: not in this group
    assert (s.kv_used, s.host_used) == (90, 40)
    assert s.schedule() == []                          # c waits for memory, in order
    s.finish([a])
    assert s.schedule() == [c] and s.kv_used == 50
    assert s.remove(c) is False and s.remove(req([[9]])) is False


def test_grouping_keeps_every_requests_token_room():
    s = Scheduler(SchedulerConfig(max_batch=8, max_positions=100))
    short = req([[1] * 10], SamplingParams(max_tokens=80))
    long = req([[1] * 50], SamplingParams(max_tokens=10))
    s.add(short)
    s.add(long)
    assert s.schedule() == [short]  # beside a 50-token prompt, short would get 50 new tokens instead of 80
    s2 = Scheduler(SchedulerConfig(max_batch=8, max_positions=100))
    a, b = req([[1] * 10], SamplingParams(max_tokens=20)), req([[1] * 50], SamplingParams(max_tokens=10))
    s2.add(a)
    s2.add(b)
    assert s2.schedule() == [a, b]


def test_kv_estimate():
    per = kv_bytes_per_token(2, 2, 16, 4)
    assert per == 2 * 2 * (2 * 16 * 4 + 4)
    dev, host = request_kv_bytes(per, 2, 100, 100, 10)
    assert dev == 2 * 110 * per and host == 0
    dev, host = request_kv_bytes(per, 2, 100, 20, 10)  # compressed: the prefill's full KV is the peak
    assert dev == 2 * 100 * per
    dev, _ = request_kv_bytes(per, 2, 100, 20, 10, row_prefill=True)  # one row at a time, beside those done
    assert dev == (100 + 20) * per
    dev, host = request_kv_bytes(per, 1, 100, 20, 10, offloads=True, context_bytes=7)
    assert host == 100 * per and dev == 7 + 100 * per


def test_llm_request_estimates_and_refuses_before_compute(tiny_llm):
    ids = [random_prompt(100, seed=1)]
    full = tiny_llm.request(ids, SamplingParams(max_tokens=10))
    snap = tiny_llm.request(ids, SamplingParams(max_tokens=10), method="snapkv", budget=20)
    skv = tiny_llm.request(ids, SamplingParams(max_tokens=10), method="sentencekv", budget=40)
    per = tiny_llm.kv_bytes_per_token
    assert full.kv_bytes == 110 * per and full.run.tokens == 100 and snap.run.tokens == 20
    assert skv.host_bytes == 100 * per and full.host_bytes == snap.host_bytes == 0
    # shadowkv keeps only the values (and positions) on the host: half of each token's KV, counted so
    shadow = tiny_llm.request(ids, SamplingParams(max_tokens=10), method="shadowkv", budget=40)
    assert shadow.host_bytes == 50 * per
    # sentencekv+kivi: the host chunks hold int4 codes and value scales, about a quarter of the KV;
    # the estimate is what a generation really stores there, not the bf16 bytes (within positions)
    q = tiny_llm.request(ids, SamplingParams(max_tokens=10), method="sentencekv+kivi", budget=40)
    assert 0.2 * skv.host_bytes < q.host_bytes < 0.35 * skv.host_bytes
    real = {m: tiny_llm.generate(ids, SamplingParams(max_tokens=2, ignore_eos=True), method=m,
                                 budget=40)[0].stats.kv_host_bytes for m in ("sentencekv", "sentencekv+kivi")}
    assert real["sentencekv+kivi"] / real["sentencekv"] <= q.host_bytes / skv.host_bytes + 0.05
    s = Scheduler(tiny_llm.scheduler_config(kv_memory=50 * per))
    with pytest.raises(KVMemoryError):
        s.add(full)


# ---- batched generation across requests -------------------------------------------------------------
def test_run_batch_gives_each_request_its_answer_alone(tiny_llm):
    p_a, p_b, p_c = random_prompt(90, seed=21), random_prompt(60, seed=22), random_prompt(75, seed=23)
    pa = SamplingParams(max_tokens=7, ignore_eos=True)
    pb = SamplingParams(max_tokens=3, ignore_eos=True)   # its own max_tokens
    alone = [tiny_llm.generate(p, q)[0].token_ids for p, q in ((p_a, pa), (p_b, pb), (p_c, pa))]
    s = Scheduler(tiny_llm.scheduler_config(max_batch=4))
    reqs = [tiny_llm.request([p_a], pa), tiny_llm.request([p_b], pb), tiny_llm.request([p_c], pa)]
    for r in reqs:
        s.add(r)
    group = s.schedule()
    assert group == reqs
    outs, finished_at_last = {}, {}
    for r, ev in tiny_llm.run_batch(group):
        if ev.output is not None:
            outs[reqs.index(r)] = ev.output
            finished_at_last[reqs.index(r)] = r.finished
    s.finish(group)
    assert [outs[i].token_ids for i in range(3)] == alone
    assert all(finished_at_last.values()) and len(outs[1].token_ids) == 3
    # each request's stats hold its share of the batch's KV, not the whole batch
    st = outs[0].stats
    assert st.kv_full_bytes == 2 * tiny_llm.info.num_layers * tiny_llm.info.num_kv_heads * 90 * \
        tiny_llm.info.head_dim * 4


def test_run_batch_compressed_equal_lengths_and_cancelling_one(tiny_llm):
    p_a, p_b = random_prompt(80, seed=31), random_prompt(80, seed=32)
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    alone = [tiny_llm.generate(x, p, method="snapkv", budget=24)[0].token_ids for x in (p_a, p_b)]
    reads = {"n": 0}

    def leave():  # the first request's client leaves after 3 steps
        reads["n"] += 1
        return reads["n"] > 3

    a = tiny_llm.request([p_a], p, method="snapkv", budget=24, cancel=leave)
    b = tiny_llm.request([p_b], p, method="snapkv", budget=24)
    assert batch_key(a) == batch_key(b)
    outs = {}
    for r, ev in tiny_llm.run_batch([a, b]):
        if ev.output is not None:
            outs[r.id] = ev.output
    assert outs[a.id].finish_reason == "cancelled" and len(outs[a.id].token_ids) == 3
    assert outs[a.id].token_ids == alone[0][:3]
    assert outs[b.id].token_ids == alone[1] and outs[b.id].finish_reason == "length"


def test_offline_generate_goes_through_the_llms_scheduler(tiny_llm, monkeypatch):
    seen = []
    real = tiny_llm.scheduler.schedule
    monkeypatch.setattr(tiny_llm.scheduler, "schedule", lambda head=None: seen.append(head) or real(head))
    tiny_llm.generate(random_prompt(20, seed=2), SamplingParams(max_tokens=2))
    assert len(seen) == 1 and seen[0].prompts[0] == random_prompt(20, seed=2)
    assert not tiny_llm.scheduler.waiting and not tiny_llm.scheduler.running and tiny_llm.scheduler.kv_used == 0


# ---- CUDA-graph cache bookkeeping ---------------------------------------------------------------------
def test_batch_bucket_choice():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 9, 256)] == [1, 2, 4, 4, 8, 16, 256]
    assert batch_bucket(257) is None and batch_bucket(3, (2, 6)) == 6
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError):
            batch_bucket(bad)
    for kw in (dict(max_graphs=0), dict(buckets=(4, 2)), dict(buckets=()), dict(buckets=(0, 1))):
        with pytest.raises(ValueError):
            GraphCache(**kw)


def test_graph_cache_reuse_lru_and_release():
    g = GraphCache(max_graphs=3)
    cache_a, cache_b = object(), object()
    la, lb = layout_token(cache_a), layout_token(cache_b)
    ka0, ka1, kb0 = g.key(4, 0, la), g.key(4, 1, la), g.key(2, 0, lb)
    assert g.get(ka0) is None and g.stats.misses == 1
    g.put(ka0, GraphEntry("graph a0"))
    g.put(ka1, GraphEntry("graph a1"))
    g.put(kb0, GraphEntry("graph b0"))
    assert g.get(ka0).graph == "graph a0" and g.get(ka0).replays == 2 and g.stats.hits == 2
    g.put(g.key(8, 0, lb), GraphEntry("graph b8"))  # over the bound: the least recently used (a1) goes
    assert ka1 not in g and ka0 in g and g.stats.evicted == 1 and g.stats.captures == 4
    assert g.release(la) == 1 and ka0 not in g and len(g) == 2 and g.stats.released == 1
    assert g.release(la) == 0
    # the static inputs of a bucket are made once and shared by every generation of that bucket
    t1, p1 = g.inputs(4, torch.device("cpu"))
    t2, p2 = g.inputs(4, torch.device("cpu"))
    assert t1 is t2 and p1 is p2 and t1.shape == (4, 1) and p1.dtype == torch.int32
    assert g.inputs(8, torch.device("cpu"))[0].shape == (8, 1)


def test_decode_runner_uses_the_runners_graph_cache(tiny_llm, default_tokenizer):
    """On CPU (static mode, no recording): the runner's cache outlives generations, each generation's
    decoder keys its steps by its batch bucket and its cache's layout, and leaves nothing behind."""
    from kvsift import LLM

    static = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static")
    graphs = static.runner.graphs
    made = []
    real = static.runner.decoder

    def decoder(ctx, mode, steps):
        d = real(ctx, mode, steps)
        made.append(d)
        return d

    static.runner.decoder = decoder
    ids = [random_prompt(50, seed=41), random_prompt(40, seed=42), random_prompt(30, seed=43)]
    out = static.generate(ids, SamplingParams(max_tokens=4, ignore_eos=True))
    assert out[0].stats.decode_mode == "static"
    assert [o.token_ids for o in out] == [o.token_ids for o in tiny_llm.generate(ids, SamplingParams(
        max_tokens=4, ignore_eos=True))]
    d = made[0]
    assert d.batch == 3 and d.bucket == 4 and d.layout[0] == "SiftCache"
    assert static.runner.graphs is graphs and len(graphs) == 0


# ---- continuous batching: requests join a running batch at decode-step boundaries ------------------------
def test_requests_join_a_running_batch_and_get_their_answers_alone(tiny_llm):
    p_a, p_b, p_c = random_prompt(40, seed=91), random_prompt(70, seed=92), random_prompt(25, seed=93)
    pa, pb, pc = (SamplingParams(max_tokens=n, ignore_eos=True) for n in (10, 6, 9))
    want = [tiny_llm.generate(p, q)[0].token_ids for p, q in ((p_a, pa), (p_b, pb), (p_c, pc))]
    a = tiny_llm.request([p_a], pa)
    b, c = tiny_llm.request([p_b], pb), tiny_llm.request([p_c], pc)
    assert tiny_llm.joins_running(a)
    calls = []

    def join(running, rows):  # b joins at the third step boundary, c at the fifth (a longer and a shorter prompt)
        calls.append(rows)
        return {3: [b], 5: [c]}.get(len(calls), [])

    group = [a]
    outs = {}
    for r, ev in tiny_llm.run_batch(group, join=join):
        if ev.output is not None:
            outs[r.id] = ev.output
    assert group == [a, b, c] and calls[:5] == [1, 1, 1, 2, 2]
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert all(r.finished for r in (a, b, c)) and outs[b.id].finish_reason == "length"


def test_questions_join_a_running_batch_over_a_shared_context(tiny_llm, monkeypatch):
    """Questions over one context read by reference join and leave a running batch: only their own
    tokens are stacked, every row reads the context's one copy, each gets its answer alone."""
    doc = random_prompt(300, seed=95)
    ctx = tiny_llm.prefill_context(doc)
    qs = [random_prompt(n, seed=96 + n) for n in (12, 30, 7)]
    ps = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (9, 5, 8)]
    want = [tiny_llm.generate(q, p, context=ctx)[0].token_ids for q, p in zip(qs, ps)]
    a, b, c = (tiny_llm.request([q], p, context=ctx) for q, p in zip(qs, ps))
    assert tiny_llm.joins_running(a)
    calls = []

    def no_copy(*args, **kwargs):
        raise AssertionError("the context was copied")

    monkeypatch.setattr(SiftCache, "clone", no_copy)

    def join(running, rows):
        calls.append(rows)
        return {2: [b], 4: [c]}.get(len(calls), [])

    outs = {}
    group = [a]
    for r, ev in tiny_llm.run_batch(group, join=join):
        if ev.output is not None:
            outs[r.id] = ev.output
    assert group == [a, b, c] and calls[:4] == [1, 1, 2, 2]
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert all(r.finished for r in (a, b, c))


def test_no_join_where_it_would_not_be_exact(tiny_llm):
    ids = [random_prompt(40, seed=94)]
    p = SamplingParams(max_tokens=4, ignore_eos=True)
    held = tiny_llm.request(ids, p, method="sentencekv", budget=16, method_kwargs={"reselect_every": 2})
    assert not tiny_llm.joins_running(held)   # a held selection is per batch step
    # tova, h2o and streaming join at their budget (test below), but not over a context: each row copies it
    plain = tiny_llm.prefill_context(ids[0][:30])
    for spec in ("tova", "h2o", "streaming"):
        assert tiny_llm.joins_running(tiny_llm.request(ids, p, method=spec, budget=16)), spec
        assert not tiny_llm.joins_running(tiny_llm.request([ids[0][30:]], p, context=plain, method=spec, budget=16))
    ctx = tiny_llm.prefill_context(ids[0], method="sentencekv", budget=32)   # its KV lives in a host store
    assert not tiny_llm.joins_running(tiny_llm.request(ids, p, context=ctx, method="sentencekv", budget=32))


@pytest.mark.parametrize("mode,spec", [("eager", "quest"), ("static", "quest"), ("eager", "snapkv+quest")])
def test_quest_requests_of_other_lengths_join_and_get_their_answers_alone(tiny_llm, default_tokenizer, mode, spec):
    """quest's pages count each row's own tokens (its prompt, then its decode tokens after the
    padding that stacking puts between them), and its summaries are rebuilt from the stacked
    buffer: requests of other prompt lengths with the same tokens per step join a running batch
    and each gets its answer alone; another budget waits (join key)."""
    from kvsift import LLM

    llm = tiny_llm if mode == "eager" else LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64,
                                                          decode_mode="static")
    ps = [random_prompt(n, seed=190 + n) for n in (130, 75, 203)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (20, 9, 12)]
    kw = {"decode_budget": 32} if spec != "quest" else {}
    budget = 32 if spec == "quest" else 64
    want = [tiny_llm.generate(x, q, method=spec, budget=budget, method_kwargs=kw)[0].token_ids
            for x, q in zip(ps, pr)]
    a, b, c = (llm.request([x], q, method=spec, budget=budget, method_kwargs=kw) for x, q in zip(ps, pr))
    assert llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c)
    other = (llm.request([ps[0]], pr[0], method=spec, budget=48) if spec == "quest" else   # another step budget
             llm.request([ps[0]], pr[0], method=spec, budget=budget, method_kwargs={"decode_budget": 48}))
    assert join_key(a) != join_key(other)
    outs, rows = run_with_joins(llm, a, {2: [b], 6: [c]})
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert max(rows) >= 2


@pytest.mark.parametrize("spec,budget", [("full", None), ("snapkv", 0.5), ("adakv", 0.5), ("duo", 0.5)])
def test_joins_in_static_decode_restart_the_step_runner_and_keep_the_answers(tiny_llm, default_tokenizer,
                                                                             spec, budget):
    """Static decode (fixed buffers; what CUDA graphs record): a change of rows closes the step
    runner and starts one over the new cache; every answer is the one alone, eager or static."""
    from kvsift import LLM

    static = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static")
    ps = [random_prompt(n, seed=170 + n) for n in (60, 300, 45)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (8, 9, 7)]
    want = [tiny_llm.generate(x, q, method=spec, budget=budget)[0].token_ids for x, q in zip(ps, pr)]
    a, b, c = (static.request([x], q, method=spec, budget=budget) for x, q in zip(ps, pr))
    assert static.joins_running(a)
    made = []
    real = static.runner.decoder
    static.runner.decoder = lambda ctx, mode, n: made.append(mode) or real(ctx, mode, n)
    try:
        outs, _ = run_with_joins(static, a, {2: [b], 5: [c]})
    finally:
        del static.runner.decoder
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert all(outs[r.id].stats.decode_mode == "static" for r in (a, b, c))
    assert made[0] == "static" and len(made) >= 3   # one step runner per change of rows


@pytest.mark.parametrize("spec", ["snapkv", "adakv", "duo", "kvzip", "expected_attention", "pyramidkv",
                                  "chunked(snapkv)", "minference+snapkv"])
def test_eviction_requests_of_any_length_and_budget_join_and_get_their_answers_alone(tiny_llm, spec):
    """Prefill eviction methods keep nothing but their kept KV, so a request of another prompt length
    and another budget joins a running batch of the same method: it is prefilled on its own (its
    ratio resolved against its own prompt) and stacked with the running rows (dense or compact
    per-head KV); every answer equals the request's alone, and rows that finish leave."""
    p_a, p_b, p_c = random_prompt(60, seed=71), random_prompt(90, seed=72), random_prompt(45, seed=73)
    pa, pb, pc = (SamplingParams(max_tokens=n, ignore_eos=True) for n in (6, 9, 7))
    budgets = (0.5, 24, 0.25)
    want = [tiny_llm.generate(p, q, method=spec, budget=bud)[0].token_ids
            for p, q, bud in ((p_a, pa, budgets[0]), (p_b, pb, budgets[1]), (p_c, pc, budgets[2]))]
    a, b, c = (tiny_llm.request([p], q, method=spec, budget=bud)
               for p, q, bud in ((p_a, pa, budgets[0]), (p_b, pb, budgets[1]), (p_c, pc, budgets[2])))
    assert tiny_llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c) and batch_key(a) != batch_key(b)
    sched = Scheduler(SchedulerConfig(max_batch=4))
    for r in (a, b, c):
        sched.add(r)
    assert sched.schedule() == [a]     # different lengths: not one prefill batch...
    assert sched.join([a], 1) == [b, c]  # ...but both may join it
    calls = []

    def join(running, rows):  # b joins at the third step boundary, c at the seventh, after a left
        calls.append(rows)
        return {3: [b], 7: [c]}.get(len(calls), [])

    group, outs = [a], {}
    for r, ev in tiny_llm.run_batch(group, join=join):
        if ev.output is not None:
            outs[r.id] = ev.output
    assert group == [a, b, c] and calls[:3] == [1, 1, 1] and calls[6] == 1, calls
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert outs[b.id].stats.budget == 24 and outs[c.id].stats.budget == 0.25


@pytest.mark.parametrize("spec,budget", [("full", None), ("snapkv", 0.25)])
def test_a_joining_prompt_is_prefilled_between_the_running_decode_steps(tiny_llm, monkeypatch, spec, budget):
    """A long prompt that joins a running batch is prefilled one chunk per decode step of the rows
    already running (chunk_size 64: its 300 tokens take 5 chunks), so their tokens keep coming
    while it prefills; it then decodes with them, and every answer is the one alone. A joining
    request whose client leaves during its prefill ends there, cancelled, with no token, and the
    running rows go on unchanged."""
    p_a, p_b = random_prompt(40, seed=81), random_prompt(300, seed=82)
    pa, pb = SamplingParams(max_tokens=16, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)
    want_a = tiny_llm.generate(p_a, pa, method=spec, budget=budget)[0].token_ids
    want_b = tiny_llm.generate(p_b, pb, method=spec, budget=budget)[0].token_ids
    widths = record_forward_widths(tiny_llm, monkeypatch)

    def order():  # the forwards so far: p (a prefill chunk) or d (a decode step)
        return "".join("d" if w == 1 else "p" for w in widths)
    for leave in (False, True):
        widths.clear()
        chunks_done = {"n": 0}

        def cancel_b():   # b's client leaves once 2 of its chunks ran (asked before each later chunk)
            return leave and order().count("p") >= 3     # a's own prefill is one chunk

        a = tiny_llm.request([p_a], pa, method=spec, budget=budget)
        b = tiny_llm.request([p_b], pb, method=spec, budget=budget, cancel=cancel_b)
        sched = Scheduler(SchedulerConfig(max_batch=4, kv_memory=1 << 40))
        sched.add(a)
        assert sched.schedule() == [a]
        sched.add(b)
        steps = []
        outs = {}
        group = [a]
        for r, ev in tiny_llm.run_batch(group, join=lambda running, rows: steps.append(rows) or
                                        (sched.join(running, rows) if len(steps) == 2 else [])):
            if ev.output is not None:
                outs[r.id] = ev.output
        sched.finish(group)   # what the server does: a joiner is in the group from its join on
        assert group == [a, b] and sched.kv_used == 0 and not sched.running and not sched.waiting
        assert outs[a.id].token_ids == want_a
        seq = order()
        assert seq.startswith("pd"), seq                 # a's prefill, its first decode step
        if not leave:
            assert outs[b.id].token_ids == want_b
            # from the join on: b's 5 chunks, each followed by one decode step (a alone for the
            # first 4, then a and b together)
            assert seq[2:12] == "pdpdpdpdpd", seq
        else:
            assert outs[b.id].finish_reason == "cancelled" and outs[b.id].token_ids == []
            assert seq.count("p") == 3 and b.finished, seq  # a's prefill + b's first 2 chunks
            assert len(outs) == 2
    # join_chunks=2: two chunks per step; 0: the whole joining prefill at once (the running row waits)
    for n, want_seq in ((2, "ppdppdpd"), (0, "pppppd")):
        monkeypatch.setattr(tiny_llm, "join_chunks", n)
        widths.clear()
        a = tiny_llm.request([p_a], pa, method=spec, budget=budget)
        b = tiny_llm.request([p_b], pb, method=spec, budget=budget)
        steps = []
        outs = {r.id: ev.output for r, ev in tiny_llm.run_batch(
            [a], join=lambda running, rows: steps.append(rows) or ([b] if len(steps) == 2 else []))
            if ev.output is not None}
        assert [outs[a.id].token_ids, outs[b.id].token_ids] == [want_a, want_b]
        assert order()[2:2 + len(want_seq)] == want_seq, (n, order())


@pytest.mark.parametrize("spec,budget,narrow", [("full", None, True), ("sentencekv", 64, True),
                                                ("snapkv", 0.25, False)])
def test_join_chunk_size_narrows_a_joining_prefill(tiny_llm, monkeypatch, spec, budget, narrow):
    """join_chunk_size=16: a joining prompt of a method whose prefill does not depend on its
    chunking is prefilled 16 tokens between two decode steps (so the running row waits for a
    16-token forward per token, not a 64-token one) and still answers as alone; snapkv scores
    with its last chunk's queries, so its joining prefill keeps the chunk size."""
    p_a, p_b = random_prompt(100, seed=83), random_prompt(300, seed=84)
    pa, pb = SamplingParams(max_tokens=30, ignore_eos=True), SamplingParams(max_tokens=4, ignore_eos=True)
    want_a = tiny_llm.generate(p_a, pa, method=spec, budget=budget)[0].token_ids
    want_b = tiny_llm.generate(p_b, pb, method=spec, budget=budget)[0].token_ids
    widths = record_forward_widths(tiny_llm, monkeypatch)
    monkeypatch.setattr(tiny_llm, "join_chunk_size", 16)
    a = tiny_llm.request([p_a], pa, method=spec, budget=budget)
    b = tiny_llm.request([p_b], pb, method=spec, budget=budget)
    outs, _ = run_with_joins(tiny_llm, a, {2: [b]})
    assert [outs[a.id].token_ids, outs[b.id].token_ids] == [want_a, want_b]
    k = acc = 0
    while acc < len(p_a):                              # a's own prefill
        acc, k = acc + widths[k], k + 1
    rest = widths[k:]
    joined = [w for w in rest if w > 1]                # b's chunks
    assert sum(joined) == 300
    assert max(joined) == (16 if narrow else 64) and len(joined) == (19 if narrow else 5), joined
    first = next(i for i, w in enumerate(rest) if w > 1)
    seg = rest[first:first + 2 * len(joined)]
    assert seg[0::2] == joined and seg[1::2] == [1] * len(joined), rest   # a decode step after each chunk


def test_join_chunk_size_is_shared_by_prompts_joining_together(tiny_llm, monkeypatch):
    """Three full-cache prompts that join at one step boundary are prefilled as one padded batch
    whose forwards hold join_chunk_size tokens over the three rows (48: 16 each), not 48 each, so
    the running row waits for the same forward however many join; every answer is as alone."""
    joined = _three_join_at_48(tiny_llm, monkeypatch, random_prompt(100, seed=85), 40,
                               [random_prompt(n, seed=86 + n) for n in (160, 160, 160)], at=2)
    assert joined and all(w == 16 for w in joined) and sum(joined) == 160, joined


def _three_join_at_48(llm, monkeypatch, p_a, max_a, joiners, at) -> list[int]:
    """Run ``p_a`` (``max_a`` tokens) with three full-cache ``joiners`` (3 tokens each) joining at
    the ``at``-th step boundary under ``join_chunk_size`` 48; check every answer equals alone and
    return the widths of the joining group's prefill forwards."""
    pa, pj = SamplingParams(max_tokens=max_a, ignore_eos=True), SamplingParams(max_tokens=3, ignore_eos=True)
    want = [llm.generate(p_a, pa)[0].token_ids] + [llm.generate(p, pj)[0].token_ids for p in joiners]
    shapes = record_forward_shapes(llm, monkeypatch)
    monkeypatch.setattr(llm, "join_chunk_size", 48)
    a = llm.request([p_a], pa)
    rs = [llm.request([p], pj) for p in joiners]
    outs, _ = run_with_joins(llm, a, {at: rs})
    assert [outs[r.id].token_ids for r in [a] + rs] == want
    return [s[1] for s in shapes if s[0] == 3 and s[1] > 1]


def test_together_joiners_of_very_different_lengths_are_not_padded_to_one(tiny_llm, monkeypatch):
    """join_order together, full: three prompts of 300, 60 and 280 tokens join at one boundary;
    the 60-token one is prefilled in a padded batch of its own (not padded to 300), the other two
    in one batch of 2 rows; they still start streaming at one boundary, and every answer is the
    one alone."""
    from kvsift.engine.llm import _length_groups

    p_a = random_prompt(100, seed=171)
    joiners = [random_prompt(n, seed=172 + n) for n in (300, 60, 280)]
    pa, pj = SamplingParams(max_tokens=50, ignore_eos=True), SamplingParams(max_tokens=4, ignore_eos=True)
    want = [tiny_llm.generate(p_a, pa)[0].token_ids] + [tiny_llm.generate(x, pj)[0].token_ids for x in joiners]
    shapes = record_forward_shapes(tiny_llm, monkeypatch)
    monkeypatch.setattr(tiny_llm, "join_chunk_size", 48)
    a = tiny_llm.request([p_a], pa)
    rs = [tiny_llm.request([x], pj) for x in joiners]
    assert [[len(r.prompts[0]) for r in g] for g in _length_groups(rs)] == [[60], [280, 300]]
    events, outs = [], {}
    for r, ev in _events_with_joins(tiny_llm, a, {2: rs}):
        events.append(r.id)
        if ev.output is not None:
            outs[r.id] = ev.output.token_ids
    assert [outs[r.id] for r in [a] + rs] == want
    joined = [(b, w) for b, w in shapes if w > 1][2:]          # after a's own prefill (64 + 36)
    assert sum(w for b, w in joined if b == 1) == 60 and sum(w for b, w in joined if b == 2) == 300, joined
    firsts = sorted(events.index(r.id) for r in rs)
    assert firsts == list(range(firsts[0], firsts[0] + 3)), events   # one boundary, one after another


def test_narrow_join_widens_once_no_row_is_decoding(tiny_llm, monkeypatch):
    """A joining group's narrow forwards (join_chunk_size) exist for the running rows' sake: once
    those are done, the rest of the joiners' prompts goes at the chunk size (64 here), not 16
    tokens a row to the end; every answer is still as alone."""
    joined = _three_join_at_48(tiny_llm, monkeypatch, random_prompt(100, seed=87), 4,
                               [random_prompt(400, seed=88 + i) for i in range(3)], at=1)
    assert sum(joined) == 400, joined
    narrow = [w for w in joined if w == 16]
    # a few narrow forwards while a decodes (3 steps after the join), then the chunk size
    assert 1 <= len(narrow) <= 4 and joined[:len(narrow)] == narrow, joined
    assert max(joined[len(narrow):]) == 64 and len(joined) < 400 // 16, joined


def test_quest_requests_of_other_lengths_share_a_batch_and_joiners_prefill_together(tiny_llm, monkeypatch):
    """quest with a token budget pads exactly: requests of other prompt lengths are scheduled into
    one left-padded batch, joiners are prefilled as one padded batch (one forward per chunk over
    both rows), and every answer is the one alone."""
    ps = [random_prompt(n, seed=200 + n) for n in (120, 97, 150, 133)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (14, 6, 5, 4)]
    want = [tiny_llm.generate(x, q, method="quest", budget=32)[0].token_ids for x, q in zip(ps, pr)]
    a, b, c, d = (tiny_llm.request([x], q, method="quest", budget=32) for x, q in zip(ps, pr))
    s = Scheduler(tiny_llm.scheduler_config(max_batch=8))
    for r in (a, b):
        s.add(r)
    assert s.schedule() == [a, b]          # other lengths, one batch
    widths = record_forward_shapes(tiny_llm, monkeypatch)
    group, outs, asks = [a, b], {}, []
    for r, ev in tiny_llm.run_batch(group, join=lambda running, rows: asks.append(len(widths)) or
                                    ([c, d] if len(asks) == 2 else [])):
        if ev.output is not None:
            outs[r.id] = ev.output
    assert [outs[r.id].token_ids for r in (a, b, c, d)] == want
    after = [w for w in widths[asks[1]:] if w[1] > 1]      # prefill forwards after c and d joined
    assert after and all(w[0] == 2 for w in after), after   # c and d in one padded batch


@pytest.mark.parametrize("spec,budget", [("full", None), ("snapkv", 48), ("quest", 32), ("sentencekv", 48)])
def test_a_joining_prefill_becomes_the_batch_when_no_running_row_is_left(tiny_llm, monkeypatch, spec, budget):
    """The running row finishes while a long prompt joins: the joiner's own prefill cache becomes
    the batch (no row is stacked or copied); with a row still running, rows are stacked. Every
    answer is the one alone both ways."""
    from kvsift.cache.layer import SiftLayer

    stacked = []
    real = SiftLayer.set_rows
    monkeypatch.setattr(SiftLayer, "set_rows", lambda self, rows: stacked.append(len(rows)) or real(self, rows))
    p_a, p_b = random_prompt(60, seed=96), random_prompt(400, seed=97)
    pb = SamplingParams(max_tokens=5, ignore_eos=True)
    want_b = tiny_llm.generate(p_b, pb, method=spec, budget=budget)[0].token_ids
    alone_b = len(stacked)   # a row-by-row prefill (snapkv, sentencekv) stacks its own row per layer
    for max_a, copies in ((3, False), (40, True)):
        pa = SamplingParams(max_tokens=max_a, ignore_eos=True)
        stacked.clear()
        want_a = tiny_llm.generate(p_a, pa, method=spec, budget=budget)[0].token_ids
        alone_a = len(stacked)
        stacked.clear()
        a = tiny_llm.request([p_a], pa, method=spec, budget=budget)
        b = tiny_llm.request([p_b], pb, method=spec, budget=budget)
        outs, _ = run_with_joins(tiny_llm, a, {1: [b]})
        assert outs[a.id].token_ids == want_a and outs[b.id].token_ids == want_b, (spec, max_a)
        # joining with a row still running stacks the two rows once per layer; after it, nothing
        # is stacked but each row-by-row prefill's own row
        if copies:
            assert stacked.count(2) == tiny_llm.info.num_layers, (spec, stacked)
        else:
            assert len(stacked) == alone_a + alone_b and set(stacked) <= {1}, (spec, stacked)


@pytest.mark.parametrize("spec,budget,invariant", [("full", None, True), ("quest", 32, True),
                                                   ("sentencekv", 48, True), ("snapkv", 0.25, False)])
def test_fcfs_joiners_each_stream_as_their_own_prefill_ends(tiny_llm, monkeypatch, spec, budget, invariant):
    """join_order fcfs: three prompts that join at one boundary are prefilled one at a time in
    arrival order, each with the whole join_chunk_size (48, not 16 a row as together), and each
    is stacked into the running batch as soon as its own prefill ends: the first joiner's tokens
    stream while the next ones prefill, and every answer is the one alone."""
    p_a = random_prompt(100, seed=111)
    joiners = [random_prompt(160, seed=112 + i) for i in range(3)]
    pa, pj = SamplingParams(max_tokens=60, ignore_eos=True), SamplingParams(max_tokens=12, ignore_eos=True)
    want = ([tiny_llm.generate(p_a, pa, method=spec, budget=budget)[0].token_ids]
            + [tiny_llm.generate(x, pj, method=spec, budget=budget)[0].token_ids for x in joiners])
    shapes = record_forward_shapes(tiny_llm, monkeypatch)
    monkeypatch.setattr(tiny_llm, "join_chunk_size", 48)
    monkeypatch.setattr(tiny_llm, "join_order", "fcfs")
    a = tiny_llm.request([p_a], pa, method=spec, budget=budget)
    rs = [tiny_llm.request([x], pj, method=spec, budget=budget) for x in joiners]
    events, outs, asks = [], {}, []
    for r, ev in tiny_llm.run_batch([a], join=lambda run, rows: asks.append(rows) or ([*rs] if len(asks) == 2 else [])):
        events.append(r.id)
        if ev.output is not None:
            outs[r.id] = ev.output
    assert [outs[r.id].token_ids for r in [a] + rs] == want
    prefills = [w for b, w in shapes if w > 1]
    k = acc = 0
    while acc < len(p_a):                              # a's own prefill
        acc, k = acc + prefills[k], k + 1
    joined = prefills[k:]                              # the joiners' forwards
    assert sum(joined) == 3 * 160 and all(b == 1 for b, w in shapes if w > 1), shapes   # one prompt a forward
    if invariant:
        assert max(joined) == 48, joined
    first = [events.index(r.id) for r in rs]
    assert first == sorted(first)
    # the first joiner streams (its own tokens, and a's) before the second's first token, and so on
    assert rs[0].id in events[first[0] + 1:first[1]] and rs[1].id in events[first[1] + 1:first[2]], events


def test_fcfs_join_order_against_together(tiny_llm, monkeypatch):
    """The same joins under both orders: together, the three joiners' first tokens come out at one
    boundary (after the last one's prefill); fcfs, the first one's comes several decode steps
    earlier. The answers are the same."""
    p_a = random_prompt(100, seed=121)
    joiners = [random_prompt(160, seed=122 + i) for i in range(3)]
    pa, pj = SamplingParams(max_tokens=80, ignore_eos=True), SamplingParams(max_tokens=6, ignore_eos=True)
    monkeypatch.setattr(tiny_llm, "join_chunk_size", 48)
    got = {}
    for order in ("together", "fcfs"):
        monkeypatch.setattr(tiny_llm, "join_order", order)
        a = tiny_llm.request([p_a], pa)
        rs = [tiny_llm.request([x], pj) for x in joiners]
        a_tokens, firsts, outs = 0, {}, {}
        for r, ev in _events_with_joins(tiny_llm, a, {2: rs}):
            if r is a:
                a_tokens += 1
            elif r.id not in firsts:
                firsts[r.id] = a_tokens          # a's tokens out before this joiner's first
            if ev.output is not None:
                outs[r.id] = ev.output.token_ids
        got[order] = ([firsts[r.id] for r in rs], [outs[r.id] for r in [a] + rs])
    (t_first, t_out), (f_first, f_out) = got["together"], got["fcfs"]
    assert t_out == f_out
    assert len(set(t_first)) == 1, t_first                    # together: one boundary
    assert f_first == sorted(f_first) and f_first[0] < t_first[0] - 2, (f_first, t_first)


def _events_with_joins(llm, first, schedule):
    asks = []
    yield from llm.run_batch([first], join=lambda run, rows: asks.append(rows) or schedule.get(len(asks), []))


def test_fcfs_joiner_that_leaves_during_its_prefill_ends_alone(tiny_llm, monkeypatch):
    """join_order fcfs: the second of three joiners' client leaves during its own prefill: it ends
    there, cancelled with no token, and the first and third answer as alone (together, a group's
    prefill stops only once every one of its requests left)."""
    p_a = random_prompt(60, seed=131)
    joiners = [random_prompt(160, seed=132 + i) for i in range(3)]
    pa, pj = SamplingParams(max_tokens=50, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)
    want = [tiny_llm.generate(x, pj)[0].token_ids for x in joiners]
    widths = record_forward_widths(tiny_llm, monkeypatch)
    monkeypatch.setattr(tiny_llm, "join_chunk_size", 48)
    monkeypatch.setattr(tiny_llm, "join_order", "fcfs")
    seen = {"n": 0}

    def leave():   # asked before each of its chunks after the first: it leaves after 3 of them
        seen["n"] += 1
        return seen["n"] > 2

    a = tiny_llm.request([p_a], pa)
    rs = [tiny_llm.request([x], pj, cancel=leave if i == 1 else None) for i, x in enumerate(joiners)]
    outs, _ = run_with_joins(tiny_llm, a, {2: rs})
    assert outs[rs[1].id].finish_reason == "cancelled" and outs[rs[1].id].token_ids == []
    assert [outs[rs[0].id].token_ids, outs[rs[2].id].token_ids] == [want[0], want[2]]
    assert outs[a.id].finish_reason == "length" and len(outs[a.id].token_ids) == 50
    assert sum(w for w in widths if w > 1) == 60 + 160 + 3 * 48 + 160, widths   # its fourth chunk never ran


def test_fcfs_joiner_prefilled_while_an_earlier_one_is_held_joins_with_it(tiny_llm, monkeypatch):
    """join_order fcfs with joiners held for their method state's writes (sentencekv's chunks on
    their way to host memory, made to look pending here): a second joiner whose prefill ends while
    the first is still held is stacked with it, at one change of rows, and every answer is the one
    alone."""
    import kvsift.engine.llm as llm_mod

    p_a = random_prompt(60, seed=141)
    joiners = [random_prompt(96, seed=142 + i) for i in range(3)]
    pa, pj = SamplingParams(max_tokens=40, ignore_eos=True), SamplingParams(max_tokens=4, ignore_eos=True)
    want = [tiny_llm.generate(p_a, pa)[0].token_ids] + [tiny_llm.generate(x, pj)[0].token_ids for x in joiners]
    asked = {"n": 0}

    def ready(parts):   # the first two joiners' writes "pending" for a few boundaries
        asked["n"] += 1
        return asked["n"] > 3

    monkeypatch.setattr(llm_mod, "_states_ready", ready)
    monkeypatch.setattr(tiny_llm, "join_chunk_size", 48)
    monkeypatch.setattr(tiny_llm, "join_order", "fcfs")
    stacks = []
    real = tiny_llm._rebuild
    monkeypatch.setattr(tiny_llm, "_rebuild", lambda ctx, pos, keep, new, *a, **k: stacks.append(len(new))
                        or real(ctx, pos, keep, new, *a, **k))
    a = tiny_llm.request([p_a], pa)
    rs = [tiny_llm.request([x], pj) for x in joiners]
    outs, _ = run_with_joins(tiny_llm, a, {2: rs})
    assert [outs[r.id].token_ids for r in [a] + rs] == want
    assert [n for n in stacks if n] == [2, 1], stacks     # the first two together, then the third


def test_shortest_join_order_streams_the_short_prompts_first(tiny_llm, monkeypatch):
    """join_order shortest: of three prompts that join at one boundary (300, 60 and 160 tokens, in
    that order), the 60-token one is prefilled first and streams first, then the 160, then the 300
    (fcfs keeps their arrival order); every answer is the one alone."""
    p_a = random_prompt(80, seed=151)
    joiners = [random_prompt(n, seed=152 + n) for n in (300, 60, 160)]
    pa, pj = SamplingParams(max_tokens=70, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)
    want = [tiny_llm.generate(x, pj)[0].token_ids for x in joiners]
    monkeypatch.setattr(tiny_llm, "join_chunk_size", 32)
    for order, first_to_last in (("shortest", [1, 2, 0]), ("fcfs", [0, 1, 2])):
        monkeypatch.setattr(tiny_llm, "join_order", order)
        a = tiny_llm.request([p_a], pa)
        rs = [tiny_llm.request([x], pj) for x in joiners]
        events, outs = [], {}
        for r, ev in _events_with_joins(tiny_llm, a, {2: rs}):
            events.append(r.id)
            if ev.output is not None:
                outs[r.id] = ev.output.token_ids
        assert [outs[r.id] for r in rs] == want, order
        firsts = sorted(range(3), key=lambda i: events.index(rs[i].id))
        assert firsts == first_to_last, (order, firsts)


def test_warm_cache_fills_only_a_joiners_rows_and_answers_as_alone(tiny_llm, monkeypatch):
    """sentencekv with warm_cache and a device cache: a request joins a running one (whose cache
    holds its chunks); the stacked batch's first step fills the joiner's empty cache only (the
    running row's entries -1), and both answer as alone."""
    import kvsift.kernels.chunk_cache as cc

    opts = {"max_chunk": 16, "recent": 16, "cache_chunks": 8, "warm_cache": True}
    p_a, p_b = random_prompt(300, seed=161), random_prompt(260, seed=162)
    pa, pb = SamplingParams(max_tokens=20, ignore_eos=True), SamplingParams(max_tokens=6, ignore_eos=True)
    want = [tiny_llm.generate(p, q, method="sentencekv", budget=80, method_kwargs=opts)[0].token_ids
            for p, q in ((p_a, pa), (p_b, pb))]
    hk = tiny_llm.info.num_kv_heads
    fills = []
    real = cc.lru_plan_ref

    def spy(idx, *a, **k):   # (rows x kv_heads, k) selections; a fill of row 1 only: row 0's all -1
        if idx.shape[0] == 2 * hk and bool((idx[:hk] < 0).all()) and bool((idx[hk:] >= 0).any()):
            fills.append(int((idx[hk:] >= 0).sum()))
        return real(idx, *a, **k)

    monkeypatch.setattr(cc, "lru_plan_ref", spy)
    a = tiny_llm.request([p_a], pa, method="sentencekv", budget=80, method_kwargs=opts)
    b = tiny_llm.request([p_b], pb, method="sentencekv", budget=80, method_kwargs=opts)
    outs, _ = run_with_joins(tiny_llm, a, {3: [b]})
    assert [outs[a.id].token_ids, outs[b.id].token_ids] == want
    assert len(fills) == tiny_llm.info.num_layers, fills   # one fill per layer, at the stacked batch's first step


def test_join_order_is_validated():
    from kvsift.engine.llm import _check_join_order

    for bad in ("fifo", None, 1):
        with pytest.raises(ValueError, match="join_order"):
            _check_join_order(bad)
    assert [_check_join_order(o) for o in ("together", "fcfs", "shortest")] == ["together", "fcfs", "shortest"]


def test_join_chunk_size_is_validated():
    from kvsift.engine.llm import _check_join_chunk_size

    assert _check_join_chunk_size(None) is None and _check_join_chunk_size(16) == 16
    for bad in (15, 0, 16.0, True, "32"):
        with pytest.raises(ValueError, match="join_chunk_size"):
            _check_join_chunk_size(bad)


def test_scheduler_join_keeps_arrival_order_and_limits():
    s = Scheduler(SchedulerConfig(max_batch=4, kv_memory=100))
    run_ = req([[1]], kv=10)
    s.add(run_)
    assert s.schedule() == [run_]
    a, b, snap, c = req([[2]], kv=10), req([[3]], kv=10), req([[1] * 40], method="snapkv", budget=8), req([[4]])
    for r in (a, b, snap, c):
        s.add(r)
    assert s.join([run_], 1) == [a, b]       # stops at snapkv's request: c does not overtake it
    assert s.running == [run_, a, b] and s.kv_used == 30 and list(s.waiting) == [snap, c]
    assert s.join([run_, a, b], 3) == []     # the head of the queue cannot join
    s.remove(snap)
    assert s.join([run_, a, b], 4) == []     # max_batch
    assert s.join([run_, a, b], 3) == [c]
    big = req([[5]], kv=80)
    s.add(big)
    assert s.join([run_], 1) == []           # memory: 30 + 80 > 100
    assert s.join([req([[1]], kind="prefill")], 1) == []


def test_done_and_cancelled_rows_leave_a_running_batch(tiny_llm, monkeypatch):
    """Rows whose sequence is done leave the batch before the next step (continuous batching), so a
    later request finds room under max_batch; every answer is still the one alone."""
    p_a, p_b, p_c, p_d = (random_prompt(n, seed=95 + n) for n in (50, 30, 40, 35))
    pa, pb, pc = (SamplingParams(max_tokens=n, ignore_eos=True) for n in (8, 2, 3))
    want = [tiny_llm.generate(p, q)[0].token_ids for p, q in ((p_a, pa), (p_b, pb), (p_c, pc))]
    reads = {"n": 0}

    def leave():  # d's client leaves at its second decode step
        reads["n"] += 1
        return reads["n"] >= 2

    a, b, c = tiny_llm.request([p_a], pa), tiny_llm.request([p_b], pb), tiny_llm.request([p_c], pc)
    d = tiny_llm.request([p_d], SamplingParams(max_tokens=50, ignore_eos=True), cancel=leave)
    rows_seen, decode_rows = [], []
    real = tiny_llm.runner.forward

    def forward(ctx, ids, pos):
        if ids.shape[1] == 1:
            decode_rows.append(ids.shape[0])
        return real(ctx, ids, pos)

    monkeypatch.setattr(tiny_llm.runner, "forward", forward)

    def join(running, rows):
        rows_seen.append(rows)
        return [c] if len(rows_seen) == 4 else []

    outs = {}
    for r, ev in tiny_llm.run_batch([a, b, d], join=join):
        if ev.output is not None:
            outs[r.id] = ev.output
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert outs[d.id].finish_reason == "cancelled" and len(outs[d.id].token_ids) == 1
    # b (2 tokens) and d (cancelled) leave after the second step; c joins at the fourth boundary
    assert rows_seen[:4] == [3, 3, 1, 1] and decode_rows[:4] == [3, 1, 1, 2], (rows_seen, decode_rows)


def test_graph_mode_bookkeeping_on_cpu_with_a_stand_in_recorder(tiny_llm, default_tokenizer, monkeypatch):
    """The graph path of DecodeRunner without CUDA: the runner's ``capture`` is replaced by a
    stand-in whose ``replay`` runs the static step over the same static inputs. One warm-up step per
    kind, a recording at the kind's second step, replays after; the inputs of a bucket are the
    runner's (the same tensors for the next generation); the generation's graphs leave the cache
    when it ends; the tokens are the eager loop's."""
    from kvsift import LLM

    llm = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static")
    runner = llm.runner

    class Replay:
        def __init__(self, ctx, tok, pos, logits):
            self.ctx, self.tok, self.pos, self.logits = ctx, tok, pos, logits

        def replay(self):
            out = real_forward(self.ctx, self.tok, self.pos)  # the step over the static inputs
            self.ctx.cache.seen -= 1  # a replay leaves the host counter to the runner (as on CUDA)
            self.logits.copy_(out)

    real_forward = runner.forward
    recorded = []

    def capture(ctx, tok, pos):
        from kvsift.engine.graphs import GraphEntry

        recorded.append((tok, pos))
        logits = torch.empty(tok.shape[0], llm.model.config.vocab_size)
        return GraphEntry(Replay(ctx, tok, pos, logits), logits)

    monkeypatch.setattr(runner, "capture", capture)
    monkeypatch.setattr(runner, "decode_mode_for", lambda method: "graph")
    ids = [random_prompt(60, seed=97), random_prompt(45, seed=98), random_prompt(50, seed=99)]
    p = SamplingParams(max_tokens=7, ignore_eos=True)
    want = [o.token_ids for o in tiny_llm.generate(ids, p)]
    out = llm.generate(ids, p)
    assert [o.token_ids for o in out] == want
    st = out[0].stats
    assert st.decode_mode == "graph" and st.decode_setup_steps == 1 and st.decode_steps == 6
    g = runner.graphs
    # steps 2..6 replay (step 1 warms up, step 2 records then replays)
    assert g.stats.captures == 1 and g.stats.hits == 5 and len(g) == 0 and g.stats.released == 1
    tok_buf, pos_buf = g.inputs(4, torch.device("cpu"))  # batch 3 -> bucket 4: views of the bucket's buffers
    assert recorded[0][0].data_ptr() == tok_buf.data_ptr() and recorded[0][0].shape == (3, 1)
    again = llm.generate(ids[:2] + [random_prompt(50, seed=100)], p)
    assert [o.token_ids for o in again][:2] == want[:2]
    assert recorded[1][0].data_ptr() == tok_buf.data_ptr()  # the same static inputs, a new generation
    assert g.stats.captures == 2 and len(g) == 0  # recorded again: its cache is a new layout


def test_kv_arena_static_decode_across_generations(tiny_llm, default_tokenizer):
    """With ``kv_arena``, static decoding of ``full`` runs over the runner's arena of the batch's
    bucket, padded with empty rows, and every later generation of that shape reuses it: the
    earlier generations' tokens are never seen (same tokens as eager, in any order of sizes)."""
    from kvsift import LLM
    from kvsift.engine.graphs import capacity_bucket

    llm = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static", kv_arena=True)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    batches = [[random_prompt(60, seed=111), random_prompt(40, seed=112), random_prompt(50, seed=113)],
               [random_prompt(30, seed=114)],
               [random_prompt(70, seed=115), random_prompt(20, seed=116)],
               [random_prompt(45, seed=117), random_prompt(65, seed=118), random_prompt(25, seed=119),
                random_prompt(55, seed=120)]]
    for ids in batches:
        out = llm.generate(ids, p)
        assert [o.token_ids for o in out] == [o.token_ids for o in tiny_llm.generate(ids, p)]
        assert out[0].stats.decode_mode == "static"
    arenas = llm.runner.arenas
    assert capacity_bucket(100) == 256 and capacity_bucket(300) == 512
    # at most two arenas, the least recently used out: bucket 4's first one went when bucket 2 came
    assert list(arenas) == [(2, 256), (4, 256)] and arenas[(4, 256)].loads == 1
    again = llm.generate(batches[0], p)  # 3 rows: bucket 4's arena, loaded over the 4-row generation's KV
    assert [o.token_ids for o in again] == [o.token_ids for o in tiny_llm.generate(batches[0], p)]
    assert arenas[(4, 256)].loads == 2
    # methods other than full never use an arena
    assert llm.generate(batches[1], p, method="snapkv", budget=16)[0].token_ids == \
        tiny_llm.generate(batches[1], p, method="snapkv", budget=16)[0].token_ids
    assert sum(a.loads for a in arenas.values()) == 3


def test_kv_arena_graphs_are_recorded_once_and_replayed_by_later_generations(tiny_llm, default_tokenizer,
                                                                             monkeypatch):
    """The point of the arena: a later generation of the same shape replays the graph an earlier one
    recorded (checked on CPU with a stand-in recorder whose replay runs the static step)."""
    from kvsift import LLM

    llm = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static", kv_arena=True)
    runner = llm.runner
    _stand_in_graphs(llm, monkeypatch)
    p = SamplingParams(max_tokens=5, ignore_eos=True)
    first = [random_prompt(50, seed=121), random_prompt(35, seed=122), random_prompt(60, seed=123)]
    second = [random_prompt(40, seed=124), random_prompt(55, seed=125)]  # bucket 2: its own arena and graph
    third = [random_prompt(30, seed=126), random_prompt(45, seed=127), random_prompt(20, seed=128),
             random_prompt(66, seed=129)]  # bucket 4 again
    for ids in (first, second, third):
        out = llm.generate(ids, p)
        assert [o.token_ids for o in out] == [o.token_ids for o in tiny_llm.generate(ids, p)]
    g = runner.graphs
    assert g.stats.captures == 2 and len(g) == 2  # one graph per arena, kept between generations
    st = out[0].stats
    assert st.decode_mode == "graph" and st.decode_setup_steps == 0  # the third generation only replayed


def _rows_whole(ctx) -> list[bool]:
    """Per row of a running batch's context: whether its KV holds each of its positions 0 .. its
    next one (none lost), read up to the device write slot when the cache decodes statically."""
    ly = ctx.cache.layers[0]
    n = int(ly.wslot) if ly.wslot is not None else ly.length
    pos = ly.pos_buf[: ctx.next_pos.shape[0], 0, :n]
    return [sorted(row[row >= 0].tolist()) == list(range(nxt)) for row, nxt in zip(pos, ctx.next_pos.tolist())]


def _watch_rows_whole(llm, monkeypatch) -> list[bool]:
    """From now on, :func:`_rows_whole` of every batch ``llm._rebuild`` makes, appended to the list
    returned."""
    whole: list[bool] = []
    real_rebuild = llm._rebuild

    def rebuild(*args, **kwargs):
        new_ctx, joined = real_rebuild(*args, **kwargs)
        whole.extend(_rows_whole(new_ctx))
        return new_ctx, joined

    monkeypatch.setattr(llm, "_rebuild", rebuild)
    return whole


def _stand_in_graphs(llm, monkeypatch) -> None:
    """CUDA graphs on the CPU for the bookkeeping: a stand-in recorder whose replay runs the static step."""
    from kvsift.engine.graphs import GraphEntry

    runner = llm.runner
    real_forward = runner.forward

    class Replay:
        def __init__(self, ctx, tok, pos, logits):
            self.ctx, self.tok, self.pos, self.logits = ctx, tok, pos, logits

        def replay(self):
            out = real_forward(self.ctx, self.tok, self.pos)
            self.ctx.cache.seen -= 1
            self.logits.copy_(out)

    def capture(ctx, tok, pos):
        logits = torch.empty(tok.shape[0], llm.model.config.vocab_size)
        return GraphEntry(Replay(ctx, tok, pos, logits), logits)

    monkeypatch.setattr(runner, "capture", capture)
    monkeypatch.setattr(runner, "decode_mode_for", lambda method: "graph")


def test_rows_change_in_place_in_a_kv_arena_that_keeps_its_bucket(tiny_llm, default_tokenizer, monkeypatch):
    """A running batch over a KV arena whose rows change within the arena's bucket changes them in
    place (``KVArena.restack``): a joiner's rows are copied into the free rows before the write slot,
    a row that leaves is replaced by moving the next ones up; no load (no copy of the rows that stay),
    no recording, every row whole, every answer the request's alone. A change of bucket loads the
    batch into the arena of the new bucket as before."""
    from kvsift import LLM
    from kvsift.engine import graphs as graphs_mod

    llm = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static", kv_arena=True)
    _stand_in_graphs(llm, monkeypatch)
    q = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (34, 12, 22)]
    first = [random_prompt(70, seed=631), random_prompt(64, seed=632)]   # 2 rows: bucket 2
    p_b, p_c = random_prompt(40, seed=633), random_prompt(55, seed=634)
    want = ([o.token_ids for o in tiny_llm.generate(first, q[0])] + [tiny_llm.generate(p_b, q[1])[0].token_ids]
            + [tiny_llm.generate(p_c, q[2])[0].token_ids])
    a = llm.request(first, q[0])
    b, c = llm.request([p_b], q[1]), llm.request([p_c], q[2])
    moved = []
    real_restack = graphs_mod.KVArena.restack

    def restack(self, keep, rows, rows_before, w):
        moved.extend(j for j, r in enumerate(keep) if r != j)
        return real_restack(self, keep, rows, rows_before, w)

    monkeypatch.setattr(graphs_mod.KVArena, "restack", restack)
    whole = _watch_rows_whole(llm, monkeypatch)
    outs = {}
    asked = []
    # b joins at the 2nd ask (3 rows: bucket 4, loaded), c at the 4th (4 rows: bucket 4, in place);
    # b leaves after its 12 tokens (3 rows: bucket 4, in place: c moves up), then c, then a
    for r, ev in llm.run_batch([a], join=lambda run, rows: asked.append(rows) or {2: [b], 4: [c]}.get(len(asked), [])):
        if ev.output is not None:
            outs.setdefault(r.id, []).append(ev.output)
    got = [o.token_ids for o in sorted(outs[a.id], key=lambda o: first.index(o.prompt_token_ids))] \
        + [outs[b.id][0].token_ids, outs[c.id][0].token_ids]
    assert got == want
    assert whole and all(whole)
    runner = llm.runner
    assert runner.arena_restacks >= 2 and moved, (runner.arena_restacks, moved)   # c's join and b's leaving
    g = runner.graphs
    assert g.stats.captures <= runner.arena_loads   # a recording per arena loaded, none for the in-place changes
    assert g.stats.hits > g.stats.captures


def test_requests_join_a_batch_decoding_over_a_kv_arena(tiny_llm, default_tokenizer, monkeypatch):
    """Over the runner's KV arenas (``kv_arena``) requests join a running batch and rows leave it: the
    rows are read from the arena the steps wrote (the batch's own cache is stale there), the new
    batch is loaded into the arena of its shape, and a join that keeps the batch and capacity
    buckets replays the graph recorded there instead of recording one (stand-in recorder, as above).
    Every answer is the request's alone, and a preempting scheduler works over arenas too."""
    from kvsift import LLM

    llm = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static", kv_arena=True)
    runner = llm.runner
    _stand_in_graphs(llm, monkeypatch)
    ps = [random_prompt(n, seed=610 + n) for n in (60, 45, 52)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (30, 12, 20)]
    want = [tiny_llm.generate(x, q)[0].token_ids for x, q in zip(ps, pr)]
    a, b, c = (llm.request([x], q) for x, q in zip(ps, pr))
    assert llm.joins_running(a)
    loads = []
    from kvsift.engine import graphs as graphs_mod

    orig_load = graphs_mod.KVArena.load
    monkeypatch.setattr(graphs_mod.KVArena, "load",
                        lambda self, src, rows: loads.append((self.bucket, self.capacity, rows)) or orig_load(self, src, rows))
    whole = _watch_rows_whole(llm, monkeypatch)   # every stacked row holds each position before its next one
    outs, steps = run_with_joins(llm, a, {2: [b], 4: [c]})
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert whole and all(whole)   # (rows read from the batch's stale cache lose their decoded tokens)
    n_whole = len(whole)
    # a alone (bucket 1), a + b (bucket 2), a + b + c (bucket 4), then a + c once b is done (bucket 2
    # again: its arena and graph replayed), then a alone (bucket 1 again)
    assert [rows for _, _, rows in loads][:3] == [1, 2, 3] and len(loads) >= 4
    assert len({(bk, cap) for bk, cap, _ in loads}) < len(loads)       # an arena came back
    g = runner.graphs
    assert g.stats.captures == len({(bk, cap) for bk, cap, _ in loads})  # one recording per arena, not per batch
    assert g.stats.hits > g.stats.captures
    # preemption over arenas: the swapped rows are read from the arena (their decoded tokens too)
    q = SamplingParams(max_tokens=40, ignore_eos=True)
    p_a, p_b = random_prompt(40, seed=501), random_prompt(48, seed=502)
    a2, b2 = llm.request([p_a], q), llm.request([p_b], q)
    memory, outs2, _ = _run_preempting(llm, a2, b2, 40, join_at=2, slack=1.1)
    assert [outs2[r.id][0].token_ids for r in (a2, b2)] == [tiny_llm.generate(x, q)[0].token_ids for x in (p_a, p_b)]
    assert len(whole) > n_whole and all(whole)   # the swapped rows came back whole


def test_a_cancelled_request_stops_its_prefill_at_a_chunk_boundary(tiny_llm):
    """A client that leaves (or a time limit) during a long prefill stops it at the next chunk,
    not after the whole prompt: the sequence ends "cancelled" with no token."""
    from kvsift.engine.runner import _chunks

    ids = random_prompt(200, seed=91)
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) >= 2                       # gone before the third chunk

    runner = tiny_llm.runner
    saved = runner.first_chunk, runner.chunk_size
    runner.first_chunk, runner.chunk_size = None, 32  # 7 chunks of 32 tokens
    try:
        assert len(_chunks(len(ids), 32, 1)) >= 4
        out = tiny_llm.generate(ids, SamplingParams(max_tokens=4), cancel=cancel)[0]
        assert out.finish_reason == "cancelled" and out.token_ids == [] and len(asked) == 2
        asked.clear()                                 # a cancel that never fires: the whole prompt, then tokens
        out = tiny_llm.generate(ids, SamplingParams(max_tokens=4, ignore_eos=True), cancel=lambda: False)[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 4
    finally:
        runner.first_chunk, runner.chunk_size = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,budget", [("full", None), ("snapkv", 0.5), ("adakv", 0.5), ("sentencekv", 40),
                                         ("tokenselect", 24), ("quest", 32), ("squeezed", 32), ("shadowkv", 40)])
def test_cuda_graph_decode_with_joins_gives_the_answers_alone(spec, budget):
    """Under CUDA graphs a change of rows records the new layout's steps again; the answers are
    the eager ones alone."""
    from kvsift import LLM
    from kvsift.models import tiny_model

    m = tiny_model("llama", seed=1).to("cuda")
    graph = LLM.from_model(m, None, chunk_size=64, decode_mode="graph")
    eager = LLM.from_model(m, None, chunk_size=64, decode_mode="eager")
    ps = [random_prompt(n, seed=270 + n) for n in (60, 300, 45)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 9, 10)]
    want = [eager.generate(x, q, method=spec, budget=budget)[0].token_ids for x, q in zip(ps, pr)]
    a, b, c = (graph.request([x], q, method=spec, budget=budget) for x, q in zip(ps, pr))
    assert graph.joins_running(a)
    outs, _ = run_with_joins(graph, a, {2: [b], 6: [c]})
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert outs[a.id].stats.decode_mode == "graph"


def _run_preempting(llm, a, b, tokens: int, join_at: int, slack: float, cancel_b: bool = False):
    """Run A with a preempting scheduler (headroom 4 tokens) whose ``kv_memory`` admits A and B
    with their prompts but not with all ``tokens`` each (``slack`` x the larger one alone); B joins
    at step boundary ``join_at`` (``cancel_b``: B's client leaves once anything was preempted).
    Returns ``(scheduler, outputs {request id: {index: output}}, order of the token events' ids)``."""
    from kvsift.engine.scheduler import Scheduler

    need = [r.token_bytes * (r.kept_tokens + tokens) for r in (a, b)]
    admit = [max(r.prefill_bytes, r.token_bytes * (r.kept_tokens + 4)) for r in (a, b)]
    memory = Scheduler(llm.scheduler_config(kv_memory=max(sum(admit), int(slack * max(need))), preempt=True,
                                            headroom=4))
    assert max(need) <= memory.config.kv_memory < sum(need)   # each alone fits, both do not
    if cancel_b:
        b.cancel = lambda: memory.preemptions > 0
    memory.add(a)
    group = memory.schedule()
    assert group == [a] and a.charged == admit[0] < a.kv_bytes
    steps, order, outs = [], [], {}

    def join(running, rows):
        steps.append(rows)
        if len(steps) == join_at:
            memory.add(b)
            return memory.join(running, rows)
        return []

    for r, ev in llm.run_batch(group, join=join, memory=memory):
        if ev.token_id is not None:
            order.append(r.id)
        if ev.output is not None:
            outs.setdefault(r.id, {})[ev.index] = ev.output
    memory.finish(group)
    assert memory.preemptions >= 1 and (memory.kv_used, memory.host_used) == (0, 0)
    assert (a.charged, b.charged, b.swapped_bytes) == (0, 0, 0)
    return memory, outs, order


@pytest.mark.parametrize("spec,budget,mode", [("full", None, "eager"), ("snapkv", 0.5, "eager"),
                                              ("adakv", 0.5, "eager"), ("full", None, "static"),
                                              ("kivi", None, "eager"), ("kivi", None, "static"),
                                              ("quest+kivi", 16, "eager"), ("quest+kivi", 16, "static")])
def test_preemption_swaps_the_newest_request_out_and_resumes_it_with_its_answer(tiny_llm, default_tokenizer,
                                                                                spec, budget, mode, monkeypatch):
    """A preempting scheduler admits A and B with their prompt and 4 decode tokens; as both decode,
    the device KV would pass ``kv_memory``, so B (the newer) is copied to the host and leaves the
    batch, A goes on, and B comes back once A is done: both answers are the ones alone, B's tokens
    pause while it is out, and every charge is back to 0 at the end. With ``full`` every row of
    every restacked batch (B's coming back too) holds each of its positions: nothing the steps
    wrote is lost on the way (the answers of a tiny random model would not show it)."""
    from kvsift import LLM

    llm = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode=mode)
    whole = _watch_rows_whole(llm, monkeypatch) if spec == "full" else []
    p_a, p_b = random_prompt(40, seed=501), random_prompt(48, seed=502)
    q = SamplingParams(max_tokens=40, ignore_eos=True)
    want = [tiny_llm.generate(p, q, method=spec, budget=budget)[0].token_ids for p in (p_a, p_b)]
    a, b = (llm.request([p], q, method=spec, budget=budget) for p in (p_a, p_b))
    _, outs, order = _run_preempting(llm, a, b, 40, join_at=2, slack=1.1)
    assert [outs[r.id][0].token_ids for r in (a, b)] == want
    assert all(whole) and (spec != "full" or len(whole) >= 2)
    # while B was out, A's tokens came alone: somewhere after B's first token, a run of A's only
    first_b = order.index(b.id)
    run_a = max(len(s) for s in "".join("a" if i == a.id else "b" for i in order[first_b:]).split("b"))
    assert run_a >= 8, order


def test_a_row_read_during_static_decode_holds_the_tokens_written_since_it_began():
    """A row copied out of a running batch in static decode (a preempted request's rows, a batch's
    rows being stacked) holds the decoded tokens the steps wrote at the device slot, not only the
    ``length`` the host saw when static decode began (a swapped row once lost them)."""
    from kvsift.engine.llm import _row_kv

    cache = SiftCache(1)
    ly = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    pos = torch.tensor([[-1, 0, 1, 2, 3], [0, 1, 2, 3, 4]], dtype=torch.int32)[:, None].expand(2, 2, 5)
    ly.set_kv(k, v, pos.contiguous(), reserve=0)
    cache.begin_static(3)
    for t in range(2):
        cache.step_positions = torch.tensor([[4 + t], [5 + t]], dtype=torch.int32)
        nk, nv = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
        ly.update(nk, nv)
    assert ly.length == 5   # the host-side length has not moved
    rk, rv, rp, rag = _row_kv(ly, 0)
    assert rag is None and rp[0, 0].tolist() == [0, 1, 2, 3, 4, 5]       # the padding slot dropped
    assert torch.equal(rk[0, :, :4], k[0, :, 1:]) and torch.equal(rk[0, :, -1], nk[0, :, 0])
    assert torch.equal(rv[0, :, -1], nv[0, :, 0])
    _, _, rp1, _ = _row_kv(ly, 1)
    assert rp1[0, 1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    cache.end_static(2)
    assert [t.tolist() for t in _row_kv(ly, 1)[2:3]] == [rp1.tolist()]   # the same after static decode


def test_preemption_is_off_by_default_and_checked():
    from kvsift.engine.scheduler import SchedulerConfig

    assert SchedulerConfig().preempt is False
    for kw, msg in (({"preempt": "yes"}, "preempt must be a bool"), ({"headroom": 0}, "headroom must be")):
        with pytest.raises(ValueError, match=msg):
            SchedulerConfig(**kw)


def test_a_preempted_request_of_two_prompts_comes_back_whole_and_can_be_cancelled_out(tiny_llm):
    """B has two prompts (two rows): both leave together when B is preempted and come back
    together with the answers alone. Run again with B's client leaving while B is out: B's
    sequences end "cancelled" once back, with the tokens they had, and A is unaffected."""
    p_a, p_b1, p_b2 = random_prompt(40, seed=511), random_prompt(36, seed=512), random_prompt(44, seed=513)
    q = SamplingParams(max_tokens=30, ignore_eos=True)
    want_a = tiny_llm.generate(p_a, q)[0].token_ids
    want_b = [o.token_ids for o in tiny_llm.generate([p_b1, p_b2], q)]
    for cancel_b in (False, True):
        a, b = tiny_llm.request([p_a], q), tiny_llm.request([p_b1, p_b2], q)
        _, outs, _ = _run_preempting(tiny_llm, a, b, 30, join_at=1, slack=1.05, cancel_b=cancel_b)
        assert outs[a.id][0].token_ids == want_a
        if cancel_b:
            for j in (0, 1):
                o = outs[b.id][j]
                assert o.finish_reason == "cancelled" and 0 < len(o.token_ids) < 30
                assert o.token_ids == want_b[j][:len(o.token_ids)]
        else:
            assert [outs[b.id][j].token_ids for j in (0, 1)] == want_b
        assert b.finished


def test_a_change_of_rows_holds_the_batch_kv_about_once(tiny_llm, monkeypatch):
    """``_rebuild`` frees each old layer (the running batch's and the joiners') once it is stacked:
    while the rows change, the KV held is the old batch's plus at most about one new layer, not
    both batches whole; the answers stay the ones alone."""
    from kvsift.cache.layer import SiftLayer

    llm = tiny_llm
    ps = [random_prompt(n, seed=700 + n) for n in (120, 90)]
    q = SamplingParams(max_tokens=6, ignore_eos=True)
    want = [llm.generate(p, q)[0].token_ids for p in ps]
    a, b = (llm.request([p], q) for p in ps)
    held, peaks = [], []
    real_rebuild, real_set_rows = llm._rebuild, SiftLayer.set_rows

    def rebuild(ctx, next_pos, keep, new, parts, run, resumed=None, **kwargs):
        held[:] = [ctx.cache] + [c for c, _, _, _ in parts]
        peaks.append([sum(ly.nbytes() for c in held for ly in c.layers), 0, 0])
        out = real_rebuild(ctx, next_pos, keep, new, parts, run, resumed, **kwargs)
        held.clear()
        return out

    def set_rows(self, rows):
        r = real_set_rows(self, rows)
        if held:  # the old caches' layers still alive plus the new batch's layers so far
            now = sum(ly.nbytes() for c in held for ly in c.layers) + sum(ly.nbytes() for ly in self.cache.layers)
            peaks[-1][1] = max(peaks[-1][1], now)
            peaks[-1][2] = max(peaks[-1][2], self.nbytes())
        return r

    monkeypatch.setattr(llm, "_rebuild", rebuild)
    monkeypatch.setattr(SiftLayer, "set_rows", set_rows)
    outs, _ = run_with_joins(llm, a, {2: [b]})
    assert [outs[r.id].token_ids for r in (a, b)] == want
    assert peaks and llm.info.num_layers >= 2
    for before, peak, layer in peaks:
        assert peak <= before + 1.5 * layer, (before, peak, layer)   # not before + the whole new batch


@pytest.mark.parametrize("spec,opts", [("streaming", None), ("tova", None), ("tova", {"per_head": True}),
                                       ("h2o", None), ("chunked(tova)", None), ("chunked(streaming)", None)])
def test_methods_that_evict_while_decoding_join_at_their_budget(tiny_llm, spec, opts):
    """streaming, tova and h2o (and chunked(...) over tova or streaming, whose decode is the
    scorer's) evict one token per step per row once a layer is over its budget:
    rows that hold exactly their budget (any prompt length, the same token budget) evict in
    lockstep, so requests of other lengths join a running batch, rows leave when done (h2o's
    accumulated scores follow their rows), and every answer is the one alone."""
    from kvsift.engine.scheduler import join_key

    ps = [random_prompt(n, seed=800 + n) for n in (60, 90, 45)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (40, 20, 30)]
    want = [tiny_llm.generate(x, q, method=spec, budget=16, method_kwargs=opts)[0].token_ids for x, q in zip(ps, pr)]
    a, b, c = (tiny_llm.request([x], q, method=spec, budget=16, method_kwargs=opts) for x, q in zip(ps, pr))
    assert tiny_llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c) is not None
    other = tiny_llm.request([ps[0]], pr[0], method=spec, budget=24, method_kwargs=opts)
    assert join_key(other) != join_key(a)                     # another budget: not in lockstep
    outs, steps = run_with_joins(tiny_llm, a, {2: [b], 5: [c]})
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert max(steps) == 3 and steps[-1] < 3                  # all three ran together, then rows left


def test_methods_that_evict_while_decoding_are_admitted_for_their_budget_not_max_tokens(tiny_llm):
    """Memory admission: streaming, tova and h2o hold at most one token over their budget while
    decoding, so their expected device KV does not grow with max_tokens (full's does)."""
    ids = [random_prompt(200, seed=950)]
    short, long = SamplingParams(max_tokens=4), SamplingParams(max_tokens=2000)
    for spec in ("streaming", "tova", "h2o"):
        a, b = (tiny_llm.request(ids, q, method=spec, budget=32) for q in (short, long))
        assert a.kv_bytes == b.kv_bytes == 200 * tiny_llm.kv_bytes_per_token, spec   # the prefill's peak
    f_short, f_long = (tiny_llm.request(ids, q) for q in (short, long))
    assert f_long.kv_bytes > f_short.kv_bytes
    lazy = tiny_llm.request(ids, long, method="tova", budget=32, method_kwargs={"decode_evict": False})
    assert lazy.kv_bytes > a.kv_bytes   # evicting at prefill only: it grows like any other


def test_a_quantized_cache_is_admitted_for_its_quantized_bytes(tiny_llm):
    """Memory admission counts kivi's decode KV at its quantized share (codes, scales, positions)
    plus its full-precision window, not at the model's dtype: with many new tokens its expected
    device KV is a fraction of full's; the prefill (full precision until it ends) is unchanged."""
    from kvsift.methods import build_method

    ids = [random_prompt(200, seed=951)]
    long = SamplingParams(max_tokens=3000)   # within the tiny model's 4,096 positions
    d = tiny_llm.info.head_dim
    share, window = build_method("kivi", None).device_share(d)
    assert 0 < share < 0.5 and window > 0
    assert build_method("snapkv+kivi", 0.5).device_share(d) == (share, window)
    assert build_method("snapkv", 0.5).device_share(d) == (1.0, 0)
    full, kivi = tiny_llm.request(ids, long), tiny_llm.request(ids, long, method="kivi")
    pt, n = tiny_llm.kv_bytes_per_token, 200 + 3000
    assert full.kv_bytes == n * pt
    assert kivi.kv_bytes == int(pt * (n * share + window * (1 - share))) < full.kv_bytes / 2
    short = tiny_llm.request(ids, SamplingParams(max_tokens=4), method="kivi")
    assert short.kv_bytes == 200 * pt   # the prefill's peak, at full precision


@pytest.mark.parametrize("spec,kw", [("sentencekv", {}), ("sentencekv", {"cache_chunks": 4}),
                                     ("snapkv+sentencekv", {"decode_budget": 24}),
                                     ("sentencekv", {"prefill_offload": True}), ("sentencekv+kivi", {})])
def test_sentencekv_requests_join_a_running_batch_and_get_their_answers_alone(tiny_llm, spec, kw, monkeypatch):
    """sentencekv joins: a request of another prompt length (the same tokens attended per step) is
    prefilled alone into its own host store, and the running rows are stacked with it, each row
    reading its chunks where its store holds them (ChunkStore.stack: no host copy); answers equal
    each request's alone, every stacked row fetches the keys, values and positions its own store
    holds (int4 codes dequantized alike with kivi), and a request of another decode budget does
    not join."""
    from kvsift.methods._offload import ChunkStore

    real_stack = ChunkStore.stack.__func__
    stacked = []

    def stack(cls, sources):
        out = real_stack(cls, sources)
        stacked.append((list(sources), out))
        return out

    monkeypatch.setattr(ChunkStore, "stack", classmethod(stack))
    p_a, p_b, p_c = random_prompt(200, seed=81), random_prompt(150, seed=82), random_prompt(60, seed=83)
    pa, pb, pc = (SamplingParams(max_tokens=n, ignore_eos=True) for n in (7, 9, 6))
    kw = {"max_chunk": 16, "recent": 16, **kw}
    want = [tiny_llm.generate(p, q, method=spec, budget=48, method_kwargs=kw)[0].token_ids
            for p, q in ((p_a, pa), (p_b, pb), (p_c, pc))]
    a, b, c = (tiny_llm.request([p], q, method=spec, budget=48, method_kwargs=kw)
               for p, q in ((p_a, pa), (p_b, pb), (p_c, pc)))
    assert tiny_llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c)
    fewer = {**kw, "decode_budget": 20} if "decode_budget" in kw else kw   # fewer tokens attended per step
    other = tiny_llm.request([p_b], pb, method=spec, budget=40, method_kwargs=fewer)
    assert join_key(other) != join_key(a)
    stores = []
    outs, _ = run_with_joins(tiny_llm, a, {2: [b], 4: [c]},
                             see=lambda cache: stores.append(cache.layers[0].state["sentencekv"].store))
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    joined = [st for st in stores if st is not None and st.b >= 2]
    assert joined and all(st.shared for st in joined)      # rows read their stores' host rows in place
    assert stacked
    if kw.get("cache_chunks"):   # the running rows' device chunk caches come along into the stacked store
        carried = [out for sources, out in stacked if any(s is not None and s._dev is not None for s, _ in sources)]
        assert carried and all(out._dev is not None for out in carried)
    for sources, out in stacked:
        for i, (src, j) in enumerate(sources):
            if src is None or src.n == 0:
                continue
            own = torch.full((src.b, src.hk, src.n), -1, dtype=torch.int64)
            own[j] = torch.arange(src.n)
            mine = torch.full((out.b, out.hk, out.n), -1, dtype=torch.int64)
            mine[i, :, :src.n] = torch.arange(src.n)
            want_kv = src.fetch(own, cached=False)
            got_kv = out.fetch(mine, cached=False)
            for w, g in zip(want_kv, got_kv):
                assert torch.equal(g[i, :, : w.shape[2]], w[j]), (spec, i, j)


def test_a_joiner_whose_host_writes_are_in_flight_joins_after_them(tiny_llm, monkeypatch):
    """A joining sentencekv request's chunks go to host memory asynchronously on CUDA; stacking it
    while they are in flight would wait for them between two steps of every running row. Its store
    says so (``ChunkStore.ready``, here False for its first 3 asks), so the running row takes steps
    meanwhile and the joiner is stacked once its writes are done: later than without them, with
    every answer still the one alone."""
    from kvsift.methods._offload import ChunkStore

    p_a, p_b = random_prompt(200, seed=91), random_prompt(150, seed=92)
    pa, pb = SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)
    kw = {"max_chunk": 16, "recent": 16}
    want = [tiny_llm.generate(p, q, method="sentencekv", budget=48, method_kwargs=kw)[0].token_ids
            for p, q in ((p_a, pa), (p_b, pb))]
    widths = record_forward_widths(tiny_llm, monkeypatch)
    real_stack = ChunkStore.stack.__func__
    stacked_at = []

    def stack(cls, sources):
        stacked_at.append(len(widths))
        return real_stack(cls, sources)

    monkeypatch.setattr(ChunkStore, "stack", classmethod(stack))
    at = {}
    for busy in (0, 3):
        asks = {"n": 0}

        def ready(self, busy=busy):
            asks["n"] += 1
            return asks["n"] > busy

        monkeypatch.setattr(ChunkStore, "ready", ready)
        widths.clear()
        stacked_at.clear()
        a, b = (tiny_llm.request([p], q, method="sentencekv", budget=48, method_kwargs=kw)
                for p, q in ((p_a, pa), (p_b, pb)))
        outs, _ = run_with_joins(tiny_llm, a, {2: [b]})
        assert [outs[r.id].token_ids for r in (a, b)] == want, busy
        at[busy] = (stacked_at[0], widths[:stacked_at[0]].count(1))   # decode steps before the stacking
        assert asks["n"] > busy
    # held for 3 boundaries: the running row took 3 more steps before the joiner was stacked
    assert at[3][1] == at[0][1] + 3, at


@pytest.mark.parametrize("spec,kw,local", [("tokenselect", {}, 4), ("tokenselect", {"vote": "layer"}, 16),
                                           ("snapkv+tokenselect", {"decode_budget": 6}, 8)])
def test_tokenselect_requests_join_a_running_batch_and_get_their_answers_alone(tiny_llm, spec, kw, local):
    """tokenselect joins: the stacked rows' local windows follow each row's own newest tokens
    (its last slots before the padding, then the common decode slots), so every answer equals the
    request's alone, whether the window reaches back into the prompt (local 16) or not."""
    p_a, p_b, p_c = random_prompt(240, seed=91), random_prompt(40, seed=92), random_prompt(120, seed=93)
    pa, pb, pc = (SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 9, 7))
    kw = {"local": local, **kw}
    want = [tiny_llm.generate(p, q, method=spec, budget=8, method_kwargs=kw)[0].token_ids
            for p, q in ((p_a, pa), (p_b, pb), (p_c, pc))]
    a, b, c = (tiny_llm.request([p], q, method=spec, budget=8, method_kwargs=kw)
               for p, q in ((p_a, pa), (p_b, pb), (p_c, pc)))
    assert tiny_llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c)
    assert not tiny_llm.joins_running(tiny_llm.request([p_a], pa, method=spec, budget=8,
                                                       method_kwargs={**kw, "reuse_threshold": 0.9}))
    outs, _ = run_with_joins(tiny_llm, a, {2: [b], 4: [c]})
    assert [outs[r.id].token_ids for r in (a, b, c)] == want


@pytest.mark.parametrize("mode,spec", [("eager", "squeezed"), ("static", "squeezed"), ("eager", "snapkv+squeezed")])
def test_squeezed_requests_of_other_lengths_join_and_get_their_answers_alone(tiny_llm, default_tokenizer,
                                                                             mode, spec):
    """squeezed joins: each stacked row keeps its own clusters (padded to the batch's largest count)
    and attends everything after its own clustered slots, so requests of other prompt lengths with
    the same tokens per step join a running batch and each gets its answer alone; another budget
    waits (join key)."""
    from kvsift import LLM
    from kvsift.methods.squeezed import SqueezedState

    llm = tiny_llm if mode == "eager" else LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64,
                                                          decode_mode="static")
    ps = [random_prompt(n, seed=210 + n) for n in (150, 70, 230)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (16, 8, 11)]
    kw = {"decode_budget": 32, "cluster_size": 8} if spec != "squeezed" else {"cluster_size": 8}
    budget = 32 if spec == "squeezed" else 64
    want = [tiny_llm.generate(x, q, method=spec, budget=budget, method_kwargs=kw)[0].token_ids
            for x, q in zip(ps, pr)]
    a, b, c = (llm.request([x], q, method=spec, budget=budget, method_kwargs=kw) for x, q in zip(ps, pr))
    assert llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c)
    other = llm.request([ps[0]], pr[0], method=spec, budget=budget, method_kwargs={**kw, "decode_budget": 48})
    assert join_key(a) != join_key(other)
    stacked = []

    def see(cache):
        st = cache.layers[0].state.get("squeezed")
        if isinstance(st, SqueezedState) and st.row_n is not None:
            stacked.append(st.row_n.tolist())

    outs, rows = run_with_joins(llm, a, {2: [b], 6: [c]}, see=see)
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert max(rows) >= 2 and stacked
    # alone, rows of other prompt lengths cluster other lengths (after snapkv, each keeps 64 slots)
    assert any(len(set(n)) > 1 for n in stacked) == (spec == "squeezed")


def test_squeezed_joined_rows_attend_the_positions_they_attend_alone(tiny_llm, monkeypatch):
    """Sharper than the tokens (a tiny random model's tokens barely depend on what it reads): at
    every decode step and layer, each row of the joined batch attends to exactly the positions it
    attends to alone (a row is known by its clustered length and its newest position)."""
    from kvsift.methods.squeezed import Squeezed

    seen: dict = {}
    real = Squeezed.plan

    def plan(self, run, layer, query, ctx):
        sel = real(self, run, layer, query, ctx)
        st = layer.state.get(self.name)
        if sel is not None and st is not None:
            slots, p = sel.own_slots(), layer.positions
            ok = (slots >= 0) & (slots < p.shape[2])
            pos = p.gather(2, slots.clamp(min=0, max=p.shape[2] - 1))
            pos = torch.where(ok & (pos >= 0), pos, -1)
            for i in range(pos.shape[0]):
                n_i = int(st.row_n[i]) if st.row_n is not None else st.n
                seen[(n_i, int(p[i, 0].max()), layer.layer_idx)] = sorted(set(pos[i, 0].tolist()) - {-1})
        return sel

    monkeypatch.setattr(Squeezed, "plan", plan)
    ps = [random_prompt(n, seed=220 + n) for n in (150, 70, 230)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (16, 12, 11)]
    kw = {"cluster_size": 8}
    for x, q in zip(ps, pr):
        tiny_llm.generate(x, q, method="squeezed", budget=32, method_kwargs=kw)
    alone, seen = seen, {}
    a, b, c = (tiny_llm.request([x], q, method="squeezed", budget=32, method_kwargs=kw) for x, q in zip(ps, pr))
    _, rows = run_with_joins(tiny_llm, a, {2: [b], 6: [c]})
    assert max(rows) >= 2 and len({k[0] for k in seen}) == 3
    assert {k: alone.get(k) for k in seen} == seen


@pytest.mark.parametrize("kw", [{}, {"rank": 0.25, "outliers": 2}])
def test_shadowkv_requests_join_a_running_batch_and_get_their_answers_alone(tiny_llm, kw):
    """shadowkv joins: a request of another prompt length (the same budget in tokens) is prefilled
    alone into its own values store and key factors; the running rows are stacked with it (one
    store over the rows' own, read in place; each row's factors carried over, padded to the most
    middle rows), so every answer equals the request's alone; another budget does not join."""
    from kvsift.methods.shadowkv import ShadowKVState

    p_a, p_b, p_c = random_prompt(260, seed=131), random_prompt(140, seed=132), random_prompt(200, seed=133)
    pa, pb, pc = (SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 9, 7))
    kw = {"chunk": 8, "window": 16, **kw}
    want = [tiny_llm.generate(p, q, method="shadowkv", budget=64, method_kwargs=kw)[0].token_ids
            for p, q in ((p_a, pa), (p_b, pb), (p_c, pc))]
    a, b, c = (tiny_llm.request([p], q, method="shadowkv", budget=64, method_kwargs=kw)
               for p, q in ((p_a, pa), (p_b, pb), (p_c, pc)))
    assert tiny_llm.joins_running(a) and join_key(a) == join_key(b) == join_key(c)
    assert join_key(tiny_llm.request([p_b], pb, method="shadowkv", budget=48, method_kwargs=kw)) != join_key(a)
    seen = []

    def see(cache):
        st = cache.layers[1].state.get("shadowkv")
        if isinstance(st, ShadowKVState) and st.store is not None:
            seen.append((st.store.b, st.store.shared))

    outs, rows = run_with_joins(tiny_llm, a, {2: [b], 4: [c]}, see=see)
    assert [outs[r.id].token_ids for r in (a, b, c)] == want
    assert max(rows) == 3 and any(b_ >= 2 and shared for b_, shared in seen)


def test_shadowkv_joined_rows_read_the_keys_and_values_they_read_alone(tiny_llm, monkeypatch):
    """Sharper than the tokens: at every decode step and layer, each joined row fetches the same
    positions as alone, with the same rebuilt keys and the same values (a row is known by its
    newest position: the prompts' lengths keep them apart)."""
    from kvsift.methods.shadowkv import ShadowKV

    seen: dict = {}
    real = ShadowKV.plan

    def plan(self, run, layer, query, ctx):
        sel = real(self, run, layer, query, ctx)
        if sel is not None and sel.extra is not None and ctx.decoding:
            k, v, pos = sel.extra.gather()
            for i in range(pos.shape[0]):
                for h in range(pos.shape[1]):
                    ok = pos[i, h] >= 0
                    order = pos[i, h][ok].argsort()
                    seen[(int(layer.positions[i].max()), layer.layer_idx, h)] = (
                        pos[i, h][ok][order].tolist(), k[i, h][ok][order].float(), v[i, h][ok][order].float())
        return sel

    monkeypatch.setattr(ShadowKV, "plan", plan)
    ps = [random_prompt(n, seed=140 + n) for n in (260, 140, 200)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 9, 7)]
    kw = {"chunk": 8, "window": 16, "rank": 0.25, "outliers": 2}
    for x, q in zip(ps, pr):
        tiny_llm.generate(x, q, method="shadowkv", budget=64, method_kwargs=kw)
    alone, seen = seen, {}
    a, b, c = (tiny_llm.request([x], q, method="shadowkv", budget=64, method_kwargs=kw) for x, q in zip(ps, pr))
    _, rows = run_with_joins(tiny_llm, a, {2: [b], 4: [c]})
    assert max(rows) == 3 and seen.keys() <= alone.keys() and len(seen) > 0
    for key, (pos, k, v) in seen.items():
        apos, ak, av = alone[key]
        assert pos == apos, key
        assert torch.allclose(k, ak, atol=1e-4) and torch.allclose(v, av, atol=1e-4), key


def test_a_model_without_a_tokenizer_streams_every_token(tiny_llm):
    """Token ids in, token ids out: with no tokenizer there is no text to wait for, so each token
    is a stream event of its own (as each token with text is), not only the final one."""
    from kvsift import LLM

    llm = LLM.from_model(tiny_llm.model, None, chunk_size=64)
    r = llm.request([random_prompt(30, seed=77)], SamplingParams(max_tokens=6, ignore_eos=True))
    events = [ev for _, ev in llm.run_batch([r])]
    assert [ev.token_id is not None for ev in events] == [True] * 6
    assert events[-1].finished and events[-1].output.token_ids == [ev.token_id for ev in events]


def test_a_new_batch_records_its_graph_before_its_first_tokens_stream(tiny_llm, default_tokenizer, monkeypatch):
    """Graph mode (stand-in recorder): a batch's graph is recorded right after its first step and
    before its first tokens stream, so the recording is in the time to first token, not between
    the first and second tokens. The same for requests that joined a running batch, when no
    request is waiting (``join.idle()``) or every waiting prompt is longer than a joining prefill
    gets through in one step (``join.waiting_tokens()``); while requests may still join within a
    step (no ``idle``, or a short prompt waiting), the graph is recorded lazily at the second step
    as before (a recording the next join would throw away).
    The tokens are the eager loop's either way."""
    from kvsift import LLM

    llm = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64, decode_mode="static")
    _stand_in_graphs(llm, monkeypatch)
    log = []
    real_capture = llm.runner.capture
    monkeypatch.setattr(llm.runner, "capture", lambda *a: log.append("capture") or real_capture(*a))
    ps = [random_prompt(n, seed=640 + n) for n in (50, 41)]
    pr = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (14, 9)]
    want = [tiny_llm.generate(x, q)[0].token_ids for x, q in zip(ps, pr)]

    def run(join_obj):
        log.clear()
        a, b = (llm.request([x], q) for x, q in zip(ps, pr))
        outs = {}
        for r, ev in llm.run_batch([a], join=join_obj(b)):
            log.append("a" if r is a else "b")
            if ev.output is not None:
                outs[r.id] = ev.output.token_ids
        return [outs[a.id], outs[b.id]], log[:]

    class Join:  # b joins at the second boundary; idle() once it was handed out
        def __init__(self, b):
            self.b, self.asked = b, 0

        def __call__(self, running, rows):
            self.asked += 1
            return [self.b] if self.asked == 2 else []

        def idle(self):
            return self.asked >= 2

    # idle once b joined: a's graph lazily (b may still come), b's batch's graph before b's first token
    got, seen = run(Join)
    assert got == want
    first_b = seen.index("b")
    assert seen.count("capture") == 2 and seen[first_b - 1] == "capture"   # recorded, then b's first token
    assert seen.index("capture") > seen.index("a")                         # a's first token came before its graph
    # no idle(): recorded lazily for both batches, after b's first token
    class NoIdle:
        def __init__(self, b):
            self.j = Join(b)

        def __call__(self, running, rows):
            return self.j(running, rows)

    got, seen = run(NoIdle)
    assert got == want
    assert seen.count("capture") == 2 and seen.index("b") < seen.index("capture", seen.index("capture") + 1)
    # requests still waiting, but each longer than a joining prefill gets through in one step
    # (waiting_tokens()): no joiner can change the rows before the next step, so b's batch's graph
    # is recorded before b's first token, as when idle; a short one waiting: lazily, as without idle
    class Waiting(NoIdle):   # b (41 tokens) waits until handed out, then a prompt of `tokens`
        tokens = 10**6

        def waiting_tokens(self):
            return len(ps[1]) if self.j.asked < 2 else self.tokens

    got, seen = run(Waiting)
    assert got == want
    first_b = seen.index("b")
    assert seen.count("capture") == 2 and seen[first_b - 1] == "capture"
    Waiting.tokens = 16
    got, seen = run(Waiting)
    assert got == want
    assert seen.count("capture") == 2 and seen.index("b") < seen.index("capture", seen.index("capture") + 1)
    # nothing can join (offline generate): the graph before the first token
    log.clear()
    a = llm.request([ps[0]], pr[0])
    for _, ev in llm.run_batch([a]):
        log.append("a")
    # recorded right after the first step: before the second token here (on CUDA the engine queues
    # that step before streaming the first token, so there the recording precedes the first token)
    assert log.count("capture") == 1 and log[:3] == ["a", "capture", "a"]
    assert [o.token_ids for o in llm.generate(ps[0], pr[0])] == [want[0]]
