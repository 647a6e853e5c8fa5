"""bench/profile_prefill.py: the last-chunk profile window on a tiny CPU run, and the device
busy/idle summary it computes from a Chrome trace."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _mod():
    spec = importlib.util.spec_from_file_location("profile_prefill", BENCH / "profile_prefill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_device_busy_takes_the_union_per_stream_and_the_gaps_of_the_compute_stream():
    ev = [("kernel", 7, 0, 10), ("kernel", 7, 5, 10), ("kernel", 7, 30, 5), ("gpu_memset", 7, 60, 5),
          ("gpu_memcpy", 9, 2, 40), ("cpu_op", 1, 0, 100)]
    trace = {"traceEvents": [{"ph": "X", "cat": c, "pid": 0, "tid": t, "ts": ts, "dur": d} for c, t, ts, d in ev]}
    got = _mod()._device_busy(trace)
    assert got["compute_stream"] == "0/7"                                   # the most events
    s = got["streams"]["0/7"]
    assert (s["events"], s["busy_ms"], s["span_ms"]) == (4, 0.025, 0.065)   # [0, 15) + [30, 35) + [60, 65)
    assert s["idle_ms"] == 0.04 and s["longest_gaps_ms"] == [0.025, 0.015]
    assert got["streams"]["0/9"]["busy_ms"] == 0.04
    assert _mod()._device_busy({"traceEvents": [{"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 1}]}) is None


def test_last_chunk_window_on_the_cpu(tmp_path, capsys):
    """The profiler runs over the last prefill chunk only: one attend range per layer, a trace file
    per run, the window's wall time in the JSON (no device events on the CPU)."""
    mod = _mod()
    rc = mod.main(["--ctx", "256", "--layers", "2", "--chunk", "64", "--methods", "full,sentencekv:64",
                   "--profile-last-chunk", "--top", "3", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "profile_prefill.json").read_text())["rows"]
    assert [r["system"] for r in rows] == ["full", "sentencekv:64"]
    for r in rows:
        assert r["profiled"] and 0 < r["last_chunk_s"] < r["wall_s"] and r["last_chunk_device"] is None
        assert r["spans"]["kvsift.prefill.attend"]["count"] == 2          # the last chunk's two layers
    for name in ("trace_full_run1.json.gz", "trace_sentencekv_64_run1.json.gz"):
        assert json.loads(gzip.decompress((tmp_path / name).read_bytes()))["traceEvents"]
    assert "last chunk" in capsys.readouterr().out


def test_general_suffix_runs_the_general_final_offload_and_restores(tmp_path, monkeypatch):
    from kvsift.methods.sentencekv import SentenceKV

    calls = []
    real = SentenceKV._offload_dense

    def spy(self, *a):
        calls.append(1)
        return real(self, *a)

    monkeypatch.setattr(SentenceKV, "_offload_dense", spy)
    mod = _mod()
    args = ["--ctx", "256", "--layers", "2", "--chunk", "64", "--no-profile", "--out", str(tmp_path)]
    assert mod.main(args + ["--methods", "sentencekv:64"]) == 0
    seen = len(calls)
    assert seen > 0                                             # the dense path was asked
    assert mod.main(args + ["--methods", "sentencekv:64@general"]) == 0
    assert len(calls) == seen                                   # ...and not under '@general'
    assert SentenceKV.__dict__["_offload_dense"] is spy         # restored
    rows = json.loads((tmp_path / "profile_prefill.json").read_text())["rows"]
    assert rows[0]["system"] == "sentencekv:64@general"
