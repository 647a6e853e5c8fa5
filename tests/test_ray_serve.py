"""``kvsift serve --replicas 2``: two engine replicas of a tiny random-weight model on a local Ray
Serve, behind one endpoint on loopback (a real ``kvsift serve`` process: it starts Ray and stops it
on SIGTERM). Checked: the answers are the single-process server's (same tokens), requests spread
over both replicas, questions on a context go to its holder, killing the holder (SIGKILL of its
process) loses no request (the other replica loads the context from the shared directory and
answers), errors keep OpenAI's shapes. The bad-input checks of the command run without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kvsift.server.testing import ServerProcess

KEY = "test-key-123"
HEADERS = {"Authorization": f"Bearer {KEY}"}
TENANT_KEY = "tenant-key-456"  # not an admin
REPLICA = "x-kvsift-replica"
ROOT = Path(__file__).resolve().parent.parent


def _ray_missing() -> str | None:
    spec = importlib.util.find_spec("ray")  # without importing it into the test process
    if spec is None or not any((Path(p) / "serve").is_dir() for p in spec.submodule_search_locations or []):
        return "Ray Serve is not installed: pip install 'kvsift[ray]'"
    return None


needs_ray = pytest.mark.skipif(_ray_missing() is not None, reason=_ray_missing() or "")


# ---- the command's bad input (no Ray started) --------------------------------------------------------------
@pytest.mark.parametrize("args,block_ray,message", [
    (["--replicas", "0"], False, "--replicas must be >= 1, got 0"),
    (["--replicas", "-2"], False, "--replicas must be >= 1, got -2"),
    (["--ray-address", " "], False, "--ray-address must not be empty"),
    (["--ray-address", "127.0.0.1:1"], False, "cannot reach the Ray cluster at --ray-address 127.0.0.1:1"),
    (["--ray-address", "auto"], True, "--ray-address needs Ray Serve, which is not installed"),
    (["--replicas", "2"], True, "--replicas needs Ray Serve, which is not installed"),
])
def test_bad_replica_options_exit_2_before_loading(args, block_ray, message, monkeypatch, capsys):
    from kvsift.cli import main

    if block_ray:
        monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    # an unknown model: anything that got past these checks would fail on it instead
    assert main(["serve", "--model", "no-such-model-anywhere", *args]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("kvsift: error: ") and message in line, line
    if block_ray:
        assert line.endswith("(pip install 'kvsift[ray]')")  # the install command
    assert "ray" not in sys.modules or sys.modules["ray"] is None  # Ray was not even imported (or is blocked)


# ---- two replicas on a local Ray Serve -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    from kvsift.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer=default_tokenizer, seed=1,
                           max_positions=8192)


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    if _ray_missing():
        pytest.skip(_ray_missing())
    ctx_dir = tmp_path_factory.mktemp("shared-contexts")
    keys = ctx_dir.parent / "keys.txt"
    keys.write_text(f"{KEY} ops admin\n{TENANT_KEY} bob\n")
    srv = ServerProcess(["--model", str(tiny_dir), "--replicas", "2", "--api-keys-file", str(keys),
                         "--contexts-dir", str(ctx_dir),
                         "--chunk-size", "64", "--max-body", "256K"], start_timeout=300, stop_timeout=60)
    try:
        srv.start()
        yield srv
    finally:
        code = srv.stop()  # SIGTERM: the command stops Serve and its local Ray
        srv._tmp.cleanup()
    assert code == 0, srv.log()


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """The single-process server (the same app, in process) over the same model."""
    from starlette.testclient import TestClient

    from kvsift import LLM
    from kvsift.server.app import create_app
    from kvsift.server.config import ServerConfig

    app = create_app(LLM(str(tiny_dir), chunk_size=64),
                     ServerConfig(api_key=KEY, contexts_dir=tmp_path_factory.mktemp("ref-contexts")))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def post(srv, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=HEADERS, timeout=timeout)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


def replicas(srv) -> dict[str, dict]:
    r = httpx.get(srv.url + "/v1/replicas", headers=HEADERS, timeout=30)
    return {x["id"]: x for x in ok(r)["data"]}


COMPLETION = {"prompt": "Once upon a time, in a village by the sea,", "max_tokens": 12, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "Name three birds of the coast."}], "max_tokens": 12,
        "temperature": 0}
DOCUMENT = ("The key to the old chapel is kept under the blue stone by the well. On Sundays the baker holds it, "
            "and the mayor has a copy in the town hall. ") * 6
QUESTION = {"messages": [{"role": "user", "content": "Where is the key to the old chapel kept?"}], "max_tokens": 10,
            "temperature": 0}


@needs_ray
def test_same_tokens_as_one_process_server(cluster, reference):
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        got, want = ok(post(cluster, path, body)), ok(reference.post(path, json=body, headers=HEADERS))
        key = "text" if path == "/v1/completions" else "message"
        assert got["choices"][0][key] == want["choices"][0][key]
        assert got["usage"] == want["usage"] and got["usage"]["completion_tokens"] == 12
    # a stream through the ingress: the same text, event by event, then [DONE]
    with httpx.stream("POST", cluster.url + "/v1/chat/completions", json=dict(CHAT, stream=True), headers=HEADERS,
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[REPLICA]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == ok(reference.post("/v1/chat/completions", json=CHAT, headers=HEADERS))["choices"][0]["message"][
        "content"]


@needs_ray
def test_requests_spread_over_both_replicas(cluster, reference):
    body = dict(COMPLETION, max_tokens=48, ignore_eos=True)
    want = ok(reference.post("/v1/completions", json=body, headers=HEADERS))["choices"][0]["text"]
    before = {k: v["requests"] for k, v in replicas(cluster).items()}
    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda _: post(cluster, "/v1/completions", body), range(6)))
    assert all(ok(r)["choices"][0]["text"] == want for r in rs)  # every one answered, the same tokens
    served = [r.headers[REPLICA] for r in rs]
    assert len(set(served)) == 2, served  # least loaded: concurrent requests go to both
    after = replicas(cluster)
    assert len(after) == 2 and all(x["state"] == "serving" and x["device"] == "cpu" for x in after.values())
    for rid in set(served):  # the ingress's counts agree with the headers
        assert after[rid]["requests"] - before.get(rid, 0) >= served.count(rid)


@needs_ray
def test_context_affinity_then_failover(cluster, reference):
    created = post(cluster, "/v1/contexts", {"document": DOCUMENT})
    ctx = ok(created)
    holder = created.headers[REPLICA]
    assert ctx["persisted"] is True and (Path(cluster.args[cluster.args.index("--contexts-dir") + 1]) / ctx["id"]).is_dir()
    ref_ctx = ok(reference.post("/v1/contexts", json={"document": DOCUMENT}, headers=HEADERS))
    want = ok(reference.post("/v1/chat/completions", json=dict(QUESTION, context_id=ref_ctx["id"]),
                             headers=HEADERS))["choices"][0]["message"]["content"]
    ask = dict(QUESTION, context_id=ctx["id"])
    # concurrent questions (which least-loaded routing spreads, see above) all go to the holder
    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda _: post(cluster, "/v1/chat/completions", ask), range(6)))
    for r in rs:
        out = ok(r)
        assert r.headers[REPLICA] == holder
        assert out["choices"][0]["message"]["content"] == want
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == ctx["tokens"]
    got = httpx.get(f"{cluster.url}/v1/contexts/{ctx['id']}", headers=HEADERS, timeout=30)
    assert ok(got)["id"] == ctx["id"] and got.headers[REPLICA] == holder
    other = httpx.post(cluster.url + "/v1/chat/completions", json=ask, timeout=60,
                       headers={"Authorization": f"Bearer {TENANT_KEY}"})
    assert_error(other, 404, "context_not_found", "context_id")  # another owner's context, as with one process
    table = replicas(cluster)
    assert table[holder]["contexts"] >= 1

    # failover: long questions in flight on the holder, then its process is killed (SIGKILL)
    long_ask = dict(ask, max_tokens=400, ignore_eos=True)
    long_want = ok(post(cluster, "/v1/chat/completions", long_ask))["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(3) as pool, httpx.stream("POST", cluster.url + "/v1/chat/completions", headers=HEADERS,
                                                     json=dict(long_ask, stream=True), timeout=120) as stream:
        assert stream.headers[REPLICA] == holder
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")  # under way
        futures = [pool.submit(post, cluster, "/v1/chat/completions", long_ask) for _ in range(3)]
        time.sleep(0.5)
        assert not any(f.done() for f in futures), "the questions ended before the kill: make them longer"
        os.kill(table[holder]["pid"], signal.SIGKILL)
        rs = [f.result() for f in futures]
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    # the stream had sent bytes, so it is not sent again: it ends with an OpenAI-shaped error, then [DONE]
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "replica_failed", rest[-3:]
    for r in rs:  # no request lost: answered by the other replica, from the context it loaded from disk
        out = ok(r)
        assert r.headers[REPLICA] != holder
        assert out["choices"][0]["message"]["content"] == long_want
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == ctx["tokens"]
    new_holder = rs[0].headers[REPLICA]
    after = ok(post(cluster, "/v1/chat/completions", ask))
    assert after["choices"][0]["message"]["content"] == want
    table = replicas(cluster)
    assert table[holder]["state"] == "gone" and table[new_holder]["state"] == "serving"
    # the new holder answers for it from now on, and deletes it for everyone
    d = httpx.delete(f"{cluster.url}/v1/contexts/{ctx['id']}", headers=HEADERS, timeout=30)
    assert ok(d)["deleted"] is True and d.headers[REPLICA] == new_holder
    assert_error(post(cluster, "/v1/chat/completions", ask), 404, "context_not_found", "context_id")


@needs_ray
def test_errors_keep_openai_shapes(cluster):
    assert_error(post(cluster, "/v1/completions", dict(COMPLETION, max_tokens="12")), 400, "invalid_value",
                 "max_tokens")
    assert_error(post(cluster, "/v1/completions", dict(COMPLETION, kv_method="nope")), 400, "unknown_kv_method",
                 "kv_method")
    assert_error(post(cluster, "/v1/chat/completions", dict(QUESTION, model="other")), 404, "model_not_found")
    missing = "ctx_" + "0" * 32
    assert_error(post(cluster, "/v1/chat/completions", dict(QUESTION, context_id=missing)), 404,
                 "context_not_found", "context_id")
    assert_error(httpx.get(f"{cluster.url}/v1/contexts/{missing}", headers=HEADERS, timeout=30), 404,
                 "context_not_found")
    r = httpx.post(cluster.url + "/v1/completions", content=b"{not json", headers=dict(HEADERS, **{
        "content-type": "application/json"}), timeout=30)
    assert_error(r, 400, "invalid_json")
    # refused by the ingress itself, before any replica: no key, a body over --max-body
    assert_error(httpx.post(cluster.url + "/v1/completions", json=COMPLETION, timeout=30), 401, "invalid_api_key")
    assert_error(httpx.get(cluster.url + "/v1/replicas", timeout=30), 401, "invalid_api_key")
    assert_error(httpx.get(cluster.url + "/v1/replicas", headers={"Authorization": f"Bearer {TENANT_KEY}"},
                           timeout=30), 403, "admin_key_required")
    big = dict(COMPLETION, prompt="x" * (300 * 1024))
    assert_error(post(cluster, "/v1/completions", big), 413, "request_too_large")


@needs_ray
def test_client_leaving_cancels_on_the_replica(cluster):
    """A client that gives up cancels its generation on the replica (through the ingress), as with
    one process: ``kvsift_generations_total{reason="cancelled"}`` of the replicas goes up."""
    def cancelled() -> dict[str, float]:
        seen: dict[str, float] = {}
        for _ in range(16):  # /metrics is one replica's: ask until both answered
            r = httpx.get(cluster.url + "/metrics", headers=HEADERS, timeout=30)
            m = re.search(r'^kvsift_generations_total\{reason="cancelled"\} (\S+)$', r.text, re.M)
            seen[r.headers[REPLICA]] = float(m.group(1)) if m else 0.0
        return seen

    before = cancelled()
    with pytest.raises(httpx.TimeoutException):
        post(cluster, "/v1/completions", dict(COMPLETION, max_tokens=4000, ignore_eos=True), timeout=1.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = cancelled()
        if sum(after.values()) > sum(before.get(k, 0.0) for k in after):
            break
        time.sleep(0.5)
    assert sum(after.values()) == sum(before.get(k, 0.0) for k in after) + 1, (before, after)
