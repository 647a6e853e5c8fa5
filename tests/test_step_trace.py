"""The engine's step trace (``LLM.step_trace``, :mod:`kvsift.engine.trace`): what each gap of a
running batch spent its time on, and :func:`summarize` over the slow gaps."""

from __future__ import annotations

import pytest

from kvsift import LLM, SamplingParams
from kvsift.engine.trace import RECORD_FIELDS, StepTrace, summarize
from kvsift.models import tiny_model
from tests.conftest import random_prompt


def _rec(batch, gap, rows, first=False, **parts):
    base = {k: 0 for k in RECORD_FIELDS}
    base.update(batch=batch, t=0.0, rows=rows, first=first, gap_ms=gap, held=False, **parts)
    return base


def test_summarize_weights_gaps_by_their_rows_and_splits_the_slow_ones():
    recs = ([_rec(1, 500.0, 4, first=True)]                           # a batch's first tokens: no gap
            + [_rec(1, 10.0, 4, wait_ms=9.0) for _ in range(96)]       # 384 stream-gaps of 10 ms
            + [_rec(1, 30.0, 4, join_ms=18.0, join_chunks=1, prefill_done=1)]
            + [_rec(1, 50.0, 4, rebuild_ms=12.0, stacked=1, kept=4, setup_ms=30.0)]
            + [_rec(1, 25.0, 2)])                                     # slow, and nothing but the step
    s = summarize(recs)
    assert s["gaps"] == 99 and s["stream_gaps"] == 394
    assert s["p50_ms"] == 10.0 and s["p99_ms"] == 30.0                 # 1% of 394: the 4th-slowest stream-gap
    assert s["slow_stream_gaps"] == 10 and s["slow_share"] == round(10 / 394, 4)
    assert s["slow_with"] == {"join_chunk": 4, "prefill_done": 4, "rows_changed": 4, "setup": 4, "held": 0,
                              "plain": 2}
    assert s["slow_mean"]["gap_ms"] == round((30 * 4 + 50 * 4 + 25 * 2) / 10, 2)
    assert s["slow_mean"]["setup_ms"] == 12.0 and s["all_mean"]["wait_ms"] == round(9 * 384 / 394, 2)
    assert summarize([_rec(1, 5.0, 3, first=True)]) == {"gaps": 0, "stream_gaps": 0}
    with pytest.raises(ValueError, match="keep"):
        StepTrace(0)


def test_the_trace_keeps_its_last_records_and_answers_since():
    tr = StepTrace(keep=3)
    g = tr.begin()
    for _ in range(5):
        g.tokens(2)
    recs = tr.snapshot()
    assert len(recs) == 3 and not any(r["first"] for r in recs) and [r["batch"] for r in recs] == [1, 1, 1]
    assert tr.snapshot(since=tr.now() + 1) == []
    assert tr.begin().batch == 2


def _traced(llm, run) -> list[dict]:
    """``run()`` without the step trace, then with it: the same answers; the trace's records."""
    want = run()
    llm.step_trace = StepTrace()
    try:
        got = run()
        recs = llm.step_trace.snapshot()
    finally:
        llm.step_trace = None
    assert got == want
    return recs


@pytest.fixture(scope="module")
def llm(default_tokenizer):
    return LLM.from_model(tiny_model("qwen2", seed=1), default_tokenizer, name="tiny", chunk_size=64)


@pytest.mark.parametrize("method", ["snapkv", "sentencekv"])
def test_run_batch_records_each_gap_and_what_it_held(llm, method):
    """A request joins at the first step boundary (its 300-token prompt in 64-token chunks, one per
    step of the running row): the trace has the batch's first tokens, then one gap per step with
    the joiner's chunks, the gap where its prefill ended, and the change of rows that stacked it;
    the tokens are the same as without the trace."""
    params = SamplingParams(max_tokens=12, temperature=0.0)
    ps = [random_prompt(300, seed=60), random_prompt(301, seed=61)]

    def run():
        a, b = (llm.request([p], params, method=method, budget=0.25) for p in ps)
        asked = []
        join = lambda running, rows: asked.append(rows) or ([b] if len(asked) == 1 else [])  # noqa: E731
        out = {}
        for r, ev in llm.run_batch([a], join=join):
            if ev.finished:
                out[r is a] = ev.output.token_ids
        return out

    recs = _traced(llm, run)
    assert recs[0]["first"] and recs[0]["rows"] == 1 and all(not r["first"] for r in recs[1:])
    assert len({r["batch"] for r in recs}) == 1
    chunks = [r for r in recs if r["join_chunks"]]
    assert len(chunks) >= 4 and all(r["join_ms"] > 0 for r in chunks)   # 301 tokens, 64 a chunk (the last merged)
    done = [r for r in recs if r["prefill_done"]]
    assert len(done) == 1 and done[0]["join_ms"] > 0   # its last chunk, or its prefill's end alone
    stacked = [r for r in recs if r["stacked"]]
    assert len(stacked) == 1 and stacked[0]["kept"] == 1 and stacked[0]["rebuild_ms"] > 0
    assert stacked[0]["rows"] == 1   # the running row waited it; the joiner's first token went out inside it
    assert recs.index(stacked[0]) >= recs.index(done[0])
    # the gaps tile the batch's time: each is at least its parts
    for r in recs:
        assert r["gap_ms"] >= r["join_ms"] + r["rebuild_ms"] + r["setup_ms"] - 1e-6 and r["wait_ms"] <= r["gap_ms"] + 1e-6
    assert summarize(recs)["gaps"] == len(recs) - 1


def test_server_serves_its_trace_to_admins_only(make_client, tiny_llm):
    """``--step-trace N`` (``ServerConfig.step_trace``): ``GET /debug/steps`` gives the records of the
    requests served (``since`` narrows them) and their summary; an admin key only; 404 when off,
    and the engine then traces nothing. A bad value is refused before the server starts."""
    from kvsift.server.auth import KeyRing

    try:
        off = make_client()
        r = off.get("/debug/steps")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and tiny_llm.step_trace is None
        keys = KeyRing.parse("alice-key-0001 alice\nroot-key-0003 ops admin\n")
        c = make_client(step_trace=1000, keys=keys)
        root, alice = ({"Authorization": f"Bearer {k}"} for k in ("root-key-0003", "alice-key-0001"))
        t_before = c.get("/debug/steps", headers=root).json()["now"]
        out = c.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 5}, headers=alice)
        assert out.status_code == 200, out.text
        body = c.get("/debug/steps", params={"since": t_before}, headers=root).json()
        recs = body["records"]
        assert recs and recs[0]["first"] and sum(1 for r in recs if not r["first"]) == 4   # 5 tokens: 4 gaps
        assert body["summary"]["gaps"] == 4 and body["summary"]["p50_ms"] > 0
        assert c.get("/debug/steps", params={"since": body["now"] + 60}, headers=root).json()["records"] == []
        for bad in ("abc", "nan", "inf"):
            r = c.get("/debug/steps", params={"since": bad}, headers=root)
            assert r.status_code == 400 and r.json()["error"]["param"] == "since", r.text
        r = c.get("/debug/steps", headers=alice)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert c.get("/debug/steps").status_code == 401
    finally:
        tiny_llm.step_trace = None
    from kvsift.server.config import ServerConfig
    for bad in (-1, True, "5"):
        with pytest.raises(ValueError, match="--step-trace"):
            ServerConfig(step_trace=bad)


def test_rows_that_joined_within_a_gap_are_not_counted_as_waiting_it():
    tr = StepTrace()
    g = tr.begin()
    g.tokens(1)
    g.add(rebuild_ms=3.0, stacked=1, kept=1)
    g.joined(2)
    g.tokens(3)       # 3 rows' tokens: the one that was running waited the gap, the 2 joiners did not
    g.tokens(3)
    assert [r["rows"] for r in tr.snapshot()] == [1, 1, 3]


def test_metrics_report_the_device_memory_on_cuda_only(monkeypatch):
    """``kvsift_device_memory_bytes{kind=...}``: PyTorch's allocated, peak allocated and reserved bytes
    on a CUDA engine, set when ``/metrics`` is read (``bench/serve_load.py``'s ``GPU peak GiB``);
    absent on the CPU."""
    import torch

    from kvsift.server.metrics import Metrics

    m = Metrics("tiny")
    m.observe_device(torch.device("cpu"))
    assert 'kind="peak_allocated"' not in m.render().decode()
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 8 * 2**30)
    m.observe_device(torch.device("cuda", 0))
    vals = dict(line.rsplit(" ", 1) for line in m.render().decode().splitlines() if not line.startswith("#"))
    for kind, gib in (("allocated", 3), ("peak_allocated", 5), ("reserved", 8)):
        assert float(vals[f'kvsift_device_memory_bytes{{kind="{kind}"}}']) == gib * 2**30


def test_a_preempted_request_coming_back_is_not_counted_as_waiting_that_gap(tiny_llm, default_tokenizer):
    """Preemption with the trace on: B leaves the batch and comes back later; the change of rows
    that brings it back counts only the rows that were running (B's wait was longer than that gap),
    and the answers are the ones without the trace."""
    from tests.test_engine_scheduler import _run_preempting

    llm = LLM.from_model(tiny_llm.model, default_tokenizer, chunk_size=64)
    p_a, p_b = random_prompt(40, seed=501), random_prompt(48, seed=502)
    q = SamplingParams(max_tokens=40, ignore_eos=True)

    def run():
        a, b = (llm.request([p], q, method="snapkv", budget=0.5) for p in (p_a, p_b))
        _, outs, _ = _run_preempting(llm, a, b, 40, join_at=2, slack=1.1)
        return [outs[r.id][0].token_ids for r in (a, b)]

    recs = _traced(llm, run)
    changes = [r for r in recs if r["rebuild_ms"] > 0]
    assert len(changes) >= 3      # B stacked, B out, B back
    assert max(r["rows"] for r in recs) == 2
    # at every change of rows only the rows kept can have waited the whole gap: not B coming back
    # (here once A is done: a gap no row waited)
    assert all(r["rows"] <= r["kept"] for r in changes), changes
