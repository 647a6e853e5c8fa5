"""Property-based fuzzing of every endpoint (hypothesis): whatever the body, headers or path, the
server answers below 500, and every error has OpenAI's shape with a non-empty ``code``.

Bodies mix valid fields with arbitrary JSON values (huge and negative integers, floats, lone
surrogates, nested junk) and raw bytes. The budget is fixed and derandomized so that CI runs the
same cases in a few seconds; ``KVSIFT_FUZZ_EXAMPLES=2000`` runs a longer search locally."""

from __future__ import annotations

import json
import os
from urllib.parse import quote

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("fastapi")
from kvsift.server.app import create_app  # noqa: E402
from kvsift.server.auth import KeyRing  # noqa: E402
from kvsift.server.config import ServerConfig  # noqa: E402

TestClient = pytest.importorskip("starlette.testclient").TestClient

EXAMPLES = int(os.environ.get("KVSIFT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
KEY = "fuzz-key-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}

# text that includes lone surrogates, control characters and the chat template's special tokens
texts = st.one_of(st.text(max_size=40),
                  st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
                  st.sampled_from(["", " ", "<|im_start|>", "\x00KVSIFT\x00", "25%", "full", "snapkv", "1e309"]))
ints = st.one_of(st.integers(-5, 70), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2**31, 2**63, 2**63 - 1]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
methods = st.sampled_from(["full", "snapkv", "streaming", "pyramidkv", "sentencekv", "snapkv+sentencekv", "nope"])
budgets = st.one_of(st.sampled_from([None, 1, 4, 16, 0.25, 0.5, 1.0, "25%", "1024", 0, -1, 1.5]), json_values)
options = st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["window", "sinks", "recent", "kernel_size", "pooling", "max_chunk", "min_chunk", "summary",
                     "cache_chunks", "decode_budget", "reselect_every", "beta", "bogus"]),
    st.one_of(st.integers(-3, 40), st.sampled_from(["max", "avg", "mean", "quest"]), scalars), max_size=3))
token_lists = st.lists(st.integers(-3, 49160), min_size=0, max_size=40)
prompts = st.one_of(texts.map(lambda s: "hello " + s), texts, token_lists, st.lists(texts, max_size=3),
                    st.lists(token_lists, max_size=3), json_values)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", 5]),
     "content": st.one_of(texts, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                          max_size=2), json_values)}), max_size=3)


def _opt(**fields):
    """A dict with any subset of ``fields`` (each a strategy), plus maybe a junk field."""
    return st.fixed_dictionaries({}, optional={**fields, "extra_junk": json_values})


GEN = dict(max_tokens=st.one_of(st.integers(-1, 6), ints), temperature=st.one_of(st.sampled_from([0, 0.7, 2]), scalars),
           top_p=st.one_of(st.sampled_from([1, 0.9]), scalars), seed=ints, stream=st.one_of(st.booleans(), scalars),
           stop=st.one_of(texts, st.lists(texts, max_size=5)), n=ints, kv_method=methods, kv_budget=budgets,
           kv_options=options, ignore_eos=st.one_of(st.booleans(), scalars), logprobs=scalars,
           stream_options=st.one_of(st.just({"include_usage": True}), json_values), model=st.one_of(
               st.just("tiny-llama"), texts), context_id=st.one_of(st.just("CTX"), texts), response_format=json_values,
           top_logprobs=scalars, user=json_values)
# plausible values only: these mostly get through validation and run the engine
good_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
good_ids = st.lists(st.integers(3, 49000), min_size=1, max_size=60)
GOOD = dict(max_tokens=st.integers(1, 6), temperature=st.sampled_from([0, 0.5, 1.0, 2.0]),
            top_p=st.sampled_from([0.5, 1.0]), seed=st.integers(0, 2**63 - 1), stream=st.booleans(),
            stop=st.lists(good_text, min_size=1, max_size=2), ignore_eos=st.booleans(),
            kv_method=st.sampled_from(["full", "snapkv", "streaming", "pyramidkv", "sentencekv"]),
            kv_budget=st.sampled_from([4, 16, 0.5, "25%", 1.0]), kv_options=options,
            stream_options=st.just({"include_usage": True}), context_id=st.just("CTX"))
GOOD_CHAT = {k: v for k, v in GOOD.items()}
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": good_text}), min_size=1, max_size=3)
BODIES = {
    "/v1/completions": st.one_of(
        st.fixed_dictionaries({"prompt": st.one_of(good_text, good_ids, st.lists(good_text, min_size=1, max_size=2))},
                              optional=GOOD),
        _opt(prompt=prompts, echo=scalars, suffix=scalars, best_of=ints, **GEN)),
    "/v1/chat/completions": st.one_of(
        st.fixed_dictionaries({"messages": good_messages}, optional=GOOD_CHAT),
        _opt(messages=messages, max_completion_tokens=ints, tools=json_values, **GEN)),
    "/v1/contexts": st.one_of(
        st.fixed_dictionaries({"document": st.one_of(good_text, good_ids)},
                              optional={k: GOOD[k] for k in ("kv_method", "kv_budget", "kv_options")} |
                              {"chat": st.booleans(), "persist": st.booleans()}),
        _opt(document=st.one_of(texts.map(lambda s: "doc " + s), token_lists, json_values), kv_method=methods,
             kv_budget=budgets, kv_options=options, chat=scalars, persist=st.one_of(st.booleans(), scalars),
             metadata=json_values, model=texts)),
}


@pytest.fixture(scope="module")
def fuzz_client(tiny_llm, tmp_path_factory):
    cfg = ServerConfig(contexts_dir=tmp_path_factory.mktemp("fuzz-contexts"), keys=KeyRing.parse(f"{KEY} fuzzer"),
                       max_tokens_cap=6, max_body_bytes=64 * 1024, context_memory_bytes=2 * 2**20, max_contexts=10000,
                       contexts_disk_bytes=8 * 2**20)
    with TestClient(create_app(tiny_llm, cfg), raise_server_exceptions=False) as c:
        r = c.post("/v1/contexts", json={"document": list(range(1000, 1100)), "chat": False}, headers=AUTH)
        assert r.status_code == 200, r.text
        c.ctx_id = r.json()["id"]
        yield c


def check(r) -> None:
    """No 5xx; errors are OpenAI-shaped with a code; successes are JSON or SSE with [DONE]."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    hypothesis.event(f"status {r.status_code}")  # pytest --hypothesis-show-statistics: how many got through
    if r.status_code >= 400:
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"}, e
        assert isinstance(e["message"], str) and e["message"] and isinstance(e["code"], str) and e["code"], e
        assert e["param"] is None or isinstance(e["param"], str), e
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for ev in events[:-1]:
            data = json.loads(ev)
            assert "error" not in data or data["error"]["code"] != "internal_error", data
    elif r.headers.get("content-type", "").startswith("application/json"):
        r.json()


def _body(client, body: dict) -> bytes:
    if body.get("context_id") == "CTX":
        body["context_id"] = client.ctx_id
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


def _post(client, path: str, body: dict) -> None:
    check(client.post(path, content=_body(client, body), headers={**AUTH, "content-type": "application/json"}))


@FUZZ
@given(body=BODIES["/v1/completions"])
def test_fuzz_completions(fuzz_client, body):
    _post(fuzz_client, "/v1/completions", body)


@FUZZ
@given(body=BODIES["/v1/chat/completions"])
def test_fuzz_chat_completions(fuzz_client, body):
    _post(fuzz_client, "/v1/chat/completions", body)


@FUZZ
@given(body=BODIES["/v1/contexts"])
def test_fuzz_contexts(fuzz_client, body):
    _post(fuzz_client, "/v1/contexts", body)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
       path=st.one_of(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/contexts", "/v1/models",
                                       "/v1/models/tiny-llama", "/health", "/metrics", "/openapi.json",
                                       "/v1/contexts/CTX", "/v1/contexts/ctx_" + "0" * 32]),
                      st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_/%.-", max_size=30).map(lambda s: "/" + s),
                      st.text(max_size=10).map(lambda s: "/v1/contexts/" + quote(s, safe="", errors="surrogatepass"))),
       content=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()), st.none()),
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", None]),
       auth=st.sampled_from([AUTH, {}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"},
                             {"Authorization": ("Bearer " + "\u00e9" * 3).encode("latin-1")}]))
def test_fuzz_any_request(fuzz_client, method, path, content, ctype, auth):
    headers = dict(auth)
    if ctype is not None:
        headers["content-type"] = ctype
    path = path.replace("CTX", fuzz_client.ctx_id)
    r = fuzz_client.request(method, path, content=content, headers=headers)
    check(r)
    if not auth or auth is not AUTH:
        assert r.status_code in (401, 404, 405), (path, r.status_code, r.text[:200])


@FUZZ
@given(body=BODIES["/v1/contexts"], key=st.one_of(st.text(max_size=8), st.sampled_from(["k1", "k2"])))
def test_fuzz_idempotent_context_creation(fuzz_client, body, key):
    headers = {**AUTH, "content-type": "application/json"}
    if key and key.strip() == key and "\n" not in key and "\r" not in key and all(ord(c) < 256 for c in key):
        headers["Idempotency-Key"] = key.encode("latin-1")  # any header bytes a client could send
    check(fuzz_client.post("/v1/contexts", content=_body(fuzz_client, body), headers=headers))
