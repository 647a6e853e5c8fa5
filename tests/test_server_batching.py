"""Batching across requests in the server: compatible queued requests are answered by one batched
generation, each with the answer it gets alone (greedy, tiny random model); the grouping rules;
the old one-at-a-time behaviour with max_batch 1; cancelling one request of a batch leaves the
others whole (in process, and with a real client disconnecting from a server process).

In process, the engine is held with the ``batches`` fixture (the first batch waits for
``release``; a batch of several requests can be paused after its first event), so nothing here
depends on timing."""

from __future__ import annotations

import json
import re
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kvsift import SamplingParams
from kvsift.server.config import ServerConfig
from tests.conftest import random_prompt


@pytest.fixture
def batches(tiny_llm, monkeypatch):
    """Records each engine batch (its requests' prompts). The first batch waits at its start until
    ``release`` is set; while ``resume`` is clear, a batch of at least ``pause_min`` requests stops
    after its first event (``paused`` is set) until ``resume`` is set. ``groups`` holds the requests
    a batch started with (not those that joined it later)."""
    rec = types.SimpleNamespace(groups=[], release=threading.Event(), resume=threading.Event(),
                                paused=threading.Event(), pause_min=2)
    rec.resume.set()
    real = tiny_llm.run_batch

    def run_batch(group, *a, **k):
        first = not rec.groups
        rec.groups.append([r.prompts for r in group])
        inner = real(group, *a, **k)

        def held():
            try:
                if first and not rec.release.wait(60):
                    raise TimeoutError("the test never released the first batch")
                for n, item in enumerate(inner):
                    yield item
                    if n == 0 and len(group) >= rec.pause_min and not rec.resume.is_set():
                        rec.paused.set()
                        if not rec.resume.wait(60):
                            raise TimeoutError("the test never resumed the batch")
            finally:
                inner.close()

        return held()

    monkeypatch.setattr(tiny_llm, "run_batch", run_batch)
    yield rec
    rec.release.set()
    rec.resume.set()


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def completion(prompt, n=6, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}


def alone(llm, prompt, n=6, **kw):
    """The answer to ``prompt`` alone, from a second LLM over the same model (not held by ``batches``)."""
    from kvsift import LLM

    solo = LLM.from_model(llm.model, llm.tokenizer, chunk_size=llm.chunk_size)
    return solo.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), **kw)[0]


def sse_text(r) -> tuple[str, list[dict]]:
    data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", r.text
    chunks = [json.loads(d) for d in data[:-1]]
    return "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]), chunks


def queue_behind_a_held_request(c, pool, bodies: list[dict]) -> list:
    """Start a short request that holds the engine (the ``batches`` fixture's first batch) and that
    no request may join, then ``bodies`` one after another; returns their futures once all wait in
    the queue."""
    sched = c.app.state.kvsift.scheduler
    # a seeded sample: nothing joins its batch (it reproduces only alone)
    blocker = pool.submit(c.post, "/v1/completions", json=completion([5, 6, 7], 2, temperature=0.5, seed=1))
    wait_for(lambda: sched.running == 1)
    futs = []
    for i, body in enumerate(bodies):
        futs.append(pool.submit(c.post, "/v1/completions", json=body))
        wait_for(lambda: sched.waiting == i + 1)
    return [blocker, *futs]


def test_concurrent_requests_share_one_batch_and_get_their_answers_alone(make_client, tiny_llm, batches):
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    prompts = [random_prompt(n, seed=50 + n) for n in (30, 45, 60)]  # different lengths: full pads exactly
    want = [alone(tiny_llm, p, 6 + i) for i, p in enumerate(prompts)]
    bodies = [completion(prompts[0], 6), completion(prompts[1], 7),
              completion(prompts[2], 8, stream=True, stream_options={"include_usage": True})]
    with ThreadPoolExecutor(4) as pool:
        futs = queue_behind_a_held_request(c, pool, bodies)
        batches.release.set()
        blocker, *rs = [f.result() for f in futs]
    assert blocker.status_code == 200 and all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert [len(g) for g in batches.groups] == [1, 3] and batches.groups[1] == [[p] for p in prompts]
    for r, w in zip(rs[:2], want):
        body = r.json()
        assert body["choices"][0]["text"] == w.text and body["usage"]["completion_tokens"] == len(w.token_ids)
        # its own share of the batch's KV: a full cache of its own prompt
        assert body["kvsift"]["stats"][0]["kv_kept_bytes"] <= body["kvsift"]["stats"][0]["kv_full_bytes"]
    text, chunks = sse_text(rs[2])
    assert text == want[2].text and chunks[-1]["usage"]["completion_tokens"] == 8
    assert sum(1 for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]) == 1
    # the last answer can reach the client just before the engine thread clears its bookkeeping
    wait_for(lambda: (sched.running, sched.waiting, sched.per_key, sched.busy) == (0, 0, {}, False))
    assert not sched.engine.waiting and not sched.engine.running and sched.engine.kv_used == 0
    m = c.get("/metrics").text
    assert re.search(r"^kvsift_batch_requests_count 2\.0$", m, re.M) and \
        re.search(r"^kvsift_batch_requests_sum 4\.0$", m, re.M), m


@pytest.mark.parametrize("max_batch,kind,groups", [
    (1, "full", [1, 1, 1, 1, 1]),            # the old behaviour: one request at a time
    (2, "full", [1, 2, 2]),                   # at most 2 sequences per batch
    # compressing: one prefill batch holds one prompt length (40, 40); the 41-token request joins that
    # batch at a decode step (prefilled on its own); the seeded sample runs alone
    (8, "snapkv", [1, 2, 1]),
])
def test_grouping_rules_in_the_server(make_client, tiny_llm, batches, max_batch, kind, groups):
    c = make_client(max_batch=max_batch)
    kv = {"kv_method": "snapkv", "kv_budget": 16} if kind == "snapkv" else {}
    prompts = [random_prompt(n, seed=60 + i) for i, n in enumerate((40, 40, 41, 40))]
    bodies = [completion(p, 4, **kv) for p in prompts]
    if kind == "snapkv":  # a seeded sample reproduces only alone
        bodies[3] = {**bodies[3], "temperature": 0.8, "seed": 7}
    with ThreadPoolExecutor(5) as pool:
        futs = queue_behind_a_held_request(c, pool, bodies)
        batches.release.set()
        rs = [f.result() for f in futs]
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert [len(g) for g in batches.groups] == groups
    for p, r, b in zip(prompts, rs[1:], bodies):
        if "seed" not in b:
            want = alone(tiny_llm, p, 4, method=kind, budget=16 if kind == "snapkv" else None)
            assert r.json()["choices"][0]["text"] == want.text


def test_cancelling_one_request_of_a_batch_leaves_the_others_whole(make_client, tiny_llm, batches):
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    p_a, p_b = random_prompt(30, seed=71), random_prompt(50, seed=72)
    want_b = alone(tiny_llm, p_b, 40)
    batches.resume.clear()  # the batch of A and B stops after its first event
    with ThreadPoolExecutor(3) as pool:
        futs = queue_behind_a_held_request(c, pool, [completion(p_a, 40), completion(p_b, 40, stream=True)])
        batches.release.set()
        assert batches.paused.wait(30)
        job_a = next(j for j in sched.jobs if j.request is not None and j.request.prompts == [p_a])
        job_a.cancel()  # what the server does when A's client disconnects
        batches.resume.set()
        _, ra, rb = [f.result() for f in futs]
    assert [len(g) for g in batches.groups] == [1, 2]
    out_a = ra.json()
    assert out_a["usage"]["completion_tokens"] < 40  # A stopped at the next decode step
    text, chunks = sse_text(rb)
    assert text == want_b.text and [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == "length"
    assert 'kvsift_generations_total{reason="cancelled"} 1.0' in c.get("/metrics").text
    assert (sched.running, sched.waiting, sched.per_key) == (0, 0, {})


def behind_a_paused_batch(c, batches, pool, first: dict, bodies: list[dict]) -> list:
    """Start ``first`` (its batch stops after its first event), queue ``bodies`` one after another,
    then let the batch go on (they may join it); returns the futures, ``first``'s first."""
    sched = c.app.state.kvsift.scheduler
    batches.release.set()
    batches.pause_min = 1
    batches.resume.clear()
    futs = [pool.submit(c.post, "/v1/completions", json=first)]
    assert batches.paused.wait(30)
    for i, body in enumerate(bodies):
        futs.append(pool.submit(c.post, "/v1/completions", json=body))
        wait_for(lambda i=i: sched.waiting == i + 1)
    batches.resume.set()
    return futs


@pytest.mark.parametrize("continuous", [True, False])
def test_queued_requests_join_the_running_batch_in_arrival_order(make_client, tiny_llm, batches, continuous):
    """Continuous batching: B arrives while A's batch runs and joins it at the next decode step; C
    (snapkv) cannot join, and D, behind C, does not overtake it. Without it, B waits for the next
    batch (and D shares it)."""
    c = make_client(max_batch=4, continuous_batching=continuous)
    sched = c.app.state.kvsift.scheduler
    p_a, p_b, p_c, p_d = (random_prompt(n, seed=100 + n) for n in (30, 55, 40, 20))
    want = [alone(tiny_llm, p_a, 30), alone(tiny_llm, p_b, 8), alone(tiny_llm, p_c, 5, method="snapkv", budget=16),
            alone(tiny_llm, p_d, 5)]
    batches.release.set()
    batches.pause_min = 1
    batches.resume.clear()  # A's batch stops after its first event
    with ThreadPoolExecutor(4) as pool:
        fa = pool.submit(c.post, "/v1/completions", json=completion(p_a, 30))
        assert batches.paused.wait(30)
        fb = pool.submit(c.post, "/v1/completions", json=completion(p_b, 8, stream=True))
        wait_for(lambda: sched.waiting == 1)
        fc = pool.submit(c.post, "/v1/completions", json=completion(p_c, 5, kv_method="snapkv", kv_budget=16))
        wait_for(lambda: sched.waiting == 2)
        fd = pool.submit(c.post, "/v1/completions", json=completion(p_d, 5))
        wait_for(lambda: sched.waiting == 3)
        batches.resume.set()
        ra, rb, rc, rd = (f.result() for f in (fa, fb, fc, fd))
    if continuous:
        assert sched.joined == 1 and batches.groups == [[[p_a]], [[p_c]], [[p_d]]]
    else:
        assert sched.joined == 0 and batches.groups == [[[p_a]], [[p_b], [p_d]], [[p_c]]]
    assert ra.json()["choices"][0]["text"] == want[0].text
    text, chunks = sse_text(rb)
    assert text == want[1].text and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert rc.json()["choices"][0]["text"] == want[2].text and rd.json()["choices"][0]["text"] == want[3].text
    # the last answer can reach the client just before the engine thread clears its bookkeeping
    wait_for(lambda: (sched.running, sched.waiting, sched.per_key, sched.busy) == (0, 0, {}, False))
    assert not sched.engine.running and sched.engine.kv_used == 0
    assert re.search(rf"^kvsift_batch_joins_total {int(continuous)}\.0$", c.get("/metrics").text, re.M)


def test_eviction_requests_of_other_lengths_and_budgets_join_over_http(make_client, tiny_llm, batches):
    """Over HTTP: snapkv requests with another prompt length and another budget join a running
    snapkv batch (prefilled a chunk per step, 300 tokens = 5 chunks of 64), an adakv one waits for
    the next batch (another method); every answer equals the request alone."""
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    p_a, p_b, p_c, p_d = (random_prompt(n, seed=200 + n) for n in (40, 300, 90, 50))
    spec = [("snapkv", 0.5, 30), ("snapkv", 24, 6), ("snapkv", 0.25, 5), ("adakv", 16, 5)]
    want = [alone(tiny_llm, p, n, method=m, budget=b) for p, (m, b, n) in zip((p_a, p_b, p_c, p_d), spec)]
    batches.release.set()
    batches.pause_min = 1
    batches.resume.clear()  # A's batch stops after its first event
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(c.post, "/v1/completions", json=completion(p_a, 30, kv_method="snapkv", kv_budget=0.5))]
        assert batches.paused.wait(30)
        for i, (p, (m, b, n)) in enumerate(zip((p_b, p_c, p_d), spec[1:])):
            futs.append(pool.submit(c.post, "/v1/completions",
                                    json=completion(p, n, kv_method=m, kv_budget=b, stream=i == 0)))
            wait_for(lambda i=i: sched.waiting == i + 1)
        batches.resume.set()
        ra, rb, rc, rd = (f.result() for f in futs)
    assert sched.joined == 2 and batches.groups == [[[p_a]], [[p_d]]]
    assert ra.json()["choices"][0]["text"] == want[0].text
    text, _ = sse_text(rb)
    assert text == want[1].text
    assert rc.json()["choices"][0]["text"] == want[2].text and rd.json()["choices"][0]["text"] == want[3].text
    wait_for(lambda: (sched.running, sched.waiting, sched.per_key, sched.busy) == (0, 0, {}, False))
    assert not sched.engine.running and sched.engine.kv_used == 0


def test_questions_on_one_context_join_its_running_batch(make_client, tiny_llm, batches):
    """A question on a context arriving while another question on it runs joins that batch (the
    context is read by reference, one copy for both rows); each gets the answer of document +
    question alone."""
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    doc = random_prompt(200, seed=140)
    ctx = c.post("/v1/contexts", json={"document": doc, "kv_method": "full", "persist": False}).json()
    q_a, q_b = random_prompt(15, seed=141), random_prompt(25, seed=142)
    want = [alone(tiny_llm, doc + q_a, 20), alone(tiny_llm, doc + q_b, 6)]
    batches.release.set()
    batches.pause_min = 1
    batches.resume.clear()  # A's batch stops after its first event
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(c.post, "/v1/completions", json=completion(q_a, 20, context_id=ctx["id"]))
        assert batches.paused.wait(30)
        fb = pool.submit(c.post, "/v1/completions", json=completion(q_b, 6, context_id=ctx["id"]))
        wait_for(lambda: sched.waiting == 1)
        batches.resume.set()
        ra, rb = fa.result(), fb.result()
    assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
    assert sched.joined == 1
    assert ra.json()["choices"][0]["text"] == want[0].text and rb.json()["choices"][0]["text"] == want[1].text


def test_max_batch_and_memory_options_are_validated(capsys):
    for kw, msg in (({"max_batch": 0}, "max_batch (--max-batch) must be an integer >= 1"),
                    ({"max_batch": 2.5}, "max_batch"), ({"kv_memory_bytes": 0}, "kv_memory_bytes (--kv-memory)"),
                    ({"host_memory_bytes": -1}, "host_memory_bytes (--host-memory)"),
                    ({"continuous_batching": "yes"}, "continuous_batching must be a bool"),
                    ({"preempt": 1}, "preempt must be a bool")):
        with pytest.raises(ValueError) as e:
            ServerConfig(**kw)
        assert msg in str(e.value)
    from kvsift.cli import main

    assert main(["serve", "--max-batch", "0", "--model", "/nonexistent", "--no-persist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsift: error: ") and "--max-batch" in err, err
    assert main(["serve", "--join-chunks", "-1", "--model", "/nonexistent", "--no-persist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsift: error: ") and "--join-chunks" in err, err
    assert main(["serve", "--join-chunk-size", "8", "--model", "/nonexistent", "--no-persist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsift: error: ") and "--join-chunk-size" in err, err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--join-order", "fifo", "--model", "/nonexistent", "--no-persist"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "kvsift" in err and "--join-order" in err and "invalid choice" in err, err
    import argparse

    from kvsift.engine.llm import JOIN_ORDERS
    from kvsift.server.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)   # the CLI's choices (a literal: no torch import to build the parser) are the engine's
    assert next(a.choices for a in parser._actions if "--join-order" in a.option_strings) == JOIN_ORDERS


def test_a_request_over_the_kv_memory_is_400_before_it_queues(make_client, tiny_llm):
    per = tiny_llm.kv_bytes_per_token
    c = make_client(kv_memory_bytes=100 * per)
    ok = c.post("/v1/completions", json=completion(random_prompt(40, seed=3), 4))
    assert ok.status_code == 200, ok.text
    r = c.post("/v1/completions", json=completion(random_prompt(120, seed=3), 4))
    assert r.status_code == 400 and r.json()["error"]["code"] == "kv_memory_exceeded", r.text
    r = c.post("/v1/contexts", json={"document": random_prompt(120, seed=4), "chat": False})
    assert r.status_code == 400 and r.json()["error"]["code"] == "kv_memory_exceeded", r.text
    sched = c.app.state.kvsift.scheduler
    assert (sched.running, sched.waiting, sched.per_key) == (0, 0, {}) and not sched.engine.waiting


# ---- a real client leaving a batch (server process) ------------------------------------------------------
def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"metric {name} missing"
    return float(m.group(1))


def test_a_client_leaving_its_batch_does_not_break_the_others(tmp_path_factory, default_tokenizer):
    from kvsift.models import save_tiny_model
    from kvsift.server.testing import ServerProcess

    tiny = save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer=default_tokenizer, seed=1,
                           max_positions=8192)
    p_a, p_b = random_prompt(30, seed=81), random_prompt(30, seed=82)
    with ServerProcess(["--model", str(tiny), "--no-persist", "--chunk-size", "64", "--max-batch", "4"]) as srv:
        url = srv.url
        want_b = httpx.post(url + "/v1/completions", json=completion(p_b, 60), timeout=60).json()["choices"][0]["text"]
        cancelled0 = _metric(url, 'kvsift_generations_total{reason="cancelled"}')
        got: dict = {}

        def read_a():  # reads two events of its stream, then leaves
            with httpx.stream("POST", url + "/v1/completions", json=completion(p_a, 4000, stream=True),
                              timeout=60) as r:
                n = 0
                for line in r.iter_lines():
                    n += line.startswith("data: ")
                    if n == 2:
                        got["a"] = n
                        return

        def read_b():
            with httpx.stream("POST", url + "/v1/completions", json=completion(p_b, 60, stream=True),
                              timeout=120) as r:
                got["b"] = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                                   if line.startswith("data: ") and line != "data: [DONE]"
                                   and json.loads(line[6:])["choices"])

        with httpx.Client(timeout=60) as c0:
            blocker_body = completion([5, 6, 7], 8000, stream=True, temperature=0.5, seed=1)  # no one joins it
            with c0.stream("POST", url + "/v1/completions", json=blocker_body) as blocker:
                assert blocker.status_code == 200
                wait_for(lambda: _metric(url, "kvsift_requests_running") == 1)
                ta = threading.Thread(target=read_a)
                ta.start()
                wait_for(lambda: _metric(url, "kvsift_requests_waiting") == 1)
                tb = threading.Thread(target=read_b)
                tb.start()
                wait_for(lambda: _metric(url, "kvsift_requests_waiting") == 2)
            # the blocker's client left: A and B start together
        ta.join(60)
        tb.join(120)
        assert got.get("a") == 2 and got.get("b") == want_b
        wait_for(lambda: _metric(url, 'kvsift_generations_total{reason="cancelled"}') == cancelled0 + 2)
        wait_for(lambda: _metric(url, "kvsift_requests_running") == 0)
        text = httpx.get(url + "/metrics", timeout=10).text
        two = float(re.search(r'^kvsift_batch_requests_bucket\{le="2\.0"\} (\S+)$', text, re.M).group(1))
        one = float(re.search(r'^kvsift_batch_requests_bucket\{le="1\.0"\} (\S+)$', text, re.M).group(1))
        assert two - one == 1  # A and B ran as one batch of two requests
        assert httpx.get(url + "/health", timeout=10).json()["waiting"] == 0


def test_server_with_kv_arena_answers_like_alone(tmp_path_factory, default_tokenizer, tiny_llm):
    """``--kv-arena`` with static decoding (``KVSIFT_DECODE=static``): batches of different sizes, one
    after another over the runner's arenas, answer as each request alone."""
    from kvsift.models import save_tiny_model
    from kvsift.server.testing import ServerProcess

    tiny = save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer=default_tokenizer, seed=1)
    prompts = [random_prompt(n, seed=130 + n) for n in (30, 50, 40)]
    with ServerProcess(["--model", str(tiny), "--no-persist", "--chunk-size", "64", "--kv-arena"],
                       env={"KVSIFT_DECODE": "static"}) as srv:
        for body in ({"prompt": prompts}, {"prompt": prompts[0]}, {"prompt": prompts[1:]}):
            r = httpx.post(srv.url + "/v1/completions", json={**completion(None, 6), **body}, timeout=60)
            assert r.status_code == 200, r.text
            out = r.json()
            items = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            assert [c["text"] for c in out["choices"]] == [alone(tiny_llm, p, 6).text for p in items]
            assert out["kvsift"]["stats"][0]["decode_mode"] == "static"


def _fail_prefill_of(llm, monkeypatch, length: int, exc: BaseException):
    """The runner's prefill of any batch holding a prompt of ``length`` tokens raises ``exc`` at
    its first chunk (a joining request running out of memory, say)."""
    real = llm.runner.prefill_steps

    def prefill_steps(ids, *a, **k):
        if any(len(x) == length for x in ids):
            def failing():
                raise exc
                yield  # noqa: unreachable - a generator like the real one
            return failing()
        return real(ids, *a, **k)

    monkeypatch.setattr(llm.runner, "prefill_steps", prefill_steps)


def test_a_joining_request_whose_prefill_fails_fails_alone(make_client, tiny_llm, batches, monkeypatch):
    """B joins A's running batch and its prefill raises (as a GPU out of memory would): B gets a 500
    with a reference, A its whole answer alone, C (joining after the failure) its own; the
    scheduler's accounting is back to 0."""
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    p_a, p_b, p_c = (random_prompt(n, seed=300 + n) for n in (30, 55, 44))
    want_a, want_c = alone(tiny_llm, p_a, 30), alone(tiny_llm, p_c, 6)
    _fail_prefill_of(tiny_llm, monkeypatch, 55, RuntimeError("simulated: out of memory in a joining prefill"))
    with ThreadPoolExecutor(3) as pool:
        fa, fb = behind_a_paused_batch(c, batches, pool, completion(p_a, 30), [completion(p_b, 6)])
        rb = fb.result()
        fc = pool.submit(c.post, "/v1/completions", json=completion(p_c, 6))
        ra, rc = fa.result(), fc.result()
    assert rb.status_code == 500 and rb.json()["error"]["code"] == "internal_error", rb.text
    assert "RuntimeError" in rb.json()["error"]["message"]
    assert sched.joined >= 1 and batches.groups[0] == [[p_a]] and [[p_b]] not in batches.groups  # B joined A
    assert ra.status_code == 200 and ra.json()["choices"][0]["text"] == want_a.text
    assert rc.status_code == 200 and rc.json()["choices"][0]["text"] == want_c.text
    wait_for(lambda: (sched.running, sched.waiting, sched.per_key, sched.busy) == (0, 0, {}, False))
    assert not sched.engine.running and sched.engine.kv_used == 0


@pytest.mark.parametrize("order", ["fcfs", "shortest"])
def test_joiners_one_at_a_time_over_http_answer_alone_and_a_failing_one_fails_alone(make_client, tiny_llm, batches,
                                                                                   monkeypatch, order):
    """--join-order fcfs / shortest: three requests queued behind a running one join it one at a
    time; the middle one's prefill raises (as a GPU out of memory would): it gets a 500, the other
    two and the running one their answers alone, and the scheduler's accounting is back to 0."""
    monkeypatch.setattr(tiny_llm, "join_order", order)
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    p_a, p_b, p_c, p_d = (random_prompt(n, seed=500 + n) for n in (30, 300, 57, 90))
    want = {n: alone(tiny_llm, p, 6) for n, p in ((57, p_c), (90, p_d))}
    want_a = alone(tiny_llm, p_a, 40)
    _fail_prefill_of(tiny_llm, monkeypatch, 57, RuntimeError("simulated: out of memory in a joining prefill"))
    with ThreadPoolExecutor(4) as pool:
        fa, fb, fc, fd = behind_a_paused_batch(c, batches, pool, completion(p_a, 40),
                                               [completion(p, 6) for p in (p_b, p_c, p_d)])
        ra, rb, rc, rd = (f.result() for f in (fa, fb, fc, fd))
    assert rc.status_code == 500 and rc.json()["error"]["code"] == "internal_error", rc.text
    assert ra.json()["choices"][0]["text"] == want_a.text
    assert rb.status_code == 200 and rb.json()["choices"][0]["text"] == alone(tiny_llm, p_b, 6).text
    assert rd.status_code == 200 and rd.json()["choices"][0]["text"] == want[90].text
    assert sched.joined == 3 and batches.groups == [[[p_a]]]
    wait_for(lambda: (sched.running, sched.waiting, sched.per_key, sched.busy) == (0, 0, {}, False))
    assert not sched.engine.running and sched.engine.kv_used == 0


def test_max_batched_tokens_is_validated_before_the_model_loads(capsys):
    from kvsift import LLM
    from kvsift.cli import main

    with pytest.raises(ValueError, match="max_batched_tokens must be >= 16"):
        LLM("/nonexistent", max_batched_tokens=8)
    assert main(["serve", "--max-batched-tokens", "8", "--model", "/nonexistent", "--no-persist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsift: error: ") and "--max-batched-tokens" in err, err


def test_default_admission_limits_are_shares_of_free_memory_on_cuda_only():
    import torch

    from kvsift.budget import DEVICE_KV_SHARE, HOST_KV_SHARE, default_memory_limits

    assert default_memory_limits(torch.device("cpu")) == (None, None)
    dev, host = default_memory_limits(torch.device("cuda", 0), free_device=100 * 2**30, available_host=64 * 2**30)
    assert dev == int(100 * 2**30 * DEVICE_KV_SHARE) and host == int(64 * 2**30 * HOST_KV_SHARE)
    assert default_memory_limits(torch.device("cuda", 0), free_device=2**30, available_host=0)[1] is None


def test_preempting_server_swaps_a_request_out_and_answers_both(make_client, tiny_llm, batches):
    """``--preempt``: A and B are admitted with their prompts and 16 decode tokens; 40 tokens each do
    not fit ``--kv-memory`` together, so B is swapped to host memory mid-answer and resumed after
    A: both answers are the ones alone, the metric counts the preemption, the charges end at 0."""
    per = tiny_llm.kv_bytes_per_token
    c = make_client(max_batch=4, kv_memory_bytes=112 * per, preempt=True)   # 2 x (40 + 16) tokens
    sched = c.app.state.kvsift.scheduler
    p_a, p_b = random_prompt(40, seed=601), random_prompt(40, seed=602)
    want = [alone(tiny_llm, p, 40) for p in (p_a, p_b)]
    with ThreadPoolExecutor(2) as pool:
        futs = behind_a_paused_batch(c, batches, pool, completion(p_a, 40), [completion(p_b, 40, stream=True)])
        ra, rb = (f.result() for f in futs)
    assert ra.status_code == 200 and ra.json()["choices"][0]["text"] == want[0].text, ra.text
    text, chunks = sse_text(rb)
    assert text == want[1].text and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sched.joined == 1 and sched.engine.preemptions >= 1
    assert re.search(r"^kvsift_preemptions_total [1-9]", c.get("/metrics").text, re.M)
    wait_for(lambda: (sched.running, sched.waiting, sched.busy) == (0, 0, False))
    assert (sched.engine.kv_used, sched.engine.host_used) == (0, 0)


def test_tova_requests_of_one_token_budget_join_over_http(make_client, tiny_llm, batches):
    """tova evicts while decoding: a request with the running rows' token budget joins (another
    prompt length), one with another budget waits for the next batch; all answers alone."""
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    p_a, p_b, p_c = (random_prompt(n, seed=900 + n) for n in (40, 64, 50))
    want = [alone(tiny_llm, p, n, method="tova", budget=b) for p, n, b in ((p_a, 24, 16), (p_b, 6, 16), (p_c, 5, 24))]
    bodies = [completion(p_b, 6, kv_method="tova", kv_budget=16), completion(p_c, 5, kv_method="tova", kv_budget=24)]
    with ThreadPoolExecutor(3) as pool:
        futs = behind_a_paused_batch(c, batches, pool, completion(p_a, 24, kv_method="tova", kv_budget=16), bodies)
        ra, rb, rc = (f.result() for f in futs)
    assert [r.json()["choices"][0]["text"] for r in (ra, rb, rc)] == [w.text for w in want]
    assert sched.joined == 1 and batches.groups == [[[p_a]], [[p_c]]]


def test_decoding_requests_join_over_http_and_compress_as_alone(make_client, tiny_llm, batches):
    """decoding(snapkv) joins a running batch over HTTP (another prompt length, the same budget):
    the joined row compresses at its own interval, over its own tokens, so both answers equal
    alone; a request of another budget waits for the next batch."""
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    opts = {"interval": 3, "query_window": 16}
    p_a, p_b, p_c = (random_prompt(n, seed=950 + n) for n in (90, 50, 70))
    want = [alone(tiny_llm, p, n, method="decoding", budget=b, method_kwargs=opts)
            for p, n, b in ((p_a, 20, 24), (p_b, 9, 24), (p_c, 5, 32))]
    kw = {"kv_method": "decoding", "kv_options": opts}
    bodies = [completion(p_b, 9, kv_budget=24, **kw), completion(p_c, 5, kv_budget=32, **kw)]
    with ThreadPoolExecutor(3) as pool:
        futs = behind_a_paused_batch(c, batches, pool, completion(p_a, 20, kv_budget=24, **kw), bodies)
        ra, rb, rc = (f.result() for f in futs)
    assert [r.json()["choices"][0]["text"] for r in (ra, rb, rc)] == [w.text for w in want]
    assert sched.joined == 1 and batches.groups == [[[p_a]], [[p_c]]]


@pytest.mark.parametrize("spec,budget", [("kivi", None), ("quest+kivi", 32), ("sentencekv+kivi", 32)])
def test_kivi_requests_of_other_lengths_join_over_http(make_client, tiny_llm, batches, spec, budget):
    """kivi joins a running batch over HTTP (another prompt length), alone or after a decode-time
    stage: each row keeps its own full-precision window and quantizes it on its own schedule (and
    sentencekv's rows read their int4 host chunks where their stores hold them), so both answers
    equal alone."""
    c = make_client(max_batch=4)
    sched = c.app.state.kvsift.scheduler
    opts = {"group": 16, "residual": 32}
    p_a, p_b = (random_prompt(n, seed=970 + n) for n in (90, 57))
    want = [alone(tiny_llm, p, n, method=spec, budget=budget, method_kwargs=opts) for p, n in ((p_a, 40), (p_b, 20))]
    kw = {"kv_method": spec, "kv_options": opts, **({"kv_budget": budget} if budget else {})}
    with ThreadPoolExecutor(2) as pool:
        futs = behind_a_paused_batch(c, batches, pool, completion(p_a, 40, **kw), [completion(p_b, 20, **kw)])
        ra, rb = (f.result() for f in futs)
    assert [r.json()["choices"][0]["text"] for r in (ra, rb)] == [w.text for w in want]
    assert sched.joined == 1 and batches.groups == [[[p_a]]]


def test_the_join_callback_says_when_no_request_can_join():
    """The server hands a running batch a ``_Joiner``: its call asks the event loop for joiners, and
    ``idle()`` is true while no request waits (or the server is closing), which lets the engine
    record a new batch's CUDA graph before its first tokens stream; ``waiting_tokens()`` is the
    shortest waiting prompt (a joiner longer than one step's prefill cannot change the rows first)."""
    from types import SimpleNamespace

    from kvsift.engine.scheduler import Scheduler as EngineScheduler
    from kvsift.server.scheduler import _Joiner

    asked = []
    engine = EngineScheduler()
    sched = SimpleNamespace(engine=engine, closing=False,
                            _join_from_worker=lambda loop, running, rows: asked.append((loop, rows)) or ["r"])
    j = _Joiner(sched, "loop")
    assert j(["a"], 3) == ["r"] and asked == [("loop", 3)]
    assert j.idle() and j.waiting_tokens() is None
    engine.waiting.append(SimpleNamespace(prompts=[[1] * 300, [2] * 120]))
    engine.waiting.append(SimpleNamespace(prompts=[[3] * 500]))
    assert not j.idle() and j.waiting_tokens() == 120   # the shortest waiting prompt
    sched.closing = True
    assert j.idle() and j.waiting_tokens() is None


def test_settled_batch_makes_room_for_joiners_under_kv_memory(make_client, tiny_llm, batches):
    """With --kv-memory admitting one 300-token prefill beside another, not two: once snapkv's
    running batch is built it is charged the KV it holds (its kept tokens), not its prompt's, so
    both later requests join it (each charged its prefill while it runs); answers as alone, and
    every charge is returned at the end."""
    per = tiny_llm.kv_bytes_per_token
    c = make_client(max_batch=4, kv_memory_bytes=2 * 300 * per - 1)
    sched = c.app.state.kvsift.scheduler
    prompts = [random_prompt(300, seed=900 + i) for i in range(3)]
    want = [alone(tiny_llm, p, 8, method="snapkv", budget=24) for p in prompts]
    batches.release.set()
    batches.pause_min = 1
    batches.resume.clear()  # the first batch stops after its first event
    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(c.post, "/v1/completions", json=completion(prompts[0], 8, kv_method="snapkv", kv_budget=24))]
        assert batches.paused.wait(30)
        for i, p in enumerate(prompts[1:]):
            futs.append(pool.submit(c.post, "/v1/completions", json=completion(p, 8, kv_method="snapkv", kv_budget=24)))
            wait_for(lambda i=i: sched.waiting == i + 1)
        batches.resume.set()
        got = [f.result().json()["choices"][0]["text"] for f in futs]
    assert got == [w.text for w in want]
    assert sched.joined == 2 and len(batches.groups) == 1
    wait_for(lambda: (sched.running, sched.waiting, sched.busy) == (0, 0, False))
    assert not sched.engine.running and sched.engine.kv_used == 0
