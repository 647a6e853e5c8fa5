"""The OpenAI-compatible server, end to end: a real server process on loopback (tiny random-weight
model saved as an HF directory), called with the openai client and httpx."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from kvsift.server.testing import ServerProcess  # noqa: E402

KEY = "test-key-123"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    from kvsift.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer=default_tokenizer, seed=1,
                           max_positions=8192)  # long enough that a cancelled decode could not finish first


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    ctx_dir = tmp_path_factory.mktemp("contexts")
    with ServerProcess(["--model", str(tiny_dir), "--api-key", KEY, "--contexts-dir", str(ctx_dir),
                        "--max-body", "256K", "--chunk-size", "64"]) as srv:
        srv.contexts_dir = ctx_dir
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body=None, *, content=None, headers=HEADERS, timeout=60):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=timeout)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=HEADERS, timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"metric {name} missing"
    return float(m.group(1))


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def sse_events(r: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


def test_health_models_and_auth(server, client):
    h = httpx.get(server.url + "/health", headers=HEADERS, timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    for path in ("/health", "/metrics", "/openapi.json"):  # with a key configured, these need one too
        assert_error(httpx.get(server.url + path, timeout=10), 401, "invalid_api_key")
    assert httpx.get(server.url + "/openapi.json", headers=HEADERS, timeout=10).json()["info"]["title"] == "kvsift"
    assert "root" not in client.models.list().data[0].model_extra  # no file paths
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert_error(httpx.get(server.url + "/v1/models", timeout=10), 401, "invalid_api_key")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)


def test_completion_and_chat_streaming_match(server, client):
    kw = dict(model="tiny-llama", max_tokens=8, temperature=0)
    full = client.completions.create(prompt="The cat sat on the mat", **kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("stop", "length")
    u = full.usage
    assert u.completion_tokens >= 1 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    chunks = list(client.completions.create(prompt="The cat sat on the mat", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason

    msgs = [{"role": "user", "content": "Tell me about cats."}]
    chat = client.chat.completions.create(messages=msgs, **kw)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    # the raw SSE framing: data lines, the last one [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=HEADERS, timeout=60,
                      json={"messages": msgs, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_kv_method_and_budget_per_request(server, client):
    prompt = list(range(1000, 1200))  # 200 token ids
    base = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4, temperature=0)
    snap = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4, temperature=0,
                                     extra_body={"kv_method": "snapkv", "kv_budget": 32, "kv_options": {"window": 8}})
    ext_base, ext_snap = base.model_extra["kvsift"], snap.model_extra["kvsift"]
    assert ext_base["kv_method"] == "full" and ext_snap["kv_method"] == "snapkv" and ext_snap["kv_budget"] == 32
    kept, full = ext_snap["stats"][0]["kv_kept_bytes"], ext_snap["stats"][0]["kv_full_bytes"]
    assert kept == pytest.approx(full * 32 / 200, rel=0.01)
    assert ext_base["stats"][0]["kv_kept_bytes"] == ext_base["stats"][0]["kv_full_bytes"]
    stream = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                       extra_body={"kv_method": "streaming", "kv_budget": "25%"})
    assert sum(1 for c in stream if c.choices and c.choices[0].finish_reason) == 1


BAD = [
    # (body or raw bytes, status, code, param)
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_body", None),
    ({"model": "tiny-llama"}, 400, None, "prompt"),
    ({"model": "gpt-17", "prompt": "x"}, 404, "model_not_found", "model"),
    ({"prompt": "x", "kv_method": "nope"}, 400, "unknown_kv_method", "kv_method"),
    ({"prompt": "x", "kv_method": "snapkv"}, 400, "invalid_kv_budget", "kv_budget"),
    ({"prompt": "x", "kv_method": "snapkv", "kv_budget": 0}, 400, "invalid_kv_budget", "kv_budget"),
    ({"prompt": "x", "kv_method": "snapkv", "kv_budget": 1.5}, 400, "invalid_kv_budget", "kv_budget"),
    ({"prompt": "x", "kv_method": "snapkv", "kv_budget": "lots"}, 400, "invalid_kv_budget", "kv_budget"),
    ({"prompt": [5, 6, 7], "kv_method": "snapkv", "kv_budget": 500}, 400, "invalid_kv_budget", "kv_budget"),
    ({"prompt": "x", "kv_options": {"no_such_option": 1}, "kv_method": "snapkv", "kv_budget": 4}, 400,
     "invalid_kv_options", "kv_options"),
    ({"prompt": "x", "kv_buget": 4}, 400, None, None),
    ({"prompt": list(range(10, 8300))}, 400, "context_length_exceeded", "prompt"),
    ({"prompt": [1, 2, 10**9]}, 400, "invalid_token_id", "prompt"),
    ({"prompt": "x", "context_id": "ctx_" + "0" * 32}, 404, "context_not_found", "context_id"),
    ({"prompt": "x", "context_id": "../../etc/passwd"}, 404, "context_not_found", "context_id"),
    ({"prompt": "x", "max_tokens": 0}, 400, None, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, 400, None, "temperature"),
    ({"prompt": "x", "n": 2}, 400, None, "n"),
    ({"prompt": ""}, 400, None, "prompt"),
]


@pytest.mark.parametrize("body,status,code,param", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_gets_openai_error(server, body, status, code, param):
    if isinstance(body, bytes):
        r = post(server, "/v1/completions", content=body, headers={**HEADERS, "content-type": "application/json"})
    else:
        r = post(server, "/v1/completions", body)
    assert_error(r, status, code, param)


def test_more_bad_input_and_server_stays_up(server, client):
    assert_error(post(server, "/v1/completions", content=b"x" * (300 * 1024)), 413, "request_too_large")
    assert_error(post(server, "/v1/chat/completions", {"messages": []}), 400, None, "messages")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(post(server, "/v1/contexts", {"document": "", "kv_method": "full"}), 400, None, "document")
    assert_error(post(server, "/v1/contexts", {"document": list(range(10, 8300))}), 400, "context_length_exceeded")
    assert_error(httpx.get(server.url + "/v1/contexts/ctx_nope", headers=HEADERS, timeout=10), 404,
                 "context_not_found")
    assert_error(httpx.delete(server.url + "/v1/contexts/ctx_" + "1" * 32, headers=HEADERS, timeout=10), 404)
    assert_error(httpx.get(server.url + "/v1/nothing-here", headers=HEADERS, timeout=10), 404)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    # errors did not hurt the server
    out = client.completions.create(model="tiny-llama", prompt="still alive", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def _raw_upload(url: str, nbytes: int, chunked: bool) -> tuple[str | None, bytes]:
    """Send a body of ``nbytes`` over a plain socket (as curl or requests would: all of it, then read
    the answer). Returns (the send error if any, the answer's status line); a reset raises."""
    host, port = url.split("//")[1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % nbytes
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n")
    piece, sent, send_error = 65536, 0, None
    try:
        while sent < nbytes:
            s.sendall(b"%x\r\n%s\r\n" % (piece, b"x" * piece) if chunked else b"x" * piece)
            sent += piece
        if chunked:
            s.sendall(b"0\r\n\r\n")
    except OSError as e:
        send_error = str(e)
    data = b""
    with s:
        while chunk := s.recv(65536):
            data += chunk
    return send_error, data.split(b"\r\n")[0]


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_upload_over_the_limit_gets_a_readable_413(server, chunked):
    """A body past --max-body, streamed without Content-Length (chunked) or with it: the client gets
    to send it and reads a 413; its connection is not reset under it (bug 6 of issue #17)."""
    for mb in (1, 8):
        send_error, status = _raw_upload(server.url, mb * 2**20, chunked)
        assert send_error is None and status == b"HTTP/1.1 413 Request Entity Too Large", (mb, send_error, status)
    r = httpx.post(server.url + "/v1/completions", content=(b"x" * 65536 for _ in range(16)), timeout=30,
                   headers={**HEADERS, "content-type": "application/json"})
    assert_error(r, 413, "request_too_large")
    assert httpx.get(server.url + "/health", headers=HEADERS, timeout=10).status_code == 200


def test_context_reuse_skips_prefill_and_matches_full_prompt(server, client):
    doc = list(range(2000, 2300))        # 300 document tokens
    question = list(range(3000, 3010))   # 10 question tokens
    r = post(server, "/v1/contexts", {"document": doc, "kv_method": "full", "chat": False, "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text
    ctx = r.json()
    assert ctx["id"].startswith("ctx_") and ctx["tokens"] == 300 and ctx["persisted"] and ctx["metadata"] == {"k": "v"}
    with_ctx = client.completions.create(model="tiny-llama", prompt=question, max_tokens=6, temperature=0,
                                         extra_body={"context_id": ctx["id"]})
    plain = client.completions.create(model="tiny-llama", prompt=doc + question, max_tokens=6, temperature=0)
    assert with_ctx.choices[0].text == plain.choices[0].text
    stats = with_ctx.model_extra["kvsift"]["stats"][0]
    assert stats["prompt_tokens"] == 10  # only the question was prefilled
    assert with_ctx.usage.prompt_tokens == 310 and with_ctx.usage.prompt_tokens_details.cached_tokens == 300

    got = httpx.get(server.url + f"/v1/contexts/{ctx['id']}", headers=HEADERS, timeout=10).json()
    assert got["id"] == ctx["id"] and got["tokens"] == 300
    listed = httpx.get(server.url + "/v1/contexts", headers=HEADERS, timeout=10).json()["data"]
    assert ctx["id"] in [c["id"] for c in listed]
    d = httpx.delete(server.url + f"/v1/contexts/{ctx['id']}", headers=HEADERS, timeout=10)
    assert d.json() == {"id": ctx["id"], "object": "context.deleted", "deleted": True}
    assert_error(httpx.get(server.url + f"/v1/contexts/{ctx['id']}", headers=HEADERS, timeout=10), 404)
    assert_error(post(server, "/v1/completions", {"prompt": question, "context_id": ctx["id"]}), 404,
                 "context_not_found")


def test_compressed_chat_context(server, client):
    doc = "The lighthouse keeper wrote the code 4721 in the logbook. " * 20
    r = post(server, "/v1/contexts", {"document": doc, "kv_method": "snapkv", "kv_budget": 0.25})
    assert r.status_code == 200, r.text
    ctx = r.json()
    assert ctx["chat"] is True and ctx["kv_method"] == "snapkv"
    out = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Which code?"}],
                                         max_tokens=5, temperature=0, extra_body={"context_id": ctx["id"]})
    stats = out.model_extra["kvsift"]["stats"][0]
    assert out.usage.prompt_tokens_details.cached_tokens == ctx["tokens"]
    assert stats["prompt_tokens"] < 30  # the question and the assistant opener, not the document
    # a quarter of the document's KV was kept
    assert stats["kv_kept_bytes"] < 0.4 * stats["kv_full_bytes"]
    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Which code?"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            extra_body={"context_id": ctx["id"]})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == out.choices[0].message.content
    bad = post(server, "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}],
                                                "context_id": ctx["id"]})
    assert_error(bad, 400, "invalid_messages")


def test_client_disconnect_cancels_generation(server):
    cancelled = 'kvsift_generations_total{reason="cancelled"}'
    cancelled0 = metric(server, cancelled)
    tokens0 = metric(server, "kvsift_generation_tokens_total")
    body = {"prompt": "Once upon a time", "max_tokens": 8000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body, headers=HEADERS) as r:
            assert r.status_code == 200
            # its first tokens have come: the decode loop runs (a client that leaves before the
            # first token ends the request "cancelled" with none, which says nothing of the loop)
            lines = r.iter_lines()   # held open: a closed line iterator would close the response
            assert next(line for line in lines if line.startswith("data: "))
            deadline = time.monotonic() + 30
            while metric(server, "kvsift_requests_running") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(server, "kvsift_requests_running") == 1
            # a second stream waits in the queue; its client leaves before it ever runs (a seeded
            # sample runs alone: it does not join the running batch)
            with httpx.Client(timeout=30) as c2:
                with c2.stream("POST", server.url + "/v1/completions", json={**body, "temperature": 0.5, "seed": 1},
                               headers=HEADERS) as r2:
                    assert r2.status_code == 200
                    assert metric(server, "kvsift_requests_waiting") == 1
            deadline = time.monotonic() + 10
            while metric(server, "kvsift_requests_waiting") > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(server, "kvsift_requests_waiting") == 0
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (metric(server, "kvsift_requests_running") > 0 or
                                           metric(server, cancelled) == cancelled0):
        time.sleep(0.05)
    assert metric(server, cancelled) == cancelled0 + 1
    assert metric(server, "kvsift_requests_running") == 0
    assert 0 < metric(server, "kvsift_generation_tokens_total") - tokens0 < 8000  # the decode loop stopped early
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, headers=HEADERS, timeout=1.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and metric(server, cancelled) < cancelled0 + 2:
        time.sleep(0.05)
    assert metric(server, cancelled) == cancelled0 + 2
    assert httpx.get(server.url + "/health", headers=HEADERS, timeout=10).json()["running"] == 0


def test_concurrent_streams_all_complete(server, client):
    n, prompts = 16, ["Request one says", "The second request", "A third one", "Number four is here"]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i):
        try:
            s = client.completions.create(model="tiny-llama", prompt=prompts[i % 4], max_tokens=5,
                                          temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in s if c.choices)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and sorted(results) == list(range(n))
    refs = [client.completions.create(model="tiny-llama", prompt=p, max_tokens=5, temperature=0).choices[0].text
            for p in prompts]
    assert len(set(refs)) > 1  # the prompts give different answers, so a mix-up would show
    for i in range(n):  # each stream got the answer to its own prompt
        assert results[i] == refs[i % 4]
    assert metric(server, "kvsift_requests_waiting") == 0 and metric(server, "kvsift_requests_running") == 0


def test_metrics_exposition(server, client):
    before = metric(server, "kvsift_generation_tokens_total")
    client.completions.create(model="tiny-llama", prompt="count me", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    assert metric(server, "kvsift_generation_tokens_total") == before + 3
    text = httpx.get(server.url + "/metrics", headers=HEADERS, timeout=10).text
    for name in ("kvsift_requests_running", "kvsift_requests_waiting", "kvsift_prompt_tokens_total",
                 'kvsift_kv_bytes{location="device",pool="contexts"}',
                 'kvsift_kv_bytes{location="host",pool="contexts"}',
                 'kvsift_request_latency_seconds_bucket{endpoint="/v1/completions",le="+Inf"}',
                 "kvsift_time_to_first_token_seconds_count", "kvsift_time_per_output_token_seconds_count",
                 "kvsift_queue_wait_seconds_count", "kvsift_prefill_seconds_count"):
        assert name in text, name
    assert metric(server, 'kvsift_request_latency_seconds_count{endpoint="/v1/completions"}') >= 1


def _ask(server, cid: str) -> dict:
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "What did the keeper write?"}],
                                              "max_tokens": 8, "temperature": 0, "context_id": cid})
    assert r.status_code == 200, r.text
    return r.json()


def test_restart_keeps_context(server):
    """Create a compressed context, restart the server on the same contexts directory: the context is
    listed again, loads from disk on first use and gives the same answer."""
    doc = " ".join(f"Entry {i}: the keeper wrote {i * 37 % 1000} in the logbook." for i in range(30))
    r = post(server, "/v1/contexts", {"document": doc, "kv_method": "snapkv", "kv_budget": 0.3}, timeout=120)
    assert r.status_code == 200, r.text
    ctx = r.json()
    assert ctx["persisted"] and ctx["tokens"] > 300
    first = _ask(server, ctx["id"])
    assert metric(server, 'kvsift_kv_bytes{location="device",pool="contexts"}') > 0
    # a sentencekv context: its chunks live in a host store, persisted with its kv_options
    r = post(server, "/v1/contexts", {"document": doc, "kv_method": "sentencekv", "kv_budget": 128,
                                      "kv_options": {"recent": 16, "max_chunk": 16}}, timeout=120)
    assert r.status_code == 200, r.text
    sctx = r.json()
    assert sctx["persisted"], sctx
    s_first = _ask(server, sctx["id"])
    ctx_dir = server.contexts_dir
    assert json.loads((ctx_dir / ctx["id"] / "meta.json").read_text())["tokens"] == ctx["tokens"]
    # beside it: a corrupted copy and an interrupted write, which the restarted server skips / removes
    bad_id = "ctx_" + "f" * 32
    shutil.copytree(ctx_dir / ctx["id"], ctx_dir / bad_id)
    with open(ctx_dir / bad_id / "kv.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    (ctx_dir / ".tmp-ctx_half-written").mkdir()
    known = {c["id"] for c in httpx.get(server.url + "/v1/contexts", headers=HEADERS, timeout=10).json()["data"]}

    server.restart()
    got = httpx.get(server.url + f"/v1/contexts/{ctx['id']}", headers=HEADERS, timeout=10).json()
    assert got["persisted"] and not got["loaded"] and got["tokens"] == ctx["tokens"]
    listed = {c["id"] for c in httpx.get(server.url + "/v1/contexts", headers=HEADERS, timeout=10).json()["data"]}
    # startup reads metadata only (no re-hash): the damaged copy is listed, and refused on first use
    assert ctx["id"] in listed and bad_id in listed and listed <= known | {bad_id}
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                              "context_id": bad_id})
    assert "checksum" in assert_error(r, 500, "context_corrupted", "context_id")["message"]
    bad = httpx.get(server.url + f"/v1/contexts/{bad_id}", headers=HEADERS, timeout=10).json()
    assert bad["state"] == "corrupted" and bad["error"]["code"] == "context_corrupted"
    again = _ask(server, ctx["id"])
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert again["usage"] == first["usage"]
    assert again["kvsift"]["stats"][0]["kv_kept_bytes"] == first["kvsift"]["stats"][0]["kv_kept_bytes"]
    assert httpx.get(server.url + f"/v1/contexts/{ctx['id']}", headers=HEADERS, timeout=10).json()["loaded"]
    assert not (ctx_dir / ".tmp-ctx_half-written").exists()
    s_again = _ask(server, sctx["id"])
    assert s_again["choices"][0]["message"]["content"] == s_first["choices"][0]["message"]["content"]
    assert s_again["kvsift"]["stats"][0]["kv_host_bytes"] == s_first["kvsift"]["stats"][0]["kv_host_bytes"] > 0
