"""Tenants (--api-keys-file), auth of the monitoring endpoints, open binds, idempotent context
creation and the lazy startup (no re-hash of stored contexts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvsift.server.auth import KeyRing, Principal
from kvsift.server.config import ServerConfig

KEYS = "alice-key-0001 alice\nbob-key-00002 bob\n# the operator\nroot-key-0003 ops admin\n"
ALICE, BOB, ROOT = ({"Authorization": f"Bearer {k}"} for k in ("alice-key-0001", "bob-key-00002", "root-key-0003"))


def code(r) -> str:
    return r.json()["error"]["code"]


def test_key_files_parse_in_every_form():
    lines = KeyRing.parse(KEYS)
    assert lines.lookup("alice-key-0001") == Principal("alice") and lines.lookup("root-key-0003").admin
    assert lines.lookup("nope") is None and lines.lookup("") is None and len(lines) == 3
    js = KeyRing.parse(json.dumps([{"key": "k1-xxxxxxx", "owner": "a"}, {"key": "k2-xxxxxxx", "owner": "b",
                                                                        "admin": True}]))
    assert js.lookup("k2-xxxxxxx") == Principal("b", True)
    obj = KeyRing.parse(json.dumps({"k1-xxxxxxx": "a", "k2-xxxxxxx": {"owner": "b"}}))
    assert obj.lookup("k1-xxxxxxx").owner == "a" and obj.lookup("k2-xxxxxxx").owner == "b"
    for bad in ("short a", "k1-xxxxxxx", "k1-xxxxxxx a root", "k1-xxxxxxx a\nk1-xxxxxxx b", "[{\"key\": 1}]",
                "k1-xxxxxxx bad/owner", "{"):
        with pytest.raises(ValueError):
            KeyRing.parse(bad)


def test_contexts_belong_to_their_owner(make_client):
    c = make_client(keys=KeyRing.parse(KEYS))
    doc = {"document": list(range(1000, 1100)), "chat": False}
    a = c.post("/v1/contexts", json=doc, headers=ALICE).json()
    b = c.post("/v1/contexts", json=doc, headers=BOB).json()
    assert a["owner"] == "alice" and b["owner"] == "bob"
    assert [x["id"] for x in c.get("/v1/contexts", headers=ALICE).json()["data"]] == [a["id"]]
    assert {x["id"] for x in c.get("/v1/contexts", headers=ROOT).json()["data"]} == {a["id"], b["id"]}
    # another owner's context is "not found" for every use, exactly like an id that never existed
    ask = {"prompt": [5, 6], "max_tokens": 1, "context_id": a["id"]}
    for r in (c.get(f"/v1/contexts/{a['id']}", headers=BOB), c.delete(f"/v1/contexts/{a['id']}", headers=BOB),
              c.post("/v1/completions", json=ask, headers=BOB)):
        assert r.status_code == 404 and code(r) == "context_not_found", r.text
        assert r.json()["error"]["message"] == f"no context with id {a['id']!r}"
    assert c.post("/v1/completions", json=ask, headers=ALICE).status_code == 200
    assert c.post("/v1/completions", json=ask, headers=ROOT).status_code == 200
    assert c.get(f"/v1/contexts/{a['id']}", headers=ROOT).json()["owner"] == "alice"
    assert c.delete(f"/v1/contexts/{b['id']}", headers=ROOT).status_code == 200
    assert c.get(f"/v1/contexts/{b['id']}", headers=BOB).status_code == 404
    r = c.get("/v1/contexts", headers={"Authorization": "Bearer wrong-key-000"})
    assert r.status_code == 401 and code(r) == "invalid_api_key"


def test_monitoring_needs_a_key_unless_public(make_client):
    c = make_client(keys=KeyRing.parse(KEYS))
    for path in ("/health", "/metrics", "/openapi.json", "/v1/models"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers=BOB).status_code == 200, path
    pub = make_client(api_key="single-key", public_health=True)
    assert pub.get("/health").status_code == 200 and pub.get("/metrics").status_code == 200
    assert pub.get("/openapi.json").status_code == 401 and pub.get("/v1/models").status_code == 401
    models = pub.get("/v1/models", headers={"Authorization": "Bearer single-key"}).json()["data"][0]
    assert set(models) == {"id", "object", "created", "owned_by", "max_model_len", "max_tokens_cap"}  # no paths
    assert pub.post("/v1/contexts", json={"document": [5, 6, 7]},
                    headers={"Authorization": "Bearer single-key"}).json()["owner"] == "default"


def test_non_loopback_bind_needs_a_key_or_insecure(tmp_path):
    for host in ("0.0.0.0", "192.0.2.1", "::"):
        with pytest.raises(ValueError, match="--insecure"):
            ServerConfig(host=host)
        ServerConfig(host=host, api_key="k")
        ServerConfig(host=host, insecure=True)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        ServerConfig(host=host)
    # the CLI refuses before loading any model (exit 2, one line)
    r = subprocess.run([sys.executable, "-m", "kvsift.server", "--host", "0.0.0.0", "--model", str(tmp_path / "none"),
                        "--no-persist"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--insecure" in r.stderr


def test_idempotency_key_returns_the_same_context(make_client, tmp_path):
    c = make_client(keys=KeyRing.parse(KEYS))
    body = {"document": list(range(1000, 1100)), "chat": False}
    first = c.post("/v1/contexts", json=body, headers={**ALICE, "Idempotency-Key": "req-1"})
    again = c.post("/v1/contexts", json=body, headers={**ALICE, "Idempotency-Key": "req-1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert len(c.get("/v1/contexts", headers=ALICE).json()["data"]) == 1
    r = c.post("/v1/contexts", json={**body, "chat": True}, headers={**ALICE, "Idempotency-Key": "req-1"})
    assert r.status_code == 422 and code(r) == "idempotency_key_reused"
    # keys are per owner: bob's req-1 is another context
    other = c.post("/v1/contexts", json=body, headers={**BOB, "Idempotency-Key": "req-1"}).json()
    assert other["id"] != first.json()["id"]
    r = c.post("/v1/contexts", json=body, headers={**ALICE, "Idempotency-Key": "bad key"})
    assert r.status_code == 400 and code(r) == "invalid_idempotency_key"
    # a restart keeps the mapping (it is in the context's metadata)
    d = make_client(keys=KeyRing.parse(KEYS))
    assert d.post("/v1/contexts", json=body, headers={**ALICE, "Idempotency-Key": "req-1"}).json()["id"] == \
        first.json()["id"]
    # deleted: the key is free again
    d.delete(f"/v1/contexts/{first.json()['id']}", headers=ALICE)
    assert d.post("/v1/contexts", json=body, headers={**ALICE, "Idempotency-Key": "req-1"}).json()["id"] != \
        first.json()["id"]


def test_startup_does_not_rehash_stored_contexts(make_client, monkeypatch):
    import kvsift.server.contexts as contexts

    c = make_client()
    ids = [c.post("/v1/contexts", json={"document": list(range(1000 + i, 1100 + i)), "chat": False}).json()["id"]
           for i in range(3)]
    hashed = []
    real = contexts.sha256_file
    monkeypatch.setattr(contexts, "sha256_file", lambda p: hashed.append(p) or real(p))
    d = make_client()  # a restart
    assert hashed == [] and {x["id"] for x in d.get("/v1/contexts").json()["data"]} == set(ids)
    assert d.post("/v1/completions", json={"prompt": [5], "max_tokens": 1, "context_id": ids[0]}).status_code == 200
    assert len(hashed) == 1  # verified once, on first load


def test_corrupted_metadata_is_reported_not_hidden(make_client, tmp_path):
    c = make_client()
    cid = c.post("/v1/contexts", json={"document": [5, 6, 7, 8], "chat": False}).json()["id"]
    (tmp_path / "contexts" / cid / "meta.json").write_text("{ not json")
    d = make_client()
    got = d.get(f"/v1/contexts/{cid}").json()
    assert got["state"] == "corrupted" and "meta.json" in got["error"]["message"]
    r = d.post("/v1/completions", json={"prompt": [5], "max_tokens": 1, "context_id": cid})
    assert r.status_code == 500 and code(r) == "context_corrupted"
    assert d.delete(f"/v1/contexts/{cid}").status_code == 200 and not (tmp_path / "contexts" / cid).exists()
