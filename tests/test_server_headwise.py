"""The head-wise and wrapper methods through the server: a context made with each answers
questions, persists with its per-head lengths, and a bad spec is a 400 before any compute."""

import pytest


@pytest.mark.parametrize("spec,opts", [("adakv(h2o)", {}), ("duo", {"sinks": 4, "recent": 28}),
                                       ("decoding(tova)", {"interval": 4})])
def test_contexts_and_completions_with_head_wise_methods(make_client, spec, opts):
    c = make_client()
    r = c.post("/v1/contexts", json={"document": list(range(1000, 1200)), "kv_method": spec, "kv_budget": 0.25,
                                     "kv_options": opts, "chat": False})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["kv_method"] == spec and rec["persisted"]
    out = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True,
                                          "context_id": rec["id"]})
    assert out.status_code == 200, out.text
    stats = out.json()["kvsift"]["stats"][0]
    assert stats["kv_kept_bytes"] < 0.5 * stats["kv_full_bytes"]
    direct = c.post("/v1/completions", json={"prompt": list(range(1000, 1200)), "max_tokens": 3, "ignore_eos": True,
                                             "kv_method": spec, "kv_budget": 0.25, "kv_options": opts})
    assert direct.status_code == 200, direct.text


def test_bad_wrapper_specs_are_400(make_client):
    c = make_client()
    for spec, word in [("adakv(quest)", "wraps a scorer"), ("adakv(snapkv)+quest", "does not compose"),
                       ("adakv(nope)", "unknown method"), ("adakv(snapkv", "unbalanced")]:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "kv_method": spec, "kv_budget": 0.25})
        assert r.status_code == 400, (spec, r.text)
        assert word in r.json()["error"]["message"], (spec, r.text)
