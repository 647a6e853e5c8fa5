"""bench/serve_load.py end to end at a toy size: it starts a server per --max-batch value on
loopback (and stops it), runs concurrent streaming clients and writes its JSON report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_serve_load_runs_and_reports(tmp_path, default_tokenizer, capsys):
    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "load.json"
    rc = mod.main(["--clients", "3", "--requests", "1", "--prompt-tokens", "64,48", "--max-tokens", "24",
                   "--max-batch", "1,4", "--chunk-size", "64", "--continuous", "both", "--join-chunks", "0,1",
                   "--max-batched-tokens", "64", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert report["prompt_tokens"] == [64, 48]
    assert [(r["max_batch"], r["continuous"], r["join_chunks"]) for r in rows] == [
        (1, False, None), (4, False, None), (4, True, 0), (4, True, 1)]
    for r in rows:
        assert r["max_batched_tokens"] == 64                  # each server started with it (a bad value exits)
        assert r["errors"] == [] and r["requests"] == 3 and r["tokens"] == 3 * 24
        assert r["throughput_tok_s"] > 0 and r["ttft_p50_ms"] is not None and r["itl_p99_ms"] is not None
        assert r["gpu_peak_gib"] is None                      # a CPU server reports no device memory
    # changes of a running batch's rows, from the server's kvsift_batch_rebuild_seconds: a join
    # counts as one only when rows were still running when the joiner's rows went in (with a prefill
    # in chunks the first request may have finished by then: joined, no rebuild). 24 new tokens, not
    # 4: a full CI run once saw no join at all, the third client's request arriving after the first
    # batch had ended (4 tokens of the tiny model take tens of milliseconds); 24 keep rows running
    # six times longer, and the test takes the same 18 s here
    for r in rows:
        if r["rebuilds"]:
            assert r["joined"] and r["rebuild_mean_ms"] > 0 and r["rebuild_max_ms"] >= r["rebuild_mean_ms"]
        else:
            assert r["rebuild_mean_ms"] is None
    assert any(r["joined"] for r in rows) and any(r["rebuilds"] for r in rows)
    assert rows[0]["batches"] == 3 and rows[0]["requests_per_batch"] == 1.0  # max-batch 1: one at a time
    assert 1 <= rows[1]["batches"] <= 3
    table = capsys.readouterr().out
    assert "max-batch" in table and "TTFT p50 ms" in table and "rebuild ms mean/max" in table


def test_serve_load_rejects_bad_lists_before_starting_a_server(capsys):
    import pytest

    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for flag, value, msg in (("--max-batched-tokens", "8", "values must be >= 16"),
                             ("--max-batched-tokens", "x", "comma-separated integers"),
                             ("--join-chunk-size", "4", "values must be >= 16"),
                             ("--join-order", "fifo", "must be together, fcfs or shortest"),
                             ("--kv-options", "[1]", "must be a JSON object"),
                             ("--kv-options", "{x", "must be a JSON object"),
                             ("--warmup-clients", "-1", "--warmup-clients must be")):
        with pytest.raises(SystemExit) as e:
            mod.main(["--clients", "2", flag, value])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_serve_load_runs_each_setting_with_and_without_kv_arenas(tmp_path, default_tokenizer):
    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "load.json"
    rc = mod.main(["--clients", "2", "--requests", "1", "--prompt-tokens", "40", "--max-tokens", "3",
                   "--max-batch", "4", "--kv-arena", "both", "--warmup-clients", "2", "--join-order", "shortest",
                   "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["kv_arena"] for r in rows] == [False, True]   # a server started each way (a bad flag exits)
    assert [r["join_order"] for r in rows] == ["shortest", "shortest"]
    assert all(r["errors"] == [] and r["tokens"] == 2 * 3 for r in rows)   # the warm-up requests not counted
    assert all(r["warmup"]["clients"] == 2 and r["warmup"]["errors"] == 0 and r["warmup"]["wall_s"] > 0
               for r in rows)


def test_serve_load_step_trace_reports_the_slow_gaps(tmp_path, default_tokenizer, capsys):
    """``--step-trace``: the server runs with ``--step-trace``; each row gets the summary of the
    timed clients' gaps (``GET /debug/steps`` from the phase's start: the warm-up request's gaps
    are not in it) with the slowest gaps, and a line in words."""
    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "load.json"
    rc = mod.main(["--clients", "3", "--requests", "1", "--prompt-tokens", "96", "--max-tokens", "8",
                   "--max-batch", "4", "--chunk-size", "16", "--step-trace", "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["results"]
    s = row["steps"]
    # the streams' gaps are in the trace, each once per row that waited it (a joined stream's first
    # gap, from its first token inside a gap, is not: the client measures it)
    assert 3 * 6 <= s["stream_gaps"] <= 3 * 7 and s["gaps"] >= 7 and s["p50_ms"] > 0 and s["p99_ms"] >= s["p50_ms"]
    assert set(s["slow_with"]) == {"join_chunk", "prefill_done", "rows_changed", "setup", "held", "plain"}
    gaps = [g["gap_ms"] for g in s["slowest"]]
    assert gaps == sorted(gaps, reverse=True) and len(gaps) == s["gaps"] and not any(g["first"] for g in s["slowest"])
    assert all(c["stacked"] or c["rebuild_ms"] > 0 for c in s["changes"])
    assert "step trace, max-batch 4" in capsys.readouterr().out


def test_serve_load_sends_kv_options_with_every_request(tmp_path, default_tokenizer):
    """--kv-options reaches the server with each request (a bad option would be a 400 there, an
    error in the row): sentencekv with a device cache filled at its first step."""
    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "load.json"
    rc = mod.main(["--clients", "2", "--requests", "1", "--prompt-tokens", "200", "--max-tokens", "4",
                   "--max-batch", "2", "--kv-method", "sentencekv", "--kv-budget", "48",
                   "--kv-options", '{"warm_cache": true, "cache_chunks": 6, "max_chunk": 16}', "--json", str(out)])
    d = json.loads(out.read_text())
    assert rc == 0 and d["kv_options"] == {"warm_cache": True, "cache_chunks": 6, "max_chunk": 16}
    assert all(r["errors"] == [] and r["tokens"] == 2 * 4 for r in d["results"])
    bad = tmp_path / "bad.json"
    mod.main(["--clients", "1", "--requests", "1", "--prompt-tokens", "40", "--max-tokens", "2", "--max-batch", "1",
              "--kv-method", "sentencekv", "--kv-budget", "24", "--kv-options", '{"warm_cache": "yes"}',
              "--json", str(bad)])
    rows = json.loads(bad.read_text())["results"]
    assert len(rows[0]["errors"]) == 1 and "warm_cache" in str(rows[0]["errors"][0])
