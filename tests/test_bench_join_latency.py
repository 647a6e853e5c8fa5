"""bench/join_latency.py on a tiny model: every setting (without and with the KV arenas, a joining
prompt all at once or a chunk per step) runs the same requests, answers as alone, and reports the
graphs recorded (none here: static decode on the CPU)."""

from __future__ import annotations

import json

import pytest

from bench import join_latency


def test_join_latency_runs_with_and_without_kv_arenas(tmp_path, default_tokenizer):
    from kvsift.models.tiny import save_tiny_model

    mdir = save_tiny_model(tmp_path / "tiny", seed=1, tokenizer=default_tokenizer)
    out = tmp_path / "j.json"
    rc = join_latency.main(["--model", str(mdir), "--running", "2", "--running-prompt", "40", "--join-prompt", "70",
                            "--max-tokens", "8", "--chunk-size", "32", "--decode-mode", "static", "--arena", "0,1",
                            "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert rc == 0 and [(r["kv_arena"], r["join_chunks"]) for r in rows] == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert all(r["answers_equal_alone"] and r["graphs_recorded"] == 0 and r["itl_max_ms"] >= r["itl_p50_ms"]
               for r in rows)
    assert all(r["arena_loads"] == 0 for r in rows if not r["kv_arena"])
    assert all(r["arena_loads"] >= 1 for r in rows if r["kv_arena"])


@pytest.mark.parametrize("bad", [["--arena", "2"], ["--arena", ""], ["--random-8b", "0"]])
def test_join_latency_rejects_bad_options(bad, capsys):
    with pytest.raises(SystemExit) as e:
        join_latency.main(bad)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


@pytest.mark.parametrize("idle", [False, True])
def test_join_latency_profiles_the_joiners_first_gap(tmp_path, default_tokenizer, capsys, idle):
    """``--profile-gap``: each setting reports the joiner's first gap and the functions that ran in
    it (the engine's step among them), printed and in the JSON; ``--idle-after-join`` (a queue that
    emptied: the engine may prepare the new batch's next step before its first tokens) answers the same."""
    from kvsift.models.tiny import save_tiny_model

    mdir = save_tiny_model(tmp_path / "tiny", seed=1, tokenizer=default_tokenizer)
    out = tmp_path / "j.json"
    rc = join_latency.main(["--model", str(mdir), "--method", "sentencekv", "--budget", "32", "--running", "2",
                            "--running-prompt", "40", "--join-prompt", "70", "--max-tokens", "6",
                            "--chunk-size", "32", "--join-chunks", "1", "--profile-gap", "--out", str(out)]
                           + (["--idle-after-join"] if idle else []))
    rows = json.loads(out.read_text())["results"]
    assert rc == 0 and len(rows) == 1 and rows[0]["answers_equal_alone"] and rows[0]["idle_after_join"] is idle
    r = rows[0]
    assert r["joiner_first_gap_ms"] > 0
    prof = r["first_gap_profile"]
    assert 0 < len(prof) <= 25 and all(f["cum_ms"] >= f["self_ms"] >= 0 and f["calls"] >= 1 for f in prof)
    assert [f["cum_ms"] for f in prof] == sorted((f["cum_ms"] for f in prof), reverse=True)
    assert any("run_batch" in f["function"] for f in prof)   # the engine loop ran within the gap
    joined = r["join_profile"]                                  # the join: the joiner's prefill ran there
    assert 0 < len(joined) <= 25 and any("prefill" in f["function"] for f in joined)
    out = capsys.readouterr().out
    assert "joiner's first gap" in out and "the join (joiner handed over to its first token)" in out
