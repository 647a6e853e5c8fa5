"""Limits and fairness: the bounded queue (429 + Retry-After), the expected-wait limit, per-API-key
concurrency, the run-time cap of a generation, their config and CLI validation. In process, on the
tiny random model; the engine is held busy with a gate (``gate``) and run times are made
deterministic with the scheduler's clock hook (``Scheduler.clock``), so no test sleeps for its limits."""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvsift.server.auth import KeyRing
from kvsift.server.config import ServerConfig

KEYS = "alice-key-0001 alice max_concurrent=1\nbob-key-00002 bob\n"
ALICE, BOB = ({"Authorization": f"Bearer {k}"} for k in ("alice-key-0001", "bob-key-00002"))
COMPLETION = {"prompt": [5, 6, 7], "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def gate(tiny_llm, monkeypatch):
    """Every generation waits at its start (holding the engine) until ``gate.set()``."""
    opened = threading.Event()
    real = tiny_llm.run_batch

    def run_batch(*a, **k):
        inner = real(*a, **k)

        def held():
            try:
                if not opened.wait(60):
                    raise TimeoutError("the test's gate was never opened")
                yield from inner
            finally:
                inner.close()

        return held()

    monkeypatch.setattr(tiny_llm, "run_batch", run_batch)
    yield opened
    opened.set()


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def limited(r, code: str) -> tuple[dict, int]:
    """Assert a 429 with an OpenAI-shaped body and an integer Retry-After: (error, seconds)."""
    assert r.status_code == 429, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["type"] == "rate_limit_error", e
    assert e["code"] == code, e
    after = r.headers["Retry-After"]
    assert after.isdigit() and int(after) >= 1, after
    return e, int(after)


def events(r) -> list:
    """The SSE data of a streamed response: chunks, then the final ``[DONE]``."""
    data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", r.text
    return [json.loads(d) for d in data[:-1]]


def test_full_queue_is_429_with_retry_after(make_client, gate):
    c = make_client(max_waiting=1)
    sched = c.app.state.kvsift.scheduler
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/completions", json=COMPLETION)
        wait_for(lambda: sched.running == 1)
        second = pool.submit(c.post, "/v1/chat/completions", json=CHAT)
        wait_for(lambda: sched.waiting == 1)
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT),
                           ("/v1/completions", {**COMPLETION, "stream": True}),
                           ("/v1/contexts", {"document": [5, 6, 7], "chat": False})):
            e, _ = limited(c.post(path, json=body), "server_busy")
            assert "--max-waiting 1" in e["message"], e
        # the estimate: the running job's expected rest, from the recent jobs' average run time
        sched.avg_job_s = 30.0
        _, after = limited(c.post("/v1/completions", json=COMPLETION), "server_busy")
        assert 20 <= after <= 30, after
        gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert (sched.running, sched.waiting, sched.per_key) == (0, 0, {})
    assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    assert 'kvsift_requests_rejected_total{code="server_busy"' in c.get("/metrics").text


def test_expected_wait_over_the_limit_is_429(make_client, gate):
    c = make_client(max_queue_seconds=5)
    sched = c.app.state.kvsift.scheduler
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/completions", json=COMPLETION)
        wait_for(lambda: sched.running == 1)
        # no job finished yet: no estimate, no refusal
        second = pool.submit(c.post, "/v1/completions", json=COMPLETION)
        wait_for(lambda: sched.waiting == 1)
        sched.avg_job_s = 10.0  # now: ~10s left of the running job + 10s for the waiting one
        e, after = limited(c.post("/v1/chat/completions", json=CHAT), "queue_wait_too_long")
        assert "--max-queue-seconds" in e["message"] and 10 <= after <= 15, (e, after)
        gate.set()
        assert first.result().status_code == second.result().status_code == 200
    assert sched.avg_job_s is not None and sched.avg_job_s < 10.0  # the finished jobs updated the average


def test_per_key_limit_refuses_that_key_only(make_client, gate, monkeypatch):
    import kvsift.server.app as app_mod

    prepared = []
    real_prepare = app_mod._prepare
    monkeypatch.setattr(app_mod, "_prepare", lambda *a, **k: prepared.append(1) or real_prepare(*a, **k))
    c = make_client(keys=KeyRing.parse(KEYS), max_concurrent_per_key=2)
    sched = c.app.state.kvsift.scheduler
    with ThreadPoolExecutor(3) as pool:
        alice = pool.submit(c.post, "/v1/completions", json=COMPLETION, headers=ALICE)
        wait_for(lambda: sched.running == 1)
        n = len(prepared)
        # alice's key allows 1 (its max_concurrent overrides the server's 2): refused before any work
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", {**COMPLETION, "stream": True}),
                           ("/v1/contexts", {"document": [5, 6, 7], "chat": False})):
            e, _ = limited(c.post(path, json=body, headers=ALICE), "too_many_concurrent_requests")
            assert "max_concurrent in the keys file: 1" in e["message"], e
        assert len(prepared) == n
        # bob's key still gets through, up to the server's limit of 2
        bobs = [pool.submit(c.post, "/v1/completions", json=COMPLETION, headers=BOB) for _ in range(2)]
        wait_for(lambda: sched.waiting == 2)
        e, _ = limited(c.post("/v1/completions", json=COMPLETION, headers=BOB), "too_many_concurrent_requests")
        assert "--max-concurrent-per-key: 2" in e["message"], e
        gate.set()
        assert [f.result().status_code for f in (alice, *bobs)] == [200, 200, 200]
    assert sched.per_key == {}
    assert c.post("/v1/completions", json=COMPLETION, headers=ALICE).status_code == 200  # the slot is free again


def test_without_keys_all_requests_share_one_bucket(make_client, gate):
    c = make_client(max_concurrent_per_key=1)
    sched = c.app.state.kvsift.scheduler
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.post, "/v1/completions", json=COMPLETION)
        wait_for(lambda: sched.running == 1)
        _, after = limited(c.post("/v1/completions", json=COMPLETION), "too_many_concurrent_requests")
        assert after == 1  # the running job's expected rest (no history: about a second)
        gate.set()
        assert first.result().status_code == 200
    assert c.post("/v1/completions", json=COMPLETION).status_code == 200


def ticking(c) -> None:
    """The scheduler's clock advances one second at each reading (each decode step reads it once)."""
    ticks = itertools.count()
    c.app.state.kvsift.scheduler.clock = lambda: float(next(ticks))


def test_run_time_cap_stops_a_long_generation_with_what_it_has(make_client):
    c = make_client(max_request_seconds=5)
    ticking(c)
    r = c.post("/v1/completions", json=LONG)
    assert r.status_code == 200, r.text
    out = r.json()
    assert r.headers["X-Kvsift-Stopped"] == "time-limit"
    assert out["choices"][0]["finish_reason"] == "length" and out["kvsift"]["stopped"] == "time_limit"
    assert 0 < out["usage"]["completion_tokens"] < LONG["max_tokens"], out["usage"]
    assert out["choices"][0]["text"]
    assert 'kvsift_generations_total{reason="time_limit"} 1.0' in c.get("/metrics").text
    # a generation within the limit has neither the header nor the mark
    ticking(c)
    r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and "X-Kvsift-Stopped" not in r.headers and "stopped" not in r.json()["kvsift"]


def test_run_time_cap_ends_a_stream_cleanly(make_client):
    c = make_client(max_request_seconds=5)
    ticking(c)
    r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    chunks = events(r)
    finals = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"] is not None]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert finals[0]["kvsift"] == {"stopped": "time_limit"}
    assert 0 < chunks[-1]["usage"]["completion_tokens"] < 200
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert text


def test_run_time_counts_from_the_start_not_the_queue(make_client, gate):
    """A request waiting longer than the cap still runs whole; the one holding the engine is cut."""
    c = make_client(max_request_seconds=5)
    sched = c.app.state.kvsift.scheduler
    now = [0.0]
    sched.clock = lambda: now[0]  # a clock that moves only when the test says so
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(c.post, "/v1/completions", json=LONG)
        wait_for(lambda: sched.running == 1)
        queued = pool.submit(c.post, "/v1/completions", json={**COMPLETION, "ignore_eos": True})
        wait_for(lambda: sched.waiting == 1)
        now[0] = 100.0  # both are past the cap: the held one running, the queued one waiting
        gate.set()
        cut, whole = held.result(), queued.result()
    assert cut.headers["X-Kvsift-Stopped"] == "time-limit" and cut.json()["choices"][0]["finish_reason"] == "length"
    assert cut.json()["usage"]["completion_tokens"] < LONG["max_tokens"]
    assert "X-Kvsift-Stopped" not in whole.headers, whole.json()
    assert whole.json()["usage"]["completion_tokens"] == COMPLETION["max_tokens"]


@pytest.mark.parametrize("kw,msg", [
    ({"max_request_seconds": -1}, "max_request_seconds (--max-request-seconds) must be a number of seconds > 0"),
    ({"max_request_seconds": 0}, "max_request_seconds"),
    ({"max_request_seconds": float("nan")}, "max_request_seconds"),
    ({"max_queue_seconds": -2.5}, "max_queue_seconds (--max-queue-seconds) must be a number of seconds > 0"),
    ({"max_concurrent_per_key": 0}, "max_concurrent_per_key (--max-concurrent-per-key) must be an integer >= 1"),
    ({"max_concurrent_per_key": -3}, "got -3"),
    ({"max_concurrent_per_key": 1.5}, "max_concurrent_per_key"),
    ({"max_waiting": -1}, "max_waiting must be >= 0"),
])
def test_config_limits_are_validated(kw, msg):
    with pytest.raises(ValueError) as e:
        ServerConfig(**kw)
    assert msg in str(e.value)


def test_keys_file_max_concurrent():
    ring = KeyRing.parse(KEYS + "root-key-0003 ops admin max_concurrent=8\n")
    assert ring.lookup("alice-key-0001").max_concurrent == 1 and ring.lookup("bob-key-00002").max_concurrent is None
    root = ring.lookup("root-key-0003")
    assert root.admin and root.max_concurrent == 8
    assert ring.lookup("alice-key-0001").key_id != ring.lookup("bob-key-00002").key_id
    js = KeyRing.parse(json.dumps([{"key": "k1-xxxxxxx", "owner": "a", "max_concurrent": 3}]))
    assert js.lookup("k1-xxxxxxx").max_concurrent == 3
    for bad in ("k1-xxxxxxx a max_concurrent=0", "k1-xxxxxxx a max_concurrent=x", "k1-xxxxxxx max_concurrent=2",
                json.dumps([{"key": "k1-xxxxxxx", "owner": "a", "max_concurrent": 0}]),
                json.dumps({"k1-xxxxxxx": {"owner": "a", "max_concurrent": True}}),
                json.dumps({"k1-xxxxxxx": {"owner": "a", "max_concurrent": "2"}})):
        with pytest.raises(ValueError, match="max_concurrent"):
            KeyRing.parse(bad)


def test_cli_limit_flags(capsys, tmp_path):
    from kvsift.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-request-seconds", "--max-queue-seconds", "--max-concurrent-per-key", "--max-waiting",
                 "X-Kvsift-Stopped: time-limit", "429"):
        assert flag in out, flag
    missing = str(tmp_path / "no-model")
    for args, msg in ((["--max-request-seconds", "-1"], "max_request_seconds (--max-request-seconds)"),
                      (["--max-queue-seconds", "0"], "max_queue_seconds (--max-queue-seconds)"),
                      (["--max-concurrent-per-key", "0"], "max_concurrent_per_key (--max-concurrent-per-key)")):
        assert main(["serve", *args, "--model", missing, "--no-persist"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvsift: error: ") and msg in err, err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-concurrent-per-key", "two"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_cli_builds_the_limits_into_the_config(tmp_path, monkeypatch):
    import argparse

    import kvsift.models

    from kvsift.server.cli import add_arguments, build_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS)
    args = p.parse_args(["--max-request-seconds", "90", "--max-queue-seconds", "30", "--max-concurrent-per-key", "4",
                         "--api-keys-file", str(keys), "--no-persist"])
    monkeypatch.setattr(kvsift.models, "check_model", lambda name: None)  # no model needed for the config
    cfg = build_config(args)
    assert (cfg.max_request_seconds, cfg.max_queue_seconds, cfg.max_concurrent_per_key) == (90.0, 30.0, 4)
    assert cfg.keys.lookup("alice-key-0001").max_concurrent == 1
